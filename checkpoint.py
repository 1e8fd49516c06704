"""
Checkpoints: what train.py writes and every other stage reads.

    ckpt = read_checkpoint(path)  # torch.load(weights_only=True): a checkpoint cannot run code
    model, ckpt = load_model(path, device, tok.sha256)  # a LoRA adapter comes merged into its base

A checkpoint is a dict: 'model' (or 'adapter' and 'base' for LoRA), 'model_args' (ModelConfig),
'config', 'tokenizer_sha256', 'iter', 'best_val'; train.py's ckpt.pt adds optimizer and RNG state
for resume. It is written atomically (temp file, fsync, rename); the previous keep_checkpoints
versions of ckpt.pt stay as ckpt.1.pt, ckpt.2.pt ... so a corrupt latest file has a fallback.
model.py knows none of this: it stays plain torch, to be copied anywhere. Also here: each process's
random state (what an exact resume restores) and folding a LoRA adapter into its base (train.py
--merge_lora).
"""
import os
import pickle
import random
import shutil
import sys
import zipfile

import numpy as np
import torch

from common import atomic_file, die, file_sha256
from model import GPT, ModelConfig, add_lora, merge_lora


# ----------------------------------------------------------------------------------------------
# Reading and writing

def read_checkpoint(path, fatal=True):
    """torch.load with weights_only=True (a checkpoint cannot run code); a truncated or corrupt file
    is a clear error (or None with fatal=False, so resume can fall back to an older one)."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}: train one with `python train.py <your config>` or set "
            f"--ckpt")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        weights = isinstance(ckpt, dict) and ('model' in ckpt or 'adapter' in ckpt)
        if not weights or 'model_args' not in ckpt:
            raise ValueError("not a checkpoint written by train.py")
        return ckpt
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        if not fatal:
            return None
        die(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:120]}); use another "
            "checkpoint (the kept ckpt.1.pt, ckpt.2.pt ... or best.pt) or retrain")



def save_checkpoint(obj, folder, name, keep=0):
    """Write folder/name atomically (never a half-written checkpoint, even on a full disk or a
    second Ctrl-C), first moving the previous one to name.1.pt, name.1.pt to name.2.pt ... (`keep`
    of them)."""
    path = os.path.join(folder, name)
    with atomic_file(path) as f:
        try:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the new one is on disk before the old ones move
        # a full disk: an OSError, or from torch's zip writer a RuntimeError with no errno at all.
        # The earlier checkpoints have not moved yet, and atomic_file removes the partial file.
        except (OSError, RuntimeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)[:120]
            die(f"could not write {path} ({why}): is the disk full? Free some space in {folder} "
                "(or set out_dir to another disk), then go on with init_from='resume'. The "
                "checkpoints already there are kept, and nothing half-written is left")
        base = path[:-3]
        if keep > 0 and os.path.exists(path):
            for i in range(keep - 1, 0, -1):
                if os.path.exists(f'{base}.{i}.pt'):
                    os.replace(f'{base}.{i}.pt', f'{base}.{i + 1}.pt')
            os.replace(path, f'{base}.1.pt')
    fd = os.open(folder, os.O_RDONLY)  # make the renames themselves durable
    os.fsync(fd)
    os.close(fd)


def load_for_resume(folder, keep):
    """The newest readable checkpoint: ckpt.pt, else the kept earlier versions."""
    names = ['ckpt.pt'] + [f'ckpt.{i}.pt' for i in range(1, keep + 1)]
    candidates = [os.path.join(folder, name) for name in names]
    for path in candidates:
        if os.path.exists(path):
            ckpt = read_checkpoint(path, fatal=False)
            if ckpt is not None:
                return path, ckpt
            print(f"warning: {path} is truncated or corrupt, trying the previous checkpoint",
                  file=sys.stderr)
    die(f"init_from='resume' but no readable checkpoint in {folder}: start with "
        f"init_from='scratch'")



# ----------------------------------------------------------------------------------------------
# Which checkpoint, and loading it

def checkpoint_path(cfg):
    """(path, why): the checkpoint to load and why it is that one (for messages when it does not
    fit)."""
    if cfg.ckpt == 'base_model':
        if not cfg.base_model:
            die("ckpt='base_model' but base_model is not set: set it to the pretrained model "
                "(a Hugging Face folder, a .gguf file or hf:<owner>/<name>)")
        return cfg.base_model, "base_model, as ckpt='base_model'"
    if cfg.ckpt:
        return cfg.ckpt, f"ckpt, from {cfg.set_by.get('ckpt', 'the config')}"
    best = os.path.join(cfg.ckpt_dir, 'best.pt')
    if os.path.exists(best):
        return best, (f"the best checkpoint of phase '{cfg.phase}' under out_dir={cfg.out_dir}, "
                      "as ckpt is ''")
    return (os.path.join(cfg.ckpt_dir, 'ckpt.pt'),
            f"the latest checkpoint of phase '{cfg.phase}' under out_dir={cfg.out_dir} (it has no "
            "best.pt), as ckpt is ''")


def load_configured(cfg, tok, device):
    """The model a stage talks to or exports: cfg's checkpoint (checkpoint_path), checked against
    the tokenizer `tok`, on `device` -> (model, ckpt, path)."""
    path, why = checkpoint_path(cfg)
    model, ckpt = load_model(path, device, tok.sha256, cfg.lora_base, why, tok.path, tok)
    return model, ckpt, path


def check_tokenizer(ckpt, path, why, tokenizer_path, tokenizer_sha256):
    """A checkpoint works only with the tokenizer it was trained with. When they differ, the likely
    cause is the wrong checkpoint or the wrong out_dir, so say which checkpoint was picked and
    why."""
    if ckpt['tokenizer_sha256'] == tokenizer_sha256:
        return
    then = (ckpt.get('config') or {}).get('tokenizer_path')
    die(f"{path} ({why}) was trained with another tokenizer: sha256 {ckpt['tokenizer_sha256'][:12]}"
        + (f" (it was {then})" if then else '') + f", but the configured tokenizer "
                                                  f"{tokenizer_path} "
                                                  "is "
        f"{tokenizer_sha256[:12]}. Is out_dir right? Pick a checkpoint trained with this "
        f"tokenizer, "
        "or point tokenizer_path at the one this checkpoint was trained with")


def load_model(path, device, tokenizer_sha256=None, base_path='', why='the checkpoint asked for',
               tokenizer_path='the configured tokenizer', tok=None):
    """A trained model from a checkpoint, in eval mode on `device`; refuses one from another
    tokenizer (`why` the checkpoint was picked goes into that message). A LoRA adapter checkpoint is
    loaded onto its base model (the path it records, or base_path) and merged into it. A pretrained
    model (ckpt='base_model': a folder, .gguf or hf: id) is read as it comes, with a checkpoint-like
    dict; `tok` must then be the tokenizer imported from it."""
    if path.startswith('hf:') or path.endswith('.gguf') or os.path.isdir(path):
        import pretrained  # (it needs the export extra; checkpoints of ours do not)
        model, info = pretrained.load_pretrained(path, device)
        if tok is not None:
            check_base_tokenizer(tok, info['model_args'], path)
        return model, {'model_args': info['model_args'], 'iter': 0, 'best_val': None,
                       'config': {'base_model': path}, 'tokenizer_sha256': tokenizer_sha256,
                       'pretrained': info}
    ckpt = read_checkpoint(path)
    if tokenizer_sha256:
        check_tokenizer(ckpt, path, why, tokenizer_path, tokenizer_sha256)
    model = GPT(ModelConfig(**ckpt['model_args']))
    if 'adapter' in ckpt:
        model.load_state_dict(base_weights(ckpt, path, base_path))
        add_lora(model, **ckpt['lora'])
        model.load_state_dict(ckpt['adapter'], strict=False)
        model = merge_lora(model)
    else:
        model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), ckpt


def base_weights(adapter_ckpt, adapter_path, base_path=''):
    """The base model's weights for a LoRA adapter, checked against the sha256 the adapter
    recorded."""
    ref = adapter_ckpt['base']
    path = base_path or ref['path']
    if not os.path.isfile(path):
        die(f"{adapter_path} is a LoRA adapter for {ref['path']}, which is missing: put it back or "
            "set --lora_base")
    sha = file_sha256(path)
    if sha != ref['sha256']:
        die(f"{adapter_path} is a LoRA adapter for another base model: {path} has sha256 "
            f"{sha[:12]}, the adapter was trained on {ref['sha256'][:12]} ({ref['path']}). Use "
            f"that "
            "base checkpoint (--lora_base).")
    base = read_checkpoint(path)
    if 'model' not in base:
        die(f"{path} is itself an adapter: a LoRA base must be a full checkpoint (merge it first)")
    return base['model']


def check_base_tokenizer(tok, args, source):
    """A base model's tokenizer is the one tokenizer.py imported from it: not ours (a SentencePiece
    model of our own), and with no id past the model's embedding (which may be padded larger)."""
    if getattr(tok, 'template', None) == 'smallchat':
        die(f"base_model={source} comes with its own tokenizer, but {tok.path} is one of ours: run "
            "`python tokenizer.py <your config>` with base_model set to import it (tokenizer_path "
            "then defaults to <out_dir>/tokenizer.json)")
    if tok.vocab_size > args['vocab_size']:
        die(f"{tok.path} has {tok.vocab_size} tokens but base_model={source} embeds only "
            f"{args['vocab_size']}: it is not this model's tokenizer. Import this model's with "
            "`python tokenizer.py <your config>` (into a new tokenizer_path)")


def check_compatible(ckpt, path, why, args, tok):
    """A checkpoint must come from this tokenizer and have this model's shape (block_size may
    shrink)."""
    check_tokenizer(ckpt, path, why, tok.path, tok.sha256)
    saved = ckpt['model_args']
    for key in ('vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'tie_embeddings',
                'rope_theta', 'intermediate_size', 'norm_eps'):
        if saved.get(key) != args.get(key):  # (older checkpoints lack the last two: None)
            fix = (f"set {key}={saved.get(key)}" if key in ('n_layer', 'n_head', 'n_kv_head',
                   'n_embd', 'tie_embeddings', 'rope_theta') else "check the tokenizer")
            die(f"{path} has {key}={saved.get(key)} but this config makes {key}={args.get(key)}: "
                f"{fix}, or set base_model to the model it was trained from (the model's shape "
                "must match its checkpoint)")
    if args['block_size'] > saved['block_size']:
        die(f"block_size={args['block_size']} is larger than the {saved['block_size']} that {path} "
            f"was trained with: set block_size <= {saved['block_size']}")


def freeze_base(path, ckpt_dir):
    """A LoRA run's base, kept as <ckpt_dir>/base.pt out of reach of checkpoint rotation and of
    later runs that rewrite the original file (a hard link where possible: no copy). Returns its
    reference."""
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
    return {'path': os.path.abspath(frozen), 'sha256': file_sha256(frozen),
            'from': os.path.abspath(path)}


def saved_best(ckpt_dir):
    """best.pt's (validation loss, step), or (inf, None) without one: after a fallback to an older
    ckpt, it may be better than the one saved there."""
    path = os.path.join(ckpt_dir, 'best.pt')
    ckpt = read_checkpoint(path, fatal=False) if os.path.exists(path) else None
    return (ckpt['best_val'], ckpt['iter']) if ckpt else (float('inf'), None)


# ----------------------------------------------------------------------------------------------
# Random state, for exact resume; a LoRA adapter folded into its base

def rng_state():
    """This process's random state (torch, numpy, Python, CUDA): what makes a resumed run draw the
    same numbers as an uninterrupted one."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    state = {'torch': torch.get_rng_state(), 'numpy': numpy_state,
             'python': list(random.getstate()[1])}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state(('MT19937', np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state['python']), None))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def merge_adapter(path, base_path=''):
    """train.py --merge_lora=adapter.pt: fold a LoRA adapter into its base, save a normal checkpoint
    beside it."""
    model, ckpt = load_model(path, 'cpu', base_path=base_path)
    if 'adapter' not in ckpt:
        die(f"--merge_lora={path} is not a LoRA adapter checkpoint (it has full weights already)")
    out = path[:-3] + '_merged.pt' if path.endswith('.pt') else path + '_merged.pt'
    save_checkpoint({'model': model.state_dict(), 'iter': ckpt['iter'],
                     'best_val': ckpt['best_val'],
                     'model_args': ckpt['model_args'], 'config': ckpt['config'],
                     'tokenizer_sha256': ckpt['tokenizer_sha256'],
                     'merged_from': {'adapter': os.path.abspath(path), 'base': ckpt['base']}},
                    os.path.dirname(os.path.abspath(out)), os.path.basename(out))
    print(f"merged {path} into its base {ckpt['base']['path']}: wrote {out}")
