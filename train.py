"""
Stage 3: training, one script for pretraining and supervised fine-tuning (SFT).

    python train.py config/demo.py                                   # one process
    torchrun --standalone --nproc_per_node=8 train.py config/prod_pretrain.py   # DDP

The data decides the phase. `mixture` maps prepared sources to weights: each source gets its
weight's share of the rows' tokens.
  - Pretraining (any text source in the mixture): a row is a random window of block_size + 1 tokens
    of a source drawn by weight; loss on every token. Chat sources in a pretraining mixture are read
    the same way, so the model also learns the shape of a conversation.
  - SFT (only chat sources): rows packed best-fit with conversations (data.Packer), long ones cut at
    turn boundaries (data.Split.cut_pieces); loss only where the chat template's mask is 1
    (assistant replies and their <|eot|>), targets are -1 (ignored) elsewhere.
  - DPO (only preference pairs, from an SFT checkpoint): rows packed with whole pairs, a chosen and
    a rejected reply to one conversation; dpo.py's loss against the starting weights, frozen (the
    reference: a copy, or for LoRA the same model with its adapters off). The log and metrics.jsonl
    add reward accuracy and margin, on train and val pairs; best.pt is chosen on the val DPO loss.
A step's loss is its summed target nats over all micro-batches and processes / their target count
(DPO: its summed pair losses / its pairs).

Batches are a pure function of (seed, step, micro-step, rank): resuming needs no sampler state, and
each DDP rank draws the rows one process would draw at its place. Checkpoints go to
<out_dir>/<phase>/: ckpt.pt (latest, with optimizer and RNG state, for resume) and best.pt (the best
validation loss on `best_on`, weights only). What is trained, where its weights start and what a
checkpoint keeps of it is learner.py's; this file is the loop.
"""
import gc
import itertools
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dpo
from checkpoint import checkpoint_path, merge_adapter
from common import check_writable, die, duration, hold_lock, peak_flops, unused_keys
from configurator import configure, save_config
from data import bits_per_byte, build_data, loss_sums, make_batches
from learner import build_model, check_disk, save_best, save_latest, setup_processes
from model import adapters_off
from optim import lr_factor
from tokenizer import load_tokenizer


# ----------------------------------------------------------------------------------------------
# Before the loop: the run folder, Ctrl-C, the optimizer's settings, what the run will do


def open_run_folder(cfg, log):
    """<out_dir>/runs/<run_id>/: the run's full config (config.json) and its metrics file, opened
    for appending."""
    run_id = cfg.run_id or f"{cfg.phase}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.out_dir, 'runs', run_id)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, 'config.json'))
    log(f"run folder: {run_dir}")
    return open(os.path.join(run_dir, 'metrics.jsonl'), 'a')


def check_output_folder(cfg, proc):
    """The checkpoint folder must be writable before anything else happens (not after an hour of
    training)."""
    if proc.master:
        check_writable(cfg.ckpt_dir, 'out_dir')
        # two runs in one folder would interleave checkpoints, best.pt and metrics
        hold_lock(cfg.ckpt_dir, 'train.lock', f"the checkpoint folder of phase '{cfg.phase}'")
    if proc.ddp:
        dist.barrier()  # the other ranks read ckpt_dir (resume) only once rank 0 has made it


def catch_interrupts():
    """Ctrl-C (or a scheduler's SIGTERM) sets stop['requested']: the loop finishes the current step,
    saves and exits. A second one raises KeyboardInterrupt and exits at once."""
    stop = {'requested': False}

    def on_sigint(signum, frame):
        if stop['requested']:
            raise KeyboardInterrupt
        stop['requested'] = True
        print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit at once)",
              file=sys.stderr)

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigint)
    return stop


def check_optimizer(cfg):
    """What configurator.py's per-key checks cannot say: min_lr is a floor below the peak, and the
    warm-up ends before the decay does."""
    if cfg.min_lr > cfg.learning_rate:
        die(f"need min_lr <= learning_rate, got {cfg.min_lr} and {cfg.learning_rate}")
    # the schedule warms up, then decays until lr_decay_iters: a warm-up that ends after the decay
    # would keep raising the rate past it and then drop it to the floor in one step
    if cfg.lr_decay_iters and cfg.warmup_iters > cfg.lr_decay_iters:
        die(f"warmup_iters={cfg.warmup_iters} is longer than lr_decay_iters={cfg.lr_decay_iters}, "
            f"where the decay must have ended: set warmup_iters <= lr_decay_iters (or "
            f"lr_decay_iters=0 to decay until max_iters)")
    # keys that only matter with another key set
    if cfg.optimizer != 'muon':
        unused_keys(cfg, ['muon_lr', 'muon_momentum', 'muon_weight_decay'],
                    f"optimizer={cfg.optimizer!r} (Muon's settings need optimizer='muon')")
    if cfg.lr_schedule != 'wsd':
        unused_keys(cfg, ['decay_frac'], f"lr_schedule={cfg.lr_schedule!r} (it is wsd's)")
    if cfg.max_minutes:
        unused_keys(cfg, ['max_iters', 'lr_decay_iters'], f"max_minutes={cfg.max_minutes:g}: the "
                    "time budget sets the run's length and the schedule")
    if cfg.lora_rank == 0:
        unused_keys(cfg, ['lora_alpha', 'lora_dropout', 'lora_targets'] +
                    ([] if cfg.merge_lora or cfg.init_from == 'resume' else ['lora_base']),
                    "lora_rank=0 trains every weight (set lora_rank > 0 for LoRA)")


def describe_run(cfg, proc, learner, run_data, packer):
    """The run's opening lines: the model's size and FLOPs, LoRA, optimizer, data, SFT row fill and
    the epochs each source will see (a warning past max_epochs). Returns (tokens_per_step,
    flops_per_step) for the log's speed figures."""
    B, T = cfg.batch_size, cfg.block_size
    raw, log, mixture = learner.raw, proc.log, run_data.mixture
    sft = run_data.sft or run_data.dpo  # packed rows: conversations, or pairs
    total, non_embedding = raw.num_params()
    tokens_per_step = B * T * cfg.gradient_accumulation_steps
    flops_per_step = raw.flops_per_token(T) * tokens_per_step
    if run_data.dpo:  # and the reference's forward pass: 2 of the 6 FLOPs per parameter and token
        flops_per_step = flops_per_step * 8 // 6
    log(f"model: {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding), "
        f"{raw.flops_per_token(T) / 1e6:.1f} MFLOP per token")
    if learner.lora:
        lora = learner.lora
        trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        log(f"LoRA rank {lora['rank']} (alpha {lora['alpha']}) on {', '.join(lora['targets'])}: "
            f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), the "
            "base is frozen")
    if cfg.optimizer == 'muon':
        groups = learner.optimizer.param_groups
        count = lambda muon: sum(p.numel() for g in groups if g['muon'] == muon
                                 for p in g['params'])
        adamw_part = 'the LoRA adapters' if learner.lora else 'the embedding/head and norms'
        log(f"optimizer: Muon (lr {cfg.muon_lr:g}) on the blocks' matrices ({count(True):,} "
            f"parameters), AdamW (lr {cfg.learning_rate:g}) on {adamw_part} ({count(False):,}); "
            f"{cfg.lr_schedule} schedule")
    else:
        log(f"optimizer: AdamW (lr {cfg.learning_rate:g}); {cfg.lr_schedule} schedule")
    what = 'SFT (masked loss, packed conversations)' if sft else 'pretraining'
    if run_data.dpo:
        reference = ('the base, adapters off' if learner.lora else 'the starting weights, '
                     'frozen')
        sft_part = (f", + {cfg.dpo_sft_weight:g} x SFT loss on the chosen"
                    if cfg.dpo_sft_weight else '')
        what = f"DPO (beta {cfg.dpo_beta:g}{sft_part}; reference: {reference}; packed pairs)"
    log(f"{what} on {mixture}; {proc.device} {proc.dtype}, {proc.world} process(es), "
        f"{tokens_per_step:,} tokens per step")
    rows_per_step = B * cfg.gradient_accumulation_steps
    if run_data.dpo:
        rows = rows_per_step * max(1, min(cfg.max_iters, 20))  # the first steps
        fill, _ = packer.stats(rows)
        pairs = sum(len(row) for row in packer.rows(0, rows, forget=False)) / rows
        cuts = ', '.join(f"{n} {s.long} of {s.conversations} ({s.conversations - len(s.usable)} "
                         "with no reply left)" for n, s in run_data.train.items())
        log(f"DPO rows: {100 * fill:.1f}% full, {pairs * rows_per_step:.1f} pairs per step; "
            f"pairs longer than a row, each side cut to fit (data.trim_side): {cuts}")
    elif sft:
        # the first steps
        fill, trained_per_row = packer.stats(rows_per_step * max(1, min(cfg.max_iters, 20)))
        cuts = ', '.join(f"{n} {s.long} of {s.conversations} ({s.truncated} with a turn cut to "
                         f"fit, "
                         f"{s.conversations - len(s.usable)} with no reply left)" for n,
                         s in run_data.train.items())
        log(f"SFT rows: {100 * fill:.1f}% full, {trained_per_row * rows_per_step:,.0f} trained "
            f"tokens per step ({100 * trained_per_row / (T + 1):.1f}% of row tokens); "
            f"conversations "
            f"longer than a row, cut at turn boundaries: {cuts}")
    if cfg.max_minutes:
        log(f"time budget: {duration(cfg.max_minutes * 60)} of training loop (steps, evaluations, "
            f"checkpoints), as many steps as fit; the {cfg.lr_schedule} schedule follows the clock")
        return tokens_per_step, flops_per_step
    # how often the run repeats each source: worth it up to a few passes, wasted compute far beyond
    # (max_epochs)
    drawn = cfg.max_iters * rows_per_step * (fill * (T + 1) if sft else T)  # tokens the run reads
    # tokens of one epoch of a source
    size = lambda s: s.pieces['length'].sum() if sft else s.tokens
    epochs = {n: drawn * mixture[n] / sum(mixture.values()) / size(s)
              for n, s in run_data.train.items()}
    log(f"expected epochs per source over {cfg.max_iters} steps: "
        + ', '.join(f"{n} {e:.2f}" for n, e in epochs.items()))
    for n, e in epochs.items():
        if e > cfg.max_epochs and proc.master:
            print(f"warning: this run would repeat '{n}' {e:.1f} times, more than "
                  f"max_epochs={cfg.max_epochs}: beyond ~16 passes, more repeats of the same "
                  f"tokens "
                  "are worth almost nothing (Muennighoff et al. 2023, 'Scaling Data-Constrained "
                  "Language Models'). Lower its weight or max_iters, or give it more data",
                  file=sys.stderr)
    return tokens_per_step, flops_per_step


# ----------------------------------------------------------------------------------------------
# Evaluation and the log


def to_device(arrays, device):
    """numpy arrays -> tensors on the device (pinned and non-blocking on CUDA); None stays None."""
    cuda = device.startswith('cuda')
    to = lambda t: t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
    return [None if a is None else to(torch.from_numpy(a)) for a in arrays]


@torch.no_grad()
def evaluate(learner, proc, val, val_batches, token_bytes):
    """Mean loss per target token and bits per byte of each val source (data.loss_sums, as eval.py
    computes them): ({source: loss}, {source: bpb}), over every process's batches."""
    learner.model.eval()
    losses, bpb = {}, {}
    for i, name in enumerate(val):
        # nats, targets, nats of text targets, their bytes
        sums = torch.zeros(4, dtype=torch.float64, device=proc.device)
        for batch in val_batches(i, name):
            x, y, doc = to_device(batch, proc.device)
            with proc.autocast:
                logits, _ = learner.raw(x, doc_ids=doc)
            nats = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1,
                                   reduction='none')  # (B, T)
            sums += torch.stack(loss_sums(nats, y, token_bytes)).double()
        if proc.ddp:
            dist.all_reduce(sums)
        nats, targets, text_nats, n_bytes = sums.tolist()
        losses[name] = nats / max(targets, 1)
        bpb[name] = bits_per_byte(text_nats, max(n_bytes, 1))
    learner.model.train()
    return losses, bpb


@torch.no_grad()
def evaluate_pairs(cfg, learner, proc, val, val_batches):
    """DPO's evaluation of each val source of pairs: {source: {'loss', 'accuracy', 'margin',
    'pairs'}} (dpo.pair_sums, means over its pairs), over every process's batches."""
    learner.model.eval()
    out = {}
    for i, name in enumerate(val):
        sums = torch.zeros(4, dtype=torch.float64, device=proc.device)
        for batch in val_batches(i, name):
            x, y, doc = to_device(batch, proc.device)
            reference = reference_logps(learner, proc, x, y, doc, compiled=False)
            with proc.autocast:
                logits, _ = learner.raw(x, doc_ids=doc)
            sums += torch.stack(dpo.pair_sums(dpo.sequence_logps(logits, y, doc), reference, doc,
                                              cfg.dpo_beta, cfg.dpo_sft_weight,
                                              dpo.sequence_counts(y, doc))).double()
        if proc.ddp:
            dist.all_reduce(sums)
        loss, right, margin, pairs = sums.tolist()
        out[name] = {'loss': loss / max(pairs, 1), 'accuracy': right / max(pairs, 1),
                     'margin': margin / max(pairs, 1), 'pairs': int(pairs)}
    learner.model.train()
    return out


def best_on_mean(values, mixture, best_on):
    """The figure best.pt is chosen on: the best_on sources' values weighted by their mixture
    weights (equally where none of them is in the mixture)."""
    weights = {n: mixture.get(n, 0) for n in best_on}
    if sum(weights.values()) == 0:
        weights = {n: 1 for n in best_on}
    return sum(values[n] * w for n, w in weights.items()) / sum(weights.values())


def log_evaluation(log, metrics, iter_num, per_source, bpb, mixture, best_on, elapsed):
    """The log line and metrics row of an evaluation; returns the val loss best.pt is chosen on."""
    val_loss = best_on_mean(per_source, mixture, best_on)
    val_bpb = best_on_mean(bpb, mixture, best_on)
    shown = ', '.join(f'{n} {v:.4f}' for n, v in per_source.items())
    log(f"step {iter_num}: val loss {val_loss:.4f} ({shown}), {val_bpb:.4f} bits per byte, "
        f"{elapsed:.0f} s of training")
    record(metrics, iter=iter_num, val_loss=val_loss, val=per_source, val_bpb=val_bpb, bpb=bpb,
           elapsed=elapsed)
    return val_loss


def log_pairs_evaluation(log, metrics, iter_num, per_source, mixture, best_on, elapsed):
    """The log line and metrics row of a DPO evaluation; returns the val loss best.pt is chosen
    on."""
    mean = lambda key: best_on_mean({n: v[key] for n, v in per_source.items()}, mixture, best_on)
    val_loss, accuracy, margin = mean('loss'), mean('accuracy'), mean('margin')
    shown = ', '.join(f"{n} {v['loss']:.4f} ({v['pairs']} pairs)" for n, v in per_source.items())
    log(f"step {iter_num}: val DPO loss {val_loss:.4f} ({shown}), reward accuracy "
        f"{100 * accuracy:.1f}%, margin {margin:.4f}, {elapsed:.0f} s of training")
    record(metrics, iter=iter_num, val_loss=val_loss, val_accuracy=accuracy, val_margin=margin,
           val=per_source, elapsed=elapsed)
    return val_loss


def record(metrics, **row):
    """One line of metrics.jsonl (only the master process has the file open)."""
    if metrics:
        metrics.write(json.dumps(row) + '\n')
        metrics.flush()


def step_line(iter_num, loss, lr, dt, tokens_per_step, flops_per_step, peak, world, so_far,
              eta):
    """The log line of a step, and its speed figures: (line, tokens/s, FLOP/s, MFU or None without a
    peak)."""
    tok_s = tokens_per_step / dt
    flops_s = flops_per_step / dt
    # flops_s counts every process; peak is one GPU's
    mfu = flops_s / (peak * world) if peak else None
    speed = f"MFU {100 * mfu:.1f}%" if peak else f"{flops_s / 1e9:.1f} GFLOP/s"
    line = (f"step {iter_num} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms | {tok_s:,.0f} "
            f"tok/s | {speed} | {duration(so_far)} in, eta {duration(eta)}")
    return line, tok_s, flops_s, mfu


# ----------------------------------------------------------------------------------------------
# A step: its batches, learning rate, gradients, and when to stop


def read_ahead(read, first):
    """Yield read(first), read(first + 1), ...; each is read by a background thread while the caller
    works on the one before. A step's batches (memmap reads and packing: numpy work, much of it
    outside the GIL) are then ready when the step starts, so it never waits for its data; and since
    a batch depends only on the step and micro-step numbers, reading ahead changes nothing that is
    trained."""
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, first)
        for it in itertools.count(first + 1):
            done, pending = pending, reader.submit(read, it)
            yield done.result()


def set_lr(optimizer, cfg, it, progress):
    """Every group's learning rate at step `it`, or `progress` through a time budget (Muon's
    matrices have their own peak); returns AdamW's."""
    factor = lr_factor(it, cfg, progress)
    for group in optimizer.param_groups:
        group['lr'] = (cfg.muon_lr if group.get('muon') else cfg.learning_rate) * factor
    return cfg.learning_rate * factor


@torch.no_grad()
def reference_logps(learner, proc, x, y, doc, compiled):
    """DPO's reference, the starting weights frozen: (B, T) summed log-probabilities of each
    document of each row (dpo.sequence_logps). With LoRA it is the model itself, adapters off.
    compiled: as the training step runs the policy (compiled when configured), else as the
    evaluation does (eager), so that at the start policy and reference agree to the last bit."""
    if learner.reference is not None:
        model = learner.reference if compiled else getattr(learner.reference, '_orig_mod',
                                                          learner.reference)
    else:  # the compiled model without its DDP wrapper (which is for gradients), or the plain one
        model = getattr(learner.model, 'module', learner.model) if compiled else learner.raw
    was_training = learner.raw.training
    learner.raw.eval()  # (no dropout: the reference is one fixed model)
    with proc.autocast, adapters_off(learner.raw):
        logits, _ = model(x, doc_ids=doc)
    learner.raw.train(was_training)
    return dpo.sequence_logps(logits, y, doc)


def forward_backward(cfg, learner, proc, batches, dpo_run):
    """Accumulate one step's gradients over this process's micro-batches; returns (the step's loss,
    its target count over every process, DPO's [reward accuracy, margin] or None). The step's loss
    is its summed target nats over every micro-batch and process divided by their total target
    count, so a micro-batch weighs by its targets (an SFT one may have few or many), not by
    1/accum. DPO counts pairs instead of targets, and sums its pairs' losses (dpo.pair_sums). That
    total is needed before the first backward, which is why the batches come read up front."""
    counts = [dpo.pairs_in(doc) if dpo_run else int((y != -1).sum()) for _, y, doc in batches]
    n_total = sum(counts)
    if proc.ddp:
        n_all = torch.tensor(float(n_total), dtype=torch.float64, device=proc.device)
        dist.all_reduce(n_all)
        n_total = int(n_all.item())
    sums = torch.zeros(3, device=proc.device)  # summed loss; DPO: pairs preferred right, margin
    for micro, (batch, n) in enumerate(zip(batches, counts)):
        x, y, doc = to_device(batch, proc.device)
        if proc.ddp:  # all-reduce gradients only on the last micro-step
            learner.model.require_backward_grad_sync = micro == len(batches) - 1
        if dpo_run:
            reference = reference_logps(learner, proc, x, y, doc, compiled=True)
            with proc.autocast:
                logits, _ = learner.model(x, doc_ids=doc)
            summed, right, margin, _ = dpo.pair_sums(dpo.sequence_logps(logits, y, doc),
                                                     reference, doc, cfg.dpo_beta,
                                                     cfg.dpo_sft_weight,
                                                     dpo.sequence_counts(y, doc))
            sums[1:] += torch.stack([right, margin.detach()])
        else:
            with proc.autocast:
                _, loss = learner.model(x, y, doc)  # mean over this micro-batch's n targets
            summed = loss * n
        # / n_total: its share of the step; x world: DDP averages the processes' gradients, we want
        # their sum
        learner.scaler.scale(summed * (proc.world / max(n_total, 1))).backward()
        sums[0] += summed.detach()
    if proc.ddp:
        dist.all_reduce(sums)
    sums /= max(n_total, 1)
    return sums[0], n_total, sums[1:] if dpo_run else None


def take_step(cfg, proc, learner, position, batches, dpo_run):
    """One optimizer step on this step's batches, or none if its loss or gradients are not finite: a
    bad step (an overflow, bad data) is skipped rather than allowed to poison the weights, and too
    many in a row stop the run. Returns (the step's loss, gradient norm, target count, DPO's
    figures or None) as the device has them (no wait)."""
    raw, optimizer, scaler = learner.raw, learner.optimizer, learner.scaler
    step_loss, n_total, pair_figures = forward_backward(cfg, learner, proc, batches, dpo_run)
    scaler.unscale_(optimizer)  # (nothing to do unless float16)
    grads = [p.grad for p in raw.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    # the step's one wait for the device: whether to take the step (the next batches are being read
    # meanwhile)
    bad_loss, bad_grad = (~torch.isfinite(torch.stack([step_loss.float(),
                                                       grad_norm.float()]))).tolist()
    # A finite loss can still give inf/nan gradients; with float16, GradScaler skips those steps
    # itself and lowers its scale (routine, not counted)
    if bad_loss or (bad_grad and not scaler.is_enabled()):
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        position.nonfinite_in_a_row += 1
        position.nonfinite_total += 1
        what = 'loss' if bad_loss else 'gradient norm'
        proc.log(f"step {position.iter}: non-finite {what}, step skipped "
                 f"({position.nonfinite_in_a_row} in a row)")
        if position.nonfinite_in_a_row >= cfg.max_nonfinite:
            too_many_nonfinite(cfg, position.nonfinite_in_a_row, position.iter)
        return step_loss, grad_norm, n_total, pair_figures
    position.nonfinite_in_a_row = 0
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(raw.parameters(), cfg.grad_clip, grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, n_total, pair_figures


def too_many_nonfinite(cfg, count, iter_num):
    last = os.path.join(cfg.ckpt_dir, 'ckpt.pt')
    last = (f"the last good checkpoint is {last}" if os.path.exists(last)
            else "no checkpoint was saved yet")
    die(f"{count} non-finite losses in a row (or gradient norms) at step {iter_num}: stopping "
        f"({last}). Try a lower learning_rate, float32 or bfloat16 instead of float16, or check "
        f"the "
        "data")


def stop_requested(stop, proc, log_step):
    """Save and stop before this step? Ctrl-C lands on each process at its own moment: with several,
    they agree on it first, on log steps only (the steps that wait for the device anyway), so all of
    them save the same step."""
    if not proc.ddp:
        return stop['requested']
    if not log_step:
        return False
    agreed = torch.tensor(float(stop['requested']), device=proc.device)
    dist.all_reduce(agreed)
    return agreed.item() > 0


def slowest(proc, figures):
    """The largest of each figure over the processes (the figures themselves with one process)."""
    if not proc.ddp:
        return figures
    t = torch.tensor(figures, dtype=torch.float64, device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# The run


def main():
    cfg = configure()
    if cfg.merge_lora:
        return merge_adapter(cfg.merge_lora, cfg.lora_base)
    check_optimizer(cfg)
    proc = setup_processes(cfg)  # torchrun sets RANK/WORLD_SIZE; plain python is one process
    log = proc.log
    accum = cfg.gradient_accumulation_steps // proc.world  # micro-batches per step of each process

    # --- data ---
    tok = load_tokenizer(cfg.tokenizer_path)
    run_data = build_data(cfg, tok)
    train_batch, val_batches, packer = make_batches(cfg, run_data, proc.rank, proc.world)
    val = run_data.val
    check_output_folder(cfg, proc)  # fail now, not after an hour of training

    # --- model: from scratch, resumed, or initialised from another checkpoint ---
    learner, position = build_model(cfg, tok, proc, run_data.dpo)
    check_disk(cfg, learner.raw, proc)
    tokens_per_step, flops_per_step = describe_run(cfg, proc, learner, run_data, packer)
    peak = peak_flops(proc.device_type, proc.dtype)
    # config.json and metrics.jsonl of this run
    metrics = open_run_folder(cfg, log) if proc.master else None
    # special tokens: 0 bytes
    token_bytes = torch.tensor([len(b) for b in tok.id_bytes], device=proc.device)
    # Ctrl-C or SIGTERM: finish the step, save, exit (a second one exits at once)
    stop = catch_interrupts()

    # --- the loop ---
    start_iter = position.iter
    last_val = last_iter = None  # the latest evaluation's val loss and step
    # seconds of the steps since the last log line, and how many: ms/step
    step_time, steps_timed = 0.0, 0
    # a step's micro-batches, the same rows on any number of processes
    read_step = lambda it: [train_batch(it, proc.rank * accum + micro) for micro in range(accum)]
    step_batches = read_ahead(read_step, position.iter)
    # elapsed: seconds of training (compiling included; evaluations and checkpoints not)
    t_train = time.time()
    # max_minutes' clock counts everything in the loop, resumed from where the checkpoint left it
    t_start, clock_start = time.time(), position.clock
    clock_now = lambda: clock_start + time.time() - t_start
    budget = cfg.max_minutes * 60  # seconds; 0: max_iters steps
    progress = None  # the fraction of the budget's training time spent
    while True:
        it = position.iter
        position.clock = clock_now()
        if budget:
            # the slowest process's figures: every process must pick the same rate and stop together
            clock, eval_cost, step_cost = slowest(proc, [position.clock, position.eval_cost,
                                                         position.step_cost])
            progress = clock / max(1e-9, budget - eval_cost - step_cost)
        last = progress >= 1 if budget else it >= cfg.max_iters
        # Evaluate and save before the step: step 0's val loss is the untrained baseline, and the
        # last pass through here (step max_iters, or the budget spent) evaluates the finished
        # model. A resumed run skips the evaluation its checkpoint was saved after (it would only
        # repeat it)
        resumed_here = cfg.init_from == 'resume' and it == start_iter
        if (it % cfg.eval_interval == 0 or last) and not resumed_here:
            t_eval = time.time()
            position.elapsed += t_eval - t_train
            if val:  # val_sources=[] trains without evaluating (best.pt then is not written)
                if run_data.dpo:
                    per_source = evaluate_pairs(cfg, learner, proc, val, val_batches)
                    val_loss = log_pairs_evaluation(log, metrics, it, per_source,
                                                    run_data.mixture, run_data.best_on,
                                                    position.elapsed)
                else:
                    per_source, bpb = evaluate(learner, proc, val, val_batches, token_bytes)
                    val_loss = log_evaluation(log, metrics, it, per_source, bpb, run_data.mixture,
                                              run_data.best_on, position.elapsed)
                last_val, last_iter = val_loss, it
                if val_loss < position.best_val:
                    position.best_val, position.best_iter = val_loss, it
                    if proc.master:
                        save_best(cfg, learner, position, tok)
            if it > 0:
                position.clock = clock_now()
                save_latest('periodic', cfg, proc, learner, position, tok)
            t_train = time.time()
            position.eval_cost = max(position.eval_cost, t_train - t_eval)
        if last:
            if budget:
                log(f"time budget of {duration(budget)} spent: {it} steps, the loop took "
                    f"{duration(clock_now())}")
            break
        if stop_requested(stop, proc, it % cfg.log_interval == 0):
            position.elapsed += time.time() - t_train
            position.clock = clock_now()
            save_latest('interrupted', cfg, proc, learner, position, tok)
            # saved: a late second Ctrl-C has nothing left to cut
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            break

        # ms/step counts the step only: evaluations and checkpoints are not in it
        t_step = time.time()
        lr = set_lr(learner.optimizer, cfg, it, progress)
        # read while the last step ran (the next step's are being read now)
        batches = next(step_batches)
        step_loss, grad_norm, n_total, pair_figures = take_step(cfg, proc, learner, position,
                                                                batches, run_data.dpo)
        position.iter += 1
        step_time += time.time() - t_step
        steps_timed += 1
        if position.iter > start_iter + 1:  # (the first step compiles: not a step's time)
            position.step_cost = time.time() - t_step

        if position.iter % cfg.log_interval == 0 or position.iter == cfg.max_iters:
            # waits for the device: log steps only
            loss_value, norm_value = step_loss.item(), grad_norm.item()
            dt, so_far = step_time / steps_timed, position.elapsed + time.time() - t_train
            step_time, steps_timed = 0.0, 0
            eta = budget - clock_now() if budget else (cfg.max_iters - position.iter) * dt
            line, tok_s, flops_s, mfu = step_line(position.iter, loss_value, lr, dt,
                                                  tokens_per_step, flops_per_step, peak,
                                                  proc.world, so_far, eta)
            dpo_row = {}
            if pair_figures is not None:  # DPO: this step's pairs
                accuracy, margin = pair_figures.tolist()
                line += f" | reward accuracy {100 * accuracy:.0f}%, margin {margin:.3f}"
                dpo_row = {'accuracy': accuracy, 'margin': margin, 'pairs': n_total}
            log(line)
            record(metrics, iter=position.iter, loss=loss_value, lr=lr, grad_norm=norm_value,
                   ms=dt * 1000,
                   tokens_per_sec=tok_s, flops_per_sec=flops_s, mfu=mfu,
                   **({} if dpo_row else {'trained_tokens': n_total}), **dpo_row,
                   nonfinite=position.nonfinite_total, elapsed=so_far)

    step_batches.close()
    if metrics:
        metrics.close()
    if proc.ddp:
        # the DDP wrapper goes first: destroyed with it, gloo's group would join its threads holding
        # the GIL (a hang at exit, if one still frees a tensor of the last collective);
        # destroy_process_group releases it
        del learner.model
        gc.collect()
        dist.destroy_process_group()
    where = f"checkpoints in {cfg.ckpt_dir}"
    if not val or last_val is None:
        log(f"done: {where}")
        return
    log(f"done: best val loss {position.best_val:.4f} at step {position.best_iter} (best.pt), the "
        f"last {last_val:.4f} at step {last_iter}; {where}")
    if position.best_iter is not None and position.best_iter < last_iter:
        # a small data set learned by heart (the demo's, on purpose) reads like a failure otherwise
        path, why = checkpoint_path(cfg)
        log(f"note: the val loss rose after step {position.best_iter}: from there the model learns "
            f"its train set by heart rather than what generalises to val (expected when it is "
            f"small, as the demo's is on purpose). sample.py and eval.py load {path} ({why}); set "
            f"ckpt to choose the other")


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:  # the second Ctrl-C: leave at once, checkpoints as they were
        print("\ninterrupted again: exiting without saving", file=sys.stderr)
        sys.exit(130)
