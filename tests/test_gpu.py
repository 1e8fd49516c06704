"""The CUDA paths: bf16 and fp16 (GradScaler) training with AdamW and Muon, torch.compile, fused AdamW, flash
attention, FlexAttention over packed SFT rows, the KV cache on the GPU, resume; an imported model's SFT with
retrieval, pairs.py, DPO and serve.py. Marked `gpu`: they skip on machines without CUDA (CI), and run where one
is lent (`python -m pytest -m gpu`, or `.ci/gpu`)."""
import pytest
import torch

from conftest import load_cfg, metrics, run, tiny_train_config
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


def test_packed_rows_learn_through_flex_attention_as_through_the_dense_mask():
    """SFT rows packing several documents: on CUDA they go through FlexAttention (model.use_flex);
    its gradients must be the dense mask's (a mask that let documents see each other, or a kernel
    that dropped a tile, would change them)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, block_size=256, n_layer=2, n_head=4, n_kv_head=2,
                            n_embd=64)).cuda()
    x = torch.randint(0, 97, (2, 256), device='cuda')
    y = torch.randint(0, 97, (2, 256), device='cuda')
    y[:, :40] = -1  # (prompt tokens: no loss, as SFT rows have)
    doc_ids = torch.tensor([[0] * 30 + [1] * 150 + [2] * 76, [0] * 200 + [1] * 56], device='cuda')
    grads = {}
    for attention in ('dense', 'flex'):
        model.document_attention = attention
        model.zero_grad()
        _, loss = model(x, y, doc_ids=doc_ids)
        loss.backward()
        grads[attention] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert grads['flex'][0] == pytest.approx(grads['dense'][0], rel=1e-5)
    for flex, dense in zip(grads['flex'][1], grads['dense'][1]):
        torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-3)


def test_an_imported_model_fine_tunes_prefers_and_serves_on_the_gpu(tmp_path, corpus):
    """The notes profile's path on CUDA, in bf16 and compiled: a pretrained ChatML model imported
    (tiny_pretrained), SFT on the primer with the notes retrieved, pairs.py's pairs, DPO on them
    (its reference frozen), and serve.py answering as sample.py does."""
    pytest.importorskip('transformers')
    openai = pytest.importorskip('openai')
    from conftest import tiny_pretrained, write_config
    from test_serve import Server
    base = tiny_pretrained(tmp_path / 'base', corpus)
    out = tmp_path / 'out'
    common = dict(base_model=base, device='cuda', dtype='bfloat16', compile=True,
                  block_size=128, batch_size=4, eval_iters=1, log_interval=1, warmup_iters=1,
                  retrieve_from='roam', retrieve_k=2, retrieve_chunk_chars=120,
                  unanswerable_frac=0.25, max_new_tokens=12, compile_decode=False)
    cfg = write_config(tmp_path / 'sft.py', str(out), corpus, init_from='base_model', phase='sft',
                       mixture={'primer': 1.0}, val_sources=['primer'], max_iters=12,
                       eval_interval=6, learning_rate=1e-3, **common)
    for stage in ('tokenizer.py', 'prepare.py'):
        run(stage, cfg, check=True)
    p = run('train.py', cfg, check=True)
    assert 'cuda' in p.stdout and 'bfloat16' in p.stdout
    first, last = losses(out)[0], losses(out)[-1]
    assert last < first, (first, last)
    pairs = out / 'pairs.jsonl'
    run('pairs.py', cfg, f'--pairs_out={pairs}', '--pairs_from=primer', check=True)
    sources = {**load_cfg(cfg).sources, 'pairs': {'kind': 'pairs', 'path': str(pairs)}}
    dpo = write_config(tmp_path / 'dpo.py', str(out), corpus, init_from=str(out / 'sft' / 'ckpt.pt'),
                       phase='dpo', mixture={'pairs': 1.0}, max_iters=6, eval_interval=3,
                       learning_rate=1e-4, dpo_beta=0.1, sources=sources, **common)
    run('prepare.py', dpo, '--prepare_sources=["pairs"]', check=True)
    p = run('train.py', dpo, check=True)
    assert 'DPO' in p.stdout and 'cuda' in p.stdout
    ckpt = torch.load(out / 'dpo' / 'ckpt.pt', weights_only=True)
    assert ckpt['iter'] == 6 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    question = 'what does the bike learn?'
    want = run('sample.py', dpo, '--interactive', '--temperature=0', input=question + '\n',
               check=True).stdout.split('\n')[0]
    s = Server(dpo)
    try:
        client = openai.OpenAI(base_url=s.url + '/v1', api_key='none', max_retries=0)
        r = client.chat.completions.create(model='out', temperature=0, max_tokens=12,
                                           messages=[{'role': 'user', 'content': question}])
        assert r.choices[0].message.content == want.replace('\\n', '\n').replace('\\\\', '\\')
    finally:
        assert s.stop()[0] == 0
