"""
Junk out before the split: the quality filters prepare.py applies to each document of a source
before deduplication (dedup.py), each a config key whose default leaves normal notes and dialogues
alone (measured: BENCHMARKS.md, "Duplicates and junk out").

    why = text_problem(text, cfg)        # None, or the first rule it breaks, named by its key
    why = chat_problem(messages)         # a conversation: an empty reply, or one repeated

Text, after Gopher's quality rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", appendix A.1.1), those that hold for notes as well as for web text:
  - length: filter_min_words .. filter_max_words words;
  - filter_max_non_text: the share of characters that are not text (symbols, control characters,
    U+FFFD from undecodable bytes): binary junk, mojibake, box drawings;
  - repetition, on documents of 50 words or more (on a short note one repeated line is a large
    share of nothing): filter_max_dup_lines, the share of lines that repeat an earlier line, and of
    their characters (two thirds of it); filter_max_top_ngram, the characters of the most frequent
    2-gram of words (3- and 4-grams: 0.02 and 0.04 less); filter_max_dup_ngrams, the characters
    inside 5-grams that occur more than once (6- to 10-grams: 0.01 less each).
Gopher's bullet-line and ellipsis rules are left out: a Roam page is all bullets. No language
filter: no small, well-kept detector fits the dependencies (fastText's needs a 126 MB model).
The repetition defaults are looser than Gopher's (0.3, 0.2, 0.15, tuned on web pages): notes repeat
by nature (a daily template, an index of links), and Gopher's would remove 12% of a real Roam
export's pages; ours remove only its most repetitive 1% (BENCHMARKS.md). For a web crawl, set
Gopher's. 0 (or filter_max_words=0) turns a rule off.

Chat: a conversation with an empty assistant reply (it would teach the model to say nothing), or
with a long reply (REPEAT_MIN_WORDS words or more) given twice (a loop, a copy-paste) is removed;
a short one may well repeat ("no." twice is an answer).
"""
import re
import unicodedata

import numpy as np

WORD = re.compile(r'\S+')
REPETITION_MIN_WORDS = 50  # Gopher's minimum document length: the repetition rules need text
REPEAT_MIN_WORDS = 10  # a chat reply this long, given twice in one conversation, is a copy


# ASCII that is not text: control characters (but tab, newline, carriage return) and the ASCII
# symbols (Unicode category S: $ + < = > ^ ` | ~); the rest of ASCII is letters, digits, space and
# punctuation. Other characters are looked up one by one (a regex pass first keeps this fast).
ASCII_NON_TEXT = re.compile('[\x00-\x08\x0b\x0c\x0e-\x1f\x7f$+<=>^`|~]')
NON_ASCII = re.compile('[^\x00-\x7f]')


def non_text_share(text):
    """Share of characters that are not text: Unicode symbols (S*: emoji, box drawing, math),
    control and unassigned characters (C*, but tab, newline and carriage return), and U+FFFD."""
    if not text:
        return 0.0
    bad = len(ASCII_NON_TEXT.findall(text))
    for ch in NON_ASCII.findall(text):
        bad += unicodedata.category(ch)[0] in 'SC' or ch == '\ufffd'
    return bad / len(text)


def dup_line_shares(text):
    """(share of non-empty lines that repeat an earlier one, share of their characters)."""
    lines = [line.strip() for line in text.split('\n') if line.strip()]
    if not lines:
        return 0.0, 0.0
    seen, dup, dup_chars = set(), 0, 0
    for line in lines:
        if line in seen:
            dup += 1
            dup_chars += len(line)
        seen.add(line)
    return dup / len(lines), dup_chars / sum(len(line) for line in lines)


def ngram_ids(ids, n):
    """(len(ids) - n + 1,) one number per n-gram of word ids (a polynomial hash, wrapping in 64
    bits: equal n-grams get equal numbers, different ones collide with negligible probability)."""
    out = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over='ignore'):
        for k in range(n):
            out = out * np.uint64(1_000_003) + ids[k:len(ids) - n + 1 + k]
    return out


def top_ngram_share(ids, lengths, n):
    """Characters of the most frequent n-gram's occurrences / characters of all words (Gopher).
    ids: (words,) uint64 word ids; lengths: (words,) their characters."""
    if len(ids) < n:
        return 0.0
    grams, first, counts = np.unique(ngram_ids(ids, n), return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    return counts[top] * lengths[first[top]:first[top] + n].sum() / max(lengths.sum(), 1)


def dup_ngram_share(ids, lengths, n):
    """Characters of the words inside n-grams that occur more than once / characters of all words
    (each word counted once, however many repeated n-grams cover it: Gopher)."""
    if len(ids) < n:
        return 0.0
    grams = ngram_ids(ids, n)
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    repeated = (counts[inverse] > 1).astype(np.int64)  # (n-grams,): starts of repeated ones
    covered = np.convolve(repeated, np.ones(n, dtype=np.int64))[:len(ids)] > 0  # (words,)
    return lengths[covered].sum() / max(lengths.sum(), 1)


def text_problem(text, cfg):
    """None if the text passes every filter, else why not: the key of the first rule it breaks,
    its value and the text's."""
    words = WORD.findall(text)
    if len(words) < cfg.filter_min_words:
        return f"filter_min_words: {len(words)} words (< {cfg.filter_min_words})"
    if cfg.filter_max_words and len(words) > cfg.filter_max_words:
        return f"filter_max_words: {len(words):,} words (> {cfg.filter_max_words:,})"
    share = non_text_share(text)
    if cfg.filter_max_non_text and share > cfg.filter_max_non_text:
        return (f"filter_max_non_text: {share:.2f} of characters are not text (> "
                f"{cfg.filter_max_non_text})")
    if len(words) < REPETITION_MIN_WORDS:
        return None
    lines, line_chars = dup_line_shares(text)
    limit = cfg.filter_max_dup_lines
    if limit and (lines > limit or line_chars > limit * 2 / 3):
        return (f"filter_max_dup_lines: {lines:.2f} of lines ({line_chars:.2f} of their "
                f"characters) repeat (> {limit}, {limit * 2 / 3:.2f})")
    vocab = {}  # word (lowercased) -> id: n-grams compared as numbers
    ids = np.array([vocab.setdefault(w.lower(), len(vocab)) for w in words], dtype=np.uint64)
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    for n in (2, 3, 4):
        limit = cfg.filter_max_top_ngram and cfg.filter_max_top_ngram - 0.02 * (n - 2)
        share = top_ngram_share(ids, lengths, n) if limit else 0
        if limit and share > limit:
            return (f"filter_max_top_ngram: the most frequent {n}-gram holds {share:.2f} of the "
                    f"characters (> {limit:.2f})")
    for n in range(5, 11):
        limit = cfg.filter_max_dup_ngrams and cfg.filter_max_dup_ngrams - 0.01 * (n - 5)
        share = dup_ngram_share(ids, lengths, n) if limit else 0
        if limit and share > limit:
            return (f"filter_max_dup_ngrams: {share:.2f} of the characters are in repeated "
                    f"{n}-grams (> {limit:.2f})")
    return None


def chat_problem(messages):
    """None, or why a conversation teaches nothing good: an empty reply, or a long one repeated."""
    replies = [' '.join(m['content'].split()) for m in messages if m['role'] == 'assistant']
    if any(not r for r in replies):
        return "chat: an empty assistant reply"
    long = [r for r in replies if len(r.split()) >= REPEAT_MIN_WORDS]
    if len(set(long)) < len(long):
        return f"chat: a reply of {REPEAT_MIN_WORDS}+ words given twice"
    return None


def problem(doc, cfg):
    """The filter a document (text, conversation or pair) fails, or None; pairs are checked by their
    reader (identical or empty replies refused)."""
    if not cfg.quality_filter:
        return None
    if isinstance(doc, str):
        return text_problem(doc, cfg)
    if isinstance(doc, list):
        return chat_problem(doc)
    return None
