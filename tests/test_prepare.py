import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, load_cfg, run, write_config, write_corpus
import data
import files
import prepare
import sources
from tokenizer import Tokenizer


def tree_bytes(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for f in names:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, 'rb').read()
    return out


def test_layout_meta_and_split(prepared):
    cfg_path, out = prepared
    cfg = load_cfg(cfg_path)
    tok = Tokenizer(cfg.tokenizer_path)
    for name in ('roam', 'primer', 'story'):
        metas = {s: data.load_split(cfg.data_dir, name, s, tok.sha256) for s in ('train', 'val')}
        src = sources.source_settings(name, cfg.sources[name])
        n_docs = sum(1 for _ in sources.iter_documents(src))
        assert metas['train']['documents'] + metas['val']['documents'] == n_docs
        assert metas['val']['documents'] == sources.val_flags(src, cfg.split_seed, None).sum() > 0
        for split, meta in metas.items():
            assert meta['dtype'] == 'uint16' and meta['tokenizer_sha256'] == tok.sha256
            assert meta['source']['path'] == src['path'] and meta['split'] == split
            assert sum(s['tokens'] for s in meta['shards']) == meta['tokens']
            for shard in meta['shards']:
                ids = np.fromfile(shard['path'], dtype=np.uint16)
                starts = np.fromfile(shard['docs_path'], dtype=np.int64)
                assert len(ids) == shard['tokens'] and len(starts) == shard['documents']
                assert (ids[starts] == tok.bos_id).all() and (ids == tok.bos_id).sum() == len(starts)
                if meta['format'] == 'chat':
                    mask = np.fromfile(shard['mask_path'], dtype=np.uint8)
                    assert len(mask) == len(ids) and set(np.unique(mask)) == {0, 1}
                    assert (ids[mask == 1] == tok.eot_id).sum() > 0  # eot ends each assistant turn
    # train and val hold different documents
    roam = [data.load_split(cfg.data_dir, 'roam', s) for s in ('train', 'val')]
    texts = [Tokenizer(cfg.tokenizer_path).decode(np.fromfile(m['shards'][0]['path'], dtype=np.uint16).tolist())
             for m in roam]
    val_pages = {line for line in texts[1].split('\n') if line.startswith('page ') or line.startswith('projects/')}
    assert val_pages and not any(p in texts[0].split('\n') for p in val_pages)


def test_roam_any_nesting_titles_and_empty_pages(corpus):
    src = sources.source_settings('roam', {'kind': 'roam', 'path': os.path.join(corpus, 'roam')})
    stats = __import__('collections').Counter()
    docs = list(sources.iter_documents(src, stats))
    titles = {doc.split('\n')[0] for _, doc, _ in docs}
    assert 'projects/garden/page 2' in titles and 'projects/page 1' in titles and 'page 0' in titles
    assert stats['empty'] == 1 and len(docs) == 30


def test_primer_parsing(tmp_path):
    p = tmp_path / 'primer.txt'
    p.write_text("system: be brief.\nUser: hi\nassistant: hello.\nsecond line\n\n<dialogue>\n\n\n\n<dialogue>\n\n"
                 "user: again\nassistant: no.\n")
    convs = [c for _, c in sources.read_primer({'path': str(p), 'kind': 'primer', 'name': 'p'})]
    assert convs == [[{'role': 'system', 'content': 'be brief.'}, {'role': 'user', 'content': 'hi'},
                      {'role': 'assistant', 'content': 'hello.\nsecond line'}],
                     [{'role': 'user', 'content': 'again'}, {'role': 'assistant', 'content': 'no.'}]]


def test_a_symlink_loop_or_a_second_link_to_a_folder_reads_each_page_once(tmp_path, capsys):
    notes = tmp_path / 'notes'
    (notes / 'sub').mkdir(parents=True)
    (tmp_path / 'elsewhere').mkdir()
    for path in (notes / 'a.md', notes / 'sub' / 'b.md', tmp_path / 'elsewhere' / 'c.md'):
        path.write_text(f'- {path.stem}\n')
    os.symlink('.', notes / 'loop')             # ln -s . notes/loop
    os.symlink('sub', notes / 'again')          # a second way to notes/sub
    os.symlink(tmp_path / 'elsewhere', notes / 'linked')   # a folder outside: read, once
    os.symlink(tmp_path / 'elsewhere', notes / 'sub' / 'linked2')  # and a second way to it
    os.symlink('..', notes / 'sub' / 'up')      # a loop one level down
    src = sources.source_settings('roam', {'kind': 'roam', 'path': str(notes)})
    text = sources.source_settings('t', {'kind': 'text', 'path': str(notes / '**' / '*.md')})

    def too_slow(*_):  # two loops make a glob that follows links walk an exponential tree: fail, do not hang
        raise AssertionError("reading a folder with link loops took over 20 s: are links followed more than once?")
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        titles = sorted(doc.split('\n')[0] for _, doc, _ in sources.iter_documents(src))
        listed = sorted(os.path.basename(f) for f in sources.source_files(text))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert titles == ['a', 'linked/c', 'sub/b']
    assert "skipped 4 symlinked folder(s)" in capsys.readouterr().out
    assert listed == ['a.md', 'b.md', 'c.md']



def test_page_titles_from_file_names_with_tabs_and_newlines_stay_one_line(tmp_path):
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'tab\there\nand  newline .md').write_text('- body\n')
    src = sources.source_settings('roam', {'kind': 'roam', 'path': str(tmp_path / 'notes')})
    [(_, doc, _)] = sources.iter_documents(src)
    assert doc == 'tab here and newline\n- body\n'


def test_a_byte_order_mark_is_not_text(tmp_path):
    bom = '\ufeff'
    (tmp_path / 'primer.txt').write_text(bom + 'user: hi\nassistant: hello.\n\n<dialogue>\n\nuser: a\nassistant: b\n')
    (tmp_path / 'notes').mkdir()
    (tmp_path / 'notes' / 'page.md').write_text(bom + '- body\n')
    (tmp_path / 'story.txt').write_text(bom + 'one\n\ntwo\n')
    (tmp_path / 'c.jsonl').write_text(bom + json.dumps({'messages': [{'role': 'user', 'content': 'q'},
                                                                    {'role': 'assistant', 'content': 'a'}]}) + '\n')
    docs = {kind: [d for _, d, _ in sources.iter_documents(sources.source_settings('s', {'kind': kind, 'path': str(path), **extra}))]
            for kind, path, extra in [('primer', tmp_path / 'primer.txt', {}), ('roam', tmp_path / 'notes', {}),
                                      ('text', tmp_path / 'story.txt', {'separator': '\n\n'}), ('chat', tmp_path / 'c.jsonl', {})]}
    assert docs['primer'][0][0] == {'role': 'user', 'content': 'hi'} and docs['roam'] == ['page\n- body\n']
    assert docs['text'] == ['one', 'two\n'] and docs['chat'][0][0]['content'] == 'q'


def test_one_process_prepare_keeps_ctrl_c(tmp_path):
    """With num_proc=1 the main process tokenizes: it must not take the pool workers' 'ignore Ctrl-C'."""
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', vocab_size=320,
                       sources=big_text_source(tmp_path, 50))
    run('tokenizer.py', cfg, check=True)
    before = signal.getsignal(signal.SIGINT)
    out = list(prepare.tokenized([('big:1', 'alpha beta gamma', 'train')], load_cfg(cfg).tokenizer_path, 1, 1024, np.uint16))
    assert len(out) == 1 and signal.getsignal(signal.SIGINT) is before is signal.default_int_handler


def test_ctrl_c_during_prepare_is_one_line_and_leaves_no_temp_folder(tmp_path):
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', shard_tokens=4000, vocab_size=320, num_proc=2,
                       sources=big_text_source(tmp_path, 6000))
    run('tokenizer.py', cfg, check=True)
    proc = subprocess.Popen([sys.executable, 'prepare.py', cfg], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = tmp_path / 'out' / 'data' / 'big.tmp' / 'train' / 'shard_00002.bin'
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "prepare finished before it could be interrupted: make the corpus bigger"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and 'Traceback' not in err, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "interrupted: source 'big' was not finished and nothing of it was kept (sources prepared before it are done); "
        "run prepare.py again to go on"]
    assert os.listdir(tmp_path / 'out' / 'data') == []


def test_a_full_disk_stops_prepare_with_a_message_and_frees_what_it_wrote(tmp_path, prepared):
    """RLIMIT_FSIZE makes every write past 64 KB fail, as a full disk would (EFBIG instead of ENOSPC)."""
    import resource

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (70_000, 70_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the signal kills the process first)
    corpus = write_corpus(str(tmp_path / 'corpus'), pages=3, dialogues=3)
    with open(os.path.join(corpus, 'story.txt'), 'a') as f:
        f.write('Lots of words for a shard. ' * 20000)
    # (quality_filter off: one phrase 20,000 times is junk to quality.py)
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), corpus, quality_filter=False,
                       tokenizer_path=os.path.join(prepared[1], 'tokenizer.model'))
    p = run('prepare.py', cfg, '--prepare_sources=story', preexec_fn=small_disk)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert "File too large while preparing source 'story'" in p.stderr and 'free some space' in p.stderr
    assert os.listdir(tmp_path / 'out' / 'data') == []  # no story.tmp left to keep the disk full


def test_same_inputs_give_byte_identical_shards_whatever_the_process_count(tmp_path, prepared):
    cfg_path, out = prepared
    shutil.copy(os.path.join(out, 'tokenizer.model'), tmp_path / 'tokenizer.model')
    run('prepare.py', cfg_path, f'--data_dir={tmp_path}/data2', '--num_proc=2', check=True)
    a, b = tree_bytes(os.path.join(out, 'data')), tree_bytes(tmp_path / 'data2')
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_rerun_skips_finished_sources_and_redoes_changed_ones(tmp_path, corpus):
    local = write_corpus(str(tmp_path / 'corpus'), pages=5, dialogues=4)
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), local)
    run('tokenizer.py', cfg, check=True)
    run('prepare.py', cfg, check=True)
    p = run('prepare.py', cfg, check=True)
    assert p.stdout.count('up to date') == 3
    with open(os.path.join(local, 'story.txt'), 'a') as f:
        f.write('A new paragraph.\n')
    p = run('prepare.py', cfg, check=True)
    assert p.stdout.count('up to date') == 2 and 'story/train' in p.stdout


def test_analyze_only_writes_nothing(tmp_path, corpus):
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), corpus)
    p = run('prepare.py', cfg, '--analyze_only=True', check=True)
    assert not (tmp_path / 'out').exists()
    lines = {line.split()[0]: line.split() for line in p.stdout.splitlines()[1:4]}
    assert lines['roam'][2:5] == ['31', '30', lines['roam'][4]]  # files, docs
    assert lines['roam'][-4:] == ['1', '0', '0', '0']  # empty, bad, dup, junk
    assert 'est' in p.stdout and '4 bytes per token' in p.stdout


def big_text_source(tmp_path, paragraphs):
    """A text source of random paragraphs, big enough for prepare.py to be interrupted while it works."""
    (tmp_path / 'corpus').mkdir()
    rng = np.random.default_rng(0)
    words = np.array('alpha beta gamma delta river stone cloud seven orange quiet'.split())
    with open(tmp_path / 'corpus' / 'big.txt', 'w') as f:
        for _ in range(paragraphs):
            f.write(' '.join(rng.choice(words, 120)) + '\n\n')
    return {'big': {'kind': 'text', 'path': str(tmp_path / 'corpus' / 'big.txt'), 'separator': '\n\n'}}


def test_interrupted_prepare_then_rerun_equals_a_clean_run(tmp_path):
    """Kill prepare.py (SIGKILL) while it writes shards; the rerun must give the clean run's bytes."""
    sources = big_text_source(tmp_path, 3000)
    clean = write_config(tmp_path / 'clean.py', str(tmp_path / 'clean'), '', sources=sources, shard_tokens=4000,
                         vocab_size=320)
    run('tokenizer.py', clean, check=True)
    run('prepare.py', clean, check=True)
    killed = write_config(tmp_path / 'killed.py', str(tmp_path / 'killed'), '', sources=sources, shard_tokens=4000,
                          vocab_size=320,
                          tokenizer_path=str(tmp_path / 'clean' / 'tokenizer.model'))
    proc = subprocess.Popen([sys.executable, 'prepare.py', killed], cwd=REPO, stdout=subprocess.DEVNULL)
    marker = tmp_path / 'killed' / 'data' / 'big.tmp' / 'train' / 'shard_00003.bin'
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "prepare finished before it could be interrupted: make the corpus bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / 'killed' / 'data' / 'big' / 'train' / 'meta.json').exists()
    run('prepare.py', killed, check=True)
    a, b = tree_bytes(tmp_path / 'clean' / 'data'), tree_bytes(tmp_path / 'killed' / 'data')
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert len([k for k in a if 'shard_' in k]) > 4


def split_documents(data_dir, name, tok):
    """{'train': [...], 'val': [...]}: the decoded text of every prepared document."""
    out = {}
    for split in ('train', 'val'):
        meta = data.load_split(data_dir, name, split)
        out[split] = []
        for shard in meta['shards']:
            ids = np.fromfile(shard['path'], dtype=np.uint16)
            starts = np.fromfile(shard['docs_path'], dtype=np.int64).tolist() + [len(ids)]
            out[split] += [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, starts[1:])]
    return out


def test_growing_a_source_moves_no_train_document_to_val(tmp_path, prepared):
    """A document's split depends on its own content (a Roam page: its title) and split_seed only."""
    corpus = write_corpus(str(tmp_path / 'corpus'), pages=60, dialogues=60)
    chats = [{'messages': [{'role': 'user', 'content': f'question {i}?'}, {'role': 'assistant', 'content': f'answer {i}.'}]}
             for i in range(66)]
    (tmp_path / 'chat.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in chats[:60]))
    extra = {'chat': {'kind': 'chat', 'path': str(tmp_path / 'chat.jsonl')}}
    tokenizer = os.path.join(prepared[1], 'tokenizer.model')
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), corpus, tokenizer_path=tokenizer)
    sources_ = {**load_cfg(cfg).sources, **extra}
    run('prepare.py', cfg, f'--sources={sources_!r}', check=True)
    tok = Tokenizer(tokenizer)
    names = ('roam', 'primer', 'story', 'chat')
    before = {n: split_documents(str(tmp_path / 'out' / 'data'), n, tok) for n in names}
    # grow every source by 10%: new pages, dialogues, paragraphs and conversations, between and after the others
    grown = write_corpus(str(tmp_path / 'grown'), pages=66, dialogues=66, seed=1)
    for i in range(6):
        page = next(p for p in glob.glob(os.path.join(grown, 'roam', '**', f'page {60 + i}.md'), recursive=True))
        shutil.copy(page, os.path.join(corpus, 'roam', f'new page {i}.md'))
    with open(os.path.join(corpus, 'primer.txt'), 'a') as f:  # (it ends with a newline)
        f.write('\n<dialogue>\n\n' + '\n\n<dialogue>\n\n'.join(open(os.path.join(grown, 'primer.txt')).read().split('\n\n<dialogue>\n\n')[:6]))
    story = open(os.path.join(corpus, 'story.txt')).read().split('\n\n')
    for i in range(4):
        story.insert(10 * i, f'A new paragraph number {i}, inserted among the others.')
    open(os.path.join(corpus, 'story.txt'), 'w').write('\n\n'.join(story))
    (tmp_path / 'chat.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in chats[60:] + chats[:60]))
    run('prepare.py', cfg, f'--sources={sources_!r}', '--seed=2', check=True)  # the training seed plays no part
    after = {n: split_documents(str(tmp_path / 'out' / 'data'), n, tok) for n in names}
    for n in names:
        assert len(after[n]['train']) + len(after[n]['val']) > len(before[n]['train']) + len(before[n]['val'])
        assert not set(before[n]['train']) & set(after[n]['val']), n
        assert set(before[n]['val']) <= set(after[n]['val']) and before[n]['val'], n
    # split_seed draws another val set
    run('prepare.py', cfg, f'--sources={sources_!r}', '--split_seed=1', check=True)
    other = split_documents(str(tmp_path / 'out' / 'data'), 'primer', tok)
    assert set(other['val']) != set(after['primer']['val'])


def test_tiny_shakespeare_val_is_the_last_tenth_of_the_file(tmp_path, prepared):
    rng = np.random.default_rng(0)
    words = 'thou art the king of my heart and yet no more'.split()
    speeches = [f"SPEAKER {i}:\n" + ' '.join(rng.choice(words, int(rng.integers(3, 30)))) for i in range(200)]
    text = '\n\n'.join(speeches) + '\n'
    (tmp_path / 'input.txt').write_text(text)
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', tokenizer_path=os.path.join(prepared[1], 'tokenizer.model'),
                       sources={'ts': {'kind': 'tinyshakespeare', 'path': str(tmp_path / 'input.txt')}})
    run('prepare.py', cfg, check=True)
    docs = split_documents(str(tmp_path / 'out' / 'data'), 'ts', Tokenizer(os.path.join(prepared[1], 'tokenizer.model')))
    cut = int(len(text) * 0.9)  # as nanoGPT and char-rnn: the last 10% of the characters, cut in mid-speech
    speeches = lambda part: [s for s in part.split('\n\n') if s.strip()]
    assert docs['val'] == speeches(text[cut:]) and docs['train'] == speeches(text[:cut])
    # separator=None (config/shakespeare.py): each part one stream, as nanoGPT reads the file
    cfg = write_config(tmp_path / 'c1.py', str(tmp_path / 'out1'), '', tokenizer_path=os.path.join(prepared[1], 'tokenizer.model'),
                       sources={'ts': {'kind': 'tinyshakespeare', 'path': str(tmp_path / 'input.txt'), 'separator': None}})
    run('prepare.py', cfg, check=True)
    docs = split_documents(str(tmp_path / 'out1' / 'data'), 'ts', Tokenizer(os.path.join(prepared[1], 'tokenizer.model')))
    assert docs['val'] == [text[cut:]] and docs['train'] == [text[:cut]]



def test_windows_and_old_mac_line_ends_read_as_newlines(tmp_path):
    """A file saved on Windows (CR LF) or an old Mac (CR) reads as one saved with LF: a text source
    still splits on its separator (also where a block of the stream ends between CR and LF), and a
    Roam page's lines carry no CR into the chunks the model is shown."""
    docs = [f"story {i}: line one.\nline two." for i in range(40)]
    win, mac = str(tmp_path / 'win.txt'), str(tmp_path / 'mac.txt')
    (tmp_path / 'win.txt').write_bytes('\n\n'.join(docs).replace('\n', '\r\n').encode())
    for block in (7, 64, 1 << 20):  # (7 and 64 end blocks inside a CR LF)
        assert list(files.split_stream(win, '\n\n', None, block=block)) == docs
    (tmp_path / 'mac.txt').write_bytes('\n\n'.join(docs).replace('\n', '\r').encode())
    assert list(files.split_stream(mac, '\n\n', None, block=5)) == docs
    # a separator written with Windows line ends means the same documents
    assert list(files.split_stream(win, '\r\n\r\n', None, block=7)) == docs
    (tmp_path / 'roam').mkdir()
    (tmp_path / 'roam' / 'Dev.md').write_bytes(b'- owns the shop\r\n    - since 1998\r\n')
    src = sources.source_settings('roam', {'kind': 'roam', 'path': str(tmp_path / 'roam')})
    pages = [doc for _, doc, _ in sources.iter_documents(src)]
    assert pages == ['Dev\n- owns the shop\n    - since 1998\n']



def test_local_shards_are_rebuilt_when_the_way_files_are_read_changes(prepared, monkeypatch):
    """Shards made from local files before sources.py read them differently (CR LF as LF) are not up
    to date, although the files did not change; a downloaded corpus's bytes are checked by their
    hash instead."""
    cfg = load_cfg(prepared[0])
    local = sources.source_settings('story', cfg.sources['story'])
    online = sources.source_settings('d', {'kind': 'dolly', 'url': 'http://127.0.0.1:9/d.jsonl'})
    both = [(local, sources.source_files(local)), (online, [])]
    before = [prepare.fingerprint(s, paths, 'tok', cfg) for s, paths in both]
    monkeypatch.setattr(sources, 'READ_VERSION', sources.READ_VERSION + 1)
    after = [prepare.fingerprint(s, paths, 'tok', cfg) for s, paths in both]
    assert before[0] != after[0] and before[1] == after[1]


def test_a_large_file_without_separator_is_tokenized_in_pieces_across_workers(tmp_path, prepared):
    """A 2.5 MB file with no separator: documents of at most MAX_DOC_CHARS cut at line ends (not one document
    held whole in memory by one worker), each tokenized as the text it holds, split between train and val."""
    rng = np.random.default_rng(0)
    words = np.array('alpha beta gamma delta river stone cloud seven orange quiet'.split())
    lines = [' '.join(rng.choice(words, 12)) for _ in range(36000)]
    text = '\n'.join(lines) + '\n'
    (tmp_path / 'big.txt').write_text(text)
    tokenizer = os.path.join(prepared[1], 'tokenizer.model')
    # (quality_filter off: 10 words drawn at random repeat 5-grams, junk to quality.py)
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', tokenizer_path=tokenizer, num_proc=2,
                       sources={'big': {'kind': 'text', 'path': str(tmp_path / 'big.txt')}},
                       quality_filter=False)
    run('prepare.py', cfg, check=True)
    docs = split_documents(str(tmp_path / 'out' / 'data'), 'big', Tokenizer(tokenizer))
    expected = list(files.split_stream(str(tmp_path / 'big.txt'), None, None))
    assert len(expected) >= 3 and all(len(d) <= files.MAX_DOC_CHARS for d in expected)
    assert sorted(docs['train'] + docs['val']) == sorted(expected) and docs['val']


# ---- bad input: a clear message naming the path, a non-zero exit, nothing half-written ----

def prepare_error(tmp_path, sources, tokenizer_from=None, **extra):
    if tokenizer_from:
        extra['tokenizer_path'] = os.path.join(tokenizer_from, 'tokenizer.model')
    cfg = write_config(tmp_path / 'bad.py', str(tmp_path / 'out'), '', sources=sources, **extra)
    p = run('prepare.py', cfg)
    assert p.returncode != 0, p.stdout
    assert 'Traceback' not in p.stderr, p.stderr
    assert not (tmp_path / 'out' / 'data').exists() or not any(
        f == 'meta.json' for _, _, fs in os.walk(tmp_path / 'out' / 'data') for f in fs)
    return p.stderr


def test_missing_path(tmp_path, prepared):
    err = prepare_error(tmp_path, {'x': {'kind': 'text', 'path': str(tmp_path / 'nope.txt')}}, prepared[1])
    assert 'nope.txt' in err and 'does not exist' in err


def test_empty_folder(tmp_path, prepared):
    (tmp_path / 'export').mkdir()
    err = prepare_error(tmp_path, {'r': {'kind': 'roam', 'path': str(tmp_path / 'export')}}, prepared[1])
    assert 'export' in err and 'no files match' in err


def test_only_empty_pages(tmp_path, prepared):
    (tmp_path / 'export').mkdir()
    (tmp_path / 'export' / 'blank.md').write_text('  \n')
    err = prepare_error(tmp_path, {'r': {'kind': 'roam', 'path': str(tmp_path / 'export')}}, prepared[1])
    assert 'no documents' in err and '1 empty' in err


def test_file_that_is_not_utf8(tmp_path, prepared):
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9 au lait'.encode('latin-1'))
    err = prepare_error(tmp_path, {'t': {'kind': 'text', 'path': str(tmp_path / 'latin1.txt')}}, prepared[1])
    assert 'latin1.txt' in err and 'not valid UTF-8' in err and 'byte 3' in err


def test_primer_without_delimiter(tmp_path, prepared):
    (tmp_path / 'primer.txt').write_text('user: hi\nassistant: hello\n')
    err = prepare_error(tmp_path, {'p': {'kind': 'primer', 'path': str(tmp_path / 'primer.txt')}}, prepared[1])
    assert 'primer.txt' in err and '<dialogue>' in err


def test_primer_roles_out_of_order(tmp_path, prepared):
    (tmp_path / 'primer.txt').write_text('user: a\nassistant: b\n\n<dialogue>\n\nassistant: first?\nuser: x\n')
    err = prepare_error(tmp_path, {'p': {'kind': 'primer', 'path': str(tmp_path / 'primer.txt')}}, prepared[1])
    assert 'primer.txt line 6' in err and "role 'assistant'" in err


def test_malformed_jsonl_line(tmp_path, prepared):
    (tmp_path / 'chat.jsonl').write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                         '{"role": "assistant", "content": "yo"}]}\n{"messages": [\n')
    err = prepare_error(tmp_path, {'c': {'kind': 'chat', 'path': str(tmp_path / 'chat.jsonl')}}, prepared[1])
    assert 'chat.jsonl line 2' in err and 'not valid JSON' in err


def test_unknown_kind_and_setting(tmp_path, prepared):
    err = prepare_error(tmp_path, {'r': {'kind': 'roma', 'path': 'x'}}, prepared[1])
    assert "unknown kind 'roma'" in err and "did you mean 'roam'" in err
    err = prepare_error(tmp_path, {'r': {'kind': 'text', 'path': 'x', 'seperator': '\n'}}, prepared[1])
    assert "'seperator'" in err and "did you mean 'separator'" in err


def test_no_tokenizer_yet(tmp_path, corpus):
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), corpus)
    p = run('prepare.py', cfg)
    assert p.returncode != 0 and 'tokenizer.py' in p.stderr and 'tokenizer.model' in p.stderr


def test_shards_from_another_tokenizer_say_rerun_prepare(prepared):
    cfg = load_cfg(prepared[0])
    with pytest.raises(SystemExit) as e:
        data.load_split(cfg.data_dir, 'roam', 'train', tokenizer_sha256='0' * 64)
    assert 'another tokenizer' in str(e.value) and 'prepare.py' in str(e.value) and 'roam' in str(e.value)
    with pytest.raises(SystemExit) as e:
        data.load_split(cfg.data_dir, 'nosuch', 'train')
    assert "source 'nosuch'" in str(e.value) and 'prepare.py' in str(e.value)


def test_interrupted_rerun_keeps_old_complete_shards_until_new_ones_are_done(tmp_path, prepared):
    """A failing rerun (here: a file turned non-UTF-8) leaves the earlier complete shards in place."""
    corpus = write_corpus(str(tmp_path / 'corpus'), pages=3, dialogues=3)
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), corpus,
                       tokenizer_path=os.path.join(prepared[1], 'tokenizer.model'))
    run('prepare.py', cfg, check=True)
    before = tree_bytes(tmp_path / 'out' / 'data' / 'story')
    with open(os.path.join(corpus, 'story.txt'), 'ab') as f:
        f.write(b'\xff\xfe broken\n')
    p = run('prepare.py', cfg)
    assert p.returncode != 0 and 'story.txt' in p.stderr
    assert tree_bytes(tmp_path / 'out' / 'data' / 'story') == before


# ---- SFT sources ----

def msg(role, text, rank=None, replies=(), deleted=False, lang='en'):
    return {'role': role, 'text': text, 'rank': rank, 'replies': list(replies), 'deleted': deleted, 'lang': lang,
            'message_id': text}


def test_oasst_follows_the_best_ranked_live_replies(tmp_path):
    import gzip
    trees = [
        {'message_tree_id': 't1', 'prompt': msg('prompter', 'q1', replies=[
            msg('assistant', 'second best', rank=1),
            msg('assistant', 'deleted best', rank=0, deleted=True),
            msg('assistant', 'best', rank=0, replies=[
                msg('prompter', 'follow-up', rank=0, replies=[
                    msg('assistant', 'worse', rank=2), msg('assistant', 'better', rank=1)]),
                msg('prompter', 'other follow-up', rank=1)])])},
        {'message_tree_id': 't2', 'prompt': msg('prompter', 'frage', lang='de', replies=[msg('assistant', 'antwort', rank=0, lang='de')])},
        {'message_tree_id': 't3', 'prompt': msg('prompter', 'no answer yet')},
        {'message_tree_id': 't4', 'prompt': msg('prompter', 'q4', replies=[
            msg('assistant', 'a4', rank=0, replies=[msg('prompter', 'dangling question', rank=0)])])},
    ]
    path = tmp_path / 'trees.jsonl.gz'
    with gzip.open(path, 'wt') as f:
        f.writelines(json.dumps(t) + '\n' for t in trees)
    src = sources.source_settings('o', {'kind': 'oasst1', 'path': str(path)})
    stats = __import__('collections').Counter()
    convs = [c for _, c, _ in sources.iter_documents(src, stats)]
    assert convs == [
        [{'role': 'user', 'content': 'q1'}, {'role': 'assistant', 'content': 'best'},
         {'role': 'user', 'content': 'follow-up'}, {'role': 'assistant', 'content': 'better'}],
        [{'role': 'user', 'content': 'q4'}, {'role': 'assistant', 'content': 'a4'}],  # trailing question dropped
    ]
    assert sum(v for k, v in stats.items() if k.startswith('trees skipped')) == 2  # German, and unanswered
    src_all = sources.source_settings('o', {'kind': 'oasst1', 'path': str(path), 'lang': None})
    assert len(list(sources.iter_documents(src_all))) == 3


def test_dolly_mapping_keeps_context_and_category(tmp_path):
    rows = [{'instruction': 'Summarise this.', 'context': 'A long text.', 'response': 'Short.', 'category': 'summarization'},
            {'instruction': 'Name a colour.', 'context': '', 'response': 'Blue.', 'category': 'open_qa'}]
    path = tmp_path / 'dolly.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    src = sources.source_settings('d', {'kind': 'dolly', 'path': str(path)})
    stats = __import__('collections').Counter()
    convs = [c for _, c, _ in sources.iter_documents(src, stats)]
    assert convs == [[{'role': 'user', 'content': 'Summarise this.\n\nA long text.'}, {'role': 'assistant', 'content': 'Short.'}],
                     [{'role': 'user', 'content': 'Name a colour.'}, {'role': 'assistant', 'content': 'Blue.'}]]
    assert stats['category summarization'] == 1 and stats['category open_qa'] == 1
    only = sources.source_settings('d', {'kind': 'dolly', 'path': str(path), 'categories': ['open_qa']})
    assert len(list(sources.iter_documents(only))) == 1


def test_chat_shards_keep_an_aligned_mask_and_conversation_index(tmp_path, prepared):
    convs = [[{'role': 'user', 'content': f'question {i}'}, {'role': 'assistant', 'content': f'answer {i}'}]
             for i in range(10)]
    (tmp_path / 'c.jsonl').write_text(''.join(json.dumps({'messages': c}) + '\n' for c in convs))
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', sources={'c': {'kind': 'chat', 'path': str(tmp_path / 'c.jsonl')}},
                       tokenizer_path=os.path.join(prepared[1], 'tokenizer.model'), max_conversation_tokens=12)
    run('prepare.py', cfg, check=True)
    tok = Tokenizer(os.path.join(prepared[1], 'tokenizer.model'))
    metas = [data.load_split(str(tmp_path / 'out' / 'data'), 'c', s) for s in ('train', 'val')]
    assert sum(m['documents'] for m in metas) == 10 and metas[0]['truncated'] + metas[1]['truncated'] == 10
    meta = metas[0]
    ids = np.fromfile(meta['shards'][0]['path'], dtype=np.uint16)
    starts = np.fromfile(meta['shards'][0]['docs_path'], dtype=np.int64)
    mask = np.fromfile(meta['shards'][0]['mask_path'], dtype=np.uint8)
    assert len(ids) == len(mask) == 12 * meta['documents'] and list(starts) == list(range(0, len(ids), 12))
    from tokenizer import render_conversation
    rendered = [render_conversation(tok, c) for c in convs]
    for s in starts:
        full_ids, full_mask = next(r for r in rendered if r[0][:12] == ids[s:s + 12].tolist())
        assert mask[s:s + 12].tolist() == full_mask[:12] and sum(full_mask[:12]) > 0
    cfg = write_config(tmp_path / 'd.py', str(tmp_path / 'out2'), '', sources={'c': {'kind': 'chat', 'path': str(tmp_path / 'c.jsonl')}},
                       tokenizer_path=os.path.join(prepared[1], 'tokenizer.model'), max_conversation_tokens=6)
    p = run('prepare.py', cfg)
    assert p.returncode != 0 and 'no documents left' in p.stderr


def test_dot_folders_of_a_notes_folder_are_skipped_unless_hidden_is_set(tmp_path):
    """A notes folder's .obsidian/, .trash/ and .github/ hold settings and deleted pages, not notes;
    a page titled '.x' (a file, not a folder) is still a page."""
    for rel in ('a.md', 'sub/b.md', '.x.md', '.obsidian/workspace.md', '.trash/old.md',
                'sub/.github/ci.md'):
        (tmp_path / 'notes' / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'notes' / rel).write_text('- body\n')

    def titles(**settings):
        notes = {'kind': 'roam', 'path': str(tmp_path / 'notes'), **settings}
        src = sources.source_settings('n', notes)
        return sorted(doc.split('\n')[0] for _, doc, _ in sources.iter_documents(src))

    assert titles() == ['.x', 'a', 'sub/b']
    assert titles(hidden=True) == ['.obsidian/workspace', '.trash/old', '.x', 'a', 'sub/.github/ci',
                                   'sub/b']


def test_bad_chat_rows_are_named_and_analyze_only_reads_on(tmp_path):
    """Each way a chat row can be malformed stops a run naming file, line and field; analyze_only (a
    problems list) records it and reads the rows after it. Rows that are fine today stay fine."""
    good = {'messages': [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': ''},
                         {'role': 'assistant', 'content': 'a', 'name': 'bot'}]}
    rows = [good, {'messages': [{'role': 'user'}]}, {'messages': 'hi'},
            {'messages': [{'role': 'user', 'content': None}]},
            {'messages': [{'role': 2, 'content': 'x'}]}, {'messages': [['user', 'x']]},
            {'text': 'x'}, good]
    path = tmp_path / 'c.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    src = sources.source_settings('c', {'kind': 'chat', 'path': str(path)})
    problems = []
    docs = list(sources.iter_documents(src, None, problems))
    assert [d for _, d, _ in docs] == [good['messages']] * 2 and docs[1][0].endswith('line 8')
    assert len(problems) == 6, problems
    assert all(f'c.jsonl line {n}:' in p for n, p in zip(range(2, 8), problems)), problems
    assert "message 1 has no 'content'" in problems[0]
    assert "'messages' must be a list" in problems[1]
    assert "'content' must be a string, got null" in problems[2]
    assert "'role' must be a string, got 2" in problems[3]
    with pytest.raises(SystemExit) as e:
        list(sources.iter_documents(src))
    assert 'c.jsonl line 2' in str(e.value)


def test_every_source_setting_is_type_checked_and_defaults_pass():
    needs_path = lambda kind: {'path': 'x'} if kind in ('roam', 'text', 'primer', 'chat', 'pairs') else {}
    for kind in sources.KINDS:  # every default is fine
        sources.source_settings('s', {'kind': kind, **needs_path(kind)})
    bad = {'roam': {'glob': None, 'add_title': 1, 'hidden': 'yes', 'path': ['x', None]},
           'text': {'separator': 5, 'path': __import__('pathlib').Path('x'), 'val_frac': '0.1'},
           'dolly': {'categories': 'open_qa', 'url': 3, 'sha256': 'abc', 'size': -1},
           'oasst1': {'lang': ['en']},
           'fineweb_edu': {'files': 'a.parquet', 'base_url': None, 'val_tokens': True},
           'wikitext': {'train_files': [1], 'val_files': None}}
    for kind, settings in bad.items():
        for key, value in settings.items():
            with pytest.raises(SystemExit) as e:
                sources.source_settings('s', {'kind': kind, **needs_path(kind), key: value})
            assert "sources['s']" in str(e.value) and key in str(e.value), (kind, key, str(e.value))


# ---- issue 24: prepare.py replaces or deletes only what it wrote ----

def notes_config(tmp_path, prepared, **extra):
    """A workspace whose data_dir is the folder that holds the notes (roam/) and the story."""
    corpus = write_corpus(str(tmp_path / 'corpus'), pages=4, dialogues=3)
    keys = {'tokenizer_path': os.path.join(prepared[1], 'tokenizer.model'), 'data_dir': corpus,
            **extra}
    return write_config(tmp_path / 'c.py', str(tmp_path / 'out'), corpus, **keys), corpus


def test_a_data_dir_holding_the_notes_is_refused_and_the_notes_stay(tmp_path, prepared):
    cfg, corpus = notes_config(tmp_path, prepared)
    before = tree_bytes(corpus)
    p = run('prepare.py', cfg, '--prepare_sources=roam')
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert os.path.join(corpus, 'roam') in p.stderr and 'did not write' in p.stderr, p.stderr
    assert 'page 0.md' in p.stderr and 'data_dir' in p.stderr
    assert tree_bytes(corpus) == before


def test_a_tmp_or_old_folder_that_is_not_prepares_own_is_never_deleted(tmp_path, prepared):
    cfg, corpus = notes_config(tmp_path, prepared, data_dir=str(tmp_path / 'data'))
    for name in ('story.tmp', 'primer.old'):
        os.makedirs(tmp_path / 'data' / name)
        (tmp_path / 'data' / name / 'mine.txt').write_text('my own file')
    for name in ('story', 'primer'):
        p = run('prepare.py', cfg, f'--prepare_sources={name}')
        assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
        assert 'mine.txt' in p.stderr and 'did not write' in p.stderr, p.stderr
    assert tree_bytes(tmp_path / 'data') == {'story.tmp/mine.txt': b'my own file',
                                             'primer.old/mine.txt': b'my own file'}


def test_data_dir_inside_or_equal_to_a_source_folder_is_refused(tmp_path, prepared):
    cfg, corpus = notes_config(tmp_path, prepared)
    before = tree_bytes(corpus)
    for data_dir in (os.path.join(corpus, 'roam'), os.path.join(corpus, 'roam', 'shards')):
        p = run('prepare.py', cfg, f'--data_dir={data_dir}', '--prepare_sources=story')
        assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
        assert "source 'roam'" in p.stderr and 'data_dir' in p.stderr, p.stderr
        assert not os.path.exists(os.path.join(corpus, "roam", "shards"))
    assert tree_bytes(corpus) == before


def test_prepare_still_replaces_its_own_shards_and_leftovers(tmp_path, prepared):
    """Its own layout (train/ and val/ with shards and meta.json, temp names included) is replaced
    as before: a changed source, an interrupted run's story.tmp, an old swap's story.old."""
    cfg, corpus = notes_config(tmp_path, prepared, data_dir=str(tmp_path / 'data'))
    run('prepare.py', cfg, '--prepare_sources=story', check=True)
    shutil.copytree(tmp_path / 'data' / 'story', tmp_path / 'data' / 'story.old')
    shutil.copytree(tmp_path / 'data' / 'story', tmp_path / 'data' / 'story.tmp')
    open(tmp_path / 'data' / 'story.tmp' / 'train' / 'shard_00001.bin.tmp', 'wb').close()
    with open(os.path.join(corpus, 'story.txt'), 'a') as f:
        f.write('A new paragraph.\n')
    p = run('prepare.py', cfg, '--prepare_sources=story', check=True)
    assert 'story/train' in p.stdout
    assert sorted(os.listdir(tmp_path / 'data')) == ['story']


def lopsided_text(tmp_path, long_in_val):
    """200 short paragraphs and one long one (20x all of them) that the split puts in val (or not),
    as one long note did to a Roam source (val 33% of its tokens at val_frac 0.1)."""
    rng = __import__('random').Random(0)
    short = [f"Paragraph {i}: the cat reads slowly under the sea." for i in range(200)]
    for i in range(1000):
        words = ' '.join(rng.choice(['bike', 'seed', 'cat']) for _ in range(4000))
        long = f"Long note {i}: {words}"
        if (sources.split_hash(long, 0) < 0.1) == long_in_val:
            break
    path = tmp_path / 'lopsided.txt'
    path.write_text('\n\n'.join(short + [long]) + '\n')
    return str(path)


@pytest.mark.parametrize('long_in_val', [True, False], ids=['val too big', 'val too small'])
def test_a_val_share_of_tokens_far_from_val_frac_is_warned_about(tmp_path, prepared, long_in_val):
    # (quality_filter off: 3 words, repeated)
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', quality_filter=False,
                       tokenizer_path=os.path.join(prepared[1], 'tokenizer.model'), sources={
                           'notes': {'kind': 'text', 'path': lopsided_text(tmp_path, long_in_val),
                                     'separator': '\n\n'}})
    p = run('prepare.py', cfg, check=True)
    assert "warning: source 'notes'" in p.stderr and 'val_frac=0.1' in p.stderr, p.stderr
    assert 'split_seed' in p.stderr and 'of its tokens' in p.stderr


def test_an_even_split_and_a_small_source_are_not_warned_about(tmp_path, prepared):
    corpus = write_corpus(str(tmp_path / 'corpus'), pages=4, dialogues=3)
    with open(os.path.join(corpus, 'story.txt'), 'w') as f:
        f.write('\n\n'.join(f"Paragraph {i}: the cat reads slowly." for i in range(300)))
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), corpus,
                       tokenizer_path=os.path.join(prepared[1], 'tokenizer.model'))
    p = run('prepare.py', cfg, check=True)
    assert 'warning' not in p.stderr, p.stderr
