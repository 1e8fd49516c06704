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
validation loss on `best_on`, weights only).
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
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import dpo
from checkpoint import (base_weights, check_base_tokenizer, check_compatible, checkpoint_path,
                        freeze_base, load_for_resume, merge_adapter, read_checkpoint, rng_state,
                        save_checkpoint, saved_best, set_rng_state)
from common import (check_writable, die, duration, hold_lock, peak_flops, pick_device,
                    runtime, unused_keys)
from configurator import configure, save_config
from data import bits_per_byte, build_data, loss_sums, make_batches
from model import GPT, ModelConfig, adapters_off, add_lora, adapter_state
from optim import lr_factor, make_optimizer
import pretrained
from tokenizer import load_tokenizer


# ----------------------------------------------------------------------------------------------
# The run folder, checkpoints' contents, Ctrl-C, the schedule


def open_run_folder(cfg, log):
    """<out_dir>/runs/<run_id>/: the run's full config (config.json) and its metrics file, opened
    for appending."""
    run_id = cfg.run_id or f"{cfg.phase}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.out_dir, 'runs', run_id)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, 'config.json'))
    log(f"run folder: {run_dir}")
    return open(os.path.join(run_dir, 'metrics.jsonl'), 'a')


def weights_state(learner):
    """What a checkpoint holds of the model: its weights, or for LoRA only the adapters and a
    reference to the base."""
    if learner.lora:
        return {'adapter': adapter_state(learner.raw), 'lora': learner.lora, 'base': learner.base}
    # DPO: also the reference it is measured against (the frozen start, base.pt), for resume
    return {'model': learner.raw.state_dict(), **({'base': learner.base} if learner.base else {})}


def gather_rng(proc):
    """Every process's RNG state, for a checkpoint that resumes each rank exactly (every rank must
    call it)."""
    if not proc.ddp:
        return [rng_state()]
    states = [None] * proc.world
    dist.all_gather_object(states, rng_state())
    return states


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


def model_args_from(cfg, tok):
    """The shape of the model to train: the config's keys, or with base_model the base model's own
    (its file decides layers, widths, heads, vocabulary, RoPE base; block_size is capped by its
    context). Every run of a base_model profile builds the same shape, so resume and SFT on a
    checkpoint of it check out."""
    if not cfg.base_model:
        return asdict(ModelConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size,
                                  n_layer=cfg.n_layer, n_head=cfg.n_head,
                                  n_kv_head=cfg.n_kv_head or cfg.n_head, n_embd=cfg.n_embd,
                                  dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings,
                                  rope_theta=cfg.rope_theta))
    args, _ = pretrained.model_args(cfg.base_model, cfg.block_size)
    check_base_tokenizer(tok, args, cfg.base_model)
    return {**args, 'dropout': cfg.dropout}


@dataclass
class Processes:
    """Where this process runs and who it is among the run's processes (torchrun starts several;
    plain python is one). Only the master (rank 0) logs and writes files."""
    ddp: bool
    rank: int
    local_rank: int
    world: int  # number of processes
    device: str  # 'cpu', 'cuda:3', 'mps'
    device_type: str  # 'cpu', 'cuda', 'mps'
    dtype: str  # 'float32', 'bfloat16', 'float16'
    autocast: object  # the context the forward passes run in

    @property
    def master(self):
        return self.rank == 0

    def log(self, *args):
        if self.master:
            print(*args)


@dataclass
class Learner:
    """The model being trained, how it is stepped, and what a checkpoint records of it."""
    model: torch.nn.Module  # what the steps run: compiled and/or DDP-wrapped as configured
    raw: GPT  # the plain model underneath: its weights are what is evaluated and saved
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # float16 only (a no-op otherwise)
    args: dict  # ModelConfig's fields
    lora: dict = None  # LoRA's settings, or None: every weight trains
    base: dict = None  # LoRA and DPO: the frozen base (or reference) checkpoint's path and sha256
    # DPO: the reference model (frozen, eval mode; compiled where the policy is), or None: for LoRA
    # the reference is `raw` with its adapters off
    reference: torch.nn.Module = None


@dataclass
class Position:
    """Where the run stands: what a checkpoint saves besides the weights, and what a resume starts
    from."""
    iter: int = 0  # steps taken
    best_val: float = float('inf')  # best validation loss so far (best.pt's)
    best_iter: int = None  # the step of best.pt
    elapsed: float = 0.0  # seconds of training (evaluations and checkpoints not counted)
    # seconds of the whole training loop (steps, evaluations, checkpoints): max_minutes' clock
    clock: float = 0.0
    # what a time budget keeps back: the longest evaluation + checkpoint (the final one must fit)
    # and the last step's seconds (a step begun must end in time)
    eval_cost: float = 0.0
    step_cost: float = 0.0
    # skipped steps (non-finite loss or gradients): too many in a row stops the run
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0


def setup_processes(cfg):
    """One process (plain python) or one of several (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK):
    joins the process group and picks this process's device and dtype."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    world = int(os.environ.get('WORLD_SIZE', 1)) if ddp else 1
    # checked before any process group or GPU is touched
    if cfg.gradient_accumulation_steps % world:
        die(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of "
            f"the number of processes ({world}): each process runs an equal share")
    device = pick_device(cfg.device)
    rank, local_rank = 0, 0
    if ddp:
        local_rank = int(os.environ['LOCAL_RANK'])
        gpus = torch.cuda.device_count()
        if device.startswith('cuda') and local_rank >= gpus:
            die(f"this node runs more processes than it has GPUs ({gpus}): set torchrun's "
                f"--nproc_per_node to at most {gpus} (or --device=cpu for CPU processes)")
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
    device, device_type, dtype, autocast = runtime(device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Processes(ddp, rank, local_rank, world, device, device_type, dtype, autocast)


def starting_point(cfg, tok, args, lora, keep_base, proc):
    """Where the weights come from: (checkpoint dict or None, its weights or None, the frozen
    base's reference (LoRA, DPO: keep_base), the Position to go on from). init_from='resume' takes
    this phase's newest readable checkpoint (weights, optimizer, scaler, RNG, step); a checkpoint
    path gives weights only (a fresh optimizer); 'scratch' nothing."""
    if cfg.init_from == 'resume':
        path, ckpt = load_for_resume(cfg.ckpt_dir, cfg.keep_checkpoints)
        check_compatible(ckpt, path, "init_from='resume': the newest readable checkpoint of phase "
                                     f"'{cfg.phase}'", args, tok)
        if ckpt.get('lora') != lora:
            die(f"{path} was trained with LoRA settings {ckpt.get('lora')}, this config has "
                f"{lora}: "
                "resume with the same lora_rank, lora_alpha, lora_dropout and lora_targets")
        trained_with = ckpt['config'].get('optimizer', 'adamw')
        if trained_with != cfg.optimizer:
            die(f"{path} was trained with optimizer={trained_with!r}, this config has "
                f"{cfg.optimizer!r}: resume with the same optimizer (or start from it with "
                f"init_from={path})")
        weights = base_weights(ckpt, path, cfg.lora_base) if lora else ckpt['model']
        # after a fallback to an older ckpt, best.pt may hold a better validation loss than the one
        # saved there
        best_val, best_iter = saved_best(cfg.ckpt_dir)
        position = Position(iter=ckpt['iter'], best_val=min(ckpt['best_val'], best_val),
                            best_iter=best_iter, elapsed=ckpt.get('elapsed', 0.0),
                            **{k: ckpt.get(k, 0.0) for k in ('clock', 'eval_cost', 'step_cost')})
        proc.log(f"resuming from {path} at step {position.iter}")
        return ckpt, weights, ckpt.get('base'), position
    if cfg.init_from == 'base_model':
        if not cfg.base_model:
            die("init_from='base_model' but base_model is not set: set it to a Hugging Face model "
                "folder, a .gguf file or hf:<owner>/<name> (and run tokenizer.py and prepare.py "
                "with it first, for its tokenizer)")
        model, info = pretrained.load_pretrained(cfg.base_model, max_block_size=args['block_size'])
        weights = model.state_dict()
        proc.log(f"initialising from base_model {cfg.base_model} ({info['format']}, "
                 f"{info['params'] / 1e6:.1f}M parameters, {'/'.join(info['tensor_types'])}), "
                 "fresh optimizer")
        # LoRA (and DPO's reference): the base is written as a checkpoint beside the adapters'
        # (base.pt), as a trained checkpoint of ours would be copied there, so resume and merge read
        # it the same way
        base = None
        if keep_base and proc.master:
            save_checkpoint({'model': weights, 'model_args': args, 'iter': 0, 'best_val': None,
                             'config': vars(cfg), 'tokenizer_sha256': tok.sha256},
                            cfg.ckpt_dir, 'base.pt')
            base = freeze_base(os.path.join(cfg.ckpt_dir, 'base.pt'), cfg.ckpt_dir)
            base['from'] = cfg.base_model
        return None, weights, base, Position()
    if cfg.init_from == 'scratch':
        if lora:
            die("lora_rank > 0 fine-tunes a trained model: set init_from to its checkpoint")
        return None, None, None, Position()
    if not os.path.isfile(cfg.init_from):
        die(f"init_from={cfg.init_from!r} is neither 'scratch', 'resume', 'base_model' nor an "
            "existing checkpoint file")
    ckpt = read_checkpoint(cfg.init_from)
    check_compatible(ckpt, cfg.init_from, f"init_from, from {cfg.set_by.get('init_from')}", args,
                     tok)
    if 'adapter' in ckpt:
        die(f"init_from={cfg.init_from} is a LoRA adapter: fold it into its base first "
            f"(--merge_lora={cfg.init_from})")
    # LoRA and DPO: the base is copied beside the run's checkpoints (recorded by path and sha256)
    base = freeze_base(cfg.init_from, cfg.ckpt_dir) if keep_base and proc.master else None
    proc.log(f"initialising from {cfg.init_from} (step {ckpt['iter']} of its run), fresh optimizer")
    return ckpt, ckpt['model'], base, Position()


def build_model(cfg, tok, proc, dpo_run=False):
    """The model to train, one of four ways: from scratch; resumed (see starting_point); initialised
    from another checkpoint; or, with lora_rank > 0, LoRA adapters on a frozen base. A DPO run also
    gets its reference: the weights it starts from, frozen. Returns (Learner, Position)."""
    args = model_args_from(cfg, tok)
    # LoRA: the base stays frozen; checkpoints hold the adapters and the base's path and sha256
    lora = {'rank': cfg.lora_rank, 'alpha': cfg.lora_alpha, 'dropout': cfg.lora_dropout,
            'targets': list(cfg.lora_targets)} if cfg.lora_rank > 0 else None
    if dpo_run and cfg.init_from == 'scratch':
        die("DPO fine-tunes a chat model: set init_from to its SFT checkpoint (or 'base_model' for "
            "an instruct model), whose replies the pairs push toward the chosen ones")
    ckpt, weights, base, position = starting_point(cfg, tok, args, lora, dpo_run or lora, proc)
    resume = cfg.init_from == 'resume'
    model = GPT(ModelConfig(**args))
    # same init everywhere (DDP also broadcasts rank 0's), own dropout
    torch.manual_seed(cfg.seed + proc.rank)
    if weights is not None:
        model.load_state_dict(weights)
    if lora:
        try:
            add_lora(model, **lora)
        except ValueError as e:  # an unknown lora_targets name
            die(str(e))
        if resume:
            model.load_state_dict(ckpt['adapter'], strict=False)
    model.to(proc.device)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.muon_lr,
                               cfg.weight_decay,
                               (cfg.beta1, cfg.beta2), cfg.muon_momentum, proc.device_type,
                               ns_dtype=torch.float32 if proc.dtype == 'float32'
                               else torch.bfloat16, muon_weight_decay=cfg.muon_weight_decay)
    scaler = torch.amp.GradScaler(proc.device_type, enabled=(proc.dtype == 'float16'))
    if resume:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt['scaler']:  # empty when the checkpoint's run did not use float16
            scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'][proc.rank] if proc.rank < len(ckpt['rng']) else ckpt['rng'][0])
    raw = model
    reference = None
    if dpo_run and not lora:  # DPO's reference: the starting weights (base.pt on resume), frozen
        reference = GPT(ModelConfig(**args))
        reference.load_state_dict(base_weights(ckpt, ckpt['base']['path']) if resume else weights)
        reference.requires_grad_(False)
        reference = reference.to(proc.device).eval()
    if cfg.compile:
        proc.log("compiling the model (the first steps take a while)...")
        model = torch.compile(model)
        reference = torch.compile(reference) if reference is not None else None
    if proc.ddp:
        model = DDP(model, device_ids=[proc.local_rank] if proc.device_type == 'cuda' else None)
    return Learner(model, raw, optimizer, scaler, args, lora, base, reference), position


def check_disk(cfg, raw_model, proc):
    """Stop now, not after an hour of training, if the disk cannot hold the checkpoints."""
    total, _ = raw_model.num_params()
    ckpt_bytes = 12 * total  # fp32 weights + two AdamW moments
    free = shutil.disk_usage(cfg.ckpt_dir).free if proc.master else float('inf')
    if free < 3 * ckpt_bytes:
        die(f"only {free / 1e9:.2f} GB free in {cfg.ckpt_dir}; checkpoints need about "
            f"{3 * ckpt_bytes / 1e9:.2f} GB (ckpt.pt, its temp file while saving, best.pt): free "
            "some space or set out_dir elsewhere")


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


def best_on_mean(values, mixture, best_on):
    """The figure best.pt is chosen on: the best_on sources' values weighted by their mixture
    weights (equally where none of them is in the mixture)."""
    weights = {n: mixture.get(n, 0) for n in best_on}
    if sum(weights.values()) == 0:
        weights = {n: 1 for n in best_on}
    return sum(values[n] * w for n, w in weights.items()) / sum(weights.values())


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


def check_output_folder(cfg, proc):
    """The checkpoint folder must be writable before anything else happens (not after an hour of
    training)."""
    if proc.master:
        check_writable(cfg.ckpt_dir, 'out_dir')
        # two runs in one folder would interleave checkpoints, best.pt and metrics
        hold_lock(cfg.ckpt_dir, 'train.lock', f"the checkpoint folder of phase '{cfg.phase}'")
    if proc.ddp:
        dist.barrier()  # the other ranks read ckpt_dir (resume) only once rank 0 has made it


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


def save_latest(reason, cfg, proc, learner, position, tok):
    """ckpt.pt: everything a resume needs (weights, optimizer, scaler, step, every rank's RNG).
    Every process calls it (their RNG states are gathered); the master writes it."""
    # weights that just gave a non-finite loss or gradient (skipped) may be finite but blown up: not
    # saved either
    finite = all(torch.isfinite(p).all() for p in learner.raw.parameters())
    if position.nonfinite_in_a_row or not finite:
        proc.log(f"step {position.iter}: the weights are not finite or the last step was, keeping "
                 "the last good checkpoint instead of saving")
        return
    state = {**weights_state(learner), 'optimizer': learner.optimizer.state_dict(),
             'scaler': learner.scaler.state_dict(), 'iter': position.iter,
             'best_val': position.best_val,
             'model_args': learner.args, 'config': vars(cfg), 'tokenizer_sha256': tok.sha256,
             'elapsed': position.elapsed, 'clock': position.clock,
             'eval_cost': position.eval_cost, 'step_cost': position.step_cost,
             'rng': gather_rng(proc)}
    if proc.master:
        save_checkpoint(state, cfg.ckpt_dir, 'ckpt.pt', cfg.keep_checkpoints)
        proc.log(f"saved {os.path.join(cfg.ckpt_dir, 'ckpt.pt')} at step {position.iter} "
                 f"({reason})")


def save_best(cfg, learner, position, tok):
    """best.pt: the weights of the best validation loss so far (no optimizer: it is for using, not
    resuming)."""
    save_checkpoint({**weights_state(learner), 'iter': position.iter, 'best_val': position.best_val,
                     'model_args': learner.args, 'config': vars(cfg),
                     'tokenizer_sha256': tok.sha256}, cfg.ckpt_dir, 'best.pt')


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
