"""dedup.py and prepare.py's use of it: exact and near duplicates out before the split, within and
across sources, counted, listed in removed.jsonl, the first copy kept whatever the number of
processes."""
import filecmp
import json
import os
import random
import re
import shutil

import dedup
from conftest import WORDS, run, write_config


def text_of(seed, n=150):
    rng = random.Random(seed)
    return ' '.join(f'{rng.choice(WORDS)}{rng.randint(0, 99)}' for _ in range(n))


def one_word_changed(text, at=70):
    words = text.split()
    words[at] = 'changed'
    return ' '.join(words)


def test_exact_near_and_unrelated():
    a = text_of(1)
    index = dedup.Index(0.8)
    assert index.check(a) is None
    # whitespace is not a difference
    assert index.check('\n  ' + a.replace(' ', ' \t ') + '\n') == ('exact', 0)
    why, i, similarity = index.check(one_word_changed(a))
    assert (why, i) == ('near', 0) and 0.85 < similarity < 1
    assert index.check(text_of(2)) is None and index.n == 2  # unrelated: kept
    # shingles are lowercased words; exact keys are not
    assert index.check(a.upper()) == ('near', 0, 1.0)


def test_the_threshold_at_its_edges():
    a = text_of(3)
    b = one_word_changed(one_word_changed(a, 40), 110)  # two words: ~10 of ~150 shingles differ
    sa, sb = dedup.signature(a), dedup.signature(b)
    estimate = float((sa == sb).mean())
    assert 0.8 < estimate < 0.98
    edges = ((estimate, False), (min(1.0, estimate + 0.01), True), (estimate - 0.05, False))
    for threshold, kept in edges:
        index = dedup.Index(threshold)
        index.check(a)
        assert (index.check(b) is None) == kept, threshold
    bands, rows = dedup.bands_for(1.0)
    assert dedup.bands_for(0.8) == (16, 8) and bands * rows == 128


def test_short_texts_are_only_removed_as_exact_copies():
    index = dedup.Index(0.8, min_words=1)
    assert index.check('') is None and index.check('   ') == ('exact', 0)
    assert index.check('hi there') is None
    assert index.check('hi there!') == ('near', 1, 1.0)  # the same words
    assert index.check('hi where') is None  # one word of two: not alike
    # below min_words a page is mostly its template: two maxims of one template are not copies
    template = ' '.join(f'tags:: maxims created:: february {i} author:: someone' for i in range(5))
    index = dedup.Index(0.8, min_words=100)
    assert index.check('abandon ideology.\n' + template) is None
    assert index.check('pay attention.\n' + template) is None
    assert index.check('pay attention.\n' + template) == ('exact', 1)
    # a conversation's replies are what near copies are looked for in
    conv = lambda q, a: [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]
    long_reply = text_of(7)
    assert dedup.near_text(conv('what is it?', long_reply)) == long_reply
    index = dedup.Index(0.8)
    a, b = conv('what is it?', long_reply), conv('and this?', one_word_changed(long_reply))
    assert index.check(dedup.doc_text(a), dedup.near_text(a)) is None
    assert index.check(dedup.doc_text(b), dedup.near_text(b))[0] == 'near'


def write_notes(root):
    """A Roam export with a page pasted twice (another title), a near copy, and pages of their own;
    a text source that repeats one of the notes."""
    roam = root / 'roam'
    roam.mkdir()
    pages = {f'page {i}': text_of(10 + i) for i in range(12)}
    pages['pasted again'] = pages['page 3']
    pages['edited copy'] = one_word_changed(pages['page 5'])
    for title, text in pages.items():
        (roam / f'{title}.md').write_text(f'- {text}\n')
    parts = [text_of(100), '- ' + pages['page 7'], text_of(101), text_of(100)]
    (root / 'more.txt').write_text('\n\n'.join(parts))
    return {'roam': {'kind': 'roam', 'path': str(roam), 'val_frac': 0.5},
            'more': {'kind': 'text', 'path': str(root / 'more.txt'), 'separator': '\n\n'}}


def test_prepare_removes_counts_and_lists_duplicates_in_and_across_sources(tmp_path):
    sources = write_notes(tmp_path)
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', sources=sources,
                       vocab_size=300)
    run('tokenizer.py', cfg, check=True)
    out = run('prepare.py', cfg, check=True).stdout
    # (a page pasted under another title is a near copy: a Roam page's text starts with its title)
    assert re.search(r'roam: 14 documents read, 2 removed \(2 near duplicate\), 12 kept', out), out
    assert re.search(r'more: 4 documents read, 2 removed \(1 exact duplicate, 1 near duplicate\), 2 kept',
                     out), out
    data = tmp_path / 'out' / 'data'
    removed = [json.loads(line) for line in open(data / 'roam' / 'removed.jsonl')]
    assert all(r['kept_source'] == 'roam' for r in removed)
    # the first copy in reading order stays (files are read sorted: 'edited copy' before 'page 5')
    pairs = sorted((os.path.basename(r['removed']), os.path.basename(r['kept'])) for r in removed)
    assert pairs == [('page 5.md', 'edited copy.md'), ('pasted again.md', 'page 3.md')]
    other = [json.loads(line) for line in open(data / 'more' / 'removed.jsonl')]
    assert [r['why'].split(' (')[0] for r in other] == ['near duplicate', 'exact duplicate']
    assert other[0]['kept'].endswith('page 7.md') and other[0]['kept_source'] == 'roam'
    exact = other[1]
    assert (exact['kept_source'], exact['kept_document'], exact['document']) == ('more', 1, 4)
    meta = {s: json.load(open(data / 'roam' / s / 'meta.json')) for s in ('train', 'val')}
    assert meta['train']['documents'] + meta['val']['documents'] == 12
    # the same settings: up to date; another threshold: prepared again; dedup off: every document
    assert 'roam is up to date' in run('prepare.py', cfg, check=True).stdout
    again = run('prepare.py', cfg, '--dedup_threshold=0.9', check=True).stdout
    assert 'roam is up to date' not in again
    run('prepare.py', cfg, '--dedup=False', '--quality_filter=False', check=True)
    meta = {s: json.load(open(data / 'roam' / s / 'meta.json')) for s in ('train', 'val')}
    assert meta['train']['documents'] + meta['val']['documents'] == 14
    assert not (data / 'roam' / 'removed.jsonl').exists()


def test_two_near_copies_never_end_on_both_sides_and_processes_do_not_matter(tmp_path):
    sources = write_notes(tmp_path)
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', sources=sources,
                       vocab_size=300)
    run('tokenizer.py', cfg, check=True)
    for seed in range(4):  # whatever the split, only one of each pair is there to land anywhere
        run('prepare.py', cfg, f'--split_seed={seed}', check=True)
        from data import SplitReader
        from tokenizer import load_tokenizer
        tok = load_tokenizer(str(tmp_path / 'out' / 'tokenizer.model'))
        texts = ''
        for split in ('train', 'val'):
            reader = SplitReader(str(tmp_path / 'out' / 'data'), 'roam', split)
            texts += tok.decode(list(reader.tokens(0))) + '\n'
        first_words = ' '.join(text_of(15).split()[:2])
        assert texts.count(first_words) == 1  # page 5 or its copy
    run('prepare.py', cfg, '--num_proc=2', f'--data_dir={tmp_path}/data2', check=True)
    run('prepare.py', cfg, '--num_proc=1', f'--data_dir={tmp_path}/data1', check=True)
    for source in ('roam', 'more'):
        for split in ('train', 'val'):
            a, b = tmp_path / 'data1' / source / split, tmp_path / 'data2' / source / split
            files = ['shard_00000.bin', 'docs_00000.bin']
            assert filecmp.cmpfiles(a, b, files, shallow=False)[0] == files
        assert filecmp.cmp(tmp_path / 'data1' / source / 'removed.jsonl',
                           tmp_path / 'data2' / source / 'removed.jsonl', shallow=False)
    shutil.rmtree(tmp_path / 'data2')


def test_a_corpus_with_its_own_split_is_kept_whole(tmp_path):
    """Tiny Shakespeare's val is its last 10%, as everyone measures it: dedup removes nothing of it
    (a repeated speech stays), but a later source's copy of one of its speeches goes."""
    speech = text_of(50)
    play = '\n\n'.join([text_of(51), speech, text_of(52), speech, text_of(53)]) + '\n'
    (tmp_path / 'play.txt').write_text(play)
    (tmp_path / 'more.txt').write_text(speech + '\n\n' + text_of(54) + '\n')
    sources = {'play': {'kind': 'tinyshakespeare', 'path': str(tmp_path / 'play.txt')},
               'more': {'kind': 'text', 'path': str(tmp_path / 'more.txt'), 'separator': '\n\n'}}
    cfg = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', sources=sources,
                       vocab_size=300)
    run('tokenizer.py', cfg, check=True)
    out = run('prepare.py', cfg, check=True).stdout
    # (6: a speech cut where val begins)
    assert re.search(r'play: [56] documents read, 0 removed', out), out
    assert re.search(r'more: 2 documents read, 1 removed \(1 exact duplicate\)', out), out
    data = tmp_path / 'out' / 'data'
    docs = sum(json.load(open(data / 'play' / s / 'meta.json'))['documents']
               for s in ('train', 'val'))
    assert docs >= 5 and (data / 'play' / 'removed.jsonl').read_text() == ''
