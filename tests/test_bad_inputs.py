"""The bad-input catalogue: every case runs a stage like a user would and must end with a non-zero exit, a
message naming the culprit and the fix (no traceback), and every file that existed before untouched."""
import hashlib
import io
import json
import os
import shutil
import socket

import pytest
import sentencepiece as spm
import torch

from conftest import run, tiny_train_config


@pytest.fixture(scope='module')
def base(tmp_path_factory, prepared, trained):
    """A workspace: tokenizer, shards and a checkpoint, plus the config that uses them."""
    root = tmp_path_factory.mktemp('bad_base')
    shutil.copy(os.path.join(prepared[1], 'tokenizer.model'), root / 'tokenizer.model')
    shutil.copy(os.path.join(prepared[1], 'tokenizer.model.json'), root / 'tokenizer.model.json')
    shutil.copytree(os.path.join(prepared[1], 'data'), root / 'data')
    shutil.copy(os.path.join(trained[1], 'pretrain', 'ckpt.pt'), root / 'ckpt.pt')
    return root


@pytest.fixture
def ws(tmp_path, base, prepared):
    shutil.copytree(base, tmp_path / 'ws')
    w = tmp_path / 'ws'
    tiny_train_config(w / 'cfg.py', prepared, w / 'out', tokenizer_path=str(w / 'tokenizer.model'),
                            data_dir=str(w / 'data'))
    return w


def write(path, text, mode='w'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def foreign_tokenizer(w):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(['hello world'] * 50), model_writer=model, vocab_size=12,
                                   minloglevel=2)
    write(w / 'foreign.model', model.getvalue(), 'wb')
    return [f"--tokenizer_path={w / 'foreign.model'}"]


def replace_tokenizer(w):
    """tokenizer.model replaced by another model, its .json record left as tokenizer.py wrote it."""
    foreign_tokenizer(w)
    shutil.copy(w / 'foreign.model', w / 'tokenizer.model')


def edit_meta(w, name, **changes):
    path = w / 'data' / name / 'train' / 'meta.json'
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def edit_ckpt(w, **changes):
    state = torch.load(w / 'ckpt.pt', weights_only=True)
    state.update(changes)
    torch.save(state, w / 'other.pt')
    return f"--init_from={w / 'other.pt'}"


def src(w, kind, **settings):
    return f"--sources={ {'s': {'kind': kind, **settings}}!r}"


# (id, script, setup(w) -> extra args, words the message must contain)
CASES = [
    # --- configuration (every stage) ---
    ('unknown key on the command line', 'train.py', lambda w: ['--lerning_rate=1e-3'], ['lerning_rate', "did you mean 'learning_rate'"]),
    ('unknown key in a config file', 'prepare.py', lambda w: [write(w / 'typo.py', 'vocab_size = 512\nn_layers = 2\n')],
     ['typo.py line 2', "'n_layers'", "did you mean 'n_layer'"]),
    ('wrong type', 'train.py', lambda w: ['--batch_size=big'], ['batch_size must be int']),
    ('bool given as a number', 'sample.py', lambda w: ['--interactive=1'], ['interactive must be True or False']),
    ('missing config file', 'tokenizer.py', lambda w: [str(w / 'nope.py')], ['nope.py', 'not found']),
    ('config file that fails', 'train.py', lambda w: [write(w / 'broken.py', 'max_iters = int("x")\n')],
     ['broken.py', 'failed to run', 'ValueError']),
    # --- tokenizer.py ---
    ('tokenizer retrained with other settings', 'tokenizer.py', lambda w: ['--vocab_size=640'], ['other settings', 'delete it']),
    ('vocab too large for the text', 'tokenizer.py', lambda w: [f"--tokenizer_path={w / 'new.model'}", '--vocab_size=90000'],
     ['vocab_size=90000', 'Lower vocab_size']),
    ('tokenizer source not in sources', 'tokenizer.py', lambda w: [f"--tokenizer_path={w / 'new.model'}",
                                                                   "--tokenizer_sources={'wiki': 1000}"], ["'wiki'", 'not in sources']),
    ('show_chat with roles out of order', 'tokenizer.py',
     lambda w: [f"--show_chat={write(w / 'c.json', json.dumps([{'role': 'assistant', 'content': 'hi'}]))}"],
     ['c.json', "role 'assistant'", 'user']),
    # --- prepare.py ---
    ('no tokenizer yet', 'prepare.py', lambda w: [f"--tokenizer_path={w / 'missing.model'}"], ['missing.model', 'tokenizer.py']),
    ('tokenizer with wrong special ids', 'prepare.py', foreign_tokenizer, ['foreign.model', 'not made by tokenizer.py']),
    ('missing path', 'prepare.py', lambda w: [src(w, 'text', path=str(w / 'gone.txt'))], ['gone.txt', 'does not exist']),
    ('empty folder', 'prepare.py', lambda w: [os.makedirs(w / 'export') or src(w, 'roam', path=str(w / 'export'))],
     ['export', 'no files match']),
    ('roam JSON export, not Markdown', 'prepare.py',
     lambda w: [write(w / 'rj' / 'graph.json', '[]') and src(w, 'roam', path=str(w / 'rj'))],
     ['rj', 'no files match', '.json', "Roam's Markdown export"]),
    ('empty source', 'prepare.py', lambda w: [src(w, 'text', path=write(w / 'blank.txt', '\n \n'))], ['no documents', 'blank.txt']),
    ('file that is not UTF-8', 'prepare.py', lambda w: [src(w, 'text', path=write(w / 'l1.txt', 'caf\xe9'.encode('latin-1'), 'wb'))],
     ['l1.txt', 'not valid UTF-8', 'iconv']),
    ('primer with no delimiter', 'prepare.py', lambda w: [src(w, 'primer', path=write(w / 'p.txt', 'user: a\nassistant: b\n'))],
     ['p.txt', '<dialogue>']),
    ('primer line before any role', 'prepare.py',
     lambda w: [src(w, 'primer', path=write(w / 'p.txt', 'hello\nuser: a\nassistant: b\n\n<dialogue>\n\nuser: c\nassistant: d\n'))],
     ['p.txt line 1', "'user: '"]),
    ('malformed jsonl line', 'prepare.py',
     lambda w: [src(w, 'chat', path=write(w / 'c.jsonl', '{"messages": []}\n{"messages": [}\n'))], ['c.jsonl line 2', 'not valid JSON']),
    ('conversation with roles out of order', 'prepare.py',
     lambda w: [src(w, 'chat', path=write(w / 'c.jsonl', json.dumps({'messages': [{'role': 'user', 'content': 'a'},
                                                                                   {'role': 'user', 'content': 'b'}]}) + '\n'))],
     ['c.jsonl line 1', "role 'user'", "'assistant' was expected"]),
    ('conversation without a reply', 'prepare.py',
     lambda w: [src(w, 'chat', path=write(w / 'c.jsonl', json.dumps({'messages': [{'role': 'user', 'content': 'a'}]}) + '\n'))],
     ['c.jsonl line 1', 'no assistant reply']),
    ('jsonl that is not UTF-8', 'prepare.py',
     lambda w: [src(w, 'chat', path=write(w / 'c.jsonl', b'{"messages": []}\n{"x": "caf\xe9"}\n', 'wb'))],
     ['c.jsonl', 'not valid UTF-8']),
    ('truncated jsonl.gz', 'prepare.py',
     lambda w: [src(w, 'oasst1', path=write(w / 't.jsonl.gz', __import__('gzip').compress(b'{"prompt": {}}\n' * 500)[:60], 'wb'))],
     ['t.jsonl.gz', 'unreadable']),
    ('dolly row missing a field', 'prepare.py', lambda w: [src(w, 'dolly', path=write(w / 'd.jsonl', '{"instruction": "x"}\n'))],
     ['d.jsonl line 1', "'response'"]),
    ('unknown source kind', 'prepare.py', lambda w: [src(w, 'roma', path='x')], ["unknown kind 'roma'", "did you mean 'roam'"]),
    ('unknown source setting', 'prepare.py', lambda w: [src(w, 'text', path='x', sep='\n')], ["'sep'", 'separator']),
    ('val_frac out of range', 'prepare.py', lambda w: [src(w, 'text', path='x', val_frac=1.5)], ['val_frac', '[0, 1)']),
    ('prepare_sources names an unknown source', 'prepare.py', lambda w: ["--prepare_sources=['rooam']"],
     ["'rooam'", "did you mean 'roam'"]),
    # --- train.py ---
    ('missing mixture source', 'train.py', lambda w: ["--mixture={'wikitext': 1.0}"], ["'wikitext'", 'not in sources', 'prepare.py']),
    ('negative weight', 'train.py', lambda w: ["--mixture={'roam': -1.0, 'story': 1.0}"], ["'roam'", '>= 0']),
    ('weights that add up to zero', 'train.py', lambda w: ["--mixture={'roam': 0.0}"], ['add up to 0']),
    ('source not prepared', 'train.py', lambda w: [shutil.rmtree(w / 'data' / 'story') or '--max_iters=1'],
     ["source 'story'", 'prepare.py']),
    ('shards from another tokenizer', 'train.py', lambda w: [edit_meta(w, 'roam', tokenizer_sha256='ab' * 32) or '--max_iters=1'],
     ['roam', 'another tokenizer', 'prepare.py']),
    ('shard dtype mismatch', 'train.py', lambda w: [edit_meta(w, 'roam', dtype='uint32') or '--max_iters=1'],
     ['shard_00000.bin', 'wrong size', 'prepare.py']),
    ('damaged meta.json', 'train.py', lambda w: [write(w / 'data' / 'roam' / 'train' / 'meta.json', '{"shards": [') and '--max_iters=1'],
     ['meta.json', 'damaged', 'prepare.py']),
    ('block_size larger than the checkpoint', 'train.py', lambda w: [f"--init_from={w / 'ckpt.pt'}", '--block_size=64'],
     ['block_size=64', 'block_size <= 32']),
    ('model shape differs from the checkpoint', 'train.py', lambda w: [f"--init_from={w / 'ckpt.pt'}", '--n_layer=3'],
     ['n_layer=1', 'set n_layer=1']),
    ('checkpoint from another tokenizer', 'train.py', lambda w: [edit_ckpt(w, tokenizer_sha256='cd' * 32)],
     ['other.pt', 'another tokenizer']),
    ('truncated checkpoint', 'train.py',
     lambda w: [write(w / 'cut.pt', (w / 'ckpt.pt').read_bytes()[:3000], 'wb') and f"--init_from={w / 'cut.pt'}"],
     ['cut.pt', 'truncated or corrupt']),
    ('init_from a file that does not exist', 'train.py', lambda w: ['--init_from=out/nowhere.pt'], ['nowhere.pt', 'scratch']),
    ('resume without a checkpoint', 'train.py', lambda w: ['--init_from=resume'], ['no readable checkpoint', "init_from='scratch'"]),
    ('out folder not writable', 'train.py', lambda w: [f"--out_dir={write(w / 'plain_file', 'x')}/run"],
     ['plain_file', 'cannot write', 'out_dir']),
    ('float16 on a CPU', 'train.py', lambda w: ['--dtype=float16', '--device=cpu'], ['float16', 'bfloat16']),
    ('unknown dtype', 'train.py', lambda w: ['--dtype=fp8'], ["'fp8'", 'bfloat16']),
    # --- sample.py (completion and chat) ---
    ('no checkpoint to sample from', 'sample.py', lambda w: [f"--ckpt={w / 'none.pt'}"], ['none.pt', 'train.py']),
    ('sample a checkpoint from another tokenizer', 'sample.py',
     lambda w: [edit_ckpt(w, tokenizer_sha256='ef' * 32).replace('--init_from', '--ckpt')], ['other.pt', 'another tokenizer']),
    ('sample a truncated checkpoint', 'sample.py',
     lambda w: [f"--ckpt={write(w / 'cut.pt', (w / 'ckpt.pt').read_bytes()[:3000], 'wb') and w / 'cut.pt'}"],
     ['cut.pt', 'truncated or corrupt']),
    ('prompt file missing', 'sample.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--start=FILE:nothing.txt'], ['nothing.txt', 'no such file']),
    ('chat with a missing system file', 'sample.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--interactive', '--system_file=voice.txt'],
     ['voice.txt', 'no such file']),
    ('chat with a folder as its system file', 'sample.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--interactive', f"--system_file={w}"],
     ['system_file', 'is a folder', 'text file']),
    # export writes chat's system prompt into the model's templates: the same rules, the same words
    ('export with a missing system file', 'export.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--system_file=voice.txt'],
     ['voice.txt', 'no such file', "set it to ''"]),
    ('export with a system file that is not UTF-8', 'export.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}",
                f"--system_file={write(w / 'voice.txt', b'caf' + bytes([0xe9]), 'wb')}"],
     ['voice.txt', 'not valid UTF-8', 'iconv']),

    # --- numbers that make no sense: every key has a valid range, checked by every stage before any work ---
    ('no micro-batches per step', 'train.py', lambda w: ['--gradient_accumulation_steps=0'],
     ['gradient_accumulation_steps=0', '--gradient_accumulation_steps', '>= 1']),
    ('no validation batches', 'train.py', lambda w: ['--eval_iters=0'], ['eval_iters=0', '>= 1']),
    ('negative max_iters', 'train.py', lambda w: ['--max_iters=-1'], ['max_iters=-1', '>= 0']),
    ('no rows per batch', 'train.py', lambda w: ['--batch_size=0'], ['batch_size=0', '>= 1']),
    ('evaluate every 0 steps', 'train.py', lambda w: ['--eval_interval=0'], ['eval_interval=0', '>= 1']),
    ('log every 0 steps', 'train.py', lambda w: ['--log_interval=0'], ['log_interval=0', '>= 1']),
    ('dropout above 1', 'train.py', lambda w: ['--dropout=1.5'], ['dropout=1.5', '[0, 1)']),
    ('negative learning rate', 'train.py', lambda w: ['--learning_rate=-0.001'], ['learning_rate=-0.001', '> 0']),
    ('NaN learning rate in a config file', 'train.py', lambda w: [write(w / 'nan.py', "learning_rate = float('nan')\n")],
     ['learning_rate=nan', 'nan.py line 1', 'finite']),
    ('infinite learning rate', 'train.py', lambda w: ['--learning_rate=1e999'], ['learning_rate=inf', 'finite']),
    ('n_embd not divisible by n_head', 'train.py', lambda w: ['--n_embd=100', '--n_head=3'],
     ['n_embd=100', 'n_head=3', 'multiple', 'e.g. 96']),
    ('n_head not divisible by n_kv_head', 'train.py', lambda w: ['--n_head=4', '--n_kv_head=3', '--n_embd=32'],
     ['n_head=4', 'n_kv_head=3', 'divisor']),
    ('odd head size', 'train.py', lambda w: ['--n_embd=6', '--n_head=2'], ['n_embd / n_head = 3', 'even']),
    ('beta2 of 1', 'train.py', lambda w: ['--beta2=1.0'], ['beta2=1.0', '[0, 1)']),
    ('negative warmup', 'train.py', lambda w: ['--warmup_iters=-5'], ['warmup_iters=-5', '>= 0']),
    ('negative temperature', 'sample.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--temperature=-1'],
     ['temperature=-1.0', '>= 0']),
    ('negative top_k', 'sample.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--top_k=-3'], ['top_k=-3', '>= 0']),
    ('top_p of 0', 'sample.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--top_p=0'], ['top_p=0.0', '(0, 1]']),
    ('no new tokens', 'sample.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--max_new_tokens=0'], ['max_new_tokens=0', '>= 1']),
    ('a device this machine lacks', 'sample.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--device=cuda' if not torch.cuda.is_available() else '--device=cuda:99'],
     ['device=', 'cpu']),
    ('a device that does not exist', 'train.py', lambda w: ['--device=gpu'], ["device='gpu'", 'cuda']),
    ('negative seed', 'prepare.py', lambda w: ['--seed=-1'], ['seed=-1', '[0, 4294967295]']),
    ('empty shards', 'prepare.py', lambda w: ['--shard_tokens=0'], ['shard_tokens=0', '>= 1']),
    ('negative worker count', 'prepare.py', lambda w: ['--num_proc=-2'], ['num_proc=-2', '>= 0']),
    ('vocabulary smaller than the bytes', 'tokenizer.py', lambda w: [f"--tokenizer_path={w / 'new.model'}", '--vocab_size=100'],
     ['vocab_size=100', '>= 265']),
    ('tokenizer type misspelt', 'tokenizer.py', lambda w: ['--tokenizer_type=bpee'], ["'bpee'", "did you mean 'bpe'"]),
    ('negative eval_limit', 'eval.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--eval_limit=-1'], ['eval_limit=-1', '>= 0']),

    # --- a string where a list or a dict is expected ---
    ('a source name where a list is expected', 'prepare.py', lambda w: ['--prepare_sources=rooam'],
     ["'rooam'", "did you mean 'roam'"]),
    ('a string where tokenizer_sources wants a dict', 'tokenizer.py', lambda w: ['--tokenizer_sources=roam'],
     ['tokenizer_sources must be None or a dict', "'roam'"]),
    ('a dict where val_sources wants a list', 'train.py', lambda w: ["--val_sources={'roam': 1}"],
     ['val_sources must be None or a list']),
    ('a tokenizer byte budget that is not a number', 'tokenizer.py',
     lambda w: [f"--tokenizer_path={w / 'new.model'}", "--tokenizer_sources={'roam': 'all'}"], ["tokenizer_sources['roam']", 'bytes']),

    # --- which checkpoint, and why ---
    ('best.pt under out_dir from another tokenizer', 'sample.py',
     lambda w: [os.makedirs(w / 'out' / 'pretrain') or shutil.move(edit_ckpt(w, tokenizer_sha256='ab' * 32)[12:],
                                                                    w / 'out' / 'pretrain' / 'best.pt') and '--max_new_tokens=2'],
     ['best.pt', "the best checkpoint of phase 'pretrain'", 'out_dir=', 'tokenizer_path']),
    ('init_from from another tokenizer says where init_from was set', 'train.py',
     lambda w: [write(w / 'sft.py', f"init_from = {edit_ckpt(w, tokenizer_sha256='cd' * 32)[12:]!r}\n")],
     ['other.pt', 'init_from, from', 'sft.py line 1', 'another tokenizer']),

    # --- benchmark files: every row checked before any model work ---
    ('BoolQ answer given as a string', 'eval.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--boolq={write(w / 'b.jsonl', BOOLQ + json.dumps({**json.loads(BOOLQ), 'answer': 'false'}))}"],
     ['b.jsonl line 2', "'answer'", 'true or false', "'false'"]),
    ('BoolQ row without a passage', 'eval.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--boolq={write(w / 'b.jsonl', json.dumps({'question': 'q', 'answer': True}))}"],
     ['b.jsonl line 1', "no field 'passage'", 'question, passage, answer']),
    ('empty benchmark file', 'eval.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--boolq={write(w / 'b.jsonl', '')}"],
     ['b.jsonl', 'no rows']),
    ('HellaSwag label out of range', 'eval.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--hellaswag={write(w / 'h.jsonl', hellaswag_row(label=4))}"],
     ['h.jsonl line 1', "'label'", '0 to 3', '4']),
    ('HellaSwag label not a number', 'eval.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--hellaswag={write(w / 'h.jsonl', hellaswag_row(label='two'))}"],
     ['h.jsonl line 1', "'label'", "'two'"]),
    ('HellaSwag endings given as a string', 'eval.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--hellaswag={write(w / 'h.jsonl', hellaswag_row(endings='abcd'))}"],
     ['h.jsonl line 1', "'endings'", 'list of at least 2 strings']),
    ('HellaSwag file with only ctx', 'eval.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--hellaswag={write(w / 'h.jsonl', json.dumps({'ctx': 'x', 'endings': ['a', 'b'], 'label': 0}))}"],
     ['h.jsonl line 1', "no field 'activity_label'", 'ctx_a, ctx_b']),
    ('benchmark line with a lone surrogate', 'eval.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--boolq=' + write(w / 'b.jsonl', BOOLQ.replace('is it', 'is it \\ud83d'))],
     ['b.jsonl line 1', "'\\ud83d'", 'surrogate']),
    ('results folder not writable', 'eval.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--eval_out={write(w / 'plain', 'x')}/res"],
     ['plain/res', 'cannot write', 'eval_out']),

    # --- primers, lone surrogates, disks ---
    ('primer with an empty reply', 'prepare.py',
     lambda w: [src(w, 'primer', path=write(w / 'p.txt', 'user: a\nassistant: b\n\n<dialogue>\n\nuser: c\nassistant:\n\n'
                                                         '<dialogue>\n\nuser: e\nassistant: f\n'))],
     ['p.txt line 7', 'assistant turn', 'starting at line 6', 'empty']),
    ('primer with an empty question', 'prepare.py',
     lambda w: [src(w, 'primer', path=write(w / 'p.txt', 'user:   \nassistant: b\n\n<dialogue>\n\nuser: c\nassistant: d\n'))],
     ['p.txt line 1', 'user turn', 'empty']),
    ('chat jsonl with a lone surrogate', 'prepare.py',
     lambda w: [src(w, 'chat', path=write(w / 'c.jsonl', CHAT + CHAT.replace('"q"', '"q \\udc00"')))],
     ['c.jsonl line 2', "'\\udc00'", 'surrogate']),
    ('tokenizer on a jsonl with a lone surrogate', 'tokenizer.py',
     lambda w: [f"--tokenizer_path={w / 'new.model'}", src(w, 'chat', path=write(w / 'c.jsonl', CHAT.replace('"a"', '"\\ud83d"')))],
     ['c.jsonl line 1', "'\\ud83d'"]),
    ('show_chat with a lone surrogate', 'tokenizer.py',
     lambda w: ['--show_chat=' + write(w / 'c.json', json.dumps([{'role': 'user', 'content': 'x'}]).replace('x', '\\ud83d'))],
     ['c.json', 'surrogate']),
    ('prompt file that is not UTF-8', 'sample.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--start=FILE:{write(w / 'p.txt', b'caf' + bytes([0xe9]), 'wb')}"],
     ['p.txt', 'not valid UTF-8', 'iconv']),
    ('data folder that cannot be made', 'prepare.py', lambda w: [f"--data_dir={write(w / 'plain', 'x')}/data"],
     ['plain/data', 'cannot write', 'data_dir']),
    ('tokenizer folder that cannot be made', 'tokenizer.py', lambda w: [f"--tokenizer_path={write(w / 'plain', 'x')}/t.model"],
     ['plain', 'cannot write', 'tokenizer_path']),
    ('disk full while preparing', 'prepare.py',
     # (quality_filter off: one sentence 30,000 times is junk)
     lambda w: [f"--data_dir={w / 'data2'}", '--quality_filter=False',
                src(w, 'text', path=write(w / 'big.txt', 'Plenty of words here. ' * 30000))],
     ['data2', 'File too large', "source 's'", 'free some space'], 70_000),
    ('disk full while writing the tokenizer', 'tokenizer.py', lambda w: [f"--tokenizer_path={w / 'new.model'}"],
     ['new.model', 'File too large', 'free some space'], 6_000),  # (the model is ~8 KB)
    ('disk already full before prepare starts', 'prepare.py', lambda w: [f"--data_dir={w / 'data2'}"],
     ['data2', 'cannot write', 'File too large', 'data_dir'], 1_000),
    ('export folder that cannot be made', 'export.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--gguf_type=none', f"--export_dir={write(w / 'plain', 'x')}/exp/hf"],
     ['plain/exp', 'cannot write', 'export_dir']),
    ('export type misspelt', 'export.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--gguf_type=q8'], ["'q8'", "did you mean 'q8_0'"]),
    ('disk already full before eval starts', 'eval.py', lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--eval_out={w / 'res'}"],
     ['res', 'cannot write', 'eval_out'], 1_000),

    # --- issue 24: chat rows checked before use (file, line and field named) ---
    ('chat message without content', 'prepare.py',
     lambda w: [chat_src(w, CHAT + chat_line({'role': 'user'}, ASST))],
     ['c.jsonl line 2', 'message 1', "no 'content'"]),
    ('chat content a number', 'prepare.py',
     lambda w: [chat_src(w, chat_line({'role': 'user', 'content': 5}, ASST))],
     ['c.jsonl line 1', 'message 1', "'content' must be a string", 'got 5']),
    ('chat messages a string', 'prepare.py',
     lambda w: [chat_src(w, CHAT + json.dumps({'messages': 'hi there'}) + '\n')],
     ['c.jsonl line 2', "'messages' must be a list", '"hi there"']),
    ('chat content null (a tool call)', 'tokenizer.py',
     lambda w: [new_tok(w), chat_src(w, chat_line(
         USER, {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'x'}]}))],
     ['c.jsonl line 1', 'message 2', "'content' must be a string", 'got null']),
    ('chat message that is not an object', 'tokenizer.py',
     lambda w: [new_tok(w), chat_src(w, chat_line('hi', ASST))],
     ['c.jsonl line 1', 'message 1', "'role' and 'content'", '"hi"']),
    ('chat content a list of parts', 'prepare.py',
     lambda w: [chat_src(w, chat_line({'role': 'user', 'content': [{'type': 'text', 'text': 'q'}]},
                                      ASST))],
     ['c.jsonl line 1', 'message 1', "'content' must be a string", 'got a list']),
    ('chat row that is not an object', 'tokenizer.py',
     lambda w: [new_tok(w), chat_src(w, CHAT + '[1, 2]\n')], ['c.jsonl line 2', '"messages"']),
    ('dolly context a number', 'prepare.py',
     lambda w: [src(w, 'dolly', path=write(w / 'd.jsonl', json.dumps(
         {'instruction': 'i', 'context': 7, 'response': 'r'})))],
     ['d.jsonl line 1', "'context'", 'string']),
    ('oasst1 message text null', 'prepare.py',
     lambda w: [oasst_src(w, replies=[{'role': 'assistant', 'text': None, 'lang': 'en'}])],
     ['t.jsonl line 1', "'text'", 'got null']),
    ('oasst1 reply without a role', 'tokenizer.py',
     lambda w: [new_tok(w), oasst_src(w, replies=[{'text': 'a', 'lang': 'en'}])],
     ['t.jsonl line 1', "'role'"]),
    ('oasst1 replies not a list', 'prepare.py', lambda w: [oasst_src(w, replies='none')],
     ['t.jsonl line 1', "'replies'", 'list']),

    # --- issue 24: every source setting type-checked, the source and the setting named ---
    ('roam glob None', 'prepare.py', lambda w: [src(w, 'roam', path=str(w), glob=None)],
     ["sources['s']", "'glob'", 'got None']),
    ('text separator a number', 'prepare.py',
     lambda w: [src(w, 'text', path=a_file(w), separator=5)],
     ["sources['s']", "'separator'", 'got int 5']),
    ('text separator empty', 'prepare.py', lambda w: [src(w, 'text', path=a_file(w), separator='')],
     ["sources['s']", "'separator'", 'None']),
    ('source path a pathlib.Path', 'prepare.py',
     lambda w: [write(w / 'p.py', f"import pathlib\nsources = {{'s': {{'kind': 'text', "
                                  f"'path': pathlib.Path({a_file(w)!r})}}}}\n")],
     ["sources['s']", "'path'", 'PosixPath', 'str(']),
    ('source path a list with a number', 'tokenizer.py',
     lambda w: [src(w, 'text', path=[a_file(w), 3])],
     ["sources['s']", "'path'", 'list of strings']),
    ('source path empty', 'prepare.py', lambda w: [src(w, 'text', path='')],
     ["sources['s']", "'path'", 'empty']),
    ('roam add_title a string', 'prepare.py',
     lambda w: [src(w, 'roam', path=str(w), add_title='no')],
     ["sources['s']", "'add_title'", 'True or False']),
    ('val_frac given as False', 'prepare.py',
     lambda w: [src(w, 'text', path=a_file(w), val_frac=False)],
     ["sources['s']", 'val_frac', 'got False']),
    ('dolly categories a string', 'prepare.py',
     lambda w: [src(w, 'dolly', path=a_file(w), categories='open_qa')],
     ["sources['s']", "'categories'", 'list', "['open_qa']"]),
    ('oasst1 lang a list', 'tokenizer.py',
     lambda w: [src(w, 'oasst1', path=a_file(w), lang=['en'])],
     ["sources['s']", "'lang'", 'string']),
    ('fineweb files a string', 'prepare.py',  # (no retries: unchecked, it went downloading)
     lambda w: ['--download_retries=0', src(w, 'fineweb_edu', files='000_00000.parquet')],
     ["sources['s']", "'files'", 'list of strings']),
    ('train_tokens given as True', 'prepare.py',
     lambda w: ['--download_retries=0', src(w, 'fineweb_edu', train_tokens=True)],
     ["sources['s']", 'train_tokens', 'got True']),
    ('download size a string', 'prepare.py',
     lambda w: ['--download_retries=0', src(w, 'tinyshakespeare', size='1 MB')],
     ["sources['s']", "'size'", "'1 MB'"]),
    ('source kind a list', 'prepare.py', lambda w: [src(w, ['roam'], path=str(w))],
     ["sources['s']", 'kind', "['roam']"]),
    ('source named with an empty string', 'prepare.py', lambda w: [named(w, '')],
     ["sources['']", 'name']),
    ('source named with a number', 'prepare.py', lambda w: [named(w, 3)],
     ['source name 3', 'string']),
    ('source name with a slash', 'tokenizer.py', lambda w: [named(w, 'a/b')],
     ["sources['a/b']", "'/'"]),
    ('source name with dots', 'prepare.py', lambda w: [named(w, '..')], ["sources['..']", "'.'"]),
    ('source named like a temp folder', 'prepare.py',  # (prepare.py removes <name>.tmp of <name>)
     lambda w: [named(w, 'notes.tmp')], ["sources['notes.tmp']", '.tmp']),
    ('text source pointed at a folder', 'prepare.py',
     lambda w: [src(w, 'text', path=str(w / 'data'))],
     ['data', 'is a folder', "'roam'", '**/*.txt']),

    # --- issue 24: tokenizer files ---
    ('tokenizer_path a tokenizer.json', 'prepare.py',
     lambda w: ['--tokenizer_path=' + write(w / 'tokenizer.json',
                                            json.dumps({'model': {'type': 'BPE'}}))],
     ['tokenizer.json', 'without', 'byte-level BPE']),
    ('sample with a tokenizer.json', 'sample.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", f"--tokenizer_path={write(w / 'tokenizer.json', '{}')}"],
     ['tokenizer.json', 'only byte-level BPE tokenizers']),
    ('empty tokenizer file', 'train.py',
     lambda w: [f"--tokenizer_path={write(w / 'empty.model', '')}"],
     ['empty.model', 'empty']),
    ('truncated tokenizer file', 'eval.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--tokenizer_path=' + write(
         w / 'cut.model', (w / 'tokenizer.model').read_bytes()[:3000], 'wb')],
     ['cut.model', 'not a SentencePiece model']),
    ('tokenizer_path a folder', 'prepare.py', lambda w: [f"--tokenizer_path={w / 'data'}"],
     ['data', 'is a folder']),
    ('tokenizer.py with tokenizer_path a folder', 'tokenizer.py',
     lambda w: [f"--tokenizer_path={w / 'data'}"], ['data', 'is a folder']),
    ('tokenizer.model replaced by another file', 'tokenizer.py',  # (the settings are the same)
     lambda w: replace_tokenizer(w) or [],
     ['tokenizer.model', 'sha256', 'replaced']),
    ('damaged tokenizer record', 'tokenizer.py',
     lambda w: [write(w / 'tokenizer.model.json', '{"settings": ')],
     ['tokenizer.model.json', 'damaged']),
    ('empty out_dir', 'tokenizer.py', lambda w: ['--out_dir='], ['out_dir', 'empty']),

    # --- issue 24: folders that are not ours are never replaced or deleted ---
    ('data_dir the folder holding the notes', 'prepare.py',  # (roam/ was swapped out and deleted)
     lambda w: notes(w, data_dir=w / 'notes'),
     ['notes/roam', 'did not write', "'page 1.md'", 'data_dir']),
    ('data_dir inside a notes folder', 'prepare.py',
     lambda w: notes(w, data_dir=w / 'notes' / 'roam' / 'shards'),
     ["source 'roam'", 'data_dir', 'among its notes']),
    ('data_dir a notes folder', 'prepare.py', lambda w: notes(w, data_dir=w / 'notes' / 'roam'),
     ["source 'roam'", 'data_dir', 'among its notes']),
    ('an old folder of a source that is not prepare\'s', 'prepare.py',
     lambda w: [write(w / 'data' / 'story.old' / 'mine.txt', 'mine') and '--prepare_sources=story'],
     ['story.old', 'did not write', "'mine.txt'"]),
    ('a file where a source\'s shards go', 'prepare.py',
     lambda w: [write(w / 'data' / 'notes', 'my notes') and named(w, 'notes')],
     ['data/notes', 'did not write', 'not a folder']),
    ('data_dir out_dir with a source named like the phase', 'prepare.py',
     lambda w: [write(w / 'out' / 'pretrain' / 'ckpt.pt', 'weights') and f"--data_dir={w / 'out'}",
                named(w, 'pretrain')],
     ['out/pretrain', 'did not write', "'ckpt.pt'"]),
    ('export over the workspace with overwrite', 'export.py',  # (tokenizer, data, ckpt: all gone)
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--gguf_type=none', f'--export_dir={w}',
                '--overwrite=True'],
     ['export_dir', 'did not write', "'ckpt.pt'", "'data'"]),
    ('export over data_dir with overwrite', 'export.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--gguf_type=none', f"--export_dir={w / 'data'}",
                '--overwrite=True'],
     ['export_dir', 'did not write', "'roam'"]),
    ('export_dir a checkpoint file with overwrite', 'export.py',
     lambda w: [f"--ckpt={w / 'ckpt.pt'}", '--gguf_type=none', f"--export_dir={w / 'ckpt.pt'}",
                '--overwrite=True'],
     ['ckpt.pt', 'did not write', 'a file']),
    ('phase that leaves out_dir', 'train.py', lambda w: ['--phase=..'],
     ["phase='..'", 'out_dir', 'sft']),

    # --- issue 24: damaged prepared files, checked when a split is opened ---
    ('loss mask deleted', 'train.py',
     lambda w: [os.remove(w / 'data' / 'primer' / 'train' / 'mask_00000.bin') or '--max_iters=1'],
     ['primer/train/mask_00000.bin', 'missing', 'prepare.py']),
    ('loss mask truncated', 'eval.py',
     lambda w: [cut(w / 'data' / 'primer' / 'val' / 'mask_00000.bin', 1),
                f"--ckpt={w / 'ckpt.pt'}"],
     ['primer/val/mask_00000.bin', 'wrong size', 'prepare.py']),
    ('document index truncated', 'train.py',
     lambda w: [cut(w / 'data' / 'roam' / 'train' / 'docs_00000.bin', 8), '--max_iters=1'],
     ['roam/train/docs_00000.bin', 'wrong size', 'documents', 'prepare.py']),
    ('document index out of order', 'train.py',
     lambda w: [reorder(w / 'data' / 'roam' / 'train' / 'docs_00000.bin') or '--max_iters=1'],
     ['roam/train/docs_00000.bin', 'damaged', 'increase', 'prepare.py']),
    ('shard entry without its counts', 'train.py',
     lambda w: [edit_meta(w, 'roam', shards=[{'file': 'shard_00000.bin'}]) or '--max_iters=1'],
     ['roam/train/meta.json', 'damaged', 'prepare.py']),

    # --- issue 24: checkpoints ---
    ('checkpoint folder in use by another run', 'train.py',
     lambda w: [write(w / 'out' / 'pretrain' / 'train.lock', json.dumps(
         {'pid': os.getpid(), 'host': socket.gethostname()})) and '--max_iters=1'],
     ['train.lock', f'pid {os.getpid()}', 'One run at a time']),
    ('disk full while saving a checkpoint', 'train.py',
     lambda w: ['--max_iters=2', '--eval_interval=1'],
     ['could not write', 'best.pt', 'Free some space', "init_from='resume'"], 100_000),
]


def notes(w, data_dir):
    """A notes folder (roam/ with pages) and a roam source reading it, with this data_dir."""
    for i in range(3):
        write(w / 'notes' / 'roam' / f'page {i}.md', f'- note {i}\n')
    return [f"--data_dir={data_dir}",
            f"--sources={ {'roam': {'kind': 'roam', 'path': str(w / 'notes' / 'roam')}}!r}"]


def cut(path, n):
    """`path` less its last n bytes (a file cut short); returns an argument for the run."""
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - n)
    return '--max_iters=1'


def reorder(path):
    import numpy as np
    starts = np.fromfile(path, dtype=np.int64)
    starts[1], starts[2] = starts[2], starts[1]
    starts.tofile(path)

USER, ASST = {'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}


def chat_line(*messages):
    return json.dumps({'messages': list(messages)}) + '\n'


def chat_src(w, text):
    return src(w, 'chat', path=write(w / 'c.jsonl', text))


def oasst_src(w, replies):
    prompt = {'role': 'prompter', 'text': 'q', 'lang': 'en', 'replies': replies}
    return src(w, 'oasst1', path=write(w / 't.jsonl', json.dumps({'prompt': prompt})))


def new_tok(w):
    return f"--tokenizer_path={w / 'new.model'}"


def a_file(w):
    return str(w / 'cfg.py')


def named(w, name):
    """A source with this name (which is all that is wrong with it)."""
    return f"--sources={ {name: {'kind': 'text', 'path': a_file(w)}}!r}"

BOOLQ = json.dumps({'question': 'is it', 'passage': 'it is.', 'answer': True}) + '\n'
CHAT = json.dumps({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}) + '\n'


def hellaswag_row(**changes):
    row = {'activity_label': 'Biking', 'ctx_a': 'A man rides.', 'ctx_b': 'he', 'endings': ['a', 'b', 'c', 'd'], 'label': 0}
    return json.dumps({**row, **changes}) + '\n'


def small_disk(limit):
    """A disk that fills up after `limit` bytes per file: RLIMIT_FSIZE fails every write past it (EFBIG, as ENOSPC
    would). A case with a fifth element runs on one."""
    import resource
    import signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the signal ends the process before the error)


def snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = hashlib.sha256(open(p, 'rb').read()).hexdigest()
    return out


def test_the_catalogue_has_at_least_145_cases_across_every_stage():
    assert len(CASES) >= 145  # 49 before issue 16, 105 before issue 24
    assert {case[1] for case in CASES} == {'tokenizer.py', 'prepare.py', 'train.py', 'sample.py', 'eval.py', 'export.py'}
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_bad_input(ws, case):
    _, script, setup, words, *options = case
    args = setup(ws)
    before = snapshot(ws)
    kw = {'preexec_fn': lambda: small_disk(*options)} if options else {}
    p = run(script, ws / 'cfg.py', *args, input='hello\n', **kw)
    assert p.returncode != 0, p.stdout
    assert 'Traceback' not in p.stderr, p.stderr
    assert 'SystemExit' not in p.stderr, p.stderr  # (a message never shows Python's insides)
    for word in words:
        assert word in p.stderr, (word, p.stderr)
    after = snapshot(ws)
    damaged = [path for path, digest in before.items() if after.get(path) != digest]
    assert not damaged, damaged
    left = [path for path in after if '.tmp' in os.path.relpath(path, ws)]
    assert not left, f"temp files left behind: {left}"
