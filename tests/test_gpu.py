"""The CUDA paths: bf16 and fp16 (GradScaler) training with AdamW and Muon, torch.compile, fused AdamW, flash
attention, the KV cache on the GPU, resume. Marked `gpu`: they skip on machines without CUDA (CI), and run where
one is lent (`python -m pytest -m gpu`)."""
import pytest
import torch

from conftest import metrics, run, tiny_train_config
from model import GPT, ModelConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def losses(out):
    return [r['loss'] for r in metrics(str(out)) if 'loss' in r]


@pytest.mark.parametrize('dtype,compile,optimizer', [
    ('bfloat16', False, 'adamw'), ('bfloat16', True, 'adamw'), ('float16', False, 'adamw'), ('float16', True, 'adamw'),
    ('bfloat16', True, 'muon'), ('float16', False, 'muon')])  # Muon: bf16 Newton-Schulz, under the GradScaler
def test_training_on_the_gpu_learns_and_resumes(tmp_path, prepared, dtype, compile, optimizer):
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'out', device='cuda', dtype=dtype,
                            compile=compile, max_iters=30, eval_interval=15, learning_rate=1e-2,
                            optimizer=optimizer, lr_schedule='wsd' if optimizer == 'muon' else 'cosine')
    p = run('train.py', cfg, check=True)
    assert 'cuda' in p.stdout and dtype in p.stdout and ('Muon' in p.stdout) == (optimizer == 'muon')
    first, last = losses(tmp_path / 'out')[0], losses(tmp_path / 'out')[-1]
    assert last < first - 0.5, (first, last)  # it learns
    ckpt = torch.load(tmp_path / 'out' / 'pretrain' / 'ckpt.pt', weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert bool(ckpt['scaler']) == (dtype == 'float16')  # the GradScaler's state travels with fp16 runs
    run('train.py', cfg, '--init_from=resume', '--max_iters=35', check=True)
    assert torch.load(tmp_path / 'out' / 'pretrain' / 'ckpt.pt', weights_only=True)['iter'] == 35


def test_sft_and_chat_on_the_gpu(sft_trained):
    cfg, out = sft_trained  # trained on the GPU when one is there (device auto)
    p = run('sample.py', cfg, '--device=cuda', '--interactive', '--temperature=0', input='what does the cat eat?\n',
            check=True)
    assert 'salt and flour.' in p.stdout


def test_adamw_is_fused_on_cuda():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)).cuda()
    opt = model.optimizer(1e-3, 0.1, (0.9, 0.95), 'cuda')
    assert opt.defaults['fused'] is True


@pytest.mark.parametrize('n_kv_head', [4, 2])
def test_causal_attention_runs_on_the_flash_kernel(n_kv_head):
    """Unmasked (pretraining) attention must be eligible for flash attention in bf16, with and without GQA:
    restricted to the flash kernel alone, a forward that could not use it raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                            n_embd=256)).cuda()
    idx = torch.randint(0, 256, (2, 128), device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash, _ = model(idx)
        with sdpa_kernel(SDPBackend.MATH):
            math, _ = model(idx)
    torch.testing.assert_close(flash.float(), math.float(), atol=3e-2, rtol=3e-2)


def test_kv_cache_decode_on_the_gpu_matches_the_full_forward():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)).cuda().eval()
    prompt = torch.randint(0, 256, (20,)).tolist()
    cached = list(model.generate(prompt, 30, temperature=0, use_cache=True))
    full = list(model.generate(prompt, 30, temperature=0, use_cache=False))
    assert cached == full


def test_bench_runs_on_the_gpu(tmp_path):
    out = tmp_path / 'bench.json'
    run('bench.py', '--bench=matmul', f'--bench_json={out}', check=True)
    assert out.exists()


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="for a machine with exactly one GPU")
def test_more_processes_than_gpus_is_a_clear_error(tmp_path, prepared):
    import subprocess
    import sys
    from conftest import REPO
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c', device='cuda', gradient_accumulation_steps=2,
                            max_iters=2)
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', cfg], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and 'more processes than it has GPUs' in p.stdout + p.stderr
