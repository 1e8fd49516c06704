"""Runs that survive: SIGKILL at any moment then resume gives bit-identical weights, corrupt checkpoints
fall back to older ones, Ctrl-C saves, non-finite losses are skipped then stop, bad output folders fail
at start."""
import collections
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run, tiny_train_config
import learner
import train


def final_state(out):
    ckpt = torch.load(os.path.join(out, 'pretrain', 'ckpt.pt'), weights_only=True)
    return ckpt


def assert_identical(a, b):
    assert a['iter'] == b['iter']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert len(a['optimizer']['state']) == len(b['optimizer']['state'])
    for i, (sa, sb) in enumerate(zip(a['optimizer']['state'].values(), b['optimizer']['state'].values())):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), (i, k)


def start(cfg, *args):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    return subprocess.Popen([sys.executable, 'train.py', cfg, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_step(proc, step):
    """Read the run's output until its log line for `step`."""
    for line in proc.stdout:
        if line.startswith(f'step {step} |'):
            return
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()}")


COMMON = dict(max_iters=24, lr_decay_iters=24, eval_interval=4, eval_iters=1, dropout=0.1, keep_checkpoints=2,
              log_interval=1)


MUON = dict(optimizer='muon', muon_lr=0.02, lr_schedule='wsd')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, prepared):
    """reference(**keys) -> the final ckpt.pt of an uninterrupted COMMON run with those keys (run
    once per set of keys in this module: several tests compare against the same run)."""
    done = {}

    def final(**keys):
        name = repr(sorted(keys.items()))
        if name not in done:
            root = tmp_path_factory.mktemp('reference')
            cfg = tiny_train_config(root / 'ref.py', prepared, root / 'ref', **COMMON, **keys)
            run('train.py', cfg, check=True)
            done[name] = final_state(root / 'ref')
        return done[name]
    return final


@pytest.mark.parametrize('dtype, extra', [('float32', {}), ('bfloat16', {}), ('bfloat16', MUON)],
                         ids=['float32', 'bfloat16', 'muon-bfloat16'])
def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path, prepared, reference, dtype,
                                                               extra):
    want = reference(dtype=dtype, **extra)
    rng = random.Random(dtype + str(extra))
    for trial in range(2):
        out = tmp_path / f'killed{trial}'
        cfg = tiny_train_config(tmp_path / f'killed{trial}.py', prepared, out, dtype=dtype, **COMMON, **extra)
        proc = start(cfg)
        wait_for_step(proc, rng.randint(2, 22))
        time.sleep(rng.random() * 0.03)  # anywhere in the next step, its evaluation or its checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumable = any((out / 'pretrain' / f).exists() for f in ('ckpt.pt', 'ckpt.1.pt', 'ckpt.2.pt'))
        p = run('train.py', cfg, f"--init_from={'resume' if resumable else 'scratch'}", check=True)
        assert_identical(final_state(out), want)
        assert ('resuming from' in p.stdout) == resumable


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, prepared, reference):
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c', **COMMON)
    run('train.py', cfg, '--max_iters=12', check=True)  # checkpoints at 4, 8, 12: ckpt.pt=12, .1=8, .2=4
    latest = tmp_path / 'c' / 'pretrain' / 'ckpt.pt'
    latest.write_bytes(latest.read_bytes()[:len(latest.read_bytes()) // 3])  # as if cut off mid-write
    p = run('train.py', cfg, '--init_from=resume', check=True)
    assert 'truncated or corrupt' in p.stderr and 'resuming from' in p.stdout and 'ckpt.1.pt at step 8' in p.stdout
    assert_identical(final_state(tmp_path / 'c'), reference(dtype='float32'))
    assert final_state(tmp_path / 'c')['best_val'] == reference(dtype='float32')['best_val']
    for name in ('ckpt.pt', 'ckpt.1.pt', 'ckpt.2.pt'):  # every file is readable, the corrupt one replaced
        torch.load(tmp_path / 'c' / 'pretrain' / name, weights_only=True)


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['ctrl-c', 'sigterm'])
def test_ctrl_c_saves_and_exits_cleanly_and_the_run_resumes(tmp_path, prepared, reference, sig):
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c', **COMMON)
    proc = start(cfg)
    wait_for_step(proc, 6)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and 'interrupted' in err and '(interrupted)' in out
    stopped = final_state(tmp_path / 'c')['iter']
    assert 6 <= stopped < 24
    run('train.py', cfg, '--init_from=resume', check=True)
    assert_identical(final_state(tmp_path / 'c'), reference(dtype='float32'))


def test_a_second_ctrl_c_exits_at_once_and_leaves_checkpoints_intact(tmp_path, prepared):
    # a model slow enough (~0.3 s a step) that the second Ctrl-C lands while the first is being honoured
    # (on the CPU: on a GPU a step is so fast that the run may already be shutting down when the second one lands)
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c', n_layer=2, n_embd=256, block_size=128,
                            batch_size=32, max_iters=1000, eval_interval=2, eval_iters=1, log_interval=1, device='cpu')
    proc = start(cfg)
    wait_for_step(proc, 3)
    before = (tmp_path / 'c' / 'pretrain' / 'ckpt.pt').read_bytes()
    proc.send_signal(signal.SIGINT)
    # the second one once the first has been taken (two signals before the handler runs would count as one), and
    # while that step and its save still run (~0.3 s and more; a fixed sleep could let both finish first)
    first = ''
    for line in proc.stderr:
        first += line
        if line.startswith('interrupted: saving'):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = first + err
    assert proc.returncode == 130 and 'interrupted again' in err and 'Traceback' not in err, (proc.returncode, err)
    after = tmp_path / 'c' / 'pretrain' / 'ckpt.pt'
    assert after.read_bytes() == before or torch.load(after, weights_only=True)['iter'] >= 3
    assert not any(f.endswith('.tmp') for f in os.listdir(tmp_path / 'c' / 'pretrain'))


def test_non_finite_losses_are_skipped_then_stop_the_run_with_the_last_checkpoint_intact(tmp_path, prepared):
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c', max_iters=4, eval_interval=2, eval_iters=1,
                            warmup_iters=0, grad_clip=0.0, max_nonfinite=3)
    run('train.py', cfg, check=True)
    good = (tmp_path / 'c' / 'pretrain' / 'ckpt.pt').read_bytes()
    # resume with a learning rate that makes the weights overflow within a step or two
    p = run('train.py', cfg, '--init_from=resume', '--max_iters=40', '--learning_rate=1e30', '--min_lr=1e30')
    assert p.returncode != 0 and 'non-finite losses in a row' in p.stderr and 'last good checkpoint' in p.stderr
    assert 'step skipped' in p.stdout and 'Traceback' not in p.stderr
    assert (tmp_path / 'c' / 'pretrain' / 'ckpt.pt').read_bytes() == good


def test_unwritable_output_folder_fails_at_start(tmp_path, prepared):
    (tmp_path / 'a_file').write_text('not a folder')
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'a_file' / 'out')
    p = run('train.py', cfg)
    assert p.returncode != 0 and 'cannot write to' in p.stderr and 'a_file' in p.stderr and 'out_dir' in p.stderr


def test_too_little_disk_fails_at_start(tmp_path, prepared, monkeypatch):
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c')
    Usage = collections.namedtuple('Usage', 'total used free')
    full = Usage(10 ** 6, 10 ** 6 - 100, 100)
    monkeypatch.setattr(learner.shutil, 'disk_usage', lambda path: full)
    monkeypatch.setattr(sys, 'argv', ['train.py', cfg])
    with pytest.raises(SystemExit) as e:
        train.main()
    assert 'GB free' in str(e.value) and 'out_dir' in str(e.value)
    assert not (tmp_path / 'c' / 'pretrain' / 'ckpt.pt').exists()
