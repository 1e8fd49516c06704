"""retrieval.py: chunks of the notes, ranked by BM25, in front of a message; the same at prepare
time (SFT rows) and at chat time."""
import os
import re
import types

import pytest

import retrieval
from conftest import run, write_config


def index_of(pages, chunk_chars=500):
    chunks, titles = [], []
    for title, body in pages.items():
        for c in retrieval.chunk_page(title, body, chunk_chars):
            chunks.append(c)
            titles.append(title)
    return retrieval.Index(chunks, titles)


PAGES = {
    'Bike Shop': "- Harbour Cycles, on the quay. owned by [[Dev]].\n- hours:: tue-sat, 9:00-17:30",
    'Dev': "- owns the bike shop since 1998\n- drinks builder's tea, four sugars",
    'Biscuit': "- ginger tom, nine years old\n- hates the hoover",
    'November 3rd, 2026': "- fitted two tyres for the man with the folding bike",
}


def test_the_page_that_shares_rare_words_comes_first():
    index = index_of(PAGES)
    assert index.search('what does biscuit hate?', 1)[0].startswith('[Biscuit]')
    assert index.search('who owns harbour cycles', 1)[0].startswith('[Bike Shop]')
    # the title counts: a daily note is found by its date
    assert index.search('what happened on november 3rd', 1)[0].startswith('[November 3rd')
    # plurals meet singulars; stopwords and unknown words find nothing
    assert index.search('tyres', 1)[0].startswith('[November 3rd')
    # accents do not count: a question typed without them finds the note written with them
    accents = index_of({'Café Brisa': '- run by Inês', 'Bakery': '- run by Ines'})
    assert [c[:6] for c in accents.search('which cafe?', 2)] == ['[Café ']
    assert len(accents.search('ines', 3)) == 2
    assert index.search('what is the who', 3) == []
    assert index.search('zeppelin', 3) == []


def test_chunks_keep_whole_lines_and_a_title_each():
    body = '\n'.join(f"- line {i} " + 'x' * 40 for i in range(30)) + '\n    - child\n' + 'y' * 130
    chunks = retrieval.chunk_page('Long', body, 120)
    assert all(c.startswith('[Long]\n') for c in chunks)
    assert all(len(c) <= 120 + len('[Long]\n') for c in chunks)
    # nothing lost, nothing added (but the titles)
    assert ''.join(c[len('[Long]\n'):].replace('\n', '') for c in chunks) == body.replace('\n', '')


def test_a_chunk_inside_a_block_carries_its_first_line_and_long_lines_are_cut_at_spaces():
    body = ('- shop\n' + ''.join(f"    - repair {i}: new chain and cables, {i} pounds\n" for i in range(6))
            + '- ' + ' '.join(f"word{i}" for i in range(40)))
    chunks = retrieval.chunk_page('Day', body, 100)
    nested = [c for c in chunks if '- repair 5' in c][0]
    assert nested.startswith('[Day]\n- shop\n    - repair')  # "shop" tells what the repair was
    assert all(len(c) <= 100 + 100 // 2 + len('[Day]\n') for c in chunks)
    long = [c.split('\n')[-1] for c in chunks if 'word' in c]
    assert len(long) > 1 and all(w.startswith(('word', '- word')) for w in long)  # cut between words
    assert ' '.join(long) == '- ' + ' '.join(f"word{i}" for i in range(40))
    # a nested line with no space in its text is cut inside it, never into a piece of indentation
    chunks = retrieval.chunk_page('Day', '- a\n    -' + 'z' * 250, 100)
    assert all(c.split('\n')[-1].strip() for c in chunks) and sum(c.count('z') for c in chunks) == 250


def test_with_notes_puts_the_best_chunks_before_the_question():
    index = index_of(PAGES)
    content = retrieval.with_notes(index, 'and how old is he?', 2, context='tell me about biscuit')
    assert content.startswith('notes:\n[Biscuit]')
    assert content.endswith('question: and how old is he?')
    assert retrieval.with_notes(None, 'hi', 3) == 'hi'  # retrieval off
    assert '(nothing in the notes matches)' in retrieval.with_notes(index, 'zeppelin', 3)
    rows = retrieval.with_notes_conversation(index, [
        {'role': 'system', 'content': 's'},
        {'role': 'user', 'content': 'who is dev'},
        {'role': 'assistant', 'content': 'the owner.'},
        {'role': 'user', 'content': 'since when?'}], 1)
    assert rows[0]['content'] == 's' and rows[2]['content'] == 'the owner.'
    assert rows[1]['content'].startswith('notes:\n[Dev]')
    assert rows[3]['content'].startswith('notes:\n[Dev]')


def test_notes_index_reads_the_named_source(corpus):
    cfg = types.SimpleNamespace(retrieve_from='roam', retrieve_chunk_chars=300, sources={
        'roam': {'kind': 'roam', 'path': os.path.join(corpus, 'roam')},
        'primer': {'kind': 'primer', 'path': os.path.join(corpus, 'primer.txt')}})
    index = retrieval.notes_index(cfg)
    assert len(index.chunks) > 10 and all(c.startswith('[') for c in index.chunks)
    for name, says in (('nope', 'not one of the sources'), ('primer', 'is a chat source')):
        with pytest.raises(SystemExit) as e:
            retrieval.notes_index(types.SimpleNamespace(**{**vars(cfg), 'retrieve_from': name}))
        assert says in str(e.value)
    assert retrieval.notes_index(types.SimpleNamespace(retrieve_from='')) is None


def test_prepare_builds_rows_with_the_notes_and_again_when_they_change(tmp_path, corpus):
    import shutil
    from data import SplitReader
    from tokenizer import load_tokenizer
    notes = tmp_path / 'roam'
    shutil.copytree(os.path.join(corpus, 'roam'), notes)
    primer = os.path.join(corpus, 'primer.txt')
    cfg = write_config(tmp_path / 'cfg.py', str(tmp_path / 'out'), corpus, retrieve_from='roam',
                       retrieve_k=2, sources={'roam': {'kind': 'roam', 'path': str(notes)},
                                              'primer': {'kind': 'primer', 'path': primer}})
    run('tokenizer.py', cfg, check=True)
    run('prepare.py', cfg, check=True)
    tok = load_tokenizer(str(tmp_path / 'out' / 'tokenizer.model'))
    reader = SplitReader(str(tmp_path / 'out' / 'data'), 'primer', 'train')
    text = tok.decode(list(reader.tokens(0)[:400]))
    assert 'notes:' in text and 'question: ' in text
    assert 'up to date' in run('prepare.py', cfg, check=True).stdout
    with open(notes / 'New page.md', 'w') as f:
        f.write('- a page added later\n')
    out = run('prepare.py', cfg, check=True).stdout
    assert 'primer is up to date' not in out and 'roam is up to date' not in out


def test_unanswerable_rows_show_the_question_without_the_notes_that_answer_it():
    index = index_of(PAGES)
    system = {'role': 'system', 'content': 'be terse.'}
    asked = [system, {'role': 'user', 'content': 'what does biscuit hate?'},
             {'role': 'assistant',
              'content': 'the hoover. ginger tom, nine years old, and he hates it.'},
             {'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hi. ask away.'}]
    rows = retrieval.unanswerable_rows(index, asked, 2, "i don't know.", 1.0)
    # one row: the question whose reply the notes hold; "hi" has no facts from the notes in its
    # reply
    assert len(rows) == 1
    s, user, reply = rows[0]
    assert s == system and reply == {'role': 'assistant', 'content': "i don't know."}
    assert user['content'].endswith('question: what does biscuit hate?')
    assert '[Biscuit]' not in user['content'] and 'hoover' not in user['content']
    assert retrieval.unanswerable_rows(index, asked, 2, "i don't know.", 0.0) == []
    # a reply that is not in the notes shown (k=1 shows the bike shop, the answer is Dev's page)
    # gives no row
    elsewhere = [{'role': 'user', 'content': 'harbour cycles hours?'},
                 {'role': 'assistant', 'content': "builder's tea, four sugars."}]
    assert retrieval.unanswerable_rows(index, elsewhere, 1, "i don't know.", 1.0) == []


def test_which_rows_get_an_unanswerable_twin_is_fixed_and_about_frac():
    picked = [retrieval.chosen(f'question {i}', 0.25) for i in range(2000)]
    assert picked == [retrieval.chosen(f'question {i}', 0.25) for i in range(2000)]
    assert 400 < sum(picked) < 600
    assert all(retrieval.chosen(f'q{i}', 1.0) for i in range(100))
    assert not any(retrieval.chosen(f'q{i}', 0.0) for i in range(100))


def test_prepare_adds_unanswerable_rows_to_the_split_of_their_conversation(tmp_path, corpus):
    from data import SplitReader
    from tokenizer import load_tokenizer
    primer = os.path.join(corpus, 'primer.txt')
    sources = {'roam': {'kind': 'roam', 'path': os.path.join(corpus, 'roam')},
               'primer': {'kind': 'primer', 'path': primer, 'val_frac': 0.3}}
    cfg = write_config(tmp_path / 'cfg.py', str(tmp_path / 'out'), corpus, retrieve_from='roam',
                       retrieve_k=2, sources=sources, unanswerable_frac=1.0,
                       unanswerable_reply='no idea, mate.')
    run('tokenizer.py', cfg, check=True)
    out = run('prepare.py', cfg, check=True).stdout
    added = int(re.search(r"primer: (\d+) rows that answer 'no idea, mate.'", out).group(1))
    assert added > 0
    tok = load_tokenizer(str(tmp_path / 'out' / 'tokenizer.model'))
    seen = 0
    for split in ('train', 'val'):
        reader = SplitReader(str(tmp_path / 'out' / 'data'), 'primer', split)
        ids = reader.tokens(0)
        starts = list(reader.doc_starts(0)) + [len(ids)]
        docs = [tok.decode(list(ids[a:b])) for a, b in zip(starts, starts[1:])]
        rows = [d for d in docs if 'no idea, mate.' in d]
        for row in rows:  # its question is asked in a conversation of the same split
            question = row.split('question: ')[-1].split('no idea, mate.')[0].strip()
            assert any(question in d for d in docs if d not in rows), question
        seen += len(rows)
    assert seen == added
    # the setting is part of what the shards depend on
    again = run('prepare.py', cfg, '--unanswerable_frac=0.5', check=True).stdout
    assert 'primer is up to date' not in again
