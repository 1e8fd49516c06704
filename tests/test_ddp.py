"""DDP through torchrun on CPU (gloo; pinned to the CPU so a one-GPU machine runs them too): two processes must train exactly what one process trains with the
same global batch, since each rank draws the micro-batches that one process would draw at its place."""
import glob
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, metrics, run, tiny_train_config


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, prepared, optimizer):
    # with Muon too: every rank orthogonalises the same all-reduced gradients, so all take the same step
    common = dict(device='cpu', max_iters=8, eval_interval=4, gradient_accumulation_steps=4, log_interval=1,
                  optimizer=optimizer)
    one = tiny_train_config(tmp_path / 'one.py', prepared, tmp_path / 'one', **common)
    run('train.py', one, check=True)
    two = tiny_train_config(tmp_path / 'two.py', prepared, tmp_path / 'two', **common)
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', two], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stdout + p.stderr
    assert '2 process(es)' in p.stdout and p.stdout.count('step 8 |') == 1  # rank 0 alone logs
    assert len(glob.glob(str(tmp_path / 'two' / 'runs' / '*'))) == 1  # and writes one run folder
    a, b = metrics(str(tmp_path / 'one')), metrics(str(tmp_path / 'two'))
    losses = lambda rows: [r['loss'] for r in rows if 'loss' in r]
    vals = lambda rows: [r['val_loss'] for r in rows if 'val_loss' in r]
    assert len(losses(a)) == len(losses(b)) == 8
    assert losses(a) == pytest.approx(losses(b), rel=1e-5) and vals(a) == pytest.approx(vals(b), rel=1e-5)
    wa = torch.load(tmp_path / 'one' / 'pretrain' / 'ckpt.pt', weights_only=True)
    wb = torch.load(tmp_path / 'two' / 'pretrain' / 'ckpt.pt', weights_only=True)
    for k in wa['model']:
        torch.testing.assert_close(wa['model'][k], wb['model'][k], atol=1e-5, rtol=1e-4)
    assert len(wb['rng']) == 2  # every rank's RNG state is saved


def test_accumulation_must_divide_among_processes(tmp_path, prepared):
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c', gradient_accumulation_steps=3, max_iters=2,
                            device='cpu')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', cfg], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and 'gradient_accumulation_steps=3 must be a multiple' in p.stdout + p.stderr


def test_two_processes_weigh_micro_batches_by_their_targets_counted_over_both(tmp_path, prepared):
    """SFT micro-batches with uneven target counts on two processes: the step's loss is divided by the target
    count all-reduced over both, so the gradient is the one of a single batch of all the rows."""
    from conftest import uneven_chat_config
    one = uneven_chat_config(tmp_path / 'one.py', prepared, tmp_path / 'one', batch_size=8, gradient_accumulation_steps=1,
                             device='cpu')
    run('prepare.py', one, check=True)
    run('train.py', one, check=True)
    two = uneven_chat_config(tmp_path / 'two.py', prepared, tmp_path / 'two', batch_size=2, gradient_accumulation_steps=4,
                             device='cpu', data_dir=str(tmp_path / 'one' / 'data'))
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', two], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stdout + p.stderr
    moments = lambda out: [s['exp_avg'] for _, s in sorted(torch.load(out / 'sft' / 'ckpt.pt', weights_only=True)
                                                              ['optimizer']['state'].items())]
    for a, b in zip(moments(tmp_path / 'one'), moments(tmp_path / 'two')):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_two_processes_with_a_time_budget_stop_together(tmp_path, prepared):
    """max_minutes under DDP: every process takes the slowest one's clock, so they pick the same
    learning rate and stop at the same step (a process that stopped alone would leave the other
    waiting in an all-reduce: the run would hang)."""
    cfg = tiny_train_config(tmp_path / 'b.py', prepared, tmp_path / 'b', device='cpu', max_minutes=0.07,
                            eval_interval=1000, gradient_accumulation_steps=2, log_interval=1)
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', cfg], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count('time budget of 4s spent:') == 1
    steps = [r for r in metrics(str(tmp_path / 'b')) if 'loss' in r]
    ckpt = torch.load(tmp_path / 'b' / 'pretrain' / 'ckpt.pt', weights_only=True)
    assert len(steps) == ckpt['iter'] > 3 and steps[-1]['lr'] < steps[2]['lr']
