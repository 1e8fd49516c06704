"""
Duplicates out before the split: exact copies (after normalising whitespace) and near copies
(MinHash over word shingles, with locality-sensitive hashing to find the candidates).

    index = Index(threshold=0.8, min_words=100)
    index.check(doc_text(doc), near_text(doc))   -> None (new: kept, and remembered)
                                                    or (why, i, ...): i is the kept copy
    Seen(bits).add(doc_text(doc))                -> a streamed corpus's exact copies, fixed memory

Why before the split: prepare.py sends each document to train or val by a hash of its own, so two
copies that differ by one character can land on both sides, and val then measures how well the
model remembers train. And a page pasted twice, a repeated template, boilerplate all weigh double
in training. The first copy in reading order is kept (sources in config order, files sorted), so
which one goes never depends on the number of processes.

Near duplicates, after Broder ("On the resemblance and containment of documents", 1997): two texts
are the sets of their 5-word shingles, alike by Jaccard similarity |A & B| / |A | B|. A MinHash
signature (the smallest of each of 128 hash functions over the shingles) estimates it: the share of
positions where two signatures agree. Comparing every pair would be quadratic, so the signature is
cut into bands and a document is a candidate only if one band is identical to a kept document's
(LSH); each candidate is then checked on the whole signature. No dependency: numpy.
"""
import hashlib
import re
import zlib

import numpy as np

SHINGLE = 5  # words per shingle: long enough that unrelated texts share few, short enough to
# survive small edits
NUM_PERM = 128
# multiply-shift hashing (Dietzfelbinger et al.): h(x) = (a * x + b) mod 2^64, top 32 bits; odd a
_rng = np.random.default_rng(20261205)
_A = (_rng.integers(1, 2 ** 63, NUM_PERM, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
_B = _rng.integers(0, 2 ** 63, NUM_PERM, dtype=np.uint64)
WORD = re.compile(r'\w+')


def normal_form(text):
    """What exact duplicates are compared on: the words and punctuation, whitespace collapsed."""
    return ' '.join(text.split())


def shingle_hashes(text):
    """32-bit hashes of the text's 5-word shingles (lowercased words): (n,) uint64."""
    words = WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    h = np.array([zlib.crc32(w.encode()) for w in words], dtype=np.uint64)
    if len(h) < SHINGLE:  # a short text is one shingle
        h = np.concatenate([h, np.zeros(SHINGLE - len(h), dtype=np.uint64)])
    # a shingle's hash: its words' hashes combined by position (a polynomial, mod 2^32)
    out = np.zeros(len(h) - SHINGLE + 1, dtype=np.uint64)
    for j in range(SHINGLE):
        out = (out * np.uint64(1000003) + h[j:len(h) - SHINGLE + 1 + j]) & np.uint64(0xFFFFFFFF)
    return np.unique(out)


def signature(text, block=4096):
    """MinHash signature (NUM_PERM,) uint32 of the text's shingles (all ones-bits for none)."""
    sig = np.full(NUM_PERM, 2 ** 32 - 1, dtype=np.uint64)
    shingles = shingle_hashes(text)
    for i in range(0, len(shingles), block):  # (NUM_PERM, block) at a time: bounded memory
        x = shingles[i:i + block]
        hashed = (_A[:, None] * x[None, :] + _B[:, None]) >> np.uint64(32)
        sig = np.minimum(sig, hashed.min(axis=1))
    return sig.astype(np.uint32)


def bands_for(threshold, num_perm=NUM_PERM):
    """(bands, rows) with bands * rows = num_perm whose LSH threshold (1/bands)^(1/rows) is the
    highest at or below `threshold`: pairs that alike are found with high probability, and fewer
    unrelated pairs need the full check than with a lower one."""
    pairs = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
    below = [(b, r) for b, r in pairs if (1 / b) ** (1 / r) <= threshold]
    return max(below, key=lambda p: (1 / p[0]) ** (1 / p[1]))


class Seen:
    """Exact copies in a corpus streamed once (fineweb-edu), in fixed memory: a Bloom filter of
    `bits` bits, k positions from each text's sha256. Memory never grows with the corpus; a text
    never seen is taken for a copy with probability ~(1 - e^(-k n / bits))^k after n texts (0.2%
    after 10M texts in the default 2^27 bits, 16 MB), and a copy is never missed."""

    def __init__(self, bits=1 << 27, k=7):
        self.bits, self.k = bits, k
        self.array = np.zeros((bits + 7) // 8, dtype=np.uint8)

    def add(self, text):
        """Was the text (whitespace collapsed) seen before? It is remembered either way."""
        digest = hashlib.sha256(normal_form(text).encode('utf-8', 'surrogatepass')).digest()
        spots = [int.from_bytes(digest[3 * i:3 * i + 8], 'big') % self.bits for i in range(self.k)]
        seen = all(self.array[p >> 3] >> (p & 7) & 1 for p in spots)
        for p in spots:
            self.array[p >> 3] |= np.uint8(1 << (p & 7))
        return seen


class Index:
    """The documents kept so far: their exact keys, signatures and LSH bands."""

    def __init__(self, threshold=0.8, min_words=100):
        self.threshold, self.min_words = threshold, min_words
        self.bands, self.rows = bands_for(threshold)
        self.exact = {}  # digest of the normal form -> the kept document's number
        self.buckets = [{} for _ in range(self.bands)]  # band bytes -> kept documents' numbers
        self.signatures = []
        self.n = 0
        self.kept = []  # (source, number in its reading order, where) of each kept document
        self.sources = []  # the sources scanned, in order

    def scan(self, name, docs, reject=None):
        """The documents (where, doc, split) of source `name`, in reading order, checked and the new
        ones remembered. Returns the copies to remove: [(number, record)], a record saying why and
        which copy stays. A corpus with a split of its own (Tiny Shakespeare's last 10%) keeps it
        whole, so its figures compare with everyone else's: its copies are not removed (nor
        remembered). reject(doc): why a document goes before it is compared (quality.problem), or
        None. Also returns how many documents were read."""
        removed, n = [], 0
        for n, (where, doc, split) in enumerate(docs, 1):
            why = reject(doc) if reject and not split else None
            if why:  # junk: removed, and never the copy another document is compared with
                removed.append((n - 1, {'removed': where, 'document': n, 'why': why}))
                continue
            found = self.check(doc_text(doc), near_text(doc))
            if found is None:
                self.kept.append((name, n, where))
                continue
            if split:
                continue
            why = 'exact duplicate' if found[0] == 'exact' else (
                f"near duplicate (Jaccard ~{found[2]:.2f} >= dedup_threshold={self.threshold})")
            source, number, place = self.kept[found[1]]
            removed.append((n - 1, {'removed': where, 'document': n, 'why': why, 'kept': place,
                                    'kept_source': source, 'kept_document': number}))
        self.sources.append(name)
        return removed, n

    def check(self, text, near_text=None):
        """None if the text is new (it is kept: remembered under number self.n - 1), else
        ('exact', i) or ('near', i, similarity) naming the kept copy i. Near copies are looked
        for on near_text (default: the text) when it has min_words words or more: on a short page a
        shared template (Roam's "Tags::", "Date Created::" ...) outweighs what is its own, and two
        different maxims of one template would look alike."""
        key = hashlib.sha256(normal_form(text).encode('utf-8', 'surrogatepass')).digest()[:16]
        if key in self.exact:
            return ('exact', self.exact[key])
        near_text = text if near_text is None else near_text
        near = len(WORD.findall(near_text)) >= self.min_words
        sig = signature(near_text) if near else None
        if near:
            bands = [sig[b * self.rows:(b + 1) * self.rows].tobytes() for b in range(self.bands)]
            seen = set()
            for band, bucket in zip(bands, self.buckets):
                for i in bucket.get(band, ()):
                    if i in seen:
                        continue
                    seen.add(i)
                    similarity = float(np.mean(self.signatures[i] == sig))
                    if similarity >= self.threshold:
                        return ('near', i, similarity)
            for band, bucket in zip(bands, self.buckets):
                bucket.setdefault(band, []).append(self.n)
        self.exact[key] = self.n
        self.signatures.append(sig)
        self.n += 1
        return None


def doc_text(doc):
    """A document as exact duplicates are compared: its text, or a conversation's turns, one per
    line."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict):  # a preference pair
        return '\n'.join([doc_text(doc['messages']), f"chosen: {doc['chosen']}",
                          f"rejected: {doc['rejected']}"])
    return '\n'.join(f"{m['role']}: {m['content']}" for m in doc)


def near_text(doc):
    """A document as near duplicates are compared: its text, or a conversation's replies (two
    questions about one long passage, as dolly has, are two examples; two conversations whose
    replies are alike are one)."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict):  # a pair: its question and its two replies
        return '\n'.join([doc['messages'][-1]['content'], doc['chosen'], doc['rejected']])
    return '\n'.join(m['content'] for m in doc if m['role'] == 'assistant')
