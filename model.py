"""
The model: a decoder-only transformer in the style of current small LLMs, written to be read.

    token embedding (tied with the output head by default)
    n_layer x [ x + Attention(RMSNorm(x)),  x + SwiGLU(RMSNorm(x)) ]     pre-norm residual blocks
    RMSNorm -> output head -> logits

Attention uses rotary position embeddings (RoPE) on queries and keys, optional grouped-query
attention (n_kv_head < n_head: several query heads share one key/value head, a smaller KV cache),
and F.scaled_dot_product_attention, which picks flash kernels on GPUs. No biases anywhere.

For generation a KVCache keeps each layer's keys and values in buffers preallocated for the whole
context: the prompt is run once (prefill), then each new token is one decode_step, a fixed-shape
step (one position, the whole cache under a mask) that torch.compile turns into one graph, compiled
once.

This file imports only torch and the standard library: copy it anywhere. Reading and writing
checkpoints, and picking the device, live in checkpoint.py.
"""
import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# FlexAttention (torch >= 2.5): attention kernels that skip the tiles of the scores a mask hides
# entirely
try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    BlockMask = flex_attention = None


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    block_size: int = 256     # longest sequence the model is trained on
    n_layer: int = 6
    n_head: int = 6
    # = n_head: ordinary multi-head attention; fewer: grouped-query attention
    n_kv_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # SwiGLU's hidden width. None: our rule (SwiGLU below); a pretrained model brings its own
    intermediate_size: int | None = None
    # RMSNorm's epsilon. None: torch's default, float32's machine epsilon (what every checkpoint
    # trained here uses); a pretrained model brings its own (often 1e-5 or 1e-6)
    norm_eps: float | None = None


def rope_tables(head_dim, length, theta):
    """cos and sin of position * frequency, shape (length, head_dim / 2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1[i], x2[i]) of the two halves of each head by position-dependent angles.
    x: (B, heads, T, head_dim); cos, sin: (T, head_dim / 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def cached_attention(q, k, v, mask):
    """A decode step's attention over the whole KV cache: q (B, heads, T, head_dim), k and v (B, kv
    heads,
    block_size, head_dim), mask (T, block_size), True where a query may look. Spelled out rather
    than SDPA: compiled into the decode step, it fuses with the layers around it and reads the cache
    on every core (on CPU, 10-30% less time per token than SDPA's kernel; a long prefill is faster
    through SDPA)."""
    B, H, T, D = q.shape
    # query heads grouped by the key/value head they share
    q = q.view(B, k.size(1), H // k.size(1), T, D)
    scores = q @ k.unsqueeze(2).transpose(-2, -1) * D ** -0.5  # (B, kv heads, group, T, block_size)
    scores = scores.masked_fill(~mask, -float('inf'))
    return (torch.softmax(scores, dim=-1) @ v.unsqueeze(2)).view(B, H, T, D)


def use_flex(device, training, dropout):
    """Packed rows through FlexAttention or a dense mask? FlexAttention on CUDA: a dense (B, 1, T,
    T) mask keeps SDPA off its flash kernels (with grouped-query attention, on the math kernel that
    materialises every score). Not on a CPU: torch has no FlexAttention backward there, and its
    forward beats the dense mask only from ~1024 tokens (BENCHMARKS.md). Not with attention dropout,
    which FlexAttention does not have."""
    return flex_attention is not None and device.type == 'cuda' and not (training and dropout > 0)


def document_block_mask(doc_ids):
    """doc_ids (B, T) -> a BlockMask: query q sees key k when both are in the same document and k <=
    q. It records which 128 x 128 tiles of the (T, T) scores are hidden entirely (most of them, in a
    long row of short documents), and the kernel skips those."""
    B, T = doc_ids.shape

    def causal_within_document(b, h, q, k):
        return (doc_ids[b, q] == doc_ids[b, k]) & (k <= q)
    return create_block_mask(causal_within_document, B, None, T, T, device=doc_ids.device)


@functools.cache  # compiled once per process, on first use
def compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q, k, v, block_mask, gqa):
    """FlexAttention over packed documents: (B, n_head, T, head_dim). Compiled: run eagerly,
    flex_attention is a slow reference that materialises every score (inside a model that is
    compiled already, it compiles with it)."""
    attend = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
    return attend(q, k, v, block_mask=block_mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, attn_mask=None, cache=None, layer=0, pos=None):
        B, T, _ = x.shape  # x (B, T, n_embd)
        # (B, n_head, T, head_dim)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        # (B, n_kv_head, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        # (B, n_kv_head, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # same shapes, rotated by position
        # generation: write this step's keys/values at `pos`, attend over the cache
        if cache is not None:
            k, v = cache.update(layer, k, v, pos)  # (B, n_kv_head, block_size, head_dim)
            # a prefill reads the positions written so far,
            end = T if attn_mask is None else attn_mask.size(-1)
            # a decode step all of them (its mask hides the rest)
            k, v = k[:, :, :end], v[:, :, :end]
        # is_causal only when there is no mask. is_causal masks query i to keys 0..i, which is right
        # only when queries and keys start at the same position: with tokens already in the cache,
        # query i sits at cache.pos + i, so the cache path passes an explicit mask (T, keys)
        # instead; training with doc_ids passes its own too.
        # a decode step, or one token after others
        if cache is not None and T == 1 and attn_mask is not None:
            y = cached_attention(q, k, v, attn_mask)  # (B, n_head, 1, head_dim)
        # packed documents, FlexAttention
        elif BlockMask is not None and isinstance(attn_mask, BlockMask):
            # (B, n_head, T, head_dim)
            y = flex_attend(q, k, v, attn_mask, self.n_kv_head != self.n_head)
        else:
            p = self.dropout if self.training else 0.0
            if p and x.device.type == 'cpu' and torch.compiler.is_compiling() \
                    and torch.is_autocast_enabled('cpu'):
                # torch 2.13 compiles CPU attention with dropout under bf16 autocast into non-finite
                # gradients (eager is right; tests/test_model.py): there only the blocks' residual
                # dropout regularises
                p = 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               is_causal=attn_mask is None, dropout_p=p,
                                               # (B, n_head, T, head_dim)
                                               enable_gqa=self.n_kv_head != self.n_head)
        # heads side by side again: (B, T, n_embd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # ~ the parameters of a 4x GELU MLP, unless the config says otherwise
        hidden = cfg.intermediate_size or 64 * math.ceil(cfg.n_embd * 8 / 3 / 64)
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, layer=0, pos=None):
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, layer, pos))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # one matrix reads tokens in and writes them out
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.document_attention = 'auto'  # packed rows: 'flex', 'dense', or 'auto' (see use_flex)
        self.apply(self.init_weights)
        for name, p in self.named_parameters():
            if name.endswith(('o_proj.weight', 'down_proj.weight')):
                # the layers that write into the residual stream: scaled down with depth so the
                # stream's variance does not grow with the number of blocks (GPT-2's init)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, doc_ids=None, cache=None, pos=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean loss over targets != -1.
        doc_ids (B, T): rows packing several documents; a token attends only within its own. cache:
        a KVCache, for generation: idx continues the tokens it holds, at positions pos (T,) (a
        tensor, so that one compiled decode step serves every position); by default the next T after
        cache.pos."""
        B, T = idx.shape
        block = self.cfg.block_size
        attn_mask = None
        if cache is not None:
            # a prefill (or a chunk after one): T tokens after the cache.pos already there
            if pos is None:
                start = cache.pos
                if start + T > block:
                    raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                                     f"{block}")
                pos = torch.arange(start, start + T, device=idx.device)
                cache.pos += T
                # query i sees keys 0..start+i; from an empty cache that is plain causal attention
                # (no mask)
                if start:
                    attn_mask = torch.ones(T, start + T, dtype=torch.bool,
                                           device=idx.device).tril(start)
            # a decode step: the query at position p sees keys 0..p of the whole cache, the rest is
            # stale
            else:
                # (T, block_size)
                attn_mask = torch.arange(block, device=idx.device) <= pos[:, None]
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        else:
            if T > block:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {block}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            if doc_ids is not None:  # packed rows: causal and within the same document
                flex = self.document_attention == 'flex' or (
                    self.document_attention == 'auto'
                    and use_flex(idx.device, self.training, self.cfg.dropout))
                if flex:
                    # built eagerly, outside any compiled graph, once per forward for all layers
                    # (disabled here, not by a decorator, which would import the compiler stack into
                    # every stage at start: ~2.5 s)
                    attn_mask = torch.compiler.disable(document_block_mask)(doc_ids)
                else:
                    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
                    # (B, 1, T, T): query's doc == key's
                    same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
                    attn_mask = same_doc & causal  # (B, 1, T, T), broadcast over the heads
        x = self.embed(idx)  # (B, T, n_embd)
        for i, layer in enumerate(self.blocks):
            x = layer(x, cos, sin, attn_mask, cache, i, pos)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        # cross entropy in float32 (bf16 logits lose precision); -1 marks positions with no loss.
        # Summed and divided by the count so that a batch with no targets at all gives 0, not NaN
        nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1, reduction='sum')
        return logits, nats / (targets != -1).sum().clamp(min=1)

    def num_params(self):
        """(total, non-embedding): the token embedding is a lookup, not compute."""
        total = sum(p.numel() for p in self.parameters())
        return total, total - self.embed.weight.numel()

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per multiply-add):
        6 per weight of every matmul (the output head included) plus attention's 12 * layers * width
        * context (the PaLM paper's estimate, which MFU figures conventionally use)."""
        T = seq_len or self.cfg.block_size
        matmul = sum(p.numel() for n, p in self.named_parameters()
                     if p.dim() == 2 and not n.startswith('embed'))
        if self.cfg.tie_embeddings:
            matmul += self.embed.weight.numel()
        return 6 * matmul + 12 * self.cfg.n_layer * self.cfg.n_embd * T

    def optimizer(self, lr, weight_decay, betas, device_type):
        """AdamW; weight decay on matrices only (not on norms). Fused: one kernel for the whole
        update (on a CPU ~3x faster than the per-tensor ops, ~3% of a 12M model's step)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ('cuda', 'cpu'))

    @torch.no_grad()
    def generate(self, ids, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                 banned=(), stop=(), generator=None, cache=None, compile=False):
        """Yield new token ids one at a time, so callers can stream them.
        ids: the prompt (a list); with a `cache` from an earlier call, only the tokens not yet in
        it. Stops after max_new_tokens or after yielding a token in `stop`. With the cache
        (use_cache), the prompt is one forward (prefill) and each further token one decode_step:
        compiled (compile=True) the first time it runs in the process, with CUDA graphs on a GPU.
        Tokens stay on the device; the host waits for it once per token, to read the token it
        yields. `generator` (on the model's device) seeds the sampling."""
        if not ids:  # (there would be nothing to predict from)
            raise ValueError("generate needs a prompt of at least one token")
        device = self.embed.weight.device
        banned = torch.tensor(sorted(banned), dtype=torch.long, device=device)
        noise = lambda: None if temperature == 0 else torch.empty(  # for pick_token's sampling
            1, self.cfg.vocab_size, device=device).exponential_(generator=generator)
        seq = list(ids)
        # recompute the whole sequence for every token: slow, the reference the cache must match
        if not use_cache:
            for _ in range(max_new_tokens):
                # past the context: the first token (<s>) and the latest ones
                window = seq if len(seq) <= self.cfg.block_size else (
                    seq[:1] + seq[len(seq) - self.cfg.block_size + 1:])
                with cpu_float32():
                    logits, _ = self(torch.tensor([window], device=device))
                seq.append(int(pick_token(logits[:, -1], temperature, top_k, top_p, banned,
                                          noise())))
                yield seq[-1]
                if seq[-1] in stop:
                    return
            return
        cache = cache if cache is not None else KVCache(self)
        step = decode_step
        if compile:
            step = compiled_decode_step(device.type)
        pending = seq  # tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if pending:
                if cache.pos + len(pending) > self.cfg.block_size:
                    # out of context: start over from the first token (<s>: the model has always
                    # read one there, and leans on it; with a cache from an earlier call, that
                    # call's first token) and the last half block (amortised: once per half block).
                    # A cache filled other than by generate: this call's tokens
                    held = cache.ids + pending if len(cache.ids) == cache.pos else seq
                    cache.reset()
                    pending = held[:1] + held[len(held) - self.cfg.block_size // 2 + 1:]
                with cpu_float32():  # prefill: one forward
                    logits, _ = self(torch.tensor([pending], device=device), cache=cache)
                cache.ids += pending
                # (1, 1)
                token = pick_token(logits[:, -1:], temperature, top_k, top_p, banned, noise())
                # where the next token goes
                pos, pending = torch.tensor([cache.pos], device=device), []
            else:
                if compile and device.type == 'cuda':
                    # the last replay's outputs may now be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                cache.ids.append(seq[-1])  # the token this step feeds
                token = step(self, token, pos, cache, banned, noise(), temperature, top_k, top_p)
                cache.pos += 1
                pos += 1
            seq.append(int(token))  # the one wait for the device per token
            yield seq[-1]
            if seq[-1] in stop:
                return
            if cache.pos == self.cfg.block_size:
                # the context is full: the next token goes through the trimming above
                pending = [seq[-1]]


def cpu_float32():
    """Generation on a CPU runs in float32 whatever the autocast: a decode step is bound by reading
    every weight once, and CPU autocast copies every weight to bf16 on every step (compiled, 12M
    model: 74 tokens/s under autocast, 306 in float32; eager: the same speed). GPUs keep their
    autocast."""
    return torch.autocast('cpu', enabled=False)


@torch.no_grad()
def decode_step(model, token, pos, cache, banned, noise, temperature, top_k, top_p):
    """One token in, the next one out: token (1, 1) at position pos (1,) -> the next token (1, 1).
    Shapes never change and nothing leaves the device, so torch.compile makes the whole step (every
    layer, the cache update, the sampling) one graph, compiled once."""
    with cpu_float32():
        logits, _ = model(token, cache=cache, pos=pos)
    # (a CUDA graph reuses its outputs)
    return pick_token(logits, temperature, top_k, top_p, banned, noise).clone()


# Compiled on first use (once per process, model and sampling settings). On CPU, BLAS runs a one-row
# matmul (a matrix-vector product) on one core, far below the memory bandwidth decoding is bound by:
# inductor's decompose_mm_pass rewrites it as a multiply and a sum, which it compiles into loops
# that stream the weights on every core (2-3x faster). On a GPU, CUDA graphs replay the step's
# kernels without launching each from Python. Built on first use too: calling torch.compile imports
# its compiler stack (~1.5 s), which a run that does not compile should not wait for.
@functools.cache
def compiled_decode_step(device_type):
    options = dict(mode='reduce-overhead') if device_type == 'cuda' else dict(
        options={'post_grad_fusion_options': {'decompose_mm_pass': {}}})
    return torch.compile(decode_step, fullgraph=True, dynamic=False, **options)


def pick_token(logits, temperature=1.0, top_k=0, top_p=1.0, banned=None, noise=None):
    """Pick the next token from logits (..., vocab) -> ids (...), on the device. temperature 0 is
    greedy (argmax). top_k keeps the k most likely tokens, top_p the smallest set whose probability
    reaches p; both can be combined; `banned` ids are never picked. Sampling uses the Gumbel-max
    trick: with noise ~ Exp(1) per token, argmax(logits / temperature - log(noise)) is token i with
    probability softmax(logits / temperature)[i], so no host round trip is needed (the caller draws
    the noise from its generator)."""
    logits = logits.float()
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, -float('inf'))
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float('inf'))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before this one already reaches p
        drop[..., 0] = False  # the most likely token always stays (top_p=0 is then greedy)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -float('inf'))
    # noise 0 (possible in float) would make -log(noise) infinite: a token then wins whatever its
    # probability
    return (logits - noise.clamp(min=torch.finfo(noise.dtype).tiny).log()).argmax(-1)


# ----------------------------------------------------------------------------------------------
# LoRA: fine-tune a frozen model through low-rank updates W + (alpha / r) B A of chosen projections.
# A starts random and B at zero, so training starts from the base model exactly; only A and B train.

LORA_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.enabled = True  # False: the base alone (adapters_off)

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self):
        """A plain nn.Linear with the update folded in: W + scale * B @ A."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=False)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_B @ self.lora_A)
        return out.to(self.base.weight.device)


def add_lora(model, rank, alpha, dropout=0.0, targets=LORA_TARGETS):
    """Wrap the target projections of every block in LoRALinear and freeze everything else."""
    for name in targets:
        if name not in LORA_TARGETS:
            raise ValueError(f"lora_targets: {name!r} is not a projection of the model; choose "
                             f"from "
                             f"{', '.join(LORA_TARGETS)}")
    for p in model.parameters():
        p.requires_grad = False
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return model


@contextlib.contextmanager
def adapters_off(model):
    """Inside: the model computes as its frozen base, every LoRA adapter skipped (DPO's reference
    model, with no second copy of the weights)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def merge_lora(model):
    """Fold every adapter into its base weight: a plain model again, as fast as the base."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad = True
    return model


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if '.lora_' in k}


class KVCache:
    """Keys and values of every layer, preallocated for the whole context: (batch, kv heads,
    block_size, head dim) per layer. Attention always reads the whole buffer, a mask hiding the
    positions not written yet, so shapes never change and one compiled decode step serves every
    position."""

    def __init__(self, model, batch_size=1):
        cfg = model.cfg
        self.shape = (batch_size, cfg.n_kv_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.k = [None] * cfg.n_layer
        self.v = [None] * cfg.n_layer
        self.pos = 0  # positions filled, counted on the host: knowing it never waits for the device
        self.ids = []  # the tokens generate() has fed it (to start over past the context)

    def update(self, layer, k, v, pos):
        """Write k, v (B, kv heads, T, head dim) at positions pos (T,); return the whole buffers."""
        if self.k[layer] is None:  # allocated on first use, in the dtype autocast gives k and v
            self.k[layer] = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
            # a CUDA graph may write into them in place: their addresses must never change
            if k.is_cuda:
                torch._dynamo.mark_static_address(self.k[layer], guard=False)
                torch._dynamo.mark_static_address(self.v[layer], guard=False)
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]

    def reset(self):
        self.pos = 0
        self.ids = []
