"""
A source's files: finding them under a folder by a glob (hidden folders and links as a user
expects), then reading them (UTF-8 with its BOM, line ends as LF, a file of any size in bounded
pieces, JSON lines), each bad file named with its line or byte and what to do. sources.py's readers
are built on these; tokenizer.py and eval.py read with them too.
"""
import codecs
import fnmatch
import gzip
import io
import json
import os
import re

from common import die

# ----------------------------------------------------------------------------------------------
# Finding files under a folder

def glob_match(parts, pattern, hidden):
    """Does a relative path (a list of names) match a glob pattern (a list of names)? As in glob:
    '**' matches any number of folders, '*', '?' and [...] stay within one name, and a wildcard
    matches a name starting with '.' only if `hidden`."""
    if not pattern:
        return not parts
    if pattern[0] == '**':
        return any(glob_match(parts[i:], pattern[1:], hidden) for i in range(len(parts) + 1)
                   if hidden or not any(p.startswith('.') for p in parts[:i]))
    if not parts or (parts[0].startswith('.') and not hidden and not pattern[0].startswith('.')):
        return False
    return fnmatch.fnmatchcase(parts[0], pattern[0]) and glob_match(parts[1:], pattern[1:], hidden)


LINKS_REPORTED = set()


def find_files(root, pattern, name, hidden=False, dot_folders=True):
    """Files under `root` matching a glob pattern ('**/*.md'), following symlinked folders but
    reading each real folder once: a link loop (`ln -s . notes/loop`) or a second link to a folder
    already read would otherwise copy every page it reaches many times over, into train and val
    alike. With dot_folders=False, folders whose names start with '.' are not entered at all (.git,
    .obsidian, .trash: not notes)."""
    real = set()  # the folders of the tree itself, reached without links
    for dirpath, _, _ in os.walk(root):
        st = os.stat(dirpath)
        real.add((st.st_dev, st.st_ino))
    seen, skipped, found = set(), [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            if d.startswith('.') and not dot_folders:
                continue
            path = os.path.join(dirpath, d)
            try:
                st = os.stat(path)
            except OSError:  # a broken link
                continue
            key = (st.st_dev, st.st_ino)
            if os.path.islink(path) and (key in real or key in seen):
                skipped.append(path)
                continue
            seen.add(key)
            keep.append(d)
        dirnames[:] = keep
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == '.' else rel.split(os.sep)
        found += [os.path.join(dirpath, f) for f in filenames if glob_match(parts + [f],
                                                                            pattern.split('/'),
                                                                            hidden)]
    if skipped and (name, root) not in LINKS_REPORTED:
        LINKS_REPORTED.add((name, root))
        print(f"sources['{name}']: skipped {len(skipped)} symlinked folder(s) under {root} that "
              "lead to a folder already read (a link loop, or a second way to the same folder): "
              f"{', '.join(skipped[:3])}"
              + (' ...' if len(skipped) > 3 else ''))
    # ('x.txt', not './x.txt')
    return [f[2:] if root == '.' else f for f in found if os.path.isfile(f)]


# ----------------------------------------------------------------------------------------------
# Reading a file: UTF-8, line ends, bounded pieces, JSON lines; a bad one named by file and line

def problem(msg, problems):
    """A bad file: stop the run with `msg`, or (analyze_only: `problems` is a list) record it and
    read on."""
    if problems is None:
        die(msg)
    problems.append(msg)


# the byte-order mark some editors (Notepad) put first in a UTF-8 file: not part of the text
BOM = '\ufeff'


def lf(text):
    """Windows line ends (CR LF) and old Mac ones (CR) as LF, as Python's text files read them: a
    note's lines, a separator of two line ends and what the model is shown must not depend on the
    editor that saved the file."""
    return text.replace('\r\n', '\n').replace('\r', '\n')


def read_utf8(path, problems):
    """A file's text, line ends as LF (lf), or None (problem) if it cannot be read as UTF-8."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
        text = lf(data.decode('utf-8'))
        return text[1:] if text.startswith(BOM) else text
    except UnicodeDecodeError as e:
        msg = (f"{path} is not valid UTF-8 (byte {e.start}): convert it, e.g. `iconv -f latin1 -t "
               "utf-8`, or remove it from the source")
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror}"
    problem(msg, problems)
    return None


# A document longer than this is cut into pieces at line ends (each its own document, starting with
# <s>): a file without a separator is read and tokenized in bounded pieces, spread over the workers,
# whatever its size. 1M characters is ~250k tokens, so the extra <s> are one token in 250,000.
MAX_DOC_CHARS = 1 << 20


def split_stream(path, sep, problems, block=1 << 20, max_chars=None):
    """Documents of a file split on `sep` (None: the whole file is one), read a block at a time; a
    document longer than max_chars is cut after its last newline within the limit (else at a space,
    else at the limit). Memory is bounded by max_chars and block, not by the file's size."""
    max_chars = max_chars or MAX_DOC_CHARS
    sep = sep and lf(sep)  # (the text's line ends are LF)
    # (-sig: drops a BOM; CR LF and CR read as LF, as read_utf8 reads them, even where a block ends
    # between the CR and the LF)
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder('utf-8-sig')(),
                                           translate=True)
    rest = ''  # decoded text not yet yielded
    offset = 0  # bytes read so far, for the position of a bad byte
    try:
        f = open(path, 'rb')
    except OSError as e:
        problem(f"cannot read {path}: {e.strerror}", problems)
        return
    with f:
        while True:
            data = f.read(block)
            try:
                rest += decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                # e.object: the bytes the decoder held from the last block (a character cut in two),
                # then this block's, less a BOM it dropped: where e.start is counted from
                at = offset + len(data) - len(e.object) + e.start
                problem(f"{path} is not valid UTF-8 (byte {at}): convert it, e.g. "
                        "`iconv -f latin1 -t utf-8`, or remove it from the source", problems)
                return
            offset += len(data)
            if sep:
                *docs, rest = rest.split(sep)
                for doc in docs:
                    yield from cut_long(doc, max_chars)
            # the unfinished document: cut off what is surely not the start of a separator split
            # across blocks
            while len(rest) > max_chars + len(sep or ''):
                cut = cut_point(rest, max_chars)
                yield rest[:cut]
                rest = rest[cut:]
            if not data:
                break
    yield from cut_long(rest, max_chars)


def cut_point(text, max_chars):
    """Where to cut text longer than max_chars: after the last newline in the limit, else the last
    space."""
    for c in '\n ':
        i = text.rfind(c, 0, max_chars)
        if i > 0:
            return i + 1
    return max_chars


def cut_long(doc, max_chars):
    while len(doc) > max_chars:
        cut = cut_point(doc, max_chars)
        yield doc[:cut]
        doc = doc[cut:]
    yield doc


def lone_surrogate(value):
    """The first half of a UTF-16 surrogate pair standing alone in the strings of a JSON value (a
    "\\ud83d" escape without its partner: a cut emoji), or None. No UTF-8 text holds one, so it
    cannot be tokenized."""
    if isinstance(value, str):
        m = re.search('[\ud800-\udfff]', value)
        return m.group() if m else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((s for s in map(lone_surrogate, items) if s), None)


def read_jsonl(path, problems):
    """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.endswith('.gz') else open
    n = 0
    try:
        # (-sig: a BOM before the first line is fine)
        with opener(path, 'rt', encoding='utf-8-sig') as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    msg = (f"{path} line {n}: not valid JSON ({e.msg}); each line must be one "
                           "JSON object")
                else:
                    bad = '\\u' in line and lone_surrogate(obj)  # (only escapes can make one)
                    if not bad:
                        yield n, obj
                        continue
                    msg = (f"{path} line {n}: {bad!r} is half of a UTF-16 surrogate pair standing "
                           "alone (a cut emoji?), which is not text: fix the line or remove it")
                problem(msg, problems)
    except (UnicodeDecodeError, EOFError, OSError) as e:  # bad bytes, a truncated or damaged .gz
        what = 'not valid UTF-8' if isinstance(e, UnicodeDecodeError) else f'unreadable ({e})'
        problem(f"{path} is {what} after line {n}: fix the file, or delete it if it was downloaded "
                "to fetch it again", problems)


def json_text(value, limit=60):
    """A value as JSON spells it (null, 5, "hi"), cut short: what a message about a field shows."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + '...'
