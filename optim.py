"""
The optimizers train.py chooses from with `optimizer = 'adamw' | 'muon'`.

AdamW (model.GPT.optimizer) treats every weight as a bag of numbers. Muon (Keller Jordan's, from the
modded-nanogpt speedrun) treats a weight matrix as a matrix: it takes the momentum of the gradient
and replaces it by the nearest (semi-)orthogonal matrix U V^T of its SVD U S V^T, so every direction
the update moves in moves by the same amount. Rare directions that a raw gradient would barely touch
get their share, and the step reaches a given loss in fewer updates. The SVD is too slow, so five
Newton-Schulz iterations, a handful of matmuls, approximate it (see `orthogonalize`).

Muon is for the hidden matrices only: the 2-D weights of the transformer blocks. The embedding (and
the output head, tied with it by default) is a lookup table rather than a linear map, and the norms'
weights are vectors: those stay on AdamW, in the same optimizer object, so train.py steps,
checkpoints and resumes one optimizer whichever it uses. LoRA adapters stay on AdamW too (Muon's
premise, a full-rank update, does not fit a rank-8 factor).
"""
import math

import torch

# Coefficients of the quintic p(x) = a x + b x^3 + c x^5 applied to the singular values. They are
# chosen for a steep slope at 0 (small singular values grow fast) rather than for convergence to
# exactly 1: after five steps every singular value of a full-rank input lies within ~0.7-1.2, which
# works as well as an exact orthogonalisation and costs a third of the iterations.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5, dtype=torch.bfloat16):
    """~U V^T for G = U S V^T, by Newton-Schulz iterations X <- p(X) on the singular values.
    G: a matrix (m, n) or a stack of them (k, m, n), each orthogonalized on its own: one batched
    matmul per product over the stack runs ~2x faster on a CPU than a loop over small matrices."""
    a, b, c = NS_COEFFS
    X = G.to(dtype).reshape(-1, *G.shape[-2:])  # (k, m, n): one matrix is a stack of one
    tall = X.size(1) > X.size(2)
    if tall:  # work on the wide orientation: X @ X^T is then the smaller Gram matrix
        X = X.mT
    # singular values <= 1 (the Frobenius norm bounds the largest)
    X = X / (X.norm(dim=(1, 2), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT                                   # (k, m, m), m = the smaller dimension
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)    # b A + c A A
        X = torch.baddbmm(X, B, X, beta=a)             # a X + B X
    return (X.mT if tall else X).reshape(G.shape).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on the param groups with muon=True; AdamW (decoupled weight decay) on the others.

    Muon step for a matrix W (out x in) with gradient G, momentum beta, learning rate lr:
        m <- beta m + (1 - beta) G                    momentum buffer (an average of gradients)
        u <- (1 - beta) G + beta m                    Nesterov: look ahead along the momentum
        W <- W - lr * sqrt(max(1, out/in)) * orthogonalize(u)
    The sqrt(out/in) factor keeps the update's effect on the layer's output the same for tall
    matrices (the MLP's gate and up projections) as for square ones."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, momentum=0.95,
                 ns_steps=5, ns_dtype=torch.bfloat16):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        ns_steps=ns_steps, muon=False)
        super().__init__(groups, defaults)
        # bfloat16 where bf16 matmuls are fast (GPUs, AVX512-BF16/AMX CPUs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if not group['muon']:
                for p in params:
                    self.adamw_step(p, p.grad, self.state[p], group)
                continue
            by_shape = {}  # matrices of one shape are orthogonalized together, as one stack
            for p in params:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for same in by_shape.values():
                self.muon_step(same, group)

    def muon_step(self, params, group):
        """One Muon step for params, matrices of one shape."""
        beta, lr = group['momentum'], group['lr']
        looks = []
        for p in params:
            state = self.state[p]
            if not state:
                state['momentum'] = torch.zeros_like(p)
            m = state['momentum']
            m.lerp_(p.grad, 1 - beta)
            looks.append(p.grad.lerp(m, beta))
        updates = orthogonalize(torch.stack(looks), group['ns_steps'], self.ns_dtype)
        for p, update in zip(params, updates):
            p.mul_(1 - lr * group['weight_decay'])
            p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)

    def adamw_step(self, p, g, state, group):
        (beta1, beta2), lr = group['betas'], group['lr']
        if not state:
            state['step'] = 0
            state['exp_avg'], state['exp_avg_sq'] = torch.zeros_like(p), torch.zeros_like(p)
        state['step'] += 1
        t = state['step']
        m, v = state['exp_avg'], state['exp_avg_sq']
        # first moment: a running mean of gradients
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)     # second moment: of squared gradients
        denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(group['eps'])
        p.mul_(1 - lr * group['weight_decay'])
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))  # bias-corrected m / sqrt(v)


def make_optimizer(model, kind, lr, muon_lr, weight_decay, betas, momentum, device_type,
                   ns_dtype=torch.bfloat16, muon_weight_decay=0.0):
    """The optimizer for `kind` ('adamw' or 'muon') over the model's trainable parameters.
    muon: Muon (muon_lr, muon_weight_decay) on the blocks' 2-D weights; AdamW (lr) on the
    embedding/head (with weight decay), on the norms (without) and on LoRA adapters."""
    if kind == 'adamw':
        return model.optimizer(lr, weight_decay, betas, device_type)
    # a tied weight appears once
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in trainable
              if n.startswith('blocks.') and p.dim() == 2 and '.lora_' not in n]
    taken = {id(p) for p in hidden}
    others = [p for _, p in trainable if id(p) not in taken]
    groups = [{'params': hidden, 'muon': True, 'lr': muon_lr, 'weight_decay': muon_weight_decay},
              {'params': [p for p in others if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in others if p.dim() < 2], 'weight_decay': 0.0}]
    return Muon(groups, lr=lr, betas=betas, momentum=momentum, ns_dtype=ns_dtype)


def lr_factor(it, cfg, progress=None):
    """The learning rate at step `it` as a fraction of the peak (every group's: learning_rate,
    muon_lr). Both schedules warm up linearly over warmup_iters and end at min_lr / learning_rate at
    lr_decay_iters (default max_iters), flat after it. In between, cosine decays all the way; wsd
    (warmup-stable-decay) holds the peak, then decays linearly over the last decay_frac of the
    steps. A wsd run can be extended (resume its stable phase with more max_iters) or decayed from
    any checkpoint.
    With a time budget (max_minutes), `progress` is the fraction of the training time spent (0 to
    1) and the schedule is laid over time instead of steps: wsd decays over the last decay_frac of
    the time, cosine over all of it. The warm-up stays in steps: it is there for the optimizer's
    first updates, however long they take."""
    floor = cfg.min_lr / cfg.learning_rate
    if it < cfg.warmup_iters:
        return (it + 1) / (cfg.warmup_iters + 1)
    if progress is not None:
        if progress >= 1:
            return floor
        if cfg.lr_schedule == 'wsd':
            left = 1 - progress  # the fraction of the time still to go
            return 1.0 if left > cfg.decay_frac else floor + (1 - floor) * left / cfg.decay_frac
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - floor)
    end = cfg.lr_decay_iters or cfg.max_iters
    if it >= end:
        return floor
    if cfg.lr_schedule == 'wsd':
        decay_start = max(cfg.warmup_iters, end - round(cfg.decay_frac * end))
        return 1.0 if it < decay_start else floor + (1 - floor) * (end - it) / (end - decay_start)
    ratio = (it - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1 - floor)
