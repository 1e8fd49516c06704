"""
Benchmarks: figures, not tests. Prints a table per section; --bench_json=file.json also saves them.

    python bench.py                                  # every section
    python bench.py --bench=train,decode             # some of them
    python bench.py --bench=prepare --bench_corpus=../shared/data/gutenberg/corpus_clean.txt

Sections:
  matmul   the machine's measured fp32 and bf16 matmul peaks (the yardstick for CPU MFU)
  train    training tokens/s, achieved FLOP/s and MFU per model size, dtype and compile
  decode   generation tokens/s and time to first token: compiled decode step, eager, no KV cache
  optim    one optimizer step alone, AdamW against Muon (its Newton-Schulz matmuls), per model size
  prepare  prepare.py MB/s and tokens/s with 1 process and with every core, peak RSS (process tree),
           on the whole corpus and on its first half
  batches  building one batch of 32 packed SFT rows (data.py's Packer) at block 256 and 1024,
           from the prepared chat data of bench_sft_config (skipped, with the command to run, when
           it is not prepared)
  pretrained  the model of --base_model (SmolLM2-135M ...): fine-tuning tokens/s and MFU (every
           weight in fp32 and bf16, LoRA in bf16; AdamW step included) and decode tokens/s, eager
           and compiled (not in `all`: it needs --base_model)
  serve    time to the first token and tokens/s of the config's model, called in process as
           sample.py calls it, and through serve.py with one client and four at once (not in
           `all`: it needs a trained model: python bench.py config/notes.py --bench=serve)
  sweep    per profile (bench_profiles): its model at its micro-batch, dtype and compile setting
           (tokens/s, MFU), the largest micro-batch that fits on this device (doubling until out of
           memory or a step takes bench_step_cap seconds), tokens and epochs of its prepared data
           that 1 and 8 hours of training buy (not in `all`: minutes; on a GPU too)
  bigtext  prepare.py's peak RSS on a generated text file with no separator (bench_bigtext_mb,
           2 GB) and on a quarter of it: memory must not grow with the file (not in `all`: it
           writes ~3 GB to /tmp)
On GPU, MFU is against the datasheet peak of the card (common.PEAK_FLOPS); on CPU against the
measured bf16 matmul peak of the same run.
"""
import copy
import http.client
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

from common import die, peak_flops, pick_device, pick_dtype
from configurator import configure
from data import Packer, Split, is_prepared, load_split
from model import GPT, ModelConfig, add_lora
from optim import make_optimizer

# (name, n_layer, n_head, n_embd, block_size, batch_size, vocab_size) per device type
SIZES = {
    'cpu': [('12M', 6, 6, 384, 256, 16, 2048), ('3.7M', 4, 4, 256, 128, 16, 2048)],
    'cuda': [('124M', 12, 12, 768, 1024, 16, 50304), ('350M', 24, 16, 1024, 1024, 8, 50304)],
}


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n=2048, reps=20):
    """FLOP/s of a large square matmul: the practical ceiling for the model's matmuls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def time_steps(model, optimizer, x, y, device, dtype, compiled, steps, warmup=3):
    """(seconds per training step, seconds of warm-up): forward, backward, optimizer step on the
    batch x, y, after `warmup` warm-up steps (where compilation happens)."""
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    run = torch.compile(model) if compiled else model
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

    def step():
        with autocast:
            _, loss = run(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):  # (and compilation)
        step()
    sync(device)
    warmup = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / steps, warmup


def bench_train(device, size, dtype, compiled, steps):
    name, n_layer, n_head, n_embd, block, batch, vocab_size = size
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=block, n_layer=n_layer, n_head=n_head,
                            n_kv_head=n_head, n_embd=n_embd)).to(device)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    optimizer = model.optimizer(1e-4, 0.1, (0.9, 0.95), device_type)
    x = torch.randint(0, vocab_size, (batch, block), device=device)
    y = torch.randint(0, vocab_size, (batch, block), device=device)
    dt, warmup = time_steps(model, optimizer, x, y, device, dtype, compiled, steps)
    tok_s = batch * block / dt
    return {'model': name, 'params_M': round(model.num_params()[0] / 1e6, 2), 'dtype': dtype,
            'compile': compiled, 'batch': batch, 'block': block, 'ms_per_step': round(dt * 1000, 1),
            'tokens_per_s': round(tok_s),
            'flops_per_s': model.flops_per_token(block) * tok_s, 'warmup_s': round(warmup, 1)}


def bench_pretrained(cfg, device, peaks, block=512, batch=4):
    """A pretrained model's fine-tuning speed (random tokens, AdamW step included: every weight in
    fp32 and in bf16 autocast, LoRA rank 16 in bf16) and its decode speed (a 256-token prompt, 128
    new tokens, greedy, fp32 weights, eager and compiled): two lists of rows."""
    import pretrained
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    base, info = pretrained.load_pretrained(cfg.base_model, 'cpu', max_block_size=block)
    name = (info.get('name') or os.path.basename(cfg.base_model.rstrip('/')))[:24]
    rows = []
    for dtype, rank in (('float32', 0), ('bfloat16', 0), ('bfloat16', 16)):
        model = copy.deepcopy(base).to(device).train()
        if rank:
            add_lora(model, rank, 2 * rank, 0.0, ['q_proj', 'k_proj', 'v_proj', 'o_proj'])
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        torch.manual_seed(0)
        x = torch.randint(0, model.cfg.vocab_size, (batch, block), device=device)
        y = torch.randint(0, model.cfg.vocab_size, (batch, block), device=device)
        dt, warmup = time_steps(model, optimizer, x, y, device, dtype, False, cfg.bench_steps)
        tok_s = batch * block / dt
        flops = model.flops_per_token(block) * tok_s
        datasheet = peak_flops(device_type, dtype)
        rows.append({'model': name, 'params_M': round(info['params'] / 1e6, 1), 'dtype': dtype,
                     'trains': f'LoRA r{rank}' if rank else 'every weight', 'batch': batch,
                     'block': block, 'ms_per_step': round(dt * 1000, 1),
                     'tokens_per_s': round(tok_s),
                     'mfu_%': round(100 * flops / (datasheet or peaks[dtype]), 1),
                     'warmup_s': round(warmup, 1)})
        print(f"  {name} {dtype} {rows[-1]['trains']}: {rows[-1]['tokens_per_s']:,} tok/s",
              flush=True)
        del model, optimizer
    decode = []
    base = base.to(device).eval()
    prompt = torch.randint(0, base.cfg.vocab_size, (256,)).tolist()
    for way, options in (('eager', {}), ('compiled', {'compile': True})):
        t = time.perf_counter()
        list(base.generate(prompt, 8, temperature=0, **options))  # warm-up (and compilation)
        warmup = time.perf_counter() - t
        t = time.perf_counter()
        tokens = base.generate(prompt, 128, temperature=0, **options)
        first = [next(tokens)]
        first_ms = (time.perf_counter() - t) * 1000
        n = len(first + list(tokens))
        sync(device)
        decode.append({'model': name, 'decode': way, 'prompt': 256, 'new_tokens': n,
                       'tokens_per_s': round(n / (time.perf_counter() - t), 1),
                       'first_token_ms': round(first_ms, 1), 'warmup_s': round(warmup, 1)})
        print(f"  {name} decode {way}: {decode[-1]['tokens_per_s']} tok/s", flush=True)
    return rows, decode


def bench_optim(device, size, steps):
    """ms of one optimizer step alone (random gradients, no forward or backward): what Muon's
    Newton-Schulz iterations add to a training step. They run in the dtype training would pick (bf16
    where it is fast)."""
    name, n_layer, n_head, n_embd, block, _, vocab_size = size
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=block, n_layer=n_layer, n_head=n_head,
                            n_kv_head=n_head, n_embd=n_embd)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    # as train.py: fp32 where training runs in fp32, else bf16 (also under fp16 autocast)
    ns_dtype = torch.float32 if pick_dtype('auto', device_type) == 'float32' else torch.bfloat16
    rows = []
    for kind in ('adamw', 'muon'):
        opt = make_optimizer(model, kind, 1e-4, 0.02, 0.1, (0.9, 0.95), 0.95, device_type, ns_dtype)
        for _ in range(2):
            opt.step()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync(device)
        rows.append({'model': name, 'optimizer': kind,
                     'ns_dtype': str(ns_dtype)[6:] if kind == 'muon' else '-',
                     'ms_per_step': round((time.perf_counter() - t) / steps * 1000, 1)})
    return rows


def bench_decode(device, size, prompt_len=256, new_tokens=256):
    """Greedy generation, batch 1, fp32: the compiled decode step, the eager one and no KV cache at
    all. tokens/s counts from the call to the last token (prefill included); first_token_ms is the
    prefill and the first pick. Each way is warmed up first (the compiled step compiles there:
    warmup_s)."""
    name, n_layer, n_head, n_embd, _, _, vocab_size = size
    torch.manual_seed(0)
    # the context holds prompt + reply, so every way computes the same thing
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=prompt_len + new_tokens,
                            n_layer=n_layer,
                            n_head=n_head, n_kv_head=n_head, n_embd=n_embd)).to(device).eval()
    prompt = torch.randint(0, vocab_size, (prompt_len,)).tolist()
    rows, reference = [], None
    for way, options in (('compiled', dict(compile=True)), ('eager', dict()),
                         ('no cache', dict(use_cache=False))):
        t = time.perf_counter()
        list(model.generate(prompt, 8, temperature=0, **options))  # warm-up (and compilation)
        sync(device)
        warmup = time.perf_counter() - t
        t = time.perf_counter()
        tokens = model.generate(prompt, new_tokens, temperature=0, **options)
        out = [next(tokens)]
        first = time.perf_counter() - t
        out += list(tokens)
        sync(device)
        dt = time.perf_counter() - t
        reference = reference or out
        rows.append({'model': name, 'decode': way, 'prompt': prompt_len, 'new_tokens': len(out),
                     'tokens_per_s': round(len(out) / dt, 1),
                     'first_token_ms': round(first * 1000, 1),
                     'warmup_s': round(warmup, 1), 'same_tokens': out == reference})
    return rows


def sse_stream(port, body):
    """POST a streamed completion to serve.py; (seconds to the first text, seconds to the end,
    tokens generated)."""
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
    t = time.perf_counter()
    body = {**body, 'stream': True, 'stream_options': {'include_usage': True}}
    c.request('POST', '/v1/completions', body=json.dumps(body),
              headers={'Content-Type': 'application/json'})
    r, first, tokens = c.getresponse(), None, 0
    for line in r:
        if not line.startswith(b'data: {'):
            continue
        chunk = json.loads(line[6:])
        if chunk.get('usage'):
            tokens = chunk['usage']['completion_tokens']
        elif chunk['choices'][0]['text'] and first is None:
            first = time.perf_counter() - t
    c.close()
    return first, time.perf_counter() - t, tokens


def bench_serve(argv, new_tokens=128, clients=(1, 4)):
    """Time to the first token and tokens/s: the model called as sample.py calls it (in this
    process), then through serve.py (a process of its own, started after this one's model is gone:
    two torch processes on few cores slow each other), streamed, one client and several at once.
    Greedy completions of a fixed prompt, so every way writes new_tokens."""
    from chat import completion_prompt
    from checkpoint import load_configured
    from tokenizer import load_tokenizer
    cfg = configure(argv)
    tok = load_tokenizer(cfg.tokenizer_path)
    model, _, _ = load_configured(cfg, tok, 'cpu')
    text = 'the garden in november: '
    prompt = completion_prompt(tok, text, model.cfg.block_size, new_tokens)
    body = {'prompt': text, 'max_tokens': new_tokens, 'temperature': 0}
    rows = []
    for _ in range(2):  # the first a warm-up
        t = time.perf_counter()
        steps = model.generate(prompt, new_tokens, temperature=0, stop=(), banned=(),
                               compile=cfg.compile_decode)
        next(steps)
        first = time.perf_counter() - t
        n = 1 + len(list(steps))
        dt = time.perf_counter() - t
    rows.append({'way': 'in process (sample.py)', 'clients': 1, 'first_token_ms':
                 round(first * 1000), 'tokens_per_s_each': round(n / dt, 1),
                 'tokens_per_s_all': round(n / dt, 1)})
    del model
    proc = subprocess.Popen([sys.executable, 'serve.py', *argv, '--port=0'], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(proc.stdout.readline().split('http://127.0.0.1:')[1].split('/')[0])
        sse_stream(port, body)  # warm-up
        for k in clients:
            results = [None] * k

            def one(i, results=results):
                results[i] = sse_stream(port, body)
            t = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t
            rows.append({'way': 'serve.py, streamed', 'clients': k, 'first_token_ms':
                         round(1000 * sum(r[0] for r in results) / k),
                         'tokens_per_s_each': round(sum(r[2] / r[1] for r in results) / k, 1),
                         'tokens_per_s_all': round(sum(r[2] for r in results) / wall, 1)})
    finally:
        proc.terminate()
        proc.wait()
    return rows


def tree_rss(pid):
    """Resident memory of a process and its children, in bytes (Linux /proc)."""
    total = 0
    pids = [pid]
    try:
        children = open(f'/proc/{pid}/task/{pid}/children').read().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in open(f'/proc/{p}/status'):
                if line.startswith('VmRSS:'):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_measured(cmd):
    """Run a command; return (seconds, peak RSS of its process tree, output)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    out = proc.communicate()[0]
    watcher.join()
    if proc.returncode != 0:
        die(f"{' '.join(cmd)} failed:\n{out}")
    return time.perf_counter() - t, peak[0], out


def bench_prepare(corpus, vocab_size):
    if not os.path.isfile(corpus):
        print(f"prepare: skipped, no corpus at {corpus} (set --bench_corpus)")
        return []
    work = tempfile.mkdtemp(prefix='bench_prepare_')
    rows = []
    try:
        half = os.path.join(work, 'half.txt')
        with open(corpus, 'rb') as f, open(half, 'wb') as g:
            data = f.read()
            cut = data.find(b'\n\n\n', len(data) // 2)
            g.write(data[:cut if cut > 0 else len(data) // 2])
        cores = os.cpu_count()
        for label, path in (('full', corpus), ('half', half)):
            cfg = os.path.join(work, 'cfg.py')
            with open(cfg, 'w') as f:
                f.write(f"out_dir = {os.path.join(work, 'out')!r}\nvocab_size = {vocab_size}\n"
                        f"sources = {{'corpus': {{'kind': 'text', 'path': {path!r}, "
                        f"'separator': '\\n\\n\\n'}}}}\n"
                        f"tokenizer_path = {os.path.join(work, 'tokenizer.model')!r}\n")
            if not os.path.exists(os.path.join(work, 'tokenizer.model')):
                run_measured([sys.executable, 'tokenizer.py', cfg])
            # cleaning: dedup and the quality filters (both run in the main process)
            for num_proc, clean in [(n, True) for n in sorted({1, cores})] + [(cores, False)]:
                shutil.rmtree(os.path.join(work, 'out'), ignore_errors=True)
                dt, rss, _ = run_measured([sys.executable, 'prepare.py', cfg,
                                           f'--num_proc={num_proc}', f'--dedup={clean}',
                                           f'--quality_filter={clean}'])
                metas = [load_split(os.path.join(work, 'out', 'data'), 'corpus',
                                    s) for s in ('train', 'val')]
                mb = os.path.getsize(path) / 1e6
                tokens = sum(m['tokens'] for m in metas)
                rows.append({'corpus': label, 'MB': round(mb, 1), 'processes': num_proc,
                             'cleaning': clean, 'seconds': round(dt, 1),
                             'MB_per_s': round(mb / dt, 2), 'tokens_per_s': round(tokens / dt),
                             'peak_rss_MB': round(rss / 1e6)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def write_text(path, mb, seed):
    """`mb` MB of varied lines of words and no blank line: one document, however large (a log, a
    dump)."""
    rng = random.Random(seed)
    words = [w for w in 'the a river stone cloud seven orange quiet bread wheel chain notes learns '
                        'slowly under over'
             ' with from into and but because morning evening water salt seed leaf'.split()]
    line = lambda: ' '.join(rng.choice(words) for _ in range(rng.randint(3, 20))) + '\n'
    lines = [line() for _ in range(16384)]  # ~1.1 MB
    with open(path, 'w') as f:
        for i in range(mb):
            rng.shuffle(lines)
            block = f"block {i}\n" + ''.join(lines)
            f.write(block[:1 << 20])


def bench_bigtext(mb, vocab_size):
    work = tempfile.mkdtemp(prefix='bench_bigtext_')
    rows = []
    try:
        cfg = os.path.join(work, 'cfg.py')
        path = os.path.join(work, 'big.txt')
        with open(cfg, 'w') as f:
            f.write(f"out_dir = {os.path.join(work, 'out')!r}\nvocab_size = {vocab_size}\n"
                    f"sources = {{'big': {{'kind': 'text', 'path': {path!r}}}}}\n"
                    f"tokenizer_path = {os.path.join(work, 'tokenizer.model')!r}\n")
        for size in (mb // 4, mb):
            write_text(path, size, 0)
            if not os.path.exists(os.path.join(work, 'tokenizer.model')):
                run_measured([sys.executable, 'tokenizer.py', cfg])
            shutil.rmtree(os.path.join(work, 'out'), ignore_errors=True)
            dt, rss, _ = run_measured([sys.executable, 'prepare.py', cfg])
            data_dir = os.path.join(work, 'out', 'data')
            metas = [load_split(data_dir, 'big', s) for s in ('train', 'val')]
            rows.append({'MB': size, 'processes': os.cpu_count(),
                         'documents': sum(m['documents'] for m in metas),
                         'seconds': round(dt, 1), 'MB_per_s': round(size / dt, 2),
                         'peak_rss_MB': round(rss / 1e6)})
            print(f"  {size} MB: {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def bench_batches(config_path, rows=32, reps=40):
    """Milliseconds to build one training batch of `rows` packed SFT rows, as train.py's background
    reader does for every micro-step, at block 256 and 1024 (the median and the slowest of `reps`
    successive batches)."""
    c = configure([config_path])
    mixture = {n: w for n, w in c.mixture.items() if w > 0}
    missing = [n for n in mixture if not is_prepared(c.data_dir, n, 'train')]
    if missing:
        print(f"batches: skipped, {', '.join(missing)} of {config_path} not prepared (python "
              f"prepare.py {config_path})")
        return []
    splits = {n: Split(c.data_dir, n, 'train', None) for n in mixture}
    out = []
    for T in (256, 1024):
        packer = Packer(splits, mixture, [0], T)
        packer.batch(0, rows)  # warm-up: the first batch fills the packer's buffer of conversations
        times = []
        for i in range(1, reps + 1):
            t = time.perf_counter()
            packer.batch(i * rows, rows)
            times.append(time.perf_counter() - t)
        times.sort()
        out.append({'sources': '+'.join(mixture), 'block_size': T, 'rows': rows,
                    'median_ms': round(1000 * times[reps // 2], 2),
                    'slowest_ms': round(1000 * times[-1], 2)})
    return out


def reset_peak_memory(device):
    """Start counting peak memory again: the GPU allocator's, or on Linux the process's peak
    resident set (writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_memory(device):
    """Bytes at the peak since reset_peak_memory, or None where the OS does not say."""
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated()
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM'))
    except (OSError, StopIteration):
        return None


def free_memory(device):
    """Bytes the device has free for a larger batch: the GPU's free memory, or the RAM Linux says
    is available (None elsewhere)."""
    if device.startswith('cuda'):
        return torch.cuda.mem_get_info()[0]
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith('MemAvailable'))
    except (OSError, StopIteration):
        return None


def largest_batch(model, optimizer, make_batch, device, dtype, step_cap):
    """The largest micro-batch (a power of two) a training step of this model runs with on this
    device: doubled from 1 until the GPU runs out of memory, the next doubling would not fit in
    the memory left (a CPU's RAM: a step that does not fit is killed, not refused), or a step takes
    step_cap seconds. Eager steps (compiling each size would take minutes). Returns (rows, the
    reason it stopped, peak bytes of that size's step)."""
    rows, found, peak, why = 1, None, None, None
    while True:
        x, y = make_batch(rows)
        reset_peak_memory(device)
        try:
            dt, _ = time_steps(model, optimizer, x, y, device, dtype, False, 1, warmup=1)
        except torch.OutOfMemoryError:
            why = 'memory'
            break
        grew = peak_memory(device) if peak is None else peak_memory(device) - peak
        found, peak = rows, peak_memory(device)
        free = free_memory(device)
        if dt > step_cap:
            why = f'step over {step_cap:g} s'
            break
        # the next size's extra activations ~ this size's growth again, doubled
        if free is not None and grew is not None and 2 * grew > 0.8 * free:
            why = 'memory'
            break
        rows *= 2
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
    return found, why, peak


def bench_sweep(profiles, device, peaks, steps, step_cap):
    """Per profile: its model on this device at the profile's micro-batch (or the largest that
    fits, if smaller), dtype and compile setting (tokens/s, MFU), the largest micro-batch that
    fits, and what 1 and 8 hours of training buy (tokens, and epochs of the profile's prepared
    train data when it is prepared)."""
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    rows = []
    for path in profiles:
        c = configure([path])
        if c.base_model:  # the shape is the base model's: bench.py --bench=pretrained measures it
            print(f"sweep: {path} skipped (a base_model profile: use --bench=pretrained)")
            continue
        dtype = pick_dtype(c.dtype, device_type)
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=c.vocab_size, block_size=c.block_size,
                                n_layer=c.n_layer, n_head=c.n_head,
                                n_kv_head=c.n_kv_head or c.n_head, n_embd=c.n_embd,
                                tie_embeddings=c.tie_embeddings)).to(device)
        optimizer = make_optimizer(model, c.optimizer, 1e-4, 0.02, 0.1, (0.9, 0.95), 0.95,
                                   device_type, torch.float32 if dtype == 'float32'
                                   else torch.bfloat16)
        T = c.block_size
        make_batch = lambda b: (torch.randint(0, c.vocab_size, (b, T), device=device),
                                torch.randint(0, c.vocab_size, (b, T), device=device))
        most, why, peak = largest_batch(model, optimizer, make_batch, device, dtype, step_cap)
        # the profile's micro-batch, or the largest found if it is smaller (a CPU running prod's)
        batch = min(c.batch_size, most)
        dt, _ = time_steps(model, optimizer, *make_batch(batch), device, dtype, c.compile, steps)
        tok_s = batch * T / dt
        flops = model.flops_per_token(T) * tok_s
        mfu = flops / (peak_flops(device_type, dtype) or peaks[dtype])
        mixture = [n for n, w in c.mixture.items() if w > 0]
        prepared = mixture and all(is_prepared(c.data_dir, n, 'train') for n in mixture)
        data_tokens = (sum(Split(c.data_dir, n, 'train', None).tokens for n in mixture)
                       if prepared else None)
        row = {'profile': os.path.basename(path), 'params_M': round(model.num_params()[0] / 1e6, 2),
               'dtype': dtype, 'compile': c.compile, 'block': T, 'batch': batch,
               'tokens_per_s': round(tok_s), 'mfu_%': round(100 * mfu, 1),
               'max_batch': most, 'stopped_by': why,
               'peak_GB': round(peak / 1e9, 2) if peak else None}
        for hours in (1, 8):
            row[f'tokens_{hours}h_M'] = round(tok_s * 3600 * hours / 1e6, 1)
            row[f'epochs_{hours}h'] = (round(tok_s * 3600 * hours / data_tokens, 1)
                                       if data_tokens else None)
        rows.append(row)
        print(f"  {row['profile']}: {row['tokens_per_s']:,} tok/s, MFU {row['mfu_%']}%, largest "
              f"micro-batch {most} ({why})", flush=True)
        del model, optimizer
    return rows


def table(rows, title):
    if not rows:
        return
    cols = list(rows[0])
    fmt = lambda v: f"{v / 1e9:.1f} G" if isinstance(v, float) and v > 1e6 else str(v)
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print('  '.join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print('  '.join(v.rjust(w) for v, w in zip(row, widths)))


def main():
    cfg = configure()
    device = pick_device(cfg.device)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    known = ['matmul', 'train', 'decode', 'optim', 'prepare', 'batches']
    sections = cfg.bench.split(',') if cfg.bench != 'all' else known
    for s in sections:
        if s not in known + ['bigtext', 'pretrained', 'serve', 'sweep']:
            die(f"--bench: unknown section {s!r}; use {', '.join(known)}, bigtext, pretrained, "
                "serve, sweep or all")
    if 'pretrained' in sections and not cfg.base_model:
        die("--bench=pretrained measures a pretrained model: give it with --base_model=... (a "
            "Hugging Face folder, a .gguf file or hf:<owner>/<name>)")
    gpu = torch.cuda.get_device_name() if device_type == 'cuda' else None
    results = {'machine': {'device': device, 'gpu': gpu,
                           'cpu': platform.processor() or platform.machine(),
                           'cores': os.cpu_count(), 'torch': torch.__version__,
                           'threads': torch.get_num_threads()}}
    print(f"bench on {device} ({gpu or results['machine']['cpu']}, {os.cpu_count()} cores, torch "
          f"{torch.__version__})")
    peaks = {}
    if {'matmul', 'train', 'pretrained', 'sweep'} & set(sections):
        n = 8192 if device_type == 'cuda' else 2048
        peaks = {dt: matmul_peak(device, getattr(torch, dt), n) for dt in ('float32', 'bfloat16')}
        results['matmul'] = [{'dtype': dt, 'n': n, 'flops_per_s': v} for dt, v in peaks.items()]
        table(results['matmul'], "matmul peak (measured, FLOP/s)")
    if 'train' in sections:
        rows = []
        for size in SIZES[device_type]:
            for dtype, compiled in (('float32', False), ('bfloat16', False), ('bfloat16', True)):
                r = bench_train(device, size, dtype, compiled, cfg.bench_steps)
                datasheet = peak_flops(device_type, dtype)
                r['mfu_%'] = round(100 * r['flops_per_s'] / (datasheet or peaks[dtype]), 1)
                r['mfu_of'] = 'datasheet' if datasheet else f'measured {dtype} matmul'
                rows.append(r)
                print(f"  {r['model']} {dtype} compile={compiled}: {r['tokens_per_s']:,} tok/s, "
                      f"MFU "
                      f"{r['mfu_%']}%", flush=True)
        results['train'] = rows
        table(rows, "training (random tokens, AdamW step included)")
    if 'decode' in sections:
        results['decode'] = [r for size in SIZES[device_type] for r in bench_decode(device, size)]
        table(results['decode'], "decode, batch 1, greedy, fp32 (tokens_per_s includes the "
                                 "prefill)")
        for size in SIZES[device_type]:
            rate = {r['decode']: r['tokens_per_s'] for r in results['decode']
                    if r['model'] == size[0]}
            print(f"{size[0]}: compiled decode {rate['compiled'] / rate['eager']:.1f}x the eager "
                  f"one; KV cache {rate['eager'] / rate['no cache']:.1f}x no cache")
    if 'pretrained' in sections:
        train, decode = bench_pretrained(cfg, device, peaks)
        results['pretrained'] = {'base_model': cfg.base_model, 'train': train, 'decode': decode}
        table(train, f"{cfg.base_model}: fine-tuning (random tokens, AdamW step included)")
        table(decode, "its decode: batch 1, greedy, fp32 (tokens_per_s includes the prefill)")
    if 'optim' in sections:
        results['optim'] = [r for size in SIZES[device_type]
                            for r in bench_optim(device, size, cfg.bench_steps)]
        table(results['optim'], "one optimizer step alone (random gradients)")
    if 'prepare' in sections:
        results['prepare'] = bench_prepare(cfg.bench_corpus, 8192)
        table(results['prepare'], "prepare.py (tokenizer: 8192-piece BPE)")
    if 'batches' in sections:
        results['batches'] = bench_batches(cfg.bench_sft_config)
        table(results['batches'], "one batch of packed SFT rows (Packer.batch: memmap reads and "
                                  "packing)")
    if 'bigtext' in sections:
        # its ~30 words allow ~600 pieces
        results['bigtext'] = bench_bigtext(cfg.bench_bigtext_mb, 512)
        table(results['bigtext'], "prepare.py on one text file with no separator (peak RSS of the "
                                  "process tree)")
    if 'serve' in sections:
        argv = [a for a in sys.argv[1:] if not a.startswith('--bench')]
        results['serve'] = bench_serve(argv)
        table(results['serve'], "chat replies: time to the first token and tokens/s, in process "
                                "and through serve.py (greedy, 128 tokens; first_token_ms is the "
                                "mean over the clients)")
    if 'sweep' in sections:
        results['sweep'] = bench_sweep(cfg.bench_profiles, device, peaks, cfg.bench_steps,
                                       cfg.bench_step_cap)
        table(results['sweep'], f"each profile's model on {device}: its micro-batch (tokens/s, "
                                "MFU), the largest that fits, and what 1 and 8 hours buy")
    if cfg.bench_json:
        with open(cfg.bench_json, 'w') as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {cfg.bench_json}")


if __name__ == '__main__':
    main()
