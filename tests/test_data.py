"""data.py: reading prepared splits, pretraining windows, SFT pieces and packing, the mixture."""
import os

import numpy as np
import pytest
import torch

from conftest import TINY, load_cfg, run

import data
import prepare
import sources
from model import GPT, ModelConfig
from tokenizer import Tokenizer, render_conversation

TINY_SFT = {**TINY, 'batch_size': 8, 'val_sources': ['dolly'], 'eval_iters': 1}
BOS, SYS, USR, ASST, EOT = 1, 3, 4, 5, 6


def write_split(data_dir, name, tokens, chat=False, docs=None):
    """A prepared split written directly: `tokens` (one array per document)."""
    for split in ('train', 'val'):
        w = prepare.SplitWriter(os.path.join(data_dir, name, split), np.uint16, 10 ** 9, chat)
        for doc in tokens:
            mask = np.ones(len(doc), dtype=np.uint8) if chat else None
            w.add(np.asarray(doc, dtype=np.uint16), mask,
                  len(doc), False)
        w.finish({'format': 'chat' if chat else 'text', 'dtype': 'uint16', 'tokenizer_sha256': 'x'})


def test_mixture_frequencies_match_the_weights(tmp_path):
    write_split(tmp_path, 'a', [np.full(5000, 10)])
    write_split(tmp_path, 'b', [np.full(5000, 20)])
    write_split(tmp_path, 'c', [np.full(5000, 30)])
    splits = {n: data.Split(str(tmp_path), n, 'train', None) for n in 'abc'}
    weights = {'a': 0.6, 'b': 0.3, 'c': 0.1}
    rng = np.random.default_rng(0)
    firsts = [data.window_batch(splits, weights, rng, 100, 16)[0][:, 0] for _ in range(40)]
    rows = np.concatenate(firsts)  # each row's first token: which source it came from
    n = len(rows)
    for name, token in (('a', 10), ('b', 20), ('c', 30)):
        p = weights[name]
        freq = (rows == token).mean()
        # within 4 standard deviations
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5, (name, freq)


def test_epochs_read_every_window_once_in_a_new_order_each_epoch(tmp_path):
    """data_order='epochs': over one epoch's rows each window T apart is read exactly once (so each
    token as often as any other), as a pure function of the row index; the next epoch cuts and
    orders them anew."""
    N, T, B = 4001, 16, 10
    write_split(tmp_path, 'a', [np.arange(N)])  # a token's value is its position
    splits = {'a': data.Split(str(tmp_path), 'a', 'train', None)}
    W = (N - 1) // T - 1
    starts = []
    for first in range(0, 3 * W, B):
        x, y = data.window_batch(splits, {'a': 1.0}, np.random.default_rng(first), B, T, first, 5)
        assert (y[:, :-1] == x[:, 1:]).all() and (x[:, 1:] == x[:, :-1] + 1).all()  # whole windows
        starts += list(x[:, 0])
    epochs = [starts[e * W:(e + 1) * W] for e in range(2)]
    for e in epochs:
        phase = e[0] % T
        assert sorted(e) == list(range(phase, phase + W * T, T))  # every window once
        assert e != sorted(e)  # shuffled
    assert epochs[0] != epochs[1]
    # the same rows again (resume), from another rng: the same windows
    again = data.window_batch(splits, {'a': 1.0}, np.random.default_rng(99), B, T, W - 3, 5)[0]
    assert list(again[:, 0]) == starts[W - 3:W - 3 + B]
    # random windows as before: rows anywhere, repeats allowed
    x, _ = data.window_batch(splits, {'a': 1.0}, np.random.default_rng(0), 400, T)
    assert len(set(x[:, 0] % T)) > 1


def test_reading_windows_does_not_grow_memory(tmp_path):
    """Random reads all over a 200 MB shard: a long-lived memmap would keep what it touched
    resident."""
    write_split(tmp_path, 'big', [np.tile(np.arange(60000, dtype=np.uint16), 1667)])
    split = data.Split(str(tmp_path), 'big', 'train', None)
    status = lambda: open('/proc/self/status').read().splitlines()
    rss = lambda: int(next(l for l in status() if l.startswith('VmRSS')).split()[1]) // 1024  # MB
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
    split = data.Split(str(tmp_path), 'chat', 'train', None)
    packer = data.Packer({'chat': split}, {'chat': 1.0}, [0], 20, buffer=4)
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
    long_chat = conversation(system, ([50] * 6, [60] * 6), ([51] * 6, [61] * 6),
                             ([52] * 6, [62] * 6))  # 3 x 16 + 4
    long_question = conversation(system, ([53] * 40, [63] * 4))  # a user turn longer than the row
    long_reply = conversation(None, ([54] * 3, [64] * 40))
    write_chat(tmp_path, 'chat', [long_chat, long_question, long_reply])
    split = data.Split(str(tmp_path), 'chat', 'train', None)
    split.cut_pieces(21)
    # every piece: <s>, the system prompt where it fits, whole exchanges; at most 21 tokens, all
    # with trained tokens
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
    # as prepare.py cuts at max_conversation_tokens
    only_question = ([BOS, USR, 50, 51, 52, ASST], [0, 0, 0, 0, 0, 0])
    write_chat(tmp_path, 'chat', [only_question, conversation(None, ([50], [60]))])
    split = data.Split(str(tmp_path), 'chat', 'train', None)
    packer = data.Packer({'chat': split}, {'chat': 1.0}, [0], 8)
    assert split.usable.tolist() == [1]
    x, y, doc = packer.batch(0, 10)
    # one conversation of 6 tokens per row of 9
    assert not (x == 52).any() and (y == 60).sum() == 10


def test_each_conversation_is_trained_as_often_whatever_its_length(tmp_path):
    """Weight-proportional, not length-proportional: within a source every conversation is trained
    once per epoch; sources get their weight's share of the tokens; rows stay >= 95% full."""
    rng = np.random.default_rng(0)
    short = [conversation(None, ([50] * int(rng.integers(2, 30)),
                                 [60] * int(rng.integers(2, 30)))) for _ in range(60)]
    long = [conversation(None, ([51] * int(rng.integers(50, 200)),
                                [61] * int(rng.integers(20, 200)))) for _ in range(60)]
    write_chat(tmp_path, 'mixed', short + long)
    write_chat(tmp_path, 'other', [conversation(None, ([52] * 10, [62] * 10))] * 20)
    splits = {n: data.Split(str(tmp_path), n, 'train', None) for n in ('mixed', 'other')}
    packer = data.Packer(splits, {'mixed': 0.75, 'other': 0.25}, [0], 255)
    rows = packer.rows(0, 2000)
    split = splits['mixed']
    trained = np.zeros(split.conversations, dtype=int)
    tokens = np.zeros(2)
    for row in rows:
        for k, p in row:
            tokens[k] += packer.splits[packer.names[k]].pieces['length'][p]
            if packer.names[k] == 'mixed':
                trained[np.searchsorted(split.pieces['first'], p, side='right') - 1] += 1
    # epochs: each one drawn once before any is drawn again (a few still wait in the buffer at the
    # end)
    assert trained.max() - trained.min() <= 2 and trained.min() > 5
    assert abs(trained[:60].mean() - trained[60:].mean()) < 0.2
    assert tokens[0] / tokens.sum() == pytest.approx(0.75, abs=0.01)
    fill, _ = packer.stats(2000)
    assert fill > 0.95


def test_sft_batches_are_a_pure_function_of_the_row_index(tmp_path):
    """A resumed run (or a DDP rank) asks for rows from the middle of the stream: they must be the
    rows an uninterrupted run sees there."""
    rng = np.random.default_rng(1)
    write_chat(tmp_path, 'chat', [conversation([40],
                                               ([50] * int(rng.integers(1, 60)),
                                                [60] * int(rng.integers(1, 60))))
                                  for _ in range(50)])
    split = data.Split(str(tmp_path), 'chat', 'train', None)
    whole = data.Packer({'chat': split}, {'chat': 1.0}, [7], 64)
    batches = [whole.batch(i * 4, 4) for i in range(30)]
    for i in (29, 3, 17, 0):  # a fresh packer, in any order
        fresh = data.Packer({'chat': split}, {'chat': 1.0}, [7], 64)
        assert all(np.array_equal(a, b) for a, b in zip(fresh.batch(i * 4, 4), batches[i]))
        assert all(np.array_equal(a, b) for a, b in zip(whole.batch(i * 4, 4), batches[i]))
    other_seed = data.Packer({'chat': split}, {'chat': 1.0}, [8], 64).batch(0, 4)
    assert not np.array_equal(other_seed[0], batches[0][0])


def test_a_source_or_folder_named_shard_still_reads_its_index_and_mask(tmp_path):
    folder = tmp_path / 'shard_data'
    write_chat(folder, 'shard_x', [conversation(None, ([50], [60, 61]))] * 3)
    split = data.Split(str(folder), 'shard_x', 'train', None)
    x, y, doc = data.Packer({'shard_x': split}, {'shard_x': 1.0}, [0], 16).batch(0, 2)
    assert (y == 60).sum() == 2 * 2 and (doc[:, :8] != -1).all()


SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared',
                      'data')


DOLLY = os.path.join(SHARED, 'dolly', 'databricks-dolly-15k-safety-only.subset.jsonl')


OASST = os.path.join(SHARED, 'oasst1', 'en_100_tree.jsonl')


@pytest.mark.skipif(not (os.path.exists(DOLLY) and os.path.exists(OASST)),
                    reason='../shared/data is not here')
def test_real_sft_rows_are_95_percent_full_at_block_256_and_1024(tmp_path):
    """dolly + oasst1 + primer (the real data in ../shared/data), dev_sft's mixture: rows >= 95%
    full at the dev and prod block sizes, and the start of an SFT run says so (with trained tokens
    per step and cuts)."""
    from conftest import write_config
    primer = os.path.join(os.path.dirname(data.__file__), 'data', 'sample', 'primer.txt')
    srcs = {'primer': {'kind': 'primer', 'path': primer},
            'dolly': {'kind': 'dolly', 'path': DOLLY}, 'oasst1': {'kind': 'oasst1', 'path': OASST}}
    mixture = {'primer': 0.06, 'dolly': 0.47, 'oasst1': 0.47}
    cfg = write_config(tmp_path / 'cfg.py', str(tmp_path / 'out'), '', sources=srcs,
                       vocab_size=4096, num_proc=2,
                       phase='sft', mixture=mixture, **{**TINY_SFT, 'max_iters': 1})
    run('tokenizer.py', cfg, check=True)
    run('prepare.py', cfg, check=True)
    c = load_cfg(cfg)
    splits = {n: data.Split(c.data_dir, n, 'train', None) for n in mixture}
    for T in (256, 1024):
        fill, trained = data.Packer(splits, mixture, [0], T).stats(2000)
        assert fill >= 0.95, (T, fill)
        assert trained > 0.3 * (T + 1)  # replies are most of a dolly/oasst conversation
    p = run('train.py', cfg, '--block_size=256', check=True)
    line = next(l for l in p.stdout.splitlines() if l.startswith('SFT rows: '))
    # (one step's 8 rows: a noisier measure than 2000 rows)
    assert float(line.split()[2].rstrip('%')) >= 90
    assert 'trained tokens per step' in line and 'oasst1 ' in line


def test_the_mask_survives_from_prepare_to_the_loss(prepared):
    """End to end: primer text -> prepare.py shards -> the batch train.py builds -> the loss. The
    loss must be the cross entropy over exactly the positions predicting assistant tokens and
    <|eot|>."""
    cfg = load_cfg(prepared[0])
    tok = Tokenizer(cfg.tokenizer_path)
    splits = {'primer': data.Split(cfg.data_dir, 'primer', 'train', tok.sha256)}
    assert data.sft_mode(splits)
    T = 64
    x, y, doc = map(torch.from_numpy, data.Packer(splits, {'primer': 1.0}, [3], T).batch(0, 8))
    # what the rows must hold, recomputed from the source text with the chat template
    src = sources.source_settings('primer', cfg.sources['primer'])
    rendered = [render_conversation(tok, c) for _, c, _ in sources.iter_documents(src)]
    roles = (tok.sys_id, tok.usr_id, tok.asst_id)

    def turns(ids):
        at = [i for i, t in enumerate(ids) if t in roles] + [len(ids)]
        return [ids[a:b] for a, b in zip(at, at[1:])]

    def comes_from(piece, ids):
        """<s>, the system turn (if kept), then consecutive turns of the conversation (the last ones
        maybe cut)."""
        mine, theirs = turns(piece), turns(ids)
        if piece[0] != tok.bos_id or not mine:
            return False
        if mine[0][0] == tok.sys_id:
            if mine.pop(0) != theirs[0]:
                return False
        starts = [j for j, t in enumerate(theirs) if mine and t[0] == mine[0][0] == tok.usr_id]
        return any(all(j + i < len(theirs) and theirs[j + i][:len(m)] == m for i,
                       m in enumerate(mine)) for j in starts)

    def trained(ids):
        """1 where the template trains: assistant content and the <|eot|> ending it, found from the
        role tokens."""
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
            # a piece ending the row: its last token is only a target
            if pos[-1] == T - 1 and y[row, -1] != -1:
                piece.append(y[row, -1].item())
            assert any(comes_from(piece, ids) for ids, _ in rendered), piece
            flags = trained(piece)
            want = [t if m else -1 for t, m in zip(piece[1:], flags[1:])]
            # the last position faces the next piece (or padding): no target
            want += [-1] * (len(pos) - len(want))
            assert y[row, pos].tolist() == want
            n_checked += 1
    assert n_checked >= 8
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                            n_kv_head=2, n_embd=32))
    logits, loss = model(x, y, doc)
    keep = y != -1
    manual = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(loss, manual)
    assert 0 < keep.sum() < (x != 0).sum()  # some positions train, many do not


# ---- issue 24: every file of a prepared split is checked when it is opened ----

def damage(path, how):
    if how == 'deleted':
        os.remove(path)
    elif how == 'truncated':
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) - 1)
    else:  # an offset rewritten: (index, value)
        starts = np.fromfile(path, dtype=np.int64)
        starts[how[0]] = how[1]
        starts.tofile(path)


@pytest.mark.parametrize('file, how', [
    ('mask', 'deleted'), ('mask', 'truncated'), ('docs', 'deleted'), ('docs', 'truncated'),
    ('docs', (0, 3)), ('docs', (2, 1)), ('docs', (2, 999)), ('docs', (1, -4))],
    ids=['mask deleted', 'mask truncated', 'docs deleted', 'docs truncated', 'docs not from 0',
         'docs not increasing', 'docs past the tokens', 'docs negative'])
def test_a_damaged_index_or_mask_says_rerun_prepare(tmp_path, file, how):
    write_split(str(tmp_path), 'c', [[1, 5, 6, 7], [1, 5, 8], [1, 5, 9, 9, 9]], chat=True)
    path = tmp_path / 'c' / 'train' / f'{file}_00000.bin'
    damage(path, how)
    with pytest.raises(SystemExit) as e:
        data.load_split(str(tmp_path), 'c', 'train')
    assert str(path) in str(e.value) and 're-run `python prepare.py' in str(e.value), e.value


def test_a_truncated_index_of_a_text_source_is_found_and_whole_files_pass(tmp_path):
    write_split(str(tmp_path), 't', [[1, 5, 6, 7], [1, 5, 8], [1, 5, 9, 9, 9]])
    data.load_split(str(tmp_path), 't', 'val')  # as prepare.py wrote it: fine
    damage(tmp_path / 't' / 'train' / 'docs_00000.bin', 'truncated')
    with pytest.raises(SystemExit, match='docs_00000.bin.*3 documents'):
        data.load_split(str(tmp_path), 't', 'train')


@pytest.mark.parametrize('entry', [{'file': 'shard_00000.bin'}, 'shard_00000.bin',
                                   {'file': 'shard_00000.bin', 'tokens': '12', 'documents': 3}])
def test_a_shard_entry_without_its_counts_is_a_damaged_meta_json(tmp_path, entry):
    import json
    write_split(str(tmp_path), 't', [[1, 5, 6, 7], [1, 5, 8], [1, 5, 9, 9, 9]])
    path = tmp_path / 't' / 'train' / 'meta.json'
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, 'shards': [entry]}))
    with pytest.raises(SystemExit, match='meta.json is damaged.*re-run'):
        data.load_split(str(tmp_path), 't', 'train')
