"""
Stage 3: training, one script for pretraining and supervised fine-tuning (SFT).

    python train.py config/demo.py                                   # one process
    torchrun --standalone --nproc_per_node=8 train.py config/prod_pretrain.py   # DDP

The data decides the phase. `mixture` maps prepared sources to weights: each source gets its weight's
share of the rows' tokens.
  - Pretraining (any text source in the mixture): a row is a random window of block_size + 1 tokens of a
    source drawn by weight; loss on every token. Chat sources in a pretraining mixture are read the same
    way, so the model also learns the shape of a conversation.
  - SFT (only chat sources): rows packed best-fit with conversations (Packer), long ones cut at turn
    boundaries (Split.cut_pieces); loss only where the chat template's mask is 1 (assistant replies and
    their <|eot|>), targets are -1 (ignored) elsewhere.
A step's loss is its summed target nats over all micro-batches and processes / their target count.

Batches are a pure function of (seed, step, micro-step, rank): resuming needs no sampler state, and each
DDP rank draws the rows one process would draw at its place. Checkpoints go to <out_dir>/<phase>/: ckpt.pt
(latest, with optimizer and RNG state, for resume) and best.pt (the best validation loss on `best_on`,
weights only).
"""
import gc
import itertools
import json
import os
import signal
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (base_weights, check_compatible, freeze_base, load_for_resume, load_model,
                        read_checkpoint, save_checkpoint, saved_best_val)
from common import check_writable, die, duration, peak_flops, pick_device, runtime
from configurator import configure, save_config
from data import bits_per_byte, build_data, loss_sums, make_batches
from model import GPT, ModelConfig, add_lora, adapter_state
from optim import lr_factor, make_optimizer
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------
# Random state, the run folder, checkpoints' contents, Ctrl-C, the schedule

def rng_state():
    import random
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'numpy': [keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             'python': list(random.getstate()[1])}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import random
    torch.set_rng_state(state['torch'])
    keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state(('MT19937', np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state['python']), None))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def open_run_folder(cfg, log):
    """<out_dir>/runs/<run_id>/: the run's full config (config.json) and its metrics file, opened for appending."""
    run_id = cfg.run_id or f"{cfg.phase}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.out_dir, 'runs', run_id)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, 'config.json'))
    log(f"run folder: {run_dir}")
    return open(os.path.join(run_dir, 'metrics.jsonl'), 'a')


def weights_state(raw_model, lora, base_ref):
    """What a checkpoint holds of the model: its weights, or for LoRA only the adapters and a reference to the base."""
    if lora:
        return {'adapter': adapter_state(raw_model), 'lora': lora, 'base': base_ref}
    return {'model': raw_model.state_dict()}


def gather_rng(ddp, world):
    """Every process's RNG state, for a checkpoint that resumes each rank exactly (every rank must call it)."""
    states = [None] * world
    if ddp:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    return states


def catch_interrupts():
    """Ctrl-C (or a scheduler's SIGTERM) sets stop['requested']: the loop finishes the current step, saves and
    exits. A second one raises KeyboardInterrupt and exits at once."""
    stop = {'requested': False}

    def on_sigint(signum, frame):
        if stop['requested']:
            raise KeyboardInterrupt
        stop['requested'] = True
        print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigint)
    return stop


def check_optimizer(cfg):
    """What configurator.py's per-key checks cannot say: min_lr is a floor below the peak."""
    if cfg.min_lr > cfg.learning_rate:
        die(f"need min_lr <= learning_rate, got {cfg.min_lr} and {cfg.learning_rate}")


def model_args_from(cfg, vocab_size):
    return asdict(ModelConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_kv_head=cfg.n_kv_head or cfg.n_head, n_embd=cfg.n_embd,
                              dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta))


def merge_adapter(cfg):
    """--merge_lora=adapter.pt: fold a LoRA adapter into its base, save a normal checkpoint beside it."""
    path = cfg.merge_lora
    model, ckpt = load_model(path, 'cpu', base_path=cfg.lora_base)
    if 'adapter' not in ckpt:
        die(f"--merge_lora={path} is not a LoRA adapter checkpoint (it has full weights already)")
    out = path[:-3] + '_merged.pt' if path.endswith('.pt') else path + '_merged.pt'
    save_checkpoint({'model': model.state_dict(), 'iter': ckpt['iter'], 'best_val': ckpt['best_val'],
                     'model_args': ckpt['model_args'], 'config': ckpt['config'], 'tokenizer_sha256': ckpt['tokenizer_sha256'],
                     'merged_from': {'adapter': os.path.abspath(path), 'base': ckpt['base']}},
                    os.path.dirname(os.path.abspath(out)), os.path.basename(out))
    print(f"merged {path} into its base {ckpt['base']['path']}: wrote {out}")


def setup_processes(cfg):
    """One process (plain python) or one of several (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK): joins the process
    group and picks this process's device and dtype. Returns (ddp, rank, local_rank, world, device, device_type,
    dtype, autocast)."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    world = int(os.environ.get('WORLD_SIZE', 1)) if ddp else 1
    if cfg.gradient_accumulation_steps % world:  # checked before any process group or GPU is touched
        die(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of the "
            f"number of processes ({world}): each process runs an equal share")
    device = pick_device(cfg.device)
    if ddp:
        local_rank = int(os.environ['LOCAL_RANK'])
        if device.startswith('cuda') and local_rank >= torch.cuda.device_count():
            die(f"this node runs more processes than it has GPUs ({torch.cuda.device_count()}): set torchrun's "
                f"--nproc_per_node to at most {torch.cuda.device_count()} (or --device=cpu for CPU processes)")
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
    else:
        rank, local_rank = 0, 0
    device, device_type, dtype, autocast = runtime(device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, local_rank, world, device, device_type, dtype, autocast


def build_model(cfg, tok, device, device_type, dtype, rank, local_rank, ddp, master, log):
    """The model to train, one of four ways: from scratch; resumed from this phase's newest readable checkpoint
    (weights, optimizer, scaler, RNG, step); initialised from another checkpoint (weights only, a fresh
    optimizer); or, with lora_rank > 0, LoRA adapters on a frozen base. Returns (model: compiled and/or DDP-
    wrapped as configured, raw_model: the plain GPT, optimizer, scaler, start), start holding the step, best val
    loss and seconds trained to go on from, the model args, the LoRA settings and the base's reference."""
    args = model_args_from(cfg, tok.vocab_size)
    # LoRA: the base stays frozen; checkpoints hold the adapters and the base's path and sha256
    lora = {'rank': cfg.lora_rank, 'alpha': cfg.lora_alpha, 'dropout': cfg.lora_dropout,
            'targets': list(cfg.lora_targets)} if cfg.lora_rank > 0 else None
    start = {'iter': 0, 'best_val': float('inf'), 'elapsed': 0.0, 'args': args, 'lora': lora, 'base': None}
    ckpt = weights = None
    if cfg.init_from == 'resume':
        path, ckpt = load_for_resume(cfg.ckpt_dir, cfg.keep_checkpoints)
        why = f"init_from='resume': the newest readable checkpoint of phase '{cfg.phase}'"
        check_compatible(ckpt, path, why, args, tok)
        if ckpt.get('lora') != lora:
            die(f"{path} was trained with LoRA settings {ckpt.get('lora')}, this config has {lora}: resume with "
                f"the same lora_rank, lora_alpha, lora_dropout and lora_targets")
        if ckpt['config'].get('optimizer', 'adamw') != cfg.optimizer:
            die(f"{path} was trained with optimizer={ckpt['config'].get('optimizer', 'adamw')!r}, this config has "
                f"{cfg.optimizer!r}: resume with the same optimizer (or start from it with init_from={path})")
        weights = base_weights(ckpt, path, cfg.lora_base) if lora else ckpt['model']
        start['base'] = ckpt.get('base')
        start['iter'] = ckpt['iter']
        start['best_val'] = min(ckpt['best_val'], saved_best_val(cfg.ckpt_dir))
        start['elapsed'] = ckpt.get('elapsed', 0.0)
        log(f"resuming from {path} at step {start['iter']}")
    elif cfg.init_from != 'scratch':
        if not os.path.isfile(cfg.init_from):
            die(f"init_from={cfg.init_from!r} is neither 'scratch', 'resume' nor an existing checkpoint file")
        ckpt = read_checkpoint(cfg.init_from)
        check_compatible(ckpt, cfg.init_from, f"init_from, from {cfg.set_by.get('init_from')}", args, tok)
        if 'adapter' in ckpt:
            die(f"init_from={cfg.init_from} is a LoRA adapter: fold it into its base first (--merge_lora={cfg.init_from})")
        weights = ckpt['model']
        if lora:
            start['base'] = freeze_base(cfg.init_from, cfg.ckpt_dir) if master else None
        log(f"initialising from {cfg.init_from} (step {ckpt['iter']} of its run), fresh optimizer")
    elif lora:
        die("lora_rank > 0 fine-tunes a trained model: set init_from to its checkpoint")
    model = GPT(ModelConfig(**args))
    torch.manual_seed(cfg.seed + rank)  # same init everywhere (DDP also broadcasts rank 0's), own dropout per rank
    if weights is not None:
        model.load_state_dict(weights)
    if lora:
        try:
            add_lora(model, **lora)
        except ValueError as e:  # an unknown lora_targets name
            die(str(e))
        if cfg.init_from == 'resume':
            model.load_state_dict(ckpt['adapter'], strict=False)
    model.to(device)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.muon_lr, cfg.weight_decay,
                               (cfg.beta1, cfg.beta2), cfg.muon_momentum, device_type,
                               ns_dtype=torch.float32 if dtype == 'float32' else torch.bfloat16)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    if cfg.init_from == 'resume':
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt['scaler']:  # empty when the checkpoint's run did not use float16
            scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0])
    raw_model = model
    if cfg.compile:
        log("compiling the model (the first steps take a while)...")
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    return model, raw_model, optimizer, scaler, start


def describe_run(cfg, log, master, raw_model, optimizer, lora, mixture, train, sft, packer, device, dtype, world):
    """The run's opening lines: the model's size and FLOPs, LoRA, optimizer, data, SFT row fill and the epochs each
    source will see (a warning past max_epochs); stops first if the disk cannot hold the checkpoints. Returns
    (tokens_per_step, flops_per_step) for the log's speed figures."""
    B, T = cfg.batch_size, cfg.block_size
    total, non_embedding = raw_model.num_params()
    ckpt_bytes = 12 * total  # fp32 weights + two AdamW moments
    free = shutil.disk_usage(cfg.ckpt_dir).free if master else float('inf')
    if free < 3 * ckpt_bytes:
        die(f"only {free / 1e9:.2f} GB free in {cfg.ckpt_dir}; checkpoints need about {3 * ckpt_bytes / 1e9:.2f} GB "
            f"(ckpt.pt, its temp file while saving, best.pt): free some space or set out_dir elsewhere")
    tokens_per_step = B * T * cfg.gradient_accumulation_steps
    flops_per_step = raw_model.flops_per_token(T) * tokens_per_step
    log(f"model: {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding), "
        f"{raw_model.flops_per_token(T) / 1e6:.1f} MFLOP per token")
    if lora:
        trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        log(f"LoRA rank {lora['rank']} (alpha {lora['alpha']}) on {', '.join(lora['targets'])}: training "
            f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), the base is frozen")
    if cfg.optimizer == 'muon':
        count = lambda muon: sum(p.numel() for g in optimizer.param_groups if g['muon'] == muon for p in g['params'])
        log(f"optimizer: Muon (lr {cfg.muon_lr:g}) on the blocks' matrices ({count(True):,} parameters), AdamW "
            f"(lr {cfg.learning_rate:g}) on {'the LoRA adapters' if lora else 'the embedding/head and norms'} "
            f"({count(False):,}); {cfg.lr_schedule} schedule")
    else:
        log(f"optimizer: AdamW (lr {cfg.learning_rate:g}); {cfg.lr_schedule} schedule")
    log(f"{'SFT (masked loss, packed conversations)' if sft else 'pretraining'} on {mixture}; "
        f"{device} {dtype}, {world} process(es), {tokens_per_step:,} tokens per step")
    rows_per_step = B * cfg.gradient_accumulation_steps
    if sft:
        fill, trained_per_row = packer.stats(rows_per_step * max(1, min(cfg.max_iters, 20)))  # the first steps
        log(f"SFT rows: {100 * fill:.1f}% full, {trained_per_row * rows_per_step:,.0f} trained tokens per step "
            f"({100 * trained_per_row / (T + 1):.1f}% of row tokens); conversations longer than a row, cut at turn "
            f"boundaries: " + ', '.join(f"{n} {s.long} of {s.conversations} ({s.truncated} with a turn cut to fit, "
                                        f"{s.conversations - len(s.usable)} with no reply left)" for n, s in train.items()))
    # how often the run repeats each source: worth it up to a few passes, wasted compute far beyond (max_epochs)
    drawn = cfg.max_iters * rows_per_step * (fill * (T + 1) if sft else T)  # tokens the run reads
    epochs = {n: drawn * mixture[n] / sum(mixture.values()) / (s.pieces['length'].sum() if sft else s.tokens)
              for n, s in train.items()}
    log(f"expected epochs per source over {cfg.max_iters} steps: " + ', '.join(f"{n} {e:.2f}" for n, e in epochs.items()))
    for n, e in epochs.items():
        if e > cfg.max_epochs and master:
            print(f"warning: this run would repeat '{n}' {e:.1f} times, more than max_epochs={cfg.max_epochs}: beyond "
                  f"~16 passes, more repeats of the same tokens are worth almost nothing (Muennighoff et al. 2023, "
                  f"'Scaling Data-Constrained Language Models'). Lower its weight or max_iters, or give it more data",
                  file=sys.stderr)
    return tokens_per_step, flops_per_step


def to_device(arrays, device):
    """numpy arrays -> tensors on the device (pinned and non-blocking on CUDA); None stays None."""
    to = lambda t: t.pin_memory().to(device, non_blocking=True) if device.startswith('cuda') else t.to(device)
    return [None if a is None else to(torch.from_numpy(a)) for a in arrays]


@torch.no_grad()
def evaluate(model, raw_model, val, val_batches, device, autocast, token_bytes, ddp):
    """Mean loss per target token and bits per byte of each val source (data.loss_sums, as eval.py computes
    them): ({source: loss}, {source: bpb}), over every process's batches."""
    model.eval()
    losses, bpb = {}, {}
    for i, name in enumerate(val):
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, targets, bytes
        for batch in val_batches(i, name):
            x, y, doc = to_device(batch, device)
            with autocast:
                logits, _ = raw_model(x, doc_ids=doc)
            nats = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction='none')  # (B, T)
            sums += torch.stack(loss_sums(nats, y, token_bytes)).double()
        if ddp:
            dist.all_reduce(sums)
        nats, targets, n_bytes = sums.tolist()
        losses[name] = nats / max(targets, 1)
        bpb[name] = bits_per_byte(nats, max(n_bytes, 1))
    model.train()
    return losses, bpb


def best_on_mean(values, mixture, best_on):
    """The figure best.pt is chosen on: the best_on sources' values weighted by their mixture weights (equally
    where none of them is in the mixture)."""
    weights = {n: mixture.get(n, 0) for n in best_on}
    if sum(weights.values()) == 0:
        weights = {n: 1 for n in best_on}
    return sum(values[n] * w for n, w in weights.items()) / sum(weights.values())


def record(metrics, **row):
    """One line of metrics.jsonl (only the master process has the file open)."""
    if metrics:
        metrics.write(json.dumps(row) + '\n')
        metrics.flush()


def step_line(iter_num, loss, lr, dt, tokens_per_step, flops_per_step, peak, world, so_far, steps_left):
    """The log line of a step, and its speed figures: (line, tokens/s, FLOP/s, MFU or None without a peak)."""
    tok_s = tokens_per_step / dt
    flops_s = flops_per_step / dt
    mfu = flops_s / (peak * world) if peak else None  # flops_s counts every process; peak is one GPU's
    speed = f"MFU {100 * mfu:.1f}%" if peak else f"{flops_s / 1e9:.1f} GFLOP/s"
    line = (f"step {iter_num} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms | {tok_s:,.0f} tok/s | {speed} | "
            f"{duration(so_far)} in, eta {duration(steps_left * dt)}")
    return line, tok_s, flops_s, mfu


def check_output_folder(cfg, master, ddp):
    """The checkpoint folder must be writable before anything else happens (not after an hour of training)."""
    if master:
        check_writable(cfg.ckpt_dir, 'out_dir')
    if ddp:
        dist.barrier()  # the other ranks read ckpt_dir (resume) only once rank 0 has made it


def log_evaluation(log, metrics, iter_num, per_source, bpb, mixture, best_on, elapsed):
    """The log line and metrics row of an evaluation; returns the val loss best.pt is chosen on."""
    val_loss, val_bpb = best_on_mean(per_source, mixture, best_on), best_on_mean(bpb, mixture, best_on)
    shown = ', '.join(f'{n} {v:.4f}' for n, v in per_source.items())
    log(f"step {iter_num}: val loss {val_loss:.4f} ({shown}), {val_bpb:.4f} bits per byte, {elapsed:.0f} s of training")
    record(metrics, iter=iter_num, val_loss=val_loss, val=per_source, val_bpb=val_bpb, bpb=bpb, elapsed=elapsed)
    return val_loss


def read_ahead(read, first):
    """Yield read(first), read(first + 1), ...; each is read by a background thread while the caller works on the
    one before. A step's batches (memmap reads and packing: numpy work, much of it outside the GIL) are then ready
    when the step starts, so it never waits for its data; and since a batch depends only on the step and
    micro-step numbers, reading ahead changes nothing that is trained."""
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, first)
        for it in itertools.count(first + 1):
            done, pending = pending, reader.submit(read, it)
            yield done.result()


def stop_requested(stop, ddp, device, log_step):
    """Save and stop before this step? Ctrl-C lands on each process at its own moment: with several, they agree on
    it first, on log steps only (the steps that wait for the device anyway), so all of them save the same step."""
    if not ddp:
        return stop['requested']
    if not log_step:
        return False
    agreed = torch.tensor(float(stop['requested']), device=device)
    dist.all_reduce(agreed)
    return agreed.item() > 0


def set_lr(optimizer, cfg, it):
    """Every group's learning rate at step `it` (Muon's matrices have their own peak); returns AdamW's."""
    factor = lr_factor(it, cfg)
    for group in optimizer.param_groups:
        group['lr'] = (cfg.muon_lr if group.get('muon') else cfg.learning_rate) * factor
    return cfg.learning_rate * factor


def forward_backward(model, batches, scaler, autocast, device, ddp, world):
    """Accumulate one step's gradients over this process's micro-batches; returns (the step's loss, its target
    count over every process). The step's loss is its summed target nats over every micro-batch and process
    divided by their total target count, so a micro-batch weighs by its targets (an SFT one may have few or many),
    not by 1/accum. That total is needed before the first backward, which is why the batches come read up front."""
    counts = [int((y != -1).sum()) for _, y, _ in batches]
    n_total = sum(counts)
    if ddp:
        n_all = torch.tensor(float(n_total), dtype=torch.float64, device=device)
        dist.all_reduce(n_all)
        n_total = int(n_all.item())
    nats = torch.zeros((), device=device)
    for micro, (batch, n) in enumerate(zip(batches, counts)):
        x, y, doc = to_device(batch, device)
        if ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == len(batches) - 1
        with autocast:
            _, loss = model(x, y, doc)  # mean over this micro-batch's n targets
        # x n / n_total: its share of the step; x world: DDP averages the processes' gradients, we want their sum
        scaler.scale(loss * (n * world / max(n_total, 1))).backward()
        nats += loss.detach() * n
    if ddp:
        dist.all_reduce(nats)
    return nats / max(n_total, 1), n_total


def too_many_nonfinite(cfg, count, iter_num):
    last = os.path.join(cfg.ckpt_dir, 'ckpt.pt')
    last = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was saved yet"
    die(f"{count} non-finite losses in a row (or gradient norms) at step {iter_num}: stopping ({last}). Try a lower "
        f"learning_rate, float32 or bfloat16 instead of float16, or check the data")


def main():
    cfg = configure()
    if cfg.merge_lora:
        return merge_adapter(cfg)
    check_optimizer(cfg)
    # --- processes: torchrun sets RANK/WORLD_SIZE; plain python is one process ---
    ddp, rank, local_rank, world, device, device_type, dtype, autocast = setup_processes(cfg)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    accum = cfg.gradient_accumulation_steps // world  # micro-batches per step of each process

    # --- data ---
    tok = Tokenizer(cfg.tokenizer_path)
    mixture, train, val, sft, best_on = build_data(cfg, tok)
    train_batch, val_batches, packer = make_batches(cfg, train, val, mixture, sft, rank, world)

    check_output_folder(cfg, master, ddp)  # fail now, not after an hour of training

    # --- model: from scratch, resumed, or initialised from another checkpoint ---
    model, raw_model, optimizer, scaler, start = build_model(cfg, tok, device, device_type, dtype, rank, local_rank, ddp,
                                                             master, log)
    args, lora, base_ref = start['args'], start['lora'], start['base']
    iter_num, best_val, elapsed = start['iter'], start['best_val'], start['elapsed']

    # --- what the run will do (and whether the disk can hold its checkpoints) ---
    tokens_per_step, flops_per_step = describe_run(cfg, log, master, raw_model, optimizer, lora, mixture, train, sft,
                                                   packer, device, dtype, world)
    peak = peak_flops(device_type, dtype)

    metrics = open_run_folder(cfg, log) if master else None  # config.json and metrics.jsonl of this run
    token_bytes = torch.tensor([len(b) for b in tok.id_bytes], device=device)  # special tokens: 0 bytes

    def save(reason):
        # weights that just gave a non-finite loss or gradient (skipped) may be finite but blown up: not saved either
        if nonfinite_in_a_row or not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            log(f"step {iter_num}: the weights are not finite or the last step was, keeping the last good checkpoint "
                f"instead of saving")
            return
        state = {**weights_state(raw_model, lora, base_ref), 'optimizer': optimizer.state_dict(),
                 'scaler': scaler.state_dict(), 'iter': iter_num, 'best_val': best_val, 'model_args': args,
                 'config': vars(cfg), 'tokenizer_sha256': tok.sha256, 'elapsed': elapsed,
                 'rng': gather_rng(ddp, world)}  # every rank takes part (RNG states are gathered)
        if master:
            save_checkpoint(state, cfg.ckpt_dir, 'ckpt.pt', cfg.keep_checkpoints)
            log(f"saved {os.path.join(cfg.ckpt_dir, 'ckpt.pt')} at step {iter_num} ({reason})")

    stop = catch_interrupts()  # Ctrl-C or SIGTERM: finish the step, save, exit (a second one exits at once)

    # --- the loop ---
    start_iter = iter_num
    nonfinite_in_a_row = nonfinite_total = 0  # skipped steps: in a row (too many stops the run), and in all
    step_time = 0.0  # seconds of the steps since the last log line, and how many: the log's ms/step
    steps_timed = 0
    read_step = lambda it: [train_batch(it, rank * accum + micro) for micro in range(accum)]  # same rows on any world size
    step_batches = read_ahead(read_step, iter_num)
    t_train = time.time()  # elapsed: seconds of training (compiling included; evaluations and checkpoints not)
    while True:
        # Evaluate and save before the step: step 0's val loss is the untrained baseline, and the last pass through
        # here (iter_num == max_iters) evaluates the finished model. A resumed run skips the evaluation its
        # checkpoint was saved after (it would only repeat it)
        if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and not (
                cfg.init_from == 'resume' and iter_num == start_iter):
            elapsed += time.time() - t_train
            if val:  # val_sources=[] trains without evaluating (best.pt then is not written)
                per_source, bpb = evaluate(model, raw_model, val, val_batches, device, autocast, token_bytes, ddp)
                val_loss = log_evaluation(log, metrics, iter_num, per_source, bpb, mixture, best_on, elapsed)
            if val and val_loss < best_val:
                best_val = val_loss
                if master:
                    save_checkpoint({**weights_state(raw_model, lora, base_ref), 'iter': iter_num, 'best_val': best_val,
                                     'model_args': args, 'config': vars(cfg), 'tokenizer_sha256': tok.sha256},
                                    cfg.ckpt_dir, 'best.pt')
            if iter_num > 0:
                save('periodic')
            t_train = time.time()
        if iter_num >= cfg.max_iters:
            break
        if stop_requested(stop, ddp, device, iter_num % cfg.log_interval == 0):
            elapsed += time.time() - t_train
            save('interrupted')
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # saved: a late second Ctrl-C has nothing left to cut short
            break

        t_step = time.time()  # ms/step counts the step only: evaluations and checkpoints are not in it
        lr = set_lr(optimizer, cfg, iter_num)
        batches = next(step_batches)  # read while the last step ran (the next step's are being read now)
        step_loss, n_total = forward_backward(model, batches, scaler, autocast, device, ddp, world)
        scaler.unscale_(optimizer)  # (nothing to do unless float16)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in raw_model.parameters() if p.grad is not None])
        # the step's one wait for the device: whether to take the step (the next batches are being read meanwhile)
        bad_loss, bad_grad = (~torch.isfinite(torch.stack([step_loss.float(), grad_norm.float()]))).tolist()
        # A bad step (overflow, bad data): skip it rather than poison the weights. A finite loss can still give
        # inf/nan gradients; with float16, GradScaler skips those steps itself and lowers its scale (routine).
        if bad_loss or (bad_grad and not scaler.is_enabled()):
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            nonfinite_in_a_row += 1
            nonfinite_total += 1
            what = 'loss' if bad_loss else 'gradient norm'
            log(f"step {iter_num}: non-finite {what}, step skipped ({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= cfg.max_nonfinite:
                too_many_nonfinite(cfg, nonfinite_in_a_row, iter_num)
        else:
            nonfinite_in_a_row = 0
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(raw_model.parameters(), cfg.grad_clip, grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        step_time += time.time() - t_step
        steps_timed += 1

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            loss_value, norm_value = step_loss.item(), grad_norm.item()  # waits for the device: only on log steps
            dt, so_far = step_time / steps_timed, elapsed + time.time() - t_train
            step_time = steps_timed = 0
            line, tok_s, flops_s, mfu = step_line(iter_num, loss_value, lr, dt, tokens_per_step, flops_per_step, peak,
                                                  world, so_far, cfg.max_iters - iter_num)
            log(line)
            record(metrics, iter=iter_num, loss=loss_value, lr=lr, grad_norm=norm_value, ms=dt * 1000, tokens_per_sec=tok_s,
                   flops_per_sec=flops_s, mfu=mfu, trained_tokens=n_total, nonfinite=nonfinite_total, elapsed=so_far)

    step_batches.close()
    if metrics:
        metrics.close()
    if ddp:
        # the DDP wrapper goes first: destroyed with it, gloo's group would join its threads holding the GIL
        # (a hang at exit, if one still frees a tensor of the last collective); destroy_process_group releases it
        del model
        gc.collect()
        dist.destroy_process_group()
    log(f"done: best val loss {best_val:.4f}; checkpoints in {cfg.ckpt_dir}" if val else f"done: checkpoints in {cfg.ckpt_dir}")


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:  # the second Ctrl-C: leave at once, checkpoints as they were
        print("\ninterrupted again: exiting without saving", file=sys.stderr)
        sys.exit(130)
