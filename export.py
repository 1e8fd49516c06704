"""
Stage 6: take the model elsewhere: a Hugging Face Llama folder (transformers) and a GGUF file
(llama.cpp, ollama, LM Studio).

    python export.py config/demo.py --phase=sft                     # -> out/demo/export/sft/
    python export.py config/demo.py --ckpt=out/demo/lora/best.pt --gguf_type=q8_0 --overwrite=True

It exports the checkpoint sample.py would load (a LoRA adapter is merged into its base first):

    <export_dir>/hf/config.json, generation_config.json      LlamaForCausalLM, eos = </s> and <|eot|>
    <export_dir>/hf/model.safetensors                         float32 weights (a tied embedding stored once)
    <export_dir>/hf/tokenizer.model, tokenizer.json, tokenizer_config.json (with the chat template)
    <export_dir>/model-<gguf_type>.gguf                       llama.cpp's format, tokenizer and template inside
    <export_dir>/Modelfile                                    `ollama create <name> -f Modelfile`

Our model is a Llama on purpose (RMSNorm, RoPE, SwiGLU, GQA, no biases), so the export is mostly
renaming. Two things need care. RoPE: we rotate the pairs (i, i + head_dim/2) of each head (the
`rotate_half` layout transformers uses too), while llama.cpp rotates neighbours (2i, 2i+1), so the
rows of the q and k weights are reordered for GGUF; the attention scores are the same. The
tokenizer: our SentencePiece model goes in as it is (tokenizer.model), and also as a tokenizer.json
(the `tokenizers` library's format, which transformers loads without sentencepiece or protobuf) and
as GGUF token lists with scores and types, all set up to give our ids.

The chat templates (tokenizer_config.json's, the GGUF file's, the Modelfile's) give a conversation
that has no system message the system prompt sample.py's chat gives it (tokenizer.system_prompt:
system_file, else system, else the built-in one), so that they feed the model the same ids.

Where the other tokenizers cannot match ours (tests/test_export.py checks the rest):
  - A literal U+2581 ('▁') in text: ours spells it with byte tokens, theirs read it as a space.
  - The special tokens typed as text ("<|eot|>"): ours never turn text into a special id;
    transformers' tokenizer does (its chat template needs that), and llama.cpp does when asked to
    parse specials (its chat mode does). Do not pass untrusted text through those with specials on.

Needs the export extra: pip install -r requirements-export.txt (safetensors, gguf).
"""
import json
import os
import shutil
import struct
import tempfile
import time

import numpy as np
import torch

from checkpoint import load_configured
from common import check_writable, die, unused_keys
from configurator import configure
from tokenizer import SPECIALS, gguf_vocab, load_tokenizer, system_prompt

EXTRA = "pip install -r requirements-export.txt"


def jinja_string(text):
    """`text` as a Jinja string literal that Jinja2 (transformers) and llama.cpp's template engine
    both read back as it is: backslashes, double quotes and line breaks escaped, the rest left
    alone ('{{' and '{%' inside a string literal are text, not tags)."""
    escapes = {'\\': '\\\\', '"': '\\"', '\n': '\\n', '\r': '\\r', '\t': '\\t'}
    return '"' + ''.join(escapes.get(c, c) for c in text) + '"'


def chat_template(system):
    """Our chat template (tokenizer.render_conversation) as Jinja, for transformers'
    apply_chat_template and llama.cpp's --jinja: bos, then each message as [role] content, an
    assistant's closed by [eot]; the generation prompt is [asst]. A conversation without a system
    message gets `system` (tokenizer.system_prompt), as in sample.py's chat, so that both give the
    same ids. Roles must go: optional system, then user and assistant taking turns."""
    return (
        "{{ bos_token }}"
        "{% if not messages or messages[0]['role'] != 'system' %}"
        "<|sys|>{{ " + jinja_string(system) + " }}"
        "{% endif %}"
        "{% for message in messages %}"
        "{% set expected = 'assistant' if (loop.index0 - (1 if messages[0]['role'] == 'system' "
        "else 0)) % 2 else 'user' %}"
        "{% if message['role'] == 'system' and loop.first %}<|sys|>"
        "{% elif message['role'] != expected %}"
        "{{ raise_exception('roles go: optional system, then user and assistant taking turns') }}"
        "{% elif message['role'] == 'user' %}<|usr|>"
        "{% else %}<|asst|>{% endif %}"
        "{{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}<|eot|>{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|asst|>{% endif %}"
    )


def chatml_template(system):
    """An imported model's ChatML template (tokenizer.render_conversation for template 'chatml'):
    each message as <|im_start|>role\ncontent<|im_end|>\n, the generation prompt
    <|im_start|>assistant\n, and a conversation without a system message gets `system`, as in
    sample.py's chat (the model's own template may bring another default: ours is chat's)."""
    return (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        "<|im_start|>system\n{{ " + jinja_string(system) + " }}<|im_end|>\n"
        "{% endif %}"
        "{% for message in messages %}"
        "{% set expected = 'assistant' if (loop.index0 - (1 if messages[0]['role'] == 'system' "
        "else 0)) % 2 else 'user' %}"
        "{% if not (message['role'] == 'system' and loop.first) and message['role'] != expected %}"
        "{{ raise_exception('roles go: optional system, then user and assistant taking turns') }}"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHATML_OLLAMA = ('<|im_start|>system\n{{ .System }}<|im_end|>\n{{ range .Messages }}'
                 '{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                 '{{ end }}{{ end }}<|im_start|>assistant\n')


# The same for ollama, whose templates are Go templates. Its system prompt (.System) is the
# Modelfile's SYSTEM unless the conversation brings one; <|sys|> comes even for an empty one, as
# in our chat.
OLLAMA_TEMPLATE = ('<|sys|>{{ .System }}{{ range .Messages }}'
                   '{{ if eq .Role "user" }}<|usr|>{{ .Content }}{{ else if eq .Role "assistant" }}'
                   '<|asst|>{{ .Content }}<|eot|>{{ end }}{{ end }}<|asst|>')


def need(module):
    """Import an export-only package, or stop with the pip command that installs it."""
    try:
        return __import__(module)
    except ImportError:
        die(f"export.py needs the '{module}' package, which the rest of smallchat does not: "
            f"{EXTRA}")


# ----------------------------------------------------------------------------------------------
# The SentencePiece model file, read directly: it is a protobuf message, and the few fields we need
# (each piece's text, score and type; the model type; the normalizer's settings) are easy to decode,
# which spares the export a protobuf dependency.

def varint(buf, i):
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def proto_fields(buf):
    """(field number, value) of each field of a protobuf message: ints for varints, bytes
    otherwise."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 2:
            n, i = varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield field, value


def read_sentencepiece(path):
    """Pieces [(text, score, type)] with SentencePiece's types (1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte: the numbers GGUF uses too), the model type, the normalizer."""
    info = {'pieces': [], 'model_type': 1, 'add_dummy_prefix': True,
            'remove_extra_whitespaces': True,
            'normalizer': 'nmt_nfkc'}  # protobuf defaults
    for field, value in proto_fields(open(path, 'rb').read()):
        if field == 1:  # ModelProto.pieces
            piece = {1: b'', 2: b'\0\0\0\0', 3: 1}
            piece.update(proto_fields(value))
            info['pieces'].append((piece[1].decode('utf-8'), struct.unpack('<f', piece[2])[0],
                                   piece[3]))
        elif field == 2:  # ModelProto.trainer_spec
            info['model_type'] = dict(proto_fields(value)).get(3, 1)
        elif field == 3:  # ModelProto.normalizer_spec
            spec = dict(proto_fields(value))
            info['normalizer'] = spec.get(1, b'').decode('utf-8')
            info['add_dummy_prefix'] = bool(spec.get(3, 1))
            info['remove_extra_whitespaces'] = bool(spec.get(4, 1))
    info['model_type'] = {1: 'unigram', 2: 'bpe'}.get(info['model_type'],
                                                      f"type {info['model_type']}")
    return info


# ----------------------------------------------------------------------------------------------
# What the formats can express

def check_exportable(cfg, model, sp, tok_path):
    """Stop, naming the setting, if this model or tokenizer has something the exports cannot say."""
    if sp['model_type'] not in ('bpe', 'unigram'):
        die(f"{tok_path} is a SentencePiece {sp['model_type']} model; export handles bpe and "
            "unigram ones")
    if sp['add_dummy_prefix'] or sp['remove_extra_whitespaces'] or sp['normalizer'] != 'identity':
        die(f"{tok_path} normalises text (add_dummy_prefix / remove_extra_whitespaces / a "
            "normalization rule); tokenizer.py trains without any, which is what the exported "
            "tokenizers reproduce. Use its tokenizer.")
    if len(sp['pieces']) != model.cfg.vocab_size:
        die(f"the model has vocab_size={model.cfg.vocab_size} but {tok_path} has "
            f"{len(sp['pieces'])} pieces; both formats need one token per embedding row")
    if cfg.gguf_type != 'none' and sp['model_type'] == 'unigram':
        die(f"{tok_path} is a unigram SentencePiece model (tokenizer_type='unigram'): llama.cpp's "
            "SentencePiece tokenizer merges pieces by score, which gives a BPE model's ids but not "
            "a unigram model's. Export the Hugging Face folder alone with --gguf_type=none, or "
            "train with tokenizer_type='bpe'.")


def check_imported_exportable(cfg, model, tok):
    """An imported tokenizer: no id past the embedding; GGUF needs a pre-tokenizer llama.cpp knows
    by name (it picks llama.cpp's splitting rules) and, for chat, the ChatML template."""
    if tok.vocab_size > model.cfg.vocab_size:
        die(f"{tok.path} has {tok.vocab_size} tokens but the model embeds "
            f"{model.cfg.vocab_size}: is it this model's tokenizer?")
    if cfg.gguf_type != 'none' and gguf_vocab(tok)['pre'] is None:
        die(f"{tok.path}: its pre-tokenizer is not one llama.cpp knows by name, so a GGUF file "
            "would split text differently: export the Hugging Face folder alone with "
            "--gguf_type=none")


# ----------------------------------------------------------------------------------------------
# Hugging Face: config.json, model.safetensors, tokenizer files

def hf_state_dict(model):
    """Our weights under LlamaForCausalLM's names (float32, contiguous). A tied output head is not
    stored: transformers ties lm_head to embed_tokens when tie_word_embeddings is true."""
    out = {'model.embed_tokens.weight': model.embed.weight}
    for i, block in enumerate(model.blocks):
        p = f'model.layers.{i}.'
        out[p + 'input_layernorm.weight'] = block.attn_norm.weight
        for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
            out[p + f'self_attn.{name}.weight'] = getattr(block.attn, name).weight
        out[p + 'post_attention_layernorm.weight'] = block.mlp_norm.weight
        for name in ('gate_proj', 'up_proj', 'down_proj'):
            out[p + f'mlp.{name}.weight'] = getattr(block.mlp, name).weight
    out['model.norm.weight'] = model.norm.weight
    if not model.cfg.tie_embeddings:
        out['lm_head.weight'] = model.lm_head.weight
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def rms_eps(model):
    """nn.RMSNorm with eps=None uses the float32 machine epsilon (the residual stream is
    float32)."""
    return model.norm.eps if model.norm.eps is not None else torch.finfo(torch.float32).eps


def hf_config(model, tok):
    c = model.cfg
    return {
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
        'vocab_size': c.vocab_size, 'hidden_size': c.n_embd,
        'intermediate_size': model.blocks[0].mlp.gate_proj.out_features,
        'num_hidden_layers': c.n_layer, 'num_attention_heads': c.n_head,
            'num_key_value_heads': c.n_kv_head,
        'head_dim': c.n_embd // c.n_head, 'hidden_act': 'silu',
            'max_position_embeddings': c.block_size,
        'rms_norm_eps': rms_eps(model), 'rope_theta': c.rope_theta, 'rope_scaling': None,
        'attention_bias': False, 'mlp_bias': False, 'attention_dropout': 0.0,
            'initializer_range': 0.02,
        'tie_word_embeddings': c.tie_embeddings, 'bos_token_id': tok.bos_id,
            'eos_token_id': tok.eos_id,
        'pad_token_id': None, 'use_cache': True, 'torch_dtype': 'float32',
    }


def tokenizer_json(sp):
    """The tokenizer in the `tokenizers` library's format. No normalizer, no added space in front
    (our SentencePiece settings); spaces become '▁' and the pieces come from our vocabulary.
    Specials and the user-defined '\\n' are 'added tokens', matched before anything else, as
    SentencePiece does."""
    pieces = sp['pieces']
    vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
    if sp['model_type'] == 'bpe':
        # SentencePiece BPE merges, at each step, the adjacent pair whose joined piece scores
        # highest. The same as ranked merges: every way to split a piece into two pieces, ranked by
        # the piece's score
        ranked = []
        for i, (text, score, kind) in enumerate(pieces):
            if kind != 1:
                continue
            for cut in range(1, len(text)):
                left, right = text[:cut], text[cut:]
                if vocab.get(left) is not None and vocab.get(right) is not None:
                    ranked.append((-score, i, vocab[left], [left, right]))
        ranked.sort(key=lambda r: r[:3])
        model = {'type': 'BPE', 'dropout': None, 'unk_token': pieces[0][0],
                 'continuing_subword_prefix': None,
                 'end_of_word_suffix': None, 'fuse_unk': True, 'byte_fallback': True,
                 'ignore_merges': False, 'vocab': vocab, 'merges': [r[3] for r in ranked]}
    else:
        model = {'type': 'Unigram', 'unk_id': 0, 'byte_fallback': True,
                 'vocab': [[text, score] for text, score, _ in pieces]}
    added = [{'id': i, 'content': text, 'single_word': False, 'lstrip': False, 'rstrip': False,
              'normalized': False, 'special': kind in (2, 3)}
             for i, (text, _, kind) in enumerate(pieces) if kind in (2, 3, 4)]
    return {
        'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added,
            'normalizer': None,
        'pre_tokenizer': {'type': 'Metaspace', 'replacement': '\u2581', 'prepend_scheme': 'never',
                          'split': False},
        # tokenizer(text) starts with <s>, as sample.py's completion prompt does
        'post_processor': {
            'type': 'TemplateProcessing',
            'single': [{'SpecialToken': {'id': '<s>', 'type_id': 0}},
                       {'Sequence': {'id': 'A', 'type_id': 0}}],
            'pair': [{'SpecialToken': {'id': '<s>', 'type_id': 0}},
                     {'Sequence': {'id': 'A', 'type_id': 0}},
                     {'Sequence': {'id': 'B', 'type_id': 1}}],
            'special_tokens': {'<s>': {'id': '<s>', 'ids': [1], 'tokens': ['<s>']}}},
        'decoder': {'type': 'Sequence', 'decoders': [
            {'type': 'Replace', 'pattern': {'String': '\u2581'}, 'content': ' '},
            {'type': 'ByteFallback'}, {'type': 'Fuse'}]},
        'model': model,
    }


def tokenizer_config(sp, block_size, system):
    specials = {i: text for i, (text, _, kind) in enumerate(sp['pieces']) if kind in (2, 3, 4)}
    return {
        'tokenizer_class': 'PreTrainedTokenizerFast',  # tokenizer.json as it is
        'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': None,
        'additional_special_tokens': SPECIALS[3:],
        'add_bos_token': True, 'add_eos_token': False, 'add_prefix_space': False, 'legacy': False,
        'clean_up_tokenization_spaces': False, 'model_max_length': block_size,
        'added_tokens_decoder': {str(i): {'content': text, 'lstrip': False, 'rstrip': False,
                                          'normalized': False,
                                          'single_word': False, 'special': text in SPECIALS}
                                 for i, text in specials.items()},
        'chat_template': chat_template(system),
    }


def imported_tokenizer_config(tok, block_size, system):
    """tokenizer_config.json for an imported (byte-level BPE) tokenizer: tokenizer.json does the
    tokenizing; no token is added in front (the template starts every conversation); the chat
    template is chat's, with its system prompt."""
    tokens = gguf_vocab(tok)['tokens']
    return {
        'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': tokens[tok.bos_id],
        'eos_token': tokens[tok.eot_id], 'unk_token': None, 'pad_token': None,
        'add_bos_token': False, 'add_eos_token': False, 'add_prefix_space': False,
        'clean_up_tokenization_spaces': False, 'model_max_length': block_size,
        'chat_template': (chatml_template(system) if tok.template == 'chatml' else None),
    }


def write_json(path, obj):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write('\n')


def write_hf(folder, model, tok, sp, system):
    need('safetensors')
    from safetensors.torch import save_file
    os.makedirs(folder)
    save_file(hf_state_dict(model), os.path.join(folder, 'model.safetensors'),
                                metadata={'format': 'pt'})
    write_json(os.path.join(folder, 'config.json'), hf_config(model, tok))
    write_json(os.path.join(folder, 'generation_config.json'), {
        'bos_token_id': tok.bos_id, 'eos_token_id': [tok.eos_id, tok.eot_id], 'do_sample': False})
    if sp is None:  # an imported tokenizer: its tokenizer.json as it is, our chat template
        shutil.copyfile(tok.path, os.path.join(folder, 'tokenizer.json'))
        write_json(os.path.join(folder, 'tokenizer_config.json'),
                   imported_tokenizer_config(tok, model.cfg.block_size, system))
        return
    shutil.copyfile(tok.path, os.path.join(folder, 'tokenizer.model'))
    write_json(os.path.join(folder, 'tokenizer.json'), tokenizer_json(sp))
    write_json(os.path.join(folder, 'tokenizer_config.json'),
               tokenizer_config(sp, model.cfg.block_size, system))
    write_json(os.path.join(folder, 'special_tokens_map.json'), {
        'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>',
        'additional_special_tokens': SPECIALS[3:]})


# ----------------------------------------------------------------------------------------------
# GGUF, as llama.cpp's convert_hf_to_gguf.py writes a Llama

def rope_to_interleaved(w, n_heads):
    """Rows of a q or k projection (heads * head_dim, n_embd): each head's rows [x1 | x2]
    (rotate_half's pairs i, i + head_dim/2) reordered to x1[0], x2[0], x1[1], x2[1], ...
    (llama.cpp's pairs 2i, 2i+1)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(model):
    """(name, float32 array) in llama.cpp's naming; q and k rows in its RoPE order."""
    c = model.cfg
    weights = hf_state_dict(model)
    names = {'model.embed_tokens.weight': 'token_embd.weight',
             'model.norm.weight': 'output_norm.weight',
             # a tied model has no output.weight: llama.cpp reuses token_embd
             'lm_head.weight': 'output.weight'}
    per_layer = {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm',
                 'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
                 'self_attn.v_proj': 'attn_v',
                 'self_attn.o_proj': 'attn_output', 'mlp.gate_proj': 'ffn_gate',
                 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}
    for hf_name, w in weights.items():
        w = w.numpy()
        if hf_name.startswith('model.layers.'):
            _, _, i, rest = hf_name.split('.', 3)
            part = rest.rsplit('.', 1)[0]
            if part == 'self_attn.q_proj':
                w = rope_to_interleaved(w, c.n_head)
            elif part == 'self_attn.k_proj':
                w = rope_to_interleaved(w, c.n_kv_head)
            yield f'blk.{i}.{per_layer[part]}.weight', w
        else:
            yield names[hf_name], w


def gguf_encode(gguf, w, gguf_type):
    """(data, GGML type) for one tensor. Vectors (the norms) stay float32, as llama.cpp's converter
    keeps them; q8_0 needs rows that are a multiple of its 32-value blocks, else the tensor is
    stored f16."""
    T = gguf.GGMLQuantizationType
    if w.ndim == 1 or gguf_type == 'f32':
        return w.astype(np.float32), T.F32
    if gguf_type == 'q8_0' and w.shape[-1] % 32 == 0:
        return gguf.quants.quantize(w, T.Q8_0), T.Q8_0
    if gguf_type == 'bf16':
        return gguf.quants.quantize(w, T.BF16), T.BF16
    return w.astype(np.float16), T.F16


def write_gguf(path, model, tok, sp, gguf_type, name, system):
    gguf = need('gguf')
    c = model.cfg
    file_type = {'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
                 'bf16': gguf.LlamaFileType.MOSTLY_BF16,
                 'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    w = gguf.GGUFWriter(path, 'llama')
    w.add_type('model')
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(model.blocks[0].mlp.gate_proj.out_features)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_dimension_count(c.n_embd // c.n_head)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(rms_eps(model))
    if sp is None:
        add_imported_tokenizer(w, model, tok, system)
    else:
        add_our_tokenizer(w, tok, sp, system)
    fallback = []
    for tensor_name, weight in gguf_tensors(model):
        data, qtype = gguf_encode(gguf, weight, gguf_type)
        w.add_tensor(tensor_name, data, raw_dtype=qtype)  # (quantized data: its shape is in bytes)
        if gguf_type == 'q8_0' and weight.ndim == 2 and qtype != gguf.GGMLQuantizationType.Q8_0:
            fallback.append(tensor_name)
    if fallback:
        print("export: rows not a multiple of q8_0's 32-value blocks, stored f16: "
              f"{', '.join(fallback)}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_our_tokenizer(w, tok, sp, system):
    """Our SentencePiece model as llama.cpp's 'llama' tokenizer: our pieces, scores and types."""
    w.add_tokenizer_model('llama')
    w.add_token_list([text for text, _, _ in sp['pieces']])
    w.add_token_scores([score for _, score, _ in sp['pieces']])
    w.add_token_types([kind for _, _, kind in sp['pieces']])
    w.add_unk_token_id(tok.unk_id)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_eot_token_id(tok.eot_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_remove_extra_whitespaces(False)
    w.add_chat_template(chat_template(system))


def add_imported_tokenizer(w, model, tok, system):
    """An imported byte-level BPE tokenizer as llama.cpp's 'gpt2' model: tokens, types, merges and
    the pre-tokenizer's name (which picks llama.cpp's splitting rules). Token ids past the
    tokenizer's, where the model's embedding is padded larger, are unused placeholders."""
    vocab = gguf_vocab(tok)
    pad = model.cfg.vocab_size - len(vocab['tokens'])
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre(vocab['pre'])
    w.add_token_list(vocab['tokens'] + [f'[PAD{i}]' for i in range(pad)])
    w.add_token_types(vocab['token_types'] + [5] * pad)  # (5: unused)
    w.add_token_merges(vocab['merges'])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eot_id if tok.template == 'chatml' else tok.eos_id)
    w.add_eot_token_id(tok.eot_id)
    w.add_add_bos_token(False)
    if tok.template == 'chatml':
        w.add_chat_template(chatml_template(system))


def write_modelfile(path, gguf_name, system, template='smallchat'):
    if template == 'chatml':
        lines = [f'FROM ./{gguf_name}', f'TEMPLATE """{CHATML_OLLAMA}"""',
                 'PARAMETER stop "<|im_end|>"']
    else:
        lines = [f'FROM ./{gguf_name}', f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
                 'PARAMETER stop "<|eot|>"', 'PARAMETER stop "</s>"']
    if '"""' in system:  # (ollama reads a triple-quoted value up to the next """, unescaped)
        die('the system prompt holds """, which a Modelfile cannot: change it (system_file or '
            'system), or export with --gguf_type=none')
    if system:  # one line needs no quotes (a quoted one could not end in a quote)
        lines.append(f'SYSTEM {system}' if '\n' not in system and not system.startswith('"')
                     else f'SYSTEM """{system}"""')
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')


# ----------------------------------------------------------------------------------------------

# What an export folder holds (write_hf, write_gguf, write_modelfile): --overwrite=True replaces a
# folder holding these alone, never one with anything else in it (out_dir, data_dir, a home folder).
HF_FILES = {'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.model',
            'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'}


def not_ours(folder):
    """What in `folder` export.py did not write: [] for an earlier export (or an empty folder)."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return [f"{os.path.basename(os.path.normpath(folder))} itself (a file or a link)"]
    found = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry == 'hf' and os.path.isdir(path) and not os.path.islink(path):
            found += [f"hf/{f}" for f in sorted(os.listdir(path)) if f not in HF_FILES]
        elif not (entry == 'Modelfile' or entry.startswith('model-') and entry.endswith('.gguf')):
            found.append(entry)
    return found


def prepare_destination(folder, overwrite):
    """Refuse a folder with something in it unless overwrite, and one that is not an earlier export
    even then; return a fresh temp folder beside it."""
    folder = os.path.normpath(folder)
    used = os.path.lexists(folder) and (not os.path.isdir(folder) or os.listdir(folder))
    found = not_ours(folder) if used else []
    if found:
        shown = ', '.join(repr(f) for f in found[:5]) + (' ...' if len(found) > 5 else '')
        die(f"export_dir={folder} holds what export.py did not write ({len(found)} entries: "
            f"{shown}); it replaces only an earlier export (hf/, model-*.gguf, Modelfile), even "
            "with --overwrite=True. Choose an --export_dir of its own, e.g. "
            "<out_dir>/export/<phase>")
    if used and not overwrite:
        die(f"{folder} already holds an export: pass --overwrite=True to replace it, or choose "
            "another --export_dir")
    # a name of its own beside it (never an existing folder of the same name)
    return tempfile.mkdtemp(prefix=os.path.basename(folder) + '.tmp', dir=os.path.dirname(
        os.path.abspath(folder)))


def swap_in(tmp, folder):
    """Replace `folder` with the finished `tmp` by renames: an interruption leaves one or the
    other."""
    folder = os.path.normpath(folder)
    old = None
    if os.path.exists(folder):
        old = tempfile.mkdtemp(prefix=os.path.basename(folder) + '.old',
                               dir=os.path.dirname(os.path.abspath(folder)))
        os.replace(folder, old)  # (over the empty folder just made)
    os.replace(tmp, folder)
    if old:
        shutil.rmtree(old)


def main():
    cfg = configure()  # (checks gguf_type against the choices in configurator.KEYS)
    unused_keys(cfg, ['device', 'dtype', 'compile', 'compile_decode'],
                "export.py loads the model in float32 on the CPU and writes float32 weights (and "
                "gguf_type's)")
    need('safetensors')
    if cfg.gguf_type != 'none':
        need('gguf')
    t0 = time.time()
    folder = cfg.export_dir or os.path.join(cfg.out_dir, 'export', cfg.phase)
    # (before the work, not after it)
    check_writable(os.path.dirname(os.path.abspath(folder)), 'export_dir')
    tok = load_tokenizer(cfg.tokenizer_path)
    system = system_prompt(cfg)  # chat's: the templates give it to conversations without one
    model, ckpt, path = load_configured(cfg, tok, 'cpu')
    if tok.template == 'smallchat':
        sp = read_sentencepiece(tok.path)
        check_exportable(cfg, model, sp, tok.path)
    else:  # an imported tokenizer (base_model)
        sp = None
        check_imported_exportable(cfg, model, tok)
    tmp = prepare_destination(folder, cfg.overwrite)
    try:
        name = f"smallchat-{os.path.basename(os.path.normpath(cfg.out_dir))}-{cfg.phase}"
        write_hf(os.path.join(tmp, 'hf'), model, tok, sp, system)
        if cfg.gguf_type != 'none':
            gguf_name = f'model-{cfg.gguf_type}.gguf'
            write_gguf(os.path.join(tmp, gguf_name), model, tok, sp, cfg.gguf_type, name, system)
            write_modelfile(os.path.join(tmp, 'Modelfile'), gguf_name, system, tok.template)
        swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"export: {path} (step {ckpt['iter']}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) -> {folder} in "
          f"{time.time() - t0:.1f} s")
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            p = os.path.join(root, f)
            print(f"  {os.path.relpath(p, folder):32s} {os.path.getsize(p) / 1e6:9.2f} MB")


if __name__ == '__main__':
    main()
