"""
What every stage shares: a clear error (die), atomic writes, progress lines, file hashes, and where
the model runs (the device and dtype keys, and the GPU peaks that MFU is measured against).

    die("config key x: what is wrong and what to do")  # exit status 1, no traceback
    with atomic_file(path) as f: ...                   # temp file, fsync, rename: never half-done
    device, device_type, dtype, autocast = runtime(cfg.device, cfg.dtype)

Library code: it imports nothing of this project. torch is imported only inside the functions that
need it, so the stages that never run a model (tokenizer.py, prepare.py, plot.py) start ~2 s sooner.
"""
import atexit
import contextlib
import difflib
import hashlib
import json
import os
import socket
import sys
import time
from contextlib import nullcontext


# ----------------------------------------------------------------------------------------------
# Errors, files, progress

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


def check_writable(folder, key):
    """Make `folder` and write a little to it, or stop naming the key to change: an unwritable or
    full disk is found before the work, not after it."""
    test = os.path.join(folder, f'.write_test{os.getpid()}')
    try:
        os.makedirs(folder, exist_ok=True)
        with open(test, 'wb') as f:
            f.write(b'\0' * 4096)  # (a block: enough to find a full disk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        die(f"cannot write to {folder} ({e.strerror}): set {key} to a folder on a disk you can "
            "write to, with free space")
    finally:
        if os.path.exists(test):
            os.remove(test)


def hold_lock(folder, name, what):
    """One process at a time in `folder`: take folder/name (the process's pid and host), or stop
    naming the process that holds it. A lock whose process is gone (killed, the machine restarted)
    is taken over. Released when this process exits, errors and Ctrl-C included."""
    path = os.path.join(folder, name)
    me = {'pid': os.getpid(), 'host': socket.gethostname()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.load(open(path))
                pid, host = int(holder['pid']), str(holder['host'])
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = None, me['host']  # (unreadable: a process that died writing it)
            if host != me['host']:
                die(f"{path}: {what} is in use by pid {pid} on {host}. One run at a time: wait for "
                    f"it, or if it has ended, delete {path}")
            if pid is not None and pid_alive(pid):
                die(f"{path}: {what} is in use by pid {pid} (still running). One run at a time: "
                    "wait for it or stop it, or use another out_dir or phase")
            print(f"note: {path} was left by pid {pid}, which is no longer running: taking it "
                  "over", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f)
        break

    def release():
        with contextlib.suppress(OSError, ValueError):
            if json.load(open(path)) == me:  # (never another run's, after a takeover)
                os.remove(path)
    atexit.register(release)
    return path


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def unused_keys(cfg, names, why):
    """Say which of these keys, given on the command line, this run cannot honour (`why`), rather
    than ignore them. (A config file often sets keys for other stages or phases: not warned.)"""
    given = [f"--{n}" for n in names if cfg.set_by.get(n, '').startswith('--')]
    if given:
        print(f"warning: {', '.join(given)} {'is' if len(given) == 1 else 'are'} ignored: {why}",
              file=sys.stderr)


def duration(seconds):
    """12s, 3m05s, 2h07m: elapsed times and ETAs in progress lines (Progress, train.py's log)."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """The progress line of a long job (prepare, download, eval, train): done/total, rate and ETA,
    printed at most every `every` seconds. Counts are in `unit`s of `scale` (unit='MB', scale=1e6
    for bytes)."""

    def __init__(self, label, total=None, unit='', scale=1, every=2.0):
        self.label, self.total, self.unit, self.scale, self.every = label, total, unit, scale, every
        self.t0 = self.last = time.time()

    def due(self):
        """Is it time for a line? (cheap: call it as often as you like)"""
        if time.time() - self.last <= self.every:
            return False
        self.last = time.time()
        return True

    def line(self, done, start=0, extra=''):
        """'12.0/40.0 MB, 3.10 MB/s, ETA 9s': `done` counts from the job's start, `start` of it was
        done before this process began (a resumed download, a resumed run) and does not count toward
        the rate."""
        rate = (done - start) / max(time.time() - self.t0, 1e-9)
        fmt = (lambda n: f"{n / self.scale:,.1f}") if self.scale != 1 else (lambda n: f"{n:,}")
        of = f"/{fmt(self.total)}" if self.total else ''
        eta = f", ETA {duration(max(0, self.total - done) / max(rate, 1e-9))}" if self.total else ''
        unit = f" {self.unit}" if self.unit else ''
        per = f"{rate / self.scale:.2f}" if self.scale != 1 else f"{rate:.1f}"
        return f"{fmt(done)}{of}{unit}{extra}, {per} {self.unit or 'items'}/s{eta}"

    def __call__(self, done, start=0, extra=''):
        if self.due():
            print(f"  {self.label}: {self.line(done, start, extra)}", flush=True)


def file_sha256(path):
    """sha256 of a file, read a MB at a time: recorded wherever shards or checkpoints depend on a
    file."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def suggest(name, known):
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ----------------------------------------------------------------------------------------------
# Where the model runs: the device and dtype keys (every stage that runs the model)

def pick_device(name):
    """'auto' -> the best device here; a named one is checked, so a missing GPU is a message, not a
    traceback."""
    import torch
    if name != 'auto':
        try:
            device = torch.device(name)
        except RuntimeError:
            die(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:<n> or mps")
        if device.type == 'cuda' and not torch.cuda.is_available():
            die(f"device={name!r} but this machine has no CUDA GPU that torch can use: set "
                "--device=cpu (or auto)")
        gpus = torch.cuda.device_count()
        if device.type == 'cuda' and device.index is not None and device.index >= gpus:
            die(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                f"use "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        if device.type == 'mps' and not (getattr(torch.backends, 'mps',
                                                 None) and torch.backends.mps.is_available()):
            die(f"device={name!r} but MPS (Apple GPU) is not available here: set --device=cpu (or "
                "auto)")
        if device.type not in ('cpu', 'cuda', 'mps'):
            die(f"device={name!r}: this code runs on cpu, cuda or mps")
        return name
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def pick_dtype(name, device_type):
    import torch
    if name == 'auto':
        if device_type == 'cuda':
            return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        # CPUs with AMX or AVX512-BF16 run bf16 matmuls several times faster than fp32; others
        # slower
        return 'bfloat16' if device_type == 'cpu' and cpu_has_fast_bf16() else 'float32'
    if name not in ('float32', 'bfloat16', 'float16'):
        die(f"dtype must be float32, bfloat16, float16 or auto, got {name!r}")
    if name == 'float16' and device_type != 'cuda':
        die("dtype='float16' needs a CUDA GPU (it trains with a GradScaler); use bfloat16 or "
            "float32 here")
    return name


def cpu_has_fast_bf16():
    try:
        flags = open('/proc/cpuinfo').read()
    except OSError:  # not Linux: stay with float32
        return False
    return 'amx_bf16' in flags or 'avx512_bf16' in flags


def runtime(device_name, dtype_name):
    """(device, device type, dtype name, autocast context) for the config's device and dtype
    keys."""
    import torch
    device = pick_device(device_name)
    device_type = device.split(':')[0]  # 'cuda:1' -> 'cuda'
    dtype = pick_dtype(dtype_name, device_type)
    autocast = (nullcontext() if dtype == 'float32'
                else torch.autocast(device_type, dtype=getattr(torch, dtype)))
    return device, device_type, dtype, autocast


# For MFU (model FLOPs utilisation: flops_per_token x tokens/s / peak). Datasheet dense (no
# sparsity) bf16/fp16 tensor-core peaks, by the exact name torch.cuda.get_device_name() gives:
# variants of one chip differ (an H100 PCIe does 756 TFLOP/s, the SXM one 989), and a substring
# would match the wrong card ('L4' is in 'L40S'). A card not listed gets no MFU, only FLOP/s: add it
# here.
PEAK_FLOPS = {
    'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100 PCIe': 756e12, 'NVIDIA H100 NVL': 835e12,
    'NVIDIA H200': 989e12, 'NVIDIA H200 NVL': 835e12,
    'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA A100-SXM4-40GB': 312e12,
              'NVIDIA A100-PCIE-40GB': 312e12,
    'NVIDIA A100 80GB PCIe': 312e12,
    'NVIDIA L4': 121e12, 'NVIDIA L40S': 362e12, 'NVIDIA A10': 125e12,
              'NVIDIA GeForce RTX 4090': 165e12,
}


def peak_flops(device_type, dtype):
    """Datasheet dense bf16/fp16 peak of the GPU, for MFU; None where unknown (CPU: we print
    FLOP/s)."""
    import torch
    if device_type != 'cuda' or dtype == 'float32':
        return None
    return PEAK_FLOPS.get(torch.cuda.get_device_name().strip())
