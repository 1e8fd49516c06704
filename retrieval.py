"""
Retrieval: the notes most relevant to a message, put in front of it, the same way at every stage.

    index = notes_index(cfg)                        # cfg.retrieve_from's documents, cut into chunks
    content = with_notes(index, 'who owns the bike shop?', cfg.retrieve_k)

A model of a few hundred million parameters, fine-tuned for minutes, does not learn the facts of a
few hundred notes well enough to recall them (it recites what its training rows said, word for
word). What it can learn is to answer from text in front of it. So the user's message is shown to
the model with the chunks of the notes that share the most (rare) words with it, and SFT rows are
built the same way (prepare.py), so that the model learns to answer from them, and to say so when
they do not hold the answer. Chat (sample.py) and eval.py's questions do the same at question time.

The ranking is BM25 (Robertson and Zaragoza, "The Probabilistic Relevance Framework", 2009): a word
counts more the rarer it is among the chunks and the more often it occurs in a chunk, with
diminishing returns, and less in long chunks. No model, no dependency: it is words and counts, so
the index is rebuilt from the notes whenever a stage starts (a few hundred pages take well under a
second), and is never out of date.

A chunk is a run of a page's lines up to retrieve_chunk_chars characters, cut where a top-level
bullet starts when it can be; each chunk begins with its page's title (a Roam page's first line),
so "what happened on november 3rd" finds the daily note of that name. Keep chunks small (a few
bullets: config/notes.py's are 120 characters): a 135M model answers more from a few short chunks
than from a few pages (BENCHMARKS.md, "Smaller chunks").
"""
import hashlib
import math
import re
import unicodedata
from collections import Counter

import sources
from common import die

# words that say nothing about which note is meant
STOPWORDS = set("""a an and are as at be been but by can could did do does doing for from had has
have he her hers him his how i if in into is it its me my of on or our she so than that the their
them then there these they this those to up us was we were what when where which who whom why will
with would you your about any some tell know does did""".split())

K1, B = 1.2, 0.75  # BM25's usual settings: how fast repeats saturate, how much length counts
TITLE_WEIGHT = 3  # a page title's words count this many times in each of its chunks


def words(text):
    """Lowercase words without their accents ('ines' finds 'Inês', 'cafe' 'Café'), stopwords out,
    a plural's 's' off ('bikes' finds 'bike')."""
    text = unicodedata.normalize('NFKD', text.lower())  # 'ê' -> 'e' + a combining circumflex
    text = ''.join(c for c in text if not unicodedata.combining(c))
    out = []
    for w in re.findall(r"[^\W_]+", text):
        if w in STOPWORDS:
            continue
        if len(w) > 3 and w.endswith('s') and not w.endswith('ss'):
            w = w[:-1]
        out.append(w)
    return out


def chunk_page(title, body, max_chars):
    """A page's chunks: runs of whole lines up to max_chars, starting a new chunk at a top-level
    bullet once the current one is half full. A chunk that starts inside a block of nested bullets
    begins with the block's first line (cut to half of max_chars), so that "- shop" still tells
    what "- a road bike in for a full service" was about; a line longer than max_chars is cut into
    pieces at spaces. Small chunks keep what a question finds short: a small model reads a few
    lines better than a long page (BENCHMARKS.md, "Smaller chunks")."""
    chunks, lines, head = [], [], ''
    for line in body.split('\n'):
        if not line.strip():
            continue
        size = sum(len(x) + 1 for x in lines)
        top = not line.startswith((' ', '\t'))
        if lines and (size + len(line) > max_chars or top and size > max_chars // 2):
            chunks.append('\n'.join(lines))
            lines = [] if top or not head else [cut(head, max_chars // 2)[0]]
        if top:
            head = line
        while len(line) > max_chars:
            piece, line = cut(line, max_chars)
            chunks.append('\n'.join(lines + [piece]))
            lines = []
        lines.append(line)
    if lines:
        chunks.append('\n'.join(lines))
    return [f"[{title}]\n{c}" for c in chunks]


def cut(line, n):
    """(the first at most n characters of line, ended at a space where there is one; the rest)."""
    if len(line) <= n:
        return line, ''
    at = line.rfind(' ', 1, n + 1)
    if at <= 0 or not line[:at].strip():  # no space after the text starts: cut inside the word
        at = n
    return line[:at], line[at:].lstrip(' ')


class Index:
    """BM25 over chunks of text. search(query, k) -> the k best chunks (best first) that share at
    least one word with the query."""

    def __init__(self, chunks, titles):
        self.chunks = chunks
        self.counts = []
        for chunk, title in zip(chunks, titles):
            c = Counter(words(chunk))
            for w in words(title):
                c[w] += TITLE_WEIGHT - 1  # (once already, in the chunk's first line)
            self.counts.append(c)
        self.lengths = [sum(c.values()) for c in self.counts]
        self.mean_length = sum(self.lengths) / max(len(self.lengths), 1)
        df = Counter(w for c in self.counts for w in c)
        n = len(chunks)
        self.idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    def scores(self, query):
        q = set(words(query))
        out = []
        for c, length in zip(self.counts, self.lengths):
            s = 0.0
            for w in q & c.keys():
                tf = c[w]
                s += self.idf[w] * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length /
                                                                self.mean_length))
            out.append(s)
        return out

    def ranked(self, query):
        """Indices of the chunks that share a word with the query, best first."""
        scores = self.scores(query)
        best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [i for i in best if scores[i] > 0]

    def search(self, query, k):
        return [self.chunks[i] for i in self.ranked(query)[:k]]


def notes_index(cfg):
    """The index of the source named by cfg.retrieve_from (every document: the notes are what the
    model answers from, whichever split prepare.py gave a page), or None when retrieval is off."""
    if not cfg.retrieve_from:
        return None
    if cfg.retrieve_from not in cfg.sources:
        die(f"retrieve_from={cfg.retrieve_from!r} is not one of the sources "
            f"({', '.join(cfg.sources)}): name the source that holds the notes")
    src = sources.source_settings(cfg.retrieve_from, cfg.sources[cfg.retrieve_from])
    if src['format'] == 'chat':
        die(f"retrieve_from={cfg.retrieve_from!r} is a chat source: name a source of notes or "
            "text, whose documents the model answers from")
    chunks, titles = [], []
    for _, doc, _ in sources.iter_documents(src):
        title, _, body = doc.partition('\n') if src.get('add_title') else ('', '', doc)
        for c in chunk_page(title, body, cfg.retrieve_chunk_chars):
            chunks.append(c)
            titles.append(title)
    if not chunks:
        die(f"retrieve_from={cfg.retrieve_from!r}: the source has no text to retrieve from")
    return Index(chunks, titles)


def with_notes(index, message, k, context=''):
    """The user's message as the model reads it: the k chunks of the notes that best match it
    (and `context`, the user's previous message, so that a follow-up such as "and how heavy is
    he?" still finds its page), best first, then the message. Unchanged when retrieval is off."""
    if index is None:
        return message
    return shown(index.search(f"{context}\n{message}", k), message)


def shown(chunks, message):
    notes = '\n\n'.join(chunks) if chunks else '(nothing in the notes matches)'
    return f"notes:\n{notes}\n\nquestion: {message}"


def with_notes_conversation(index, messages, k):
    """Every user message of a conversation as with_notes shows it (prepare.py's SFT rows)."""
    if index is None:
        return messages
    out, previous = [], ''
    for m in messages:
        if m['role'] == 'user':
            out.append({**m, 'content': with_notes(index, m['content'], k, previous)})
            previous = m['content']
        else:
            out.append(m)
    return out


def chosen(text, frac):
    """A fixed pick of about frac of all texts, by hash: the same rows on every run."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], 'little')
    return h < frac * 2 ** 64


def unanswerable_rows(index, messages, k, reply, frac):
    """Rows that teach the model to say it does not know, from a conversation of the primer.

    Shown the notes that match a question, a model learns to answer from them; with a few replies
    such as "i don't know" for questions the notes were never about, it learns little about the
    usual case, where the notes are about the right thing and still lack the detail asked for ("the
    name of the rescue"). So for about `frac` of the user messages whose reply is in the notes
    shown with them (a chunk shown holds half or more of the reply's words that the notes know,
    other than the question's own, weighted by how rare they are), one more row: that message,
    shown with the k best chunks *but* every chunk that holds the reply, answered `reply`. The
    next-best chunks are often the same page's other parts, so the row is a near miss, as real
    unanswerable questions are.
    Returns the new conversations (the system prompt, the message, the reply), for the same split
    as the conversation they come from."""
    system = [m for m in messages[:1] if m['role'] == 'system']
    out, previous = [], ''
    for m, answer in zip(messages, messages[1:] + [None]):
        if m['role'] != 'user':
            continue
        query, previous = f"{previous}\n{m['content']}", m['content']
        if answer is None or answer['role'] != 'assistant' or not chosen(m['content'], frac):
            continue
        asked = set(words(query))
        facts = {w for w in words(answer['content']) if w in index.idf and w not in asked}
        if len(facts) < 2:  # a reply with no facts from the notes ("hi. ask your question.")
            continue
        ranked = index.ranked(query)
        weight = sum(index.idf[w] for w in facts)  # rare words say more about where a reply is
        holds = {i for i in ranked
                 if 2 * sum(index.idf[w] for w in facts & index.counts[i].keys()) >= weight}
        if not holds & set(ranked[:k]):
            continue  # the reply was not in the notes shown: not a row about reading them
        rest = [index.chunks[i] for i in ranked if i not in holds][:k]
        out.append(system + [{'role': 'user', 'content': shown(rest, m['content'])},
                             {'role': 'assistant', 'content': reply}])
    return out
