import json
import os

import numpy as np
import pytest
import torch

from conftest import load_cfg, metrics, run, tiny_train_config
import prepare
import sources
import train
from model import GPT, ModelConfig, load_model
from tokenizer import Tokenizer, render_conversation


def write_split(data_dir, name, tokens, chat=False, docs=None):
    """A prepared split written directly: `tokens` (one array per document)."""
    for split in ('train', 'val'):
        w = prepare.SplitWriter(os.path.join(data_dir, name, split), np.uint16, 10 ** 9, chat)
        for doc in tokens:
            w.add(np.asarray(doc, dtype=np.uint16), np.ones(len(doc), dtype=np.uint8) if chat else None, len(doc), False)
        w.finish({'format': 'chat' if chat else 'text', 'dtype': 'uint16', 'tokenizer_sha256': 'x'})


def test_mixture_frequencies_match_the_weights(tmp_path):
    write_split(tmp_path, 'a', [np.full(5000, 10)])
    write_split(tmp_path, 'b', [np.full(5000, 20)])
    write_split(tmp_path, 'c', [np.full(5000, 30)])
    splits = {n: train.Split(str(tmp_path), n, 'train', None) for n in 'abc'}
    weights = {'a': 0.6, 'b': 0.3, 'c': 0.1}
    rng = np.random.default_rng(0)
    rows = torch.cat([train.get_batch(splits, weights, rng, 100, 16, 'cpu', False)[0][:, 0] for _ in range(40)])
    n = len(rows)
    for name, token in (('a', 10), ('b', 20), ('c', 30)):
        p = weights[name]
        freq = (rows == token).float().mean().item()
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5, (name, freq)  # within 4 standard deviations


def test_reading_windows_does_not_grow_memory(tmp_path):
    """Random reads all over a 200 MB shard: a long-lived memmap would keep what it touched resident."""
    write_split(tmp_path, 'big', [np.tile(np.arange(60000, dtype=np.uint16), 1667)])
    split = train.Split(str(tmp_path), 'big', 'train', None)
    rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
    before = rss()
    rng = np.random.default_rng(0)
    for _ in range(3000):
        start = int(rng.integers(0, 60000 * 1667 - 65536))
        assert split.read(0, start, 65536)[0] == start % 60000
    assert rss() - before < 60, f"RSS grew by {rss() - before} MB"


def test_sft_rows_pack_whole_conversations_with_masked_targets(tmp_path):
    convs = [[1, 4, 50, 51, 5, 60, 61, 6], [1, 4, 52, 5, 62, 6], [1, 4, 53, 53, 53, 5, 63, 64, 65, 6]]
    masks = [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]]
    for split in ('train', 'val'):
        w = prepare.SplitWriter(os.path.join(tmp_path, 'chat', split), np.uint16, 10 ** 9, True)
        for c, m in zip(convs, masks):
            w.add(np.array(c, dtype=np.uint16), np.array(m, dtype=np.uint8), len(c), False)
        w.finish({'format': 'chat', 'dtype': 'uint16', 'tokenizer_sha256': 'x'})
    split = train.Split(str(tmp_path), 'chat', 'train', None)
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y, doc, truncated = train.packed_row(split, rng, 20)
        assert truncated == 0 and len(x) == 20
        for k in set(doc.tolist()) - {-1}:
            where = np.flatnonzero(doc == k)
            tokens = x[where].tolist()
            i = [c[:len(tokens)] for c in convs].index(tokens)  # a whole conversation, in order
            expected = [t if m else -1 for t, m in zip(convs[i][1:], masks[i][1:])]
            assert y[where].tolist()[:len(expected)] == expected[:len(where)]
        assert (y[doc == -1] == -1).all()  # padding is never a target
    x, y, doc, truncated = train.packed_row(split, np.random.default_rng(1), 4)  # all longer than the row
    assert truncated == 1 and (doc == 0).all()


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
             'rng': [train.rng_state()]}
    train.save_checkpoint(state, str(tmp_path), 'ckpt.pt', keep=2)
    loaded = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert all(torch.equal(loaded['model'][k], v) for k, v in state['model'].items())
    assert torch.equal(loaded['rng'][0]['torch'], state['rng'][0]['torch'])
    for i in range(4):  # older versions are kept, the oldest dropped
        state['iter'] = 10 + i
        train.save_checkpoint(state, str(tmp_path), 'ckpt.pt', keep=2)
    kept = sorted(f for f in os.listdir(tmp_path))
    assert kept == ['ckpt.1.pt', 'ckpt.2.pt', 'ckpt.pt']
    assert [torch.load(tmp_path / f, weights_only=True)['iter'] for f in kept] == [12, 11, 13]


def test_resume_continues_at_the_saved_step_with_the_same_result(tmp_path, prepared):
    common = dict(max_iters=8, lr_decay_iters=8, eval_interval=4)
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

def test_the_mask_survives_from_prepare_to_the_loss(prepared):
    """End to end: primer text -> prepare.py shards -> the batch train.py builds -> the loss. The loss must
    be the cross entropy over exactly the positions predicting assistant tokens and <|eot|>."""
    cfg = load_cfg(prepared[0])
    tok = Tokenizer(cfg.tokenizer_path)
    splits = {'primer': train.Split(cfg.data_dir, 'primer', 'train', tok.sha256)}
    assert train.sft_mode(splits)
    x, y, doc, _ = train.get_batch(splits, {'primer': 1.0}, np.random.default_rng(3), 4, 64, 'cpu', True)
    # what the targets must be, recomputed from the source text with the chat template
    src = sources.source_settings('primer', cfg.sources['primer'])
    rendered = {tuple(ids): mask for ids, mask in
                (render_conversation(tok, c) for _, c, _ in sources.iter_documents(src))}
    n_checked = 0
    for row in range(4):
        for k in set(doc[row].tolist()) - {-1}:
            pos = (doc[row] == k).nonzero().flatten()
            tokens = x[row, pos].tolist() + [y[row, pos[-1]].item()]
            ids, mask = next((list(i), m) for i, m in rendered.items() if list(i[:len(pos)]) == tokens[:len(pos)])
            want = [t if m else -1 for t, m in zip(ids[1:len(pos) + 1], mask[1:len(pos) + 1])]
            want += [-1] * (len(pos) - len(want))  # the last position faces the next conversation: no target
            assert y[row, pos].tolist() == want
            n_checked += 1
    assert n_checked >= 4
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    logits, loss = model(x, y, doc)
    keep = y != -1
    manual = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(loss, manual)
    assert 0 < keep.sum() < (x != 0).sum()  # some positions train, many do not


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
