"""
Prepared data in, batches out: everything that reads what prepare.py wrote (train.py, eval.py and
bench.py read shards only through here; prepare.py only writes).

    split = Split(data_dir, 'roam', 'train', tok.sha256)  # a prepared split, checked against tok
    x, y = window_batch({'roam': split}, {'roam': 1.0}, rng, B, T)  # pretraining rows
    x, y, doc = Packer(splits, weights, [seed], T).batch(first_row, B)  # SFT rows, packed

The files (see prepare.py): <data_dir>/<source>/{train,val}/ meta.json and per shard shard_*.bin
(tokens), docs_*.bin (the offset of each document's first token) and mask_*.bin (chat sources: 1 =
train on it). Every read maps a file afresh (np.memmap per window or per batch): a long-lived memmap
keeps every page it has touched mapped, and a long run's memory would grow.
"""
import bisect
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from common import die
from tokenizer import SPECIALS

FORMAT_VERSION = 1  # of the shard files: prepare.py writes it into meta.json, load_split checks it
# How a rendered conversation marks its turns (tokenizer.turn_markers; prepare.py records the
# tokenizer's in a chat split's meta.json): what comes before the first turn (our <s>), and the ids
# that start each role's turn. Ours, for splits prepared before the record existed:
OUR_TURNS = {'head': 1, 'system': [SPECIALS.index('<|sys|>')],
             'user': [SPECIALS.index('<|usr|>')], 'assistant': [SPECIALS.index('<|asst|>')]}


# ----------------------------------------------------------------------------------------------
# Reading a prepared split

def is_prepared(data_dir, name, split):
    """Has prepare.py finished this split of this source (its meta.json, written last, is there)?"""
    return os.path.exists(os.path.join(data_dir, name, split, 'meta.json'))


def load_split(data_dir, name, split, tokenizer_sha256=None):
    """Read a prepared split's meta.json and check it; SplitReader reads through it."""
    path = os.path.join(data_dir, name, split, 'meta.json')
    if not os.path.exists(path):
        die(f"no prepared data for source '{name}' ({path} is missing): run `python prepare.py "
            "<your config>`")
    try:
        meta = json.load(open(path))
        meta['shards'], meta['dtype'], meta['tokenizer_sha256']
        for shard in meta['shards']:  # (each shard's counts, as SplitWriter writes them)
            if not (isinstance(shard['file'], str) and type(shard['tokens']) is int
                    and type(shard['documents']) is int):
                raise TypeError(f"shard entry {json.dumps(shard)[:80]}")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        die(f"{path} is damaged ({type(e).__name__}: {e}): re-run `python prepare.py <your "
            f"config>`")
    version = meta.get('format_version', FORMAT_VERSION)
    if meta['dtype'] not in ('uint16', 'uint32') or version != FORMAT_VERSION:
        die(f"{path}: shards in an unknown format (dtype {meta['dtype']}, format_version "
            f"{meta.get('format_version')}): re-run `python prepare.py <your config>`")
    if tokenizer_sha256 and meta['tokenizer_sha256'] != tokenizer_sha256:
        die(f"{path} was made with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]}, the "
            f"current one is {tokenizer_sha256[:12]}): re-run `python prepare.py <your config>` to "
            "re-tokenize it")
    folder = os.path.dirname(path)
    for shard in meta['shards']:
        shard['path'] = os.path.join(folder, shard['file'])
        # its document index and loss mask sit beside it: shard_00003.bin -> docs_00003.bin,
        # mask_00003.bin
        number = shard['file'][len('shard'):]
        shard['docs_path'] = os.path.join(folder, 'docs' + number)
        shard['mask_path'] = os.path.join(folder, 'mask' + number)
        check_shard(shard, meta['dtype'], meta.get('format') in ('chat', 'pairs'))
    return meta


def check_shard(shard, dtype, chat):
    """Every file of a shard against meta.json: the tokens, the loss mask (chat sources) and the
    document index have their sizes, and the index is whole (offsets from 0, increasing, inside the
    shard): a truncated or damaged docs_*.bin must never train on wrong conversation boundaries."""
    rerun = "re-run `python prepare.py <your config>` to rebuild it"
    tokens, documents = shard['tokens'], shard['documents']
    expected = [(shard['path'], tokens * np.dtype(dtype).itemsize, f"{tokens} {dtype} tokens"),
                (shard['docs_path'], 8 * documents, f"the index of {documents} documents")]
    if chat:
        expected.append((shard['mask_path'], tokens, f"the loss mask of {tokens} tokens"))
    for path, size, what in expected:
        actual = os.path.getsize(path) if os.path.isfile(path) else -1
        if actual != size:
            state = 'is missing' if actual < 0 else f'has the wrong size ({actual:,} bytes)'
            die(f"{path} {state}: meta.json records {what} ({size:,} bytes): {rerun}")
    starts = np.fromfile(shard['docs_path'], dtype=np.int64)
    if len(starts) and (starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= tokens):
        die(f"{shard['docs_path']} is damaged: a shard's document offsets start at 0 and increase, "
            f"below its {tokens} tokens: {rerun}")


class SplitReader:
    """Reads what SplitWriter wrote: a split's checked meta.json (`meta`, `shards`, `dtype`; `chat`:
    conversations, `pairs`: preference pairs, each two documents in a row, chosen then rejected)
    and, per shard i, its tokens, loss mask and document index. train.py and eval.py read shards
    only through this class, so the file layout is known here alone. Each call maps the file afresh:
    a long-lived memmap keeps every page it has touched mapped, and a long run's memory would
    grow."""

    def __init__(self, data_dir, name, split, tokenizer_sha256=None):
        self.meta = load_split(data_dir, name, split, tokenizer_sha256)
        self.shards = self.meta['shards']
        self.dtype = np.dtype(self.meta['dtype'])
        self.chat = self.meta['format'] == 'chat'
        self.pairs = self.meta['format'] == 'pairs'

    def tokens(self, i):
        """Shard i's tokens, (tokens,) uint16/uint32, a read-only memmap."""
        return np.memmap(self.shards[i]['path'], dtype=self.dtype, mode='r')

    def mask(self, i):
        """Shard i's loss mask (chat sources), (tokens,) uint8 memmap: 1 where the model is
        trained."""
        return np.memmap(self.shards[i]['mask_path'], dtype=np.uint8, mode='r')

    def doc_starts(self, i):
        """Shard i's document index, (documents,) int64: the offset of each document's first
        token."""
        return np.fromfile(self.shards[i]['docs_path'], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Rows for training: pretraining windows, SFT pieces and packing, the mixture

class Split:
    def __init__(self, data_dir, name, split, tokenizer_sha256):
        self.data = SplitReader(data_dir, name, split, tokenizer_sha256)
        self.meta, self.shards = self.data.meta, self.data.shards
        self.dtype, self.chat, self.pairs = self.data.dtype, self.data.chat, self.data.pairs
        self.name = name
        self.tokens = sum(s['tokens'] for s in self.shards)
        if self.tokens == 0:
            die(f"source '{name}' has no {split} tokens (see {data_dir}/{name}/{split}/meta.json): "
                "give it more documents or a val_frac > 0")
        self.shard_p = np.array([s['tokens'] for s in self.shards]) / self.tokens
        # SFT: the conversations cut for rows of cut_for tokens (cut_pieces)
        self.pieces, self.cut_for = None, None

    def read(self, shard, start, n):
        mm = self.data.tokens(shard)
        out = np.array(mm[start:start + n], dtype=np.int64)
        del mm
        return out

    def cut_pieces(self, R):
        """Every conversation as pieces of at most R tokens, for SFT rows of R = block_size + 1
        tokens. A conversation that fits is one piece. A longer one is cut at turn boundaries: each
        piece is <s>, the system prompt where it fits, then whole exchanges (a user turn and the
        reply to it), as many as fit. An exchange longer than R on its own keeps the head of its
        user turn and of its reply (counted as
        truncated). A piece is up to three [begin, end) token ranges of one shard, kept as arrays:
        ranges (P, 3, 2), shard (P,), length (P,), trained (P,: its loss-mask tokens, never 0), and
        first (conversations + 1,): conversation c's pieces are first[c]:first[c + 1]."""
        if self.pairs:
            return self.cut_pairs(R)
        ranges, shard_of, trained, first = [], [], [], [0]
        # conversations longer than R, and those of them with a turn cut to fit
        self.truncated = self.long = 0
        for i, s in enumerate(self.shards):
            starts = self.data.doc_starts(i)
            ends = np.append(starts[1:], s['tokens'])
            mask = np.array(self.data.mask(i))
            sums = np.add.reduceat(mask, starts, dtype=np.int64) if len(starts) else starts
            tokens = self.data.tokens(i)
            for a, b, n in zip(starts.tolist(), ends.tolist(), sums.tolist()):
                if b - a <= R:
                    cut, truncated = [((a, b),)], False
                else:
                    cut, truncated = split_at_turns(np.array(tokens[a:b]), a, R,
                                                    self.meta.get('turns', OUR_TURNS))
                    self.long += 1
                self.truncated += truncated
                for piece in cut:
                    k = int(sum(mask[p:q].sum() for p,
                                q in piece)) if len(cut) > 1 or truncated else n
                    if k > 0:  # a piece with nothing to learn is never used
                        ranges.append(list(piece) + [(0, 0)] * (3 - len(piece)))
                        shard_of.append(i)
                        trained.append(k)
                first.append(len(trained))
            del tokens
        self.keep_pieces(ranges, shard_of, trained, first, R, 3,
                         "no conversation keeps a reply to train on")

    def keep_pieces(self, ranges, shard_of, trained, first, R, per_piece, none_left):
        """Store what cut_pieces or cut_pairs found as arrays (see cut_pieces), and which
        conversations (or pairs) have a piece to train on; stop with `none_left` if none has."""
        self.conversations, self.cut_for = len(first) - 1, R
        ranges = np.array(ranges, dtype=np.int64).reshape(-1, per_piece, 2)
        self.pieces = {'ranges': ranges, 'shard': np.array(shard_of, dtype=np.int64),
                       'length': (ranges[:, :, 1] - ranges[:, :, 0]).sum(1),
                       'trained': np.array(trained, dtype=np.int64),
                       'first': np.array(first, dtype=np.int64)}
        self.usable = np.flatnonzero(np.diff(self.pieces['first']) > 0)
        if len(self.usable) == 0:
            die(f"source '{self.name}': {none_left} in rows of {R - 1} tokens: raise block_size")

    def cut_pairs(self, R):
        """DPO: every preference pair as one piece, its chosen sequence then its rejected one (a
        pair stays in one row; each sequence attends only to itself: Packer gives them doc ids 2j
        and 2j + 1). A pair longer than R tokens gives each side R // 2 tokens at least (more for
        one when the other is shorter), and a side cut to fit keeps what starts every row (our <s>),
        the end of its conversation and the head of its reply (trim_side); `long` counts them, and
        a pair left without a reply token on a side is not used. The arrays are cut_pieces', with
        four ranges a piece: two per side."""
        head = self.meta.get('turns', OUR_TURNS)['head']
        ranges, shard_of, trained, first = [], [], [], [0]
        self.truncated = self.long = 0
        for i, s in enumerate(self.shards):
            starts = self.data.doc_starts(i)
            ends = np.append(starts[1:], s['tokens'])
            mask = np.array(self.data.mask(i), dtype=np.int64)
            for a, m, b in zip(starts[0::2].tolist(), starts[1::2].tolist(), ends[1::2].tolist()):
                keep_c, keep_r = m - a, b - m
                if keep_c + keep_r > R:
                    self.long += 1
                    keep_c = min(keep_c, max(R // 2, R - keep_r))
                    keep_r = min(keep_r, R - keep_c)
                sides = [trim_side(a, m, mask, keep_c, head), trim_side(m, b, mask, keep_r, head)]
                # (a side's first token is never a target: it is predicted from another's)
                k = [sum(mask[p + (p == start):q].sum() for p, q in side)
                     for side, start in zip(sides, (a, m))]
                if k[0] > 0 and k[1] > 0:
                    ranges.append(sides[0] + sides[1])
                    shard_of.append(i)
                    trained.append(int(k[0] + k[1]))
                first.append(len(trained))
        self.keep_pieces(ranges, shard_of, trained, first, R, 4,
                         "no pair keeps a reply on both sides")


def trim_side(a, b, mask, keep, head):
    """One side of a pair, tokens [a, b) of a shard, cut to `keep` tokens as two [begin, end)
    ranges (the second may be empty): whole if it fits; else its first `head` tokens (our <s>),
    then as much of the end of the conversation before the reply as leaves the reply at least half
    of `keep`, then the reply's head. The reply starts where the mask's first 1 is."""
    if b - a <= keep:
        return [(a, b), (b, b)]
    reply = a + int(np.argmax(mask[a:b] > 0))  # the reply's first token
    keep_reply = min(b - reply, max(keep // 2, keep - (reply - a)))
    keep_prompt = keep - keep_reply  # of which `head` from the start, the rest from the end
    if keep_prompt >= reply - a:
        return [(a, reply + keep_reply), (b, b)]
    return [(a, a + min(head, keep_prompt)),
            (reply - max(keep_prompt - head, 0), reply + keep_reply)]


def turn_starts(ids, turns):
    """[(position, role)] of every turn of a rendered conversation, in order: where the ids that
    start a role's turn (turns[role], e.g. [<|usr|>], or ChatML's <|im_start|> 'user' '\n')
    occur. User text never holds a control token, so they occur nowhere else."""
    found = []
    for role in ('system', 'user', 'assistant'):
        marker = turns[role]
        n = len(ids) - len(marker) + 1
        hit = np.ones(max(n, 0), dtype=bool)
        for k, t in enumerate(marker):
            hit &= ids[k:k + n] == t
        found += [(p, role) for p in np.flatnonzero(hit).tolist()]
    return sorted(found)


def split_at_turns(ids, offset, R, markers=OUR_TURNS):
    """Pieces of one conversation longer than R tokens (see Split.cut_pieces): lists of (begin, end)
    ranges, offset into the shard; and whether a turn had to be cut. `markers`: how the template
    marks turns (OUR_TURNS)."""
    starts = turn_starts(ids, markers)
    at = [p for p, _ in starts] + [len(ids)]
    turns = [(p, q, role) for (p, role), q in zip(starts, at[1:])]
    system = turns.pop(0)[:2] if turns and turns[0][2] == 'system' else None
    # exchanges: a user turn and the reply to it, as (user begin, reply begin, end); a last question
    # without a reply goes
    exchanges = [(u[0], a[0], a[1]) for u, a in zip(turns, turns[1:])
                 if u[2] == 'user' and a[2] == 'assistant']
    head_len = markers['head']  # what starts every piece: our <s>, nothing in ChatML
    pieces, truncated, i = [], False, 0
    while i < len(exchanges):
        room = R - head_len  # after <s>
        head = (0, head_len)
        if system and system[1] - system[0] + exchanges[i][2] - exchanges[i][0] <= room:
            head = (0, system[1])  # <s> and the system turn are contiguous
            room -= system[1] - system[0]
        u, a, end = exchanges[i]
        if end - u <= room:  # whole exchanges, as many as fit
            j = i + 1
            while j < len(exchanges) and exchanges[j][2] - u <= room:
                end, j = exchanges[j][2], j + 1
            piece = [head, (u, end)]
            i = j
        # one exchange longer than the row: the head of the question (half the row at least, if it
        # is that
        else:
            # long: its instruction comes first) and of the reply
            keep_user = min(a - u, max(room - (end - a), room // 2))
            piece = [head, (u, u + keep_user), (a, min(end, a + room - keep_user))]
            truncated, i = True, i + 1
        pieces.append(tuple((offset + p, offset + q) for p, q in piece))
    return pieces, truncated


def window_batch(splits, weights, rng, B, T, first=None, seed=0):
    """Pretraining: B rows, each a window of T + 1 tokens of a source drawn by weight (shorter
    only if a shard is; the rest has no target). Random windows (nanoGPT's), or with `first` (the
    index of the batch's first row in the run) the windows of `epoch_window`: each window of a
    source once an epoch. Returns x, y (B, T) int64 numpy arrays."""
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    p /= p.sum()
    x, y = np.zeros((B, T), dtype=np.int64), np.full((B, T), -1, dtype=np.int64)
    for r in range(B):
        split = splits[names[rng.choice(len(names), p=p)]]
        if first is None:
            shard = rng.choice(len(split.shards), p=split.shard_p)
            tokens = split.shards[shard]['tokens']
            start = rng.integers(0, tokens - min(T + 1, tokens) + 1)
        else:
            shard, start = epoch_window(split, first + r, T, seed)
        n = min(T + 1, split.shards[shard]['tokens'] - start)
        toks = split.read(shard, start, n)
        x[r, :n - 1], y[r, :n - 1] = toks[:-1], toks[1:]
    return x, y


def epoch_window(split, i, T, seed):
    """(shard, start) of row i of a run that reads the split in epochs (data_order='epochs').

    Random windows see a source's text unevenly: after 5 passes' worth of them a token has been
    read anywhere from 0 to 10+ times, and a small corpus learnt that often is overfit where it was
    read most. Here an epoch cuts every shard into windows T tokens apart, starting at a random
    phase (so that epochs see different cuts), and reads them all once in a shuffled order: each
    token the same number of times. The order is an affine permutation of the window numbers,
    (a * slot + b) mod W with a coprime to W, drawn per epoch from the seed: a pure function of
    the row index (resume needs no state) and O(1) however large the corpus. In a mixture each
    source reads its own sequence at the rows that draw it: no window twice before all of that
    sequence has gone by, but which ones an epoch reads is then up to the draws."""
    tokens = np.array([s['tokens'] for s in split.shards])
    counts = np.maximum((tokens - 1) // T - 1, 1)  # one window spare, so any phase fits
    W = int(counts.sum())
    epoch, slot = divmod(i, W)
    rng = np.random.default_rng([seed, 7_777, epoch])
    a = int(rng.integers(1, W + 1))
    while math.gcd(a, W) != 1:
        a += 1
    window = (a * slot + int(rng.integers(0, W))) % W
    shard = int(np.searchsorted(np.cumsum(counts), window, side='right'))
    k = window - int(counts[:shard].sum())
    phase = int(rng.integers(0, T)) if tokens[shard] > 2 * T + 1 else 0
    return shard, phase + k * T


class Packer:
    """SFT rows, as one stream for the whole run: row i is a pure function of (seed, i), so a batch
    is a pure function of (seed, step, micro-step, rank) like a pretraining batch (resume needs no
    state, each DDP rank takes the rows one process would take at its place; every rank runs the
    same cheap packing of lengths).

    Conversations are drawn source by source so that each source gets its weight's share of the
    tokens, and within a source in a fresh random order every epoch: a conversation is trained once
    per epoch of its source, whatever its length. Their pieces (Split.cut_pieces) wait in a buffer;
    a row takes the longest waiting piece that still fits, again and again (best fit), and is padded
    only when none fits. What does not fit waits for a later row: nothing is discarded, and a piece
    that keeps being passed over starts a row of its own. Each piece attends only to itself (doc
    ids).

    Use: packer = Packer(splits, weights, seed_list, T); x, y, doc = packer.batch(first_row, B)
    gives (B, T) int64 numpy arrays (targets -1 where untrained, doc ids -1 on padding);
    packer.stats(rows) gives the fill rate and trained tokens per row. Nothing else is needed to
    read SFT rows (a faster data path or another attention mask only has to consume batch()'s
    arrays)."""

    def __init__(self, splits, weights, seed, T, buffer=32):
        self.splits, self.seed, self.T, self.size = splits, seed, T, buffer
        self.names = list(weights)
        total = sum(weights.values())
        self.share = np.array([weights[n] / total for n in self.names])
        for s in splits.values():
            if s.cut_for != T + 1:
                s.cut_pieces(T + 1)
        self.start()

    def start(self):
        self.cache, self.next_row = {}, 0
        # sorted (length, -draw number, source index, piece): of equal lengths, the oldest last
        self.waiting = []
        self.drawn = np.zeros(len(self.names))  # tokens drawn per source
        # per source: (epoch, order of its conversations, position)
        self.order = [(-1, None, 0)] * len(self.names)
        self.draws = 0

    def draw(self):
        """The next conversation, from the source furthest below its share of the tokens drawn so
        far."""
        k = int(np.argmax(self.share * self.drawn.sum() - self.drawn))
        split = self.splits[self.names[k]]
        epoch, order, pos = self.order[k]
        if order is None or pos == len(order):
            epoch, pos = epoch + 1, 0
            order = split.usable[np.random.default_rng([*self.seed, k,
                                                        epoch]).permutation(len(split.usable))]
        self.order[k] = (epoch, order, pos + 1)
        c = order[pos]
        for p in range(split.pieces['first'][c], split.pieces['first'][c + 1]):
            length = int(split.pieces['length'][p])
            bisect.insort(self.waiting, (length, -self.draws, k, p))
            self.drawn[k] += length
            self.draws += 1

    def make_row(self):
        row, room = [], self.T + 1
        while True:
            while len(self.waiting) < self.size:
                self.draw()
            i = -1
            # a piece passed over for 4 x size draws (a length that rarely fits) starts the next row
            if not row:
                oldest = max(range(len(self.waiting)), key=lambda j: self.waiting[j][1])
                i = oldest if self.draws + self.waiting[oldest][1] > 4 * self.size else -1
            if i < 0:  # the longest piece that still fits (of equal lengths, the oldest)
                i = bisect.bisect_right(self.waiting, (room, float('inf'))) - 1
            if i < 0:
                return row
            length, _, k, p = self.waiting.pop(i)
            row.append((k, p))
            room -= length

    def rows(self, first, n, forget=True):
        """Rows first .. first + n - 1 as lists of (source index, piece). Rows before `first` are
        forgotten (training asks for increasing rows); asking for an earlier one packs the stream
        again from row 0."""
        if first < self.next_row and first not in self.cache:
            self.start()
        while self.next_row < first + n:
            self.cache[self.next_row] = self.make_row()
            self.next_row += 1
        out = [self.cache[i] for i in range(first, first + n)]
        if forget:
            for i in [i for i in self.cache if i < first]:
                del self.cache[i]
        return out

    def batch(self, first, B, forget=True):
        """Rows first .. first + B - 1 as x, y, doc_ids (B, T) int64 numpy arrays: targets are -1
        except where the loss mask is 1; doc_ids number the pieces of a row (-1: padding)."""
        R = self.T + 1
        toks, mask = np.zeros((B, R), dtype=np.int64), np.zeros((B, R), dtype=np.int64)
        doc = np.full((B, R), -1, dtype=np.int64)
        maps = {}  # one memmap per shard file per batch, not per piece
        for r, row in enumerate(self.rows(first, B, forget)):
            at = 0
            for j, (k, p) in enumerate(row):
                split = self.splits[self.names[k]]
                shard = (k, int(split.pieces['shard'][p]))
                if shard not in maps:
                    maps[shard] = split.data.tokens(shard[1]), split.data.mask(shard[1])
                ids, m = maps[shard]
                for q, (b, e) in enumerate(split.pieces['ranges'][p].tolist()):
                    toks[r, at:at + e - b], mask[r, at:at + e - b] = ids[b:e], m[b:e]
                    # a pair's chosen and rejected sequences (two ranges each) are two documents:
                    # 2j and 2j + 1
                    doc[r, at:at + e - b] = 2 * j + q // 2 if split.pairs else j
                    at += e - b
        del maps
        y = np.where(mask[:, 1:] == 1, toks[:, 1:], -1)
        return toks[:, :-1], y, doc[:, :-1]

    def stats(self, rows):
        """Fill (share of row tokens that are conversation), trained tokens per row, over the first
        `rows` rows."""
        packed = self.rows(0, rows, forget=False)
        lengths = [sum(int(self.splits[self.names[k]].pieces['length'][p]) for k,
                       p in row) for row in packed]
        trained = [sum(int(self.splits[self.names[k]].pieces['trained'][p]) for k,
                       p in row) for row in packed]
        return sum(lengths) / (rows * (self.T + 1)), sum(trained) / rows


def sft_mode(splits):
    return all(s.chat for s in splits.values())


def dpo_mode(splits):
    return all(s.pairs for s in splits.values())


def check_mixture(cfg):
    mixture = cfg.mixture
    if not isinstance(mixture, dict) or not mixture:
        die(f"mixture must be a non-empty dict {{source name: weight}}, got {mixture!r}")
    for name, w in mixture.items():
        if name not in cfg.sources:
            die(f"mixture names '{name}', which is not in sources ({', '.join(cfg.sources)}): add "
                "it to sources and run `python prepare.py <your config>`")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            die(f"mixture weight for '{name}' must be a finite number >= 0, got {w!r}")
    if sum(mixture.values()) <= 0:
        die("mixture weights add up to 0: give at least one source a positive weight")
    return {n: w for n, w in mixture.items() if w > 0}


@dataclass
class RunData:
    """The prepared splits a training run reads."""
    mixture: dict  # {source: weight > 0}
    train: dict  # {source: Split}
    val: dict  # {source: Split}: the validated sources
    sft: bool  # every mixture source is a chat source: masked loss, packed conversations
    dpo: bool  # every mixture source holds preference pairs: DPO on packed pairs
    best_on: list  # the val sources whose loss chooses best.pt


def build_data(cfg, tok):
    """The prepared splits a run reads (RunData), checked against the tokenizer."""
    mixture = check_mixture(cfg)
    # (checks they match the tokenizer)
    train = {n: Split(cfg.data_dir, n, 'train', tok.sha256) for n in mixture}
    val_names = cfg.val_sources if cfg.val_sources is not None else list(mixture)
    for n in val_names:
        if n not in cfg.sources:
            die(f"val_sources names '{n}', which is not in sources")
    val = {n: Split(cfg.data_dir, n, 'val', tok.sha256) for n in val_names}
    sft, dpo = sft_mode(train), dpo_mode(train)
    if any(s.pairs for s in train.values()) and not dpo:
        die(f"the mixture mixes preference pairs ({[n for n, s in train.items() if s.pairs]}) with "
            "other sources: DPO trains on pairs alone (a run of its own, after SFT)")
    if dpo and not dpo_mode(val):
        die("this is a DPO run (every mixture source holds preference pairs) but val_sources "
            f"includes other sources ({[n for n, s in val.items() if not s.pairs]}): validate on "
            "pairs")
    if sft and not sft_mode(val):
        die("this is an SFT run (every mixture source is a chat source) but val_sources includes "
            f"text sources ({[n for n, s in val.items() if not s.chat]}): validate on chat sources")
    # best.pt is chosen on best_on: by default the largest validated source of the mixture (a small
    # one repeated many times overfits, and its val loss rises, long before the rest stops
    # improving)
    best_on = [cfg.best_on] if isinstance(cfg.best_on, str) else cfg.best_on
    if best_on is None:
        validated = [n for n in train if n in val] or list(val)
        size = lambda n: train[n].tokens if n in train else 0
        best_on = [max(validated, key=size)] if validated else []
    for n in best_on:
        if n not in val:
            die(f"best_on names '{n}', which is not among the validated sources "
                f"({', '.join(val) or 'none'}): name sources of val_sources (or of the mixture)")
    return RunData(mixture, train, val, sft, dpo, best_on)


def make_batches(cfg, run_data, rank, world):
    """The run's batch readers, each giving x, y, doc_ids (None for pretraining) as numpy arrays:
    train_batch(step, micro) is micro-batch `micro` of a step (0 .. gradient_accumulation_steps - 1,
    counted over all processes, so N processes train what one does); val_batches(i, name) yields
    this process's share of a val source's batches, the same ones at every evaluation. Also returns
    the SFT packer (None for pretraining)."""
    B, T = cfg.batch_size, cfg.block_size
    train, val, mixture = run_data.train, run_data.val, run_data.mixture
    sft = run_data.sft or run_data.dpo  # rows packed with conversations (SFT) or pairs (DPO)
    # SFT: one packed stream of conversations
    packer = Packer(train, mixture, [cfg.seed], T) if sft else None
    val_packers = {n: Packer({n: s}, {n: 1.0}, [cfg.seed, 1_000_003], T) for n,
                   s in val.items()} if sft else {}

    def train_batch(step, micro):
        if sft:
            return packer.batch((step * cfg.gradient_accumulation_steps + micro) * B, B)
        rng = np.random.default_rng([cfg.seed, step, micro])
        if cfg.data_order == 'epochs':  # this micro-batch's rows in the run's sequence of rows
            first = (step * cfg.gradient_accumulation_steps + micro) * B
            return *window_batch(train, mixture, rng, B, T, first, cfg.seed), None
        return *window_batch(train, mixture, rng, B, T), None

    def val_batches(i, name):
        for k in range(rank, cfg.eval_iters, world):  # the processes share the batches out
            if sft:
                yield val_packers[name].batch(k * B, B, forget=False)
            else:
                rng = np.random.default_rng([cfg.seed, 1_000_003, i, k])
                yield (*window_batch({name: val[name]}, {name: 1.0}, rng, B, T), None)

    return train_batch, val_batches, packer


# ----------------------------------------------------------------------------------------------
# Evaluation sets and the loss and bits per byte of one

def windows(tokens, T):
    """Non-overlapping windows over a token stream: each predicts its T tokens from what precedes
    them in the window."""
    return [(tokens[s:s + T], tokens[s + 1:s + T + 1]) for s in range(0, len(tokens) - 1, T)]


def split_sequences(cfg, tok, name, T):
    """The fixed evaluation set of a prepared val split: its first eval_tokens tokens, in order.
    Text is cut into windows; chat conversations are evaluated one by one (truncated to the
    context), on their assistant tokens only."""
    val = SplitReader(cfg.data_dir, name, 'val', tok.sha256)
    seqs, used = [], 0
    for i, shard in enumerate(val.shards):
        if used >= cfg.eval_tokens:
            break
        n = min(shard['tokens'], cfg.eval_tokens - used)
        ids = val.tokens(i)[:n].astype(np.int64).tolist()
        used += n
        if not val.chat:
            seqs += windows(ids, T)
            continue
        mask = val.mask(i)[:n].tolist()
        starts = val.doc_starts(i).tolist()
        for a, b in zip(starts, starts[1:] + [n]):
            if a < n:
                conv, m = ids[a:min(b, n)][:T + 1], mask[a:min(b, n)][:T + 1]
                seqs.append((conv[:-1], [t if k else -1 for t, k in zip(conv[1:], m[1:])]))
    return seqs


def pair_sequences(cfg, tok, name, T):
    """The held-out pairs of a prepared val split of pairs (its first eval_tokens tokens): a list of
    (chosen, rejected), each an (ids, targets) sequence of at most T tokens scored on its reply
    (targets -1 elsewhere), a long side cut as training cuts it (trim_side)."""
    val = SplitReader(cfg.data_dir, name, 'val', tok.sha256)
    head = val.meta.get('turns', OUR_TURNS)['head']
    out, used = [], 0
    for i, shard in enumerate(val.shards):
        ids, mask = val.tokens(i), np.array(val.mask(i), dtype=np.int64)
        starts = val.doc_starts(i).tolist()
        ends = starts[1:] + [shard['tokens']]
        for a, m, b in zip(starts[0::2], starts[1::2], ends[1::2]):
            if used >= cfg.eval_tokens:
                return out
            used += b - a
            pair = []
            for p, q in ((a, m), (m, b)):
                seq = [(int(t), int(k)) for r0, r1 in trim_side(p, q, mask, T + 1, head)
                       for t, k in zip(ids[r0:r1], mask[r0:r1])]
                pair.append(([t for t, _ in seq[:-1]], [t if k else -1 for t, k in seq[1:]]))
            out.append(tuple(pair))
    return out


def loss_sums(nats, y, token_bytes):
    """One batch's share of the loss and bits per byte of an evaluation, which train.py (its val
    loss) and eval.py both add up: nats (B, T) the loss at each position (0 where there is no
    target), y (B, T) the targets (-1: none), token_bytes (vocab,) the UTF-8 bytes of each token (0
    for control tokens). Returns (nats, targets, text nats, text bytes), each summed over the batch.
    The loss per token counts every target; bits per byte only the targets that are text (control
    tokens such as <s> and <|eot|> have no bytes, so their nats would be bits of nothing). 0-d
    tensors: tensor methods only, so this module needs no torch."""
    trained = y != -1
    n_bytes = token_bytes[y.clamp(min=0)] * trained  # (B, T): 0 where no target or a control token
    return nats.sum(), trained.sum(), (nats * (n_bytes > 0)).sum(), n_bytes.sum()


def bits_per_byte(nats, n_bytes):
    """Summed nats over the UTF-8 bytes they predict, in bits: a measure that compares models
    whatever their tokenizers (a tokenizer with longer tokens has fewer, harder targets per
    byte)."""
    return nats / (math.log(2) * n_bytes)
