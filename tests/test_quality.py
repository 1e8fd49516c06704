"""quality.py: each filter at the edges of its threshold, the chat rules, and prepare.py removing, counting and listing
junk before the split (the rerun key, the processes)."""
import json
import os
import re
import types

import pytest

from conftest import run, write_config

import quality

DEFAULTS = dict(quality_filter=True, filter_min_words=1, filter_max_words=0, filter_max_non_text=0.3,
                filter_max_dup_lines=0.5, filter_max_top_ngram=0.3, filter_max_dup_ngrams=0.6)


def cfg(**changes):
    return types.SimpleNamespace(**{**DEFAULTS, **changes})


def prose(n, seed=0):
    """n words of varied text: no line, 2-gram or 5-gram repeats much."""
    import random
    rng = random.Random(seed)
    return ' '.join(f"w{rng.randrange(10 ** 6)}" for _ in range(n))


def test_length_at_its_edges():
    assert quality.text_problem('one two three', cfg(filter_min_words=3)) is None
    assert quality.text_problem('one two', cfg(filter_min_words=3)).startswith('filter_min_words: 2 words')
    assert quality.text_problem(prose(100), cfg(filter_max_words=100)) is None
    assert quality.text_problem(prose(101), cfg(filter_max_words=100)).startswith('filter_max_words')
    assert quality.text_problem(prose(101), cfg(filter_max_words=0)) is None  # 0: no limit


def test_non_text_share_at_its_edges():
    text = 'a' * 70 + '\u2500' * 30  # box drawing: 30% of the characters
    assert quality.non_text_share(text) == pytest.approx(0.3)
    assert quality.text_problem(text, cfg()) is None  # at the limit: kept
    assert quality.text_problem(text + '\ufffd', cfg()).startswith('filter_max_non_text')
    assert quality.non_text_share('tabs\tand\nnewlines, punctuation (brackets) [[links]] #tags: é ü 中文') == 0
    assert quality.non_text_share('\x00\x01ab') == 0.5 and quality.non_text_share('😀😀ab') == 0.5
    assert quality.text_problem('\x00' * 99 + 'x', cfg(filter_max_non_text=0)) is None  # 0: off


def test_repeated_lines_at_their_edges():
    unique = [f"line {i} " + prose(10, i) for i in range(10)]
    # 10 lines, 5 of them repeats of earlier ones: 0.5 of lines (kept at 0.5, not above it)
    half = '\n'.join(unique[:5] + unique[:5])
    lines, chars = quality.dup_line_shares(half)
    assert lines == 0.5 and chars == pytest.approx(0.5)
    assert quality.text_problem(half, cfg(filter_max_dup_lines=0.5, filter_max_dup_ngrams=0,
                                          filter_max_top_ngram=0)).startswith('filter_max_dup_lines')  # chars > 1/3
    assert quality.text_problem(half, cfg(filter_max_dup_lines=0.76, filter_max_dup_ngrams=0,
                                          filter_max_top_ngram=0)) is None  # 0.5 < 0.76 and 0.5 < 0.507
    # a short note may repeat a line: the repetition rules need 50 words
    assert quality.text_problem('- todo\n- todo\n- todo', cfg()) is None


def test_repeated_ngrams_at_their_edges():
    words = prose(80).split()
    looped = ' '.join(words[:40] * 2)  # every 5-gram but those across the seam occurs twice
    assert quality.text_problem(' '.join(words), cfg()) is None
    why = quality.text_problem(looped, cfg(filter_max_dup_lines=0))
    assert why.startswith('filter_max_dup_ngrams: 1.00 of the characters are in repeated 5-grams')
    assert quality.text_problem(looped, cfg(filter_max_dup_lines=0, filter_max_dup_ngrams=0)) is None
    # the most frequent 2-gram, "a b" 15 times, each followed by a word of its own (no 3-gram repeats)
    text = ' '.join([f"a b y{i}" for i in range(15)] + [f"x{i}" for i in range(25)])
    share = 30 / len(text.replace(' ', ''))
    assert share < 0.3 and quality.text_problem(text, cfg(filter_max_dup_ngrams=0)) is None
    assert quality.text_problem(text, cfg(filter_max_dup_ngrams=0, filter_max_top_ngram=share)) is None
    assert quality.text_problem(text, cfg(filter_max_dup_ngrams=0, filter_max_top_ngram=share - 0.001)) \
        .startswith('filter_max_top_ngram: the most frequent 2-gram')


def test_chat_rules():
    user = {'role': 'user', 'content': 'q'}
    reply = lambda text: {'role': 'assistant', 'content': text}
    long = 'the chain skips because the cassette is worn down to the teeth'
    assert quality.chat_problem([user, reply('no.'), user, reply('no.')]) is None  # a short reply may repeat
    assert quality.chat_problem([user, reply(long), user, reply('  ' + long)]).startswith('chat: a reply of 10+')
    assert quality.chat_problem([user, reply(' \n ')]) == 'chat: an empty assistant reply'
    assert quality.problem([user, reply('')], cfg(quality_filter=False)) is None


def test_prepare_removes_counts_and_lists_junk_before_the_split(tmp_path):
    notes = tmp_path / 'notes'
    os.makedirs(notes)
    for i in range(12):
        (notes / f"page {i}.md").write_text(f"- {prose(60, i)}\n", encoding='utf-8')
    (notes / 'looped.md').write_text('\n'.join(['- the same line again and again and again'] * 20))
    (notes / 'binary.md').write_text('- ' + '\u2592' * 400 + ' ok')
    chats = tmp_path / 'chats.jsonl'
    rows = [[{'role': 'user', 'content': f'q{i}'}, {'role': 'assistant', 'content': f'answer number {i}.'}]
            for i in range(8)] + [[{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': ''}]]
    chats.write_text(''.join(json.dumps({'messages': m}) + '\n' for m in rows))
    sources = {'roam': {'kind': 'roam', 'path': str(notes)}, 'chats': {'kind': 'chat', 'path': str(chats)}}
    c = write_config(tmp_path / 'c.py', str(tmp_path / 'out'), '', sources=sources, vocab_size=300)
    run('tokenizer.py', c, check=True)
    out = run('prepare.py', c, check=True).stdout
    assert re.search(r'roam: 14 documents read, 2 removed \(1 filter_max_dup_lines, 1 filter_max_non_text\), 12 kept',
                     out), out
    assert re.search(r'chats: 9 documents read, 1 removed \(1 chat\), 8 kept', out), out
    data = tmp_path / 'out' / 'data'
    removed = [json.loads(line) for line in open(data / 'roam' / 'removed.jsonl')]
    assert sorted(os.path.basename(r['removed']) for r in removed) == ['binary.md', 'looped.md']
    meta = {s: json.load(open(data / 'roam' / s / 'meta.json')) for s in ('train', 'val')}
    assert meta['train']['documents'] + meta['val']['documents'] == 12
    # analyze_only counts them too
    assert re.search(r'roam .* 2\n', run('prepare.py', c, '--analyze_only=True', check=True).stdout)
    # the settings are part of the rerun key; off: every document
    assert 'roam is up to date' in run('prepare.py', c, check=True).stdout
    assert 'roam is up to date' not in run('prepare.py', c, '--filter_max_non_text=0.9', check=True).stdout
    run('prepare.py', c, '--quality_filter=False', check=True)
    meta = {s: json.load(open(data / 'roam' / s / 'meta.json')) for s in ('train', 'val')}
    assert meta['train']['documents'] + meta['val']['documents'] == 14
