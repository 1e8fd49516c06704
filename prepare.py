"""
Stage 2: sources -> memmappable token shards.

    python prepare.py config/demo.py                       # tokenize every configured source
    python prepare.py config/demo.py --analyze_only=True   # what would be read; writes nothing

Each source in the config's `sources` dict becomes

    <data_dir>/<name>/{train,val}/shard_00000.bin   tokens (uint16 if the vocab fits, else uint32)
                                  docs_00000.bin    int64 offset of each document's first token
                                  mask_00000.bin    uint8 loss mask, chat sources only (1 = train on it)
                                  meta.json         counts, shard list, tokenizer sha256, settings

Every document starts with <s> (bos), so a training window always shows where one ends and the
next begins. Chat sources are rendered with the chat template (tokenizer.render_conversation).
Documents go to train or val whole: a seeded shuffle of document indices picks val_frac of them.

Safe to interrupt: a source is built in <name>.tmp/ (shards renamed from temp names as they close,
meta.json last) and swapped in when complete. A rerun skips sources whose meta.json matches the
inputs, settings and tokenizer, and redoes the rest. Same inputs, tokenizer and seed give
byte-identical shards, whatever the number of worker processes.
"""
import codecs
import collections
import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import time

import numpy as np

import download
from configurator import atomic_file, configure, die, suggest

FORMAT_VERSION = 1
DIALOGUE_DELIM = '\n\n<dialogue>\n\n'

HF = 'https://huggingface.co/datasets'
# kind -> (format, {setting: default}). 'text' sources train on every token; 'chat' sources are
# conversations with a loss mask. A setting a kind does not know is an error (typos must not pass).
# Public corpora are downloaded into cache_dir (download.py): point url/base_url at a mirror if you
# like; files that never change are checked against their size and sha256. Set 'path' to use a local
# copy instead of downloading.
KINDS = {
    'roam': ('text', {'path': None, 'glob': '**/*.md', 'add_title': True, 'val_frac': 0.1}),
    'text': ('text', {'path': None, 'separator': None, 'val_frac': 0.1}),
    'primer': ('chat', {'path': None, 'val_frac': 0.1}),
    'chat': ('chat', {'path': None, 'val_frac': 0.1}),
    'dolly': ('chat', {'path': None, 'url': f'{HF}/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl',
                       'sha256': None, 'size': None, 'val_frac': 0.1, 'categories': None}),
    'oasst1': ('chat', {'path': None, 'url': f'{HF}/OpenAssistant/oasst1/resolve/main/2023-04-12_oasst_ready.trees.jsonl.gz',
                        'sha256': '2a9a8fd343e9b28e04a895a669d3253f82d93e9c174d440199ae19d5fafbdff7', 'size': 34145252,
                        'val_frac': 0.1, 'lang': 'en'}),
    'tinyshakespeare': ('text', {'path': None, 'url': 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                                 'tinyshakespeare/input.txt', 'sha256': '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed',
                                 'size': 1115394, 'separator': '\n\n', 'val_frac': 0.1}),
    # streamed: parquet shards fetched one at a time, only while the token budgets still need text
    'fineweb_edu': ('text', {'base_url': f'{HF}/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT',
                             'files': [f'{i:03d}_00000.parquet' for i in range(14)],
                             'train_tokens': 200_000_000, 'val_tokens': 5_000_000}),
    'wikitext': ('text', {'base_url': f'{HF}/Salesforce/wikitext/resolve/main/wikitext-103-raw-v1',
                          'train_files': ['train-00000-of-00002.parquet', 'train-00001-of-00002.parquet'],
                          'val_files': ['validation-00000-of-00001.parquet'], 'train_tokens': None, 'val_tokens': None}),
}
STREAMED = ('fineweb_edu', 'wikitext')  # no counting pass: val is their own split (wikitext) or comes first (budgets)


def source_settings(name, src):
    """Validate one entry of the `sources` config dict and fill in its defaults."""
    if not isinstance(src, dict) or 'kind' not in src:
        die(f"sources['{name}'] must be a dict with a 'kind' (one of {', '.join(KINDS)}), got {src!r}")
    if src['kind'] not in KINDS:
        die(f"sources['{name}']: unknown kind {src['kind']!r}{suggest(src['kind'], KINDS)}; kinds: {', '.join(KINDS)}")
    fmt, defaults = KINDS[src['kind']]
    for key in src:
        if key != 'kind' and key not in defaults:
            die(f"sources['{name}']: unknown setting {key!r}{suggest(key, defaults)} for kind "
                f"'{src['kind']}'; it takes {', '.join(defaults)}")
    out = {'name': name, 'kind': src['kind'], 'format': fmt, **defaults, **src}
    if 'path' in out and out['path'] is None and out.get('url') is None:
        die(f"sources['{name}'] needs a 'path'")
    if 'val_frac' in out and not (isinstance(out['val_frac'], (int, float)) and 0 <= out['val_frac'] < 1):
        die(f"sources['{name}']: val_frac must be a number in [0, 1), got {out['val_frac']!r}")
    for key in ('train_tokens', 'val_tokens'):
        v = out.get(key)
        if key in out and not (v is None and out['kind'] == 'wikitext') and not (isinstance(v, (int, float)) and v >= 0):
            die(f"sources['{name}']: {key} must be a number of tokens >= 0, got {v!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Reading sources. Each reader yields (where, document): `where` names the file (and line) for
# error messages; a document is a str (text sources) or a list of messages (chat sources).
# Empty documents are skipped and counted in stats. With problems=None a bad file stops the run;
# with a list (analyze_only) the problem is recorded and reading goes on.

def source_files(src):
    """The files a source reads, sorted; a missing path or an empty folder stops with its name. A
    single-file public corpus without a 'path' is downloaded into the cache first."""
    if src['kind'] in STREAMED:
        return []  # fetched while reading
    if src['path'] is None:
        return [download.fetch(src['url'], src['sha256'], src['size'], label=src['name'])]
    paths = src['path'] if isinstance(src['path'], list) else [src['path']]
    files = []
    for p in paths:
        p = os.path.expanduser(p)
        if src['kind'] == 'roam':
            if not os.path.isdir(p):
                die(f"sources['{src['name']}']: {p} is not a folder (a roam source is an exported folder of .md pages)")
            # include_hidden: Roam pages titled '.something' are real pages; escape: folders named [[x]]
            found = [f for f in glob.glob(os.path.join(glob.escape(p), src['glob']), recursive=True,
                                          include_hidden=True) if os.path.isfile(f)]
            if not found:
                die(f"sources['{src['name']}']: no files match {src['glob']} under {p}: is it the right folder?")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        elif any(c in p for c in '*?['):
            found = [f for f in glob.glob(p, recursive=True) if os.path.isfile(f)]
            if not found:
                die(f"sources['{src['name']}']: no files match {p}")
            files += found
        else:
            die(f"sources['{src['name']}']: {p} does not exist (check the 'path' of this source)")
    return sorted(set(files))


def read_utf8(path, problems):
    try:
        with open(path, 'rb') as f:
            data = f.read()
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        msg = (f"{path} is not valid UTF-8 (byte {e.start}): convert it, e.g. `iconv -f latin1 -t utf-8`, "
               "or remove it from the source")
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror}"
    if problems is None:
        die(msg)
    problems.append(msg)
    return None


def read_roam(src, stats=None, problems=None):
    root = os.path.expanduser(src['path'])
    for path in source_files(src):
        text = read_utf8(path, problems)
        if text is None:
            continue
        if not text.strip():
            stats is not None and stats.update(['empty'])
            continue
        title = os.path.splitext(os.path.relpath(path, root))[0]  # pages with '/' in the title are nested
        yield path, (f"{title}\n{text}" if src['add_title'] else text)


def read_text(src, stats=None, problems=None):
    sep = src['separator']
    for path in source_files(src):
        if sep is None:
            text = read_utf8(path, problems)
            docs = [] if text is None else [text]
        else:
            docs = split_stream(path, sep, problems)
        for doc in docs:
            if doc.strip():
                yield path, doc
            else:
                stats is not None and stats.update(['empty'])


def split_stream(path, sep, problems, block=1 << 20):
    """Documents of a file split on `sep`, read a block at a time (memory: the largest document)."""
    decoder, rest, offset = codecs.getincrementaldecoder('utf-8')(), '', 0
    with open(path, 'rb') as f:
        while True:
            data = f.read(block)
            try:
                rest += decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                msg = f"{path} is not valid UTF-8 (byte {offset + e.start}): convert it or remove it from the source"
                if problems is None:
                    die(msg)
                problems.append(msg)
                return
            offset += len(data)
            *docs, rest = rest.split(sep)
            yield from docs
            if not data:
                break
    yield rest


ROLE_LINE = re.compile(r'^(system|user|assistant):\s?(.*)$', re.IGNORECASE)


def parse_primer(text, path):
    """Primer format: dialogues separated by "\\n\\n<dialogue>\\n\\n"; in each, lines starting with
    `system: `, `user: ` or `assistant: ` begin a turn, other lines continue the turn above."""
    text = text.replace('\r\n', '\n')
    if DIALOGUE_DELIM not in text:
        die(f"{path}: no dialogue delimiter found. Separate dialogues with a line <dialogue> "
            "between blank lines, i.e. the text \"\\n\\n<dialogue>\\n\\n\"")
    line_no = 1
    for block in text.split(DIALOGUE_DELIM):
        start = line_no + (len(block) - len(block.lstrip('\n')))
        line_no += block.count('\n') + DIALOGUE_DELIM.count('\n')
        if not block.strip():
            continue
        messages = []
        for i, line in enumerate(block.strip('\n').split('\n')):
            m = ROLE_LINE.match(line)
            if m:
                messages.append({'role': m.group(1).lower(), 'content': m.group(2)})
            elif messages:
                messages[-1]['content'] += '\n' + line
            elif line.strip():
                die(f"{path} line {start + i}: a dialogue must start with 'system: ', 'user: ' or "
                    f"'assistant: ', found {line[:60]!r}")
        for m in messages:
            m['content'] = m['content'].strip()
        yield f"{path} line {start}", messages


def read_primer(src, stats=None, problems=None):
    for path in source_files(src):
        text = read_utf8(path, problems)
        if text is not None:
            yield from parse_primer(text, path)


def read_jsonl(path, problems):
    """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt', encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path} line {n}: not valid JSON ({e.msg}); each line must be one JSON object"
                if problems is None:
                    die(msg)
                problems.append(msg)


def read_chat(src, stats=None, problems=None):
    for path in source_files(src):
        for n, obj in read_jsonl(path, problems):
            messages = obj.get('messages') if isinstance(obj, dict) else None
            if messages is None:
                die(f"{path} line {n}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
            yield f"{path} line {n}", messages


def read_dolly(src, stats=None, problems=None):
    """databricks-dolly-15k rows: instruction (+ context) -> user, response -> assistant."""
    for path in source_files(src):
        for n, row in read_jsonl(path, problems):
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ('instruction', 'response')):
                die(f"{path} line {n}: a dolly row needs string fields 'instruction' and 'response'")
            if src['categories'] is not None and row.get('category') not in src['categories']:
                continue
            context = (row.get('context') or '').strip()
            user = row['instruction'].strip() + (f"\n\n{context}" if context else '')
            if stats is not None:
                stats.update([f"category {row.get('category')}"])
            yield f"{path} line {n}", [{'role': 'user', 'content': user},
                                        {'role': 'assistant', 'content': row['response'].strip()}]


def best_path(message, lang):
    """oasst1: follow the best-ranked live reply at every turn, from the prompt down to a leaf."""
    path = []
    while message is not None:
        if message.get('deleted') or (lang and message.get('lang') != lang) or not message.get('text', '').strip():
            break
        path.append({'role': 'user' if message['role'] == 'prompter' else 'assistant',
                     'content': message['text'].strip()})
        live = [r for r in message.get('replies') or [] if not r.get('deleted')]
        ranked = sorted(live, key=lambda r: r['rank'] if r.get('rank') is not None else float('inf'))
        message = ranked[0] if ranked else None
    if path and path[-1]['role'] == 'user':
        path.pop()  # a conversation ends with an assistant reply
    return path


def read_oasst1(src, stats=None, problems=None):
    """OpenAssistant message trees (the *.trees.jsonl[.gz] export): one conversation per tree."""
    for path in source_files(src):
        for n, tree in read_jsonl(path, problems):
            if not isinstance(tree, dict) or not isinstance(tree.get('prompt'), dict):
                die(f"{path} line {n}: expected an oasst1 message tree with a 'prompt' (the *.trees.jsonl export)")
            messages = best_path(tree['prompt'], src['lang'])
            if messages:
                yield f"{path} line {n}", messages
            elif stats is not None:
                stats.update(['trees skipped (deleted, other language or no reply)'])


def parquet(path):
    """A pyarrow ParquetFile; pyarrow is imported only here, where parquet is read."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        die(f"reading {path} needs pyarrow (parquet): pip install pyarrow, or pip install -r requirements-dev.txt")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged or non-parquet file
        die(f"cannot read {path} as parquet ({e}): is the download complete? delete it to fetch it again")


def read_parquet_texts(path, column='text'):
    """(row, text) of a parquet file, a row group at a time (bounded memory)."""
    f = parquet(path)
    if column not in f.schema_arrow.names:
        die(f"{path} has no column '{column}' (it has {', '.join(f.schema_arrow.names)})")
    row = 0
    for batch in f.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield row, text or ''
            row += 1


def streamed_files(src):
    """(url, split) of each file of a streamed corpus, in reading order; split None: decided by budget."""
    if src['kind'] == 'fineweb_edu':
        return [(f"{src['base_url']}/{f}", None) for f in src['files']]
    return ([(f"{src['base_url']}/{f}", 'val') for f in src['val_files']] +
            [(f"{src['base_url']}/{f}", 'train') for f in src['train_files']])


WIKI_TITLE = re.compile(r'^ = [^=].* = \n?$')  # ' = Title = ', not ' = = Section = = '


def read_streamed_file(src, url, split):
    """Documents of one file of fineweb-edu (a row each) or WikiText raw (rows are lines; an article
    starts at its ' = Title = ' line), fetched into the cache first."""
    path = download.fetch(url, label=f"{src['name']}/{os.path.basename(url)}")
    if src['kind'] == 'fineweb_edu':
        for row, text in read_parquet_texts(path):
            if text.strip():
                yield f"{path} row {row}", text, split
        return
    article, first = [], 0
    for row, line in read_parquet_texts(path):
        if WIKI_TITLE.match(line) and ''.join(article).strip():
            yield f"{path} row {first}", ''.join(article), split
            article, first = [], row
        article.append(line)
    if ''.join(article).strip():
        yield f"{path} row {first}", ''.join(article), split


def read_streamed(src, stats=None, problems=None):
    for url, split in streamed_files(src):
        yield from read_streamed_file(src, url, split)


READERS = {'roam': read_roam, 'text': read_text, 'primer': read_primer, 'chat': read_chat, 'dolly': read_dolly,
           'oasst1': read_oasst1, 'tinyshakespeare': read_text, 'fineweb_edu': read_streamed,
           'wikitext': read_streamed}


def iter_documents(src, stats=None, problems=None):
    """(where, document, split): split is 'train'/'val' where the corpus has its own, else None."""
    for item in READERS[src['kind']](src, stats, problems):
        yield item if len(item) == 3 else (*item, None)


def iter_texts(src):
    """Plain text of a source, for training the tokenizer: documents, or each message of a chat."""
    for _, doc, _ in iter_documents(src):
        if isinstance(doc, str):
            yield doc
        else:
            yield from (m['content'] for m in doc)


# ----------------------------------------------------------------------------------------------
# Tokenizing. Workers each load the tokenizer once and turn a batch of documents into arrays.

worker_tok = None


def init_worker(tokenizer_path):
    global worker_tok
    import tokenizer
    worker_tok = tokenizer.Tokenizer(tokenizer_path)


def tokenize_batch(batch, max_conversation_tokens, dtype):
    """[(where, doc, split)] -> [(ids, mask or None, n_bytes, truncated, split) or None if dropped];
    an error is returned as a message naming the document."""
    import tokenizer
    out = []
    for where, doc, split in batch:
        if isinstance(doc, str):
            ids, mask, n_bytes = [worker_tok.bos_id] + worker_tok.encode(doc), None, len(doc.encode('utf-8'))
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
        out.append((np.array(ids, dtype=dtype), None if mask is None else np.array(mask, dtype=np.uint8),
                    n_bytes, truncated, split))
    return out


def batches(docs, target_bytes=1 << 18):
    batch, size = [], 0
    for item in docs:
        batch.append(item)
        doc = item[1]
        size += len(doc) if isinstance(doc, str) else sum(len(m['content']) for m in doc)
        if size >= target_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenized(docs, tokenizer_path, num_proc, max_conversation_tokens, dtype):
    """Tokenize documents in order, in parallel, with a bounded number of batches in flight (so
    memory does not grow with the corpus, unlike Pool.imap which reads its input eagerly)."""
    if num_proc <= 1:
        init_worker(tokenizer_path)
        for batch in batches(docs):
            yield tokenize_batch(batch, max_conversation_tokens, dtype)
        return
    with mp.Pool(num_proc, initializer=init_worker, initargs=(tokenizer_path,)) as pool:
        pending = collections.deque()
        for batch in batches(docs):
            pending.append(pool.apply_async(tokenize_batch, (batch, max_conversation_tokens, dtype)))
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
        names = [f'shard_{n:05d}.bin', f'docs_{n:05d}.bin'] + ([f'mask_{n:05d}.bin'] if self.chat else [])
        self.files = [(name, open(os.path.join(self.folder, name + '.tmp'), 'wb')) for name in names]
        self.shards.append({'file': names[0], 'tokens': 0, 'documents': 0})

    def close_shard(self):
        for name, f in self.files:
            f.close()
            os.replace(os.path.join(self.folder, name + '.tmp'), os.path.join(self.folder, name))
        self.files = None

    def add(self, ids, mask, n_bytes, truncated):
        shard = self.shards[-1] if self.shards else None
        if self.files is None or (shard['tokens'] and shard['tokens'] + len(ids) > self.shard_tokens):
            if self.files is not None:
                self.close_shard()
            self.open_shard()
            shard = self.shards[-1]
        self.files[0][1].write(ids.tobytes())
        self.files[1][1].write(np.array([shard['tokens']], dtype=np.int64).tobytes())
        if self.chat:
            self.files[2][1].write(mask.tobytes())
        shard['tokens'] += len(ids)
        shard['documents'] += 1
        self.tokens += len(ids)
        self.documents += 1
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
    """What the shards depend on: inputs (path, size, mtime), settings, tokenizer, seed, format."""
    inputs = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    key = json.dumps([FORMAT_VERSION, src, inputs, tok_sha, cfg.seed, cfg.shard_tokens,
                      cfg.max_conversation_tokens], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def val_indices(n, val_frac, seed, name):
    """Which documents go to val: a seeded shuffle of 0..n-1, first val_frac of it (at least one)."""
    k = 0 if n < 2 or val_frac == 0 else max(1, round(n * val_frac))
    rng = np.random.default_rng([seed, *name.encode()])
    is_val = np.zeros(n, dtype=bool)
    is_val[rng.permutation(n)[:k]] = True
    return is_val


def prepare_source(cfg, name, tok):
    src = source_settings(name, cfg.sources[name])
    remote = src['kind'] in STREAMED or src.get('path', '') is None  # identified by url and settings
    final = os.path.join(cfg.data_dir, name)
    fp = fingerprint(src, [] if remote else source_files(src), tok.sha256, cfg)
    metas = [os.path.join(final, split, 'meta.json') for split in ('train', 'val')]
    if all(os.path.exists(p) and json.load(open(p)).get('fingerprint') == fp for p in metas):
        print(f"prepare: {name} is up to date, skipping")
        return
    files = source_files(src)  # a remote file not yet in the cache is downloaded here
    tmp = final + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier run was interrupted: start this source over

    stats = collections.Counter()
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    chat = src['format'] == 'chat'
    writers = {s: SplitWriter(os.path.join(tmp, s), dtype, cfg.shard_tokens, chat) for s in ('train', 'val')}
    num_proc = cfg.num_proc or os.cpu_count()
    budget = {'train': src.get('train_tokens'), 'val': src.get('val_tokens')}
    if src['kind'] in STREAMED:
        # val is the corpus's own split, or the first val_tokens of it; each split stops at its budget
        n_docs, is_val, total = None, None, sum(v for v in budget.values() if v) or None
        print(f"prepare: {name} ({src['kind']}): streaming, budgets {budget}, {num_proc} processes")
    else:
        n_docs = sum(1 for _ in iter_documents(src, stats))  # cheap pass: count, for the split and the ETA
        if n_docs == 0:
            die(f"sources['{name}']: no documents found in {src['path']} ({stats['empty']} empty files). "
                "Point 'path' at your text.")
        total = sum(os.path.getsize(f) for f in files)
        is_val = val_indices(n_docs, src['val_frac'], cfg.seed, name)
        print(f"prepare: {name} ({src['kind']}): {n_docs:,} documents, {total / 1e6:.1f} MB, "
              f"{int(is_val.sum())} for val, {num_proc} processes")

    def full(split):
        return budget[split] is not None and writers[split].tokens >= budget[split]

    t0 = last = time.time()
    i = 0
    # streamed corpora go one file at a time and check their budgets before the next file is fetched
    parts = [read_streamed_file(src, *f) for f in streamed_files(src)] if is_val is None else [iter_documents(src)]
    results = (r for part in parts if not (is_val is None and full('train') and full('val'))
               for r in tokenized(part, tok.path, num_proc, cfg.max_conversation_tokens, dtype))
    for result in results:
        if isinstance(result, str):
            die(result)
        for doc in result:
            if doc is None:
                stats.update(['conversations dropped (no reply left within max_conversation_tokens)'])
            elif is_val is not None:
                writers['val' if is_val[i] else 'train'].add(*doc[:4])
            else:
                split = doc[4] or ('val' if not full('val') else 'train')
                if not full(split):
                    writers[split].add(*doc[:4])
            i += 1
        if is_val is None and full('train') and full('val'):
            break  # budgets met: stop reading, so no further shard is downloaded
        if time.time() - last > 2:
            last = time.time()
            if n_docs:
                done = sum(w.bytes for w in writers.values())
                rate, of = done / (last - t0), f"{i:,}/{n_docs:,} docs, {done / 1e6:.1f} MB"
            else:
                done = sum(w.tokens for w in writers.values())
                rate, of = done / (last - t0), f"{i:,} docs, {done / 1e6:.1f}M tokens"
            eta = f", ETA {max(0, total - done) / max(rate, 1):.0f}s" if total else ''
            speed = f"{sum(w.bytes for w in writers.values()) / (last - t0) / 1e6:.2f} MB/s"
            print(f"  {name}: {of}, {speed}{eta}", flush=True)

    if sum(w.documents for w in writers.values()) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        why = (f"max_conversation_tokens={cfg.max_conversation_tokens} cuts every conversation before its first reply. "
               "Raise max_conversation_tokens." if chat else "every document was empty or over budget.")
        die(f"sources['{name}']: no documents left: {why}")
    meta = {'format_version': FORMAT_VERSION, 'source': src, 'format': src['format'],
            'dtype': np.dtype(dtype).name, 'vocab_size': tok.vocab_size, 'tokenizer_sha256': tok.sha256,
            'seed': cfg.seed, 'fingerprint': fp, 'reader_counts': dict(stats)}
    for split, w in writers.items():
        m = w.finish({**meta, 'split': split})
        extra = f", {m['truncated']} truncated to {cfg.max_conversation_tokens} tokens" if chat else ''
        print(f"  {name}/{split}: {m['documents']:,} documents, {m['tokens']:,} tokens, "
              f"{len(m['shards'])} shards{extra}")
    old = final + '.old'
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    dt = time.time() - t0
    print(f"  {name}: done in {dt:.1f}s ({sum(w.bytes for w in writers.values()) / 1e6 / dt:.2f} MB/s)")


# bytes of text per byte of downloaded file, to estimate tokens before downloading (rough: parquet is
# compressed, the jsonl files carry metadata)
TEXT_PER_FILE_BYTE = {'fineweb_edu': 1.5, 'wikitext': 1.5, 'dolly': 0.95, 'oasst1': 1.0, 'tinyshakespeare': 1.0}


def analyze_remote(src, bytes_per_token):
    """What a public corpus would download (sizes from HEAD requests), and its tokens per split."""
    to_tokens = lambda size: int((size or 0) * TEXT_PER_FILE_BYTE[src['kind']] / bytes_per_token)
    files = streamed_files(src) if src['kind'] in STREAMED else [(src['url'], None)]
    need, est = [], {'train': 0, 'val': 0}
    for url, split in files:
        size = download.remote_size(url)
        tokens = to_tokens(size)
        if src['kind'] == 'fineweb_edu':  # val first, then train, then stop: later shards are not fetched
            if all(est[s] >= src[f'{s}_tokens'] for s in est):
                break
            for s in ('val', 'train'):
                take = min(tokens, max(0, src[f'{s}_tokens'] - est[s]))
                est[s], tokens = est[s] + take, tokens - take
        elif split:
            cap = src[f'{split}_tokens']
            est[split] = min(est[split] + tokens, cap) if cap is not None else est[split] + tokens
        else:
            est['val'] += int(tokens * src['val_frac'])
            est['train'] += tokens - int(tokens * src['val_frac'])
        need.append((url, size))
    return need, est


def analyze(cfg, names):
    """Per source: files, documents, bytes, estimated tokens per split, empty and unreadable files; for a
    public corpus not downloaded yet, what would be downloaded. Writes nothing."""
    import tokenizer
    tok = tokenizer.Tokenizer(cfg.tokenizer_path) if os.path.exists(cfg.tokenizer_path) else None
    rows, notes, ratios = [], [], []
    for name in names:
        src = source_settings(name, cfg.sources[name])
        remote = src['kind'] in STREAMED or (src.get('path', '') is None and not os.path.exists(download.cache_path(src['url'])))
        if remote:
            rows.append((name, src, None))
            continue
        files = source_files(src)
        stats, problems = collections.Counter(), []
        n_docs, text_bytes, sample_bytes, sample_tokens = 0, 0, 0, 0
        for _, doc, _ in iter_documents(src, stats, problems):
            n_docs += 1
            text = doc if isinstance(doc, str) else '\n'.join(m['content'] for m in doc)
            text_bytes += len(text.encode('utf-8'))
            if tok and sample_bytes < 2_000_000:  # tokenize the first ~2 MB to estimate the rest
                sample_bytes += len(text.encode('utf-8'))
                sample_tokens += len(tok.encode(text))
        if sample_tokens:
            ratios.append(sample_bytes / sample_tokens)
        rows.append((name, src, (files, n_docs, text_bytes, sample_bytes, sample_tokens, stats, problems)))
    default_ratio = sum(ratios) / len(ratios) if ratios else 4.0
    print(f"{'source':<16} {'kind':<15} {'files':>6} {'docs':>9} {'MB':>9} {'est. train tok':>15} "
          f"{'est. val tok':>13} {'empty':>6} {'bad':>4}")
    for name, src, local in rows:
        if local is None:
            need, est = analyze_remote(src, default_ratio)
            known = [size for _, size in need if size is not None]
            cached = sum(os.path.exists(download.cache_path(url)) for url, _ in need)
            print(f"{name:<16} {src['kind']:<15} {len(need):>6} {'?':>9} {sum(known) / 1e6:>9.1f} "
                  f"{est['train']:>15,} {est['val']:>13,} {'-':>6} {'-':>4}")
            unknown = len(need) - len(known)
            notes.append(f"{name}: would download {len(need)} file(s), {sum(known) / 1e6:,.1f} MB"
                         + (f" (+{unknown} of unknown size: no answer to HEAD)" if unknown else '')
                         + (f"; {cached} already in {download.SETTINGS['cache_dir']}" if cached else ''))
            continue
        files, n_docs, text_bytes, sample_bytes, sample_tokens, stats, problems = local
        ratio = sample_bytes / sample_tokens if sample_tokens else default_ratio
        tokens = int(text_bytes / ratio)
        val = int(tokens * src.get('val_frac', 0))
        print(f"{name:<16} {src['kind']:<15} {len(files):>6,} {n_docs:>9,} {sum(os.path.getsize(f) for f in files) / 1e6:>9.2f} "
              f"{tokens - val:>15,} {val:>13,} {stats['empty']:>6} {len(problems):>4}")
        notes += [f"{name}: unreadable: {p}" for p in problems]
    for note in notes:
        print('  ' + note)
    if tok is None:
        print("(no tokenizer yet: tokens estimated at 4 bytes per token)")


def load_split(data_dir, name, split, tokenizer_sha256=None):
    """Read a prepared split's meta.json and check it; used by train.py and eval.py."""
    path = os.path.join(data_dir, name, split, 'meta.json')
    if not os.path.exists(path):
        die(f"no prepared data for source '{name}' ({path} is missing): run `python prepare.py <your config>`")
    try:
        meta = json.load(open(path))
        meta['shards'], meta['dtype'], meta['tokenizer_sha256']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        die(f"{path} is damaged ({type(e).__name__}: {e}): re-run `python prepare.py <your config>`")
    if meta['dtype'] not in ('uint16', 'uint32') or meta.get('format_version', FORMAT_VERSION) != FORMAT_VERSION:
        die(f"{path}: shards in an unknown format (dtype {meta['dtype']}, format_version {meta.get('format_version')}): "
            f"re-run `python prepare.py <your config>`")
    if tokenizer_sha256 and meta['tokenizer_sha256'] != tokenizer_sha256:
        die(f"{path} was made with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]}, the current one is "
            f"{tokenizer_sha256[:12]}): re-run `python prepare.py <your config>` to re-tokenize it")
    folder = os.path.dirname(path)
    for shard in meta['shards']:
        shard['path'] = os.path.join(folder, shard['file'])
        size = os.path.getsize(shard['path']) if os.path.exists(shard['path']) else -1
        if size != shard['tokens'] * np.dtype(meta['dtype']).itemsize:
            die(f"{shard['path']} is missing or has the wrong size for {shard['tokens']} {meta['dtype']} tokens: "
                f"re-run `python prepare.py <your config>`")
    return meta


def main():
    cfg = configure()
    names = cfg.prepare_sources or list(cfg.sources)
    for name in names:
        if name not in cfg.sources:
            die(f"prepare_sources names '{name}'{suggest(name, cfg.sources)}, which is not in sources")
    if not names:
        die("no sources configured: add some to `sources` in your config")
    download.setup(cfg)
    if cfg.analyze_only:
        return analyze(cfg, names)
    import tokenizer
    tok = tokenizer.Tokenizer(cfg.tokenizer_path)
    for name in names:
        prepare_source(cfg, name, tok)


if __name__ == '__main__':
    main()
