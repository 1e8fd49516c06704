"""
Stage 3b: preference pairs for DPO from your own dialogues: what the primer says against what your
model says now.

    python pairs.py config/notes.py        # -> out/notes/pairs.jsonl (after train.py's SFT)

For every assistant turn of the dialogues of a chat source (`pairs_from`, the primer), the model of
the config's checkpoint (as sample.py loads it) writes its own reply to the conversation before that
turn, sampled as chat samples (temperature, top_p, top_k, seed; with retrieval on, the notes that
match go in front of each message, as in chat). The primer's reply is `chosen`, the model's
`rejected`; a turn the model already answers word for word is left out (there is nothing to push),
and so is one it answers with nothing (an empty reply is not a reply to compare; a pairs source refuses
it).
DPO on these pairs (train.py with a mixture of a 'pairs' source reading the file) pushes the model
toward the primer's replies and away from its own mistakes.

The file is plain jsonl for you to read and edit: {"messages": [...], "chosen": "...", "rejected":
"...", "split": "train" | "val", "from": "<file> line <n>"}. A pair takes the split of the dialogue
it comes from, so DPO never trains on the primer's val dialogues: their pairs are its held-out ones,
and the primer's val bits per byte stay a fair measure of what SFT taught. Written to a temp file,
renamed when complete.
"""
import json
import os
import time

import torch

import sources
from chat import banned_ids, chat_prompt, reply_room
from checkpoint import load_configured
from common import Progress, atomic_file, check_writable, die, runtime
from configurator import configure
from retrieval import notes_index
from tokenizer import load_tokenizer


def dialogue_source(cfg):
    """The chat source whose dialogues give the pairs: pairs_from, or the first chat source of the
    mixture."""
    name = cfg.pairs_from
    if not name:
        chat = [n for n in cfg.mixture if n in cfg.sources and
                sources.source_settings(n, cfg.sources[n])['format'] == 'chat']
        if not chat:
            die("pairs.py makes pairs from the dialogues of a chat source: set pairs_from to one "
                f"(the sources are {', '.join(cfg.sources)})")
        name = chat[0]
    if name not in cfg.sources:
        die(f"pairs_from={name!r} is not one of the sources ({', '.join(cfg.sources)})")
    src = sources.source_settings(name, cfg.sources[name])
    if src['format'] != 'chat':
        die(f"pairs_from={name!r} is a {src['format']} source: name a source of dialogues (kind "
            "'primer' or 'chat')")
    return src


SAID = set()


def say_once(text):
    """chat's notes on a prompt cut to fit, each said once (not once per dialogue)."""
    if text not in SAID:
        SAID.add(text)
        print(f"({text})")


def reply(model, tok, messages, cfg, notes, generator, autocast):
    """The model's reply to a conversation ending with a user message, sampled as chat samples."""
    room = reply_room(cfg.max_new_tokens, model.cfg.block_size)
    _, ids = chat_prompt(tok, messages, model.cfg.block_size, room, notes, cfg.retrieve_k,
                         say_once)
    with autocast:
        new = list(model.generate(ids, room, cfg.temperature, cfg.top_k, cfg.top_p,
                                  banned=banned_ids(tok, model), stop={tok.eot_id},
                                  generator=generator))
    return tok.decode([t for t in new if t != tok.eot_id]).strip()


def main():
    cfg = configure()
    src = dialogue_source(cfg)
    out = cfg.pairs_out
    check_writable(os.path.dirname(os.path.abspath(out)), 'pairs_out')
    dialogues = list(sources.iter_documents(src))
    is_val = sources.val_flags(src, cfg.split_seed)
    turns = sum(m['role'] == 'assistant' for _, d, _ in dialogues for m in d)
    device, _, _, autocast = runtime(cfg.device, cfg.dtype)
    tok = load_tokenizer(cfg.tokenizer_path)
    model, ckpt, path = load_configured(cfg, tok, device)
    notes = notes_index(cfg)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    print(f"pairs: {len(dialogues)} dialogues of '{src['name']}' ({int(is_val.sum())} val), "
          f"{turns} replies, each against {path}'s own (step {ckpt['iter']}, temperature "
          f"{cfg.temperature:g}{', with retrieval' if notes else ''})")
    rows, same, empty = [], 0, 0
    progress = Progress('pairs', turns, every=5)
    t0 = time.time()
    for (where, messages, _), val in zip(dialogues, is_val):
        for i, m in enumerate(messages):
            if m['role'] != 'assistant':
                continue
            said = reply(model, tok, messages[:i], cfg, notes, generator, autocast)
            if not said:
                empty += 1
            elif ' '.join(said.split()) == ' '.join(m['content'].split()):
                same += 1  # it already says the primer's reply: nothing to prefer
            else:
                rows.append({'messages': messages[:i], 'chosen': m['content'], 'rejected': said,
                             'split': 'val' if val else 'train', 'from': where})
            progress(len(rows) + same + empty)
    if not rows:
        die(f"the model already answers every turn of '{src['name']}' as it does: no pairs to make")
    with atomic_file(out, 'w') as f:
        f.write(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))
    val = sum(r['split'] == 'val' for r in rows)
    print(f"wrote {out}: {len(rows)} pairs ({val} from val dialogues, held out), {same + empty} "
          f"turns left out ({same} the model answers as the primer does, {empty} it answers with "
          f"nothing), in {time.time() - t0:.0f} s. "
          f"Read and edit it; then train on it with a source {{'kind': 'pairs', 'path': "
          f"'{out}'}} (config/notes_dpo.py)")


if __name__ == '__main__':
    main()
