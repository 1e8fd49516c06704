"""
Stage 3: training, one script for pretraining and supervised fine-tuning (SFT).

    python train.py config/demo.py                                   # one process
    torchrun --standalone --nproc_per_node=8 train.py config/prod_pretrain.py   # DDP

The data decides the phase. `mixture` maps prepared sources to weights; every batch row comes from
a source drawn by weight.
  - Pretraining (any text source in the mixture): a row is a random window of block_size + 1 tokens;
    loss on every token. Chat sources in a pretraining mixture are read the same way, so the model
    also learns the shape of a conversation.
  - SFT (only chat sources): a row packs whole conversations; loss only where the chat template's
    mask is 1 (assistant replies and their <|eot|>), targets are -1 (ignored) elsewhere.

Batches are a pure function of (seed, step, micro-step): resuming needs no sampler state, and each
DDP rank draws its own rows. Checkpoints go to <out_dir>/<phase>/: ckpt.pt (latest, with optimizer
and RNG state, for resume) and best.pt (the best validation loss, weights only).
"""
import json
import math
import os
import signal
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare
from configurator import check_writable, configure, die, file_sha256, save_config
from model import (GPT, ModelConfig, add_lora, adapter_state, base_weights, check_tokenizer, load_model, pick_device,
                   read_checkpoint, runtime)
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------
# Data: prepared shards, read through a fresh np.memmap per read (a long-lived memmap keeps every
# page it has touched mapped, and the process's memory grows over a long run).

class Split:
    def __init__(self, data_dir, name, split, tokenizer_sha256):
        self.meta = prepare.load_split(data_dir, name, split, tokenizer_sha256)
        self.name, self.chat = name, self.meta['format'] == 'chat'
        self.dtype = np.dtype(self.meta['dtype'])
        self.shards = self.meta['shards']
        self.tokens = sum(s['tokens'] for s in self.shards)
        if self.tokens == 0:
            die(f"source '{name}' has no {split} tokens (see {data_dir}/{name}/{split}/meta.json): "
                f"give it more documents or a val_frac > 0")
        self.shard_p = np.array([s['tokens'] for s in self.shards]) / self.tokens
        # every conversation as (shard, start, length): SFT rows are built from whole conversations
        # (text sources are read as windows and never need their document index)
        docs = []
        for i, s in enumerate(self.shards if self.chat else []):
            starts = np.fromfile(s['path'].replace('shard_', 'docs_'), dtype=np.int64)
            lengths = np.diff(np.append(starts, s['tokens']))
            docs.append(np.stack([np.full(len(starts), i), starts, lengths], axis=1))
        self.docs = np.concatenate(docs) if docs else None

    def read(self, shard, start, n, kind='shard'):
        path = self.shards[shard]['path'].replace('shard_', f'{kind}_')
        mm = np.memmap(path, dtype=self.dtype if kind == 'shard' else np.uint8, mode='r')
        out = np.array(mm[start:start + n], dtype=np.int64)
        del mm
        return out


def window_row(split, rng, T):
    """Pretraining row: a random window of T + 1 tokens (shorter only if a shard is)."""
    shard = rng.choice(len(split.shards), p=split.shard_p)
    n = min(T + 1, split.shards[shard]['tokens'])
    toks = split.read(shard, rng.integers(0, split.shards[shard]['tokens'] - n + 1), n)
    x, y = np.zeros(T, dtype=np.int64), np.full(T, -1, dtype=np.int64)
    x[:n - 1], y[:n - 1] = toks[:-1], toks[1:]
    return x, y, None, 0


def packed_row(split, rng, T):
    """SFT row: whole conversations drawn at random, packed until the next one does not fit, the rest
    padded. Packing beats one-conversation-per-row (mostly padding for short chats); doc_ids tell
    attention to keep each conversation to itself, so none is conditioned on another (with RoPE,
    a conversation's position in the row does not change its attention scores either). A conversation
    longer than the row is truncated and counted."""
    toks, mask = np.zeros(T + 1, dtype=np.int64), np.zeros(T + 1, dtype=np.int64)
    doc = np.full(T + 1, -1, dtype=np.int64)
    used, k, truncated = 0, 0, 0
    while used < T + 1:
        shard, start, length = split.docs[rng.integers(len(split.docs))]
        if length > T + 1 and used == 0:
            length, truncated = T + 1, 1
        if used + length > T + 1:
            break
        toks[used:used + length] = split.read(shard, start, length)
        mask[used:used + length] = split.read(shard, start, length, 'mask')
        doc[used:used + length] = k
        used, k = used + length, k + 1
    y = np.where(mask[1:] == 1, toks[1:], -1)
    return toks[:-1], y, doc[:-1], truncated


def get_batch(splits, weights, rng, B, T, device, sft):
    """B rows, each from a source drawn by weight; returns x, y, doc_ids (None for pretraining), truncated."""
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    p /= p.sum()
    rows = []
    for _ in range(B):
        split = splits[names[rng.choice(len(names), p=p)]]
        rows.append(packed_row(split, rng, T) if sft else window_row(split, rng, T))
    x = torch.from_numpy(np.stack([r[0] for r in rows]))
    y = torch.from_numpy(np.stack([r[1] for r in rows]))
    doc = torch.from_numpy(np.stack([r[2] for r in rows])) if rows[0][2] is not None else None
    to = lambda t: t.pin_memory().to(device, non_blocking=True) if device.startswith('cuda') else t.to(device)
    return to(x), to(y), (to(doc) if doc is not None else None), sum(r[3] for r in rows)


def sft_mode(splits):
    return all(s.chat for s in splits.values())


def check_mixture(cfg):
    mixture = cfg.mixture
    if not isinstance(mixture, dict) or not mixture:
        die(f"mixture must be a non-empty dict {{source name: weight}}, got {mixture!r}")
    for name, w in mixture.items():
        if name not in cfg.sources:
            die(f"mixture names '{name}', which is not in sources ({', '.join(cfg.sources)}): add it to "
                f"sources and run `python prepare.py <your config>`")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            die(f"mixture weight for '{name}' must be a finite number >= 0, got {w!r}")
    if sum(mixture.values()) <= 0:
        die("mixture weights add up to 0: give at least one source a positive weight")
    return {n: w for n, w in mixture.items() if w > 0}


# ----------------------------------------------------------------------------------------------
# Checkpoints: written atomically (temp file, fsync, rename); the previous keep_checkpoints versions of
# ckpt.pt are kept as ckpt.1.pt, ckpt.2.pt, ... so a corrupt latest file has a fallback.

def save_checkpoint(obj, folder, name, keep=0):
    path = os.path.join(folder, name)
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # full disk, a second Ctrl-C...: the previous checkpoints stay as they were
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if keep > 0 and os.path.exists(path):
        base = path[:-3]
        for i in range(keep - 1, 0, -1):
            if os.path.exists(f'{base}.{i}.pt'):
                os.replace(f'{base}.{i}.pt', f'{base}.{i + 1}.pt')
        os.replace(path, f'{base}.1.pt')
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)  # make the renames themselves durable
    os.fsync(fd)
    os.close(fd)


def load_for_resume(folder, keep):
    """The newest readable checkpoint: ckpt.pt, else the kept earlier versions."""
    candidates = [os.path.join(folder, 'ckpt.pt')] + [os.path.join(folder, f'ckpt.{i}.pt') for i in range(1, keep + 1)]
    for path in candidates:
        if os.path.exists(path):
            ckpt = read_checkpoint(path, fatal=False)
            if ckpt is not None:
                return path, ckpt
            print(f"warning: {path} is truncated or corrupt, trying the previous checkpoint", file=sys.stderr)
    die(f"init_from='resume' but no readable checkpoint in {folder}: start with init_from='scratch'")


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


# ----------------------------------------------------------------------------------------------

def freeze_base(path, ckpt_dir):
    """A LoRA run's base, kept as <ckpt_dir>/base.pt out of reach of checkpoint rotation and of later
    runs that rewrite the original file (a hard link where possible: no copy). Returns its reference."""
    frozen = os.path.join(ckpt_dir, 'base.pt')
    if not (os.path.exists(frozen) and os.path.samefile(path, frozen)):
        tmp = frozen + '.tmp'
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:  # another filesystem: copy it
            shutil.copyfile(path, tmp)
        os.replace(tmp, frozen)
    return {'path': os.path.abspath(frozen), 'sha256': file_sha256(frozen), 'from': os.path.abspath(path)}


def saved_best_val(ckpt_dir):
    """best.pt's validation loss: after a fallback to an older ckpt, it may be better than the one saved there."""
    path = os.path.join(ckpt_dir, 'best.pt')
    ckpt = read_checkpoint(path, fatal=False) if os.path.exists(path) else None
    return ckpt['best_val'] if ckpt else float('inf')


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12, '4090': 165e12}


def peak_flops(device_type, dtype):
    """Datasheet dense bf16/fp16 peak of the GPU, for MFU; None where unknown (CPU: we print FLOP/s)."""
    if device_type != 'cuda' or dtype == 'float32':
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def model_args_from(cfg, vocab_size):
    return asdict(ModelConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_kv_head=cfg.n_kv_head or cfg.n_head, n_embd=cfg.n_embd,
                              dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta))


def check_compatible(ckpt, path, why, args, tok):
    """A checkpoint must come from this tokenizer and have this model's shape (block_size may shrink)."""
    check_tokenizer(ckpt, path, why, tok.path, tok.sha256)
    saved = ckpt['model_args']
    for key in ('vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'tie_embeddings', 'rope_theta'):
        if saved[key] != args[key]:
            die(f"{path} has {key}={saved[key]} but this config makes {key}={args[key]}: "
                f"set {key}={saved[key]} (the model's shape must match its checkpoint)")
    if args['block_size'] > saved['block_size']:
        die(f"block_size={args['block_size']} is larger than the {saved['block_size']} that {path} was trained "
            f"with: set block_size <= {saved['block_size']}")


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


def main():
    cfg = configure()
    if cfg.merge_lora:
        return merge_adapter(cfg)
    # --- processes: torchrun sets RANK/WORLD_SIZE; plain python is one process ---
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
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    accum = cfg.gradient_accumulation_steps // world
    device, device_type, dtype, autocast = runtime(device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- data ---
    tok = Tokenizer(cfg.tokenizer_path)
    mixture = check_mixture(cfg)
    train = {n: Split(cfg.data_dir, n, 'train', tok.sha256) for n in mixture}  # (checks they match the tokenizer)
    val_names = cfg.val_sources if cfg.val_sources is not None else list(mixture)
    for n in val_names:
        if n not in cfg.sources:
            die(f"val_sources names '{n}', which is not in sources")
    val = {n: Split(cfg.data_dir, n, 'val', tok.sha256) for n in val_names}
    sft = sft_mode(train)
    if sft and not sft_mode(val):
        die(f"this is an SFT run (every mixture source is a chat source) but val_sources includes text sources "
            f"({[n for n, s in val.items() if not s.chat]}): validate on chat sources")

    # --- output folders: fail now, not after an hour of training ---
    if master:
        check_writable(cfg.ckpt_dir, 'out_dir')
    if ddp:
        dist.barrier()  # the other ranks read ckpt_dir (resume) only once rank 0 has made it

    # --- model: from scratch, resumed, or initialised from another checkpoint ---
    args = model_args_from(cfg, tok.vocab_size)
    # LoRA: the base stays frozen; checkpoints hold the adapters and the base's path and sha256
    lora = {'rank': cfg.lora_rank, 'alpha': cfg.lora_alpha, 'dropout': cfg.lora_dropout,
            'targets': list(cfg.lora_targets)} if cfg.lora_rank > 0 else None
    iter_num, best_val, ckpt, weights, base_ref = 0, float('inf'), None, None, None
    if cfg.init_from == 'resume':
        path, ckpt = load_for_resume(cfg.ckpt_dir, cfg.keep_checkpoints)
        why = f"init_from='resume': the newest readable checkpoint of phase '{cfg.phase}'"
        check_compatible(ckpt, path, why, args, tok)
        if ckpt.get('lora') != lora:
            die(f"{path} was trained with LoRA settings {ckpt.get('lora')}, this config has {lora}: resume with "
                f"the same lora_rank, lora_alpha, lora_dropout and lora_targets")
        weights = base_weights(ckpt, path, cfg.lora_base) if lora else ckpt['model']
        base_ref = ckpt.get('base')
        iter_num, best_val = ckpt['iter'], min(ckpt['best_val'], saved_best_val(cfg.ckpt_dir))
        log(f"resuming from {path} at step {iter_num}")
    elif cfg.init_from != 'scratch':
        if not os.path.isfile(cfg.init_from):
            die(f"init_from={cfg.init_from!r} is neither 'scratch', 'resume' nor an existing checkpoint file")
        ckpt = read_checkpoint(cfg.init_from)
        check_compatible(ckpt, cfg.init_from, f"init_from, from {cfg.set_by.get('init_from')}", args, tok)
        if 'adapter' in ckpt:
            die(f"init_from={cfg.init_from} is a LoRA adapter: fold it into its base first (--merge_lora={cfg.init_from})")
        weights = ckpt['model']
        if lora:
            base_ref = freeze_base(cfg.init_from, cfg.ckpt_dir) if master else None
        log(f"initialising from {cfg.init_from} (step {ckpt['iter']} of its run), fresh optimizer")
    elif lora:
        die("lora_rank > 0 fine-tunes a trained model: set init_from to its checkpoint")
    model = GPT(ModelConfig(**args))
    torch.manual_seed(cfg.seed + rank)  # same init everywhere (DDP also broadcasts rank 0's), own dropout per rank
    if weights is not None:
        model.load_state_dict(weights)
    if lora:
        add_lora(model, **lora)
        if cfg.init_from == 'resume':
            model.load_state_dict(ckpt['adapter'], strict=False)
    model.to(device)
    optimizer = model.optimizer(cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    if cfg.init_from == 'resume':
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt['scaler']:  # empty when the checkpoint's run did not use float16
            scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0])
    ckpt = None  # free memory
    raw_model = model
    if cfg.compile:
        log("compiling the model (the first steps take a while)...")
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

    total, non_embedding = raw_model.num_params()
    ckpt_bytes = 12 * total  # fp32 weights + two AdamW moments
    free = shutil.disk_usage(cfg.ckpt_dir).free if master else float('inf')
    if free < 3 * ckpt_bytes:
        die(f"only {free / 1e9:.2f} GB free in {cfg.ckpt_dir}; checkpoints need about {3 * ckpt_bytes / 1e9:.2f} GB "
            f"(ckpt.pt, its temp file while saving, best.pt): free some space or set out_dir elsewhere")
    B, T = cfg.batch_size, cfg.block_size
    tokens_per_step = B * T * cfg.gradient_accumulation_steps
    flops_per_step = raw_model.flops_per_token(T) * tokens_per_step
    peak = peak_flops(device_type, dtype)
    log(f"model: {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding), "
        f"{raw_model.flops_per_token(T) / 1e6:.1f} MFLOP per token")
    if lora:
        trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        log(f"LoRA rank {lora['rank']} (alpha {lora['alpha']}) on {', '.join(lora['targets'])}: training "
            f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%), the base is frozen")
    log(f"{'SFT (masked loss, packed conversations)' if sft else 'pretraining'} on {mixture}; "
        f"{device} {dtype}, {world} process(es), {tokens_per_step:,} tokens per step")

    run_id = cfg.run_id or f"{cfg.phase}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.out_dir, 'runs', run_id)
    metrics = None
    if master:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, 'config.json'))
        metrics = open(os.path.join(run_dir, 'metrics.jsonl'), 'a')
        log(f"run folder: {run_dir}")

    def record(**row):
        if metrics:
            metrics.write(json.dumps(row) + '\n')
            metrics.flush()

    @torch.no_grad()
    def evaluate():
        """Mean loss per target token on a fixed set of val batches per source (the same batches every
        time, so numbers compare across steps and checkpoints). Ranks share the batches out."""
        model.eval()
        losses = {}
        for i, (name, split) in enumerate(val.items()):
            sums = torch.zeros(2, device=device)
            for k in range(rank, cfg.eval_iters, world):
                rng = np.random.default_rng([cfg.seed, 1_000_003, i, k])
                x, y, doc, _ = get_batch({name: split}, {name: 1.0}, rng, B, T, device, sft)
                with autocast:
                    _, loss = raw_model(x, y, doc)
                n = (y != -1).sum()
                sums += torch.stack([loss.float() * n, n.float()])
            if ddp:
                dist.all_reduce(sums)
            losses[name] = (sums[0] / sums[1].clamp(min=1)).item()
        model.train()
        weights = {n: mixture.get(n, 0) for n in losses}
        if sum(weights.values()) == 0:
            weights = {n: 1 for n in losses}
        overall = sum(losses[n] * w for n, w in weights.items()) / sum(weights.values())
        return overall, losses

    def weights_state():
        """The model's weights, or for LoRA only the adapters with a reference to the base."""
        if lora:
            return {'adapter': adapter_state(raw_model), 'lora': lora, 'base': base_ref}
        return {'model': raw_model.state_dict()}

    def checkpoint_state():
        return {**weights_state(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                'iter': iter_num, 'best_val': best_val, 'model_args': args, 'config': vars(cfg),
                'tokenizer_sha256': tok.sha256, 'rng': gather_rng()}

    def gather_rng():
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        return states

    def save(reason):
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            log(f"step {iter_num}: the weights are not finite, keeping the last good checkpoint instead of saving")
            return
        state = checkpoint_state()  # every rank takes part (RNG states are gathered)
        if master:
            save_checkpoint(state, cfg.ckpt_dir, 'ckpt.pt', cfg.keep_checkpoints)
            log(f"saved {os.path.join(cfg.ckpt_dir, 'ckpt.pt')} at step {iter_num} ({reason})")

    # Ctrl-C (or a scheduler's SIGTERM): finish the current step, save, exit. A second one exits at once.
    stop = {'requested': False}

    def on_sigint(signum, frame):
        if stop['requested']:
            raise KeyboardInterrupt
        stop['requested'] = True
        print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigint)

    # --- the loop ---
    start_iter = iter_num
    nonfinite_in_a_row = nonfinite_total = truncated = 0
    t_last, step_last = time.time(), iter_num
    while True:
        # a resumed run skips the evaluation its checkpoint was saved after (it would only repeat it)
        if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and not (
                cfg.init_from == 'resume' and iter_num == start_iter):
            if val:  # val_sources=[] trains without evaluating (best.pt then is not written)
                val_loss, per_source = evaluate()
                shown = ', '.join(f'{n} {v:.4f}' for n, v in per_source.items())
                log(f"step {iter_num}: val loss {val_loss:.4f} ({shown})")
                record(iter=iter_num, val_loss=val_loss, val=per_source)
            if val and val_loss < best_val:
                best_val = val_loss
                if master:
                    save_checkpoint({**weights_state(), 'iter': iter_num, 'best_val': best_val,
                                     'model_args': args, 'config': vars(cfg), 'tokenizer_sha256': tok.sha256},
                                    cfg.ckpt_dir, 'best.pt')
            if iter_num > 0:
                save('periodic')
        if iter_num >= cfg.max_iters:
            break
        stop_now = torch.tensor(float(stop['requested']), device=device)
        if ddp:
            dist.all_reduce(stop_now)  # every rank stops at the same step
        if stop_now.item():
            save('interrupted')
            break

        lr = lr_at(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            rng = np.random.default_rng([cfg.seed, iter_num, rank * accum + micro])  # same rows on any world size
            x, y, doc, n_trunc = get_batch(train, mixture, rng, B, T, device, sft)
            truncated += n_trunc
            if ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == accum - 1
            with autocast:
                _, loss = model(x, y, doc)
            scaler.scale(loss / accum).backward()
            loss_sum += loss.detach() / accum
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        if not torch.isfinite(loss_sum):
            # a bad step (overflow, bad data): skip it rather than poison the weights
            optimizer.zero_grad(set_to_none=True)
            nonfinite_in_a_row += 1
            nonfinite_total += 1
            log(f"step {iter_num}: non-finite loss, step skipped ({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= cfg.max_nonfinite:
                last = os.path.join(cfg.ckpt_dir, 'ckpt.pt')
                last = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was saved yet"
                die(f"{nonfinite_in_a_row} non-finite losses in a row at step {iter_num}: stopping ({last}). Try a lower "
                    f"learning_rate, float32 or bfloat16 instead of float16, or check the data")
            iter_num += 1
            continue
        nonfinite_in_a_row = 0
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            loss_value = loss_sum.item()  # waits for the device: only on log steps
            now = time.time()
            dt = (now - t_last) / max(1, iter_num - step_last)
            t_last, step_last = now, iter_num
            tok_s = tokens_per_step / dt
            flops_s = flops_per_step / dt
            mfu = flops_s / (peak * world) if peak else None  # flops_s counts every process; peak is one GPU's
            speed = f"MFU {100 * mfu:.1f}%" if peak else f"{flops_s / 1e9:.1f} GFLOP/s"
            extra = f" | {truncated} conversations truncated" if truncated else ''
            log(f"step {iter_num} | loss {loss_value:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms | "
                f"{tok_s:,.0f} tok/s | {speed}{extra}")
            record(iter=iter_num, loss=loss_value, lr=lr, ms=dt * 1000, tokens_per_sec=tok_s,
                   flops_per_sec=flops_s, mfu=mfu, truncated=truncated,
                   nonfinite=nonfinite_total)
            truncated = 0

    if metrics:
        metrics.close()
    if ddp:
        dist.destroy_process_group()
    log(f"done: best val loss {best_val:.4f}; checkpoints in {cfg.ckpt_dir}" if val else f"done: checkpoints in {cfg.ckpt_dir}")


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:  # the second Ctrl-C: leave at once, checkpoints as they were
        print("\ninterrupted again: exiting without saving", file=sys.stderr)
        sys.exit(130)
