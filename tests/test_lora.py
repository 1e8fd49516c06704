import copy
import json
import os

import pytest
import torch

from conftest import run, tiny_train_config
from model import GPT, LoRALinear, ModelConfig, add_lora, adapter_state, merge_lora


def base_model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()


def test_at_step_zero_the_lora_model_is_the_base_model_exactly():
    base = base_model()
    x = torch.randint(0, 97, (2, 16))
    expected, _ = base(x)
    lora = add_lora(copy.deepcopy(base), rank=4, alpha=8.0)
    got, _ = lora(x)
    assert torch.equal(got, expected)
    wrapped = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 7 and all(torch.count_nonzero(m.lora_B) == 0 and m.lora_A.abs().sum() > 0 for m in wrapped)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == set(adapter_state(lora))


def test_training_changes_only_the_adapters_and_merging_keeps_the_function():
    base = base_model()
    model = add_lora(copy.deepcopy(base), rank=4, alpha=8.0, targets=('q_proj', 'v_proj'))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if '.lora_' not in k}
    opt = model.optimizer(1e-2, 0.0, (0.9, 0.95), 'cpu')
    x = torch.randint(0, 97, (4, 32))
    model.train()
    for _ in range(20):
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())  # the base did not move
    assert any(torch.count_nonzero(v) for k, v in adapter_state(model).items() if k.endswith('lora_B'))
    unmerged, _ = model(x)
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())  # a normal checkpoint again
    torch.testing.assert_close(merged(x)[0], unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmerged, base(x)[0], atol=1e-3)  # and it did learn something


def test_unknown_lora_target_is_an_error():
    with pytest.raises(ValueError, match="'qkv'"):  # model.py raises ordinary exceptions (it stands alone)
        add_lora(base_model(), rank=2, alpha=2.0, targets=('qkv',))


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory, trained, prepared):
    """A LoRA SFT run on top of the trained fixture's checkpoint."""
    root = tmp_path_factory.mktemp('lora')
    base = os.path.join(trained[1], 'pretrain', 'ckpt.pt')
    cfg = tiny_train_config(root / 'cfg.py', prepared, root / 'out', phase='lora', mixture={'primer': 1.0},
                            init_from=base, lora_rank=4, lora_alpha=8.0, max_iters=8, eval_interval=4,
                            lr_decay_iters=8, learning_rate=1e-2)
    p = run('train.py', cfg, check=True)
    return cfg, root, base, p


def test_lora_training_logs_counts_and_saves_only_adapters_with_a_base_reference(lora_run):
    cfg, root, base, p = lora_run
    assert 'LoRA rank 4' in p.stdout and 'training' in p.stdout and 'the base is frozen' in p.stdout
    ckpt = torch.load(root / 'out' / 'lora' / 'ckpt.pt', weights_only=True)
    assert 'model' not in ckpt and ckpt['adapter'] and all('.lora_' in k for k in ckpt['adapter'])
    from common import file_sha256
    assert ckpt['base']['path'] == str(root / 'out' / 'lora' / 'base.pt') and ckpt['base']['from'] == os.path.abspath(base)
    assert ckpt['base']['sha256'] == file_sha256(base)  # a frozen copy (a hard link) of the base it started from
    assert ckpt['lora'] == {'rank': 4, 'alpha': 8.0, 'dropout': 0.05, 'targets': list(ckpt['lora']['targets'])}
    assert os.path.getsize(root / 'out' / 'lora' / 'best.pt') < os.path.getsize(base) / 2


def test_lora_resume_continues_exactly(lora_run, prepared, tmp_path):
    cfg, root, base, _ = lora_run
    parts = tiny_train_config(tmp_path / 'p.py', prepared, tmp_path / 'p', phase='lora', mixture={'primer': 1.0},
                              init_from=base, lora_rank=4, lora_alpha=8.0, max_iters=8, eval_interval=4,
                              lr_decay_iters=8, learning_rate=1e-2)
    run('train.py', parts, '--max_iters=4', check=True)
    p = run('train.py', parts, '--init_from=resume', check=True)
    assert 'resuming from' in p.stdout and 'at step 4' in p.stdout
    a = torch.load(root / 'out' / 'lora' / 'ckpt.pt', weights_only=True)['adapter']
    b = torch.load(tmp_path / 'p' / 'lora' / 'ckpt.pt', weights_only=True)['adapter']
    assert all(torch.equal(a[k], b[k]) for k in a)
    p = run('train.py', parts, '--init_from=resume', '--lora_rank=8')
    assert p.returncode != 0 and 'LoRA settings' in p.stderr


def test_merge_and_sample_with_adapter_or_merged_checkpoint_agree(lora_run, tmp_path):
    cfg, root, base, _ = lora_run
    adapter = root / 'out' / 'lora' / 'ckpt.pt'
    p = run('train.py', cfg, f'--merge_lora={adapter}', check=True)
    merged = root / 'out' / 'lora' / 'ckpt_merged.pt'
    state = torch.load(merged, weights_only=True)
    assert 'model' in state and not any('lora' in k for k in state['model']) and str(merged) in p.stdout
    args = (cfg, '--start=the garden', '--max_new_tokens=20', '--temperature=0', '--dtype=float32')
    with_adapter = run('sample.py', *args, f'--ckpt={adapter}', check=True).stdout
    with_merged = run('sample.py', *args, f'--ckpt={merged}', check=True).stdout
    assert with_adapter == with_merged
    for i, ckpt in enumerate((adapter, merged, base)):
        run('eval.py', cfg, f'--ckpt={ckpt}', '--eval_sources=["primer"]', f'--eval_out={tmp_path}/{i}', check=True)
    losses = [json.load(open(tmp_path / str(i) / 'eval_results.json'))['splits']['primer']['loss'] for i in range(3)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert losses[0] < losses[2]  # fine-tuned on the primer, the adapter beats its base there


def test_an_adapter_with_the_wrong_base_is_a_clear_error(lora_run, tmp_path, prepared):
    cfg, root, base, _ = lora_run
    adapter = root / 'out' / 'lora' / 'ckpt.pt'
    # another base model of the same shape: a different checkpoint file
    other = tiny_train_config(tmp_path / 'o.py', prepared, tmp_path / 'o', max_iters=2, eval_interval=2, seed=7)
    run('train.py', other, check=True)
    p = run('sample.py', cfg, f'--ckpt={adapter}', f"--lora_base={tmp_path / 'o' / 'pretrain' / 'ckpt.pt'}")
    assert p.returncode != 0 and 'another base model' in p.stderr and 'sha256' in p.stderr
    state = torch.load(adapter, weights_only=True)
    state['base']['path'] = str(tmp_path / 'moved.pt')
    torch.save(state, tmp_path / 'adapter.pt')
    p = run('sample.py', cfg, f"--ckpt={tmp_path / 'adapter.pt'}")
    assert p.returncode != 0 and 'moved.pt' in p.stderr and '--lora_base' in p.stderr
    p = run('train.py', cfg, '--init_from=' + str(adapter), '--lora_rank=0', '--phase=x')
    assert p.returncode != 0 and 'merge_lora' in p.stderr


def test_lora_needs_a_trained_model(prepared, tmp_path):
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'c', lora_rank=4)
    p = run('train.py', cfg)
    assert p.returncode != 0 and 'init_from' in p.stderr


def test_a_lora_run_keeps_its_base_even_when_the_base_lives_in_its_own_checkpoint_folder(trained, prepared, tmp_path):
    """init_from is the ckpt.pt that this very run's checkpoint rotation rewrites: the base must survive."""
    import shutil
    folder = tmp_path / 'out' / 'pretrain'
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(trained[1], 'pretrain', 'ckpt.pt'), folder / 'ckpt.pt')
    cfg = tiny_train_config(tmp_path / 'c.py', prepared, tmp_path / 'out', mixture={'primer': 1.0},
                            init_from=str(folder / 'ckpt.pt'), lora_rank=4, max_iters=6, eval_interval=2,
                            keep_checkpoints=1)
    run('train.py', cfg, check=True)
    adapter = torch.load(folder / 'ckpt.pt', weights_only=True)
    assert adapter['base']['path'] == str(folder / 'base.pt') and 'model' in torch.load(folder / 'base.pt', weights_only=True)
    run('sample.py', cfg, f"--ckpt={folder / 'ckpt.pt'}", '--max_new_tokens=5', check=True)
    p = run('train.py', cfg, '--init_from=resume', '--max_iters=8', check=True)
    assert 'resuming from' in p.stdout


def test_with_optimizer_muon_the_adapters_stay_on_adamw(lora_run, prepared, tmp_path):
    """Muon is for full-rank hidden matrices: a LoRA run with optimizer='muon' trains its adapters with AdamW,
    step for step as the AdamW run does."""
    cfg, root, base, _ = lora_run
    muon = tiny_train_config(tmp_path / 'm.py', prepared, tmp_path / 'm', phase='lora', mixture={'primer': 1.0},
                             init_from=base, lora_rank=4, lora_alpha=8.0, max_iters=8, eval_interval=4,
                             lr_decay_iters=8, learning_rate=1e-2, optimizer='muon')
    p = run('train.py', muon, check=True)
    assert "Muon (lr 0.02) on the blocks' matrices (0 parameters), AdamW (lr 0.01) on the LoRA adapters" in p.stdout
    a = torch.load(root / 'out' / 'lora' / 'ckpt.pt', weights_only=True)['adapter']
    b = torch.load(tmp_path / 'm' / 'lora' / 'ckpt.pt', weights_only=True)['adapter']
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
