"""
Configuration for every stage, in one place.

Every script reads its settings the same way:

    python train.py config/demo.py --batch_size=32 --compile=True

Config files are plain Python, executed in order; each assignment to a known key sets it.
`--key=value` overrides come after and always win (value parsed as a Python literal, else kept
as a string). One config file describes an experiment end to end, so every key any stage knows
lives in the KEYS table below: a key that belongs to another stage is fine, a key that no stage
knows is a typo and stops the run, whether it comes from the command line or from a config file.

Two conveniences for config files:
  - command-line values are visible while a config file runs, so a file can branch on them
    (config/demo.py does `if phase == 'sft': ...`);
  - `include('other.py')` runs another config file (path relative to the including file) in the
    same namespace, so config/prod_sft.py can start from config/prod_pretrain.py.

This module also holds the two bits of plumbing every stage shares: `die` (a clear error and a
non-zero exit) and `atomic_file` (write to a temp file, fsync, rename: never a half-written file).
"""
import ast
import contextlib
import copy
import difflib
import hashlib
import json
import os
import sys
import types

# Every key any stage reads: name -> (default, one-line meaning). Grouped by the stage that uses it.
KEYS = {
    # --- where things go (all stages) ---
    'out_dir': ('out/demo', "folder for everything this experiment produces (tokenizer, data/, checkpoints, runs/)"),
    'data_dir': ('', "where prepared shards go; '' means <out_dir>/data"),
    'tokenizer_path': ('', "SentencePiece model file; '' means <out_dir>/tokenizer.model"),
    'seed': (1337, "seed for everything random: tokenizer sampling, train/val split, batches, init, sampling"),
    'sources': ({
        'roam': {'kind': 'roam', 'path': 'data/sample/roam'},
        'primer': {'kind': 'primer', 'path': 'data/sample/primer.txt'},
    }, "the data: {name: {'kind': roam|primer|text|chat|dolly|oasst1|..., 'path': ..., more settings}}"),

    # --- tokenizer.py ---
    'vocab_size': (2048, "tokenizer vocabulary size (also the model's)"),
    'tokenizer_type': ('bpe', "SentencePiece model type: 'bpe' or 'unigram'"),
    'tokenizer_sources': (None, "{source name: max bytes} to train the tokenizer on; None = every source"),
    'tokenizer_max_bytes': (20_000_000, "byte budget per source when tokenizer_sources is None"),
    'show_chat': ('', "tokenizer.py: print a conversation (a .json or .jsonl file) rendered with the chat template"),

    # --- prepare.py ---
    'shard_tokens': (50_000_000, "largest shard in tokens (a document never spans two shards)"),
    'num_proc': (0, "prepare.py worker processes for tokenizing; 0 = one per CPU core"),
    'analyze_only': (False, "prepare.py: report files, documents, bytes and estimated tokens; write nothing"),
    'prepare_sources': (None, "list of source names prepare.py works on; None = every source"),
    'max_conversation_tokens': (4096, "SFT conversations longer than this are truncated when prepared"),
    'cache_dir': ('out/cache', "downloaded corpora and benchmark files, kept across runs (a rerun downloads nothing)"),
    'download_retries': (5, "retries of a failed download (5xx, dropped connection, timeout), with backoff"),
    'download_timeout': (30.0, "seconds to wait for a server before retrying"),
    'download_backoff': (2.0, "seconds before the first retry; doubles each time"),

    # --- the model (model.py) ---
    'n_layer': (6, "transformer blocks"),
    'n_head': (6, "attention heads (query heads)"),
    'n_kv_head': (0, "key/value heads; 0 = n_head, fewer = grouped-query attention (smaller KV cache)"),
    'n_embd': (384, "width of the residual stream"),
    'block_size': (256, "context length in tokens"),
    'dropout': (0.0, "dropout rate (0 for pretraining; a little can help small fine-tunes)"),
    'tie_embeddings': (True, "share the token embedding with the output head"),
    'rope_theta': (10000.0, "base of the rotary position embedding frequencies"),

    # --- train.py ---
    'phase': ('pretrain', "name of this training run: checkpoints go to <out_dir>/<phase>/ (e.g. pretrain, sft)"),
    'mixture': ({'roam': 0.5, 'primer': 0.5}, "{source name: weight}: each batch row comes from a source drawn by weight"),
    'val_sources': (None, "sources to report validation loss on; None = the mixture's"),
    'init_from': ('scratch', "'scratch', 'resume' (this phase's ckpt.pt), or a checkpoint path to start from"),
    'batch_size': (16, "rows per micro-batch (per process)"),
    'gradient_accumulation_steps': (1, "micro-batches per optimizer step, in total over all processes"),
    'max_iters': (1000, "optimizer steps"),
    'learning_rate': (1e-3, "peak learning rate"),
    'min_lr': (1e-4, "learning rate at the end of the cosine decay"),
    'warmup_iters': (100, "linear warmup steps"),
    'lr_decay_iters': (0, "step where the cosine decay reaches min_lr; 0 = max_iters"),
    'weight_decay': (0.1, "AdamW weight decay (matrices only)"),
    'beta1': (0.9, "AdamW beta1"),
    'beta2': (0.95, "AdamW beta2"),
    'grad_clip': (1.0, "clip the gradient norm to this; 0 = off"),
    'eval_interval': (200, "evaluate and checkpoint every this many steps"),
    'eval_iters': (20, "batches per validation source in each evaluation"),
    'log_interval': (10, "print and record a training line every this many steps"),
    'keep_checkpoints': (3, "how many earlier ckpt.pt versions to keep (resume falls back to them)"),
    'max_nonfinite': (5, "stop after this many non-finite losses in a row (each one's step is skipped)"),
    'dtype': ('auto', "float32, bfloat16 or float16 (autocast); auto = bfloat16 where fast, else float32"),
    'compile': (False, "wrap the model in torch.compile (CPU too; the first steps are slow)"),
    'device': ('auto', "auto (cuda, then mps, then cpu), or e.g. cpu, cuda, cuda:1, mps"),
    'run_id': ('', "name of this run's folder <out_dir>/runs/<run_id>; '' = <phase>-<date>-<time>"),
    'lora_rank': (0, "> 0: freeze the model from init_from and train LoRA adapters of this rank instead"),
    'lora_alpha': (16.0, "LoRA scale: the update is (lora_alpha / lora_rank) * B @ A"),
    'lora_dropout': (0.05, "dropout on the input of the LoRA adapters"),
    'lora_targets': (['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
                     "projections that get adapters (all of them: closer to full fine-tuning than q/v alone)"),
    'lora_base': ('', "base checkpoint of a LoRA adapter; '' = the path the adapter recorded"),
    'merge_lora': ('', "train.py: fold this LoRA adapter checkpoint into its base, write <name>_merged.pt, and stop"),

    # --- sample.py ---
    'ckpt': ('', "checkpoint to load; '' = <out_dir>/<phase>/best.pt (else ckpt.pt there)"),
    'start': ('', "completion prompt; FILE:path reads it from a file"),
    'num_samples': (1, "completions to print"),
    'max_new_tokens': (200, "most tokens to generate per completion or chat reply"),
    'temperature': (0.8, "sampling temperature; 0 = greedy"),
    'top_k': (50, "sample only among the k most likely tokens; 0 = off"),
    'top_p': (0.95, "sample only among the most likely tokens that make up probability p; 1.0 = off"),
    'use_kv_cache': (True, "reuse keys/values of earlier positions while generating (much faster)"),
    'compile_decode': (True, "compile the per-token decode step (with the KV cache): 2-3x faster replies after a "
                             "one-time compile at start-up; False = run it eagerly"),
    'interactive': (False, "chat: a multi-turn conversation on stdin/stdout (one message per line)"),
    'system': ('', "chat system prompt; '' = the built-in default voice (system_file wins if set)"),
    'system_file': ('', "read the chat system prompt from this file (overrides system)"),
    'allow_special': (False, "let the model generate role tokens (sys/usr/asst/bos) in chat"),

    # --- eval.py ---
    'eval_sources': (None, "prepared sources whose val split eval.py measures; None = every prepared one"),
    'eval_tokens': (1_000_000, "eval.py: the first this many tokens of each val split (a fixed set)"),
    'text_file': ('', "eval.py: measure loss, perplexity and bits per byte on this text file instead"),
    'boolq': ('', "eval.py: BoolQ dev set: a .jsonl/.parquet path, a URL, or 'download'; '' = skip"),
    'hellaswag': ('', "eval.py: HellaSwag val set: a .jsonl/.parquet path, a URL, or 'download'; '' = skip"),
    'eval_limit': (0, "eval.py: use only the first N benchmark examples; 0 = all"),
    'eval_chat': (False, "eval.py: ask benchmark and smoke questions through the chat template (SFT models)"),
    'eval_out': ('', "eval.py: folder for eval_results.json/.md; '' = beside the checkpoint"),

    # --- bench.py ---
    'bench': ('all', "sections to run: all, or a comma list of matmul, train, decode, prepare"),
    'bench_json': ('', "also write the figures to this JSON file"),
    'bench_corpus': ('../shared/data/gutenberg/corpus_clean.txt', "text file for the prepare benchmark"),
    'bench_steps': (10, "timed training steps per configuration (after 3 warm-up steps)"),
}


def die(msg):
    """Stop with a clear message and exit status 1. Callers name the culprit and the fix."""
    raise SystemExit(f"error: {msg}")


@contextlib.contextmanager
def atomic_file(path, mode='wb'):
    """Open a temp file beside `path`; on success fsync it and rename it over `path`.
    An interrupted write leaves the old file (if any) untouched and no half-written file."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path):
    """sha256 of a file, read a MB at a time: recorded wherever shards or checkpoints depend on a file."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def suggest(name, known):
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_type(name, value, where):
    """Return value converted to the type of the key's default, or die naming the key."""
    default = KEYS[name][0]
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        hint = "True or False" if isinstance(default, bool) else type(default).__name__
        die(f"{where}: {name} must be {hint} (like the default {default!r}), got {type(value).__name__} {value!r}")
    return value


def parse_value(name, text):
    """Command-line value: a Python literal if it parses, else the raw string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(KEYS[name][0], str) and not isinstance(value, str):
        value = text  # --start=123 means the text "123"
    if isinstance(KEYS[name][0], bool) and text.lower() in ('true', 'false'):
        value = text.lower() == 'true'
    return value


def print_help():
    print("usage: python <stage>.py [config/X.py ...] [--key=value ...]\n")
    print("Config files run in order, then --key=value overrides. Every key, with its default:\n")
    for name, (default, meaning) in KEYS.items():
        print(f"  --{name}={default!r}")
        print(f"        {meaning}")


def assigned_line(path, name):
    """Line of the first assignment to `name` in a config file (for error messages)."""
    try:
        for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
            if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store):
                return node.lineno
    except (OSError, SyntaxError):
        pass
    return None


def run_config_file(path, ns):
    if not os.path.isfile(path):
        die(f"config file {path} not found (run from the repository root, e.g. python train.py config/demo.py)")
    ns['include'] = lambda other: run_config_file(os.path.join(os.path.dirname(path), other), ns)
    try:
        code = compile(open(path, encoding='utf-8').read(), path, 'exec')
        exec(code, ns)
    except SystemExit:
        raise
    except Exception as e:
        die(f"config file {path} failed to run: {type(e).__name__}: {e}")
    for name, value in list(ns.items()):
        if name.startswith('_') or name == 'include' or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if name not in KEYS:
            line = assigned_line(path, name)
            at = f"{path}" + (f" line {line}" if line else "")
            die(f"{at}: unknown key '{name}'{suggest(name, KEYS)}. "
                f"Every known key is listed by `python train.py --help`.")
        ns[name] = check_type(name, value, path)  # values from before this file passed already


def configure(argv=None):
    """Parse config files and --key=value overrides; return a namespace with every key."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        print_help()
        raise SystemExit(0)
    files, overrides = [], {}
    for arg in argv:
        if not arg.startswith('--'):
            files.append(arg)
            continue
        name, eq, text = arg[2:].partition('=')
        if name not in KEYS:
            die(f"unknown key --{name}{suggest(name, KEYS)}. `--help` lists every key.")
        if not eq:
            if not isinstance(KEYS[name][0], bool):
                die(f"--{name} needs a value: --{name}=...")
            text = 'True'  # --compile alone means --compile=True
        overrides[name] = check_type(name, parse_value(name, text), f"--{name}")
    ns = {name: copy.deepcopy(default) for name, (default, _) in KEYS.items()}  # configs may mutate them
    ns.update(overrides)  # visible to config files, so they can branch on e.g. phase
    for path in files:
        run_config_file(path, ns)
    ns.update(overrides)  # and the command line always wins
    cfg = types.SimpleNamespace(**{name: ns[name] for name in KEYS})
    cfg.data_dir = cfg.data_dir or os.path.join(cfg.out_dir, 'data')
    cfg.tokenizer_path = cfg.tokenizer_path or os.path.join(cfg.out_dir, 'tokenizer.model')
    cfg.ckpt_dir = os.path.join(cfg.out_dir, cfg.phase)
    cfg.config_files = files
    return cfg


def save_config(cfg, path):
    """Write the resolved configuration as JSON (training runs store it beside their metrics)."""
    with atomic_file(path, 'w') as f:
        json.dump(vars(cfg), f, indent=2, default=str)
        f.write('\n')
