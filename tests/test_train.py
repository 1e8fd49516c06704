import json
import os
import sys
import time

import numpy as np
import pytest
import torch

from conftest import TINY, load_cfg, metrics, run, tiny_train_config

TINY_SFT = {**TINY, 'batch_size': 8, 'val_sources': ['dolly'], 'eval_iters': 1}
import prepare
import sources
import train
from checkpoint import load_model, save_checkpoint
from model import GPT, ModelConfig, peak_flops
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
    rows = np.concatenate([train.window_batch(splits, weights, rng, 100, 16)[0][:, 0] for _ in range(40)])
    n = len(rows)
    for name, token in (('a', 10), ('b', 20), ('c', 30)):
        p = weights[name]
        freq = (rows == token).mean()
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


def write_chat(data_dir, name, convs, splits=('train', 'val')):
    """A prepared chat source written directly: convs are (ids, mask) pairs."""
    for split in splits:
        w = prepare.SplitWriter(os.path.join(data_dir, name, split), np.uint16, 10 ** 9, True)
        for c, m in convs:
            w.add(np.array(c, dtype=np.uint16), np.array(m, dtype=np.uint8), len(c), False)
        w.finish({'format': 'chat', 'dtype': 'uint16', 'tokenizer_sha256': 'x'})


BOS, SYS, USR, ASST, EOT = 1, 3, 4, 5, 6


def conversation(system, *exchanges):
    """(ids, mask) as the chat template renders them: exchanges are (user tokens, reply tokens)."""
    ids, mask = [BOS], [0]
    if system:
        ids, mask = ids + [SYS] + system, mask + [0] * (1 + len(system))
    for user, reply in exchanges:
        ids += [USR] + user + [ASST] + reply + [EOT]
        mask += [0] * (1 + len(user)) + [0] + [1] * (len(reply) + 1)
    return ids, mask


def pieces_of(split, c):
    """The token ids of conversation c's pieces."""
    ids = np.fromfile(split.shards[0]['path'], dtype=np.uint16)
    return [np.concatenate([ids[b:e] for b, e in split.pieces['ranges'][p].tolist()]).tolist()
            for p in range(split.pieces['first'][c], split.pieces['first'][c + 1])]


def test_sft_rows_pack_whole_conversations_with_masked_targets(tmp_path):
    convs = [conversation(None, ([50, 51], [60, 61])), conversation(None, ([52], [62])),
             conversation(None, ([53, 53, 53], [63, 64, 65]))]
    write_chat(tmp_path, 'chat', convs)
    split = train.Split(str(tmp_path), 'chat', 'train', None)
    packer = train.Packer({'chat': split}, {'chat': 1.0}, [0], 20, buffer=4)
    x, y, doc = packer.batch(0, 50)
    for r in range(50):
        for k in set(doc[r].tolist()) - {-1}:
            where = np.flatnonzero(doc[r] == k)
            tokens = x[r, where].tolist()
            i = [c[:len(tokens)] for c, _ in convs].index(tokens)  # a whole conversation, in order
            ids, mask = convs[i]
            expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
            assert y[r, where].tolist()[:len(expected)] == expected[:len(where)]
        assert (y[r, doc[r] == -1] == -1).all()  # padding is never a target
    assert (doc != -1).mean() > 0.85  # rows of 21 from conversations of 6, 8 and 10 tokens


def test_long_conversations_are_cut_at_turn_boundaries_with_their_context(tmp_path):
    system = [40, 41]
    long_chat = conversation(system, ([50] * 6, [60] * 6), ([51] * 6, [61] * 6), ([52] * 6, [62] * 6))  # 3 x 16 + 4
    long_question = conversation(system, ([53] * 40, [63] * 4))  # a user turn longer than the row
    long_reply = conversation(None, ([54] * 3, [64] * 40))
    write_chat(tmp_path, 'chat', [long_chat, long_question, long_reply])
    split = train.Split(str(tmp_path), 'chat', 'train', None)
    split.cut_pieces(21)
    # every piece: <s>, the system prompt where it fits, whole exchanges; at most 21 tokens, all with trained tokens
    assert pieces_of(split, 0) == [[BOS, SYS, *system, USR, *[50] * 6, ASST, *[60] * 6, EOT],
                                   [BOS, SYS, *system, USR, *[51] * 6, ASST, *[61] * 6, EOT],
                                   [BOS, SYS, *system, USR, *[52] * 6, ASST, *[62] * 6, EOT]]
    # an exchange longer than the row keeps the head of the question and the whole (short) reply
    assert pieces_of(split, 1) == [[BOS, USR, *[53] * 13, ASST, *[63] * 4, EOT]]
    # ... or the question and the head of a long reply: half the row at least
    assert pieces_of(split, 2) == [[BOS, USR, *[54] * 3, ASST, *[64] * 15]]
    assert split.long == 3 and split.truncated == 2 and all(split.pieces['length'] <= 21)
    assert all(split.pieces['trained'] > 0) and split.pieces['trained'].tolist() == [7, 7, 7, 5, 15]


def test_pieces_without_a_reply_to_train_on_are_never_used(tmp_path):
    only_question = ([BOS, USR, 50, 51, 52, ASST], [0, 0, 0, 0, 0, 0])  # as prepare.py cuts at max_conversation_tokens
    write_chat(tmp_path, 'chat', [only_question, conversation(None, ([50], [60]))])
    split = train.Split(str(tmp_path), 'chat', 'train', None)
    packer = train.Packer({'chat': split}, {'chat': 1.0}, [0], 8)
    assert split.usable.tolist() == [1]
    x, y, doc = packer.batch(0, 10)
    assert not (x == 52).any() and (y == 60).sum() == 10  # one conversation of 6 tokens per row of 9


def test_each_conversation_is_trained_as_often_whatever_its_length(tmp_path):
    """Weight-proportional, not length-proportional: within a source every conversation is trained once per epoch;
    sources get their weight's share of the tokens; rows stay >= 95% full."""
    rng = np.random.default_rng(0)
    short = [conversation(None, ([50] * int(rng.integers(2, 30)), [60] * int(rng.integers(2, 30)))) for _ in range(60)]
    long = [conversation(None, ([51] * int(rng.integers(50, 200)), [61] * int(rng.integers(20, 200)))) for _ in range(60)]
    write_chat(tmp_path, 'mixed', short + long)
    write_chat(tmp_path, 'other', [conversation(None, ([52] * 10, [62] * 10))] * 20)
    splits = {n: train.Split(str(tmp_path), n, 'train', None) for n in ('mixed', 'other')}
    packer = train.Packer(splits, {'mixed': 0.75, 'other': 0.25}, [0], 255)
    rows = packer.rows(0, 2000)
    split = splits['mixed']
    trained = np.zeros(split.conversations, dtype=int)
    tokens = np.zeros(2)
    for row in rows:
        for k, p in row:
            tokens[k] += packer.splits[packer.names[k]].pieces['length'][p]
            if packer.names[k] == 'mixed':
                trained[np.searchsorted(split.pieces['first'], p, side='right') - 1] += 1
    # epochs: each one drawn once before any is drawn again (a few still wait in the buffer at the end)
    assert trained.max() - trained.min() <= 2 and trained.min() > 5
    assert abs(trained[:60].mean() - trained[60:].mean()) < 0.2
    assert tokens[0] / tokens.sum() == pytest.approx(0.75, abs=0.01)
    fill, _ = packer.stats(2000)
    assert fill > 0.95


def test_sft_batches_are_a_pure_function_of_the_row_index(tmp_path):
    """A resumed run (or a DDP rank) asks for rows from the middle of the stream: they must be the rows an
    uninterrupted run sees there."""
    rng = np.random.default_rng(1)
    write_chat(tmp_path, 'chat', [conversation([40], ([50] * int(rng.integers(1, 60)), [60] * int(rng.integers(1, 60))))
                                  for _ in range(50)])
    split = train.Split(str(tmp_path), 'chat', 'train', None)
    whole = train.Packer({'chat': split}, {'chat': 1.0}, [7], 64)
    batches = [whole.batch(i * 4, 4) for i in range(30)]
    for i in (29, 3, 17, 0):  # a fresh packer, in any order
        fresh = train.Packer({'chat': split}, {'chat': 1.0}, [7], 64)
        assert all(np.array_equal(a, b) for a, b in zip(fresh.batch(i * 4, 4), batches[i]))
        assert all(np.array_equal(a, b) for a, b in zip(whole.batch(i * 4, 4), batches[i]))
    other_seed = train.Packer({'chat': split}, {'chat': 1.0}, [8], 64).batch(0, 4)
    assert not np.array_equal(other_seed[0], batches[0][0])


def test_a_source_or_folder_named_shard_still_reads_its_index_and_mask(tmp_path):
    data = tmp_path / 'shard_data'
    write_chat(data, 'shard_x', [conversation(None, ([50], [60, 61]))] * 3)
    split = train.Split(str(data), 'shard_x', 'train', None)
    x, y, doc = train.Packer({'shard_x': split}, {'shard_x': 1.0}, [0], 16).batch(0, 2)
    assert (y == 60).sum() == 2 * 2 and (doc[:, :8] != -1).all()


SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data')
DOLLY = os.path.join(SHARED, 'dolly', 'databricks-dolly-15k-safety-only.subset.jsonl')
OASST = os.path.join(SHARED, 'oasst1', 'en_100_tree.jsonl')


@pytest.mark.skipif(not (os.path.exists(DOLLY) and os.path.exists(OASST)), reason='../shared/data is not here')
def test_real_sft_rows_are_95_percent_full_at_block_256_and_1024(tmp_path):
    """dolly + oasst1 + primer (the real data in ../shared/data), dev_sft's mixture: rows >= 95% full at the
    dev and prod block sizes, and the start of an SFT run says so (with trained tokens per step and cuts)."""
    from conftest import write_config
    srcs = {'primer': {'kind': 'primer', 'path': os.path.join(os.path.dirname(train.__file__), 'data', 'sample', 'primer.txt')},
            'dolly': {'kind': 'dolly', 'path': DOLLY}, 'oasst1': {'kind': 'oasst1', 'path': OASST}}
    mixture = {'primer': 0.06, 'dolly': 0.47, 'oasst1': 0.47}
    cfg = write_config(tmp_path / 'cfg.py', str(tmp_path / 'out'), '', sources=srcs, vocab_size=4096, num_proc=2,
                       phase='sft', mixture=mixture, **{**TINY_SFT, 'max_iters': 1})
    run('tokenizer.py', cfg, check=True)
    run('prepare.py', cfg, check=True)
    c = load_cfg(cfg)
    splits = {n: train.Split(c.data_dir, n, 'train', None) for n in mixture}
    for T in (256, 1024):
        fill, trained = train.Packer(splits, mixture, [0], T).stats(2000)
        assert fill >= 0.95, (T, fill)
        assert trained > 0.3 * (T + 1)  # replies are most of a dolly/oasst conversation
    p = run('train.py', cfg, '--block_size=256', check=True)
    line = next(l for l in p.stdout.splitlines() if l.startswith('SFT rows: '))
    assert float(line.split()[2].rstrip('%')) >= 90  # (one step's 8 rows: a noisier measure than 2000 rows)
    assert 'trained tokens per step' in line and 'oasst1 ' in line


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
    T = 64
    x, y, doc = map(torch.from_numpy, train.Packer(splits, {'primer': 1.0}, [3], T).batch(0, 8))
    # what the rows must hold, recomputed from the source text with the chat template
    src = sources.source_settings('primer', cfg.sources['primer'])
    rendered = [render_conversation(tok, c) for _, c, _ in sources.iter_documents(src)]
    roles = (tok.sys_id, tok.usr_id, tok.asst_id)

    def turns(ids):
        at = [i for i, t in enumerate(ids) if t in roles] + [len(ids)]
        return [ids[a:b] for a, b in zip(at, at[1:])]

    def comes_from(piece, ids):
        """<s>, the system turn (if kept), then consecutive turns of the conversation (the last ones maybe cut)."""
        mine, theirs = turns(piece), turns(ids)
        if piece[0] != tok.bos_id or not mine:
            return False
        if mine[0][0] == tok.sys_id:
            if mine.pop(0) != theirs[0]:
                return False
        starts = [j for j, t in enumerate(theirs) if mine and t[0] == mine[0][0] == tok.usr_id]
        return any(all(j + i < len(theirs) and theirs[j + i][:len(m)] == m for i, m in enumerate(mine)) for j in starts)

    def trained(ids):
        """1 where the template trains: assistant content and the <|eot|> ending it, found from the role tokens."""
        out, inside = [], False
        for t in ids:
            inside = inside if t not in roles + (tok.bos_id,) else t == tok.asst_id
            out.append(int(inside and t != tok.asst_id))
            inside = inside and t != tok.eot_id
        return out

    n_checked = 0
    for row in range(8):
        for k in set(doc[row].tolist()) - {-1}:
            pos = (doc[row] == k).nonzero().flatten()
            piece = x[row, pos].tolist()
            if pos[-1] == T - 1 and y[row, -1] != -1:  # a piece ending the row: its last token is only a target
                piece.append(y[row, -1].item())
            assert any(comes_from(piece, ids) for ids, _ in rendered), piece
            flags = trained(piece)
            want = [t if m else -1 for t, m in zip(piece[1:], flags[1:])]
            want += [-1] * (len(pos) - len(want))  # the last position faces the next piece (or padding): no target
            assert y[row, pos].tolist() == want
            n_checked += 1
    assert n_checked >= 8
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
    split = train.Split(cfg.data_dir, 'uneven', 'train', None)
    packer = train.Packer({'uneven': split}, {'uneven': 1.0}, [cfg.seed], cfg.block_size)
    counts = [int((packer.batch(2 * m, 2)[1] != -1).sum()) for m in range(4)]
    assert max(counts) > 2 * min(counts), counts  # deliberately uneven: averaging micro-batch means would be wrong
    run('train.py', one, check=True)
    run('train.py', four, check=True)
    for a, b in zip(first_moments(tmp_path / 'one'), first_moments(tmp_path / 'four')):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_a_non_finite_gradient_skips_its_step(tmp_path, prepared, monkeypatch, capsys):
    """A finite loss whose gradient is inf/nan (here forced on the third step) must not reach the weights."""
    cfg = tiny_config(tmp_path, prepared, max_iters=6, eval_interval=3, grad_clip=1.0)

    class Poisoned(train.GPT):
        steps = 0

        def forward(self, idx, targets=None, doc_ids=None, cache=None):
            logits, loss = super().forward(idx, targets, doc_ids, cache)
            if self.training and targets is not None:
                Poisoned.steps += 1
                if Poisoned.steps == 3:
                    logits.register_hook(lambda g: g * float('inf'))
            return logits, loss

    monkeypatch.setattr(train, 'GPT', Poisoned)
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
    real = train.window_batch

    def slow_eval(splits, weights, rng, B, T):
        if len(splits) == 1:  # an evaluation batch (one source each); a training one draws from three
            time.sleep(0.5)
        return real(splits, weights, rng, B, T)

    monkeypatch.setattr(train, 'window_batch', slow_eval)
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
    sizes = {n: train.Split(c.data_dir, n, 'train', None).tokens for n in c.mixture}
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
