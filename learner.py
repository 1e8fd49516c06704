"""
The model a training run steps: the processes it runs in, where its weights start, its checkpoints.

    proc = setup_processes(cfg)                      # one process, or one of torchrun's
    learner, position = build_model(cfg, tok, proc)  # scratch, resume, a checkpoint, base_model
    ...                                              # train.py's loop steps learner.model
    save_latest('periodic', cfg, proc, learner, position, tok)  # ckpt.pt: all a resume needs
    save_best(cfg, learner, position, tok)                       # best.pt: the weights to use

train.py is the loop (data, steps, evaluation, logging); this is what it trains and what it keeps of
it. A Learner is the model (compiled and/or DDP-wrapped, and the plain one underneath), its
optimizer and scaler, its LoRA settings and frozen base, and DPO's reference; a Position is where
the run stands (steps, best val loss, the clock of a time budget), saved in ckpt.pt beside the
weights so that a resumed run goes on exactly where it stopped.
"""
import os
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (base_weights, check_base_tokenizer, check_compatible, freeze_base,
                        load_for_resume, read_checkpoint, rng_state, save_checkpoint, saved_best,
                        set_rng_state)
from common import die, pick_device, runtime
from model import GPT, ModelConfig, add_lora, adapter_state
from optim import make_optimizer
import pretrained


# ----------------------------------------------------------------------------------------------
# Who runs where


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

# ----------------------------------------------------------------------------------------------
# The model to train, and where its weights start


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


def check_disk(cfg, raw_model, proc):
    """Stop now, not after an hour of training, if the disk cannot hold the checkpoints."""
    total, _ = raw_model.num_params()
    ckpt_bytes = 12 * total  # fp32 weights + two AdamW moments
    free = shutil.disk_usage(cfg.ckpt_dir).free if proc.master else float('inf')
    if free < 3 * ckpt_bytes:
        die(f"only {free / 1e9:.2f} GB free in {cfg.ckpt_dir}; checkpoints need about "
            f"{3 * ckpt_bytes / 1e9:.2f} GB (ckpt.pt, its temp file while saving, best.pt): free "
            "some space or set out_dir elsewhere")

# ----------------------------------------------------------------------------------------------
# Checkpoints


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
