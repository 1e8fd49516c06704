"""optim.py (Muon + AdamW) and the learning-rate schedules of train.py."""
import types

import numpy as np
import pytest
import torch

from conftest import load_cfg, metrics, run, tiny_train_config
import data
import optim
from model import GPT, ModelConfig, add_lora
from optim import Muon, make_optimizer, orthogonalize
from tokenizer import Tokenizer


def tiny_model(tie=True):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                           tie_embeddings=tie))


def muon_of(params, lr=1.0, momentum=0.95, ns_dtype=torch.float32):
    return Muon([{'params': params, 'muon': True}], lr=lr, momentum=momentum, ns_dtype=ns_dtype)


@pytest.mark.parametrize('ns_dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', [(64, 160), (160, 64), (96, 96)])
def test_a_muon_update_is_close_to_orthogonal(shape, ns_dtype):
    """Whatever the gradient's spectrum, the update's singular values all land near 1: every
    direction moves."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    # singular values from 1 down to 0.01: a badly conditioned gradient
    spectrum = torch.logspace(0, -2, k)
    grad = U[:, :k] @ torch.diag(spectrum) @ V[:, :k].T
    p = torch.nn.Parameter(torch.zeros(shape))
    p.grad = grad
    muon_of([p], ns_dtype=ns_dtype).step()
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    s = torch.linalg.svdvals(-p.detach() / scale)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())
    raw = torch.linalg.svdvals(grad / grad.norm())
    assert raw.min() / raw.max() < 0.05  # while the gradient itself spans a factor of 100


def newton_schulz_by_hand(M, steps=5):
    """The quintic iteration written out from its definition, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = M / M.norm()
    wide = X.shape[0] <= X.shape[1]
    X = X if wide else X.T
    for _ in range(steps):
        XXt = X @ X.T
        X = a * X + b * XXt @ X + c * XXt @ XXt @ X
    return X if wide else X.T


@pytest.mark.parametrize('shape', [(24, 40), (40, 24)])
def test_two_muon_steps_on_one_matrix_match_a_hand_computation(shape):
    torch.manual_seed(1)
    W0 = torch.randn(shape, dtype=torch.float64)
    G1, G2 = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    lr, beta = 0.05, 0.9
    p = torch.nn.Parameter(W0.float().clone())
    opt = muon_of([p], lr=lr, momentum=beta)
    # by hand: momentum m, Nesterov look-ahead u, orthogonalised, scaled by sqrt(max(1, rows/cols))
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    m = (1 - beta) * G1
    W1 = W0 - lr * scale * newton_schulz_by_hand((1 - beta) * G1 + beta * m)
    m = beta * m + (1 - beta) * G2
    W2 = W1 - lr * scale * newton_schulz_by_hand((1 - beta) * G2 + beta * m)
    p.grad = G1.float()
    opt.step()
    torch.testing.assert_close(p.detach().double(), W1, atol=2e-5, rtol=1e-4)
    p.grad = G2.float()
    opt.step()
    torch.testing.assert_close(p.detach().double(), W2, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(opt.state[p]['momentum'].double(), m, atol=1e-6, rtol=1e-5)


def test_matrices_stepped_together_by_shape_move_as_each_would_alone():
    """Muon orthogonalizes the matrices of one shape as one stack: the result must be each
    matrix's own step (no mixing across the stack, tall and wide ones each the right way)."""
    torch.manual_seed(2)
    shapes = [(24, 40), (40, 24), (24, 40), (16, 16), (40, 24), (24, 40)]
    together = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    start = [p.detach().clone() for p in together]
    opt = muon_of(together, lr=0.05, momentum=0.9)
    singles = [muon_of([p], lr=0.05, momentum=0.9) for p in alone]
    for _ in range(2):
        for p, q in zip(together, alone):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        opt.step()
        for single in singles:
            single.step()
    for p, q, p0 in zip(together, alone, start):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
        assert (p.detach() - p0).abs().max() > 0.01


def test_muon_weight_decay_shrinks_the_matrices_by_lr_times_it():
    """muon_weight_decay (decoupled): the same step as without it, on weights first scaled by
    1 - muon_lr * decay; the embedding/head keep AdamW's own weight_decay."""
    steps = {}
    for decay in (0.0, 0.5):
        model = tiny_model()
        opt = make_optimizer(model, 'muon', 1e-3, 0.05, 0.1, (0.9, 0.95), 0.95, 'cpu', torch.float32,
                             muon_weight_decay=decay)
        assert opt.param_groups[0]['muon'] and opt.param_groups[0]['weight_decay'] == decay
        assert opt.param_groups[1]['weight_decay'] == 0.1
        w0 = model.blocks[0].attn.q_proj.weight.detach().clone()
        torch.manual_seed(3)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        steps[decay] = model.blocks[0].attn.q_proj.weight.detach()
    torch.testing.assert_close(steps[0.5] - steps[0.0], -0.05 * 0.5 * w0, atol=1e-6, rtol=1e-5)


def test_orthogonalize_keeps_shape_dtype_and_is_scale_free():
    G = torch.randn(8, 20)
    O = orthogonalize(G, dtype=torch.float32)
    assert O.shape == G.shape and O.dtype == G.dtype
    torch.testing.assert_close(orthogonalize(1000 * G, dtype=torch.float32), O, atol=1e-5, rtol=1e-4)


def test_the_adamw_groups_of_muon_step_exactly_as_torch_adamw():
    """Embedding/head and norms stay on AdamW inside the Muon optimizer: the same numbers as
    torch's."""
    a, b = tiny_model(), tiny_model()
    opt_a = make_optimizer(a, 'muon', 1e-2, 0.02, 0.1, (0.9, 0.95), 0.95, 'cpu')
    rest = [g for g in opt_a.param_groups if not g['muon']]
    b_params = dict(b.named_parameters())
    names = {id(p): n for n, p in a.named_parameters()}
    torch_adamw = torch.optim.AdamW([{'params': [b_params[names[id(p)]] for p in g['params']],
                                      'weight_decay': g['weight_decay']} for g in rest], lr=1e-2, betas=(0.9, 0.95))
    x = torch.randint(0, 97, (2, 16))
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, torch_adamw)):
            _, loss = model(x, torch.roll(x, -1, 1))
            loss.backward()
        # b's hidden matrices are not stepped: give it a's, so both see the same forward next time
        opt_a.step()
        torch_adamw.step()
        with torch.no_grad():
            for n, p in a.named_parameters():
                if any(p is q for g in opt_a.param_groups if g['muon'] for q in g['params']):
                    b_params[n].copy_(p)
        opt_a.zero_grad()
        torch_adamw.zero_grad()
    for n, p in a.named_parameters():
        torch.testing.assert_close(p, b_params[n], atol=1e-6, rtol=1e-5, msg=n)


def assert_each_trainable_parameter_once(model, opt):
    ids = [id(p) for g in opt.param_groups for p in g['params']]
    assert len(ids) == len(set(ids)), "a parameter is in two groups: it would be stepped twice"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}, "a trainable parameter is missing"


@pytest.mark.parametrize('kind', ['adamw', 'muon'])
@pytest.mark.parametrize('tie', [True, False], ids=['tied', 'untied'])
def test_optimizer_groups_cover_every_trainable_parameter_exactly_once(kind, tie):
    model = tiny_model(tie)
    opt = make_optimizer(model, kind, 1e-3, 0.02, 0.1, (0.9, 0.95), 0.95, 'cpu')
    assert_each_trainable_parameter_once(model, opt)
    if kind == 'muon':
        hidden = {id(p) for n, p in model.named_parameters() if n.startswith('blocks.') and p.dim() == 2}
        assert {id(p) for g in opt.param_groups if g['muon'] for p in g['params']} == hidden
        decayed = [p for g in opt.param_groups if not g['muon'] and g['weight_decay'] > 0 for p in g['params']]
        assert {id(p) for p in decayed} == {id(model.embed.weight), id(model.lm_head.weight)}


@pytest.mark.parametrize('kind', ['adamw', 'muon'])
def test_lora_adapters_stay_on_adamw_and_are_each_stepped_once(kind):
    model = add_lora(tiny_model(), rank=4, alpha=8.0)
    opt = make_optimizer(model, kind, 1e-3, 0.02, 0.0, (0.9, 0.95), 0.95, 'cpu')
    assert_each_trainable_parameter_once(model, opt)
    assert not any(p for g in opt.param_groups if g.get('muon') for p in g['params'])


def schedule(**kw):
    keys = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=0,
                lr_schedule='wsd', decay_frac=0.2)
    return types.SimpleNamespace(**{**keys, **kw})


def test_wsd_schedule_at_its_corners():
    cfg = schedule()
    f = lambda it: optim.lr_factor(it, cfg)
    assert f(0) == pytest.approx(1 / 11)             # warming up from ~0
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == 1.0 and f(50) == 1.0 and f(79) == 1.0   # stable at the peak
    assert f(80) == 1.0                               # the decay starts at 100 - 0.2 x 100
    # linear: halfway down at the middle of the decay
    assert f(90) == pytest.approx(0.1 + 0.9 * 0.5)
    # min_lr / learning_rate, then flat
    assert f(100) == pytest.approx(0.1) and f(150) == pytest.approx(0.1)
    values = [f(i) for i in range(10, 101)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    # lr_decay_iters ends the decay early; decay_frac=1 decays from the end of the warmup
    assert optim.lr_factor(60, schedule(lr_decay_iters=60)) == pytest.approx(0.1)
    assert optim.lr_factor(48, schedule(lr_decay_iters=60)) == 1.0
    assert optim.lr_factor(10, schedule(decay_frac=1.0)) == pytest.approx(1.0)
    assert optim.lr_factor(55, schedule(decay_frac=1.0)) == pytest.approx(0.1 + 0.9 * 0.5)
    assert optim.lr_factor(99, schedule(min_lr=0.0)) == pytest.approx(0.05)


def test_cosine_schedule_at_its_corners():
    cfg = schedule(lr_schedule='cosine')
    f = lambda it: optim.lr_factor(it, cfg)
    assert f(0) == pytest.approx(1 / 11) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)  # halfway: the mean of peak and floor
    assert f(100) == pytest.approx(0.1) and f(120) == pytest.approx(0.1)


def test_a_time_budget_lays_the_schedule_over_the_time():
    """max_minutes: `progress` (the fraction of the training time spent) replaces the steps; the
    warm-up stays in steps."""
    for cfg in (schedule(), schedule(lr_decay_iters=60)):  # (the step keys are not used)
        f = lambda it, p: optim.lr_factor(it, cfg, progress=p)
        assert f(3, 0.9) == pytest.approx(4 / 11)          # still warming up, whatever the time
        assert f(10, 0.0) == 1.0 and f(500, 0.79) == 1.0   # stable: most of the time
        assert f(11, 0.9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the last 20%
        assert f(12, 1.0) == pytest.approx(0.1) and f(12, 1.3) == pytest.approx(0.1)
    cosine = schedule(lr_schedule='cosine')
    assert optim.lr_factor(40, cosine, progress=0.5) == pytest.approx(0.55)
    assert optim.lr_factor(40, cosine, progress=0.0) == pytest.approx(1.0)


# ---- through train.py ----

def muon_config(tmp_path, prepared, name='m', **extra):
    return tiny_train_config(tmp_path / f'{name}.py', prepared, tmp_path / name,
                             **{'optimizer': 'muon', 'muon_lr': 0.02, 'lr_schedule': 'wsd', **extra})


def test_muon_trains_with_bf16_compile_and_accumulation(tmp_path, prepared):
    cfg = muon_config(tmp_path, prepared, dtype='bfloat16', compile=True, gradient_accumulation_steps=2,
                      max_iters=12, eval_interval=12)
    p = run('train.py', cfg, check=True)
    assert 'optimizer: Muon (lr 0.02)' in p.stdout and 'compiling' in p.stdout and 'bfloat16' in p.stdout
    rows = metrics(str(tmp_path / 'm'))
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert len(losses) == 12 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    vals = [r['val_bpb'] for r in rows if 'val_bpb' in r]
    assert vals[-1] < vals[0]
    ckpt = torch.load(tmp_path / 'm' / 'pretrain' / 'ckpt.pt', weights_only=True)
    kinds = [g.get('muon', False) for g in ckpt['optimizer']['param_groups']]
    assert kinds == [True, False, False]
    # Muon's state is saved
    assert any('momentum' in s for s in ckpt['optimizer']['state'].values())


def test_resuming_with_another_optimizer_is_a_clear_error(tmp_path, prepared):
    cfg = muon_config(tmp_path, prepared, max_iters=3, eval_interval=3)
    run('train.py', cfg, check=True)
    p = run('train.py', cfg, '--init_from=resume', '--optimizer=adamw', '--max_iters=6')
    assert p.returncode != 0 and "optimizer='muon'" in p.stderr and 'Traceback' not in p.stderr


@pytest.mark.parametrize('key, value, words', [('optimizer', 'sgd', "not one of 'adamw', 'muon'"),
                                               ('lr_schedule', 'linear', "not one of 'cosine', 'wsd'"),
                                               ('decay_frac', 1.5, 'decay_frac=1.5'),
                                               ('min_lr', 1.0, 'min_lr <= learning_rate')])
def test_bad_optimizer_settings_are_clear_errors(tmp_path, prepared, key, value, words):
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c')
    p = run('train.py', cfg, f'--{key}={value}')
    assert p.returncode != 0 and words in p.stderr and 'Traceback' not in p.stderr


def test_val_bits_per_byte_is_what_eval_py_computes_on_the_same_batches(tmp_path, prepared):
    """train.py's val_bpb per source = eval.py's bits per byte (summed nats / ln 2 / target bytes)
    on the rows train.py evaluated."""
    import eval as evaluation
    from checkpoint import load_model
    cfg_path = muon_config(tmp_path, prepared, max_iters=4, eval_interval=4, eval_iters=3)
    run('train.py', cfg_path, check=True)
    cfg = load_cfg(cfg_path)
    last = [r for r in metrics(str(tmp_path / 'm')) if 'val_bpb' in r][-1]
    tok = Tokenizer(cfg.tokenizer_path)
    model, _ = load_model(str(tmp_path / 'm' / 'pretrain' / 'ckpt.pt'), 'cpu', tok.sha256)
    for i, name in enumerate(cfg.mixture):
        split = data.Split(cfg.data_dir, name, 'val', tok.sha256)
        rows = []
        for k in range(cfg.eval_iters):
            x, y = data.window_batch({name: split}, {name: 1.0},
                                     np.random.default_rng([cfg.seed, 1_000_003, i, k]),
                                      cfg.batch_size, cfg.block_size)
            rows += [(a.tolist(), b.tolist()) for a, b in zip(x, y)]
        got = evaluation.split_metrics(model, tok, rows, torch.autocast('cpu', enabled=False), 'cpu', 8, name)
        assert last['bpb'][name] == pytest.approx(got['bits_per_byte'], rel=1e-4)
        assert last['val'][name] == pytest.approx(got['loss'], rel=1e-4)
    # the headline figures are over the same sources (best_on: by default the largest, one source)
    chosen = [n for n in last['val'] if last['val'][n] == pytest.approx(last['val_loss'])]
    assert len(chosen) == 1 and last['val_bpb'] == pytest.approx(last['bpb'][chosen[0]])


def test_the_log_shows_elapsed_time_and_an_eta_and_metrics_record_seconds(tmp_path, prepared):
    cfg = muon_config(tmp_path, prepared, max_iters=6, eval_interval=3)
    p = run('train.py', cfg, check=True)
    assert 'eta ' in p.stdout and ' in, ' in p.stdout
    rows = metrics(str(tmp_path / 'm'))
    times = [r['elapsed'] for r in rows if 'val_bpb' in r]
    assert len(times) == 3 and times[0] < times[1] < times[2]
    # a resumed run carries on counting
    run('train.py', cfg, '--init_from=resume', '--max_iters=9', check=True)
    later = [r['elapsed'] for r in metrics(str(tmp_path / 'm')) if 'val_bpb' in r]
    assert later[-1] > times[-1]


def test_a_muon_trained_checkpoint_exports_to_the_same_llama(tmp_path, prepared):
    """Muon changes how the weights are found, not what they are: export.py's Llama gives our
    logits."""
    pytest.importorskip('safetensors', reason="the export extra is not installed: pip install -r requirements-export.txt")
    transformers = pytest.importorskip('transformers', reason="transformers is a dev requirement")
    from checkpoint import load_model
    cfg = muon_config(tmp_path, prepared, max_iters=4, eval_interval=4)
    run('train.py', cfg, check=True)
    run('export.py', cfg, '--gguf_type=none', f'--export_dir={tmp_path}/x', check=True)
    tok = Tokenizer(load_cfg(cfg).tokenizer_path)
    ours, _ = load_model(str(tmp_path / 'm' / 'pretrain' / 'ckpt.pt'), 'cpu', tok.sha256)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'x' / 'hf'), dtype=torch.float32).eval()
    x = torch.tensor([[tok.bos_id] + tok.encode('the garden and the bike chain')])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.eval()(x)[0], atol=1e-4, rtol=1e-4)


def test_a_warm_up_longer_than_the_decay_is_refused(tmp_path, prepared):
    """warmup_iters > lr_decay_iters would raise the rate past the end of the decay, then drop it to
    the floor at once: refused with both keys named."""
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c')
    p = run('train.py', cfg, '--warmup_iters=50', '--lr_decay_iters=40')
    assert p.returncode != 0 and 'warmup_iters=50' in p.stderr and 'lr_decay_iters=40' in p.stderr
    assert 'Traceback' not in p.stderr
    assert run('train.py', cfg, '--warmup_iters=2', '--lr_decay_iters=4',
               '--max_iters=4').returncode == 0


def test_a_time_budget_ends_the_run_in_time_with_the_schedule_decayed_and_resumes(tmp_path, prepared):
    """max_minutes: as many steps as fit, a final evaluation and checkpoint inside the budget, the
    learning rate down to min_lr at the end; the clock is in the checkpoint, so a resume goes on
    from where the budget stood."""
    budget_s = 6
    cfg = muon_config(tmp_path, prepared, max_minutes=budget_s / 60, max_iters=5, eval_interval=10,
                      warmup_iters=2, min_lr=1e-5, learning_rate=1e-3, log_interval=1)
    p = run('train.py', cfg, check=True)
    assert 'time budget: 6s of training loop' in p.stdout and 'time budget of 6s spent:' in p.stdout
    rows = metrics(str(tmp_path / 'm'))
    steps = [r for r in rows if 'loss' in r]
    assert len(steps) > 5  # max_iters is not what ended it
    lrs = [r['lr'] for r in steps]
    assert lrs[2] == pytest.approx(1e-3) and lrs[-1] < 2e-4  # stable, then decayed (toward 1e-5)
    assert 'val_bpb' in rows[-1]  # the finished model was evaluated
    ckpt = torch.load(tmp_path / 'm' / 'pretrain' / 'ckpt.pt', weights_only=True)
    assert ckpt['iter'] == len(steps)
    # inside the budget (the final evaluation and save included; 2 s for a slow, busy machine)
    assert budget_s * 0.5 < ckpt['clock'] <= budget_s + 2
    # a resume with the same budget has nothing left to spend; with more it goes on, decaying again
    p = run('train.py', cfg, '--init_from=resume', check=True)
    assert 'time budget of 6s spent: %d steps' % len(steps) in p.stdout
    p = run('train.py', cfg, '--init_from=resume', '--max_minutes=0.15', check=True)
    again = torch.load(tmp_path / 'm' / 'pretrain' / 'ckpt.pt', weights_only=True)
    assert again['iter'] > len(steps) and 6 + 3 * 0.5 < again['clock'] <= 9 + 2
