import pytest
import torch

from checkpoint import read_checkpoint
import model as model_module
from model import GPT, KVCache, ModelConfig, pick_token


def tiny(n_kv_head=4, block_size=32, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=97, block_size=block_size, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                           n_embd=32)).eval()


@pytest.mark.parametrize('n_kv_head', [4, 2, 1])
@pytest.mark.parametrize('prompt_len', [1, 7, 31, 32])
def test_kv_cache_matches_full_forward(n_kv_head, prompt_len):
    """Prefill part of the sequence, then feed the rest in pieces: every position's logits must match
    a single full forward, up to float rounding, including a sequence filling the whole context."""
    model = tiny(n_kv_head)
    idx = torch.randint(0, 97, (2, prompt_len))
    full, _ = model(idx)
    cache = KVCache(model, batch_size=2)
    split = max(1, prompt_len // 2)
    pieces = [model(idx[:, :split], cache=cache)[0]]
    pos = split
    while pos < prompt_len:
        n = 1 if pos % 2 else 3  # single steps and multi-token chunks after the prefill
        pieces.append(model(idx[:, pos:pos + n], cache=cache)[0])
        pos += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == prompt_len


@pytest.mark.parametrize('prompt_len', [1, 10, 31])
def test_greedy_with_cache_gives_exactly_the_tokens_without(prompt_len):
    model = tiny()
    prompt = torch.randint(0, 97, (prompt_len,)).tolist()
    n = 32 - prompt_len  # up to the context limit
    with_cache = list(model.generate(prompt, n, temperature=0, use_cache=True))
    without = list(model.generate(prompt, n, temperature=0, use_cache=False))
    assert with_cache == without and len(with_cache) == n


def test_compiled_decode_picks_the_tokens_of_the_eager_step_and_of_no_cache():
    """The compiled decode step (one graph for every position, the static cache, sampling on the device) picks
    exactly the tokens of the eager step: greedy and sampled with one seed, past the context limit (where the
    cache starts over); and, within the context, the tokens of recomputing the whole sequence every time."""
    model = tiny()
    with torch.no_grad():  # weights larger than the init's: a random model whose greedy tokens are not all one
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    prompt = torch.randint(0, 97, (10,)).tolist()
    greedy = lambda n, **kw: list(model.generate(prompt, n, temperature=0, **kw))
    compiled = greedy(40, compile=True)
    assert compiled == greedy(40) and len(set(compiled)) > 5
    assert compiled[:22] == greedy(22, use_cache=False)
    sampled = lambda **kw: list(model.generate(prompt, 40, temperature=0.8, top_k=40, top_p=0.9,
                                               generator=torch.Generator().manual_seed(1), **kw))
    assert sampled(compile=True) == sampled() != compiled


def test_generation_continues_past_the_context_limit():
    model = tiny()
    out = list(model.generate([1, 2, 3], 80, temperature=1.0, use_cache=True, generator=torch.Generator().manual_seed(0)))
    assert len(out) == 80


@pytest.mark.parametrize('use_cache', [True, False])
def test_past_the_context_the_first_token_stays(use_cache):
    """The window that slides past the context still starts with the prompt's first token (<s>)."""
    model, firsts = tiny(), []
    forward = model.forward
    def recorded(x, *a, **kw):  # the first token of each window read whole (not a decode step)
        if 'pos' not in kw:
            firsts.append(x[0, 0].item())
        return forward(x, *a, **kw)
    model.forward = recorded
    out = list(model.generate([7, 2, 3], 70, temperature=0, use_cache=use_cache))
    assert len(out) == 70 and len(firsts) > 1 and set(firsts) == {7}


def test_past_the_context_a_cache_from_an_earlier_call_keeps_its_first_token():
    """A caller that feeds each turn to the cache of the turns before it (sample.py's chat leaves
    each reply room enough; another caller may not): when a turn runs past the context, the window
    starts again from the conversation's first token (<s>), not from this turn's. A cache filled by
    hand, not by generate, starts again from this call's tokens, a half block of them."""
    model, windows = tiny(), []
    forward = model.forward
    def recorded(x, *a, cache=None, **kw):  # each window read whole from position 0
        if cache is not None and cache.pos == 0:
            windows.append(x[0].tolist())
        return forward(x, *a, cache=cache, **kw)
    model.forward = recorded
    cache = KVCache(model)
    first = list(model.generate([7, 2, 3], 5, temperature=0, cache=cache))
    assert len(first) == 5 and cache.pos == 7  # (the last token generated is not fed yet)
    out = list(model.generate([first[-1], 4, 5], 70, temperature=0, cache=cache))
    assert len(out) == 70 and len(windows) > 1 and {w[0] for w in windows} == {7}
    assert len(cache.ids) == cache.pos
    cache.reset()
    windows.clear()
    forward(torch.tensor([[7, 2, 3, 1]]), cache=cache)  # (filled without generate: it has no ids)
    out = list(model.generate([4, 5, 6, 8, 9, 10], 40, temperature=0, cache=cache))
    assert len(windows) >= 1 and windows[0][0] == 4 and len(windows[0]) == 32 // 2


def test_an_empty_prompt_is_an_error_not_a_crash():
    for use_cache in (True, False):
        with pytest.raises(ValueError, match='at least one token'):
            list(tiny().generate([], 4, use_cache=use_cache))


def test_longer_than_block_is_an_error():
    with pytest.raises(ValueError, match='block_size'):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


needs_flex = pytest.mark.skipif(model_module.flex_attention is None, reason='this torch has no FlexAttention')


@pytest.mark.parametrize('attention', ['dense', pytest.param('flex', marks=needs_flex)])
def test_packed_documents_do_not_see_each_other(attention):
    """With doc_ids, the second document in a row gets the logits it gets alone (RoPE is relative), through the
    dense mask and through FlexAttention (forward only on a CPU: it has no backward there)."""
    model = tiny()
    model.document_attention = attention
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 9))
    row = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 12 + [1] * 9])
    with torch.no_grad():
        packed, _ = model(row, doc_ids=doc_ids)
        alone, _ = model(b)
    torch.testing.assert_close(packed[:, 12:], alone, atol=1e-5, rtol=1e-5)
    mixed, _ = model(row)  # without doc_ids the second document does attend to the first
    assert not torch.allclose(mixed[:, 12:], alone, atol=1e-3)


@needs_flex
def test_flex_attention_gives_the_logits_of_the_dense_mask():
    """Rows packing several documents, grouped-query attention: the same logits through FlexAttention's block mask
    as through the dense (B, 1, T, T) mask."""
    model = tiny(n_kv_head=2)
    doc_ids = torch.tensor([[0] * 5 + [1] * 11 + [2] * 16, [0] * 20 + [1] * 12])
    x = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        model.document_attention = 'dense'
        dense, _ = model(x, doc_ids=doc_ids)
        model.document_attention = 'flex'
        flex, _ = model(x, doc_ids=doc_ids)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    assert model_module.use_flex(torch.device('cuda'), True, 0.0) and not model_module.use_flex(torch.device('cpu'), False, 0.0)
    assert not model_module.use_flex(torch.device('cuda'), True, 0.1)  # (FlexAttention has no attention dropout)


def test_param_counts_and_flops():
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(cfg)
    total, non_embedding = model.num_params()
    assert total == sum(p.numel() for p in model.parameters()) and total - non_embedding == 100 * 64
    hidden = 64 * -(-64 * 8 // 3 // 64)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * hidden  # q, o; k, v (2 heads of 16); SwiGLU
    assert total == 2 * per_layer + 2 * 2 * 64 + 64 + 100 * 64  # + norms + final norm + tied embedding
    assert model.flops_per_token() == 6 * (2 * per_layer + 100 * 64) + 12 * 2 * 64 * 16


def test_loss_ignores_minus_one_targets():
    model = tiny()
    x = torch.randint(0, 97, (1, 8))
    y = torch.randint(0, 97, (1, 8))
    _, loss_all = model(x, y)
    y2 = y.clone()
    y2[0, :4] = -1
    logits, loss_half = model(x, y2)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], y[0, 4:])
    torch.testing.assert_close(loss_half, expected)
    assert not torch.isclose(loss_all, loss_half)


def test_loss_falls_when_overfitting_a_tiny_batch():
    model = tiny().train()
    opt = model.optimizer(3e-3, 0.0, (0.9, 0.95), 'cpu')
    x = torch.randint(0, 97, (4, 32))
    y = torch.roll(x, -1, dims=1)
    first = None
    for _ in range(80):
        _, loss = model(x, y)
        first = first or loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.2 * first


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One draw from (vocab,) logits, as generate() draws it: Exp(1) noise from the generator."""
    return int(pick_token(logits, temperature, top_k, top_p, noise=torch.empty_like(logits).exponential_(generator=generator)))


def test_sampling_is_deterministic_for_a_seed():
    logits = torch.randn(97)
    draw = lambda seed: [sample_token(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(seed)) for _ in range(1)]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [sample_token(logits, 1.0, 20, 0.9, g1) for _ in range(50)] == [sample_token(logits, 1.0, 20, 0.9, g2) for _ in range(50)]
    assert sample_token(logits, 0) == int(logits.argmax())
    assert draw(1) == draw(1)


def test_top_k_and_top_p_never_pick_an_excluded_token():
    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    order = torch.argsort(logits, descending=True).tolist()
    probs = torch.softmax(logits, -1)[order]
    nucleus = order[:int((probs.cumsum(0) < 0.7).sum()) + 1]  # smallest set reaching p=0.7
    g = torch.Generator().manual_seed(0)
    for top_k, top_p, allowed in [(5, 1.0, order[:5]), (0, 0.7, nucleus), (3, 0.7, nucleus[:3]), (1, 1.0, order[:1])]:
        seen = {sample_token(logits, 1.5, top_k, top_p, g) for _ in range(2000)}
        assert seen <= set(allowed), (top_k, top_p, seen - set(allowed))
        assert len(seen) == len(allowed)  # and everything allowed can come out


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    model = tiny()
    path = tmp_path / 'ckpt.pt'
    torch.save({'model': model.state_dict(), 'model_args': {}}, path)
    assert read_checkpoint(str(path))['model'].keys() == model.state_dict().keys()
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SystemExit) as e:
        read_checkpoint(str(path))
    assert 'truncated or corrupt' in str(e.value) and str(path) in str(e.value)
    assert read_checkpoint(str(path), fatal=False) is None


def test_a_batch_with_no_targets_has_zero_loss_not_nan():
    model = tiny()
    _, loss = model(torch.randint(0, 97, (2, 8)), torch.full((2, 8), -1))
    assert loss.item() == 0.0


def test_top_p_zero_is_greedy():
    logits = torch.randn(50)
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, 0, 0.0, g) for _ in range(50)} == {int(logits.argmax())}


def test_dropout_trains_with_finite_gradients_compiled_in_bf16_on_cpu():
    """torch 2.13 compiles CPU attention with dropout under bf16 autocast into non-finite gradients:
    model.py leaves the attention's dropout out there (the residual dropout stays). The dev profile
    (dropout 0.1, bf16, compile) died at its first step without it."""
    torch.manual_seed(0)
    # (a shape where it showed: smaller ones often came out finite anyway)
    model = GPT(ModelConfig(vocab_size=97, block_size=128, n_layer=2, n_head=3, n_kv_head=3, n_embd=192,
                            dropout=0.1))
    x, y = torch.randint(0, 97, (4, 128)), torch.randint(0, 97, (4, 128))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, loss = torch.compile(model)(x, y)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # and dropout still acts: two training forwards differ
    with torch.no_grad():
        assert not torch.equal(model(x)[0], model(x)[0])
