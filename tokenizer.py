"""
Stage 1: the tokenizer and the chat template.

    python tokenizer.py config/demo.py                          # train out/demo/tokenizer.model
    python tokenizer.py config/demo.py --show_chat=conv.json    # see how a conversation is rendered
    python tokenizer.py config/smol.py    # base_model set: import its tokenizer.json instead

A SentencePiece model trained on the configured sources (a byte budget per source caps what is
read), set up so that any UTF-8 text round-trips exactly: byte fallback on (no unknown tokens),
identity normalization, no whitespace collapsing, no dummy leading space.

Ids 0-6 are fixed: 0 <unk>, 1 <s> (bos: starts every document), 2 </s> (eos), 3 <|sys|>, 4 <|usr|>,
5 <|asst|>, 6 <|eot|> (end of an assistant turn). They are SentencePiece *control* symbols: no input
text ever encodes to them, not even their literal spelling, so a user cannot forge a turn.

With base_model set (a pretrained model to start from), the model's own tokenizer is imported
instead of training one: its tokenizer.json and chat template, written to <out_dir>/tokenizer.json
with a tokenizer_config.json beside it (hf_tokenizer.py: byte-level BPE only, and ChatML as the chat
template). load_tokenizer reads either kind; every stage uses the two the same way: encode, decode,
id_bytes, bos_id, eot_id, specials, and the template functions below, which follow tok.template.
"""
import hashlib
import io
import json
import os
import re

import sentencepiece as spm

import download
import files
import sources
from common import atomic_file, check_writable, die, file_sha256
from configurator import configure
from hf_tokenizer import (
    HFTokenizer,
    config_bytes,
    gguf_vocab,  # noqa: F401 (for export.py, with the rest of the interface)
    need,
    read_source,
    source_files,
)

SPECIALS = ['<unk>', '<s>', '</s>', '<|sys|>', '<|usr|>', '<|asst|>', '<|eot|>']  # ids 0..6
SPACE = '\u2581'  # SentencePiece's stand-in for a space; a literal one in text needs care (encode)
TRAIN_THREADS = 4  # fixed on purpose: SentencePiece's result depends on its thread count
# fixed too: a tokenizer outlives training runs, so --seed (batches, init) must not change it
TRAIN_SEED = 1337
# source settings that do not change what the tokenizer reads: train's token budget (it reads far
# less) and a download's checks
NOT_READ = ('train_tokens', 'sha256', 'size')


def load_tokenizer(path):
    """The tokenizer at `path`: our SentencePiece Tokenizer for a .model file tokenizer.py trained,
    an HFTokenizer for a tokenizer.json it imported (told apart by content: JSON or not)."""
    if os.path.isdir(path):
        die(f"tokenizer_path {path} is a folder: set it to the tokenizer's file (tokenizer.py "
            f"writes e.g. {os.path.join(path, 'tokenizer.model')}, or tokenizer.json with "
            "base_model)")
    if not os.path.isfile(path):
        die(f"no tokenizer at {path}: make it first with `python tokenizer.py <your config>` "
            "(it trains one, or imports base_model's)")
    try:
        with open(path, 'rb') as f:
            start = f.read(64)
    except OSError as e:
        die(f"cannot read the tokenizer {path} ({e.strerror})")
    if not start:
        die(f"the tokenizer {path} is empty (0 bytes; an interrupted copy?): make it again with "
            "`python tokenizer.py <your config>`")
    if start.lstrip()[:1] == b'{':
        return HFTokenizer(path)
    return Tokenizer(path)


class Tokenizer:
    template = 'smallchat'  # the chat template below; an HFTokenizer's is 'chatml' or None
    specials = frozenset(range(len(SPECIALS)))

    def __init__(self, model_path):
        if os.path.isdir(model_path):
            die(f"tokenizer_path {model_path} is a folder: set it to the tokenizer's file "
                f"(tokenizer.py writes e.g. {os.path.join(model_path, 'tokenizer.model')})")
        if not os.path.isfile(model_path):
            die(f"no tokenizer at {model_path}: train one first with `python tokenizer.py <your "
                "config>`")
        self.path = model_path
        self.sp = load_model(model_path)
        self.sha256 = file_sha256(model_path)
        self.vocab_size = self.sp.get_piece_size()
        for i, piece in enumerate(SPECIALS):
            if self.vocab_size <= i or self.sp.id_to_piece(i) != piece or not (
                    self.sp.is_control(i) or i == 0):  # (<unk> is of a type of its own)
                found = self.sp.id_to_piece(i) if i < self.vocab_size else None
                die(f"{model_path} was not made by tokenizer.py: id {i} should be the control "
                    f"symbol {piece!r}, found {found!r}. Train a tokenizer with `python "
                    "tokenizer.py <your config>`.")
        self.unk_id, self.bos_id, self.eos_id = 0, 1, 2
        self.sys_id, self.usr_id, self.asst_id, self.eot_id = 3, 4, 5, 6
        # bytes of every id, for decode and for streaming output one token at a time
        self.id_bytes = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                self.id_bytes.append(bytes([int(piece[3:5], 16)]))  # '<0xE2>'
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                self.id_bytes.append(b'')
            else:
                self.id_bytes.append(piece.replace(SPACE, ' ').encode('utf-8'))
        self.space_bytes = [self.sp.piece_to_id(f'<0x{b:02X}>') for b in SPACE.encode('utf-8')]

    def encode(self, text):
        # SentencePiece turns spaces into U+2581 and back, so a literal U+2581 in the text would
        # come back as a space. Encode around it and spell it with byte tokens instead.
        if SPACE not in text:
            return self.sp.encode(text)
        ids = []
        for i, part in enumerate(text.split(SPACE)):
            if i:
                ids += self.space_bytes
            ids += self.sp.encode(part)
        return ids

    def decode(self, ids):
        return b''.join(self.id_bytes[i] for i in ids).decode('utf-8', errors='replace')


def load_model(path):
    """A SentencePieceProcessor of the file, or a message saying what the file is instead: a Hugging
    Face tokenizer.json, an empty or cut-short file. (SentencePiece itself names a line of its C++
    source, not the file.)"""
    train = ("train one with `python tokenizer.py <your config>`, or set tokenizer_path to a "
             "tokenizer.model it wrote")
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        die(f"cannot read the tokenizer {path} ({e.strerror})")
    if not data:
        die(f"the tokenizer {path} is empty (0 bytes; an interrupted copy?): {train}")
    try:
        return spm.SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError):
        if data.lstrip()[:1] in (b'{', b'['):
            what = (": it is JSON (a Hugging Face tokenizer.json?), which load_tokenizer reads "
                    "as such; Tokenizer reads SentencePiece .model files only")
        else:
            what = ", or it was cut short or damaged"
        die(f"{path} is not a SentencePiece model{what}. {train[0].upper()}{train[1:]}")


# ----------------------------------------------------------------------------------------------
# The chat template: one function turns a conversation into (ids, mask) for training AND for chat.
# Ours (tok.template 'smallchat'):
#   [bos] [sys] system... [usr] user... [asst] reply... [eot] [usr] user... [asst] reply... [eot]
# ChatML (an imported tokenizer's, 'chatml'), each message a turn of its own, no bos:
#   <|im_start|>system\n system... <|im_end|>\n <|im_start|>user\n user... <|im_end|>\n
#   <|im_start|>assistant\n reply... <|im_end|>\n
# mask is 1 exactly on assistant content tokens and the token that ends each assistant turn
# (<|eot|>, <|im_end|>): the model learns to answer and to stop, never to imitate the user or the
# system prompt. A role header and the content are encoded apart, as chat feeds them: the prompt
# for a reply ends with the header, and the model generates the content's tokens from there.

# the system prompt of chat (and of what export.py writes) when a config sets none
DEFAULT_SYSTEM = ("you are a terse, grudging assistant. you answer in as few words as you can, in "
                  "lowercase, and you sound a little put out to be asked. you never guess: if you "
                  "are not sure, you say \"i don't know\".")


def clean(text):
    """User text as valid Unicode: a lone surrogate (from bytes that are not UTF-8, on stdin or in
    an argument) becomes U+FFFD, which the tokenizer can encode."""
    return re.sub('[\ud800-\udfff]', '\ufffd', text)


def system_prompt(cfg):
    """The system prompt of a conversation that brings none of its own. Chat (sample.py) starts
    with it, and export.py writes it into the Modelfile and the chat templates, so that every way
    of talking to the model gives it the same one. The rules: `system_file` if set (a file is the
    deliberate choice: it wins over `system`), its text stripped; else `system`; else
    DEFAULT_SYSTEM. An empty file is an empty system prompt, on purpose."""
    if not cfg.system_file:
        return clean(cfg.system) or DEFAULT_SYSTEM
    path = cfg.system_file
    set_by = getattr(cfg, 'set_by', {}).get('system_file', 'the config')
    where = f"system_file={path} (from {set_by})"
    fix = "point it at a text file holding the system prompt, or set it to '' to use `system`"
    if os.path.isdir(path):
        die(f"{where} is a folder: {fix}")
    if not os.path.isfile(path):
        die(f"{where}: no such file; {fix}")
    try:
        with open(path, encoding='utf-8-sig') as f:
            return clean(f.read().strip())
    except UnicodeDecodeError as e:
        die(f"{where} is not valid UTF-8 (byte {e.start}): convert it, e.g. `iconv -f latin1 -t "
            "utf-8`")
    except OSError as e:
        die(f"{where}: cannot read it ({e.strerror})")


def check_roles(messages):
    """Raise ValueError unless messages are: optional system, then user/assistant alternating."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation must be a non-empty list of {'role', 'content'} messages")
    expected = 'user'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get('content'), str) or 'role' not in m:
            raise ValueError(f"message {i + 1} must be a dict with a 'role' and a string "
                             f"'content', "
                             f"got {m!r:.80}")
        role = m['role']
        if role == 'system' and i == 0:
            continue
        if role != expected:
            want = "'system' (first only), 'user'" if i == 0 else repr(expected)
            raise ValueError(f"message {i + 1} has role {role!r} where {want} was expected (roles "
                             "go: optional system, then user and assistant taking turns)")
        expected = 'assistant' if role == 'user' else 'user'


def chatml(tok):
    """Whether tok renders ChatML (else ours); a tokenizer with no template we can map stops
    here."""
    if tok.template is None:
        raise ValueError(f"the chat template of the tokenizer {tok.path} is not ChatML and cannot "
                         f"be mapped ({tok.template_problem}): chat sources and chat need one; "
                         "plain text still works")
    return tok.template == 'chatml'


def header(tok, role):
    """The ids that open a turn: [role], or ChatML's <|im_start|>role\\n."""
    if chatml(tok):
        return [tok.start_id] + tok.encode(role + '\n')
    return [{'system': tok.sys_id, 'user': tok.usr_id, 'assistant': tok.asst_id}[role]]


def closing(tok, role):
    """The ids after a turn's content: ChatML's <|im_end|>\\n after every turn (the newline outside
    the mask); ours, [eot] after an assistant's."""
    if chatml(tok):
        return [tok.eot_id] + tok.encode('\n')
    return [tok.eot_id] if role == 'assistant' else []


def turn_markers(tok):
    """How a rendered conversation marks its turns, for cutting a long one between turns
    (data.split_at_turns; prepare.py records it with the shards): how many ids come before the
    first turn (our <s>; none in ChatML) and the ids that open each role's turn."""
    return {'head': 0 if chatml(tok) else 1,
            **{role: header(tok, role) for role in ('system', 'user', 'assistant')}}


def render_turn(tok, role, content):
    """The ids and mask one message adds: header, content, closing; for an assistant, mask 1 on
    the content and its eot."""
    head, body, close = header(tok, role), tok.encode(content), closing(tok, role)
    ids = head + body + close
    if role != 'assistant':
        return ids, [0] * len(ids)
    return ids, [0] * len(head) + [1] * (len(body) + 1) + [0] * (len(close) - 1)


def render_conversation(tok, messages):
    check_roles(messages)
    first = [] if chatml(tok) else [tok.bos_id]  # (ChatML starts with its first turn)
    ids, mask = first, [0] * len(first)
    for m in messages:
        turn_ids, turn_mask = render_turn(tok, m['role'], m['content'])
        ids += turn_ids
        mask += turn_mask
    return ids, mask


def render_pair(tok, pair):
    """A preference pair {'messages', 'chosen', 'rejected'} -> (ids, mask, start): the conversation
    with the chosen reply, then the conversation with the rejected one, one after the other (the
    second starts at `start`); the mask is 1 on the two last replies only (and their eot): DPO
    compares the likelihood of those, the conversation before them is the same in both."""
    out = []
    for reply in (pair['chosen'], pair['rejected']):
        messages = pair['messages'] + [{'role': 'assistant', 'content': reply}]
        ids, mask = render_conversation(tok, messages)
        prompt = len(render_for_reply(tok, pair['messages']))  # (turns render one at a time)
        out.append((ids, [0] * prompt + mask[prompt:]))
    (chosen, chosen_mask), (rejected, rejected_mask) = out
    return chosen + rejected, chosen_mask + rejected_mask, len(chosen)


def render_for_reply(tok, messages):
    """Prompt ids for generating the next assistant turn: the conversation, then the assistant's
    header."""
    return render_conversation(tok, messages)[0] + header(tok, 'assistant')


# What chat (sample.py) needs to go on from a conversation already fed to the model, a turn at a
# time.

def render_user_turn(tok, content):
    """A user message added to a conversation, then the assistant's header to ask for the reply."""
    return render_turn(tok, 'user', content)[0] + header(tok, 'assistant')


def end_reply(tok, reply):
    """A generated reply -> (its content ids, the reply as the template has it: ending with one
    eot, and ChatML's newline after it). A reply stops at its eot, or without one when it ran out
    of room."""
    close = closing(tok, 'assistant')
    content = reply[:-1] if reply and reply[-1] == tok.eot_id else reply
    return content, content + close


def not_in_reply(tok):
    """The ids a reply must never contain: every special token but the eot, which ends it."""
    chatml(tok)
    return tuple(sorted(tok.specials - {tok.eot_id}))


def past_vocab(tok, vocab_size):
    """The ids of a model's embedding past the tokenizer's last one (Qwen pads its embedding to a
    round size): no text encodes to them, so the model must never write one."""
    return tuple(range(tok.vocab_size, vocab_size))


def special_name(tok, i):
    return SPECIALS[i] if tok.template == 'smallchat' else tok.names[i]


def show_conversation(tok, messages):
    """Readable rendering: special tokens by name, trained tokens inside ⟦ ⟧."""
    ids, mask = render_conversation(tok, messages)
    out, inside = [], False
    for i, m in zip(ids, mask):
        if m != inside:
            out.append('⟦' if m else '⟧')
            inside = m
        out.append(special_name(tok, i) if i in tok.specials else tok.decode([i]))
    out.append('⟧' if inside else '')
    return ''.join(out), len(ids), sum(mask)


def load_conversation_file(path):
    """The first conversation in a .json, .jsonl or primer .txt file (for --show_chat)."""
    if not os.path.isfile(path):
        die(f"--show_chat: no file {path}")
    text = files.read_utf8(path, None)
    if path.endswith('.txt'):
        return next(sources.parse_primer(text, path))[1]
    try:
        obj = json.loads(text.splitlines()[0] if path.endswith('.jsonl') else text)
    except (json.JSONDecodeError, IndexError) as e:
        die(f"{path}: not a JSON conversation ({e}); expected [{{'role': ..., 'content': ...}}, "
            f"...] "
            "or {'messages': [...]}")
    if files.lone_surrogate(obj):
        die(f"{path}: {files.lone_surrogate(obj)!r} is half of a UTF-16 surrogate pair standing "
            "alone, which is not text: fix the file")
    return obj['messages'] if isinstance(obj, dict) and 'messages' in obj else obj


# ----------------------------------------------------------------------------------------------
# Training

def tokenizer_settings(cfg):
    """Everything the trained model depends on; recorded beside it to decide skip vs conflict."""
    budgets = cfg.tokenizer_sources or {name: cfg.tokenizer_max_bytes for name in cfg.sources}
    for name, max_bytes in budgets.items():
        if name not in cfg.sources:
            die(f"tokenizer_sources names '{name}', which is not in sources "
                f"({', '.join(cfg.sources)})")
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes <= 0):
            die(f"tokenizer_sources['{name}'] must be a number of bytes > 0, or None for all of "
                f"it; "
                f"got {max_bytes!r}")
    # split_seed (and each source's val_frac, val_tokens) decide which documents are train: the only
    # ones the tokenizer reads
    return {'vocab_size': cfg.vocab_size, 'model_type': cfg.tokenizer_type,
            'split_seed': cfg.split_seed,
            'sources': {name: {'settings': cfg.sources[name],
                               'max_bytes': budgets[name]} for name in budgets}}


def what_it_reads(settings):
    """The part of recorded settings that decides the trained model: which documents are train
    (split_seed, val_frac, val_tokens), what is read of them, but not train's token budget, a
    download's checks or the seed (records written before TRAIN_SEED kept the global one); every
    source setting filled with its default (so spelling out a default changes nothing)."""
    return json.loads(json.dumps({
        'vocab_size': settings['vocab_size'], 'model_type': settings['model_type'],
        'split_seed': settings['split_seed'],  # (a record from before it: trained on val text too)
        'sources': {name: {'max_bytes': s['max_bytes'],
                           'settings': {k: v for k, v
                                        in sources.source_settings(name, s['settings']).items()
                                        if k not in NOT_READ}}
                    for name, s in settings['sources'].items()}}))


def training_sentences(cfg, settings, stopped):
    """Lines of text from each source up to its byte budget. '\\n' is a piece of its own, so a line
    is a natural training sentence; very long lines are cut so SentencePiece does not drop them.
    A bad file (a die() in a reader) ends the lines and is kept in `stopped`, for train_tokenizer to
    raise: SentencePiece would wrap the SystemExit in an error of its own, with Python's frames."""
    try:
        yield from source_sentences(settings)
    except SystemExit as e:
        stopped.append(e)


def source_sentences(settings):
    for name, s in settings['sources'].items():
        src = sources.source_settings(name, s['settings'])
        seen = 0
        for text in sources.train_texts(src, settings['split_seed']):
            for line in text.split('\n'):
                for i in range(0, len(line), 4000):
                    chunk = line[i:i + 4000]
                    if chunk:
                        yield chunk
                        seen += len(chunk.encode('utf-8')) + 1
            if s['max_bytes'] is not None and seen >= s['max_bytes']:
                break
        print(f"tokenizer: read {seen / 1e6:.2f} MB from {name}")


def read_record(info_path):
    """The record tokenizer.py wrote beside a model ({} if none); a damaged one is named."""
    if not os.path.exists(info_path):
        return {}
    try:
        with open(info_path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # (ValueError: bad JSON or bad UTF-8)
        die(f"{info_path}, the record of what its tokenizer was trained on, is damaged or "
            f"unreadable ({e}): delete it and the tokenizer beside it (and re-run prepare.py) to "
            "train a new one, or set --tokenizer_path to a new file")


def train_tokenizer(cfg):
    settings = tokenizer_settings(cfg)
    path = cfg.tokenizer_path
    info_path = path + '.json'
    now = what_it_reads(settings)  # (a bad source in this config stops here, before any work)
    if os.path.isdir(path):
        die(f"tokenizer_path {path} is a folder: set it to a file, e.g. "
            f"{os.path.join(path, 'tokenizer.model')}")
    if os.path.exists(path):
        old = read_record(info_path)
        try:
            same = what_it_reads(old['settings']) == now
        # no record, or one this code cannot read
        except (KeyError, TypeError, AttributeError, SystemExit):
            same = False
        # the record is of the file tokenizer.py wrote: a model copied over it is not that file
        if same and isinstance(old.get('sha256'), str) and old['sha256'] != file_sha256(path):
            die(f"{path} is not the file tokenizer.py trained for this config: its sha256 differs "
                f"from the one recorded in {info_path}, so it was replaced or changed since. Put "
                "the trained file back, or delete both (and re-run prepare.py) to train a new one, "
                "or set --tokenizer_path to a new file.")
        if same:
            print(f"tokenizer: {path} is up to date with this config, nothing to do")
            return
        # a record without split_seed is from before the tokenizer read train documents only
        leak = (" It was trained on the sources' val documents too (an older tokenizer.py): a new "
                "one reads train only." if isinstance(old.get('settings'), dict)
                and 'split_seed' not in old['settings'] else '')
        die(f"{path} exists but was trained with other settings ({info_path} differs from this "
            f"config).{leak} Shards and checkpoints made with it depend on it, so it is not "
            "replaced silently: delete it (and re-run prepare.py) to train a new one, or set "
            "--tokenizer_path to a new file.")
    check_writable(os.path.dirname(path) or '.', 'tokenizer_path (or out_dir)')
    spm.set_random_generator_seed(TRAIN_SEED)
    model = io.BytesIO()
    stopped = []  # a bad source file met while SentencePiece reads the sentences
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(cfg, settings, stopped), model_writer=model,
            vocab_size=cfg.vocab_size, model_type=cfg.tokenizer_type,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=SPECIALS[3:],
            user_defined_symbols=['\n'],  # a newline is always its own token, never merged
            byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            character_coverage=0.9995, max_sentence_length=16384, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, num_threads=TRAIN_THREADS, minloglevel=2)
    except RuntimeError as e:
        if stopped:
            raise stopped[0]
        m = re.search(r'value <= (\d+)', str(e))
        if m:
            die(f"vocab_size={cfg.vocab_size} is too large for this little text: SentencePiece can "
                f"make at most {m.group(1)} pieces from it. Lower vocab_size or add text to the "
                "sources.")
        m = re.search(r'smaller than required_chars\. \d+ vs (\d+)', str(e))
        if m:
            die(f"vocab_size={cfg.vocab_size} is too small: the fixed pieces (7 special tokens, "
                f"the "
                f"newline, 256 bytes) and the characters of this text need {m.group(1)}. Raise "
                f"vocab_size to at least {m.group(1)}.")
        if 'sentences_.empty()' in str(e):
            die("the sources gave the tokenizer no text to learn from: it reads only the documents "
                "prepare.py puts in train, and here val takes them all (a small source, or a "
                "streamed one with fewer than val_tokens x 16 characters). Add text, or lower "
                "val_frac or val_tokens.")
        die(f"SentencePiece training failed: {e}")
    if stopped:  # (training may also end normally on the lines read before the bad file)
        raise stopped[0]
    try:
        with atomic_file(path) as f:
            f.write(model.getvalue())
        with atomic_file(info_path, 'w') as f:
            json.dump({'settings': settings, 'sha256': file_sha256(path)}, f, indent=2)
    # a full disk: atomic_file removed its temp file; a model without its .json is not kept
    except OSError as e:
        if os.path.exists(path) and not os.path.exists(info_path):
            os.remove(path)
        die(f"cannot write {e.filename or path} ({e.strerror}): free some space on that disk or "
            f"set "
            "tokenizer_path to another disk; nothing half-written was kept")
    tok = Tokenizer(path)
    print(f"tokenizer: wrote {path} ({tok.vocab_size} pieces, sha256 {tok.sha256[:12]})")


# ----------------------------------------------------------------------------------------------
# Importing a pretrained model's tokenizer (base_model set)

def import_tokenizer(cfg):
    """Write base_model's tokenizer to tokenizer_path (a tokenizer.json) and a
    tokenizer_config.json beside it: the chat template, bos/eos, and a record of where it came
    from (base_model and its source files' sha256), which decides "up to date" on a re-run."""
    path = cfg.tokenizer_path
    config_path = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
    if os.path.isdir(path):
        die(f"tokenizer_path {path} is a folder: set it to a file, e.g. "
            f"{os.path.join(path, 'tokenizer.json')}")
    need('tokenizers')  # (before any download)
    files = source_files(cfg.base_model)  # (an hf: model's are downloaded, once)
    record = {'base_model': cfg.base_model,
              'files': {name: file_sha256(p) for name, p in sorted(files.items())}}
    fix = ("Shards and checkpoints made with it depend on it, so it is not replaced silently: "
           "delete it and its tokenizer_config.json (and re-run prepare.py) to import again, or "
           "set --tokenizer_path to a new file.")
    if os.path.exists(path) or os.path.exists(config_path):
        old = read_record(config_path)
        old = old.get('smallchat_import') if isinstance(old, dict) else None
        if not isinstance(old, dict) or not os.path.exists(path):
            die(f"{path} and {config_path} are not a tokenizer that tokenizer.py imported (one is "
                f"missing, or {config_path} holds no record of an import). {fix}")
        if old.get('tokenizer_sha256') != file_sha256(path):
            die(f"{path} is not the file tokenizer.py imported: its sha256 differs from the one "
                f"recorded in {config_path}, so it was replaced or changed since. {fix}")
        if {k: old.get(k) for k in record} != record:
            was = old.get('base_model')
            why = ("its files changed since" if was == cfg.base_model
                   else f"now base_model is {cfg.base_model}")
            die(f"{path} was imported from {was} and {why}. {fix}")
        print(f"tokenizer: {path} is up to date with base_model {cfg.base_model}, nothing to do")
        return
    text, config, pre = read_source(files)
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', **config}  # (transformers reads it)
    record['tokenizer_sha256'] = hashlib.sha256(text.encode('utf-8')).hexdigest()
    if pre:
        record['gguf_pre'] = pre
    config['smallchat_import'] = record
    where = f"base_model {cfg.base_model}"
    tok = HFTokenizer(where, text, config)  # (a tokenizer we cannot use stops here, unwritten)
    check_writable(os.path.dirname(path) or '.', 'tokenizer_path (or out_dir)')
    try:
        with atomic_file(path, 'w') as f:
            f.write(text)
        with atomic_file(config_path) as f:
            f.write(config_bytes(config))
    except OSError as e:  # (a tokenizer.json without its record is not kept)
        if os.path.exists(path) and not os.path.exists(config_path):
            os.remove(path)
        die(f"cannot write {e.filename or path} ({e.strerror}): free some space on that disk or "
            "set tokenizer_path to another disk; nothing half-written was kept")
    names = {i: tok.tk.id_to_token(i) for i in (tok.bos_id, tok.eos_id, tok.eot_id)}
    print(f"tokenizer: imported {cfg.base_model}'s tokenizer into {path} ({tok.vocab_size} "
          f"tokens; bos {names[tok.bos_id]}, eos {names[tok.eos_id]}, end of reply "
          f"{names[tok.eot_id]})")
    if tok.template:
        print(f"tokenizer: its chat template is {tok.template}")
    else:
        print(f"tokenizer: note: chat sources and chat cannot be used with it: "
              f"{tok.template_problem}, not ChatML (plain text can)")


def main():
    cfg = configure()
    if cfg.show_chat:
        tok = load_tokenizer(cfg.tokenizer_path)
        messages = load_conversation_file(cfg.show_chat)
        try:
            text, n, trained = show_conversation(tok, messages)
        except ValueError as e:
            die(f"{cfg.show_chat}: {e}")
        print(text)
        print(f"\n{n} tokens, {trained} trained (inside ⟦ ⟧): assistant replies and the "
              f"{special_name(tok, tok.eot_id)} that ends each")
        return
    if cfg.base_model:
        import_tokenizer(cfg)
        return
    download.setup(cfg)  # a public corpus among the sources is fetched (or read from the cache)
    train_tokenizer(cfg)


if __name__ == '__main__':
    main()
