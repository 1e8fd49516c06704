"""
What every way of talking to a model shares: how a prompt is built from a conversation or a text,
fitted to the context, and which tokens a reply may never hold.

    ids = completion_prompt(tok, text, block_size, max_new_tokens)
    messages, ids = chat_prompt(tok, messages, block_size, max_new_tokens, notes, k)

sample.py (the terminal), serve.py (the HTTP API and web page) and eval.py (the held-out questions)
all build prompts here, so a reply to the same conversation with the same seed is the same text
wherever it is asked.
"""
import sys
import time

import torch

from retrieval import with_notes_conversation
from tokenizer import not_in_reply, past_vocab, render_for_reply


def banned_ids(tok, model, allow_special=False):
    """Ids a reply never holds: the role tokens (unless allow_special), and the ids past the
    tokenizer's end that a padded embedding has (tokenizer.past_vocab)."""
    return (() if allow_special else not_in_reply(tok)) + past_vocab(tok, model.cfg.vocab_size)


def reply_room(max_new_tokens, block_size):
    """The context a reply is kept: up to half of it, so a long reply never squeezes the prompt
    out."""
    return min(max_new_tokens, block_size // 2)


def keep_end(tok, text, room):
    """The longest end of `text` that encodes to at most `room` tokens. Cut in the text, not in its
    ids, so that what the model reads is an encoding of text, as in training. (Bisection on where
    the end starts; whatever it returns fits.)"""
    lo, hi = 0, len(text)  # text[hi:] fits
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tok.encode(text[mid:])) <= room:
            hi = mid
        else:
            lo = mid + 1
    return text[hi:]


def keep_head(tok, text, room):
    """The longest start of `text` that encodes to at most `room` tokens (as keep_end)."""
    lo, hi = 0, len(text)  # text[:lo] fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok.encode(text[:mid])) <= room:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def completion_prompt(tok, text, block_size, max_new_tokens, say=None):
    """<s> and the text's ids. A text too long for the context keeps <s> (every training window
    starts a document with one) and its end, where the text goes on, leaving room for the first
    tokens written; `say` (default: stderr) is told so."""
    room = block_size - min(max_new_tokens, block_size // 2) - 1
    ids = tok.encode(text)
    if len(ids) <= room:
        return [tok.bos_id] + ids
    end = keep_end(tok, text, room)
    (say or warn)(f"the prompt is {len(ids)} tokens, more than the context of {block_size} holds "
                  f"beside what is written: the model sees <s> and its last "
                  f"{len(tok.encode(end))}")
    return [tok.bos_id] + tok.encode(end)


def turn_tokens(tok, messages):
    """How many tokens the prompt for a reply to `messages` takes besides their contents."""
    return len(render_for_reply(tok, [{**m, 'content': ''} for m in messages]))


def fit_system(tok, system, budget, say=None):
    """The system prompt as chat can use it in a prompt of `budget` tokens: whole while its turn
    leaves room for a message; else its head, cut so that half of what remains is left for the
    message (a context too small for the prompt, as the smoke profile's); `say` is told."""
    fixed = turn_tokens(tok, [{'role': 'system'}, {'role': 'user'}])
    n = len(tok.encode(system))
    if fixed + n < budget:
        return system
    head = keep_head(tok, system, (budget - fixed) // 2)
    (say or warn)(f"the system prompt is {n} tokens, more than the context of {budget} tokens "
                  f"before the reply holds beside a message: its first "
                  f"{len(tok.encode(head))} are used")
    return head


def fit_history(tok, messages, budget):
    """Messages ending with a user turn -> (kept messages, prompt ids of at most `budget` tokens).
    What every training row has stays: <s>, the system turn, and the <|asst|> that starts the
    reply. The oldest user+assistant exchanges go first. If the last message alone is still too
    long, its end is kept: the reply follows on from it, and the question about a pasted text
    usually comes after the text."""
    first = 1 if messages[0]['role'] == 'system' else 0
    while len(messages) > first + 1:
        ids = render_for_reply(tok, messages)
        if len(ids) <= budget:
            return messages, ids
        messages = messages[:first] + messages[first + 2:]
    ids = render_for_reply(tok, messages)
    if len(ids) <= budget:
        return messages, ids
    end = keep_end(tok, messages[-1]['content'], budget - turn_tokens(tok, messages)
                   - sum(len(tok.encode(m['content'])) for m in messages[:-1]))
    messages = messages[:-1] + [{'role': 'user', 'content': end}]
    return messages, render_for_reply(tok, messages)


def chat_prompt(tok, messages, block_size, max_new_tokens, notes=None, k=0, say=None):
    """A whole conversation (optional system, then user and assistant taking turns, ending with a
    user message; the system prompt already chosen) -> (the messages as the model reads them, the
    prompt ids). With retrieval (notes: a retrieval.Index), each user message gets the k chunks of
    the notes that match it and the message before it, as its SFT rows did. The system prompt is
    cut when it alone would fill the context; the oldest exchanges go when the whole does not fit
    (fit_system, fit_history)."""
    budget = block_size - reply_room(max_new_tokens, block_size)
    if messages[0]['role'] == 'system':
        messages = [{**messages[0], 'content': fit_system(tok, messages[0]['content'], budget,
                                                          say)}] + messages[1:]
    messages = with_notes_conversation(notes, messages, k)
    return fit_history(tok, messages, budget)


def compile_decode(cfg, model, autocast, cache, banned=()):
    """Compile the decode step now, for this run's sampling settings and cache, rather than inside
    the first reply. Said on stderr, so that the replies on stdout stay as they are."""
    if not (cfg.compile_decode and cfg.use_kv_cache):
        return
    print("compiling the decode step (once per process; --compile_decode=False skips it)...",
          end=' ', flush=True, file=sys.stderr)
    t = time.time()
    device = model.embed.weight.device
    with autocast:  # a throwaway generator: the run's own draws stay those of an uncompiled run
        list(model.generate([0, 0], 2, cfg.temperature, cfg.top_k, cfg.top_p, banned=banned,
                            compile=True,
                            generator=torch.Generator(device).manual_seed(0), cache=cache))
    cache.reset()
    print(f"{time.time() - t:.1f} s", file=sys.stderr)


def warn(text):
    print(f"({text})", file=sys.stderr)
