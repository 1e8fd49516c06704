"""
What the data is: the kinds of source a config's `sources` dict can name, and a reader for each.
prepare.py turns them into shards; tokenizer.py trains on their text.

    sources = {'notes': {'kind': 'roam', 'path': '~/roam-export'},
               'chats': {'kind': 'chat', 'path': 'my_chats.jsonl', 'val_frac': 0.05},
               'fineweb_edu': {'kind': 'fineweb_edu', 'train_tokens': 200_000_000}}

A reader yields (where, document[, split]): `where` names the file (and line) for error messages; a
document is a str (text sources), a list of {'role', 'content'} messages (chat sources) or, for
preference pairs, {'messages': [...], 'chosen': str, 'rejected': str} (two replies to the messages:
the better one, the worse one); split is
'train'/'val' where a corpus has its own. Empty documents are skipped and counted in stats. With
problems=None a bad file stops the run; with a list (analyze_only) the problem is recorded and
reading goes on. To add a kind: a reader and its line in KINDS (at the end of this file).

Top to bottom: the settings a source may have; its files (files.py finds and reads them: UTF-8,
line ends, JSON lines, bad input named by file and line); the readers of your own sources, then of
public corpora; KINDS, the table of kinds; which documents go to val.
"""
import hashlib
import json
import os
import re
import sys

import numpy as np

import download
from common import die, suggest
from files import find_files, json_text, problem, read_jsonl, read_utf8, split_stream

DIALOGUE_DELIM = '\n\n<dialogue>\n\n'
# How local files are read into documents: raised when that changes what a file gives (2: CR LF and
# CR line ends read as LF), so that prepare.py rebuilds shards made from such files the old way
READ_VERSION = 2


# ----------------------------------------------------------------------------------------------
# Settings: what a source may say, checked before anything is read

def shown(value):
    """A setting's value in a message: its type and repr (5 and '5', a Path and a str, differ)."""
    return 'None' if value is None else f"{type(value).__name__} {value!r}"


def is_text(v):
    return isinstance(v, str) and v != ''


def is_texts(v):
    return isinstance(v, (list, tuple)) and all(is_text(x) for x in v)


def is_bool(v):
    return isinstance(v, bool)


def is_count(v):
    return type(v) is int and v >= 0


FILE_NAMES = 'a list of strings (file names under base_url)'


# What each source setting may hold: setting -> (test, what to write). Every setting of every kind
# is checked before anything is read, as config keys are: a wrong type would otherwise fail deep in
# a reader (a separator of 5), or quietly do something else (a categories string matches its parts).
# val_frac, train_tokens and val_tokens are numbers with ranges: source_settings checks them itself.
SETTING_TYPES = {
    'path': (lambda v: is_text(v) or (is_texts(v) and len(v) > 0),
             ("a path (a string: '~' is your home, * ? [ ] make it a glob) or a non-empty list of "
              "strings (paths)")),
    'glob': (lambda v: is_text(v) and not v.startswith('/'),
             "a pattern relative to 'path', like '**/*.md'"),
    'add_title': (is_bool, 'True or False'),
    'hidden': (is_bool, "True or False (True: also read folders whose names start with '.')"),
    'separator': (lambda v: v is None or is_text(v),
                  ("None (each file is one document) or a non-empty string between documents, like "
                   "'\\n\\n'")),
    'url': (lambda v: v is None or is_text(v), 'a URL (a string), or None with a local path'),
    'sha256': (lambda v: v is None or (isinstance(v, str) and re.fullmatch('[0-9a-f]{64}', v)),
               "None (not checked) or the file's sha256: 64 lowercase hex digits"),
    'size': (lambda v: v is None or is_count(v),
             'None (not checked) or the size in bytes, an int >= 0'),
    'categories': (lambda v: v is None or is_texts(v),
                   "None (every category) or a list of category names"),
    'lang': (lambda v: v is None or isinstance(v, str),
             "a language code (a string) like 'en', or None for every language"),
    'base_url': (is_text, 'a URL (a string)'),
    'files': (is_texts, FILE_NAMES),
    'train_files': (is_texts, FILE_NAMES),
    'val_files': (is_texts, FILE_NAMES),
}


def check_name(name):
    """A source's name is the name of its folder under data_dir (and of <name>.tmp/ while
    prepare.py builds it): refuse a name that cannot be a folder of its own, or is another source's
    temp folder."""
    if not isinstance(name, str):
        die(f"sources: the name {shown(name)} must be a string (it names the source's folder)")
    at = f"sources['{name}']"
    why = "a source's name is the name of its folder under data_dir"
    if not name.strip():
        die(f"{at}: a source needs a name ({why}): name it after its data, e.g. 'notes'")
    if '/' in name or os.sep in name or '\0' in name:
        better = name.replace('/', '_').replace('\0', '')
        die(f"{at}: {why}, so it cannot hold '/': name it e.g. {better!r}")
    if name.startswith('.'):
        die(f"{at}: {why}, so it cannot start with '.' ('.' and '..' are other folders, '.x' a "
            f"hidden one): name it e.g. {name.lstrip('.') or 'notes'!r}")
    if name.endswith(('.tmp', '.old')):
        die(f"{at}: names ending in '.tmp' or '.old' are taken: prepare.py builds source X in "
            "X.tmp/ and sets the old X.old/ aside while it swaps them. Name it e.g. "
            f"{name[:-4] + '_' + name[-3:]!r}")


def setting_hint(key, value):
    """A word on how to write a setting of the wrong type, where there is one."""
    paths = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, os.PathLike) for v in paths):
        return ": write the path as a string, e.g. str(Path(...)), or the path itself in quotes"
    if key == 'categories' and isinstance(value, str):
        return f": for one category, {[value]!r}"
    if key == 'path' and value in ('', [], ()):
        return ": it is empty"
    return ''


def source_settings(name, src):
    """Validate one entry of the `sources` config dict and fill in its defaults."""
    check_name(name)
    if not isinstance(src, dict) or 'kind' not in src:
        die(f"sources['{name}'] must be a dict with a 'kind' (one of {', '.join(KINDS)}), got "
            f"{src!r}")
    kind = src['kind']
    if not isinstance(kind, str) or kind not in KINDS:
        close = suggest(kind, KINDS) if isinstance(kind, str) else ''
        die(f"sources['{name}']: unknown kind {kind!r}{close}; kinds: {', '.join(KINDS)}")
    fmt, _, defaults = KINDS[kind]
    for key in src:
        if key != 'kind' and key not in defaults:
            die(f"sources['{name}']: unknown setting {key!r}{suggest(str(key), defaults)} for kind "
                f"'{kind}'; it takes {', '.join(defaults)}")
    out = {'name': name, 'kind': kind, 'format': fmt, **defaults, **src}
    for key, value in out.items():
        if key not in SETTING_TYPES or (key == 'path' and value is None):  # (None: see below)
            continue
        ok, what = SETTING_TYPES[key]
        if not ok(value):
            hint = setting_hint(key, value)
            die(f"sources['{name}']: '{key}' must be {what}, got {shown(value)}{hint}")
    if 'path' in out and out['path'] is None and out.get('url') is None:
        die(f"sources['{name}'] needs a 'path'")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # (True is an int)
    v = out.get('val_frac')
    if 'val_frac' in out and not (number(v) and 0 <= v < 1):
        die(f"sources['{name}']: val_frac must be a number in [0, 1), got {v!r}")
    for key in ('train_tokens', 'val_tokens'):
        v = out.get(key)
        if key in out and not (v is None and kind == 'wikitext') and not (number(v) and v >= 0):
            die(f"sources['{name}']: {key} must be a number of tokens >= 0, got {v!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Finding a source's files (files.py finds and reads them)

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
                die(f"sources['{src['name']}']: {p} is not a folder (a roam source is an exported "
                    "folder of .md pages)")
            # a page titled '.x' is a page, but a folder '.obsidian' or '.trash' holds no notes
            found = find_files(p, src['glob'], src['name'], hidden=True, dot_folders=src['hidden'])
            if not found:
                # Roam's other exports (JSON, EDN) hold the same pages in one file each
                other = sorted({os.path.splitext(f)[1].lower()
                                for f in find_files(p, '**/*', src['name'])
                                if f.lower().endswith(('.json', '.edn'))})
                hint = (f" (it holds {' and '.join(other)}: this reads Roam's Markdown export, "
                        "'Export All' as Markdown)" if other else '')
                die(f"sources['{src['name']}']: no files match {src['glob']} under {p}: is it the "
                    f"right folder?{hint}")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        elif any(c in p for c in '*?['):
            parts = p.split('/')
            fixed = next(i for i, part in enumerate(parts) if any(c in part for c in '*?['))
            found = find_files('/'.join(parts[:fixed]) or '.', '/'.join(parts[fixed:]), src['name'])
            if not found:
                die(f"sources['{src['name']}']: no files match {p}")
            files += found
        elif os.path.isdir(p):
            kind = src['kind']
            ext = '.jsonl' if src['format'] != 'text' and kind != 'primer' else '.txt'
            other = " (or use kind 'roam' for a folder of .md notes)" if kind == 'text' else ''
            die(f"sources['{src['name']}']: {p} is a folder, and a '{kind}' source reads files: "
                f"set "
                "'path' to a file, or to a glob such as "
                f"'{os.path.join(p, '**', '*' + ext)}'{other}")
        else:
            die(f"sources['{src['name']}']: {p} does not exist (check the 'path' of this source)")
    return sorted(set(files))


# ----------------------------------------------------------------------------------------------
# Your own sources: Roam notes, text, a primer of dialogues, chat jsonl, preference pairs

def read_roam(src, stats=None, problems=None):
    root = os.path.expanduser(src['path'])
    for path in source_files(src):
        text = read_utf8(path, problems)
        if text is None:
            continue
        if not text.strip():
            if stats is not None:
                stats.update(['empty'])
            continue
        # pages with '/' in the title are nested
        title = os.path.splitext(os.path.relpath(path, root))[0]
        # a tab or newline in a file name must not break the title line
        title = ' '.join(title.split())
        yield path, (f"{title}\n{text}" if src['add_title'] else text)


def read_text(src, stats=None, problems=None):
    for path in source_files(src):
        for doc in split_stream(path, src['separator'], problems):
            if doc.strip():
                yield path, doc
            elif stats is not None:
                stats.update(['empty'])


ROLE_LINE = re.compile(r'^(system|user|assistant):\s?(.*)$', re.IGNORECASE)


def parse_primer(text, path):
    """Primer format: dialogues separated by "\\n\\n<dialogue>\\n\\n"; in each, lines starting with
    `system: `, `user: ` or `assistant: ` begin a turn, other lines continue the turn above. text
    as read_utf8 reads it (line ends as LF)."""
    if DIALOGUE_DELIM not in text:
        die(f"{path}: no dialogue delimiter found. Separate dialogues with a line <dialogue> "
            "between blank lines, i.e. the text \"\\n\\n<dialogue>\\n\\n\"")
    line_no = 1
    for block in text.split(DIALOGUE_DELIM):
        start = line_no + (len(block) - len(block.lstrip('\n')))
        line_no += block.count('\n') + DIALOGUE_DELIM.count('\n')
        if not block.strip():
            continue
        messages, lines = [], []
        for i, line in enumerate(block.strip('\n').split('\n')):
            m = ROLE_LINE.match(line)
            if m:
                messages.append({'role': m.group(1).lower(), 'content': m.group(2)})
                lines.append(start + i)
            elif messages:
                messages[-1]['content'] += '\n' + line
            elif line.strip():
                die(f"{path} line {start + i}: a dialogue must start with 'system: ', 'user: ' or "
                    f"'assistant: ', found {line[:60]!r}")
        for m, line in zip(messages, lines):
            m['content'] = m['content'].strip()
            if not m['content']:  # an empty reply would teach the model to answer with nothing
                die(f"{path} line {line}: the {m['role']} turn of the dialogue starting at line "
                    f"{start} is empty: write its text after '{m['role']}:' or remove the line")
        yield f"{path} line {start}", messages


def read_primer(src, stats=None, problems=None):
    for path in source_files(src):
        text = read_utf8(path, problems)
        if text is not None:
            yield from parse_primer(text, path)


MESSAGE = '{"role": ..., "content": ...}'


def messages_problem(messages):
    """What is wrong with the "messages" of a chat row, or None: each must be an object with a
    string 'role' and a string 'content' ("" is fine). Which roles, in which order, is the chat
    template's check (tokenizer.check_roles)."""
    if not isinstance(messages, list):
        return f"'messages' must be a list of {MESSAGE} objects, got {json_text(messages)}"
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {i} must be an object with 'role' and 'content', got {json_text(m)}"
        for field in ('role', 'content'):
            if field not in m:
                return f"message {i} has no '{field}' (each message is {MESSAGE})"
            value = m[field]
            if isinstance(value, str):
                continue
            hint = ''
            if field == 'content' and value is None:  # (tool-call exports write this for a call)
                hint = (": a tool call or a message without text cannot be trained on; remove it "
                        "or give it text")
            elif field == 'content' and isinstance(value, list):
                hint = ": join the text of its parts into one string"
            got = 'a list' if isinstance(value, list) else json_text(value)
            return f"message {i}: '{field}' must be a string, got {got}{hint}"
    return None


def read_chat(src, stats=None, problems=None):
    for path in source_files(src):
        for n, obj in read_jsonl(path, problems):
            messages = obj.get('messages') if isinstance(obj, dict) else None
            if messages is None:
                bad = f'expected {{"messages": [{MESSAGE}, ...]}}, got {json_text(obj)}'
            else:
                bad = messages_problem(messages)
            if bad:  # (analyze_only: recorded, and reading goes on)
                problem(f"{path} line {n}: {bad}", problems)
                continue
            yield f"{path} line {n}", messages


def doc_texts(doc):
    """The texts of a document, as a tokenizer or a size count reads them: the text, each message of
    a conversation, or a pair's messages and both replies."""
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [m['content'] for m in doc['messages']] + [doc['chosen'], doc['rejected']]
    return [m['content'] for m in doc]


def pair_problem(messages, chosen, rejected):
    """What stops a preference pair from teaching anything, or None: the conversation must end
    with a user message (the replies answer it), and the two replies must be non-empty and
    differ (DPO pushes one up and the other down: identical ones cancel, an empty one is not a
    reply)."""
    if not messages or messages[-1]['role'] != 'user':
        return "the conversation must end with a user message, which the two replies answer"
    for name, reply in (('chosen', chosen), ('rejected', rejected)):
        if not reply.strip():
            return f"the {name} reply is empty"
    if chosen.strip() == rejected.strip():
        return "the chosen and rejected replies are the same text: nothing to prefer"
    return None


def reply_text(value, field):
    """A pair's reply as a string: a string, or one assistant message {"role": "assistant",
    "content": ...} (alone or in a list, as TRL's conversational format writes it). Raises
    ValueError saying what it got."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get('role') == 'assistant':
        value = value.get('content')
    if not isinstance(value, str):
        raise ValueError(f"'{field}' must be a string (or one assistant message), got "
                         f"{json_text(value)}")
    return value


def read_pairs(src, stats=None, problems=None):
    """Preference pairs, one per line: {"messages": [...], "chosen": "...", "rejected": "..."},
    two replies to a conversation that ends with a user message. TRL's layout is read too:
    "prompt" for "messages" (a list of messages, or a string: one user message), replies as one
    assistant message. An optional "split": "train" or "val" puts a pair in that split (pairs.py
    gives each the split of its dialogue); the others are split by hash, as chat rows are. A row
    that cannot be a pair stops the run, naming its line: a pairs file is yours to fix."""
    for path in source_files(src):
        for n, row in read_jsonl(path, problems):
            where = f"{path} line {n}"
            if not isinstance(row, dict) or 'chosen' not in row or 'rejected' not in row:
                problem(f'{where}: expected {{"messages": [{MESSAGE}, ...], "chosen": "...", '
                        f'"rejected": "..."}}, got {json_text(row)}', problems)
                continue
            messages = row.get('messages', row.get('prompt'))
            if isinstance(messages, str):
                messages = [{'role': 'user', 'content': messages}]
            try:
                bad = messages_problem(messages)
                if bad:
                    raise ValueError(bad)
                chosen = reply_text(row['chosen'], 'chosen')
                rejected = reply_text(row['rejected'], 'rejected')
            except ValueError as e:
                problem(f"{where}: {e}", problems)
                continue
            bad = pair_problem(messages, chosen, rejected)
            if row.get('split') not in (None, 'train', 'val'):
                bad = (f"'split' must be \"train\" or \"val\" (or absent), got "
                       f"{json_text(row['split'])}")
            if bad:
                problem(f"{where}: {bad}: fix the row or remove it", problems)
                continue
            yield where, {'messages': messages, 'chosen': chosen, 'rejected': rejected}, \
                row.get('split')


# ----------------------------------------------------------------------------------------------
# Public corpora: Tiny Shakespeare, HH-RLHF, dolly-15k, oasst1; fineweb-edu and WikiText,
# streamed a parquet file at a time

def read_tinyshakespeare(src, stats=None, problems=None):
    """Tiny Shakespeare split the way its users compare numbers (nanoGPT, char-rnn): the last
    val_frac of the file's characters is val, the rest train; each part is cut into speeches (the
    parts between blank lines), or with separator=None kept as one stream, as nanoGPT reads it (a
    window then spans several speeches)."""
    for path in source_files(src):
        text = read_utf8(path, problems)
        if text is None:
            continue
        cut = int(len(text) * (1 - src['val_frac']))
        for split, part in (('train', text[:cut]), ('val', text[cut:])):
            # None: each part one stream
            for doc in part.split(src['separator']) if src['separator'] else [part]:
                if doc.strip():
                    yield path, doc, split
                elif stats is not None:
                    stats.update(['empty'])


HH_TURN = re.compile(r'\n\n(Human|Assistant): ')


def hh_turns(transcript):
    """An HH-RLHF transcript ("\n\nHuman: ...\n\nAssistant: ...") -> messages, or ValueError."""
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        raise ValueError(f"text before the first 'Human:' turn: {json_text(parts[0])}")
    roles = {'Human': 'user', 'Assistant': 'assistant'}
    messages = [{'role': roles[r], 'content': c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    for i, m in enumerate(messages):
        if m['role'] != ('user' if i % 2 == 0 else 'assistant'):
            raise ValueError(f"turn {i + 1} is the {m['role']}'s where the turns should take "
                             "turns (Human first)")
    if not messages or messages[-1]['role'] != 'assistant':
        raise ValueError("the transcript must end with an 'Assistant:' reply")
    return messages


def read_hh_rlhf(src, stats=None, problems=None):
    """Anthropic's HH-RLHF rows: {"chosen": transcript, "rejected": transcript}, two versions of one
    conversation that differ only in the last reply. The public files hold a few rows that are not
    such a pair (a reply that differs earlier, an extra turn, an empty or identical last reply):
    each is refused, counted and named by its line (the first few on stderr; prepare.py counts them
    all), and the rest is read. A row that is not JSON of this shape at all stops the run."""
    refused = 0
    for path in source_files(src):
        for n, row in read_jsonl(path, problems):
            where = f"{path} line {n}"
            if not (isinstance(row, dict) and isinstance(row.get('chosen'), str)
                    and isinstance(row.get('rejected'), str)):
                problem(f'{where}: expected an HH-RLHF row {{"chosen": "\\n\\nHuman: ...", '
                        f'"rejected": "..."}}, got {json_text(row)}', problems)
                continue
            try:
                chosen, rejected = hh_turns(row['chosen']), hh_turns(row['rejected'])
                if len(chosen) != len(rejected):
                    raise ValueError(f"the chosen transcript has {len(chosen)} turns, the rejected "
                                     f"{len(rejected)}: a pair differs only in its last reply")
                if chosen[:-1] != rejected[:-1]:
                    turn = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
                    raise ValueError(f"the transcripts differ at turn {turn + 1}, before the last "
                                     "reply")
                bad = pair_problem(chosen[:-1], chosen[-1]['content'], rejected[-1]['content'])
                if bad:
                    raise ValueError(bad)
            except ValueError as e:
                refused += 1
                if stats is not None:  # (the pass that counts: once per prepare)
                    stats['pairs refused (not one conversation with two last replies)'] += 1
                    if refused <= 5:
                        print(f"warning: {where}: refused: {e}", file=sys.stderr)
                continue
            yield where, {'messages': chosen[:-1], 'chosen': chosen[-1]['content'],
                          'rejected': rejected[-1]['content']}


def read_dolly(src, stats=None, problems=None):
    """databricks-dolly-15k rows: instruction (+ context) -> user, response -> assistant."""
    for path in source_files(src):
        for n, row in read_jsonl(path, problems):
            fields = ('instruction', 'response')
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
                problem(f"{path} line {n}: a dolly row needs string fields 'instruction' and "
                        "'response'", problems)
                continue
            if not isinstance(row.get('context') or '', str):
                problem(f"{path} line {n}: 'context' must be a string (or null), got "
                        f"{json_text(row['context'])}", problems)
                continue
            if src['categories'] is not None and row.get('category') not in src['categories']:
                continue
            context = (row.get('context') or '').strip()
            user = row['instruction'].strip() + (f"\n\n{context}" if context else '')
            if stats is not None:
                stats.update([f"category {row.get('category')}"])
            yield f"{path} line {n}", [{'role': 'user', 'content': user},
                                        {'role': 'assistant', 'content': row['response'].strip()}]


def oasst_problem(message):
    """What is wrong with one message of an oasst1 tree, as best_path reads it, or None. (A message
    without 'text' ends its conversation, as an empty one does.)"""
    if not isinstance(message, dict):
        return f"a message must be an object, got {json_text(message)}"
    which = f"message {json_text(message.get('message_id', '?'))}"
    role = message.get('role')
    if role not in ('prompter', 'assistant'):
        return f"{which}: 'role' must be \"prompter\" or \"assistant\", got {json_text(role)}"
    if not isinstance(message.get('text', ''), str):
        return f"{which}: 'text' must be a string, got {json_text(message['text'])}"
    replies = message.get('replies') or []
    if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
        return f"{which}: 'replies' must be a list of message objects, got {json_text(replies)}"
    for r in replies:
        rank = r.get('rank')
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
            return (f"message {json_text(r.get('message_id', '?'))}: 'rank' must be a number or "
                    f"null, got {json_text(rank)}")
    return None


def best_path(message, lang):
    """oasst1: follow the best-ranked live reply at every turn, from the prompt down to a leaf. A
    malformed message on the way raises ValueError, saying what is wrong with it."""
    path = []
    while message is not None:
        if message.get('deleted') or (lang and message.get('lang') != lang):
            break
        bad = oasst_problem(message)
        if bad:
            raise ValueError(bad)
        if not message.get('text', '').strip():
            break
        path.append({'role': 'user' if message['role'] == 'prompter' else 'assistant',
                     'content': message['text'].strip()})
        live = [r for r in message.get('replies') or [] if not r.get('deleted')]
        rank = lambda r: r['rank'] if r.get('rank') is not None else float('inf')
        ranked = sorted(live, key=rank)
        message = ranked[0] if ranked else None
    if path and path[-1]['role'] == 'user':
        path.pop()  # a conversation ends with an assistant reply
    return path


def read_oasst1(src, stats=None, problems=None):
    """OpenAssistant message trees (the *.trees.jsonl[.gz] export): one conversation per tree."""
    for path in source_files(src):
        for n, tree in read_jsonl(path, problems):
            if not isinstance(tree, dict) or not isinstance(tree.get('prompt'), dict):
                problem(f"{path} line {n}: expected an oasst1 message tree with a 'prompt' (the "
                        "*.trees.jsonl export)", problems)
                continue
            try:
                messages = best_path(tree['prompt'], src['lang'])
            except ValueError as e:
                problem(f"{path} line {n}: {e}", problems)
                continue
            if messages:
                yield f"{path} line {n}", messages
            elif stats is not None:
                stats.update(['trees skipped (deleted, other language or no reply)'])


def parquet(path):
    """A pyarrow ParquetFile; pyarrow is imported only here, where parquet is read."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        die(f"reading {path} needs pyarrow (parquet): pip install pyarrow, or pip install -r "
            "requirements-dev.txt")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged or non-parquet file
        die(f"cannot read {path} as parquet ({e}): is the download complete? delete it to fetch it "
            "again")


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
    """(url, split) of each file of a streamed corpus, in reading order; split None: decided by
    budget."""
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


# ----------------------------------------------------------------------------------------------
# The kinds of source: kind -> (format, reader, {setting: default}). To add a kind, write its reader
# and add its line here. 'text' sources train on every token; 'chat' sources are conversations with
# a loss mask. A setting a kind does not know is an error (typos must not pass). Public corpora are
# downloaded into cache_dir (download.py): point url/base_url at a mirror if you like; files that
# never change are checked against their size and sha256. Set 'path' to use a local copy instead of
# downloading.
HF = download.HF_DATASETS
KINDS = {
    'roam': ('text', read_roam, {'path': None, 'glob': '**/*.md', 'add_title': True,
                                 'hidden': False, 'val_frac': 0.1}),
    'text': ('text', read_text, {'path': None, 'separator': None, 'val_frac': 0.1}),
    'primer': ('chat', read_primer, {'path': None, 'val_frac': 0.1}),
    'chat': ('chat', read_chat, {'path': None, 'val_frac': 0.1}),
    # preference pairs (DPO): a jsonl file of your own, or Anthropic's HH-RLHF (harmless-base train)
    'pairs': ('pairs', read_pairs, {'path': None, 'val_frac': 0.1}),
    'hh_rlhf': ('pairs', read_hh_rlhf, {
        'path': None, 'url': f'{HF}/Anthropic/hh-rlhf/resolve/main/harmless-base/train.jsonl.gz',
        'sha256': None, 'size': None, 'val_frac': 0.1}),
    'dolly': ('chat', read_dolly, {
        'path': None, 'url': f'{HF}/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl',
        'sha256': None, 'size': None, 'val_frac': 0.1, 'categories': None}),
    'oasst1': ('chat', read_oasst1, {
        'path': None, 'url': f'{HF}/OpenAssistant/oasst1/resolve/main/2023-04-12_oasst_ready.trees.jsonl.gz',
        'sha256': '2a9a8fd343e9b28e04a895a669d3253f82d93e9c174d440199ae19d5fafbdff7',
                                     'size': 34145252,
        'val_frac': 0.1, 'lang': 'en'}),
    'tinyshakespeare': ('text', read_tinyshakespeare, {
        'path': None, 'url': 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
        'sha256': '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed',
                                                       'size': 1115394,
        'separator': '\n\n', 'val_frac': 0.1}),
    # streamed: parquet shards fetched one at a time, only while the token budgets still need text
    'fineweb_edu': ('text', read_streamed, {
        'base_url': f'{HF}/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT',
        'files': [f'{i:03d}_00000.parquet' for i in range(14)], 'train_tokens': 200_000_000,
                                            'val_tokens': 5_000_000}),
    'wikitext': ('text', read_streamed, {
        'base_url': f'{HF}/Salesforce/wikitext/resolve/main/wikitext-103-raw-v1',
        'train_files': ['train-00000-of-00002.parquet', 'train-00001-of-00002.parquet'],
        'val_files': ['validation-00000-of-00001.parquet'], 'train_tokens': None,
                                         'val_tokens': None}),
}
# no counting pass: val is their own split (wikitext) or comes first (budgets)
STREAMED = tuple(kind for kind, (_, reader, _) in KINDS.items() if reader is read_streamed)



def iter_documents(src, stats=None, problems=None):
    """(where, document, split): split is 'train'/'val' where the corpus has its own, else None."""
    for item in KINDS[src['kind']][1](src, stats, problems):
        yield item if len(item) == 3 else (*item, None)


# ----------------------------------------------------------------------------------------------
# Train or val: decided here, for prepare.py (which writes each document to its split) and for
# tokenizer.py, which must learn from train documents only (a tokenizer that has seen the val text
# encodes it in fewer, longer tokens, and val looks better than it is).

def split_key(src, where, doc):
    """What a document's split is decided on: a Roam page's title (its path in the export), so that
    editing a page keeps it where it was; a pair's, its conversation up to the first user message;
    otherwise its content (text, or the conversation's messages)."""
    if src['kind'] == 'roam':
        return 'page:' + os.path.relpath(where, os.path.expanduser(src['path']))
    if isinstance(doc, dict):  # a pair: by its conversation's opening, so that the pairs made from
        # one dialogue (one per reply, pairs.py) land together and held-out pairs are new dialogues
        first = next(i for i, m in enumerate(doc['messages']) if m['role'] == 'user')
        doc = doc['messages'][:first + 1]
    return doc if isinstance(doc, str) else json.dumps(doc, sort_keys=True, ensure_ascii=False)


def split_hash(key, split_seed):
    """A number in [0, 1) that depends only on the key and split_seed: val if it is below
    val_frac."""
    digest = hashlib.sha256(f"{split_seed}\0{key}".encode('utf-8', 'surrogatepass')).digest()
    return int.from_bytes(digest[:8], 'big') / 2 ** 64


def val_flags(src, split_seed, stats=None):
    """One pass over the documents: which go to val. A document is val when its hash is below
    val_frac, so each one's split is its own business (growing a source by 10% moves no train
    document to val). A source whose hashes all miss (a handful of documents) gives val its
    lowest-hash document."""
    flags, lowest = [], (2.0, None)
    for i, (where, doc, split) in enumerate(iter_documents(src, stats)):
        if split:  # the corpus's own split
            flags.append(split == 'val')
            continue
        h = split_hash(split_key(src, where, doc), split_seed)
        flags.append(h < src['val_frac'])
        lowest = min(lowest, (h, i))
    flags = np.array(flags, dtype=bool)
    if src['val_frac'] > 0 and len(flags) >= 2 and not flags.any() and lowest[1] is not None:
        flags[lowest[1]] = True
    return flags


# The most characters one token can hold: SentencePiece's max_sentencepiece_length (its default,
# which tokenizer.py keeps). A streamed corpus's val is its first val_tokens tokens, and tokens are
# not known before the tokenizer is: the tokenizer skips enough text for val_tokens of the longest
# tokens.
MAX_PIECE_CHARS = 16


def train_texts(src, split_seed):
    """The text of the documents prepare.py puts in train, in reading order (each message of a
    conversation on its own): what the tokenizer may learn from. The same rules as prepare.py's:
    the hash of val_flags, a corpus's own split, a streamed corpus's val first."""
    if src['kind'] in STREAMED:
        # without a val budget prepare.py puts every unsplit document in val
        skip = float('inf') if src['val_tokens'] is None else src['val_tokens'] * MAX_PIECE_CHARS
        for _, doc, split in iter_documents(src):
            if split is None and skip > 0:
                skip -= len(doc)
            elif split != 'val':
                yield doc
        return
    is_val = val_flags(src, split_seed)
    for (_, doc, _), val in zip(iter_documents(src), is_val):
        if not val:
            yield from doc_texts(doc)
