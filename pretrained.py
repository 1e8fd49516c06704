"""
Start from a pretrained model: a Llama's shape and weights, read into our GPT (float32).

    model, info = load_pretrained('models/SmolLM2-135M')          # a Hugging Face model folder
    model, info = load_pretrained('SmolLM2-135M.Q8_0.gguf')       # a llama.cpp GGUF file
    model, info = load_pretrained('hf:HuggingFaceTB/SmolLM2-135M-Instruct')  # into the cache

Our model is a Llama on purpose (RMSNorm, RoPE in the rotate_half layout, SwiGLU, GQA, no biases),
so this is export.py read backwards: the same names, the same shapes. What we do not implement
(biases, RoPE scaling, another activation or norm, a head_dim of its own, other architectures) is
refused with the setting that asks for it, rather than loaded into a model that computes something
else.

A Hugging Face folder is config.json plus model.safetensors, or the shards that
model.safetensors.index.json lists (any float dtype; pytorch_model.bin is not read: it is a pickle,
which can run code). A GGUF file may hold any tensor type the `gguf` package dequantizes (f32, f16,
bf16, q8_0, q4_0, q4_1, the k-quants ...); llama.cpp rotates the neighbouring pairs (2i, 2i+1) of
each head where we rotate (i, i + head_dim/2), so the rows of q and k are put back in our order
(export.rope_to_interleaved undone).

`hf:<owner>/<name>` downloads config.json, the safetensors weights and the tokenizer files that
exist (tokenizer.json, tokenizer_config.json ...) from huggingface.co with download.fetch, into
download.SETTINGS['cache_dir']: a second run downloads nothing. Public models only (no token is
sent).

Needs the export extra (safetensors, gguf): pip install -r requirements-export.txt.
"""
import json
import os
import re
from dataclasses import asdict

import numpy as np
import requests
import torch

import download
from common import die
from model import GPT, ModelConfig

EXTRA = "pip install -r requirements-export.txt"

# where hf:<owner>/<name> is downloaded from (tests point it at a local server)
HUB = {'url': 'https://huggingface.co'}

# Besides the weights, what an hf: download takes when the repository has it: the tokenizer and
# its chat template, and generation_config.json for the tokens that end a reply
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'generation_config.json')

# One block's weights: (Hugging Face name, GGUF name, ours), each + '.weight'
LAYER_PARTS = [
    ('input_layernorm', 'attn_norm', 'attn_norm'),
    ('self_attn.q_proj', 'attn_q', 'attn.q_proj'),
    ('self_attn.k_proj', 'attn_k', 'attn.k_proj'),
    ('self_attn.v_proj', 'attn_v', 'attn.v_proj'),
    ('self_attn.o_proj', 'attn_output', 'attn.o_proj'),
    ('post_attention_layernorm', 'ffn_norm', 'mlp_norm'),
    ('mlp.gate_proj', 'ffn_gate', 'mlp.gate_proj'),
    ('mlp.up_proj', 'ffn_up', 'mlp.up_proj'),
    ('mlp.down_proj', 'ffn_down', 'mlp.down_proj'),
]
OUTER_PARTS = [
    ('model.embed_tokens', 'token_embd', 'embed'),
    ('model.norm', 'output_norm', 'norm'),
    ('lm_head', 'output', 'lm_head'),  # absent when the head is tied to the embedding
]


def need(module, what):
    """Import an optional package, or stop with the pip command that installs it."""
    try:
        return __import__(module)
    except ImportError:
        die(f"reading {what} needs the '{module}' package, which the rest of smallchat does not: "
            f"{EXTRA}")


def load_pretrained(source, device='cpu', max_block_size=2048):
    """(model, info): a pretrained Llama as our GPT, float32, in eval mode on `device`.
    source: a Hugging Face model folder, a .gguf file, or hf:<owner>/<name>. The model's context
    (block_size) is the file's, capped at max_block_size: RoPE tables and the KV cache grow with
    it, and an 8192-token context is rarely what a fine-tune on a small machine needs.
    info: where it came from (format, path, weight files, their tensor types), the file's own
    context length, the model_args (ModelConfig's fields) a checkpoint would record, and for a
    Hugging Face model tokenizer_files: {name: path} of the TOKENIZER_FILES it has (a GGUF file
    holds its tokenizer in its metadata)."""
    kind = source_kind(source)
    if kind == 'gguf':
        return load_gguf(source, device, max_block_size)
    need('safetensors', 'safetensors weights')  # (before downloading them)
    args, context = model_args(source, max_block_size)
    check_memory(args, source)
    if kind == 'hub':
        repo = source[3:]
        folder = os.path.dirname(hub_config(repo))  # (already in the cache)
        files = hub_weight_files(repo)
        tokenizer = {name: path for name in TOKENIZER_FILES
                     if (path := hub_file(repo, name, required=False))}
    else:
        folder = source
        files = folder_weight_files(source)
        tokenizer = {name: os.path.join(source, name) for name in TOKENIZER_FILES
                     if os.path.isfile(os.path.join(source, name))}
    return load_hf(source, folder, files, args, context, tokenizer, device)


def source_kind(source):
    """'hub', 'folder' or 'gguf': what a base_model string names, or stop saying what it should
    be."""
    if source.startswith('hf:'):
        return 'hub'
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, 'config.json')):
            die(f"{source} has no config.json: a Hugging Face model folder needs it (with the "
                "weights in model.safetensors); a GGUF model is one .gguf file, give its path")
        return 'folder'
    if os.path.isfile(source):
        with open(source, 'rb') as f:
            magic = f.read(4)
        if magic != b'GGUF':
            die(f"{source} is not a GGUF file (it does not start with 'GGUF'): give a .gguf file, "
                "a Hugging Face model folder, or hf:<owner>/<name>")
        return 'gguf'
    die(f"no model at {source}: give a Hugging Face model folder (config.json and "
        "model.safetensors), a .gguf file, or hf:<owner>/<name> to download one")


def model_args(source, max_block_size=2048):
    """(ModelConfig fields, the file's context length) of a pretrained model from its config alone,
    no weights read: the model a run that starts from it builds, and every run that goes on from
    that one (resume, SFT on its checkpoint)."""
    kind = source_kind(source)
    if kind == 'gguf':
        return gguf_model_args(read_gguf(source), source, max_block_size)
    path = hub_config(source[3:]) if kind == 'hub' else os.path.join(source, 'config.json')
    return hf_model_args(read_json(path), path, max_block_size)


def read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        die(f"{path} is not readable JSON ({e}): download it again")
    if not isinstance(value, dict):
        die(f"{path} is not a JSON object: download it again")
    return value


# ----------------------------------------------------------------------------------------------
# What the file says the model is, checked against what we implement

def hf_model_args(config, path, max_block_size):
    """(ModelConfig fields, the file's context length) from a config.json, or stop naming the
    setting we do not implement. Missing keys take LlamaConfig's defaults."""
    kind = config.get('model_type')
    arch = config.get('architectures') or ['LlamaForCausalLM']
    if kind != 'llama' or arch != ['LlamaForCausalLM']:
        die(f"{path}: model_type {kind!r} (architectures {arch}) is not a plain Llama: only "
            "LlamaForCausalLM models can be read (SmolLM2, TinyLlama, Llama 2 ...)")
    refuse = {
        'hidden_act': config.get('hidden_act', 'silu') != 'silu',
        'attention_bias': bool(config.get('attention_bias')),
        'mlp_bias': bool(config.get('mlp_bias')),
        'rope_scaling': config.get('rope_scaling') is not None,
        'quantization_config': config.get('quantization_config') is not None,
    }
    # transformers >= 5 writes rope_theta and the RoPE type into rope_parameters
    rope = config.get('rope_parameters') or {}
    if not isinstance(rope, dict):
        die(f"{path}: rope_parameters is {rope!r}, not a JSON object: download it again")
    refuse['rope_parameters'] = rope.get('rope_type', 'default') != 'default'
    for key, bad in refuse.items():
        if bad:
            die(f"{path}: {key}={json.dumps(config[key])} is not implemented here (our model is a "
                "Llama with SiLU, no biases, plain RoPE, float weights): use a model without it")
    n_embd = integer(config, 'hidden_size', path)
    n_head = integer(config, 'num_attention_heads', path)
    n_kv_head = integer(config, 'num_key_value_heads', path, n_head)
    head_dim = config.get('head_dim') or n_embd // n_head
    if n_embd % n_head or head_dim != n_embd // n_head:
        die(f"{path}: head_dim={head_dim} with hidden_size={n_embd} and "
            f"num_attention_heads={n_head}: our heads are hidden_size / heads wide")
    if n_head % n_kv_head:
        die(f"{path}: num_attention_heads={n_head} is not a multiple of "
            f"num_key_value_heads={n_kv_head}")
    context = integer(config, 'max_position_embeddings', path, 2048)
    return dict(
        vocab_size=integer(config, 'vocab_size', path), n_embd=n_embd, n_head=n_head,
        n_kv_head=n_kv_head, n_layer=integer(config, 'num_hidden_layers', path),
        intermediate_size=integer(config, 'intermediate_size', path),
        rope_theta=real(rope.get('rope_theta', config.get('rope_theta', 10000.0)), 'rope_theta',
                        path),
        norm_eps=real(config.get('rms_norm_eps', 1e-6), 'rms_norm_eps', path),
        tie_embeddings=bool(config.get('tie_word_embeddings', False)),
        block_size=min(context, max_block_size)), context


def integer(config, key, path, default=None):
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        die(f"{path}: {key} is {value!r}, it must be a positive whole number: is the file "
            "damaged? Download it again")
    return value


def real(value, key, path):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        die(f"{path}: {key} is {value!r}, it must be a positive number: is the file damaged? "
            "Download it again")
    return float(value)


def gguf_model_args(reader, path, max_block_size):
    """(ModelConfig fields, the file's context length) from a GGUF file's metadata, or stop naming
    the setting we do not implement."""
    fields = reader.fields

    def value(key, default=None):
        field = fields.get(key)
        return field.contents() if field is not None else default

    arch = value('general.architecture')
    if arch != 'llama':
        die(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files can be read")

    def number(key, default=None):
        v = value(f'llama.{key}', default)
        if v is None or isinstance(v, (list, str)):
            die(f"{path}: llama.{key} is {'missing' if v is None else repr(v)}: we read Llama "
                "files with one number there (the same for every layer)")
        return v

    if number('expert_count', 0):
        die(f"{path}: llama.expert_count={number('expert_count')} (a mixture of experts) is not "
            "implemented here")
    scaling = value('llama.rope.scaling.type', 'none')
    if scaling != 'none' or any(t.name == 'rope_freqs.weight' for t in reader.tensors):
        die(f"{path}: RoPE scaling (llama.rope.scaling.type={scaling!r}, or a rope_freqs "
            "tensor) is not implemented here: use a model with plain RoPE")
    if 'llama.attention.layer_norm_rms_epsilon' not in fields:
        die(f"{path}: no llama.attention.layer_norm_rms_epsilon: the model does not use RMSNorm, "
            "the only norm we implement")
    n_embd, n_head = int(number('embedding_length')), int(number('attention.head_count'))
    n_kv_head = int(number('attention.head_count_kv', n_head))
    head_dim = n_embd // n_head
    for key in ('rope.dimension_count', 'attention.key_length', 'attention.value_length'):
        if n_embd % n_head or number(key, head_dim) != head_dim:
            die(f"{path}: llama.{key}={number(key, head_dim)} with embedding_length={n_embd} "
                f"and head_count={n_head}: our heads are embedding_length / heads wide, all of "
                "each rotated")
    if n_head % n_kv_head:
        die(f"{path}: llama.attention.head_count={n_head} is not a multiple of "
            f"head_count_kv={n_kv_head}")
    embed = next((t for t in reader.tensors if t.name == 'token_embd.weight'), None)
    if embed is None:
        die(f"{path} has no token_embd.weight tensor: is it a whole model (not a LoRA adapter)?")
    vocab = value('llama.vocab_size') or len(value('tokenizer.ggml.tokens', [])) \
        or int(embed.shape[1])
    context = int(number('context_length', 2048))
    return dict(
        vocab_size=int(vocab), n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
        n_layer=int(number('block_count')), intermediate_size=int(number('feed_forward_length')),
        # GGUF stores these as float32: its shortest spelling gives back the 1e-5 it was
        rope_theta=float32_value(number('rope.freq_base', 10000.0)),
        norm_eps=float32_value(number('attention.layer_norm_rms_epsilon')),
        tie_embeddings=not any(t.name == 'output.weight' for t in reader.tensors),
        block_size=min(context, max_block_size)), context


def float32_value(x):
    """A float32 read from a file (1e-5 is 9.99999974738e-06 there) as the float it was written
    from."""
    return float(str(np.float32(x)))


# ----------------------------------------------------------------------------------------------
# Memory

def parameter_count(args):
    d, hd = args['n_embd'], args['n_embd'] // args['n_head']
    per_layer = (2 * d                                        # the two norms
                 + 2 * d * args['n_head'] * hd                # q and o
                 + 2 * d * args['n_kv_head'] * hd             # k and v
                 + 3 * d * args['intermediate_size'])         # gate, up, down
    heads = 1 if args['tie_embeddings'] else 2
    return heads * args['vocab_size'] * d + args['n_layer'] * per_layer + d


def available_memory():
    """Bytes of RAM the kernel could hand out now (MemAvailable), or None where unknown."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(args, source):
    """Stop before loading (or downloading) a model this machine cannot hold in float32: the
    parameters, twice the largest tensor (the file's copy and its float32 conversion, one at a
    time) and a margin for torch itself."""
    params = parameter_count(args)
    largest = args['vocab_size'] * args['n_embd']
    need_bytes = 4 * params + 8 * largest + (256 << 20)
    have = available_memory()
    if have is not None and need_bytes > have:
        die(f"{source}: {params / 1e6:,.0f}M parameters need about {need_bytes / 1e9:.1f} GB of "
            f"memory in float32, and {have / 1e9:.1f} GB is available: free memory or choose a "
            "smaller model")


# ----------------------------------------------------------------------------------------------
# Hugging Face folders and hf: downloads

def folder_weight_files(folder):
    """The safetensors files of a model folder: model.safetensors, or the shards its index
    lists."""
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):
        shards = shard_names(read_json(index), index)
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            die(f"{index} lists {len(shards)} shards but {len(missing)} are not in {folder} "
                f"({', '.join(missing[:3])}): download them too")
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, 'model.safetensors')
    if os.path.isfile(single):
        return [single]
    others = [f for f in os.listdir(folder) if f.endswith(('.bin', '.pt', '.pth', '.gguf'))]
    die(f"{folder} has config.json but no model.safetensors (nor model.safetensors.index.json)"
        + (f"; {', '.join(sorted(others)[:3])} is not read: pickled weights can run code, so "
           "only safetensors are" if others else '')
        + ": download the model's .safetensors files into it")


def shard_names(index, path):
    weight_map = index.get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
        die(f"{path} has no weight_map: download it again")
    names = sorted(set(weight_map.values()))
    for name in names:  # a file name, not a path: the index cannot point outside its folder
        if not isinstance(name, str) or os.path.basename(name) != name or name in ('.', '..'):
            die(f"{path} names a shard {name!r} that is not a file name in its folder")
    return names


def hub_url(repo, name):
    return f"{HUB['url']}/{repo}/resolve/main/{name}"


def hub_file(repo, name, required=True, missing=''):
    """The cached copy of one file of hf:<repo>, downloaded if needed; None for an optional file
    that the repository does not have. A HEAD request asks first, so that a missing repository or
    file is a message of its own rather than a failed download."""
    url = hub_url(repo, name)
    if os.path.exists(download.cache_path(url)):
        return download.cache_path(url)
    try:
        status = requests.head(url, allow_redirects=True,
                               timeout=download.SETTINGS['timeout']).status_code
    except requests.RequestException as e:
        if not required:  # (offline, with the required files cached: go on without it)
            print(f"  note: could not ask {url} ({type(e).__name__}); going on without {name}")
            return None
        die(f"could not reach {url} ({type(e).__name__}: {str(e)[:120]}): are you online? The "
            "files of hf: models are downloaded once, into the cache")
    if status in (401, 403, 404):
        if not required:
            return None
        # (the hub answers 401 for a repository that does not exist, as for a private one)
        die(missing or f"hf:{repo}: {url} is not there (HTTP {status}): check the owner/name "
            f"(as in {HUB['url']}/{repo}); private and gated models cannot be downloaded here "
            "(no token is sent): download it yourself and give the folder")
    return download.fetch(url, label=f"{repo}/{name}")


def hub_config(repo):
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo) or '..' in repo:
        die(f"hf:{repo} is not a model id: write hf:<owner>/<name>, e.g. "
            "hf:HuggingFaceTB/SmolLM2-135M-Instruct")
    return hub_file(repo, 'config.json')


def hub_weight_files(repo):
    """Download the safetensors weights of hf:<repo>: the single file, or the index and every
    shard it lists."""
    if not os.path.exists(download.cache_path(hub_url(repo, 'model.safetensors'))):
        index = hub_file(repo, 'model.safetensors.index.json', required=False)
        if index:
            return [hub_file(repo, s) for s in shard_names(read_json(index), index)]
    return [hub_file(repo, 'model.safetensors', missing=(
        f"hf:{repo} has neither model.safetensors nor model.safetensors.index.json: only "
        "safetensors weights are read (pickled .bin files can run code)"))]


def load_hf(source, folder, files, args, context, tokenizer, device):
    from safetensors import SafetensorError, safe_open
    cfg = ModelConfig(**args)
    names = file_names(cfg, 0)  # file name -> ours
    model = GPT(cfg)

    def tensors():
        for path in files:
            try:
                with safe_open(path, framework='pt') as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name), path
            except (SafetensorError, OSError) as e:
                die(f"{path} is not a readable safetensors file ({str(e)[:120]}): download it "
                    "again")

    dtypes = load_weights(model, tensors(), names, source)
    info = dict(source=source, format='safetensors', path=folder, files=files,
                tensor_types=dtypes, context_length=context, tokenizer_files=tokenizer)
    return finish(model, info, device)


def file_names(cfg, column):
    """{name in the file: our name} for every weight the model needs; column 0 Hugging Face's
    names, 1 GGUF's."""
    names = {}
    for part in OUTER_PARTS:
        if part[2] != 'lm_head' or not cfg.tie_embeddings:
            names[part[column] + '.weight'] = part[2] + '.weight'
    for i in range(cfg.n_layer):
        prefix = ('model.layers.', 'blk.')[column] + f'{i}.'
        for part in LAYER_PARTS:
            names[prefix + part[column] + '.weight'] = f'blocks.{i}.{part[2]}.weight'
    return names


def load_weights(model, tensors, names, source):
    """Copy each (file name, tensor, file) into its place in the model, checking names and shapes;
    stop at a tensor we have no place for and at one that is missing. Returns the dtypes seen."""
    params = model.state_dict()
    seen, dtypes = set(), set()
    for name, tensor, path in tensors:
        ours = names.get(name)
        if ours is None:
            # a tied head stored anyway, or old transformers' RoPE table: nothing we need
            if name in ('lm_head.weight', 'output.weight') or name.endswith('rotary_emb.inv_freq'):
                continue
            die(f"{path} holds {name}, which our model has no place for (biases? another "
                "architecture?); only plain Llama weights can be read")
        if not tensor.is_floating_point():
            die(f"{path}: {name} is {tensor.dtype}, not floats: quantized safetensors (GPTQ, "
                "AWQ, bitsandbytes) are not read; use the model's float16/bfloat16 weights")
        if tuple(tensor.shape) != tuple(params[ours].shape):
            die(f"{path}: {name} has shape {tuple(tensor.shape)}, but the model's config makes "
                f"it {tuple(params[ours].shape)}: do the weights belong to this config?")
        with torch.no_grad():
            params[ours].copy_(tensor)  # (converted to float32 on the way in)
        seen.add(name)
        dtypes.add(str(tensor.dtype).replace('torch.', ''))
    missing = [n for n in names if n not in seen]
    if missing:
        die(f"{source} lacks {len(missing)} of the model's weights ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}): is the download complete?")
    return sorted(dtypes)


def finish(model, info, device):
    info['model_args'] = asdict(model.cfg)
    info['params'] = sum(p.numel() for p in model.parameters())
    return model.to(device).eval(), info


# ----------------------------------------------------------------------------------------------
# GGUF

def rope_from_interleaved(w, n_heads):
    """The inverse of export.rope_to_interleaved: rows of a q or k projection (heads * head_dim,
    n_embd) in llama.cpp's order x1[0], x2[0], x1[1], x2[1], ... back to each head's [x1 | x2]."""
    rows, cols = w.shape
    # (heads, head_dim / 2, 2, n_embd) -> (heads, 2, head_dim / 2, n_embd)
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_gguf(path, device, max_block_size):
    gguf = need('gguf', 'GGUF files')
    reader = read_gguf(path)
    args, context = gguf_model_args(reader, path, max_block_size)
    check_memory(args, path)
    cfg = ModelConfig(**args)
    names = file_names(cfg, 1)
    model = GPT(cfg)
    heads = {'attn_q': cfg.n_head, 'attn_k': cfg.n_kv_head}

    def tensors():
        for t in reader.tensors:
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32, (rows, columns)
            except NotImplementedError:
                die(f"{path}: {t.name} is stored as {t.tensor_type.name}, which the gguf package "
                    "cannot dequantize; use a file in f16, bf16, q8_0, q4_0, q4_1 or a k-quant")
            # GGUF lists dimensions innermost first
            w = torch.from_numpy(w.reshape(tuple(reversed(t.shape.tolist()))).copy())
            part = t.name.split('.')[-2] if t.name.startswith('blk.') else ''
            if part in heads and w.dim() == 2 and w.shape[0] % (2 * heads[part]) == 0:
                w = rope_from_interleaved(w, heads[part])
            yield t.name, w, path

    load_weights(model, tensors(), names, path)
    file_types = sorted({t.tensor_type.name.lower() for t in reader.tensors})
    info = dict(source=path, format='gguf', path=path, files=[path], tensor_types=file_types,
                context_length=context, tokenizer_files={}, name=field(reader, 'general.name'))
    return finish(model, info, device)


def read_gguf(path):
    gguf = need('gguf', 'GGUF files')
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        die(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]}): download "
            "it again")


def field(reader, key):
    f = reader.fields.get(key)
    return f.contents() if f is not None else None
