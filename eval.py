"""
Stage 5: how good is a checkpoint?

    python eval.py config/demo.py                      # every prepared val split + smoke prompts
    python eval.py config/prod_pretrain.py --boolq=download --hellaswag=download
    python eval.py config/prod_sft.py --eval_chat=True --boolq=path/to/dev.jsonl
    python eval.py config/demo.py --text_file=some.txt

- Val splits (or --text_file): mean loss per target token (summed over tokens, not averaged over
  batch means; every target, control tokens included), perplexity, and bits per byte = the summed
  nats of the text targets / (ln 2 x their UTF-8 bytes): control tokens (<s>, <|eot|>) have no bytes
  and count in neither. Bits per byte compares models with different tokenizers. The set is fixed
  (the first eval_tokens tokens of each split, in order), so numbers compare across checkpoints.
- Preference pairs (a val split of pairs, DPO's data): how often the model finds the chosen reply
  more likely than the rejected one (summed log-probability of the reply, as DPO compares them),
  by how many nats on average, and how often per token (the sum favours short replies): held-out
  pair accuracy without a reference, before and after DPO alike.
- BoolQ (passage, question, yes/no answer): zero-shot, the answer whose continuation (" yes" or
  " no") has the higher log-likelihood, beside the majority-class and always-no baselines on the
  same examples (each with its standard error).
- HellaSwag (context, four endings), as lm-evaluation-harness scores it: the context is
  "activity_label: ctx_a Ctx_b", context and endings cleaned of WikiHow's [title]/[header] marks,
  each ending scored after a space by summed log-prob (acc) and log-prob per character (acc_norm),
  each with its standard error; random is 25%.
- Benchmark rows are all checked (the fields: 'What a row ... must hold', below) before the model is
  loaded.
- --eval_chat=True asks the same questions through the chat template (for SFT checkpoints).
- --questions: a file of questions about your notes, each scored right when the answer holds its
  keywords (with retrieval, also whether the notes shown held them); --compare_with=<an earlier
  eval_results.json>: the questions gained and lost against that run, and a sign test of whether
  the difference is more than chance; --oracle_notes=True: each question shown only the chunk that
  holds its answer (would better retrieval help?).
- A fixed list of prompts answered greedily, printed and saved.
Results go to eval_results.json and eval_results.md beside the checkpoint (or in eval_out).
"""
import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

import download
import files
import sources
from chat import banned_ids, chat_prompt, reply_room
from checkpoint import checkpoint_path, load_model
from common import Progress, atomic_file, check_writable, die, runtime
from configurator import configure
from data import (bits_per_byte, is_prepared, load_split, loss_sums, pair_sequences,
                  split_sequences, windows)
from retrieval import notes_index, shown, with_notes
from tokenizer import load_tokenizer, render_for_reply, system_prompt

HF = download.HF_DATASETS
BENCHMARK_URLS = {'boolq': f'{HF}/google/boolq/resolve/main/data/validation-00000-of-00001.parquet',
                  'hellaswag': f'{HF}/Rowan/hellaswag/resolve/main/data/validation-00000-of-00001.parquet'}
SMOKE_PROMPTS = ["The capital of France is", "Once upon a time, there was a",
                 "To fix a flat tyre, first",
                 "The best way to learn is", "Water boils at", "My favourite book is"]
SMOKE_QUESTIONS = ["who are you?", "what is 2 + 2?", "what is the capital of france?",
                   "tell me a joke.", "how do i fix a flat tyre?", "what did you do today?"]


# ----------------------------------------------------------------------------------------------
# Loss, perplexity, bits per byte

@torch.no_grad()
def position_nats(model, sequences, autocast, device, batch_size, progress=None):
    """Score (ids, targets) pairs batch by batch: position i predicts targets[i]; -1 marks a
    position without a target. Sequences are at most block_size long. Yields y (B, T) the targets
    and nats (B, T) the loss at each position (0 where there is no target)."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        for i, (ids, targets) in enumerate(chunk):
            x[i, :len(ids)] = torch.as_tensor(ids)
            y[i, :len(targets)] = torch.as_tensor(targets)
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, _ = model(x)
        nats = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction='none')
        yield y, nats
        if progress:
            progress(start + len(chunk))


def score_sequences(model, sequences, autocast, device, batch_size, progress=None):
    """Sum of target nats and number of targets of each (ids, targets) pair (see position_nats)."""
    return [(float(n.sum()), int((t != -1).sum()))
            for y, nats in position_nats(model, sequences, autocast, device, batch_size, progress)
            for n, t in zip(nats, y)]


def split_metrics(model, tok, sequences, autocast, device, batch_size, label):
    """Mean loss per target token, perplexity and bits per byte over (ids, targets) sequences
    (data.loss_sums, as train.py's evaluation computes them)."""
    # special tokens: 0 bytes
    token_bytes = torch.tensor([len(b) for b in tok.id_bytes], device=device)
    # nats, targets, nats of text targets, their bytes
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    progress = Progress(label, len(sequences), every=5)
    for y, nats in position_nats(model, sequences, autocast, device, batch_size, progress):
        sums += torch.stack(loss_sums(nats, y, token_bytes)).double()
    nats, n, text_nats, n_bytes = sums.tolist()
    if n == 0:
        die(f"{label}: nothing to evaluate (no target tokens)")
    return {'tokens': int(n), 'bytes': int(n_bytes), 'loss': nats / n,
            'perplexity': math.exp(nats / n),
            'bits_per_byte': bits_per_byte(text_nats, n_bytes) if n_bytes else None}


def pair_metrics(model, pairs, autocast, device, batch_size, label):
    """Held-out preference pairs [(chosen, rejected)] of (ids, targets) sequences: the share where
    the chosen reply is the more likely (fewer summed nats), and the mean margin in nats."""
    if not pairs:
        die(f"{label}: no pairs to evaluate")
    flat = [seq for pair in pairs for seq in pair]
    scores = score_sequences(model, flat, autocast, device, batch_size,
                             Progress(label, len(flat), every=5))
    margins = [r[0] - c[0] for c, r in zip(scores[0::2], scores[1::2])]  # rejected - chosen nats
    # per token: a long reply has more nats however good it is (the sum favours the shorter one)
    per_token = [r[0] / r[1] - c[0] / c[1] for c, r in zip(scores[0::2], scores[1::2])]
    return {'pairs': len(pairs), 'accuracy': sum(m > 0 for m in margins) / len(pairs),
            'margin_nats': sum(margins) / len(pairs),
            'accuracy_per_token': sum(m > 0 for m in per_token) / len(pairs)}


# ----------------------------------------------------------------------------------------------
# Multiple-choice benchmarks: the log-likelihood of each continuation after a prompt

# What a row of each benchmark file must hold (the public files have more fields; they are ignored):
# boolq question, passage: strings; answer: true or false (a JSON boolean, not the string "false")
#   hellaswag  activity_label, ctx_a, ctx_b: strings; endings: a list of at least 2 strings;
#              label: the index of the right ending (0, 1, ... as a number or a string of digits)
def got(value):
    return f"got {type(value).__name__} {value!r:.60}"


def boolq_problem(row):
    for field in ('question', 'passage'):
        if not isinstance(row[field], str):
            return f"field {field!r} must be a string, {got(row[field])}"
    if not isinstance(row['answer'], bool):
        return f"field 'answer' must be true or false (a JSON boolean), {got(row['answer'])}"


def hellaswag_problem(row):
    for field in ('activity_label', 'ctx_a', 'ctx_b'):
        if not isinstance(row[field], str):
            return f"field {field!r} must be a string, {got(row[field])}"
    endings, label = row['endings'], row['label']
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str)
                                                                    for e in endings):
        return f"field 'endings' must be a list of at least 2 strings, {got(endings)}"
    if isinstance(label, str) and label.isdigit():
        label = int(label)  # the parquet files store it as a string
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(endings)):
        return (f"field 'label' must be the index of the right ending, 0 to {len(endings) - 1}, "
                f"{got(label)}")
    row['label'] = label


def questions_problem(row):
    if not isinstance(row['question'], str) or not row['question'].strip():
        return f"field 'question' must be a non-empty string, {got(row['question'])}"
    groups = row['keywords']
    if not (isinstance(groups, list) and groups and all(
            isinstance(g, list) and g and all(isinstance(w, str) and w.strip() for w in g)
            for g in groups)):
        return ("field 'keywords' must be a list of groups, each a list of words or phrases "
                f"(an answer is right when it holds one of every group), {got(groups)}")
    if not isinstance(row.get('kind', ''), str):
        return f"field 'kind' must be a string such as 'fact' or 'unknown', {got(row['kind'])}"
    if row.get('system') is not None and not (isinstance(row['system'], str)
                                              and row['system'].strip()):
        return ("field 'system' (the system prompt to ask this question under, instead of the "
                f"config's) must be a non-empty string, {got(row['system'])}")


BENCHMARKS = {'boolq': (('question', 'passage', 'answer'), boolq_problem),
              'hellaswag': (('activity_label', 'ctx_a', 'ctx_b', 'endings', 'label'),
                            hellaswag_problem),
              'questions': (('question', 'keywords'), questions_problem)}


def read_rows(path, what):
    """Every row of a benchmark file (.jsonl or .parquet), each checked before any model work: a bad
    row stops the run naming the file, the row and the field."""
    if not os.path.isfile(path):
        die(f"{what}: cannot read {path}: no such file (give a path, or 'download')")
    if path.endswith('.parquet'):
        table = sources.parquet(path).read().to_pylist()
        rows = [(f"row {n}", row) for n, row in enumerate(table, 1)]
    else:
        rows = [(f"line {n}", row) for n, row in files.read_jsonl(path, None)]
    if not rows:
        die(f"{what}: {path} has no rows: is it the right file? (it should be the {what} "
            f"validation "
            "set)")
    fields, problem = BENCHMARKS[what]
    for where, row in rows:
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        why = f"has no field {missing[0]!r}" if missing else problem(row)
        if why:
            die(f"{what}: {path} {where} {why} (a {what} row has {', '.join(fields)}; see README, "
                "Evaluation)")
    return [row for _, row in rows]


def benchmark_file(spec, name):
    """'download' (the public file), a URL, or a local path."""
    if spec == 'download':
        spec = BENCHMARK_URLS[name]
    if spec.startswith(('http://', 'https://')):
        return download.fetch(spec, label=name)
    return spec


def continuation_logprobs(model, pairs, autocast, device, batch_size, label, head=1):
    """(summed log-prob, tokens) of each continuation given its prompt. A prompt too long for the
    context loses tokens after its first `head` (<s>, and <|usr|> in chat), so it still starts as
    trained; a continuation longer than the context is scored on its first block_size tokens."""
    T = model.cfg.block_size
    seqs = []
    for prompt, cont in pairs:
        cont = cont[:T]
        room = T + 1 - len(cont)
        if len(prompt) > room:
            keep_head = min(head, room - 1)
            prompt = prompt[:keep_head] + prompt[len(prompt) - (room - keep_head):]
        ids = prompt + cont
        seqs.append((ids[:-1], [-1] * (len(prompt) - 1) + cont))
    return [(-nats, n) for nats, n in score_sequences(model, seqs, autocast, device, batch_size,
                                                        Progress(label, len(seqs), every=5))]


def prompt_ids(tok, text, chat):
    if chat:
        return render_for_reply(tok, [{'role': 'user', 'content': text}])
    return [tok.bos_id] + tok.encode(text)


def boolq(model, tok, rows, chat, autocast, device, batch_size):
    """Zero-shot BoolQ: is log p(yes) > log p(no) after one fixed prompt?"""
    pairs = []
    for r in rows:
        text = f"{r['passage']}\nQuestion: {r['question'].rstrip('?')}?\nAnswer"
        prompt = prompt_ids(tok, text + (" yes or no?" if chat else ':'), chat)
        # a chat reply starts right after <|asst|>; text after "Answer:" with a space
        for answer in ('yes', 'no'):
            pairs.append((prompt, tok.encode(answer if chat else ' ' + answer)))
    scores = continuation_logprobs(model, pairs, autocast, device, batch_size, 'boolq',
                                   head=2 if chat else 1)
    truth = [r['answer'] for r in rows]
    predicted = [scores[2 * i][0] > scores[2 * i + 1][0] for i in range(len(rows))]
    n = len(rows)
    acc = sum(p == t for p, t in zip(predicted, truth)) / n
    yes = sum(truth) / n
    majority, always_no = max(yes, 1 - yes), 1 - yes
    return {'n': n, 'acc': acc, 'stderr': stderr(acc, n), 'majority_baseline': majority,
            'majority_stderr': stderr(majority, n), 'always_no': always_no,
            'always_no_stderr': stderr(always_no, n), 'predicted_yes': sum(predicted) / n}


def stderr(p, n):
    """Standard error of an accuracy p measured on n examples (a binomial proportion)."""
    return math.sqrt(p * (1 - p) / n)


def hellaswag_clean(text):
    """lm-evaluation-harness's cleaning of HellaSwag text (its WikiHow half has [title] and [header]
    marks)."""
    text = text.strip().replace(' [title]', '. ')
    text = re.sub(r'\[.*?\]', '', text)
    return text.replace('  ', ' ')


def hellaswag_context(row):
    """The context as lm-evaluation-harness builds it: 'activity_label: ctx_a Ctx_b', cleaned."""
    return hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")


def hellaswag(model, tok, rows, chat, autocast, device, batch_size):
    """Pick the ending with the highest log-prob (acc) and log-prob per character of the ending
    (acc_norm), scored as lm-evaluation-harness does: the same context and endings, the ending after
    a space."""
    pairs, lengths = [], []
    for r in rows:
        prompt = prompt_ids(tok, ("Continue: " if chat else '') + hellaswag_context(r), chat)
        for ending in map(hellaswag_clean, r['endings']):
            pairs.append((prompt, tok.encode(ending if chat else ' ' + ending)))
            lengths.append(len(ending))
    scores = continuation_logprobs(model, pairs, autocast, device, batch_size, 'hellaswag',
                                   head=2 if chat else 1)
    acc = acc_norm = 0
    start = 0
    for r in rows:
        k = len(r['endings'])
        s = [scores[start + j][0] for j in range(k)]
        norm = [s[j] / max(1, lengths[start + j]) for j in range(k)]
        start += k
        acc += int(np.argmax(s)) == r['label']
        acc_norm += int(np.argmax(norm)) == r['label']
    n = len(rows)
    return {'n': n, 'acc': acc / n, 'stderr': stderr(acc / n, n), 'acc_norm': acc_norm / n,
            'acc_norm_stderr': stderr(acc_norm / n, n),
            'random_baseline': sum(1 / len(r['endings']) for r in rows) / n}


# ----------------------------------------------------------------------------------------------
# Questions about the notes, asked through chat (with retrieval when the config has it) and scored
# by keywords: right when the answer, lowercased, holds one alternative of every keyword group

IDK = ("don't know", "do not know", "dont know", "not sure", "no idea")


def ask(model, tok, system, content, autocast, max_new_tokens=64):
    """One question, alone in a fresh chat (the system prompt, the message), answered greedily,
    its prompt built and fitted as chat's (chat.chat_prompt: a message too long keeps its end,
    where the question is)."""
    max_new_tokens = reply_room(max_new_tokens, model.cfg.block_size)
    _, ids = chat_prompt(tok, [{'role': 'system', 'content': system},
                               {'role': 'user', 'content': content}], model.cfg.block_size,
                         max_new_tokens)
    stop = {tok.eot_id}
    banned = banned_ids(tok, model)
    with autocast:
        new = list(model.generate(ids, max_new_tokens, temperature=0, stop=stop, banned=banned))
    return tok.decode([t for t in new if t not in stop]).strip()


def holds(text, groups):
    """Does text hold one of every group of keywords (any case)?"""
    text = text.lower()
    return all(any(w.lower() in text for w in group) for group in groups)


def questions(model, tok, rows, system, notes, k, autocast, oracle=False):
    """Each row asked (retrieval.with_notes when notes is an index) under the config's system
    prompt, or the row's own ('system': does the model follow one it was not tuned on?); per
    kind: right / asked. With retrieval, also whether the notes shown held the answer's keywords
    (`in_notes`, for the questions the notes answer): a wrong answer with the answer in front of
    the model is a reading failure, one without it a finding failure (chunking, retrieve_k).
    oracle: each question the notes answer is shown only the best-ranked chunk that holds its
    keywords (as if retrieval were perfect; those no single chunk answers as retrieval shows them):
    if the model gets no more right this way, better finding cannot help it, only better reading."""
    answers, by_kind = [], {}
    progress = Progress('questions', len(rows), every=5)
    for i, row in enumerate(rows):
        content = with_notes(notes, row['question'], k)
        if oracle and row.get('kind') != 'unknown':
            # the best-ranked chunk that holds the answer, else the first of the others that does
            order = notes.ranked(row['question']) + list(range(len(notes.chunks)))
            best = next((j for j in order if holds(notes.chunks[j], row['keywords'])), None)
            content = content if best is None else shown([notes.chunks[best]], row['question'])
        answer = ask(model, tok, row.get('system') or system,  # (null in a parquet row: none)
                     content, autocast)
        text = answer.lower()
        a = {'id': row.get('id', i + 1), 'kind': row.get('kind', ''), 'question': row['question'],
             'answer': answer, 'right': holds(answer, row['keywords']),
             'said_idk': any(w in text for w in IDK)}
        if notes is not None and a['kind'] != 'unknown':
            in_front = content[:content.rfind(row['question'])]  # the notes, not the question
            a['in_notes'] = holds(in_front, row['keywords'])
        answers.append(a)
        kind = by_kind.setdefault(row.get('kind', '') or 'all', [0, 0])
        kind[0] += a['right']
        kind[1] += 1
        progress(i + 1)
    return {'n': len(rows), 'right': sum(a['right'] for a in answers), 'by_kind': by_kind,
            'idk_on_answerable': sum(a['said_idk'] for a in answers if a['kind'] != 'unknown'),
            'answers': answers}


def questions_line(r):
    kinds = ', '.join(f"{kind} {right}/{n}" for kind, (right, n) in r['by_kind'].items())
    line = (f"{r['right']}/{r['n']} right ({100 * r['right'] / r['n']:.0f}%: {kinds}); "
            f"\"i don't know\" to {r['idk_on_answerable']} answerable")
    found = [a for a in r['answers'] if 'in_notes' in a]
    if found:
        shown = [a for a in found if a['in_notes']]
        line += (f"; the answer was in the notes shown for {len(shown)} of {len(found)} "
                 f"answerable, and right for {sum(a['right'] for a in shown)} of those")
    return line


def earlier_answers(path):
    """The answers of an earlier eval_results.json (--compare_with), read before any model work."""
    if not os.path.isfile(path):
        die(f"--compare_with: cannot read {path}: no such file (give the eval_results.json of an "
            "earlier `eval.py --questions=...` run)")
    try:
        with open(path, encoding='utf-8') as f:
            earlier = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        die(f"--compare_with: {path} is not a JSON file ({e}): give an eval_results.json")
    asked = earlier.get('questions') if isinstance(earlier, dict) else None
    answers = asked.get('answers') if isinstance(asked, dict) else None
    if not isinstance(answers, list) or not all(
            isinstance(a, dict) and isinstance(a.get('question'), str)
            and isinstance(a.get('right'), bool) for a in answers):
        die(f"--compare_with: {path} holds no scored questions: give the eval_results.json of a "
            "run with --questions")
    return {a['question']: a['right'] for a in answers}


def compared(r, earlier, path):
    """Questions gained and lost against an earlier run, and whether that is more than chance.

    Two fine-tunes that differ in one setting (or only in their seed) get different questions
    right, several each way, so a difference of a question or two in the totals says little. The
    sign test (McNemar's exact test) asks: if the change did nothing, each question that one run
    gets right and the other wrong would be a coin toss; how likely is a split at least this
    lopsided? p is that chance (two-sided); below ~0.05, the change is more than noise."""
    both = [a for a in r['answers'] if a['question'] in earlier]
    gained = [a for a in both if a['right'] and not earlier[a['question']]]
    lost = [a for a in both if not a['right'] and earlier[a['question']]]
    n, least = len(gained) + len(lost), min(len(gained), len(lost))
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(least + 1)) / 2 ** n) if n else 1.0
    return {'with': path, 'asked_in_both': len(both),
            'earlier_right': sum(earlier[a['question']] for a in both),
            'gained': [a['id'] for a in gained], 'lost': [a['id'] for a in lost], 'p': p}


def compared_line(c):
    return (f"against {c['with']} ({c['earlier_right']}/{c['asked_in_both']} on the same "
            f"questions): {len(c['gained'])} gained, {len(c['lost'])} lost; sign test p = "
            f"{c['p']:.2f} ({'more than' if c['p'] < 0.05 else 'within'} what chance moves)")


# ----------------------------------------------------------------------------------------------

def smoke(model, tok, chat, autocast, max_new_tokens=48):
    """A fixed list of prompts answered greedily (with the KV cache)."""
    out = []
    for prompt in (SMOKE_QUESTIONS if chat else SMOKE_PROMPTS):
        ids = prompt_ids(tok, prompt, chat)
        stop = {tok.eot_id} if chat else {tok.bos_id, tok.eos_id}
        with autocast:
            new = list(model.generate(ids, max_new_tokens, temperature=0, stop=stop,
                                      banned=banned_ids(tok, model, allow_special=not chat)))
        text = tok.decode([t for t in new if t not in stop])
        out.append({'prompt': prompt, 'output': text})
        shown = text.strip()[:300].replace('\n', '\n    ')
        print(f"  > {prompt}\n    {shown}")
    return out


def benchmark_line(name, r):
    """acc ± its standard error, beside what it must beat (each baseline with its own standard
    error)."""
    if name == 'boolq':
        return (f"acc {r['acc']:.3f} ± {r['stderr']:.3f}; "
                f"majority {r['majority_baseline']:.3f} ± {r['majority_stderr']:.3f}, "
                f"always-no {r['always_no']:.3f} ± {r['always_no_stderr']:.3f}")
    return (f"acc {r['acc']:.3f} ± {r['stderr']:.3f}, acc_norm {r['acc_norm']:.3f} ± "
            f"{r['acc_norm_stderr']:.3f}; random {r['random_baseline']:.3f}")


def markdown(results):
    lines = [f"# eval of {results['ckpt']} (step {results['iter']})", '',
             '| data | tokens | loss | perplexity | bits/byte |', '|---|---|---|---|---|']
    for name, m in results['splits'].items():
        bpb = f"{m['bits_per_byte']:.4f}" if m['bits_per_byte'] is not None else '-'
        lines.append(f"| {name} | {m['tokens']:,} | {m['loss']:.4f} | {m['perplexity']:.2f} | "
                     f"{bpb} "
                     "|")
    for name, r in results.get('pairs', {}).items():
        lines += ['', f"**{name}** (held-out pairs, n={r['pairs']}): the chosen reply is the more "
                      f"likely in {100 * r['accuracy']:.1f}%, by {r['margin_nats']:.2f} nats on "
                      f"average; per token in {100 * r['accuracy_per_token']:.1f}%"]
    for name in ('boolq', 'hellaswag'):
        if name in results:
            r = results[name]
            lines += ['', f"**{name}** (n={r['n']}): {benchmark_line(name, r)}"]
    if 'questions' in results:
        oracle = ' (each shown the chunk that holds its answer: oracle_notes)' if results[
            'questions'].get('oracle_notes') else ''
        lines += ['', f"**questions**{oracle}: {questions_line(results['questions'])}"]
        if 'compared' in results['questions']:
            lines += ['', compared_line(results['questions']['compared'])]
    return '\n'.join(lines) + '\n'


def main():
    cfg = configure()
    download.setup(cfg)
    # every input is read and checked before the model is: a bad row or an unwritable folder costs
    # nothing
    limit = lambda rows: rows[:cfg.eval_limit] if cfg.eval_limit else rows
    benchmarks = {name: limit(read_rows(benchmark_file(spec, name), name))
                  for name, spec in (('boolq', cfg.boolq), ('hellaswag', cfg.hellaswag)) if spec}
    asked = limit(read_rows(cfg.questions, 'questions')) if cfg.questions else None
    if cfg.compare_with and not asked:
        die("--compare_with compares the answers to --questions: give --questions too")
    earlier = earlier_answers(cfg.compare_with) if cfg.compare_with else None
    notes = notes_index(cfg) if asked else None  # (retrieval, when the config has it)
    if cfg.oracle_notes and notes is None:
        need = 'a config with retrieval (retrieve_from)' if asked else '--questions too'
        die("--oracle_notes shows each of --questions only the chunk of the notes that holds its "
            f"answer: give {need}")
    text = None
    if cfg.text_file:
        if not os.path.isfile(cfg.text_file):
            die(f"--text_file: cannot read {cfg.text_file}: no such file")
        try:
            text = open(cfg.text_file, encoding='utf-8-sig').read()
        except UnicodeDecodeError as e:
            die(f"--text_file: {cfg.text_file} is not valid UTF-8 (byte {e.start})")
    device, _, dtype, autocast = runtime(cfg.device, cfg.dtype)
    tok = load_tokenizer(cfg.tokenizer_path)
    path, why = checkpoint_path(cfg)
    out_dir = cfg.eval_out or os.path.dirname(os.path.abspath(path))
    check_writable(out_dir, 'eval_out')
    model, ckpt = load_model(path, device, tok.sha256, cfg.lora_base, why, tok.path, tok)
    T, B = model.cfg.block_size, cfg.batch_size
    results = {'ckpt': path, 'iter': ckpt['iter'], 'model_args': ckpt['model_args'],
               'tokenizer_sha256': tok.sha256, 'chat': cfg.eval_chat, 'splits': {}}
    print(f"eval: {path} (step {ckpt['iter']}; {why}) on {device} {dtype}")

    if text is not None:
        ids = [tok.bos_id] + tok.encode(text)[:cfg.eval_tokens]
        metrics = split_metrics(model, tok, windows(ids, T), autocast, device, B, cfg.text_file)
        results['splits'][os.path.basename(cfg.text_file)] = metrics
    else:
        names = cfg.eval_sources if cfg.eval_sources is not None else [
            n for n in cfg.sources if is_prepared(cfg.data_dir, n, 'val')]
        for name in names:
            if load_split(cfg.data_dir, name, 'val')['format'] == 'pairs':
                pairs = pair_sequences(cfg, tok, name, T)
                results.setdefault('pairs', {})[name] = r = pair_metrics(
                    model, pairs, autocast, device, B, f"{name}/val")
                print(f"{name}: the chosen reply is the more likely in {100 * r['accuracy']:.1f}% "
                      f"of {r['pairs']} held-out pairs (by {r['margin_nats']:.2f} nats on "
                      f"average), per token in {100 * r['accuracy_per_token']:.1f}%")
                continue
            seqs = split_sequences(cfg, tok, name, T)
            if seqs:
                results['splits'][name] = split_metrics(model, tok, seqs, autocast, device, B,
                                                        f"{name}/val")
                # a chat split is scored on the replies: train.py's pretraining val reads the same
                # source as text, every token, so its figure for it differs
                chat = load_split(cfg.data_dir, name, 'val')['format'] == 'chat'
                results['splits'][name]['scored'] = 'assistant replies' if chat else 'every token'
    for name, m in results['splits'].items():
        scored = f", {m['scored']}" if 'scored' in m else ''
        print(f"{name}: loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, bits/byte "
              f"{m['bits_per_byte']:.4f} ({m['tokens']:,} tokens{scored})")

    for name, rows in benchmarks.items():
        score = boolq if name == 'boolq' else hellaswag
        results[name] = r = score(model, tok, rows, cfg.eval_chat, autocast, device, B)
        print(f"{name} (n={r['n']}): {benchmark_line(name, r)}")
    if asked:
        results['questions'] = r = questions(model, tok, asked, system_prompt(cfg), notes,
                                             cfg.retrieve_k, autocast, cfg.oracle_notes)
        r['oracle_notes'] = cfg.oracle_notes
        how = (", each shown the chunk that holds its answer (oracle_notes)" if cfg.oracle_notes
               else ', with retrieval' if notes else '')
        print(f"questions ({cfg.questions}{how}): {questions_line(r)}")
        for a in r['answers']:
            missing = ' (its answer not in the notes shown)' if a.get('in_notes') is False else ''
            print(f"  {'+' if a['right'] else '-'} [{a['kind']}] {a['question']}{missing}\n"
                  f"      {a['answer'][:200]!r}")
        if earlier is not None:
            r['compared'] = c = compared(r, earlier, cfg.compare_with)
            print(compared_line(c))
            for word, ids in (('gained', c['gained']), ('lost', c['lost'])):
                for a in r['answers']:
                    if a['id'] in ids:
                        print(f"  {word}: [{a['kind']}] {a['question']}")
    print("smoke prompts (greedy):")
    results['smoke'] = smoke(model, tok, cfg.eval_chat, autocast)

    with atomic_file(os.path.join(out_dir, 'eval_results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    with atomic_file(os.path.join(out_dir, 'eval_results.md'), 'w') as f:
        f.write(markdown(results))
    print(f"\n{markdown(results)}\nwrote {os.path.join(out_dir, 'eval_results.json')} and "
          "eval_results.md")


if __name__ == '__main__':
    main()
