"""
Configuration for every stage, in one place.

Every script reads its settings the same way:

    python train.py config/demo.py --batch_size=32 --compile=True

Config files are plain Python, executed in order; each assignment to a known key sets it.
`--key=value` overrides come after and always win (value parsed as a Python literal, else kept
as a string). One config file describes an experiment end to end, so every key any stage knows
lives in the KEYS table below: a key that belongs to another stage is fine, a key that no stage
knows is a typo and stops the run, whether it comes from the command line or from a config file.
Each key's valid values sit beside its default (a range for every number): every stage checks the
final values before it does any work, so `batch_size=0` or `dropout=1.5` stops at once with the key,
where it was set and what is allowed.

Four conveniences for config files:
  - command-line values are visible while a config file runs, so a file can branch on them
    (config/demo.py does `if phase == 'sft': ...`);
  - `include('other.py')` runs another config file (path relative to the including file) in the
    same namespace, so config/prod_sft.py can start from config/prod_pretrain.py;
  - `include_text('file.txt')` is the stripped text of a file beside the config file (the system
    prompt config/demo.py, dev_sft.py, prod_sft.py and notes.py share is config/mara_system.txt);
  - `{out_dir}` and `{phase}` in a string value are filled in at the very end, so a path such as
    init_from = '{out_dir}/pretrain/best.pt' follows --out_dir (and the out_dir of a copied
    profile).

This module also holds the plumbing every stage shares: `die` (a clear error and a non-zero exit),
`atomic_file` (write to a temp file, fsync, rename: never a half-written file) and `Progress` (the
done/total, rate, ETA line of long jobs).
"""
import ast
import copy
import json
import math
import os
import re
import sys
import types

from common import atomic_file, die, suggest

# Every key any stage reads: name -> (default, meaning) or (default, valid, meaning), grouped by the
# stage that uses it. `valid` says which values make sense, and every stage checks it before doing
# any work (`--help` shows it). Every number needs one: '>= 1', '> 0', '<= 8' a bound '[0, 1)', '(0,
# 1]', '[0, 9]' an interval ([ ] include the end)
#   ('bpe', 'unigram')              the only choices
# list, dict for a key whose default is None: None, or one of these ('a,b' makes ['a', 'b'])
KEYS = {
    # --- where things go (all stages) ---
    'out_dir': ('out/demo', "folder for everything this experiment produces (tokenizer, data/, "
                            "checkpoints, runs/)"),
    'data_dir': ('', "where prepared shards go; '' means <out_dir>/data"),
    'tokenizer_path': ('', "SentencePiece model file, or an imported tokenizer.json; '' means "
                           "<out_dir>/tokenizer.model (<out_dir>/tokenizer.json with base_model)"),
    'base_model': ('', "a pretrained Llama to start from: a Hugging Face model folder, a .gguf "
                       "file or hf:<owner>/<name>. tokenizer.py then imports its tokenizer and "
                       "chat template instead of training one; init_from='base_model' (train.py) "
                       "and ckpt='base_model' (sample, eval, export) take its weights"),
    'seed': (1337, '[0, 4294967295]',
             "seed for training and sampling: batches, init, dropout, generation (not the split: "
             "split_seed)"),
    'split_seed': (0, '[0, 4294967295]', "seed of the train/val split: a document is val by a hash "
                                         "of its "
                   "content and this; change it to draw another val set"),
    'sources': ({
        'roam': {'kind': 'roam', 'path': 'data/sample/roam'},
        'primer': {'kind': 'primer', 'path': 'data/sample/primer.txt'},
    }, "the data: "
       "{name: {'kind': roam|primer|text|chat|dolly|oasst1|..., 'path': ..., more settings}}"),

    # --- tokenizer.py ---
    'vocab_size': (2048, '>= 265', "tokenizer vocabulary size (also the model's)"),
    'tokenizer_type': ('bpe', ('bpe', 'unigram'), "SentencePiece model type: 'bpe' or 'unigram'"),
    'tokenizer_sources': (None, dict, "{source name: max bytes} to train the tokenizer on; None = "
                                      "every source"),
    'tokenizer_max_bytes': (20_000_000, '>= 1', "byte budget per source when tokenizer_sources is "
                                                "None"),
    'show_chat': ('', "tokenizer.py: print a conversation (a .json or .jsonl file) rendered with "
                      "the chat template"),

    # --- prepare.py ---
    'shard_tokens': (50_000_000, '>= 1', "largest shard in tokens (a document never spans two "
                                         "shards)"),
    'num_proc': (0, '>= 0', "prepare.py worker processes for tokenizing; 0 = one per CPU core"),
    'analyze_only': (False, "prepare.py: report files, documents, bytes and estimated tokens; "
                            "write nothing"),
    'prepare_sources': (None, list, "list of source names prepare.py works on; None = every "
                                    "source"),
    'max_conversation_tokens': (4096, '>= 2', "SFT conversations longer than this are truncated "
                                              "when prepared"),
    'dedup': (True, "prepare.py: exact and near-duplicate documents out before the split, within "
                    "and across the (local) sources, the first copy kept (dedup.py)"),
    'dedup_threshold': (0.8, '(0, 1]', "prepare.py: documents whose 5-word shingles are this alike "
                                       "(Jaccard, MinHash estimate) are near duplicates"),
    'dedup_min_words': (100, '>= 1', "prepare.py: shorter documents (a conversation: its replies) "
                                     "are removed only as exact copies: a short page is mostly its "
                                     "template"),
    'dedup_stream_bits': (1 << 27, '>= 8', "prepare.py: a streamed corpus's exact copies are found "
                                           "in a Bloom filter of this many bits (16 MB; fixed)"),
    'quality_filter': (True, "prepare.py: junk out before the split (quality.py): the filter_* "
                             "rules on text, empty or repeated replies in chat"),
    'filter_min_words': (1, '>= 0', "prepare.py: text documents with fewer words are removed"),
    'filter_max_words': (0, '>= 0', "prepare.py: text documents with more words are removed (0: no "
                                    "limit; Gopher: 100000, for web pages: a book is one document)"),
    'filter_max_non_text': (0.3, '[0, 1]', "prepare.py: text whose share of symbols, control "
                                           "characters and U+FFFD is higher is removed (0: off)"),
    'filter_max_dup_lines': (0.5, '[0, 1]', "prepare.py: text of 50+ words whose share of repeated "
                                            "lines is higher (2/3 of it in characters) goes; 0: "
                                            "off; Gopher's, for web text: 0.3"),
    'filter_max_top_ngram': (0.3, '[0, 1]', "prepare.py: text of 50+ words whose most frequent "
                                            "2-gram holds more of its characters goes; Gopher: 0.2"),
    'filter_max_dup_ngrams': (0.6, '[0, 1]', "prepare.py: text of 50+ words with more of its "
                                             "characters in repeated 5-grams goes; Gopher: 0.15"),
    'cache_dir': ('out/cache', "downloaded corpora and benchmark files, kept across runs (a rerun "
                               "downloads nothing)"),
    'download_retries': (5, '>= 0', "retries of a failed download (5xx, dropped connection, "
                                    "timeout), with backoff"),
    'download_timeout': (30.0, '> 0', "seconds to wait for a server before retrying"),
    'download_backoff': (2.0, '>= 0', "seconds before the first retry; doubles each time"),

    # --- the model (model.py) ---
    'n_layer': (6, '>= 1', "transformer blocks"),
    'n_head': (6, '>= 1', "attention heads (query heads)"),
    'n_kv_head': (0, '>= 0', "key/value heads; 0 = n_head, fewer = grouped-query attention "
                             "(smaller KV cache)"),
    'n_embd': (384, '>= 2', "width of the residual stream"),
    'block_size': (256, '>= 1', "context length in tokens"),
    'dropout': (0.0, '[0, 1)', "dropout rate (0 for pretraining; a little can help small "
                               "fine-tunes)"),
    'tie_embeddings': (True, "share the token embedding with the output head"),
    'rope_theta': (10000.0, '> 0', "base of the rotary position embedding frequencies"),

    # --- train.py ---
    'phase': ('pretrain', "name of this training run: checkpoints go to <out_dir>/<phase>/ (e.g. "
                          "pretrain, sft)"),
    'mixture': ({'roam': 0.5, 'primer': 0.5}, "{source name: weight}: each batch row comes from a "
                                              "source drawn by weight"),
    'data_order': ('random', ('random', 'epochs'), "pretraining windows: 'random' (nanoGPT's: "
                   "anywhere, with repeats) or 'epochs' (every window of a source once an epoch, "
                   "shuffled: data.epoch_window)"),
    'val_sources': (None, list, "sources to report validation loss on; None = the mixture's"),
    'best_on': (None, list, "sources whose val loss chooses best.pt (weighted as in the mixture); "
                            "None = the largest"),
    'max_epochs': (16, '>= 1', "warn when the run would repeat a source more times than this "
                               "(train.py says why)"),
    'init_from': ('scratch', "'scratch', 'resume' (this phase's ckpt.pt), 'base_model' (its "
                             "weights), or a checkpoint path to start from"),
    'batch_size': (16, '>= 1', "rows per micro-batch (per process)"),
    'gradient_accumulation_steps': (1, '>= 1', "micro-batches per optimizer step, in total over "
                                               "all processes"),
    'max_iters': (1000, '>= 0', "optimizer steps"),
    'max_minutes': (0.0, '>= 0', "a time budget: train until this many minutes of the training "
                                 "loop (steps, evaluations, checkpoints) have passed, the "
                                 "schedule laid over the time, the final evaluation and "
                                 "checkpoint inside it; 0 = off (max_iters steps)"),
    'optimizer': ('adamw', ('adamw', 'muon'), "'adamw', or 'muon': Muon on the blocks' matrices, "
                                              "AdamW on the embedding/head and norms"),
    'learning_rate': (1e-3, '> 0', "peak learning rate (of AdamW: every parameter, or with Muon "
                                   "the embedding/head and norms)"),
    'muon_lr': (0.02, '> 0', "peak learning rate of Muon's matrices (optimizer='muon')"),
    'muon_momentum': (0.95, '[0, 1)', "Muon's momentum (Nesterov)"),
    'muon_weight_decay': (0.0, '>= 0', "decoupled weight decay of Muon's matrices (each step "
                                       "shrinks them by muon_lr * this)"),
    'lr_schedule': ('cosine', ('cosine', 'wsd'), "'cosine' (warmup, cosine decay to min_lr) or "
                                                 "'wsd' (warmup, constant, linear decay to min_lr "
                                                 "over the last decay_frac of the steps)"),
    'min_lr': (1e-4, '>= 0', "learning rate at the end of the decay (Muon's ends at muon_lr * "
                             "min_lr / learning_rate)"),
    'warmup_iters': (100, '>= 0', "linear warmup steps"),
    'lr_decay_iters': (0, '>= 0', "step where the decay reaches min_lr; 0 = max_iters"),
    'decay_frac': (0.2, '(0, 1]', "wsd: the fraction of the steps (up to lr_decay_iters) spent "
                                  "decaying"),
    'weight_decay': (0.1, '>= 0', "AdamW weight decay (matrices only; Muon's: muon_weight_decay)"),
    'beta1': (0.9, '[0, 1)', "AdamW beta1"),
    'beta2': (0.95, '[0, 1)', "AdamW beta2"),
    'grad_clip': (1.0, '>= 0', "clip the gradient norm to this; 0 = off"),
    'eval_interval': (200, '>= 1', "evaluate and checkpoint every this many steps"),
    'eval_iters': (20, '>= 1', "batches per validation source in each evaluation"),
    'log_interval': (10, '>= 1', "print and record a training line every this many steps"),
    'keep_checkpoints': (3, '>= 0', "how many earlier ckpt.pt versions to keep (resume falls back "
                                    "to them)"),
    'max_nonfinite': (5, '>= 1', "stop after this many non-finite losses in a row (each one's step "
                                 "is skipped)"),
    'dtype': ('auto', ('auto', 'float32', 'bfloat16', 'float16'),
              "float32, bfloat16 or float16 (autocast); auto = bfloat16 where fast, else float32"),
    'compile': (False, "wrap the model in torch.compile (CPU too; the first steps are slow)"),
    'device': ('auto', "auto (cuda, then mps, then cpu), or e.g. cpu, cuda, cuda:1, mps"),
    'run_id': ('', "name of this run's folder <out_dir>/runs/<run_id>; '' = <phase>-<date>-<time>"),
    'lora_rank': (0, '>= 0', "> 0: freeze the model from init_from and train LoRA adapters of this "
                             "rank instead"),
    'lora_alpha': (16.0, '> 0', "LoRA scale: the update is (lora_alpha / lora_rank) * B @ A"),
    'lora_dropout': (0.05, '[0, 1)', "dropout on the input of the LoRA adapters"),
    'lora_targets': (['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
                     list,
                     "projections that get adapters (all of them: closer to full fine-tuning than "
                     "q/v alone)"),
    'lora_base': ('', "base checkpoint of a LoRA adapter; '' = the path the adapter recorded"),
    'dpo_sft_weight': (0.0, '>= 0', "DPO: add this times SFT's loss on the chosen replies (mean "
                                    "nats per token; RPO): keeps replies' length and ending"),
    'pairs_from': ('', "pairs.py: the chat source whose dialogues give the pairs; '' = the first "
                       "chat source of the mixture"),
    'pairs_out': ('{out_dir}/pairs.jsonl', "pairs.py: where the pairs file is written"),
    'dpo_beta': (0.1, '> 0', "DPO (a mixture of preference pairs): how far the model may move from "
                             "its reference; smaller = further (Rafailov et al. use 0.1)"),
    'merge_lora': ('', "train.py: fold this LoRA adapter checkpoint into its base, write "
                       "<name>_merged.pt, and stop"),

    # --- sample.py ---
    'ckpt': ('', "checkpoint to load; '' = <out_dir>/<phase>/best.pt (else ckpt.pt there); "
                 "'base_model' = the base model as it comes"),
    'start': ('', "completion prompt; FILE:path reads it from a file"),
    'num_samples': (1, '>= 1', "completions to print"),
    'max_new_tokens': (200, '>= 1', "most tokens to generate per completion or chat reply"),
    'temperature': (0.8, '>= 0', "sampling temperature, in chat too; 0 = greedy (the same reply "
                    "every run: run.sh's demo chat)"),
    'top_k': (50, '>= 0', "sample only among the k most likely tokens; 0 = off"),
    'top_p': (0.95, '(0, 1]', "sample only among the most likely tokens that make up probability "
                              "p; 1.0 = off"),
    'use_kv_cache': (True, "reuse keys/values of earlier positions while generating (much faster)"),
    'compile_decode': (True, "compile the per-token decode step (with the KV cache): 2-3x faster "
                             "replies after a one-time compile at start-up; False = run it "
                             "eagerly"),
    'interactive': (False, "chat: a multi-turn conversation on stdin/stdout (one message per "
                           "line)"),
    'system': ('', "chat system prompt; '' = the built-in default voice (system_file wins if set)"),
    'system_file': ('', "read the chat system prompt from this file (overrides system)"),
    'allow_special': (False, "let the model generate role tokens (sys/usr/asst/bos) in chat"),
    'retrieve_from': ('', "retrieval (retrieval.py): the source of notes whose best-matching "
                          "chunks go in front of each user message, in SFT rows (prepare.py), "
                          "chat and eval.py's questions; '' = off"),
    'retrieve_k': (5, '>= 1', "retrieval: how many chunks of the notes each message gets"),
    'retrieve_chunk_chars': (120, '>= 50', "retrieval: the longest chunk of a note, in characters"),
    'unanswerable_frac': (0.0, '[0, 1]', "retrieval: the share of the primer's replies that also "
                          "give a row where the notes shown lack the reply, answered "
                          "unanswerable_reply (prepare.py; retrieval.unanswerable_rows)"),
    'unanswerable_reply': ("i don't know.", "retrieval: the reply those rows teach, in your "
                           "primer's words"),

    # --- serve.py (the model sample.py loads, with its sampling keys as the defaults) ---
    'host': ('127.0.0.1', "serve.py: the address to listen on; 127.0.0.1 = this machine only "
                          "(0.0.0.0 = every network it is on: set api_key)"),
    'port': (8000, '[0, 65535]', "serve.py: the port; 0 = any free one (printed)"),
    'api_key': ('', "serve.py: if set, /v1 requests must send 'Authorization: Bearer <key>'"),
    'serve_slots': (4, '>= 1', "serve.py: replies generated at once, a token each in turn "
                               "(each holds a KV cache); more requests wait in line"),
    'serve_max_waiting': (32, '>= 0', "serve.py: requests that may wait for a slot; more get a "
                                      "429"),
    'serve_max_body': (1_000_000, '>= 1000', "serve.py: the largest request body, in bytes"),
    'serve_max_messages': (200, '>= 1', "serve.py: the most messages a chat request may hold"),
    'serve_max_chars': (200_000, '>= 1', "serve.py: the most characters of text a request may "
                                         "hold (what fits the context is fitted as chat does)"),
    'serve_max_tokens': (2048, '>= 1', "serve.py: the largest max_tokens a request may ask for"),

    # --- eval.py ---
    'eval_sources': (None, list, "prepared sources whose val split eval.py measures; None = every "
                                 "prepared one"),
    'eval_tokens': (1_000_000, '>= 1', "eval.py: the first this many tokens of each val split (a "
                                       "fixed set)"),
    'text_file': ('', "eval.py: measure loss, perplexity and bits per byte on this text file "
                      "instead"),
    'boolq': ('', "eval.py: BoolQ dev set: a .jsonl/.parquet path, a URL, or 'download'; '' = "
                  "skip"),
    'hellaswag': ('', "eval.py: HellaSwag val set: a .jsonl/.parquet path, a URL, or 'download'; "
                      "'' = skip"),
    'eval_limit': (0, '>= 0', "eval.py: use only the first N benchmark examples; 0 = all"),
    'eval_chat': (False, "eval.py: ask benchmark and smoke questions through the chat template "
                         "(SFT models)"),
    'eval_out': ('', "eval.py: folder for eval_results.json/.md; '' = beside the checkpoint"),
    'questions': ('', "eval.py: a .jsonl of questions scored by keywords (data/sample/"
                      "questions.jsonl): asked through chat, greedy, one at a time; '' = skip"),
    'compare_with': ('', "eval.py: an earlier run's eval_results.json: the questions gained "
                         "and lost against it, and a sign test; '' = none"),
    'oracle_notes': (False, "eval.py --questions with retrieval: show each question only the "
                            "chunk of the notes that holds its answer's keywords (retrieval made "
                            "perfect): how much the model reads when finding is not the problem"),

    # --- export.py ---
    'export_dir': ('', "export.py: folder for the Hugging Face folder and the GGUF file; '' = "
                       "<out_dir>/export/<phase>"),
    'gguf_type': ('f16', ('f32', 'f16', 'bf16', 'q8_0', 'none'),
                  "export.py: GGUF weights: f32, f16, bf16, q8_0 (fast CPU chat), or none (no "
                  "GGUF)"),
    'overwrite': (False, "export.py: replace an export folder that already has files in it"),

    # --- bench.py ---
    'bench': ('all', "sections to run: all, or a comma list of matmul, train, decode, optim, "
                     "prepare, batches, bigtext, pretrained, serve, sweep"),
    'bench_json': ('', "also write the figures to this JSON file"),
    'bench_corpus': ('../shared/data/gutenberg/corpus_clean.txt',
                     "text file for the prepare benchmark"),
    'bench_steps': (10, '>= 1', "timed training steps per configuration (after 3 warm-up steps)"),
    'bench_sft_config': ('config/dev_sft.py', "config whose prepared chat data the batches "
                                              "benchmark reads"),
    'bench_bigtext_mb': (2048, '>= 1', "size of the generated text file (no separator) of the "
                                       "bigtext benchmark"),
    'bench_profiles': (['config/smoke.py', 'config/demo.py', 'config/shakespeare.py',
                        'config/dev.py', 'config/prod_pretrain.py'], list,
                       "the sweep section's profiles (configs that train a model of their own)"),
    'bench_step_cap': (10.0, '> 0', "the sweep: stop doubling the micro-batch once a step takes "
                                    "this many seconds"),
}


# Keys that hold a path: a leading '~' in them is the user's home, as in a shell and in the
# sources' paths. (boolq and hellaswag may also be 'download' or a URL: expanduser leaves those be.)
PATH_KEYS = ('out_dir', 'data_dir', 'tokenizer_path', 'base_model', 'show_chat', 'cache_dir',
             'init_from', 'lora_base', 'merge_lora', 'ckpt', 'system_file', 'text_file', 'boolq',
             'hellaswag', 'questions', 'compare_with', 'eval_out', 'export_dir', 'bench_json',
             'bench_corpus', 'bench_sft_config')


def key_spec(name):
    """(default, valid, meaning) of a key; valid is None where the table gives none."""
    entry = KEYS[name]
    return (entry[0], None, entry[1]) if len(entry) == 2 else entry


def describe(valid):
    """A key's valid values as --help and error messages show them."""
    if valid is list:
        return "None or a list ('a,b' means ['a', 'b'])"
    if valid is dict:
        return "None or a dict"
    if isinstance(valid, tuple):
        return 'one of ' + ', '.join(map(repr, valid))
    return valid


BOUND = re.compile(r'(>=|>|<=|<)\s*(\S+)$')
INTERVAL = re.compile(r'([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$')


def in_range(value, valid):
    """Is a number inside a range like '>= 1' or '[0, 1)'? NaN never is."""
    m = BOUND.match(valid)
    if m:
        bound = float(m.group(2))
        return {'>=': value >= bound, '>': value > bound, '<=': value <= bound,
                '<': value < bound}[m.group(1)]
    m = INTERVAL.match(valid)
    if not m:
        raise ValueError(f"not a range: {valid!r} (see the comment above KEYS)")
    lo, hi = float(m.group(2)), float(m.group(3))
    above = value >= lo if m.group(1) == '[' else value > lo
    below = value <= hi if m.group(4) == ']' else value < hi
    return above and below


def check_type(name, value, where):
    """Return value converted to the type of the key's default, or die naming the key."""
    default, valid, meaning = key_spec(name)
    if (valid is list or isinstance(default, list)) and isinstance(value, (str, tuple)):
        if isinstance(value, tuple):
            value = list(value)
        else:  # 'a, b' -> ['a', 'b']
            value = [v.strip() for v in value.split(',') if v.strip()]
    if default is None:
        if value is None or valid is None:
            return value
        strings = valid is not list or all(isinstance(v, str) for v in value)
        if not isinstance(value, valid) or not strings:
            die(f"{where}: {name} must be {describe(valid)} ({meaning}), got "
                f"{type(value).__name__} "
                f"{value!r}")
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        hint = "True or False" if isinstance(default, bool) else type(default).__name__
        die(f"{where}: {name} must be {hint} (like the default {default!r}), got "
            f"{type(value).__name__} {value!r}")
    return value


def check_value(name, value, where):
    """Die unless a key's final value is inside its valid range or choices (and finite, for a
    float)."""
    default, valid, meaning = key_spec(name)
    if isinstance(value, float) and not math.isfinite(value):
        die(f"{name}={value} (from {where}) is not a finite number: set a number (the default is "
            f"{default!r}; {name}: {meaning})")
    if isinstance(valid, str) and not in_range(value, valid):
        die(f"{name}={value!r} (from {where}) is out of range: it must be {valid} (the default is "
            f"{default!r}; {name}: {meaning})")
    if isinstance(valid, tuple) and value not in valid:
        die(f"{name}={value!r} (from {where}) is not {describe(valid)}{suggest(str(value), valid)}")


def check_combinations(cfg):
    """Values that are each fine but do not go together (the model's shape)."""
    at = lambda *names: ', '.join(f"{n} from {cfg.set_by.get(n, 'the default')}" for n in names)
    if cfg.n_embd % cfg.n_head:
        # (an even head size too, for RoPE)
        fits = max(1, cfg.n_embd // (2 * cfg.n_head)) * 2 * cfg.n_head
        die(f"n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head} "
            f"({at('n_embd', 'n_head')}): each head gets n_embd / n_head dimensions; set n_embd to "
            f"a multiple of n_head (e.g. {fits})")
    kv = cfg.n_kv_head or cfg.n_head
    if cfg.n_head % kv:
        die(f"n_head={cfg.n_head} is not a multiple of n_kv_head={cfg.n_kv_head} "
            f"({at('n_head', 'n_kv_head')}): each key/value head serves an equal group of query "
            "heads; set n_kv_head to a divisor of n_head (or 0)")
    if (cfg.n_embd // cfg.n_head) % 2:
        die(f"n_embd / n_head = {cfg.n_embd // cfg.n_head} is odd ({at('n_embd', 'n_head')}): "
            "rotary position embeddings rotate pairs of dimensions, so each head needs an even "
            "size; change n_embd or n_head")


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
    print("Config files run in order, then --key=value overrides. In a string value, {out_dir} and "
          "{phase} are\n"
          "filled in at the end, so paths follow --out_dir. Every key, with its default (and valid "
          "values):\n")
    for name in KEYS:
        default, valid, meaning = key_spec(name)
        print(f"  --{name}={default!r}" + (f"  ({describe(valid)})" if valid is not None else ''))
        print(f"        {meaning}")


def assignments(path):
    """{name: line of its first assignment} in a config file (for messages that say where a key was
    set)."""
    try:
        tree = ast.parse(open(path, encoding='utf-8').read())
    except (OSError, SyntaxError, ValueError):
        return {}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found[node.id] = min(node.lineno, found.get(node.id, node.lineno))
    return found


def read_text_file(path, by):
    """The text of a file a config file reads with include_text (a system prompt shared by
    profiles), stripped."""
    try:
        return open(path, encoding='utf-8-sig').read().strip()
    except (OSError, UnicodeDecodeError) as e:
        die(f"{by}: include_text cannot read {path} ({e}): it is read relative to the config file")


def run_config_file(path, ns, ran):
    if not os.path.isfile(path):
        die(f"config file {path} not found (run from the repository root, e.g. python train.py "
            "config/demo.py)")
    ns['include'] = lambda other: run_config_file(os.path.join(os.path.dirname(path), other), ns,
                                                  ran)
    ns['include_text'] = lambda other: read_text_file(os.path.join(os.path.dirname(path), other),
                                                      path)
    try:
        code = compile(open(path, encoding='utf-8').read(), path, 'exec')
        exec(code, ns)
    except SystemExit:
        raise
    except Exception as e:
        die(f"config file {path} failed to run: {type(e).__name__}: {e}")
    for name, value in list(ns.items()):
        helpers = (types.ModuleType, types.FunctionType, type)  # imports, functions, classes
        if (name.startswith('_') or name in ('include', 'include_text')
                or isinstance(value, helpers)):
            continue
        if name not in KEYS:
            line = assignments(path).get(name)
            at = f"{path}" + (f" line {line}" if line else "")
            die(f"{at}: unknown key '{name}'{suggest(name, KEYS)}. Every known key is listed by "
                "`python train.py --help`.")
        ns[name] = check_type(name, value, path)  # values from before this file passed already
    ran.append(path)  # after the files it includes: its own assignments come later


def configure(argv=None):
    """Parse config files and --key=value overrides; return a namespace with every key, each checked
    against its valid values, and `set_by` (where each key that is not at its default was set)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        try:
            print_help()
            sys.stdout.flush()
        except BrokenPipeError:  # `--help | head` has read what it wanted
            # (the flush at exit would fail again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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
    ns = {name: copy.deepcopy(spec[0]) for name, spec in KEYS.items()}  # configs may mutate them
    ns.update(overrides)  # visible to config files, so they can branch on e.g. phase
    ran = []
    for path in files:
        run_config_file(path, ns, ran)
    ns.update(overrides)  # and the command line always wins
    cfg = types.SimpleNamespace(**{name: ns[name] for name in KEYS})
    cfg.set_by = {}
    for path in ran:
        cfg.set_by.update({name: f"{path} line {line}" for name,
                           line in assignments(path).items() if name in KEYS})
    cfg.set_by = {name: where for name, where in cfg.set_by.items() if ns[name] != KEYS[name][0]}
    cfg.set_by.update({name: f"--{name}" for name in overrides})
    # {out_dir} and {phase} in a string value are filled in now that both are final: a profile's
    # paths (init_from, ckpt) then follow --out_dir, and the out_dir of a copy of the profile
    for name in KEYS:
        value = getattr(cfg, name)
        if isinstance(value, str) and name not in ('out_dir', 'phase'):
            setattr(cfg, name, value.replace('{out_dir}', cfg.out_dir).replace('{phase}',
                                                                               cfg.phase))
    # and in a source's path (pairs.py writes its pairs file under out_dir)
    if isinstance(cfg.sources, dict):
        cfg.sources = {name: {**src, 'path': src['path'].replace('{out_dir}', cfg.out_dir)}
                       if isinstance(src, dict) and isinstance(src.get('path'), str) else src
                       for name, src in cfg.sources.items()}
    for name in KEYS:
        check_value(name, getattr(cfg, name), cfg.set_by.get(name, 'the default'))
    if not cfg.out_dir.strip():  # '' would put data/ and checkpoints loose in the current folder
        die(f"out_dir is empty (from {cfg.set_by.get('out_dir', 'the default')}): set it to the "
            "folder for this experiment's files, e.g. --out_dir=out/mine")
    # checkpoints go to <out_dir>/<phase>: a phase of '', '.' or '..' would put them loose in
    # out_dir or outside it, where train.py replaces ckpt.pt and export.py names its folder
    if cfg.phase.strip() in ('', '.') or '..' in cfg.phase.split('/'):
        die(f"phase={cfg.phase!r} (from {cfg.set_by.get('phase', 'the default')}) is not the name "
            "of a folder inside out_dir: checkpoints go to <out_dir>/<phase>. Use a name such as "
            "pretrain or sft")
    for name in PATH_KEYS:
        setattr(cfg, name, os.path.expanduser(getattr(cfg, name)))
    for name in cfg.sources:  # (a name is a folder's name: sources.check_name checks the rest)
        if not isinstance(name, str):
            die(f"sources (from {cfg.set_by.get('sources', 'the default')}): the source name "
                f"{name!r} must be a string, e.g. {str(name)!r}: it names the source's folder "
                f"under "
                "data_dir")
    check_combinations(cfg)
    cfg.data_dir = cfg.data_dir or os.path.join(cfg.out_dir, 'data')
    cfg.tokenizer_path = cfg.tokenizer_path or os.path.join(
        cfg.out_dir, 'tokenizer.json' if cfg.base_model else 'tokenizer.model')
    cfg.ckpt_dir = os.path.join(cfg.out_dir, cfg.phase)
    cfg.config_files = files
    return cfg


def save_config(cfg, path):
    """Write the resolved configuration as JSON (training runs store it beside their metrics)."""
    with atomic_file(path, 'w') as f:
        json.dump(vars(cfg), f, indent=2, default=str)
        f.write('\n')
