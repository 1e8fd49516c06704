"""Downloads against a local HTTP server (no network): fixture files written by the tests, served on
127.0.0.1 with Range support and injected failures."""
import gzip
import hashlib
import http.server
import json
import os
import threading

import pytest

from conftest import run, write_config
import data
import download
import sources

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data')


class Server:
    """Serves `files` ({url path: bytes}); `fail[path]` is a list of what to do to the next requests
    ('500', 'cut': send half the body then drop the connection, 'norange': ignore Range)."""

    def __init__(self):
        self.files, self.fail, self.log, self.headers = {}, {}, [], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(head=True)

            def do_GET(self):
                self.respond(head=False)

            def respond(self, head):
                server.log.append((self.command, self.path, self.headers.get('Range')))
                server.headers.append(dict(self.headers))
                action = server.fail.get(self.path, []).pop(0) if server.fail.get(self.path) else None
                if self.path not in server.files:
                    return self.send_error(404, 'Not Found')
                if action == '500':
                    return self.send_error(500, 'Internal Server Error')
                data, start = server.files[self.path], 0
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                rng = self.headers.get('Range')
                if self.headers.get('If-Range') not in (None, etag):
                    # the file changed since the client's first part: send all of it (RFC 9110)
                    rng = None
                if rng and action != 'norange':
                    start = int(rng.split('=')[1].split('-')[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header('Content-Range', f'bytes */{len(data)}')
                        self.send_header('Content-Length', '0')
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header('ETag', etag)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                if head:
                    return
                if action == 'cut':
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def gets(self, path=None):
        return [entry for entry in self.log if entry[0] == 'GET' and (path is None or entry[1] == path)]


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setitem(download.SETTINGS, 'cache_dir', str(tmp_path / 'cache'))
    monkeypatch.setitem(download.SETTINGS, 'backoff', 0.01)
    monkeypatch.setitem(download.SETTINGS, 'timeout', 5.0)
    return tmp_path / 'cache'


BLOB = bytes(range(256)) * 4000  # ~1 MB


def test_full_download_into_the_cache(server, cache):
    server.files['/data/blob.bin'] = BLOB
    path = download.fetch(server.url + '/data/blob.bin', sha256=hashlib.sha256(BLOB).hexdigest(), size=len(BLOB))
    assert open(path, 'rb').read() == BLOB and path.startswith(str(cache)) and path.endswith('data/blob.bin')
    assert not os.path.exists(path + '.part')


def test_resume_after_the_server_cuts_the_body(server, cache):
    server.files['/blob.bin'] = BLOB
    server.fail['/blob.bin'] = ['cut']
    path = download.fetch(server.url + '/blob.bin', sha256=hashlib.sha256(BLOB).hexdigest())
    assert open(path, 'rb').read() == BLOB
    gets = server.gets('/blob.bin')
    assert len(gets) == 2 and gets[0][2] is None
    resumed_at = int(gets[1][2][len('bytes='):-1])
    # all but the last chunk was kept
    assert len(BLOB) // 2 - (1 << 16) < resumed_at <= len(BLOB) // 2


def test_downloads_ask_for_the_bytes_as_they_are(server, cache):
    server.files['/blob.bin'] = BLOB
    download.fetch(server.url + '/blob.bin')
    assert server.headers[0].get('Accept-Encoding') == 'identity'  # no transparent gzip under Range


def test_a_complete_part_file_is_finished_without_downloading_it_again(server, cache):
    server.files['/blob.bin'] = BLOB
    url = server.url + '/blob.bin'
    os.makedirs(os.path.dirname(download.cache_path(url)), exist_ok=True)
    with open(download.cache_path(url) + '.part', 'wb') as f:
        f.write(BLOB)  # as if the connection dropped just after the last byte
    path = download.fetch(url, sha256=hashlib.sha256(BLOB).hexdigest())
    assert open(path, 'rb').read() == BLOB and server.log[-1][2] == f'bytes={len(BLOB)}-'
    other = b'x' * (len(BLOB) // 2)  # a part file longer than the file now on the server
    server.files['/other.bin'] = other
    with open(download.cache_path(server.url + '/other.bin') + '.part', 'wb') as f:
        f.write(BLOB)
    assert open(download.fetch(server.url + '/other.bin'), 'rb').read() == other


def test_a_file_that_changed_between_attempts_is_fetched_whole(server, cache, monkeypatch):
    server.files['/blob.bin'] = BLOB
    server.fail['/blob.bin'] = ['cut']
    sleep = download.time.sleep

    def publisher_replaces_the_file_then_sleep(seconds):  # between the cut attempt and the retry
        server.files['/blob.bin'] = BLOB[::-1]
        sleep(seconds)
    monkeypatch.setattr(download.time, 'sleep', publisher_replaces_the_file_then_sleep)
    path = download.fetch(server.url + '/blob.bin')
    assert open(path, 'rb').read() == BLOB[::-1]  # not half old, half new
    assert 'If-Range' in server.headers[1]


def test_a_server_that_ignores_range_is_read_again_from_the_start(server, cache):
    server.files['/blob.bin'] = BLOB
    server.fail['/blob.bin'] = ['cut', 'norange']
    path = download.fetch(server.url + '/blob.bin')
    assert open(path, 'rb').read() == BLOB


def test_retry_after_a_500(server, cache, capsys):
    server.files['/blob.bin'] = BLOB
    server.fail['/blob.bin'] = ['500', '500']
    path = download.fetch(server.url + '/blob.bin')
    assert open(path, 'rb').read() == BLOB and len(server.gets()) == 3
    assert 'HTTP 500' in capsys.readouterr().out


def test_too_many_failures_say_so_and_keep_the_partial_file(server, cache, monkeypatch):
    monkeypatch.setitem(download.SETTINGS, 'retries', 2)
    server.files['/blob.bin'] = BLOB
    server.fail['/blob.bin'] = ['cut', '500', '500']
    with pytest.raises(SystemExit) as e:
        download.fetch(server.url + '/blob.bin')
    assert 'after 2 retries' in str(e.value) and 'Rerun to resume' in str(e.value)
    assert 0 < os.path.getsize(download.cache_path(server.url + '/blob.bin') + '.part') <= len(BLOB) // 2


def test_sha256_mismatch_leaves_no_file_and_says_so(server, cache):
    server.files['/blob.bin'] = BLOB
    url = server.url + '/blob.bin'
    with pytest.raises(SystemExit) as e:
        download.fetch(url, sha256='0' * 64)
    assert 'sha256' in str(e.value) and url in str(e.value) and 'removed' in str(e.value)
    assert not os.path.exists(download.cache_path(url)) and not os.path.exists(download.cache_path(url) + '.part')
    with pytest.raises(SystemExit) as e:
        download.fetch(url, size=len(BLOB) + 1)
    assert 'expected' in str(e.value) and not os.path.exists(download.cache_path(url))


def test_404_names_the_url(server, cache):
    url = server.url + '/missing.jsonl'
    with pytest.raises(SystemExit) as e:
        download.fetch(url)
    assert url in str(e.value) and '404' in str(e.value)
    assert len(server.gets()) == 1  # a 404 is not retried


def test_a_second_fetch_downloads_nothing(server, cache):
    server.files['/blob.bin'] = BLOB
    download.fetch(server.url + '/blob.bin')
    download.fetch(server.url + '/blob.bin')
    assert len(server.gets()) == 1


# ---- public-corpus sources through prepare.py ----

def parquet_bytes(texts, tmp_path, rows_per_group=50):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    path = tmp_path / 'tmp.parquet'
    pq.write_table(pa.table({'text': texts, 'id': list(range(len(texts)))}), path, row_group_size=rows_per_group)
    return path.read_bytes()


def corpus_config(tmp_path, prepared, sources, **extra):
    return write_config(tmp_path / 'cfg.py', str(tmp_path / 'out'), '', sources=sources,
                        tokenizer_path=os.path.join(prepared[1], 'tokenizer.model'), cache_dir=str(tmp_path / 'cache'),
                        download_backoff=0.01, **extra)


def test_a_streamed_corpus_loses_its_exact_copies_in_fixed_memory(server, tmp_path, prepared):
    texts = [f"document {j}: the garden radio learns the sea, slowly." for j in range(120)]
    texts += [t.replace(' ', '  ') for t in texts[:40]]  # 40 copies, whitespace aside, after their originals
    server.files['/fw/000_00000.parquet'] = parquet_bytes(texts, tmp_path)
    src = {'fw': {'kind': 'fineweb_edu', 'base_url': server.url + '/fw', 'files': ['000_00000.parquet'],
                  'train_tokens': 10 ** 6, 'val_tokens': 200}}
    cfg = corpus_config(tmp_path, prepared, src, dedup_stream_bits=1 << 16)
    p = run('prepare.py', cfg, check=True)
    assert 'fw: 160 documents read, 40 removed (40 dedup (an exact duplicate); fw/removed.jsonl)' in p.stdout, p.stdout
    removed = [json.loads(line) for line in open(tmp_path / 'out' / 'data' / 'fw' / 'removed.jsonl')]
    assert len(removed) == 40 and all(r['why'] == 'dedup (an exact duplicate)' for r in removed)
    assert [r['removed'].rsplit(' row ', 1)[1] for r in removed] == [str(j) for j in range(120, 160)]
    metas = {s: data.load_split(str(tmp_path / 'out' / 'data'), 'fw', s) for s in ('train', 'val')}
    assert metas['train']['documents'] + metas['val']['documents'] == 120
    assert metas['train']['reader_counts']['removed by dedup (an exact duplicate)'] == 40
    run('prepare.py', cfg, '--dedup=False', check=True)  # (the rerun key: prepared again, every row)
    metas = {s: data.load_split(str(tmp_path / 'out' / 'data'), 'fw', s) for s in ('train', 'val')}
    assert metas['train']['documents'] + metas['val']['documents'] == 160


def test_fineweb_budgets_stop_downloading_early_and_a_rerun_downloads_nothing(server, tmp_path, prepared):
    words = 'the garden bread radio sea model cat token'.split()
    for i in range(3):
        texts = [' '.join(words[(j + k) % 8] for k in range(40)) + f' shard {i} doc {j}.' for j in range(200)]
        server.files[f'/fw/{i:03d}_00000.parquet'] = parquet_bytes(texts, tmp_path)
    src = {'fw': {'kind': 'fineweb_edu', 'base_url': server.url + '/fw', 'files': [f'{i:03d}_00000.parquet' for i in range(3)],
                  'train_tokens': 2000, 'val_tokens': 500}}
    cfg = corpus_config(tmp_path, prepared, src)
    p = run('prepare.py', cfg, check=True)
    # the budget was met inside the first shard
    assert [g[1] for g in server.gets()] == ['/fw/000_00000.parquet']
    metas = {s: data.load_split(str(tmp_path / 'out' / 'data'), 'fw', s) for s in ('train', 'val')}
    assert 500 <= metas['val']['tokens'] < 500 + 200 and 2000 <= metas['train']['tokens'] < 2000 + 200
    assert 'downloaded' in p.stdout
    # bigger budgets reach the second shard; the first comes from the cache
    cfg = corpus_config(tmp_path, prepared, {'fw': {**src['fw'], 'train_tokens': 20000}})
    run('prepare.py', cfg, check=True)
    assert [g[1] for g in server.gets()] == ['/fw/000_00000.parquet', '/fw/001_00000.parquet']
    run('prepare.py', cfg, check=True)  # up to date
    import shutil
    shutil.rmtree(tmp_path / 'out' / 'data')
    run('prepare.py', cfg, check=True)  # shards gone: rebuilt from the cache
    assert len(server.gets()) == 2


def test_wikitext_uses_its_own_splits_one_article_per_document(server, tmp_path, prepared,
                                                               monkeypatch):
    def article(title, n):
        return [f' = {title} = \n', '\n', ' = = Part = = \n'] + [f' Line {i} of {title} .\n' for i in range(n)] + ['\n']
    server.files['/wiki/train-0.parquet'] = parquet_bytes(article('Alpha', 5) + article('Beta', 3), tmp_path)
    server.files['/wiki/valid-0.parquet'] = parquet_bytes(article('Gamma', 4), tmp_path)
    src = {'wiki': {'kind': 'wikitext', 'base_url': server.url + '/wiki', 'train_files': ['train-0.parquet'],
                    'val_files': ['valid-0.parquet']}}
    cfg = corpus_config(tmp_path, prepared, src)
    run('prepare.py', cfg, check=True)
    data_dir = str(tmp_path / 'out' / 'data')
    assert data.load_split(data_dir, 'wiki', 'train')['documents'] == 2
    assert data.load_split(data_dir, 'wiki', 'val')['documents'] == 1
    # (read here, in this process: downloads go to the test's folder, not the project's out/cache)
    monkeypatch.setitem(download.SETTINGS, 'cache_dir', str(tmp_path / 'cache'))
    docs = list(sources.iter_documents(sources.source_settings('wiki', src['wiki'])))
    assert [d[2] for d in docs] == ['val', 'train', 'train'] and docs[1][1].startswith(' = Alpha = \n')


def test_jsonl_gz_and_txt_sources_download_and_prepare(server, tmp_path, prepared):
    trees = [{'prompt': {'role': 'prompter', 'text': f'q{i}', 'lang': 'en', 'replies': [
        {'role': 'assistant', 'text': f'a{i}', 'lang': 'en', 'rank': 0, 'replies': []}]}} for i in range(10)]
    server.files['/oasst.jsonl.gz'] = gzip.compress(''.join(json.dumps(t) + '\n' for t in trees).encode())
    rows = [{'instruction': f'do {i}', 'context': '', 'response': f'done {i}', 'category': 'open_qa'} for i in range(10)]
    server.files['/dolly.jsonl'] = ''.join(json.dumps(r) + '\n' for r in rows).encode()
    play = ''.join(f'SPEAKER {i}:\nSome words here, line {i}.\n\n' for i in range(30)).encode()
    server.files['/shakespeare.txt'] = play
    sources = {'o': {'kind': 'oasst1', 'url': server.url + '/oasst.jsonl.gz', 'sha256': None, 'size': None},
               'd': {'kind': 'dolly', 'url': server.url + '/dolly.jsonl'},
               't': {'kind': 'tinyshakespeare', 'url': server.url + '/shakespeare.txt',
                     'sha256': hashlib.sha256(play).hexdigest(), 'size': len(play)}}
    cfg = corpus_config(tmp_path, prepared, sources)
    p = run('prepare.py', cfg, '--analyze_only=True', check=True)
    assert not server.gets() and 'would download 1 file' in p.stdout and not (tmp_path / 'out').exists()
    run('prepare.py', cfg, check=True)
    data_dir = str(tmp_path / 'out' / 'data')
    documents = lambda n: sum(data.load_split(data_dir, n, s)['documents']
                              for s in ('train', 'val'))
    counts = {n: documents(n) for n in 'odt'}
    # 30 speeches, one cut in two where the last 10% (val) begins
    assert counts == {'o': 10, 'd': 10, 't': 31}
    assert len(server.gets()) == 3
    run('prepare.py', cfg, check=True)
    assert len(server.gets()) == 3


def test_analyze_only_reports_what_a_budgeted_corpus_would_download(server, tmp_path, prepared):
    for i in range(4):
        server.files[f'/fw/{i:03d}_00000.parquet'] = b'x' * 100_000
    src = {'fw': {'kind': 'fineweb_edu', 'base_url': server.url + '/fw', 'files': [f'{i:03d}_00000.parquet' for i in range(4)],
                  'train_tokens': 40_000, 'val_tokens': 10_000}}
    p = run('prepare.py', corpus_config(tmp_path, prepared, src), '--analyze_only=True', check=True)
    assert not server.gets() and {e[0] for e in server.log} == {'HEAD'}
    line = next(l for l in p.stdout.splitlines() if l.startswith('fw '))
    files, est_train, est_val = line.split()[2], line.split()[5], line.split()[6]
    assert int(files) < 4 and est_train == '40,000' and est_val == '10,000'
    assert 'would download' in p.stdout


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, '__import__', lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith('pyarrow') else real_import(name, *a, **k))
    with pytest.raises(SystemExit) as e:
        next(sources.read_parquet_texts(str(tmp_path / 'x.parquet')))
    assert 'pip install pyarrow' in str(e.value)


# ---- the real sample data (skipped where ../shared/data is absent) ----

@pytest.mark.skipif(not os.path.isdir(SHARED), reason='../shared/data is not here')
def test_real_sample_data_prepares_with_the_expected_counts(server, tmp_path, prepared):
    shakespeare = open(os.path.join(SHARED, 'tinyshakespeare', 'input.txt'), 'rb').read()
    # served as from its public URL, checked against the pinned sha256
    server.files['/char-rnn/input.txt'] = shakespeare
    sources = {
        'oasst1': {'kind': 'oasst1', 'path': os.path.join(SHARED, 'oasst1', 'en_100_tree.jsonl')},
        'dolly': {'kind': 'dolly', 'path': os.path.join(SHARED, 'dolly', 'databricks-dolly-15k-safety-only.subset.jsonl')},
        'roam': {'kind': 'roam', 'path': os.path.join(SHARED, 'roam-collective', 'markdown')},
        'shakespeare': {'kind': 'tinyshakespeare', 'url': server.url + '/char-rnn/input.txt'},
    }
    # keep every conversation
    cfg = corpus_config(tmp_path, prepared, sources, max_conversation_tokens=10 ** 6)
    run('prepare.py', cfg, check=True)
    data_dir = str(tmp_path / 'out' / 'data')
    meta = {n: {s: data.load_split(data_dir, n, s) for s in ('train', 'val')} for n in sources}
    docs = {n: m['train']['documents'] + m['val']['documents'] for n, m in meta.items()}
    # 100 English trees, each with a ranked reply; 387 dolly rows; 486 non-empty pages of 1,845
    # files; 7,222 blank-line-separated speeches in the 40,000 lines of Tiny Shakespeare
    # 7,222 speeches, one cut where val begins; less the duplicates prepare removes before the
    # split: 2 dolly rows ("Who is LBJ?" twice, a near copy of a reply about MLK) and 1 Roam page (a
    # near copy of another), none of Tiny Shakespeare, whose split is its own (kept whole); and the
    # junk (quality.py): 2 Roam pages (a CSS snippet whose lines repeat, a book-club page of one
    # repeated 3-gram)
    assert docs == {'oasst1': 100, 'dolly': 385, 'roam': 483, 'shakespeare': 7223}
    removed = {n: open(os.path.join(data_dir, n, 'removed.jsonl')).read().splitlines()
               for n in sources}
    counts = {n: len(r) for n, r in removed.items()}
    assert counts == {'oasst1': 0, 'dolly': 2, 'roam': 3, 'shakespeare': 0}
    assert shakespeare.decode().count('\n\n') + 1 == 7222
    # (the export's one file in a dot-folder, .concept/difference.md, is skipped as hidden, not
    # read)
    assert meta['roam']['train']['reader_counts']['empty'] == 1845 - 486 - 1
    # val by a hash of each document: ~10%, within 4 standard deviations of a binomial
    for n, m in meta.items():
        # (its val is the last 10% of the characters: test_prepare checks that)
        if n == 'shakespeare':
            continue
        assert abs(m['val']['documents'] - 0.1 * docs[n]) < 4 * (docs[n] * 0.1 * 0.9) ** 0.5, n


def test_tokenizer_trains_on_a_downloaded_corpus_within_its_byte_budget(server, tmp_path):
    words = 'river stone cloud seven orange quiet garden bread radio model token'.split()
    for i in range(2):
        texts = [' '.join(words[(j * 7 + k * 3) % len(words)] for k in range(60)) + f' doc {j}.' for j in range(300)]
        server.files[f'/fw/{i:03d}_00000.parquet'] = parquet_bytes(texts, tmp_path)
    # val: the first 100 tokens, which the tokenizer never reads (it skips 100 x 16 characters)
    src = {'fw': {'kind': 'fineweb_edu', 'base_url': server.url + '/fw',
                  'files': ['000_00000.parquet', '001_00000.parquet'],
                  'val_tokens': 100}}
    cfg = write_config(tmp_path / 'cfg.py', str(tmp_path / 'out'), '', sources=src, vocab_size=300,
                       tokenizer_sources={'fw': 20_000}, cache_dir=str(tmp_path / 'cache'), download_backoff=0.01)
    p = run('tokenizer.py', cfg, check=True)
    assert 'read 0.02 MB from fw' in p.stdout and (tmp_path / 'out' / 'tokenizer.model').exists()
    # 20 kB came from the first shard alone
    assert [g[1] for g in server.gets()] == ['/fw/000_00000.parquet']
    # with the default val budget (5M tokens) val takes all of this little corpus: a message, not
    # SentencePiece's internal error
    del src['fw']['val_tokens']
    p = run('tokenizer.py', cfg, f'--sources={src!r}',
            f"--tokenizer_path={tmp_path / 'other.model'}")
    assert p.returncode != 0 and 'no text to learn from' in p.stderr and 'INTERNAL' not in p.stderr


def test_wikitext_train_budget_stops_downloading_without_a_val_budget(server, tmp_path, prepared):
    def articles(prefix, n):
        return [line for i in range(n) for line in (f' = {prefix} {i} = \n', f' Some text about {prefix} {i} .\n')]
    server.files['/w/val.parquet'] = parquet_bytes(articles('Val', 3), tmp_path)
    server.files['/w/train-0.parquet'] = parquet_bytes(articles('Train', 40), tmp_path)
    server.files['/w/train-1.parquet'] = parquet_bytes(articles('More', 40), tmp_path)
    src = {'w': {'kind': 'wikitext', 'base_url': server.url + '/w', 'val_files': ['val.parquet'],
                 'train_files': ['train-0.parquet', 'train-1.parquet'], 'train_tokens': 50}}
    run('prepare.py', corpus_config(tmp_path, prepared, src), check=True)
    assert [g[1] for g in server.gets()] == ['/w/val.parquet', '/w/train-0.parquet']
    data_dir = str(tmp_path / 'out' / 'data')
    assert data.load_split(data_dir, 'w', 'val')['documents'] == 3  # no val budget: all of it
    assert 50 <= data.load_split(data_dir, 'w', 'train')['tokens'] < 50 + 40
