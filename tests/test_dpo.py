"""DPO: the loss against a hand computation, preference pairs as a source (ours, TRL's layout, HH-RLHF), packing,
train.py's DPO phase (frozen reference, LoRA with adapters off, resume, DDP), pairs.py and eval.py's held-out pairs."""
import gzip
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, WORDS, load_cfg, metrics, run, tiny_train_config

import dpo
from model import GPT, ModelConfig, adapters_off


# ------------------------------------------------------------------------------------------------------------------
# The loss


def hand_logp(model, ids, targets):
    """Summed log-probability of the targets of one sequence, position by position, nothing packed."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    total = 0.0
    for i, t in enumerate(targets):
        if t != -1:
            total += torch.log_softmax(logits[0, i].double(), -1)[t].item()
    return total


def test_the_loss_of_packed_pairs_is_the_hand_computed_one():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=16)
    policy, reference = GPT(cfg).eval(), GPT(cfg).eval()
    rng = random.Random(0)
    # row 0: two pairs; row 1: one pair and padding. A sequence: a prompt (no targets) then a reply (targets)
    seq = lambda n_prompt, n_reply: ([rng.randrange(40) for _ in range(n_prompt + n_reply)], n_prompt)
    rows = [[seq(3, 4), seq(3, 2), seq(2, 5), seq(2, 3)], [seq(4, 6), seq(4, 3)]]
    T, beta = 30, 0.3
    x = torch.zeros(2, T, dtype=torch.long)
    y = torch.full((2, T), -1)
    doc = torch.full((2, T), -1)
    for r, row in enumerate(rows):
        at = 0
        for d, (ids, n_prompt) in enumerate(row):
            n = len(ids)
            x[r, at:at + n] = torch.tensor(ids)
            # position i predicts token i + 1 of the same sequence: targets on the reply's tokens only
            y[r, at + n_prompt - 1:at + n - 1] = torch.tensor(ids[n_prompt:])
            doc[r, at:at + n] = d
            at += n
    with torch.no_grad():
        pol = dpo.sequence_logps(policy(x, doc_ids=doc)[0], y, doc)
        ref = dpo.sequence_logps(reference(x, doc_ids=doc)[0], y, doc)
    loss, right, margin, pairs = dpo.pair_sums(pol, ref, doc, beta)
    expected = []
    for row in rows:
        lp = [[hand_logp(m, ids, [-1] * (n_prompt - 1) + ids[n_prompt:]) for ids, n_prompt in row]
              for m in (policy, reference)]
        for j in range(0, len(row), 2):
            z = beta * ((lp[0][j] - lp[1][j]) - (lp[0][j + 1] - lp[1][j + 1]))
            n_reply = len(row[j][0]) - row[j][1]
            expected.append((z, -lp[0][j] / n_reply))  # and the chosen reply's nats per token
    assert pairs.item() == 3
    dpo_loss = sum(-math.log(1 / (1 + math.exp(-z))) for z, _ in expected)
    assert loss.item() == pytest.approx(dpo_loss, rel=1e-4)
    assert margin.item() == pytest.approx(sum(z for z, _ in expected), rel=1e-4, abs=1e-5)
    assert right.item() == sum(z > 0 for z, _ in expected)
    # with SFT's loss on the chosen replies added (RPO)
    with_sft, *_ = dpo.pair_sums(pol, ref, doc, beta, 0.5, dpo.sequence_counts(y, doc))
    assert with_sft.item() == pytest.approx(dpo_loss + 0.5 * sum(nll for _, nll in expected), rel=1e-4)
    # the same model as policy and reference: every reward 0, the loss log 2 per pair, nothing "right"
    loss, right, margin, _ = dpo.pair_sums(ref, ref, doc, beta)
    assert loss.item() == pytest.approx(3 * math.log(2)) and right.item() == 0 and margin.item() == 0
    assert dpo.pairs_in(doc.numpy()) == 3


# ------------------------------------------------------------------------------------------------------------------
# Pairs as a source


def write_jsonl(path, rows, gz=False):
    with (gzip.open if gz else open)(path, 'wt', encoding='utf-8') as f:
        f.write(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))
    return str(path)


def read_source(kind, path):
    import sources
    src = sources.source_settings('p', {'kind': kind, 'path': path})
    stats = {}
    import collections
    stats = collections.Counter()
    return [(where, doc, split) for where, doc, split in sources.iter_documents(src, stats)], stats


USER = [{'role': 'user', 'content': 'is the sea cold?'}]


@pytest.mark.parametrize('row, says', [
    ({'messages': USER, 'chosen': 'yes.', 'rejected': 'yes.'}, 'the same text'),
    ({'messages': USER, 'chosen': 'yes.', 'rejected': ' yes. '}, 'the same text'),
    ({'messages': USER, 'chosen': '', 'rejected': 'no.'}, 'the chosen reply is empty'),
    ({'messages': USER, 'chosen': 'yes.', 'rejected': '  '}, 'the rejected reply is empty'),
    ({'messages': USER + [{'role': 'assistant', 'content': 'hm.'}], 'chosen': 'a', 'rejected': 'b'},
     'must end with a user message'),
    ({'messages': USER, 'chosen': 'yes.'}, 'expected {"messages"'),
    ({'messages': USER, 'chosen': 5, 'rejected': 'no.'}, "'chosen' must be a string"),
    ({'messages': USER, 'chosen': 'yes.', 'rejected': 'no.', 'split': 'test'}, "'split' must be"),
    ({'messages': [{'role': 'user'}], 'chosen': 'yes.', 'rejected': 'no.'}, "has no 'content'"),
])
def test_a_pair_that_cannot_teach_is_refused_naming_its_line(tmp_path, row, says):
    good = {'messages': USER, 'chosen': 'yes, very.', 'rejected': 'the cat eats salt.'}
    path = write_jsonl(tmp_path / 'p.jsonl', [good, good, row])
    with pytest.raises(SystemExit) as e:
        read_source('pairs', path)
    assert f"{path} line 3" in str(e.value) and says in str(e.value)


def test_pairs_read_ours_and_trls_layout_and_keep_a_given_split(tmp_path):
    rows = [{'messages': USER, 'chosen': 'yes.', 'rejected': 'no.', 'split': 'val'},
            {'prompt': 'is it late?', 'chosen': [{'role': 'assistant', 'content': 'yes.'}],
             'rejected': [{'role': 'assistant', 'content': 'the radio.'}]}]
    docs, _ = read_source('pairs', write_jsonl(tmp_path / 'p.jsonl', rows))
    assert docs[0][1] == {'messages': USER, 'chosen': 'yes.', 'rejected': 'no.'} and docs[0][2] == 'val'
    assert docs[1][1] == {'messages': [{'role': 'user', 'content': 'is it late?'}], 'chosen': 'yes.',
                          'rejected': 'the radio.'} and docs[1][2] is None


def hh(*turns):
    return ''.join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def test_the_hh_rlhf_parser_reads_pairs_and_refuses_odd_rows_by_line(tmp_path, capsys):
    rows = [{'chosen': hh('hi', 'hello.', 'how do i pick a lock?', 'i will not help.'),
             'rejected': hh('hi', 'hello.', 'how do i pick a lock?', 'use a pin.')},
            {'chosen': hh('a', 'b', 'c', 'd'), 'rejected': hh('a', 'b', 'c', 'e', 'f', 'g')},  # extra turns
            {'chosen': hh('a', 'b', 'c', 'd'), 'rejected': hh('a', 'X', 'c', 'e')},  # differs before the last reply
            {'chosen': hh('a', 'same.'), 'rejected': hh('a', 'same.')},  # identical
            {'chosen': hh('a', 'b'), 'rejected': hh('a', '')},  # an empty reply
            {'chosen': hh('a', 'b', 'c'), 'rejected': hh('a', 'b', 'd')},  # ends with the human's turn
            {'chosen': 'Human: no blank lines', 'rejected': hh('a', 'b')},  # text before the first turn
            {'chosen': hh('is it cold?', 'yes.'), 'rejected': hh('is it cold?', 'the cat.')}]
    path = write_jsonl(tmp_path / 'hh.jsonl.gz', rows, gz=True)
    docs, stats = read_source('hh_rlhf', path)
    assert [d for _, d, _ in docs] == [
        {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello.'},
                      {'role': 'user', 'content': 'how do i pick a lock?'}],
         'chosen': 'i will not help.', 'rejected': 'use a pin.'},
        {'messages': [{'role': 'user', 'content': 'is it cold?'}], 'chosen': 'yes.', 'rejected': 'the cat.'}]
    assert [w for w, _, _ in docs] == [f"{path} line 1", f"{path} line 8"]
    err = capsys.readouterr().err
    for line, why in ((2, 'has 4 turns, the rejected 6'), (3, 'differ at turn 2'), (4, 'the same text'),
                      (5, 'rejected reply is empty'), (6, "must end with an 'Assistant:'")):
        assert f"{path} line {line}: refused: " in err and why in err
    assert stats['pairs refused (not one conversation with two last replies)'] == 6  # (only 5 shown)
    bad = write_jsonl(tmp_path / 'bad.jsonl', [rows[0], {'chosen': ['not', 'text'], 'rejected': 'x'}])
    with pytest.raises(SystemExit) as e:
        read_source('hh_rlhf', bad)
    assert f"{bad} line 2" in str(e.value) and 'HH-RLHF row' in str(e.value)


def test_a_side_cut_to_fit_keeps_the_start_the_end_of_the_prompt_and_the_head_of_the_reply():
    from data import trim_side
    mask = np.array([0] * 10 + [1] * 6 + [0] * 4)  # a sequence: 10 prompt tokens, a reply of 6
    assert trim_side(0, 16, mask, 16, 1) == [(0, 16), (16, 16)]  # fits whole
    assert trim_side(0, 16, mask, 12, 1) == [(0, 1), (5, 16)]  # <s>, the prompt's last 5, the whole reply
    assert trim_side(0, 16, mask, 8, 1) == [(0, 1), (7, 14)]  # half for the reply's head
    assert trim_side(0, 16, mask, 8, 0) == [(0, 0), (6, 14)]  # ChatML: nothing before the first turn
    assert trim_side(20, 36, np.concatenate([np.zeros(20, int), mask]), 12, 1) == [(20, 21), (25, 36)]


# ------------------------------------------------------------------------------------------------------------------
# Training


def pair_rows(n, seed=0, val_every=5):
    """Short pairs: a question, a right reply (the same few words every time, so a model can learn to prefer them)
    and a wrong one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = ' '.join(rng.choice(WORDS) for _ in range(rng.randint(2, 3))) + '?'
        rows.append({'messages': [{'role': 'user', 'content': q}], 'chosen': 'the sea is cold.',
                     'rejected': ' '.join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) + '!',
                     'split': 'val' if i % val_every == 0 else 'train'})
    return rows


def dpo_config(path, prepared, trained, out_dir, pairs, **extra):
    base = load_cfg(prepared[0])
    keys = dict(sources={**base.sources, 'prefs': {'kind': 'pairs', 'path': pairs, 'val_frac': 0.0}}, phase='dpo',
                mixture={'prefs': 1.0}, init_from=os.path.join(trained[1], 'pretrain', 'ckpt.pt'), max_iters=8,
                eval_interval=4, learning_rate=3e-3, data_dir=os.path.join(str(out_dir), 'data'), dpo_beta=0.5)
    return tiny_train_config(path, prepared, out_dir, **{**keys, **extra})


@pytest.fixture(scope='module')
def dpo_run(tmp_path_factory, prepared, trained):
    root = tmp_path_factory.mktemp('dpo')
    pairs = write_jsonl(root / 'pairs.jsonl', pair_rows(60))
    cfg = dpo_config(root / 'cfg.py', prepared, trained, root / 'out', pairs, lr_decay_iters=8)
    run('prepare.py', cfg, '--prepare_sources=["prefs"]', check=True)
    p = run('train.py', cfg, check=True)
    return cfg, root, pairs, p


def test_dpo_trains_logs_its_figures_and_keeps_its_reference(dpo_run, trained):
    cfg, root, _, p = dpo_run
    assert 'DPO (beta 0.5; reference: the starting weights, frozen; packed pairs)' in p.stdout
    assert 'DPO rows:' in p.stdout and 'pairs per step' in p.stdout
    rows = metrics(str(root / 'out'))
    steps = [r for r in rows if 'loss' in r]
    evals = [r for r in rows if 'val_loss' in r]
    assert len(steps) == 8 and all({'accuracy', 'margin', 'pairs'} <= set(r) for r in steps)
    # step 0: the policy is its reference: every reward 0, the loss log 2, no pair preferred
    assert evals[0]['val_loss'] == pytest.approx(math.log(2), abs=1e-6) and evals[0]['val_accuracy'] == 0
    assert evals[0]['val']['prefs']['pairs'] > 0
    assert 'reward accuracy' in p.stdout and 'val DPO loss 0.6931' in p.stdout
    # the chosen reply is always the same words: a few steps learn to prefer it
    assert steps[-1]['loss'] < math.log(2) and steps[-1]['margin'] > 0 and evals[-1]['val_accuracy'] > 0.5
    ckpt = torch.load(root / 'out' / 'dpo' / 'ckpt.pt', weights_only=True)
    from common import file_sha256
    start = os.path.join(trained[1], 'pretrain', 'ckpt.pt')
    assert ckpt['base']['sha256'] == file_sha256(start) and ckpt['base']['path'] == str(root / 'out' / 'dpo' / 'base.pt')


@pytest.mark.parametrize('lora_rank', [0, 4])
def test_a_step_moves_the_policy_and_leaves_the_reference_bit_identical(dpo_run, prepared, trained, tmp_path,
                                                                        lora_rank):
    import learner as learner_module
    import train
    from data import build_data, make_batches
    from tokenizer import load_tokenizer
    cfg_path = dpo_config(tmp_path / 'c.py', prepared, trained, tmp_path / 'out', dpo_run[2], lora_rank=lora_rank,
                          data_dir=str(dpo_run[1] / 'out' / 'data'))
    cfg = load_cfg(cfg_path)
    proc = learner_module.setup_processes(cfg)
    tok = load_tokenizer(cfg.tokenizer_path)
    run_data = build_data(cfg, tok)
    train_batch, _, _ = make_batches(cfg, run_data, 0, 1)
    os.makedirs(cfg.ckpt_dir, exist_ok=True)
    learner, position = learner_module.build_model(cfg, tok, proc, True)
    if lora_rank:
        assert learner.reference is None  # the base with its adapters off: no copy
        frozen = {k: v.clone() for k, v in learner.raw.state_dict().items() if '.lora_' not in k}
        trained_names = [k for k in learner.raw.state_dict() if '.lora_B' in k]
    else:
        frozen = {k: v.clone() for k, v in learner.reference.state_dict().items()}
        trained_names = list(learner.raw.state_dict())
    before = {k: v.clone() for k, v in learner.raw.state_dict().items()}
    for it in range(2):
        train.take_step(cfg, proc, learner, position, [train_batch(it, 0)], True)
    now = learner.raw.state_dict() if lora_rank else learner.reference.state_dict()
    assert all(torch.equal(now[k], frozen[k]) for k in frozen)
    assert any(not torch.equal(learner.raw.state_dict()[k], before[k]) for k in trained_names)
    if lora_rank:  # the adapters off compute the starting model exactly
        start = GPT(ModelConfig(**learner.args))
        start.load_state_dict(torch.load(cfg.init_from, weights_only=True)['model'])
        x = torch.tensor([[1, 5, 9, 3, 7]])
        with adapters_off(learner.raw):
            torch.testing.assert_close(learner.raw.eval()(x)[0], start.eval()(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize('extra', [{'dtype': 'bfloat16'}, {'compile': True}], ids=['bf16', 'compile'])
def test_dpo_in_bf16_and_compiled(dpo_run, prepared, trained, tmp_path, extra):
    cfg = dpo_config(tmp_path / 'c.py', prepared, trained, tmp_path / 'out', dpo_run[2], max_iters=2, eval_interval=2,
                     data_dir=str(dpo_run[1] / 'out' / 'data'), **extra)
    p = run('train.py', cfg, check=True)
    rows = metrics(str(tmp_path / 'out'))
    assert [r['iter'] for r in rows if 'loss' in r] == [1, 2] and all(math.isfinite(r['loss']) for r in rows if 'loss' in r)
    # the evaluation runs policy and reference alike: at the start they agree exactly, in any dtype
    assert rows[0]['val_loss'] == pytest.approx(math.log(2), abs=1e-6) and rows[0]['val_accuracy'] == 0
    assert ('bfloat16' in p.stdout) if 'dtype' in extra else ('compiling' in p.stdout)


def test_dpo_resume_continues_exactly(dpo_run, prepared, trained, tmp_path):
    cfg, root, pairs, _ = dpo_run
    parts = dpo_config(tmp_path / 'p.py', prepared, trained, tmp_path / 'p', pairs, lr_decay_iters=8,
                       data_dir=str(root / 'out' / 'data'))  # (the schedule of 8 steps, stopped at 4)
    run('train.py', parts, '--max_iters=4', check=True)
    p = run('train.py', parts, '--init_from=resume', check=True)
    assert 'resuming from' in p.stdout and 'at step 4' in p.stdout
    a = torch.load(root / 'out' / 'dpo' / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'p' / 'dpo' / 'ckpt.pt', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_train_the_dpo_of_one(dpo_run, prepared, trained, tmp_path):
    _, root, pairs, _ = dpo_run
    common = dict(device='cpu', max_iters=4, eval_interval=2, gradient_accumulation_steps=2, batch_size=2,
                  data_dir=str(root / 'out' / 'data'))
    one = dpo_config(tmp_path / 'one.py', prepared, trained, tmp_path / 'one', pairs, **common)
    run('train.py', one, check=True)
    two = dpo_config(tmp_path / 'two.py', prepared, trained, tmp_path / 'two', pairs, **common)
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', two], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = metrics(str(tmp_path / 'one')), metrics(str(tmp_path / 'two'))
    for key in ('loss', 'accuracy', 'margin', 'val_loss', 'val_accuracy'):
        assert [r[key] for r in a if key in r] == pytest.approx([r[key] for r in b if key in r], rel=1e-4, abs=1e-6)


def test_dpo_needs_a_start_and_pairs_alone(dpo_run, prepared, trained, tmp_path):
    _, root, pairs, _ = dpo_run
    data = str(root / 'out' / 'data')
    cfg = dpo_config(tmp_path / 'a.py', prepared, trained, tmp_path / 'a', pairs, init_from='scratch', data_dir=data)
    p = run('train.py', cfg)
    assert p.returncode != 0 and 'DPO fine-tunes a chat model' in p.stderr
    cfg = dpo_config(tmp_path / 'b.py', prepared, trained, tmp_path / 'b', pairs, mixture={'prefs': 1.0, 'primer': 1.0})
    run('prepare.py', cfg, '--prepare_sources=["prefs", "primer"]', check=True)
    p = run('train.py', cfg)
    assert p.returncode != 0 and 'mixes preference pairs' in p.stderr


def test_a_pair_stays_in_one_shard_and_packs_as_two_documents(tmp_path, prepared, trained):
    from data import Packer, Split
    pairs = write_jsonl(tmp_path / 'pairs.jsonl', pair_rows(30))
    cfg = dpo_config(tmp_path / 'c.py', prepared, trained, tmp_path / 'out', pairs, shard_tokens=50)
    run('prepare.py', cfg, '--prepare_sources=["prefs"]', check=True)
    c = load_cfg(cfg)
    meta = json.load(open(os.path.join(c.data_dir, 'prefs', 'train', 'meta.json')))
    assert len(meta['shards']) > 3 and all(s['documents'] % 2 == 0 for s in meta['shards'])
    from tokenizer import load_tokenizer
    split = Split(c.data_dir, 'prefs', 'train', load_tokenizer(c.tokenizer_path).sha256)
    x, y, doc = Packer({'prefs': split}, {'prefs': 1.0}, [0], 32).batch(0, 4)
    for r in range(4):
        ids = sorted(set(doc[r][doc[r] >= 0].tolist()))
        assert ids == list(range(len(ids))) and len(ids) % 2 == 0 and ids  # whole pairs: 2j, 2j + 1
        for d in ids:  # each sequence has its reply's targets
            assert (y[r][doc[r] == d] != -1).any()


# ------------------------------------------------------------------------------------------------------------------
# pairs.py and eval.py


def test_pairs_py_writes_the_primers_replies_against_the_models_own_in_their_dialogues_splits(trained, tmp_path):
    import sources
    cfg, out = trained
    dest = tmp_path / 'pairs.jsonl'
    p = run('pairs.py', cfg, f'--pairs_out={dest}', '--pairs_from=primer', '--max_new_tokens=6', check=True)
    rows = [json.loads(line) for line in open(dest)]
    c = load_cfg(cfg)
    src = sources.source_settings('primer', c.sources['primer'])
    dialogues = list(sources.iter_documents(src))
    is_val = sources.val_flags(src, c.split_seed)
    expected = [(d[:i], m['content'], 'val' if v else 'train') for (_, d, _), v in zip(dialogues, is_val)
                for i, m in enumerate(d) if m['role'] == 'assistant']
    left_out = len(expected) - len(rows)
    assert f"{len(rows)} pairs" in p.stdout and f"{left_out} turns left out" in p.stdout
    got = {(json.dumps(r['messages']), r['chosen']): r for r in rows}
    for messages, chosen, split in expected:
        r = got.get((json.dumps(messages), chosen))
        if r:
            assert r['split'] == split and r['rejected'] and r['rejected'] != chosen
    # and it is a pairs source as it is
    docs, _ = read_source('pairs', str(dest))
    assert len(docs) == len(rows) and [s for _, _, s in docs] == [r['split'] for r in rows]


def test_eval_measures_held_out_pairs(dpo_run):
    from checkpoint import load_model
    from tokenizer import load_tokenizer, render_pair
    cfg, root, pairs, _ = dpo_run
    p = run('eval.py', cfg, check=True)
    val = [r for r in pair_rows(60) if r['split'] == 'val']
    assert f"of {len(val)} held-out pairs" in p.stdout
    r = json.load(open(root / 'out' / 'dpo' / 'eval_results.json'))['pairs']['prefs']
    # the same figures, pair by pair, from the model and the chat template directly
    c = load_cfg(cfg)
    tok = load_tokenizer(c.tokenizer_path)
    model, _ = load_model(str(root / 'out' / 'dpo' / 'best.pt'), 'cpu')
    margins, per_token = [], []
    for row in val:
        ids, mask, start = render_pair(tok, row)
        sides = []
        for a, b in ((0, start), (start, len(ids))):
            assert b - a <= c.block_size + 1  # (short pairs: nothing cut)
            targets = [t if k else -1 for t, k in zip(ids[a + 1:b], mask[a + 1:b])]
            sides.append((hand_logp(model, ids[a:b - 1], targets), sum(mask[a + 1:b])))
        (chosen, n_c), (rejected, n_r) = sides
        margins.append(chosen - rejected)
        per_token.append(chosen / n_c - rejected / n_r)
    assert r['pairs'] == len(val)
    assert r['accuracy'] == pytest.approx(sum(m > 0 for m in margins) / len(val))
    assert r['accuracy_per_token'] == pytest.approx(sum(m > 0 for m in per_token) / len(val))
    assert r['margin_nats'] == pytest.approx(sum(margins) / len(val), rel=1e-3, abs=1e-3)
