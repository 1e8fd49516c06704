import json
import os
import sys
import time

import numpy as np
import pytest
import torch

from conftest import load_cfg, metrics, run, tiny_train_config

import checkpoint
import data
import learner
import train
from checkpoint import load_model, save_checkpoint
from common import peak_flops
from tokenizer import Tokenizer, render_conversation


def tiny_config(tmp_path, prepared, name='cfg', **extra):
    return tiny_train_config(tmp_path / f'{name}.py', prepared, tmp_path / name, **extra)


def test_training_writes_checkpoints_config_and_metrics(tmp_path, prepared):
    cfg = tiny_config(tmp_path, prepared, run_id='r1')
    p = run('train.py', cfg, check=True)
    out = tmp_path / 'cfg'
    assert 'parameters' in p.stdout and 'non-embedding' in p.stdout and 'GFLOP/s' in p.stdout
    assert (out / 'pretrain' / 'ckpt.pt').exists() and (out / 'pretrain' / 'best.pt').exists()
    config = json.loads((out / 'runs' / 'r1' / 'config.json').read_text())
    assert config['max_iters'] == 6 and config['mixture'] == {'roam': 0.5, 'story': 0.3, 'primer': 0.2}
    rows = metrics(str(out))
    steps = [r for r in rows if 'loss' in r]
    assert [r['iter'] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(k in steps[0] for k in ('loss', 'lr', 'tokens_per_sec', 'flops_per_sec'))
    evals = [r for r in rows if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 3, 6] and set(evals[0]['val']) == {'roam', 'story', 'primer'}
    ckpt = torch.load(out / 'pretrain' / 'ckpt.pt', weights_only=True)
    assert ckpt['iter'] == 6 and not any(k.startswith('_orig_mod') for k in ckpt['model'])
    assert ckpt['tokenizer_sha256'] == Tokenizer(load_cfg(cfg).tokenizer_path).sha256


def test_checkpoint_round_trips_exactly(tmp_path):
    state = {'model': {'w': torch.randn(3, 4), 'b': torch.randn(4).bfloat16()}, 'iter': 3, 'model_args': {},
             'rng': [checkpoint.rng_state()]}
    save_checkpoint(state, str(tmp_path), 'ckpt.pt', keep=2)
    loaded = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert all(torch.equal(loaded['model'][k], v) for k, v in state['model'].items())
    assert torch.equal(loaded['rng'][0]['torch'], state['rng'][0]['torch'])
    for i in range(4):  # older versions are kept, the oldest dropped
        state['iter'] = 10 + i
        save_checkpoint(state, str(tmp_path), 'ckpt.pt', keep=2)
    kept = sorted(f for f in os.listdir(tmp_path))
    assert kept == ['ckpt.1.pt', 'ckpt.2.pt', 'ckpt.pt']
    assert [torch.load(tmp_path / f, weights_only=True)['iter'] for f in kept] == [12, 11, 13]


@pytest.mark.parametrize('order', ['random', 'epochs'])
def test_resume_continues_at_the_saved_step_with_the_same_result(tmp_path, prepared, order):
    common = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, data_order=order)
    whole = tiny_config(tmp_path, prepared, 'whole', **common)
    run('train.py', whole, check=True)
    parts = tiny_config(tmp_path, prepared, 'parts', **common)
    run('train.py', parts, '--max_iters=4', check=True)
    p = run('train.py', parts, '--init_from=resume', check=True)
    assert 'resuming from' in p.stdout and 'at step 4' in p.stdout
    assert [r['iter'] for r in metrics(str(tmp_path / 'parts')) if 'loss' in r] == [1, 2, 3, 4, 5, 6, 7, 8]
    a = torch.load(tmp_path / 'whole' / 'pretrain' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'parts' / 'pretrain' / 'ckpt.pt', weights_only=True)
    assert a['iter'] == b['iter'] == 8
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


@pytest.mark.parametrize('extra', [{'dtype': 'bfloat16'}, {'compile': True}], ids=['bf16', 'compile'])
def test_bf16_autocast_and_compile_train_on_cpu(tmp_path, prepared, extra):
    cfg = tiny_config(tmp_path, prepared, max_iters=2, eval_interval=2, **extra)
    p = run('train.py', cfg, check=True)
    losses = [r['loss'] for r in metrics(str(tmp_path / 'cfg')) if 'loss' in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert ('bfloat16' in p.stdout) if 'dtype' in extra else ('compiling' in p.stdout)


def test_sft_init_from_a_pretrained_checkpoint(tmp_path, prepared):
    pre = tiny_config(tmp_path, prepared, 'pre', max_iters=3, eval_interval=3)
    run('train.py', pre, check=True)
    sft = tiny_config(tmp_path, prepared, 'sft', max_iters=3, eval_interval=3, phase='sft', mixture={'primer': 1.0},
                      init_from=str(tmp_path / 'pre' / 'pretrain' / 'ckpt.pt'))
    p = run('train.py', sft, check=True)
    assert 'SFT (masked loss' in p.stdout and 'fresh optimizer' in p.stdout
    assert (tmp_path / 'sft' / 'sft' / 'ckpt.pt').exists()


# ---- bad input ----

def train_error(tmp_path, prepared, *args, **extra):
    cfg = tiny_config(tmp_path, prepared, 'bad', **extra)
    p = run('train.py', cfg, *args)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stdout + p.stderr
    return p.stderr


def test_mixture_source_not_in_sources(tmp_path, prepared):
    err = train_error(tmp_path, prepared, mixture={'wikitext': 1.0})
    assert "'wikitext'" in err and 'prepare.py' in err


def test_mixture_source_not_prepared(tmp_path, prepared):
    err = train_error(tmp_path, prepared, data_dir=str(tmp_path / 'empty'))
    assert 'no prepared data' in err and 'prepare.py' in err


@pytest.mark.parametrize('weights', [{'roam': -1.0, 'story': 1.0}, {'roam': 'a lot'}, {'roam': 0.0}, {}])
def test_bad_mixture_weights(tmp_path, prepared, weights):
    err = train_error(tmp_path, prepared, mixture=weights)
    assert 'mixture' in err


def test_checkpoint_from_another_tokenizer_or_shape(tmp_path, prepared):
    pre = tiny_config(tmp_path, prepared, 'pre', max_iters=1, eval_interval=1)
    run('train.py', pre, check=True)
    ckpt = str(tmp_path / 'pre' / 'pretrain' / 'ckpt.pt')
    err = train_error(tmp_path, prepared, init_from=ckpt, n_embd=64)
    assert 'n_embd=32' in err and ckpt in err
    err = train_error(tmp_path, prepared, init_from=ckpt, block_size=64)
    assert 'block_size' in err and '32' in err
    state = torch.load(ckpt, weights_only=True)
    state['tokenizer_sha256'] = 'f' * 64
    torch.save(state, tmp_path / 'other.pt')
    err = train_error(tmp_path, prepared, init_from=str(tmp_path / 'other.pt'))
    assert 'another tokenizer' in err
    err = train_error(tmp_path, prepared, init_from=str(tmp_path / 'nope.pt'))
    assert 'nope.pt' in err


def test_resume_without_a_checkpoint(tmp_path, prepared):
    err = train_error(tmp_path, prepared, init_from='resume')
    assert 'no readable checkpoint' in err and "init_from='scratch'" in err


def test_float16_on_cpu_says_what_to_use(tmp_path, prepared):
    err = train_error(tmp_path, prepared, dtype='float16', device='cpu')
    assert 'float16' in err and 'bfloat16' in err


# ---- SFT ----


def test_sft_overfit_answers_its_prompts_with_the_trained_replies(sft_trained):
    from conftest import SFT_CONVERSATIONS, SFT_SYSTEM
    cfg_path, out = sft_trained
    cfg = load_cfg(cfg_path)
    tok = Tokenizer(cfg.tokenizer_path)
    model, _ = load_model(os.path.join(out, 'sft', 'ckpt.pt'), 'cpu', tok.sha256)
    for exchanges in SFT_CONVERSATIONS:
        messages = [{'role': 'system', 'content': SFT_SYSTEM}]
        for q, a in exchanges:
            messages.append({'role': 'user', 'content': q})
            prompt = render_conversation(tok, messages)[0] + [tok.asst_id]
            reply = list(model.generate(prompt, 40, temperature=0, stop={tok.eot_id}))
            assert reply[-1] == tok.eot_id and tok.decode(reply[:-1]) == a
            messages.append({'role': 'assistant', 'content': a})


# ---- the optimizer step ----

def first_moments(out):
    """AdamW's exp_avg after the first step: (1 - beta1) x the gradient."""
    state = torch.load(os.path.join(out, 'sft', 'ckpt.pt'), weights_only=True)['optimizer']['state']
    return [state[i]['exp_avg'] for i in sorted(state)]


def test_accumulated_micro_batches_give_the_gradient_of_one_batch_of_all_rows(tmp_path, prepared):
    """The step's loss is summed target nats / the step's target count: 4 micro-batches of 2 rows with uneven
    numbers of targets must give the gradient of one micro-batch of the same 8 rows."""
    from conftest import uneven_chat_config
    one = uneven_chat_config(tmp_path / 'one.py', prepared, tmp_path / 'one', batch_size=8, gradient_accumulation_steps=1)
    run('prepare.py', one, check=True)
    four = uneven_chat_config(tmp_path / 'four.py', prepared, tmp_path / 'four', batch_size=2, gradient_accumulation_steps=4,
                              data_dir=str(tmp_path / 'one' / 'data'))
    cfg = load_cfg(one)
    split = data.Split(cfg.data_dir, 'uneven', 'train', None)
    packer = data.Packer({'uneven': split}, {'uneven': 1.0}, [cfg.seed], cfg.block_size)
    counts = [int((packer.batch(2 * m, 2)[1] != -1).sum()) for m in range(4)]
    assert max(counts) > 2 * min(counts), counts  # deliberately uneven: averaging micro-batch means would be wrong
    run('train.py', one, check=True)
    run('train.py', four, check=True)
    for a, b in zip(first_moments(tmp_path / 'one'), first_moments(tmp_path / 'four')):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_a_non_finite_gradient_skips_its_step(tmp_path, prepared, monkeypatch, capsys):
    """A finite loss whose gradient is inf/nan (here forced on the third step) must not reach the weights."""
    cfg = tiny_config(tmp_path, prepared, max_iters=6, eval_interval=3, grad_clip=1.0)

    class Poisoned(learner.GPT):
        steps = 0

        def forward(self, idx, targets=None, doc_ids=None, cache=None):
            logits, loss = super().forward(idx, targets, doc_ids, cache)
            if self.training and targets is not None:
                Poisoned.steps += 1
                if Poisoned.steps == 3:
                    logits.register_hook(lambda g: g * float('inf'))
            return logits, loss

    monkeypatch.setattr(learner, 'GPT', Poisoned)  # (the model build_model makes)
    monkeypatch.setattr(sys, 'argv', ['train.py', cfg])
    train.main()
    out = capsys.readouterr().out
    assert 'step 2: non-finite gradient norm, step skipped (1 in a row)' in out
    ckpt = torch.load(tmp_path / 'cfg' / 'pretrain' / 'ckpt.pt', weights_only=True)
    assert ckpt['iter'] == 6 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    rows = [r for r in metrics(str(tmp_path / 'cfg')) if 'loss' in r]
    assert rows[-1]['nonfinite'] == 1 and all(np.isfinite(r['loss']) for r in rows)


def test_evaluation_time_is_not_in_ms_per_step(tmp_path, prepared, monkeypatch):
    cfg = tiny_config(tmp_path, prepared, max_iters=4, eval_interval=2, eval_iters=1, log_interval=1)
    real = data.window_batch

    def slow_eval(splits, weights, rng, B, T):
        if len(splits) == 1:  # an evaluation batch (one source each); a training one draws from three
            time.sleep(0.5)
        return real(splits, weights, rng, B, T)

    monkeypatch.setattr(data, 'window_batch', slow_eval)
    monkeypatch.setattr(sys, 'argv', ['train.py', cfg])
    train.main()
    ms = [r['ms'] for r in metrics(str(tmp_path / 'cfg')) if 'ms' in r]
    assert len(ms) == 4 and max(ms) < 500, ms  # each evaluation takes 1.5 s


@pytest.mark.parametrize('name, peak', [('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
                                        ('NVIDIA H100 NVL', 835e12), ('NVIDIA L4', 121e12), ('NVIDIA L40S', 362e12),
                                        ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA RTX 6000 Ada Generation', None)])
def test_mfu_peaks_match_exact_device_names(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: name)
    assert peak_flops('cuda', 'bfloat16') == peak
    assert peak_flops('cuda', 'float32') is None and peak_flops('cpu', 'bfloat16') is None


# ---- mixtures ----

def test_best_pt_is_chosen_on_the_largest_source_and_epochs_are_printed(tmp_path, prepared):
    cfg = tiny_config(tmp_path, prepared, run_id='r')
    p = run('train.py', cfg, check=True)
    c = load_cfg(cfg)
    sizes = {n: data.Split(c.data_dir, n, 'train', None).tokens for n in c.mixture}
    largest = max(sizes, key=sizes.get)
    evals = [r for r in metrics(str(tmp_path / 'cfg')) if 'val_loss' in r]
    assert all(r['val_loss'] == r['val'][largest] for r in evals)
    best = torch.load(tmp_path / 'cfg' / 'pretrain' / 'best.pt', weights_only=True)
    assert best['best_val'] == min(r['val'][largest] for r in evals)
    # expected epochs: steps x tokens per step x the source's share / its train tokens
    line = next(l for l in p.stdout.splitlines() if l.startswith('expected epochs per source'))
    for n, w in c.mixture.items():
        want = c.max_iters * c.batch_size * c.block_size * w / sum(c.mixture.values()) / sizes[n]
        assert f"{n} {want:.2f}" in line
    assert 'warning' not in p.stderr


def test_best_on_and_a_warning_for_sources_repeated_too_often(tmp_path, prepared):
    cfg = tiny_config(tmp_path, prepared, best_on=['primer', 'story'], max_epochs=2, max_iters=200, eval_interval=100)
    p = run('train.py', cfg, check=True)
    evals = [r for r in metrics(str(tmp_path / 'cfg')) if 'val_loss' in r]
    want = lambda r: (r['val']['primer'] * 0.2 + r['val']['story'] * 0.3) / 0.5  # weighted as in the mixture
    assert all(r['val_loss'] == pytest.approx(want(r)) for r in evals)
    line = next(l for l in p.stdout.splitlines() if l.startswith('expected epochs per source'))
    epochs = dict(part.split() for part in line.split(': ', 1)[1].split(', '))
    assert float(epochs['primer']) > 2  # the smallest source
    for n, e in epochs.items():
        assert (f"warning: this run would repeat '{n}'" in p.stderr) == (float(e) > 2)
    err = train_error(tmp_path, prepared, best_on=['wikitext'])
    assert "best_on names 'wikitext'" in err


def test_read_ahead_yields_every_step_in_order_and_reads_the_next_one_while_the_caller_works():
    import threading
    started, reading_seven = [], threading.Event()

    def read(step):
        started.append(step)
        if step == 7:
            reading_seven.set()
        return [step * 10]
    steps = train.read_ahead(read, 5)
    assert next(steps) == [50] and next(steps) == [60]
    assert reading_seven.wait(timeout=10)  # step 7 is being read before the caller asks for it
    assert next(steps) == [70] and started[:3] == [5, 6, 7]
    steps.close()


# ---- issue 24: one run at a time per checkpoint folder ----

def test_a_second_run_on_the_same_checkpoint_folder_is_refused_and_a_stale_lock_taken_over(
        tmp_path, prepared):
    import signal
    import socket
    import subprocess
    cfg = tiny_config(tmp_path, prepared, max_iters=2, eval_interval=2)
    ckpt_dir = tmp_path / 'cfg' / 'pretrain'
    ckpt_dir.mkdir(parents=True)
    lock = ckpt_dir / 'train.lock'
    # a run still going (a live process stands in for it): refused, naming it
    first = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
    lock.write_text(json.dumps({'pid': first.pid, 'host': socket.gethostname()}))
    try:
        p = run('train.py', cfg)
        assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
        assert f'pid {first.pid}' in p.stderr and str(lock) in p.stderr, p.stderr
        assert sorted(os.listdir(ckpt_dir)) == ['train.lock']
        assert not (tmp_path / 'cfg' / 'runs').exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the run was killed: its lock is stale, taken over, and released when this run ends
    p = run('train.py', cfg, check=True)
    assert f'pid {first.pid}' in p.stderr and 'no longer running' in p.stderr, p.stderr
    assert (ckpt_dir / 'ckpt.pt').exists() and not lock.exists()
    # a run that stops with an error releases it too
    p = run('train.py', cfg, '--init_from=nosuch.pt')
    assert p.returncode == 1 and not lock.exists()


def test_keys_given_that_this_run_cannot_honour_are_named(tmp_path, prepared):
    """Each of these only matters with another key set: said on stderr rather than ignored."""
    cfg = tiny_config(tmp_path, prepared, max_iters=1, eval_interval=1)
    p = run('train.py', cfg, '--muon_lr=0.05', '--decay_frac=0.3', '--lora_alpha=8.0',
            '--lora_base=x.pt', check=True)
    assert p.stderr.count('warning: ') == 3
    for key, why in (('muon_lr', "optimizer='adamw'"), ('decay_frac', "lr_schedule='cosine'"),
                     ('lora_alpha', 'lora_rank=0'), ('lora_base', 'lora_rank=0')):
        assert f'--{key}' in p.stderr and why in p.stderr, (key, p.stderr)
    p = run('train.py', cfg, check=True)  # the same keys from a profile: not a word
    assert 'warning' not in p.stderr, p.stderr
