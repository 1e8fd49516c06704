"""
A pretrained model's own tokenizer, used by every stage exactly as our SentencePiece one is
(tokenizer.load_tokenizer tells them apart by the file's content):

    tok = HFTokenizer('out/smol/tokenizer.json')     # + the tokenizer_config.json beside it
    tok.encode('<|im_end|> is text here')            # never a control token, whatever the text

A Hugging Face tokenizer.json of the byte-level BPE kind only (GPT-2, SmolLM2, Qwen2, Llama 3):
every text is bytes first, so any text has a spelling and every token is a run of bytes, which is
what streaming output and bits-per-byte need. SentencePiece-style tokenizer.json files (Llama 2,
Mistral), WordPiece and Unigram are refused.

Also what `python tokenizer.py <config>` needs to import one from base_model: the files of a Hugging
Face folder or of an hf: download as they are, or a tokenizer.json built from a GGUF file's
tokenizer.ggml.* metadata; and gguf_vocab, what export.py writes into a GGUF file.

Needs the `tokenizers` package (the export extra): pip install -r requirements-export.txt.
"""
import hashlib
import json
import os

from common import die

EXTRA = "pip install -r requirements-export.txt"

# the ChatML tokens; a tokenizer whose chat template uses them is rendered by tokenizer.py
IM_START, IM_END = '<|im_start|>', '<|im_end|>'
# the token that starts every plain-text document when the vocabulary has it (GPT-2's document
# separator, kept by SmolLM2 and Qwen2); else the configured bos_token
ENDOFTEXT = '<|endoftext|>'

# GGUF's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def need(module):
    """Import an optional package, or stop with the pip command that installs it."""
    try:
        return __import__(module)
    except ImportError:
        die(f"a pretrained model's tokenizer needs the '{module}' package, which smallchat's own "
            f"SentencePiece tokenizer does not: {EXTRA}")


def bytes_to_unicode():
    """GPT-2's table {byte: character}: a byte-level BPE works on text where every byte is one
    printable character. Printable Latin-1 stands for itself; the other 68 bytes (space, newline,
    controls ...) take the characters from U+0100 on, in order: a space is 'Ġ', a newline 'Ċ'."""
    keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
            *range(ord('®'), ord('ÿ') + 1)]
    table, moved = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


# ----------------------------------------------------------------------------------------------
# How text is cut into words before BPE merges inside each: the pre-tokenizer. GGUF files name it
# (tokenizer.ggml.pre) and llama.cpp keeps a list of regexes per name (src/llama-vocab.cpp); here
# each name we support is the tokenizer.json pre-tokenizer that means the same. (Each regex splits
# the pieces the one before left, keeping what it does not match: tokenizers' 'Isolated' Split.)

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Qwen2's and Llama 3's as their tokenizer.json files spell them: case-blind contractions, letters
# with one leading non-letter, newlines kept together; digits one by one (Qwen2) or up to three
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def byte_level(use_regex):
    """Text to GPT-2's byte characters; use_regex: cut at GPT2_REGEX first."""
    return {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True,
            'use_regex': use_regex}


def split(regex):
    return {'type': 'Split', 'pattern': {'Regex': regex}, 'behavior': 'Isolated', 'invert': False}


def sequence(*steps):
    return {'type': 'Sequence', 'pretokenizers': list(steps)}


PRE_TOKENIZERS = {
    'gpt-2': byte_level(True),
    # SmolLM2 (StarCoder's tokenizer): every digit alone (llama.cpp's \p{N}), then GPT-2's regex.
    # Spelled as SmolLM2's own tokenizer.json does: Digits splits at each \p{N} character.
    'smollm': sequence({'type': 'Digits', 'individual_digits': True}, byte_level(True)),
    'qwen2': sequence(split(QWEN2_REGEX), byte_level(False)),
    'llama-bpe': sequence(split(LLAMA3_REGEX), byte_level(False)),
    # llama.cpp's fallback for a file that names none: punctuation runs, GPT-2's regex, digit runs,
    # then runs of three digits. It is what llama.cpp does with such a file, which warns that the
    # model may have been trained with something else
    'default': sequence(split(r"[\p{P}\$\+<=>\^~\|]+"), split(GPT2_REGEX), split(r"\p{N}+"),
                        split(r"[0-9][0-9][0-9]"), byte_level(False)),
}
# other names llama.cpp gives the same regexes
PRE_ALIASES = {'starcoder': 'smollm', 'refact': 'smollm', 'codeshell': 'smollm',
               'llama3': 'llama-bpe', 'llama-v3': 'llama-bpe', 'deepseek-r1-qwen': 'qwen2',
               'stablelm2': 'qwen2', 'mpt': 'gpt-2', 'olmo': 'gpt-2'}
# Llama 3 takes a word that is a whole token as it is, merges or not (llama.cpp's ignore_merges)
IGNORE_MERGES = {'llama-bpe'}


def pre_name(pre_tokenizer):
    """The GGUF name of a tokenizer.json pre-tokenizer of one of the shapes above; None if it is
    none of them. (trim_offsets changes offsets only, not the tokens.)"""
    def plain(node):
        if isinstance(node, dict):
            node = {k: plain(v) for k, v in node.items() if k != 'trim_offsets'}
            if node.get('type') == 'ByteLevel':
                node.setdefault('use_regex', True)  # (older files leave out the default)
            return node
        return [plain(v) for v in node] if isinstance(node, list) else node
    return next((name for name, known in PRE_TOKENIZERS.items()
                 if plain(known) == plain(pre_tokenizer)), None)


def has_step(node, kind):
    """Whether a pre-tokenizer or decoder is of type `kind` or is a Sequence holding one."""
    if not isinstance(node, dict):
        return False
    steps = node.get('pretokenizers') or node.get('decoders') or []
    return node.get('type') == kind or any(has_step(s, kind) for s in steps)


def not_byte_level(spec):
    """None for a byte-level BPE tokenizer.json (already parsed); else what it is instead."""
    model = spec.get('model') if isinstance(spec.get('model'), dict) else {}
    kind = model.get('type') or ('BPE' if 'merges' in model else None)
    if kind != 'BPE':
        return f"a {kind or 'model-less'} tokenizer"
    if has_step(spec.get('pre_tokenizer'), 'ByteLevel') and has_step(spec.get('decoder'),
                                                                      'ByteLevel'):
        return None
    if has_step(spec.get('pre_tokenizer'), 'Metaspace') or model.get('byte_fallback'):
        return "a SentencePiece-style BPE (spaces as '▁', byte fallback: Llama 2, Mistral ...)"
    return "a BPE tokenizer without GPT-2's byte-level pre-tokenizer and decoder"


# ----------------------------------------------------------------------------------------------
# The tokenizer

class HFTokenizer:
    """A byte-level BPE tokenizer.json and the tokenizer_config.json beside it (chat template,
    bos_token, eos_token). `text` and `config`: their contents, for a tokenizer not written yet
    (tokenizer.py checks what it imports before it writes anything)."""

    def __init__(self, path, text=None, config=None):
        tokenizers = need('tokenizers')
        self.path = path
        folder = os.path.dirname(path)
        parts = {}  # what the sha256 covers: anything that changes ids or the chat template
        if text is None:
            with open(path, 'rb') as f:
                parts['tokenizer.json'] = f.read()
            for name in ('tokenizer_config.json', 'chat_template.jinja'):
                if os.path.isfile(os.path.join(folder, name)):
                    with open(os.path.join(folder, name), 'rb') as f:
                        parts[name] = f.read()
            try:
                text = parts['tokenizer.json'].decode('utf-8')
                config = json.loads(parts.get('tokenizer_config.json', b'{}'))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                die(f"{path} or the tokenizer_config.json beside it is damaged ({e}): import it "
                    "again with `python tokenizer.py <your config>`")
            config = config if isinstance(config, dict) else {}
            if 'chat_template.jinja' in parts and not config.get('chat_template'):
                config['chat_template'] = parts['chat_template.jinja'].decode('utf-8', 'replace')
        else:  # (hashed as tokenizer.py writes them: the same sha256 as the files will have)
            parts = {'tokenizer.json': text.encode('utf-8'),
                     'tokenizer_config.json': config_bytes(config)}
        h = hashlib.sha256()
        for name, data in parts.items():
            h.update(f'{name} {len(data)}\n'.encode() + data)
        self.sha256 = h.hexdigest()
        self.config = config
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            die(f"{path} is not valid JSON ({e}): a Hugging Face tokenizer.json is")
        what = not_byte_level(spec) if isinstance(spec, dict) else "not a tokenizer.json"
        if what:
            die(f"{path} is {what}: only byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2, "
                "Llama 3, GPT-2) can be used; choose a base_model with one")
        try:
            self.tk = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception, Rust's message)
            die(f"{path} is not a tokenizer.json the tokenizers library can read ({e})")
        # text that spells a control token is encoded as text: a user cannot forge one
        self.tk.encode_special_tokens = True

        vocab = self.tk.get_vocab(with_added_tokens=True)  # {token: id}
        added = self.tk.get_added_tokens_decoder()  # {id: AddedToken}
        self.vocab_size = max(vocab.values()) + 1
        self.specials = frozenset(i for i, t in added.items() if t.special)
        self.names = {i: added[i].content for i in self.specials}  # for show_conversation
        self.bos_id = self.token_id(ENDOFTEXT, config_token(self.config, 'bos_token'))
        if self.bos_id is None:
            die(f"{path}: the vocabulary has no {ENDOFTEXT} and no bos_token is configured in "
                "tokenizer_config.json, so there is no token to start a document with")
        self.eos_id = self.token_id(config_token(self.config, 'eos_token'), ENDOFTEXT)
        self.chat_template = self.config.get('chat_template')
        self.template, self.template_problem = chat_kind(self.chat_template,
                                                         set(self.names.values()))
        self.eot_id = vocab[IM_END] if self.template == 'chatml' else self.eos_id
        self.start_id = vocab.get(IM_START)

        # bytes of every id: the byte characters of a BPE token read back through GPT-2's
        # table; an added token that is not special is the text it matched; specials are b''
        table = bytes_to_unicode()
        byte_of = {c: b for b, c in table.items()}
        self.id_bytes = [b''] * self.vocab_size
        for token, i in vocab.items():
            if i in self.specials:
                continue
            if i in added:
                self.id_bytes[i] = added[i].content.encode('utf-8')
            elif all(c in byte_of for c in token):
                self.id_bytes[i] = bytes(byte_of[c] for c in token)
            else:  # (not byte-level spelled: taken as the text itself, as tokenizers does)
                self.id_bytes[i] = token.encode('utf-8')
        # bytes that no token spells: SmolLM2 has none for a few (0x04, 0xF1 ...). tokenizers and
        # llama.cpp drop such a byte without a word; encode writes U+FFFD for its character
        self.unspellable = {b for b, c in table.items() if c not in vocab}

    def token_id(self, *tokens):
        """The id of the first of `tokens` that is in the vocabulary (None if none is)."""
        ids = [self.tk.token_to_id(t) for t in tokens if t]
        return next((i for i in ids if i is not None), None)

    def encode(self, text):
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if self.unspellable and sum(len(self.id_bytes[i]) for i in ids) != len(text.encode()):
            # a character was dropped: spelled as U+FFFD, it shows that something was there
            text = ''.join('\ufffd' if self.unspellable.intersection(c.encode()) else c
                           for c in text)
            ids = self.tk.encode(text, add_special_tokens=False).ids
        if not self.specials.isdisjoint(ids):  # (encode_special_tokens makes this never happen)
            forged = sorted(self.specials.intersection(ids))
            die(f"{self.path}: a text encoded to the control token(s) {forged}, so user text could "
                "forge a turn; this tokenizer cannot be used")
        return ids

    def decode(self, ids):
        return b''.join(self.id_bytes[i] for i in ids).decode('utf-8', errors='replace')


def config_bytes(config):
    """A tokenizer_config.json as tokenizer.py writes it."""
    return json.dumps(config, indent=2, ensure_ascii=False).encode('utf-8')


def config_token(config, key):
    """A token named in tokenizer_config.json: a string, or (older files) {'content': ...}."""
    value = config.get(key)
    return value.get('content') if isinstance(value, dict) else value


def chat_kind(template, specials):
    """('chatml' or None, why not) for a chat template and the special tokens' texts: ChatML when
    the template writes <|im_start|> and <|im_end|> and both are special tokens, or when there is
    no template but both tokens are there."""
    tokens = IM_START in specials and IM_END in specials
    if isinstance(template, list):  # (older files: [{'name': 'default', 'template': ...}, ...])
        template = next((t.get('template') for t in template
                         if isinstance(t, dict) and t.get('name') == 'default'), None)
    if template is None:
        if tokens:
            return 'chatml', None
        return None, f"it has no chat template and no {IM_START}/{IM_END} tokens"
    if not isinstance(template, str) or IM_START not in template or IM_END not in template:
        return None, "its chat template does not write <|im_start|> ... <|im_end|> turns"
    if not tokens:
        return None, f"{IM_START} and {IM_END} are not special tokens of its vocabulary"
    return 'chatml', None


# ----------------------------------------------------------------------------------------------
# Where an imported tokenizer comes from: base_model

def source_files(base_model):
    """{name: local path} of the files a base model's tokenizer is read from: tokenizer.json and
    those beside it that say how it is used (chat template, bos/eos), or the one .gguf file."""
    optional = ('tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja')
    if base_model.startswith('hf:'):
        import pretrained  # (here only: it imports torch)
        repo = base_model[3:]
        pretrained.hub_config(repo)  # (checks the id; the model's config is needed later anyway)
        files = {'tokenizer.json': pretrained.hub_file(repo, 'tokenizer.json', missing=(
            f"hf:{repo} has no tokenizer.json: only a tokenizer.json (byte-level BPE) can be "
            "imported; choose another base_model, or a .gguf file of the model"))}
        for name in optional:
            path = pretrained.hub_file(repo, name, required=False)
            if path:
                files[name] = path
        return files
    if os.path.isdir(base_model):
        if not os.path.isfile(os.path.join(base_model, 'tokenizer.json')):
            die(f"base_model {base_model} has no tokenizer.json: a Hugging Face model folder "
                "brings its tokenizer there (download it with the weights), or give the model's "
                ".gguf file, which holds its tokenizer")
        return {name: os.path.join(base_model, name) for name in ('tokenizer.json', *optional)
                if os.path.isfile(os.path.join(base_model, name))}
    if os.path.isfile(base_model):
        with open(base_model, 'rb') as f:
            if f.read(4) != b'GGUF':
                die(f"base_model {base_model} is not a GGUF file (it does not start with 'GGUF'): "
                    "give a .gguf file, a Hugging Face model folder, or hf:<owner>/<name>")
        return {os.path.basename(base_model): base_model}
    die(f"base_model {base_model}: no such folder or file; give a Hugging Face model folder, a "
        ".gguf file, or hf:<owner>/<name>")


def read_source(files):
    """(tokenizer.json text, tokenizer_config, GGUF pre name or None) from source_files' files."""
    if 'tokenizer.json' not in files:
        return from_gguf(next(iter(files.values())))
    with open(files['tokenizer.json'], encoding='utf-8') as f:
        text = f.read()
    config = {}
    for name in ('special_tokens_map.json', 'tokenizer_config.json'):  # (the second wins)
        if name in files:
            with open(files[name], encoding='utf-8') as f:
                try:
                    value = json.load(f)
                except json.JSONDecodeError as e:
                    die(f"{files[name]} is not valid JSON ({e}): download it again")
            config.update({k: config_token(value, k) if k.endswith('_token') else v
                           for k, v in value.items()
                           if k in ('bos_token', 'eos_token', 'chat_template')})
    if 'chat_template.jinja' in files and not config.get('chat_template'):
        with open(files['chat_template.jinja'], encoding='utf-8') as f:
            config['chat_template'] = f.read()
    return text, config, None


def from_gguf(path):
    """(tokenizer.json text, tokenizer_config, pre name) built from a GGUF file's tokenizer.ggml.*
    metadata: the vocabulary in id order, the merges in rank order, each token's type (control
    tokens become special added tokens), and the pre-tokenizer its `pre` name stands for."""
    gguf = need('gguf')
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        die(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})")

    def field(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    model = field('tokenizer.ggml.model')
    if model != 'gpt2':
        what = {'llama': "a SentencePiece tokenizer (Llama 2, Mistral ...)"}.get(
            model, "not a byte-level BPE")
        die(f"{path}: tokenizer.ggml.model is {model!r}, {what}: only 'gpt2' (byte-level BPE: "
            "SmolLM2, Qwen2, Llama 3) tokenizers can be imported")
    pre = field('tokenizer.ggml.pre', 'default')  # (llama.cpp's choice for a file without one)
    pre = PRE_ALIASES.get(pre, pre)
    if pre not in PRE_TOKENIZERS:
        die(f"{path}: tokenizer.ggml.pre is {pre!r}, a way of cutting text into words that is not "
            f"known here (known: {', '.join(sorted(PRE_TOKENIZERS))}): import the model's Hugging "
            "Face folder (its tokenizer.json) instead")
    if pre == 'default':
        print(f"note: {path} does not say how its text is cut into words (tokenizer.ggml.pre is "
              "'default'): llama.cpp's fallback is used, which may not be what the model was "
              "trained with")
    tokens = field('tokenizer.ggml.tokens')
    merges = field('tokenizer.ggml.merges')
    if not tokens or merges is None:
        die(f"{path} has no tokenizer.ggml.tokens or tokenizer.ggml.merges: no tokenizer to import")
    types = field('tokenizer.ggml.token_type') or [NORMAL] * len(tokens)
    added = [{'id': i, 'content': t, 'single_word': False, 'lstrip': False, 'rstrip': False,
              'normalized': False, 'special': kind == CONTROL}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]
    spec = {
        'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added,
        'normalizer': None, 'pre_tokenizer': PRE_TOKENIZERS[pre], 'post_processor': None,
        'decoder': byte_level(True),
        'model': {'type': 'BPE', 'dropout': None, 'unk_token': None,
                  'continuing_subword_prefix': None, 'end_of_word_suffix': None,
                  'fuse_unk': False, 'byte_fallback': False,
                  'ignore_merges': pre in IGNORE_MERGES,
                  'vocab': {t: i for i, t in enumerate(tokens)}, 'merges': list(merges)},
    }

    def token(key):
        i = field(f'tokenizer.ggml.{key}_token_id')
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {'chat_template': field('tokenizer.chat_template'), 'bos_token': token('bos'),
              'eos_token': token('eos')}
    return json.dumps(spec, ensure_ascii=False), config, pre


def gguf_vocab(tok):
    """What a GGUF file's tokenizer.ggml.* metadata needs for an HFTokenizer (export.py): model
    'gpt2', pre (the GGUF's own name if it came from one, else the name of its tokenizer.json's
    pre-tokenizer; None when it is none we know), tokens and token_types in id order, merges as
    'a b' strings, bos/eos/eot ids and the chat template."""
    with open(tok.path, encoding='utf-8') as f:
        spec = json.load(f)
    added = tok.tk.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(tok.vocab_size):
        text = tok.tk.id_to_token(i)
        tokens.append(text if text is not None else f'[PAD{i}]')  # (llama.cpp's name for a gap)
        types.append(UNUSED if text is None else CONTROL if i in tok.specials
                     else USER_DEFINED if i in added else NORMAL)
    merges = [m if isinstance(m, str) else ' '.join(m) for m in spec['model'].get('merges', [])]
    pre = (tok.config.get('smallchat_import') or {}).get('gguf_pre')
    return {'model': 'gpt2', 'pre': pre or pre_name(spec.get('pre_tokenizer')),
            'tokens': tokens, 'token_types': types, 'merges': merges, 'bos_id': tok.bos_id,
            'eos_id': tok.eos_id, 'eot_id': tok.eot_id, 'chat_template': tok.chat_template}
