"""files.py: finding files under a folder by a glob, and reading a file of any size in pieces."""
import gzip
import os

import files


def test_globs_match_as_glob_does_hidden_names_only_for_roam(tmp_path):
    for rel in ('x.md', 'd/y.md', 'd/e/z.md', '.trash/old.md', 'd/.hidden.md', 'note.txt'):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text('- x\n')

    def found(pattern, hidden):
        return sorted(os.path.relpath(f, tmp_path)
                      for f in files.find_files(str(tmp_path), pattern, 'x', hidden))
    # as glob.glob(..., recursive=True)
    assert found('**/*.md', False) == ['d/e/z.md', 'd/y.md', 'x.md']
    assert found('**/*.md', True) == ['.trash/old.md', 'd/.hidden.md', 'd/e/z.md', 'd/y.md', 'x.md']
    assert found('*.md', False) == ['x.md'] and found('d/*/[z]*', False) == ['d/e/z.md']


def test_a_file_without_separator_is_read_in_bounded_pieces(tmp_path):
    text = ''.join(f"line {i} {'word ' * (i % 17)}\n" for i in range(3000)) + 'x' * 900 + ' end'
    path = tmp_path / 'big.txt'
    path.write_text(text)
    pieces = list(files.split_stream(str(path), None, None, block=1000, max_chars=4000))
    assert ''.join(pieces) == text and len(pieces) > 20
    assert all(len(p) <= 4000 for p in pieces) and all(p.endswith('\n') for p in pieces[:-2])
    with_sep = list(files.split_stream(str(path), 'line 1', None, block=777, max_chars=3000))
    assert ''.join(with_sep) == text.replace('line 1', '') and all(len(p) <= 3000 for p in with_sep)


def test_a_bad_byte_is_named_by_its_place_whatever_the_blocks_and_a_bom(tmp_path):
    path = tmp_path / 'bad.txt'
    for head in (b'', b'\xef\xbb\xbf'):  # (a BOM the decoder drops)
        for block in (4, 5, 6, 1 << 20):  # (4 and 5 end a block inside the two-byte \xc3\xa9)
            path.write_bytes(head + b'caf\xc3\xa9 \xff end')
            problems = []
            assert list(files.split_stream(str(path), None, problems, block=block)) == []
            at = len(head) + 6
            assert len(problems) == 1 and f'(byte {at})' in problems[0], (head, block, problems)


def test_a_text_file_reads_as_utf8_with_lf_line_ends_and_no_bom(tmp_path):
    path = tmp_path / 'n.md'
    path.write_bytes(b'\xef\xbb\xbf- caf\xc3\xa9\r\n- two\rthree\n')
    assert files.read_utf8(str(path), None) == '- caf\u00e9\n- two\nthree\n'
    path.write_bytes(b'- ok\n- \xe9t\xe9\n')  # Latin-1, as an old editor saves it
    problems = []
    assert files.read_utf8(str(path), problems) is None
    assert len(problems) == 1 and str(path) in problems[0] and '(byte 7)' in problems[0]
    assert 'iconv' in problems[0]


def test_json_lines_name_each_bad_line_and_read_on_past_it(tmp_path):
    """Blank lines are skipped; a line that is not JSON, or holds half of a surrogate pair (a cut
    emoji: no text can hold it), is named by its number; the lines after it are still read."""
    lines = ['{"a": 1}', '', '{"a": 2', '{"a": "\\ud83d cut"}', '{"a": "\\ud83d\\ude00 whole"}']
    path = tmp_path / 'rows.jsonl'
    path.write_text('\ufeff' + '\n'.join(lines) + '\n')
    problems = []
    rows = list(files.read_jsonl(str(path), problems))
    assert rows == [(1, {'a': 1}), (5, {'a': '\U0001f600 whole'})]
    assert [p.split(':')[0] for p in problems] == [f'{path} line 3', f'{path} line 4']
    assert 'not valid JSON' in problems[0] and 'surrogate' in problems[1]
    with gzip.open(tmp_path / 'rows.jsonl.gz', 'wt') as f:
        f.write('{"a": 1}\n')
    assert list(files.read_jsonl(str(tmp_path / 'rows.jsonl.gz'), None)) == [(1, {'a': 1})]
    (tmp_path / 'cut.jsonl.gz').write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-12])
    problems = []  # (a download cut short: the lines before the cut are read, then it is named)
    rows = list(files.read_jsonl(str(tmp_path / 'cut.jsonl.gz'), problems))
    assert rows and len(problems) == 1 and 'cut.jsonl.gz is unreadable (' in problems[0]
    assert f'after line {rows[-1][0]}: ' in problems[0]


def test_a_lone_surrogate_is_found_at_any_depth_of_a_json_value():
    assert files.lone_surrogate({'m': [{'c': 'ok'}, {'c': 'a \ud83d b'}]}) == '\ud83d'
    assert files.lone_surrogate({'m': ['\U0001f600', 5, None]}) is None
