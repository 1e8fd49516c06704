"""
Stage 4: talk to a trained model.

    python sample.py config/demo.py --start="the garden" --num_samples=3   # completion
    python sample.py config/demo.py --phase=sft --interactive               # chat

Text is streamed as it is generated, one token at a time, through an incremental UTF-8 decoder so
that a character split over several byte tokens is printed only once it is whole.

Chat on a terminal edits lines with readline (arrow keys, and up/down for earlier messages of the
session). With piped stdin it is a line protocol for programs: one message per input line, one reply
per output line (a newline inside a reply is written as the two characters \\n, a backslash as
\\\\), and status lines such as "(conversation reset)" go to stderr.
"""
import codecs
import os
import sys
import time

import torch

from checkpoint import checkpoint_path, load_model
from common import die, runtime
from configurator import configure
from model import KVCache
from retrieval import notes_index, with_notes
from tokenizer import (clean, end_reply, load_tokenizer, not_in_reply, past_vocab,
                       render_conversation, render_for_reply, render_user_turn, system_prompt)


class OneLine:
    """Piped chat: a reply is written on one line, its newlines as \\n and backslashes as \\\\ (so a
    program reads one reply per line and can undo the escapes)."""

    def write(self, text):
        sys.stdout.write(text.replace('\\', '\\\\').replace('\n', '\\n').replace('\r', '\\r'))

    def flush(self):
        sys.stdout.flush()


def stream(tok, tokens, out=None):
    """Print tokens as they come; returns the generated ids."""
    out = out or sys.stdout
    decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
    ids = []
    for t in tokens:
        ids.append(t)
        out.write(decoder.decode(tok.id_bytes[t]))
        out.flush()
    out.write(decoder.decode(b'', final=True))
    return ids


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


def complete(cfg, model, tok, autocast, generator):
    start = cfg.start
    if start.startswith('FILE:'):
        path = start[5:]
        if not os.path.isfile(path):
            die(f"--start=FILE:{path}: no such file")
        try:
            start = open(path, encoding='utf-8-sig').read()
        except UnicodeDecodeError as e:
            die(f"--start=FILE:{path} is not valid UTF-8 (byte {e.start}): convert it, e.g. `iconv "
                "-f latin1 -t utf-8`")
    start = clean(start)
    # a prompt too long for the context keeps <s> (every training window starts a document with
    # one) and its end, where the text goes on; and it leaves room for the first tokens it writes
    block = model.cfg.block_size
    room = block - min(cfg.max_new_tokens, block // 2) - 1
    prompt = [tok.bos_id] + tok.encode(start)
    if len(prompt) - 1 > room:
        end = keep_end(tok, start, room)
        print(f"(the prompt is {len(prompt) - 1} tokens, more than the context of {block} holds "
              f"beside what is written: the model sees <s> and its last {len(tok.encode(end))})",
              file=sys.stderr)
        prompt = [tok.bos_id] + tok.encode(end)
    # one for every sample: a compiled decode step keeps working on the same buffers
    cache = KVCache(model)
    banned = past_vocab(tok, model.cfg.vocab_size)
    compile_decode(cfg, model, autocast, cache, banned)
    for i in range(cfg.num_samples):
        if i:
            print('\n' + '-' * 40)
        print(start, end='', flush=True)
        cache.reset()
        with autocast:
            # a new <s> means the model ended the document
            stream(tok, model.generate(prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                       cfg.top_p,
                                       use_cache=cfg.use_kv_cache, stop={tok.bos_id, tok.eos_id},
                                       banned=banned,
                                       generator=generator, cache=cache,
                                       compile=cfg.compile_decode))
        print()


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


def turn_tokens(tok, messages):
    """How many tokens the prompt for a reply to `messages` takes besides their contents."""
    return len(render_for_reply(tok, [{**m, 'content': ''} for m in messages]))


def fit_system(tok, system, budget):
    """The system prompt as chat can use it in a prompt of `budget` tokens: whole while its turn
    leaves room for a message; else its head, cut so that half of what remains is left for the
    message (a context too small for the prompt, as the smoke profile's), said on stderr."""
    fixed = turn_tokens(tok, [{'role': 'system'}, {'role': 'user'}])
    n = len(tok.encode(system))
    if fixed + n < budget:
        return system
    head = keep_head(tok, system, (budget - fixed) // 2)
    print(f"(the system prompt is {n} tokens, more than the context of {budget} tokens before the "
          f"reply holds beside a message: its first {len(tok.encode(head))} are used)",
          file=sys.stderr)
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


def chat(cfg, model, tok, autocast, generator, notes=None):
    """A multi-turn REPL. The KV cache holds the conversation so far, so each turn only feeds the
    new user message; when the conversation outgrows the context, the oldest turns are dropped (the
    system prompt stays) and the rest is read again (fit_history)."""
    configured = system_prompt(cfg)  # the one export.py writes into the model's chat templates
    banned = ((() if cfg.allow_special else not_in_reply(tok))
              + past_vocab(tok, model.cfg.vocab_size))
    block = model.cfg.block_size
    reply_room = min(cfg.max_new_tokens, block // 2)
    system = fit_system(tok, configured, block - reply_room)
    tty = sys.stdin.isatty()
    if hasattr(sys.stdin, 'reconfigure'):
        # bytes that are not UTF-8 become U+FFFD, not a crash
        sys.stdin.reconfigure(errors='replace')
    if tty:
        try:
            # input() then edits the line (arrow keys) and keeps this session's history
            import readline  # noqa: F401
        except ImportError:  # (not on every platform)
            pass
    out = None if tty else OneLine()
    cache = KVCache(model)  # one for the whole chat, reset when it starts over
    compile_decode(cfg, model, autocast, cache, banned)

    messages = [{'role': 'system', 'content': system}]
    pending = render_conversation(tok, messages)[0]
    previous = ''  # the user's last message as typed (retrieval looks at it too)
    if tty:
        print("chat: type a message; /reset, /system <text> (bare /system: the configured one), "
              "/quit (or Ctrl-D)")
    while True:
        try:
            line = input('> ' if tty else '')
        except EOFError:  # Ctrl-D, or the end of piped input
            if tty:
                print()
            return
        text = clean(line).strip()
        if not text:
            continue
        if text == '/quit':
            return
        if text in ('/reset', '/system') or text.startswith('/system '):
            status = "conversation reset"
            if text.startswith('/system'):
                asked = text[len('/system'):].strip() or configured
                status = ("configured system prompt restored, " if asked == configured
                          else "system prompt set, ") + status
                system = fit_system(tok, asked, block - reply_room)
            messages = [{'role': 'system', 'content': system}]
            pending = render_conversation(tok, messages)[0]
            previous = ''
            cache.reset()
            # not on stdout, where a program reads one reply per line
            print(f"({status})", file=sys.stderr)
            continue
        # with retrieval on, the model reads the message with the notes that match it (and the
        # message before it), as its SFT rows showed it (retrieval.py)
        content = with_notes(notes, text, cfg.retrieve_k, previous)
        previous = text
        messages.append({'role': 'user', 'content': content})
        pending = pending + render_user_turn(tok, content)
        if cache.pos + len(pending) + reply_room > block:
            messages, pending = fit_history(tok, messages, block - reply_room)
            cache.reset()
            if messages[-1]['content'] != content:
                print(f"(the message is longer than the context holds: the model reads its last "
                      f"{len(tok.encode(messages[-1]['content']))} tokens)", file=sys.stderr)
        with autocast:
            reply = stream(tok, model.generate(pending, reply_room, cfg.temperature, cfg.top_k,
                                               cfg.top_p, banned=banned, stop={tok.eot_id},
                                               generator=generator, cache=cache,
                                               compile=cfg.compile_decode), out)
        print(flush=True)
        # the cache holds everything before the reply's last generated token: the next turn feeds
        # the rest of the reply as the template has it (that token, unless it was the <eot>, and the
        # closing <eot>)
        content, closed = end_reply(tok, reply)
        pending = closed[max(len(reply) - 1, 0):]
        messages.append({'role': 'assistant', 'content': tok.decode(content)})


def main():
    cfg = configure()
    device, _, dtype, autocast = runtime(cfg.device, cfg.dtype)
    tok = load_tokenizer(cfg.tokenizer_path)
    path, why = checkpoint_path(cfg)
    model, _ = load_model(path, device, tok.sha256, cfg.lora_base, why, tok.path, tok)
    # sampling draws its noise on the model's device
    generator = torch.Generator(device).manual_seed(cfg.seed)
    try:
        if cfg.interactive:
            chat(cfg, model, tok, autocast, generator, notes_index(cfg))
        else:
            complete(cfg, model, tok, autocast, generator)
    except KeyboardInterrupt:  # Ctrl-C, wherever it lands: leave cleanly
        print()
    except BrokenPipeError:  # `sample.py ... | head`: the reader has what it wanted
        # (so the flush at exit is quiet too)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == '__main__':
    main()
