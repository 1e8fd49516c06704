import json
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import load_cfg, run
import data
import eval as evaluate
import sources
from model import GPT, ModelConfig
from tokenizer import Tokenizer, render_conversation


@pytest.fixture(scope='module')
def tok(prepared):
    return Tokenizer(load_cfg(prepared[0]).tokenizer_path)


def random_model(tok, block_size=256):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_kv_head=2,
                           n_embd=32)).eval()


def test_bits_per_byte_and_perplexity_match_a_hand_computation(tok):
    model = random_model(tok)
    text = 'A short text, with café and 😀 — bytes count, tokens do not.'
    ids = [tok.bos_id] + tok.encode(text)
    m = evaluate.split_metrics(model, tok, data.windows(ids, 256), nullcontext(), 'cpu', 4, 'x')
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    nats = -F.log_softmax(logits[0], -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
    n = len(ids) - 1
    assert m['tokens'] == n and m['bytes'] == len(text.encode('utf-8'))
    assert m['loss'] == pytest.approx(nats / n, rel=1e-5)
    assert m['perplexity'] == pytest.approx(math.exp(nats / n), rel=1e-5)
    assert m['bits_per_byte'] == pytest.approx(nats / math.log(2) / len(text.encode('utf-8')), rel=1e-5)


def test_long_text_is_scored_in_windows_with_every_token_counted_once(tok):
    ids = [tok.bos_id] + tok.encode('one two three four five six seven eight nine ten ' * 4)
    seqs = data.windows(ids, 16)
    assert sum(len(t) for _, t in seqs) == len(ids) - 1 and all(len(x) <= 16 for x, _ in seqs)
    assert [t for _, ts in seqs for t in ts] == ids[1:]


def test_chat_val_split_counts_only_assistant_tokens_and_eot_as_zero_bytes(prepared, tok):
    cfg = load_cfg(prepared[0], '--eval_tokens=100000')
    seqs = data.split_sequences(cfg, tok, 'primer', 4096)
    assert len(seqs) == data.load_split(cfg.data_dir, 'primer', 'val')['documents']
    src = sources.source_settings('primer', cfg.sources['primer'])
    rendered = {tuple(render_conversation(tok, c)[0]): c for _, c, _ in sources.iter_documents(src)}
    for ids, targets in seqs:
        conv = rendered[tuple(ids) + (targets[-1],)]  # the whole conversation, untruncated
        replies = [m['content'] for m in conv if m['role'] == 'assistant']
        trained = [t for t in targets if t != -1]
        assert trained.count(tok.eot_id) == len(replies)
        assert tok.decode(trained) == ''.join(replies)  # <|eot|> decodes to nothing ...
        assert sum(len(tok.id_bytes[t]) for t in trained) == len(''.join(replies).encode())  # ... and counts 0 bytes


class Stub(torch.nn.Module):
    """A 'model' whose next-token preferences are fixed: +20 for `boost` tokens, or for `alt` tokens
    when the row contains the `marker` token anywhere."""

    def __init__(self, vocab, boost, alt=(), marker=None, block_size=512):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab, block_size=block_size)
        self.vocab, self.boost, self.alt, self.marker = vocab, list(boost), list(alt), marker

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        logits[..., self.boost] = 20.0
        if self.marker is not None:
            has = (x == self.marker).any(dim=1)[:, None]
            logits[..., self.alt] = torch.where(has, 20.0, 0.0)[..., None].expand(-1, x.shape[1], len(self.alt))
            logits[..., self.boost] = torch.where(has, 0.0, 20.0)[..., None].expand(-1, x.shape[1], len(self.boost))
        return logits, None


@pytest.mark.parametrize('chat', [False, True])
def test_boolq_picks_the_forced_answer_and_reports_baselines(tok, chat):
    marker = tok.encode('\U0001F993')[-1]  # a byte token only this emoji has in these passages
    yes = tok.encode('yes' if chat else ' yes')
    no = tok.encode('no' if chat else ' no')
    stub = Stub(tok.vocab_size, boost=no, alt=yes, marker=marker)  # says yes exactly when the marker is there
    rows = [{'question': 'is it', 'passage': 'a plain passage \U0001F993', 'answer': True}] * 6 + \
           [{'question': 'is it', 'passage': 'a plain passage', 'answer': False}] * 3 + \
           [{'question': 'is it', 'passage': 'a plain passage', 'answer': True}]  # the stub gets this one wrong
    r = evaluate.boolq(stub, tok, rows, chat, nullcontext(), 'cpu', 4)
    assert r['n'] == 10 and r['acc'] == pytest.approx(0.9) and r['stderr'] == pytest.approx(math.sqrt(0.9 * 0.1 / 10))
    assert r['majority_baseline'] == pytest.approx(0.7) and r['always_no'] == pytest.approx(0.3)
    assert r['majority_stderr'] == pytest.approx(math.sqrt(0.7 * 0.3 / 10)) == r['always_no_stderr']
    assert 'majority 0.700 ± 0.145, always-no 0.300 ± 0.145' in evaluate.benchmark_line('boolq', r)
    assert r['predicted_yes'] == pytest.approx(0.6)


def hs(ctx_b, endings, label, activity='Walking', ctx_a='A man walks.'):
    return {'activity_label': activity, 'ctx_a': ctx_a, 'ctx_b': ctx_b, 'endings': endings, 'label': label}


def test_hellaswag_acc_and_acc_norm_follow_summed_and_per_character_log_probs(tok):
    torch.manual_seed(1)
    preference = torch.randn(tok.vocab_size) * 3
    stub = Stub(tok.vocab_size, boost=[])
    stub.forward = lambda x: (preference.expand(*x.shape, -1), None)
    lp = F.log_softmax(preference, -1)
    endings = ['stop.', 'it rolls over the hill and down into the cold sea', 'the cat', 'bread bread bread bread']
    summed = [sum(lp[t].item() for t in tok.encode(' ' + e)) for e in endings]
    per_char = [s / len(e) for s, e in zip(summed, endings)]  # lm-evaluation-harness: characters of the ending
    best, best_norm = max(range(4), key=summed.__getitem__), max(range(4), key=per_char.__getitem__)
    rows = [hs('he', endings, best), hs('then', endings, best_norm)]
    r = evaluate.hellaswag(stub, tok, rows, False, nullcontext(), 'cpu', 3)
    assert r['acc'] == (1.0 if best == best_norm else 0.5) and r['acc_norm'] == (1.0 if best == best_norm else 0.5)
    assert r['acc_norm_stderr'] == pytest.approx(math.sqrt(r['acc_norm'] * (1 - r['acc_norm']) / 2))
    rows = [hs('x', endings, best)] * 3
    assert evaluate.hellaswag(stub, tok, rows, False, nullcontext(), 'cpu', 3)['acc'] == 1.0


def test_hellaswag_text_is_built_and_cleaned_as_lm_evaluation_harness_does():
    row = hs('take  it [step] apart', [' Loosen the [title] bolts.  ', 'Ride [header] away'], 0,
             activity='Fixing a bike', ctx_a='How to fix a bike [title] Find the   tools.')
    # 'activity_label: ctx_a Ctx_b', then: strip, ' [title]' -> '. ', [anything] dropped, one '  ' -> ' '
    assert evaluate.hellaswag_context(row) == 'Fixing a bike: How to fix a bike. Find the  tools. Take it apart'
    assert [evaluate.hellaswag_clean(e) for e in row['endings']] == ['Loosen the. bolts.', 'Ride away']


def test_acc_and_acc_norm_disagree_when_length_matters(tok):
    """A short likely ending against a long ending of tokens nearly as likely: the summed log-prob prefers
    the short one, the log-prob per byte the long one."""
    from conftest import WORDS
    single = sorted((w for w in WORDS if len(tok.encode(' ' + w)) == 1), key=len)  # words that are one token
    short, word = single[0], single[-1]
    long = ' '.join([word] * 6)
    assert tok.encode(' ' + long) == tok.encode(' ' + word) * 6
    pref = torch.full((tok.vocab_size,), -5.0)
    pref[tok.encode(' ' + word)] = 4.9
    pref[tok.encode(' ' + short)] = 5.0
    stub = Stub(tok.vocab_size, boost=[])
    stub.forward = lambda x: (pref.expand(*x.shape, -1), None)
    lp = F.log_softmax(pref, -1)
    s = [sum(lp[t].item() for t in tok.encode(' ' + e)) for e in (short, long)]
    b = [len(e) for e in (short, long)]
    assert s[0] > s[1] and s[0] / b[0] < s[1] / b[1]  # the fixture really pulls the two apart
    rows = [hs('say', [short, long, 'zzz', 'qqq'], 0)]
    r = evaluate.hellaswag(stub, tok, rows, False, nullcontext(), 'cpu', 4)
    assert (r['acc'], r['acc_norm']) == (1.0, 0.0)


def test_an_unreadable_benchmark_file_says_which_file(tmp_path):
    with pytest.raises(SystemExit) as e:
        evaluate.read_rows(str(tmp_path / 'dev.jsonl'), 'boolq')
    assert 'dev.jsonl' in str(e.value) and 'no such file' in str(e.value)
    (tmp_path / 'bad.jsonl').write_text('{"question": "a", "passage": "b", "answer": true}\n{oops\n')
    with pytest.raises(SystemExit) as e:
        evaluate.read_rows(str(tmp_path / 'bad.jsonl'), 'boolq')
    assert 'bad.jsonl line 2' in str(e.value)
    (tmp_path / 'short.jsonl').write_text('{"question": "a"}\n')
    with pytest.raises(SystemExit) as e:
        evaluate.read_rows(str(tmp_path / 'short.jsonl'), 'boolq')
    assert 'short.jsonl line 1' in str(e.value) and "'passage'" in str(e.value)


def test_benchmark_rows_are_checked_and_the_parquet_label_string_is_read_as_a_number(tmp_path):
    def problem(name, row):
        (tmp_path / 'x.jsonl').write_text(json.dumps({'question': 'q', 'passage': 'p', 'answer': True}) + '\n' +
                                          json.dumps(row) + '\n' if name == 'boolq' else json.dumps(row) + '\n')
        with pytest.raises(SystemExit) as e:
            evaluate.read_rows(str(tmp_path / 'x.jsonl'), name)
        return str(e.value)
    assert "line 2 field 'answer' must be true or false" in problem('boolq', {'question': 'q', 'passage': 'p', 'answer': 'false'})
    assert "field 'passage' must be a string" in problem('boolq', {'question': 'q', 'passage': None, 'answer': False})
    assert "field 'label' must be the index of the right ending, 0 to 3, got int 4" in problem('hellaswag', hs('b', list('abcd'), 4))
    assert "got bool True" in problem('hellaswag', hs('b', list('abcd'), True))
    assert "field 'endings' must be a list of at least 2 strings" in problem('hellaswag', hs('b', 'abcd', 0))
    assert "has no field 'activity_label'" in problem('hellaswag', {'ctx': 'x', 'endings': ['a', 'b'], 'label': 0})
    no_system = {'question': 'q', 'keywords': [['a']], 'system': ''}
    assert "field 'system'" in problem('questions', no_system)
    (tmp_path / 'ok.jsonl').write_text(json.dumps(hs('b', list('abcd'), '2')) + '\n')
    assert evaluate.read_rows(str(tmp_path / 'ok.jsonl'), 'hellaswag')[0]['label'] == 2


def test_questions_are_asked_under_their_own_system_prompt_where_they_have_one(monkeypatch):
    """A row's 'system' replaces the config's for that question (does the model follow a system
    prompt it was not tuned on?); scored by keywords, one alternative of every group, any case."""
    heard = []

    def ask(model, tok, system, content, autocast):
        heard.append((system, content))
        return {'what is your name?': 'I am Quill.', 'who owns the shop?': "i don't know."}[content]
    monkeypatch.setattr(evaluate, 'ask', ask)
    rows = [{'question': 'what is your name?', 'keywords': [['quill']], 'kind': 'system',
             'system': 'your name is quill.'},
            {'question': 'who owns the shop?', 'keywords': [['dev']], 'kind': 'fact',
             'system': None}]
    r = evaluate.questions(None, None, rows, 'the configured prompt', None, 5, nullcontext())
    assert heard == [('your name is quill.', 'what is your name?'),
                     ('the configured prompt', 'who owns the shop?')]
    assert r['right'] == 1 and r['by_kind'] == {'system': [1, 1], 'fact': [0, 1]}
    assert r['idk_on_answerable'] == 1


def test_questions_say_whether_the_notes_shown_held_the_answer(monkeypatch):
    """With retrieval: for each answerable question, were its keywords in the notes put in front of
    it (found, then read or misread), or not (not found)? Not for 'unknown' questions, and not
    counted from the question's own words."""
    import retrieval
    index = retrieval.Index(['[Dev]\n- owns Harbour Cycles', '[Biscuit]\n- a ginger cat'],
                            ['Dev', 'Biscuit'])
    replies = {'what colour is biscuit?': 'ginger.', 'how old is biscuit?': "i don't know.",
               'is harbour cycles a shop?': 'no idea.', "what is dev's phone number?": 'no idea.'}
    monkeypatch.setattr(evaluate, 'ask', lambda model, tok, system, content, autocast:
                        replies[content.split('question: ')[-1]])
    rows = [{'question': 'what colour is biscuit?', 'keywords': [['ginger']], 'kind': 'fact'},
            {'question': 'how old is biscuit?', 'keywords': [['nine']], 'kind': 'fact'},
            {'question': 'is harbour cycles a shop?', 'keywords': [['shop']], 'kind': 'fact'},
            {'question': "what is dev's phone number?", 'keywords': [["don't know", 'no idea']],
             'kind': 'unknown'}]
    r = evaluate.questions(None, None, rows, 'sys', index, 1, nullcontext())
    assert [a.get('in_notes') for a in r['answers']] == [True, False, False, None]
    assert r['right'] == 2 and r['answers'][2]['right'] is False  # ("no idea." holds no "shop")
    assert evaluate.questions_line(r).endswith(
        'the answer was in the notes shown for 1 of 3 answerable, and right for 1 of those')
    r = evaluate.questions(None, None, rows[:1], 'sys', None, 1, nullcontext())  # retrieval off
    assert 'in_notes' not in r['answers'][0] and 'notes shown' not in evaluate.questions_line(r)


def test_oracle_notes_show_each_question_the_chunk_that_holds_its_answer(monkeypatch):
    """--oracle_notes: retrieval made perfect. Each answerable question is shown only the chunk
    that holds its keywords, the best ranked where several do, found even when it shares no word
    with the question; a question no chunk answers, and an 'unknown' one, as retrieval shows it."""
    import retrieval
    index = retrieval.Index(['[Biscuit]\n- hates the hoover', '[Biscuit]\n- a ginger cat, nine',
                             '[Dev]\n- owns Harbour Cycles', '[Biscuit]\n- ginger.'],
                            ['Biscuit', 'Biscuit', 'Dev', 'Biscuit'])
    heard = {}

    def ask(model, tok, system, content, autocast):
        heard[content.split('question: ')[-1]] = content
        return 'ginger.'
    monkeypatch.setattr(evaluate, 'ask', ask)
    rows = [{'question': 'what colour is biscuit?', 'keywords': [['ginger']], 'kind': 'fact'},
            {'question': 'who runs the bike shop?', 'keywords': [['dev']], 'kind': 'fact'},
            {'question': 'how old is biscuit?', 'keywords': [['twelve']], 'kind': 'fact'},
            {'question': 'what does biscuit love?', 'keywords': [['ginger']], 'kind': 'unknown'}]
    r = evaluate.questions(None, None, rows, 'sys', index, 2, nullcontext(), oracle=True)
    notes = {q: c.split('\n\nquestion: ')[0] for q, c in heard.items()}
    # two chunks say ginger; the shorter one, which BM25 ranks first, is shown, alone
    assert notes['what colour is biscuit?'] == 'notes:\n[Biscuit]\n- ginger.'
    assert notes['who runs the bike shop?'] == 'notes:\n[Dev]\n- owns Harbour Cycles'
    for q in ('how old is biscuit?', 'what does biscuit love?'):  # as retrieval shows them
        assert heard[q] == retrieval.with_notes(index, q, 2)
    assert [a.get('in_notes') for a in r['answers']] == [True, True, False, None]
    table = evaluate.markdown({'ckpt': 'x.pt', 'iter': 1, 'splits': {},
                               'questions': {**r, 'oracle_notes': True}})
    assert '**questions** (each shown the chunk that holds its answer: oracle_notes): 2/4' in table

def test_answers_are_compared_with_an_earlier_run_by_a_sign_test(tmp_path):
    """--compare_with: the questions one run gets right and the other wrong, each way, and the
    chance (two-sided) of a split at least that lopsided if the change did nothing."""
    def run_of(rights):
        return {'answers': [{'id': f'q{i}', 'kind': 'fact', 'question': f'question {i}?',
                             'answer': '', 'right': right} for i, right in enumerate(rights)]}
    before = [True] * 10 + [False] * 10
    path = tmp_path / 'eval_results.json'
    path.write_text(json.dumps({'questions': run_of(before)}))
    earlier = evaluate.earlier_answers(str(path))
    # 2 gained, 7 lost: p = 2 x (C(9,0) + C(9,1) + C(9,2)) / 2^9 = 92 / 512
    now = run_of([False] * 7 + [True] * 3 + [True] * 2 + [False] * 8)
    c = evaluate.compared(now, earlier, str(path))
    assert c['gained'] == ['q10', 'q11'] and c['lost'] == [f'q{i}' for i in range(7)]
    assert c['p'] == pytest.approx(92 / 512) and c['earlier_right'] == 10
    assert 'within what chance moves' in evaluate.compared_line(c)
    c = evaluate.compared(run_of([False] * 8 + before[8:]), earlier, str(path))  # 0 gained, 8 lost
    assert c['p'] == pytest.approx(2 / 2 ** 8) and 'more than' in evaluate.compared_line(c)
    # the same answers: nothing to test; a question the earlier run did not ask is left out
    same = run_of(before)
    same['answers'].append({**same['answers'][0], 'question': 'new?', 'right': False})
    c = evaluate.compared(same, earlier, str(path))
    assert (c['gained'], c['lost'], c['p'], c['asked_in_both']) == ([], [], 1.0, 20)
    for text, says in (('{oops', 'not a JSON file'), ('{"splits": {}}', 'no scored questions'),
                       ('{"questions": [1]}', 'no scored questions')):
        path.write_text(text)
        with pytest.raises(SystemExit) as e:
            evaluate.earlier_answers(str(path))
        assert str(path) in str(e.value) and says in str(e.value)
    with pytest.raises(SystemExit) as e:
        evaluate.earlier_answers(str(tmp_path / 'none.json'))
    assert 'none.json' in str(e.value) and 'no such file' in str(e.value)

def test_eval_cli_writes_results_and_a_table(trained, tmp_path):
    cfg, out = trained
    (tmp_path / 'boolq.jsonl').write_text(''.join(json.dumps({'question': f'is {i} even', 'passage': f'{i} is a number.',
                                                               'answer': i % 2 == 0}) + '\n' for i in range(6)))
    (tmp_path / 'hs.jsonl').write_text(''.join(json.dumps(hs(f'step {i}:', ['a', 'b', 'c', 'd'], i % 4)) + '\n'
                                               for i in range(8)))
    p = run('eval.py', cfg, f'--boolq={tmp_path}/boolq.jsonl', f'--hellaswag={tmp_path}/hs.jsonl',
            f'--eval_out={tmp_path}/res', check=True)
    results = json.loads((tmp_path / 'res' / 'eval_results.json').read_text())
    assert set(results['splits']) == {'roam', 'primer', 'story'}
    assert results['boolq']['n'] == 6 and results['hellaswag']['n'] == 8 and len(results['smoke']) == 6
    for m in results['splits'].values():
        assert m['perplexity'] == pytest.approx(math.exp(m['loss'])) and m['bits_per_byte'] > 0
    assert '| roam |' in (tmp_path / 'res' / 'eval_results.md').read_text() and 'boolq' in p.stdout
    (tmp_path / 'doc.txt').write_text('The garden is cold today. ' * 30)
    p = run('eval.py', cfg, f'--text_file={tmp_path}/doc.txt', f'--eval_out={tmp_path}/res2', check=True)
    assert list(json.loads((tmp_path / 'res2' / 'eval_results.json').read_text())['splits']) == ['doc.txt']
    p = run('eval.py', cfg, f'--boolq={tmp_path}/none.jsonl', f'--eval_out={tmp_path}/res3')
    assert p.returncode != 0 and 'none.jsonl' in p.stderr and not (tmp_path / 'res3').exists()
    p = run('eval.py', cfg, f'--compare_with={tmp_path}/res/eval_results.json')
    assert p.returncode != 0 and 'give --questions too' in p.stderr
    for args, says in (([], 'give --questions too'),
                       ([f'--questions={tmp_path}/q.jsonl'], 'a config with retrieval')):
        (tmp_path / 'q.jsonl').write_text('{"question": "who?", "keywords": [["dev"]]}\n')
        p = run('eval.py', cfg, '--oracle_notes=True', *args)
        assert p.returncode != 0 and 'oracle_notes' in p.stderr and says in p.stderr


def test_benchmark_files_download_with_the_project_download_code(trained, tmp_path):
    from test_download import Server
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    server = Server()
    try:
        pq.write_table(pa.table({'question': ['is it'] * 4, 'passage': ['yes it is'] * 4, 'answer': [True] * 4}),
                       tmp_path / 'b.parquet')
        server.files['/boolq/validation.parquet'] = (tmp_path / 'b.parquet').read_bytes()
        args = (trained[0], f'--boolq={server.url}/boolq/validation.parquet', f'--cache_dir={tmp_path}/cache',
                f'--eval_out={tmp_path}/res')
        run('eval.py', *args, check=True)
        run('eval.py', *args, check=True)
        assert len(server.gets()) == 1  # the second evaluation reads the cache
        assert json.loads((tmp_path / 'res' / 'eval_results.json').read_text())['boolq']['n'] == 4
    finally:
        server.httpd.shutdown()


def test_a_continuation_longer_than_the_context_and_a_prompt_cut_to_fit(tok):
    model = random_model(tok, block_size=16)
    prompt, cont = list(range(10, 40)), list(range(50, 70))
    (score, n), = evaluate.continuation_logprobs(model, [(prompt, cont)], nullcontext(), 'cpu', 2, 'x')
    assert n == 16 and score < 0  # scored on the first block_size tokens of the continuation
    seen = []
    model.forward = lambda x: seen.append(x[0].tolist()) or (torch.zeros(*x.shape, tok.vocab_size), None)
    chat_prompt = [tok.bos_id, tok.usr_id] + list(range(100, 140)) + [tok.asst_id]
    evaluate.continuation_logprobs(model, [(chat_prompt, [7, 8])], nullcontext(), 'cpu', 2, 'x', head=2)
    assert seen[0][:2] == [tok.bos_id, tok.usr_id] and seen[0][-2:] == [tok.asst_id, 7] and len(seen[0]) == 16


def test_bits_per_byte_counts_only_text_targets_and_the_loss_counts_every_target(tok):
    """<|eot|> and <s> targets have no bytes: their nats are in the loss per token, not in bits per
    byte (bits of nothing). Fails if control-token nats reach the numerator."""
    model = random_model(tok)
    text = tok.encode('a reply with some words')
    ids = [tok.bos_id, tok.asst_id] + text + [tok.eot_id, tok.bos_id] + text
    targets = ids[1:]
    m = evaluate.split_metrics(model, tok, [(ids[:-1], targets)], nullcontext(), 'cpu', 4, 'x')
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    per = -F.log_softmax(logits[0], -1)[torch.arange(len(targets)), torch.tensor(targets)]
    is_text = torch.tensor([len(tok.id_bytes[t]) > 0 for t in targets])
    n_bytes = sum(len(tok.id_bytes[t]) for t in targets)
    assert not is_text.all()  # control tokens among the targets
    assert m['loss'] == pytest.approx(per.sum().item() / len(targets), rel=1e-5)
    assert m['bits_per_byte'] == pytest.approx(per[is_text].sum().item() / math.log(2) / n_bytes,
                                               rel=1e-5)
    assert m['bits_per_byte'] < per.sum().item() / math.log(2) / n_bytes
