"""
Stage 2: sources -> memmappable token shards.

    python prepare.py config/demo.py                       # tokenize every configured source
    python prepare.py config/demo.py --analyze_only=True   # what would be read; writes nothing

Each source in the config's `sources` dict becomes

    <data_dir>/<name>/{train,val}/shard_00000.bin   tokens (uint16 if the vocab fits, else uint32)
                                  docs_00000.bin    int64 offset of each document's first token
                                  mask_00000.bin    uint8 loss mask, chat sources only (1 = train on it)
                                  meta.json         counts, shard list, tokenizer sha256, settings

Every document starts with <s> (bos), so a training window always shows where one ends and the next
begins. Chat sources are rendered with the chat template (tokenizer.render_conversation). Documents
go to train or val whole, each by a hash of its own content (of its title for a Roam page) and
`split_seed`: adding, removing or editing other documents never moves it (sources.val_flags).
Corpora with a split of their own keep it (wikitext; Tiny Shakespeare's last 10%; fineweb-edu's
first val_tokens).

Safe to interrupt: a source is built in <name>.tmp/ (shards renamed from temp names as they close,
meta.json last) and swapped in when complete. A rerun skips sources whose meta.json matches the
inputs, settings and tokenizer, and redoes the rest. Same inputs, tokenizer and split_seed give
byte-identical shards, whatever the number of worker processes.
"""
import collections
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import time

import numpy as np

import analyze
import dedup
import download
import quality
import retrieval
import sources
import tokenizer
from common import Progress, atomic_file, check_writable, die, suggest
from configurator import configure
from data import FORMAT_VERSION


# ----------------------------------------------------------------------------------------------
# Tokenizing. Workers each load the tokenizer once and turn a batch of documents into arrays.

worker_tok = None


def init_worker(tokenizer_path, pool_worker=True):
    global worker_tok
    # Ctrl-C is for the main process (one message, not one per worker); never ignore it there
    if pool_worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_tok = tokenizer.load_tokenizer(tokenizer_path)


def tokenize_batch(batch, max_conversation_tokens, dtype):
    """[(where, doc, split)] -> [(ids, mask or None, n_bytes, truncated, split, parts) or None if
    dropped]; parts: where each sequence starts in ids (a pair is two: chosen, then rejected). An
    error is returned as a message naming the document."""
    out = []
    for where, doc, split in batch:
        parts = (0,)
        if isinstance(doc, str):
            ids = [worker_tok.bos_id] + worker_tok.encode(doc)  # every document starts with <s>
            mask = None  # text: every token is trained
            n_bytes = len(doc.encode('utf-8'))
        elif isinstance(doc, dict):  # a preference pair: each of its two sequences is cut alone
            try:
                ids, mask, start = tokenizer.render_pair(worker_tok, doc)
            except ValueError as e:
                return f"{where}: {e}"
            n = max_conversation_tokens
            chosen, rejected = (ids[:start], mask[:start]), (ids[start:], mask[start:])
            truncated = len(chosen[0]) > n or len(rejected[0]) > n
            if sum(chosen[1][:n]) == 0 or sum(rejected[1][:n]) == 0:
                out.append(None)  # a cut left a side without its reply
                continue
            ids, mask = chosen[0][:n] + rejected[0][:n], chosen[1][:n] + rejected[1][:n]
            parts = (0, min(start, n))
            n_bytes = sum(len(t.encode('utf-8')) for t in sources.doc_texts(doc))
            out.append((np.array(ids, dtype=dtype), np.array(mask, dtype=np.uint8), n_bytes,
                        truncated, split, parts))
            continue
        else:
            try:
                ids, mask = tokenizer.render_conversation(worker_tok, doc)
            except ValueError as e:
                return f"{where}: {e}"
            if sum(mask) == 0:
                return f"{where}: this conversation has no assistant reply to train on"
            n_bytes = sum(len(m['content'].encode('utf-8')) for m in doc)
        truncated = mask is not None and len(ids) > max_conversation_tokens
        if truncated:
            ids, mask = ids[:max_conversation_tokens], mask[:max_conversation_tokens]
            if sum(mask) == 0:  # the cut left no reply to learn from
                out.append(None)
                continue
        mask = None if mask is None else np.array(mask, dtype=np.uint8)
        out.append((np.array(ids, dtype=dtype), mask, n_bytes, truncated, split, parts))
    return out


def batches(docs, target_bytes=1 << 18):
    batch, size = [], 0
    for item in docs:
        batch.append(item)
        doc = item[1]
        size += sum(len(t) for t in sources.doc_texts(doc))
        if size >= target_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenized(docs, tokenizer_path, num_proc, max_conversation_tokens, dtype):
    """Tokenize documents in order, in parallel, with a bounded number of batches in flight (so
    memory does not grow with the corpus, unlike Pool.imap which reads its input eagerly)."""
    if num_proc <= 1:
        init_worker(tokenizer_path, pool_worker=False)
        for batch in batches(docs):
            yield tokenize_batch(batch, max_conversation_tokens, dtype)
        return
    with mp.Pool(num_proc, initializer=init_worker, initargs=(tokenizer_path,)) as pool:
        pending = collections.deque()
        for batch in batches(docs):
            pending.append(pool.apply_async(tokenize_batch,
                                            (batch, max_conversation_tokens, dtype)))
            if len(pending) >= 4 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class SplitWriter:
    """Appends documents to shard files in `folder`, starting a new shard when the next document
    would pass `shard_tokens`. Files are written under temp names and renamed when complete."""

    def __init__(self, folder, dtype, shard_tokens, chat):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.dtype, self.shard_tokens, self.chat = folder, dtype, shard_tokens, chat
        self.shards, self.files = [], None
        self.tokens = self.documents = self.truncated = self.bytes = 0

    def open_shard(self):
        n = len(self.shards)
        parts = ['shard', 'docs', 'mask'] if self.chat else ['shard', 'docs']
        names = [f'{part}_{n:05d}.bin' for part in parts]
        self.files = [(name, open(os.path.join(self.folder, name + '.tmp'), 'wb'))
                      for name in names]
        self.shards.append({'file': names[0], 'tokens': 0, 'documents': 0})

    def close_shard(self):
        for name, f in self.files:
            f.close()
            os.replace(os.path.join(self.folder, name + '.tmp'), os.path.join(self.folder, name))
        self.files = None

    def add(self, ids, mask, n_bytes, truncated, parts=(0,)):
        """One document, or several that must stay in one shard (a pair: parts are where each of
        its sequences starts in ids; each is a document of the index)."""
        shard = self.shards[-1] if self.shards else None
        # a new shard when none is open, or when this document would pass shard_tokens (unless it
        # is the shard's first)
        if self.files is None or (shard['tokens']
                                  and shard['tokens'] + len(ids) > self.shard_tokens):
            if self.files is not None:
                self.close_shard()
            self.open_shard()
            shard = self.shards[-1]
        self.files[0][1].write(ids.tobytes())
        self.files[1][1].write(np.array([shard['tokens'] + p for p in parts],
                                        dtype=np.int64).tobytes())
        if self.chat:
            self.files[2][1].write(mask.tobytes())
        shard['tokens'] += len(ids)
        shard['documents'] += len(parts)
        self.tokens += len(ids)
        self.documents += len(parts)
        self.bytes += n_bytes
        self.truncated += truncated

    def finish(self, meta):
        if self.files is not None:
            self.close_shard()
        meta = {**meta, 'tokens': self.tokens, 'documents': self.documents, 'bytes': self.bytes,
                'shards': self.shards}
        if self.chat:
            meta['truncated'] = self.truncated
        with atomic_file(os.path.join(self.folder, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=2)
        return meta


def fingerprint(src, files, tok_sha, cfg):
    """What the shards depend on: inputs (path, size, mtime), settings, tokenizer, split_seed,
    format."""
    inputs = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    notes = None  # a chat source with retrieval: its rows hold chunks of the notes (which change)
    if src['format'] != 'text' and cfg.retrieve_from:
        notes_src = sources.source_settings(cfg.retrieve_from, cfg.sources[cfg.retrieve_from])
        notes = [notes_src, cfg.retrieve_k, cfg.retrieve_chunk_chars, cfg.unanswerable_frac,
                 cfg.unanswerable_reply,
                 [(f, os.path.getsize(f), os.stat(f).st_mtime_ns)
                  for f in sources.source_files(notes_src)]]
    # with dedup, which documents go depends on the sources before this one too
    deduped = [cfg.dedup_stream_bits] if cfg.dedup and src['kind'] in sources.STREAMED else []
    if cfg.dedup and src['kind'] not in sources.STREAMED:
        before = [f for other in deduped_before(cfg, src['name'])
                  for f in sources.source_files(other)]
        deduped = [cfg.dedup_threshold, cfg.dedup_min_words,
                   [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in before]]
    filters = [cfg.quality_filter] + ([cfg.filter_min_words, cfg.filter_max_words,
                                        cfg.filter_max_non_text, cfg.filter_max_dup_lines,
                                        cfg.filter_max_top_ngram, cfg.filter_max_dup_ngrams]
                                       if cfg.quality_filter else [])
    # local files: how sources.py reads them (a downloaded corpus's bytes are checked instead)
    reader = [sources.READ_VERSION] if src.get('path') else []
    key = json.dumps([FORMAT_VERSION, src, inputs, tok_sha, cfg.split_seed, cfg.shard_tokens,
                      cfg.max_conversation_tokens] + ([notes] if notes else []) + deduped
                     + [filters] + reader, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


# What prepare.py writes at <data_dir>/<source> (and at <source>.tmp, <source>.old while it swaps):
# train/ and val/, each holding shards, their document index and loss mask, meta.json, and the temp
# names these are written under. A folder holding anything else is not ours to replace or delete.
OWN_FILE = re.compile(r'(shard|docs|mask)_\d{5}\.bin(\.tmp)?|meta\.json(\.tmp\d+)?')


def not_ours(folder):
    """What in `folder` prepare.py did not write: [] when it holds only prepare's own layout (or is
    not there)."""
    if not os.path.lexists(folder):
        return []
    if os.path.islink(folder) or not os.path.isdir(folder):
        return [f"{os.path.basename(folder)} itself (a link or a file, not a folder)"]
    found = []
    for entry in sorted(os.listdir(folder)):
        sub = os.path.join(folder, entry)
        if entry == 'removed.jsonl' and os.path.isfile(sub) and not os.path.islink(sub):
            continue  # (the duplicates dedup removed, for the user to look at)
        if entry not in ('train', 'val') or os.path.islink(sub) or not os.path.isdir(sub):
            found.append(entry)
            continue
        found += [f"{entry}/{f}" for f in sorted(os.listdir(sub))
                  if not OWN_FILE.fullmatch(f) or not os.path.isfile(os.path.join(sub, f))
                  or os.path.islink(os.path.join(sub, f))]
    return found


def check_own_folders(cfg, names):
    """Before anything is written: every folder prepare.py would replace or delete holds only what
    it wrote, and data_dir is not inside a notes folder it reads (the shards would land among the
    notes). A data_dir that is the folder holding the notes would otherwise lose them."""
    data_dir = os.path.realpath(cfg.data_dir)
    for name, src in cfg.sources.items():  # (every source: one not prepared now is read later)
        folders = src.get('path') if isinstance(src, dict) and src.get('kind') == 'roam' else None
        for p in [folders] if isinstance(folders, str) else folders or []:
            if not isinstance(p, str):
                continue  # (source_settings names the bad setting)
            p = os.path.realpath(os.path.expanduser(p))
            if os.path.commonpath([p, data_dir]) == p:
                die(f"data_dir={cfg.data_dir} is {'' if p == data_dir else 'inside '}the folder "
                    f"of source '{name}' ({p}): the shards would be written among its notes. Set "
                    "data_dir to a folder of its own (the default is <out_dir>/data)")
    for name in names:
        for folder in (os.path.join(cfg.data_dir, name + end) for end in ('', '.tmp', '.old')):
            found = not_ours(folder)
            if found:
                shown = ', '.join(repr(f) for f in found[:5]) + (' ...' if len(found) > 5 else '')
                die(f"{folder} holds what prepare.py did not write ({len(found)} entries: "
                    f"{shown}). prepare.py replaces that folder with the shards of source "
                    f"'{name}' and touches nothing it did not write, so it stops here. Set "
                    "data_dir to a folder of its own (the default is <out_dir>/data), or move "
                    "those files elsewhere")


def prepare_source(cfg, name, tok):
    """One source -> <data_dir>/<name>/{train,val}/. Built in <name>.tmp/ and swapped in only when
    whole, so an interrupted run leaves the old shards (or none), never half of a source. A source
    whose inputs, settings and tokenizer are those of its meta.json is skipped: reruns are cheap."""
    src = sources.source_settings(name, cfg.sources[name])
    # a local source is identified by its files (size, mtime); a remote one by its url and settings
    # alone, so that checking whether it is up to date never downloads it
    remote = src['kind'] in sources.STREAMED or src.get('path', '') is None
    final = os.path.join(cfg.data_dir, name)
    fp = fingerprint(src, [] if remote else sources.source_files(src), tok.sha256, cfg)
    metas = [os.path.join(final, split, 'meta.json') for split in ('train', 'val')]
    if all(os.path.exists(p) and json.load(open(p)).get('fingerprint') == fp for p in metas):
        print(f"prepare: {name} is up to date, skipping")
        return
    tmp = final + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier run was interrupted: start this source over

    stats = collections.Counter()
    # half the disk and page cache when it fits
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    chat = src['format'] != 'text'  # conversations or pairs: a loss mask, turns
    writers = {s: SplitWriter(os.path.join(tmp, s), dtype, cfg.shard_tokens, chat)
               for s in ('train', 'val')}
    t0 = time.time()
    # the two ways of reading: a counted source is read twice (split, then tokens); a streamed one
    # once, in order
    write = write_streamed if src['kind'] in sources.STREAMED else write_counted
    write(cfg, src, tok, dtype, writers, stats)
    if stats['unanswerable rows added (unanswerable_frac)']:
        print(f"  {name}: {stats['unanswerable rows added (unanswerable_frac)']} rows that answer "
              f"{cfg.unanswerable_reply!r} added (retrieval.unanswerable_rows)")
    for what, n in stats.items():  # rows a reader refused and went past (HH-RLHF's odd ones)
        if 'refused' in what:
            print(f"  {name}: {n:,} {what} (the first ones named above)")

    if sum(w.documents for w in writers.values()) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if chat:
            why = (f"max_conversation_tokens={cfg.max_conversation_tokens} cuts every conversation "
                   "before its first reply. Raise max_conversation_tokens.")
        else:
            why = ("every document was empty, over budget, or removed as junk or a copy (see "
                   f"{name}/removed.jsonl; quality_filter=False and dedup=False keep them).")
        die(f"sources['{name}']: no documents left: {why}")
    meta = {'format_version': FORMAT_VERSION, 'source': src, 'format': src['format'],
            'dtype': np.dtype(dtype).name, 'vocab_size': tok.vocab_size,
            'tokenizer_sha256': tok.sha256,
            'split_seed': cfg.split_seed, 'fingerprint': fp, 'reader_counts': dict(stats)}
    if chat:  # how its template marks turns, for cutting long conversations (data.split_at_turns)
        meta['turns'] = tokenizer.turn_markers(tok)
    for split, w in writers.items():
        m = w.finish({**meta, 'split': split})
        extra = (f", {m['truncated']} truncated to {cfg.max_conversation_tokens} tokens"
                 if chat else '')
        count = (f"{m['documents'] // 2:,} pairs" if src['format'] == 'pairs'
                 else f"{m['documents']:,} documents")  # (a pair is two: chosen, rejected)
        print(f"  {name}/{split}: {count}, {m['tokens']:,} tokens, "
              f"{len(m['shards'])} shards{extra}")
    if write is write_counted:
        check_val_share(name, src, writers)
    # swap in: the old folder steps aside before the new one takes its name, then goes
    old = final + '.old'
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    dt = time.time() - t0
    print(f"  {name}: done in {dt:.1f}s ({sum(w.bytes for w in writers.values()) / 1e6 / dt:.2f} "
          "MB/s)")


def check_val_share(name, src, writers):
    """val_frac splits by document, so a few long documents can make val's share of the tokens far
    from it (one long note made val 33% of a source at val_frac 0.1). Warn when it is more than 2x
    off or 0.2 away, for a source with enough documents that chance alone rarely does that (val
    expects 10 or more)."""
    frac, val = src.get('val_frac') or 0, writers['val'].tokens
    total, documents = val + writers['train'].tokens, sum(w.documents for w in writers.values())
    if not frac or not total or documents * frac < 10:
        return
    share = val / total
    if share > 2 * frac or share < frac / 2 or abs(share - frac) > 0.2:
        print(f"warning: source '{name}': val holds {100 * share:.1f}% of its tokens ({val:,} of "
              f"{total:,}) at val_frac={frac:g}: documents go to val whole, and a few long ones "
              f"weigh a lot, so its val loss measures them. Try another split_seed, or cut the "
              f"long documents up", file=sys.stderr)


def tokenized_docs(docs, cfg, tok, dtype, stats):
    """The tokenized documents of `docs`, in order, a batch at a time: lists of (ids, mask, n_bytes,
    truncated, split) or None for a conversation dropped (no reply left after the cut). A bad
    document stops the run."""
    num_proc = cfg.num_proc or os.cpu_count()
    if cfg.retrieve_from:
        docs = with_notes(docs, cfg, stats)
    for result in tokenized(docs, tok.path, num_proc, cfg.max_conversation_tokens, dtype):
        if isinstance(result, str):
            die(result)
        if None in result:
            stats['conversations dropped (no reply left within '
                  'max_conversation_tokens)'] += result.count(None)
        yield result


def with_notes(docs, cfg, stats):
    """SFT rows as chat shows messages: the notes that match go in front of each user message; and
    after a conversation, its unanswerable rows (retrieval.unanswerable_rows), in its split. A
    pair's conversation gets the notes too (its replies were written, or sampled, after them)."""
    index = notes_index(cfg)
    for where, doc, split in docs:
        if isinstance(doc, str):
            yield where, doc, split
            continue
        if isinstance(doc, dict):
            messages = retrieval.with_notes_conversation(index, doc['messages'], cfg.retrieve_k)
            yield where, {**doc, 'messages': messages}, split
            continue
        yield where, retrieval.with_notes_conversation(index, doc, cfg.retrieve_k), split
        rows = retrieval.unanswerable_rows(index, doc, cfg.retrieve_k, cfg.unanswerable_reply,
                                           cfg.unanswerable_frac) if cfg.unanswerable_frac else []
        stats['unanswerable rows added (unanswerable_frac)'] += len(rows)
        for row in rows:
            yield f"{where} (an unanswerable row made from it)", row, split


def deduped_before(cfg, name):
    """The settings of the sources dedup reads before `name`'s documents: the local ones before it
    in the config (a copy is removed from the later source)."""
    out = []
    for other, settings in cfg.sources.items():
        if other == name:
            return out
        src = sources.source_settings(other, settings)
        if src['kind'] not in sources.STREAMED and src.get('path') is not None:
            out.append(src)
    return out


DEDUP = {}  # this run's dedup.Index, grown over the sources in config order (each read once)


def removals(cfg, src, writers):
    """{number in reading order: why} of the documents of `src` that go before the split: junk
    (quality.py's filters) and, with dedup, copies of a document read before them, in this source
    or one before it in the config. Writes removed.jsonl beside the splits (each removed document,
    why, and where its kept copy is), and says how many went and why."""
    reject = (lambda doc: quality.problem(doc, cfg)) if cfg.quality_filter else None
    if cfg.dedup:
        before = deduped_before(cfg, src['name'])
        index = DEDUP.get('index')
        if index is None or index.sources != [o['name'] for o in before][:len(index.sources)]:
            index = DEDUP['index'] = dedup.Index(cfg.dedup_threshold, cfg.dedup_min_words)
        for other in before[len(index.sources):]:  # (those not read yet in this run)
            index.scan(other['name'], sources.iter_documents(other), reject)
        removed, read = index.scan(src['name'], sources.iter_documents(src), reject)
    else:
        removed, read = [], 0
        for read, (where, doc, split) in enumerate(sources.iter_documents(src), 1):
            why = reject(doc) if not split else None
            if why:
                removed.append((read - 1, {'removed': where, 'document': read, 'why': why}))
    folder = os.path.dirname(writers['train'].folder)
    lines = [json.dumps(record, ensure_ascii=False) for _, record in removed]
    with atomic_file(os.path.join(folder, 'removed.jsonl'), 'w') as f:
        f.write(''.join(line + '\n' for line in lines))
    # why, by rule: 'exact duplicate', 'near duplicate', each filter's key
    counts = collections.Counter(record['why'].split(':')[0].split(' (')[0]
                                 for _, record in removed)
    shown = ', '.join(f"{n:,} {why}" for why, n in sorted(counts.items())) or 'none'
    print(f"  {src['name']}: {read:,} documents read, {len(removed):,} removed ({shown}), "
          f"{read - len(removed):,} kept ({src['name']}/removed.jsonl)")
    for line in lines[:3]:
        print(f"    {line[:160]}")
    return {i: record['why'] for i, record in removed}


NOTES = {}  # the retrieval index of this run's notes, built once (retrieval.notes_index)


def notes_index(cfg):
    if 'index' not in NOTES:
        NOTES['index'] = retrieval.notes_index(cfg)
    return NOTES['index']


def write_counted(cfg, src, tok, dtype, writers, stats):
    """A local or single-file source. A cheap first pass reads every document once to decide its
    split (val_flags: by hash, so the same document lands in the same split whatever else changes)
    and to count them for the progress line; the second pass tokenizes in parallel and writes each
    to its split."""
    files = sources.source_files(src)  # a remote file not yet in the cache is downloaded here
    is_val = sources.val_flags(src, cfg.split_seed, stats)
    if len(is_val) == 0:
        die(f"sources['{src['name']}']: no documents found in {src['path']} ({stats['empty']} "
            f"empty "
            "files). Point 'path' at your text.")
    total = sum(os.path.getsize(f) for f in files)
    print(f"prepare: {src['name']} ({src['kind']}): {len(is_val):,} documents, {total / 1e6:.1f} "
          f"MB, {int(is_val.sum())} for val, {cfg.num_proc or os.cpu_count()} processes")
    progress = Progress(src['name'], total, unit='MB', scale=1e6)
    removed = removals(cfg, src, writers) if cfg.dedup or cfg.quality_filter else {}
    i = 0  # documents read so far, in reading order, as in is_val

    def split_docs():  # each document with its split (rows made from it follow it there)
        nonlocal i
        for where, doc, _ in sources.iter_documents(src):
            if i not in removed:
                yield where, doc, 'val' if is_val[i] else 'train'
            i += 1

    for result in tokenized_docs(split_docs(), cfg, tok, dtype, stats):
        for doc in result:
            if doc is not None:
                ids, mask, n_bytes, truncated, split, parts = doc
                writers[split].add(ids, mask, n_bytes, truncated, parts)
        # (bytes of text read against bytes of the files: a rough ETA, file bytes include markup and
        # JSON)
        progress(sum(w.bytes for w in writers.values()), extra=f", {i:,}/{len(is_val):,} docs")


def write_streamed(cfg, src, tok, dtype, writers, stats):
    """A corpus too big to read twice (fineweb-edu, wikitext): one pass, a file at a time, each
    fetched only while its split still has room under its token budget. Val is the corpus's own
    split where it has one (wikitext), else the first val_tokens read (fineweb-edu): the split needs
    no counting pass."""
    budget = {'train': src.get('train_tokens'), 'val': src.get('val_tokens')}
    print(f"prepare: {src['name']} ({src['kind']}): streaming, budgets {budget}, "
          f"{cfg.num_proc or os.cpu_count()} processes")

    def full(split):
        return budget[split] is not None and writers[split].tokens >= budget[split]

    def done(split):
        """A file of its own split is needed while that split has room; an unsplit one while either
        has."""
        return full(split) if split else full('val') and full('train')

    total = sum(v for v in budget.values() if v) or None
    progress = Progress(src['name'], total, unit='M tokens', scale=1e6)
    # exact copies, in fixed memory (near copies: only in local sources, whose index may grow)
    seen = dedup.Seen(cfg.dedup_stream_bits) if cfg.dedup else None
    # what goes, line by line on disk as it streams (in <name>.tmp/, swapped in with the shards)
    removed = open(os.path.join(os.path.dirname(writers['train'].folder), 'removed.jsonl'), 'w')
    i = 0
    for url, file_split in sources.streamed_files(src):
        if done(file_split):
            continue  # its budget is met: this file is never downloaded
        docs = filtered(sources.read_streamed_file(src, url, file_split), cfg, stats, seen,
                        removed)
        for result in tokenized_docs(docs, cfg, tok, dtype, stats):
            for doc in result:
                if doc is None:
                    continue
                ids, mask, n_bytes, truncated, split, parts = doc
                split = split or ('val' if not full('val') else 'train')  # val fills first
                if not full(split):
                    writers[split].add(ids, mask, n_bytes, truncated, parts)
            i += len(result)
            if done(file_split):
                break  # budget met: stop reading this file
            progress(sum(w.tokens for w in writers.values()), extra=f", {i:,} docs")
    removed.close()
    gone = {what[len('removed by '):]: n for what, n in stats.items()
            if what.startswith('removed by ')}
    shown = ', '.join(f"{n:,} {why}" for why, n in sorted(gone.items())) or 'none'
    print(f"  {src['name']}: {stats['streamed documents read']:,} documents read, "
          f"{sum(gone.values()):,} removed ({shown}; {src['name']}/removed.jsonl)")


def filtered(docs, cfg, stats, seen=None, removed=None):
    """A streamed corpus's documents that pass quality.py's filters and are not exact copies of one
    read before (seen: a dedup.Seen); those of a split of its own are kept whole. The others are
    counted in stats, by rule, and written to `removed` (a file: nothing is kept in memory)."""
    for where, doc, split in docs:
        stats['streamed documents read'] += 1
        why = quality.problem(doc, cfg) if cfg.quality_filter and not split else None
        if why is None and seen is not None and not split and seen.add(dedup.doc_text(doc)):
            why = 'dedup (an exact duplicate)'
        if why:
            stats[f"removed by {why.split(':')[0]}"] += 1
            if removed:
                removed.write(json.dumps({'removed': where, 'why': why}, ensure_ascii=False) + '\n')
            continue
        yield where, doc, split


def main():
    cfg = configure()
    names = cfg.prepare_sources or list(cfg.sources)
    for name in names:
        if name not in cfg.sources:
            die(f"prepare_sources names '{name}'{suggest(name, cfg.sources)}, which is not in "
                "sources")
    if not names:
        die("no sources configured: add some to `sources` in your config")
    download.setup(cfg)
    if cfg.analyze_only:
        return analyze.analyze(cfg, names)
    tok = tokenizer.load_tokenizer(cfg.tokenizer_path)
    for name in cfg.sources:  # every source's settings, checked before anything is read or written
        sources.source_settings(name, cfg.sources[name])
    check_own_folders(cfg, names)  # (before check_writable makes data_dir)
    check_writable(cfg.data_dir, 'data_dir (or out_dir)')
    for name in names:
        try:
            prepare_source(cfg, name, tok)
        # Ctrl-C, a full disk, a bad document: no half-built source is left behind
        except BaseException as e:
            tmp = os.path.join(cfg.data_dir, name + '.tmp')
            if not not_ours(tmp):  # (checked before: this is the one this run wrote)
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt):
                print(f"\ninterrupted: source '{name}' was not finished and nothing of it was kept "
                      "(sources prepared before it are done); run prepare.py again to go on",
                      file=sys.stderr)
                sys.exit(130)
            if isinstance(e, OSError):
                die(f"{e.filename or cfg.data_dir}: {e.strerror} while preparing source '{name}'. "
                    "If the disk is full, free some space or set data_dir to another disk; nothing "
                    f"of '{name}' was kept, so re-run after")
            raise


if __name__ == '__main__':
    main()
