"""
Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model"), the math of it: train.py's DPO phase and eval.py use it.

A preference pair is a conversation and two replies to it, chosen (better) and rejected (worse).
SFT can only imitate; DPO also pushes away. Its implicit reward of a reply is how much more likely
the model being trained (the policy) makes it than the model it started from (the reference,
frozen): r = beta * (log p_policy(reply) - log p_reference(reply)), summed over the reply's tokens.
The loss per pair is -log sigmoid(r_chosen - r_rejected): it falls as the policy raises the chosen
reply and lowers the rejected one relative to where it started, and beta sets how far it may drift
(small beta: far). Reward accuracy is the share of pairs with r_chosen > r_rejected (0 at the start,
where every reward is 0); the margin is the mean of r_chosen - r_rejected.

Measured on the notes profile (BENCHMARKS.md, "Preference tuning"), DPO alone learns that the chosen
replies are the longer ones and stops ending replies: it lowers the rejected reply's every token,
its end of turn included. `sft_weight` adds SFT's loss on the chosen reply (its mean nats per token,
the end of turn included), as RPO does (Pang et al. 2024, "Iterative Reasoning Preference
Optimization"), which keeps the model writing what it was taught to write.

Rows come packed (data.Packer): pair j of a row is documents 2j (chosen) and 2j + 1 (rejected),
targets only on the two replies (the mask prepare.py wrote), so one forward pass scores every
sequence of a batch.

    policy = sequence_logps(logits, y, doc)          # (B, T) per document of each row
    loss, correct, margin, pairs = pair_sums(policy, reference, doc, beta)
"""
import torch
import torch.nn.functional as F


def sequence_logps(logits, y, doc):
    """logits (B, T, vocab), targets y (B, T) (-1: none), doc ids (B, T) (-1: padding) -> (B, T):
    [r, d] is the summed log-probability of document d's targets in row r (0 past the row's
    documents). A target belongs to the document of the position that predicts it."""
    logp = -F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1,
                            reduction='none')  # (B, T), 0 where there is no target
    return torch.zeros_like(logp).scatter_add_(1, doc.clamp(min=0), logp)


def sequence_counts(y, doc):
    """(B, T): [r, d] is how many targets document d of row r has (sequence_logps' layout)."""
    return torch.zeros(y.shape, device=y.device).scatter_add_(1, doc.clamp(min=0),
                                                              (y != -1).float())


def pair_sums(policy, reference, doc, beta, sft_weight=0.0, counts=None):
    """Packed pairs' DPO figures, each a 0-d tensor summed over the batch's pairs: (loss, pairs the
    policy prefers as the data does, reward margin, pairs). policy, reference: (B, T) from
    sequence_logps; doc (B, T) the doc ids (pair j of a row: 2j chosen, 2j + 1 rejected). With
    sft_weight > 0 the loss adds that times the chosen reply's mean nats per token (counts: from
    sequence_counts)."""
    n = policy.size(1) // 2
    # pair j is in a row when its rejected sequence (doc 2j + 1) is: (B, n)
    present = torch.zeros_like(policy).scatter_add_(1, doc.clamp(min=0),
                                                    (doc >= 0).float())[:, 1:2 * n:2] > 0
    present = present.float()
    chosen = beta * (policy[:, 0:2 * n:2] - reference[:, 0:2 * n:2])  # (B, n) implicit rewards
    rejected = beta * (policy[:, 1:2 * n:2] - reference[:, 1:2 * n:2])
    margin = chosen - rejected
    losses = -F.logsigmoid(margin)  # (B, n)
    if sft_weight:
        losses = losses - sft_weight * policy[:, 0:2 * n:2] / counts[:, 0:2 * n:2].clamp(min=1)
    return ((losses * present).sum(), ((margin > 0).float() * present).sum(),
            (margin * present).sum(), present.sum())


def pairs_in(doc):
    """How many pairs a packed batch holds, from its doc ids (B, T) as a numpy array: each row's
    highest doc id is 2 * pairs - 1."""
    return int((doc.max(axis=1) + 1).sum()) // 2
