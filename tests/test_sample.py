import io
import os

import pytest
import torch

from conftest import load_cfg, run
import sample
from tokenizer import Tokenizer


def test_same_seed_same_text_and_different_seed_different_text(trained):
    cfg, _ = trained
    args = (cfg, '--start=the', '--max_new_tokens=40', '--temperature=1.0', '--num_samples=2')
    a, b = run('sample.py', *args, '--seed=1', check=True), run('sample.py', *args, '--seed=1', check=True)
    c = run('sample.py', *args, '--seed=2', check=True)
    assert a.stdout == b.stdout and a.stdout != c.stdout
    assert a.stdout.startswith('the') and a.stdout.count('-' * 40) == 1


def test_greedy_is_the_same_with_and_without_the_kv_cache(trained):
    cfg, _ = trained
    args = (cfg, '--start=a garden', '--max_new_tokens=25', '--temperature=0')
    cached = run('sample.py', *args, check=True).stdout
    assert cached == run('sample.py', *args, '--use_kv_cache=False', check=True).stdout


def test_start_from_file_and_explicit_ckpt(trained, tmp_path):
    cfg, out = trained
    (tmp_path / 'prompt.txt').write_text('tomato')
    p = run('sample.py', cfg, f'--start=FILE:{tmp_path}/prompt.txt', f'--ckpt={out}/pretrain/ckpt.pt',
            '--max_new_tokens=5', check=True)
    assert p.stdout.startswith('tomato')


def test_streaming_never_splits_a_character(trained):
    tok = Tokenizer(load_cfg(trained[0]).tokenizer_path)
    text = 'caf\u00e9 \u4e2d\u6587 \U0001F600 \u2581 done'
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # several byte tokens per rare character

    class Recorder(io.StringIO):
        pieces = []

        def write(self, s):
            self.pieces.append(s)
            return super().write(s)

    out = Recorder()
    assert sample.stream(tok, iter(ids), out) == ids
    assert out.getvalue() == text and not any('\ufffd' in p for p in out.pieces)


def test_missing_or_foreign_checkpoint_is_a_clear_error(trained, tmp_path):
    cfg, out = trained
    p = run('sample.py', cfg, f'--ckpt={tmp_path}/none.pt')
    assert p.returncode != 0 and 'none.pt' in p.stderr and 'Traceback' not in p.stderr
    state = torch.load(os.path.join(out, 'pretrain', 'ckpt.pt'), weights_only=True)
    state['tokenizer_sha256'] = '0' * 64
    torch.save(state, tmp_path / 'foreign.pt')
    p = run('sample.py', cfg, f'--ckpt={tmp_path}/foreign.pt')
    assert p.returncode != 0 and 'another tokenizer' in p.stderr
