"""
Stage 4: talk to a trained model.

    python sample.py config/demo.py --start="the garden" --num_samples=3   # completion
    python sample.py config/demo.py --phase=sft --interactive               # chat

Text is streamed as it is generated, one token at a time, through an incremental UTF-8 decoder so
that a character split over several byte tokens is printed only once it is whole.

Chat on a terminal edits lines with readline (arrow keys, and up/down for earlier messages of the
session). With piped stdin it is a line protocol for programs: one message per input line, one reply
per output line (a newline inside a reply is written as the two characters \\n, a backslash as
\\\\), and status lines such as "(conversation reset)" go to stderr. With retrieval on
(config/notes.py), /notes shows the notes the model was given with your last message.
"""
import codecs
import os
import sys

import torch

from chat import (banned_ids, compile_decode, completion_prompt, fit_history, fit_system,
                  reply_room)
from checkpoint import load_configured
from common import die, runtime
from configurator import configure
from model import KVCache
from retrieval import notes_index, with_notes
from tokenizer import (clean, end_reply, load_tokenizer, past_vocab, render_conversation,
                       render_user_turn, system_prompt)


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
    prompt = completion_prompt(tok, start, model.cfg.block_size, cfg.max_new_tokens)
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


def chat(cfg, model, tok, autocast, generator, notes=None):
    """A multi-turn REPL. The KV cache holds the conversation so far, so each turn only feeds the
    new user message; when the conversation outgrows the context, the oldest turns are dropped (the
    system prompt stays) and the rest is read again (fit_history)."""
    configured = system_prompt(cfg)  # the one export.py writes into the model's chat templates
    banned = banned_ids(tok, model, cfg.allow_special)
    block = model.cfg.block_size
    room = reply_room(cfg.max_new_tokens, block)
    system = fit_system(tok, configured, block - room)
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
    shown = None  # that message as the model read it, the notes in front of it
    if tty:
        print("chat: type a message; /reset, /system <text> (bare /system: the configured one), "
              "/notes (what the model was shown with your last message), /quit (or Ctrl-D)")
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
        if text == '/notes':
            # why did it answer that? the notes it read ("i don't know" often means the answer
            # was not among them); on stderr, beside the other status lines
            if notes is None:
                print("(retrieval is off: the model reads your messages as typed)", file=sys.stderr)
            elif shown is None:
                print("(no message yet)", file=sys.stderr)
            else:
                print(f"(your last message as the model read it:)\n{shown}\n(end)", file=sys.stderr)
            continue
        if text in ('/reset', '/system') or text.startswith('/system '):
            status = "conversation reset"
            if text.startswith('/system'):
                asked = text[len('/system'):].strip() or configured
                status = ("configured system prompt restored, " if asked == configured
                          else "system prompt set, ") + status
                system = fit_system(tok, asked, block - room)
            messages = [{'role': 'system', 'content': system}]
            pending = render_conversation(tok, messages)[0]
            previous, shown = '', None
            cache.reset()
            # not on stdout, where a program reads one reply per line
            print(f"({status})", file=sys.stderr)
            continue
        # with retrieval on, the model reads the message with the notes that match it (and the
        # message before it), as its SFT rows showed it (retrieval.py)
        content = with_notes(notes, text, cfg.retrieve_k, previous)
        previous, shown = text, content
        messages.append({'role': 'user', 'content': content})
        pending = pending + render_user_turn(tok, content)
        if cache.pos + len(pending) + room > block:
            messages, pending = fit_history(tok, messages, block - room)
            cache.reset()
            if messages[-1]['content'] != content:
                print(f"(the message is longer than the context holds: the model reads its last "
                      f"{len(tok.encode(messages[-1]['content']))} tokens)", file=sys.stderr)
        with autocast:
            reply = stream(tok, model.generate(pending, room, cfg.temperature, cfg.top_k,
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
    device, _, _, autocast = runtime(cfg.device, cfg.dtype)
    tok = load_tokenizer(cfg.tokenizer_path)
    model, _, _ = load_configured(cfg, tok, device)
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
