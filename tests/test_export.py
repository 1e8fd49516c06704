"""export.py: the Hugging Face folder reproduces our logits, greedy text, token ids and chat ids in
transformers; the GGUF file holds every tensor and the metadata llama.cpp reads, and a forward pass
written from llama.cpp's conventions (neighbouring RoPE pairs) over its tensors gives our logits."""
import glob
import json
import math
import os

import pytest
import torch

from conftest import llama_greedy, load_cfg, run
import export
from checkpoint import checkpoint_path, load_model
from model import GPT, ModelConfig
from tokenizer import SPACE, Tokenizer, render_conversation, render_for_reply, system_prompt

gguf = pytest.importorskip('gguf', reason="the export extra is not installed: pip install -r requirements-export.txt")
pytest.importorskip('safetensors', reason="the export extra is not installed: pip install -r requirements-export.txt")

HARD_TEXT = [
    'plain words and punctuation: yes, no; maybe!',
    '  two leading spaces, then   three inside and a trailing one ',
    'tabs\there\t\tand\nnew\n\nlines\n',
    '\n starts with a newline',
    '中文 and 日本語 mixed with english',
    'emoji 😀🚲 and accents: café, naïve, Zürich',
    'digits 1234567890 and 3.14159, 20°C',
    ' ',
    '\t\n \n',
]
CHATS = [
    [{'role': 'user', 'content': 'what does the cat eat?'}],
    [{'role': 'system', 'content': 'you are a test bot.'}, {'role': 'user', 'content': 'what does the cat eat?'},
     {'role': 'assistant', 'content': 'salt and flour.'}, {'role': 'user', 'content': '  and the sea?\n中文 😀'}],
    [{'role': 'system', 'content': ''}, {'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': ' y\t'},
     {'role': 'user', 'content': 'tabs\tand\nnewlines'}],
]


# a system prompt that Jinja would misread if it were pasted into the template as it is
TRICKY_SYSTEM = ('say "hi", then \'bye\'; {{ not a tag }} {% if x %}{# nor a comment #} %} }}\n'
                 'second line\twith a tab, a backslash \\ and \\n and \\u00e9 as text, café 😀')


def with_system(messages, system):
    """The conversation as chat feeds it: with `system` first when it brings no system message."""
    if messages[0]['role'] == 'system':
        return messages
    return [{'role': 'system', 'content': system}] + messages


@pytest.fixture(scope='module')
def exported(sft_trained, tmp_path_factory):
    """The SFT smoke model exported with float32 GGUF weights; (export folder, our model, tokenizer)."""
    cfg_path, _ = sft_trained
    folder = tmp_path_factory.mktemp('export') / 'out'
    p = run('export.py', cfg_path, '--gguf_type=f32', f'--export_dir={folder}', check=True)
    assert 'model-f32.gguf' in p.stdout
    cfg = load_cfg(cfg_path)
    tok = Tokenizer(cfg.tokenizer_path)
    model, _ = load_model(checkpoint_path(cfg)[0], 'cpu', tok.sha256)
    return str(folder), model, tok


def prompts(tok):
    """Completion prompts and chat prompts, as sample.py builds them."""
    return [[tok.bos_id] + tok.encode('the cat eats'), [tok.bos_id] + tok.encode(' tomorrow\tmorning\n'),
            render_for_reply(tok, CHATS[0]), render_for_reply(tok, CHATS[1][:2])]


def greedy(model, ids, n):
    return list(model.generate(ids, n, temperature=0))


# ---- the Hugging Face folder in transformers ----

@pytest.fixture(scope='module')
def hf(exported):
    transformers = pytest.importorskip('transformers', reason="transformers is a dev requirement: "
                                       "pip install -r requirements-dev.txt")
    folder = os.path.join(exported[0], 'hf')
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def test_transformers_gives_our_logits_and_greedy_text(exported, hf):
    _, ours, tok = exported
    theirs, _ = hf
    for ids in prompts(tok):
        x = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)
    for ids in prompts(tok):
        assert len(ids) + 50 <= ours.cfg.block_size  # within the context: no window slides
        expected = greedy(ours, ids, 50)
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=50, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.eos_id)
        assert out[0, len(ids):].tolist() == expected
    # and with its own stop tokens, a chat reply ends where ours does: at <|eot|>
    ids = prompts(tok)[3]
    reply = greedy(ours, ids, 40)
    stop = reply.index(tok.eot_id) + 1 if tok.eot_id in reply else len(reply)
    out = theirs.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    assert out[0, len(ids):].tolist()[:stop] == reply[:stop]


def test_autotokenizer_gives_our_ids_and_text(exported, hf):
    _, _, tok = exported
    _, hf_tok = hf
    for text in HARD_TEXT:
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf_tok(text).input_ids == [tok.bos_id] + ids  # tokenizer(text) starts with <s>, like sample.py
        assert hf_tok.decode(ids) == text
    # documented differences (export.py's docstring): these are where transformers cannot match us
    assert hf_tok.encode(f'a{SPACE}b', add_special_tokens=False) != tok.encode(f'a{SPACE}b')
    assert hf_tok.encode('<|eot|>', add_special_tokens=False) == [tok.eot_id] != tok.encode('<|eot|>')


def test_apply_chat_template_gives_our_chat_ids(exported, hf, sft_trained):
    _, _, tok = exported
    _, hf_tok = hf
    system = system_prompt(load_cfg(sft_trained[0]))  # the config's `system`
    assert system == 'you are a test bot.'
    for messages in CHATS:  # a conversation without a system message gets chat's (CHATS[0])
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ids['input_ids'] == render_for_reply(tok, with_system(messages, system))
        ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)
        assert ids['input_ids'] == render_conversation(tok, with_system(messages, system))[0]
    for bad in ([{'role': 'assistant', 'content': 'x'}], [{'role': 'user', 'content': 'x'}] * 2,
                [{'role': 'user', 'content': 'x'}, {'role': 'system', 'content': 'y'}]):
        with pytest.raises(Exception, match='roles go'):
            hf_tok.apply_chat_template(bad)


def test_chat_template_reads_any_system_prompt_back_as_it_is():
    """The system prompt is a string literal inside the template: quotes, tags, backslashes and line
    breaks in it come out as text, in the Jinja environment transformers renders templates with."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for system in (TRICKY_SYSTEM, '', ' ', 'ends in a backslash \\', 'cr\r\nlf', '"', "'", '\\"'):
        text = env.from_string(export.chat_template(system)).render(
            messages=[{'role': 'user', 'content': 'x'}], bos_token='<s>',
            add_generation_prompt=True)
        assert text == f'<s><|sys|>{system}<|usr|>x<|asst|>', repr(system)


def test_modelfile_refuses_a_system_prompt_it_cannot_quote(tmp_path):
    with pytest.raises(SystemExit, match='"""'):
        export.write_modelfile(str(tmp_path / 'Modelfile'), 'model-f32.gguf', 'a """ b\nc')


def test_export_gives_chat_s_system_prompt_from_a_system_file(sft_trained, tmp_path, monkeypatch):
    """--system_file: the Modelfile's SYSTEM, and the HF and GGUF templates' ids for a conversation
    without a system message, are those sample.py's chat feeds the model."""
    transformers = pytest.importorskip('transformers', reason="transformers is a dev requirement")
    import io
    import types
    from contextlib import nullcontext
    import sample
    cfg_path, _ = sft_trained
    (tmp_path / 'voice.txt').write_text(f'\n{TRICKY_SYSTEM}\n', encoding='utf-8')
    system_file = f'--system_file={tmp_path}/voice.txt'
    run('export.py', cfg_path, '--gguf_type=f32', system_file, f'--export_dir={tmp_path}/x',
        check=True)
    cfg = load_cfg(cfg_path, system_file, '--compile_decode=False')
    tok = Tokenizer(cfg.tokenizer_path)
    assert system_prompt(cfg) == TRICKY_SYSTEM  # the file wins over the config's `system`, stripped
    modelfile = (tmp_path / 'x' / 'Modelfile').read_text(encoding='utf-8')
    assert f'SYSTEM """{TRICKY_SYSTEM}"""\n' in modelfile
    assert '<|sys|>{{ .System }}' in modelfile

    class Recorder:  # a model that records what chat feeds it and says nothing
        # room for the long system prompt
        cfg = types.SimpleNamespace(block_size=1024, vocab_size=tok.vocab_size)
        prompts = []

        def generate(self, ids, *args, **kwargs):
            self.prompts.append(list(ids))
            yield tok.eot_id

    monkeypatch.setattr(sample, 'KVCache',
                        lambda model: types.SimpleNamespace(pos=0, reset=lambda: None))
    monkeypatch.setattr('sys.stdin', io.StringIO('what does the cat eat?\n'))
    model = Recorder()
    sample.chat(cfg, model, tok, nullcontext(), None)
    messages = [{'role': 'user', 'content': 'what does the cat eat?'}]
    fed = model.prompts[0]
    assert fed == render_for_reply(tok, with_system(messages, TRICKY_SYSTEM))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'x' / 'hf'))
    gguf_file = gguf.GGUFReader(str(tmp_path / 'x' / 'model-f32.gguf'))
    template = gguf_fields(gguf_file)['tokenizer.chat_template']
    assert template == hf_tok.chat_template == export.chat_template(TRICKY_SYSTEM)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)['input_ids'] == fed
    for messages in CHATS:
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)
        assert ids['input_ids'] == render_for_reply(tok, with_system(messages, TRICKY_SYSTEM))


def test_hf_folder_files(exported):
    folder, model, tok = exported
    hf_dir = os.path.join(folder, 'hf')
    config = json.load(open(os.path.join(hf_dir, 'config.json')))
    c = model.cfg
    assert config['architectures'] == ['LlamaForCausalLM']
    assert (config['hidden_size'], config['num_hidden_layers'], config['num_attention_heads'],
            config['num_key_value_heads'], config['max_position_embeddings'], config['rope_theta'],
            config['tie_word_embeddings'], config['bos_token_id'], config['eos_token_id']) == \
        (c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.block_size, c.rope_theta, True, 1, 2)
    assert json.load(open(os.path.join(hf_dir, 'generation_config.json')))['eos_token_id'] == [tok.eos_id, tok.eot_id]
    from safetensors import safe_open
    with safe_open(os.path.join(hf_dir, 'model.safetensors'), 'pt') as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor('model.embed_tokens.weight'), model.embed.weight)
    assert 'lm_head.weight' not in keys and len(keys) == 2 + 9 * c.n_layer  # the tied matrix once
    tc = json.load(open(os.path.join(hf_dir, 'tokenizer_config.json')))
    marked = {v['content'] for v in tc['added_tokens_decoder'].values() if v['special']}
    assert marked == {'<unk>', '<s>', '</s>', '<|sys|>', '<|usr|>', '<|asst|>', '<|eot|>'}
    tj = json.load(open(os.path.join(hf_dir, 'tokenizer.json')))
    assert {t['content'] for t in tj['added_tokens'] if t['special']} == marked
    assert open(os.path.join(hf_dir, 'tokenizer.model'), 'rb').read() == open(tok.path, 'rb').read()
    modelfile = open(os.path.join(folder, 'Modelfile')).read()
    assert modelfile.startswith('FROM ./model-f32.gguf\n') and 'PARAMETER stop "<|eot|>"' in modelfile
    assert 'SYSTEM you are a test bot.\n' in modelfile  # the config's `system`, as chat has it


# ---- GGUF ----

def gguf_fields(reader):
    out = {}
    for name, field in reader.fields.items():
        if name.startswith('GGUF.'):
            continue
        out[name] = field.contents()
    return out


def gguf_weights(path):
    """name -> float32 tensor (dequantized), shape as numpy reads it (rows, columns)."""
    reader = gguf.GGUFReader(path)
    return reader, {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
                    .reshape(*reversed([int(n) for n in t.shape])) for t in reader.tensors}


def llamacpp_forward(w, meta, ids):
    """Logits (T, vocab) from GGUF tensors, the way llama.cpp computes a 'llama': RoPE rotates neighbouring
    pairs (2i, 2i+1) of each head; no output.weight means the token embedding is the output head."""
    n_head, n_kv = meta['llama.attention.head_count'], meta['llama.attention.head_count_kv']
    eps, theta = meta['llama.attention.layer_norm_rms_epsilon'], meta['llama.rope.freq_base']
    x = w['token_embd.weight'][ids]
    T, D = x.shape
    hd = D // n_head

    def norm(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(v):  # (heads, T, hd), pairs (2i, 2i+1)
        freqs = theta ** (-torch.arange(0, hd, 2).float() / hd)
        angle = torch.arange(T).float()[:, None] * freqs
        a, b = v[..., 0::2], v[..., 1::2]
        out = torch.empty_like(v)
        out[..., 0::2] = a * angle.cos() - b * angle.sin()
        out[..., 1::2] = a * angle.sin() + b * angle.cos()
        return out

    for i in range(meta['llama.block_count']):
        p = f'blk.{i}.'
        h = norm(x, w[p + 'attn_norm.weight'])
        q = rope((h @ w[p + 'attn_q.weight'].T).view(T, n_head, hd).transpose(0, 1))
        k = rope((h @ w[p + 'attn_k.weight'].T).view(T, n_kv, hd).transpose(0, 1))
        v = (h @ w[p + 'attn_v.weight'].T).view(T, n_kv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(n_head // n_kv, 0), v.repeat_interleave(n_head // n_kv, 0)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -float('inf'))
        y = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, D)
        x = x + y @ w[p + 'attn_output.weight'].T
        h = norm(x, w[p + 'ffn_norm.weight'])
        gate = torch.nn.functional.silu(h @ w[p + 'ffn_gate.weight'].T)
        x = x + (gate * (h @ w[p + 'ffn_up.weight'].T)) @ w[p + 'ffn_down.weight'].T
    head = w.get('output.weight', w['token_embd.weight'])
    return norm(x, w['output_norm.weight']) @ head.T


def check_gguf(path, model, tok, atol, system='you are a test bot.'):
    """Every tensor with its shape, the metadata (the chat template with `system`, the config's
    system prompt), and llama.cpp's forward equal to ours within atol."""
    reader, w = gguf_weights(path)
    meta = gguf_fields(reader)
    c = model.cfg
    hd = c.n_embd // c.n_head
    expected = {'general.architecture': 'llama', 'llama.context_length': c.block_size,
                'llama.embedding_length': c.n_embd, 'llama.block_count': c.n_layer,
                'llama.feed_forward_length': model.blocks[0].mlp.up_proj.out_features,
                'llama.attention.head_count': c.n_head, 'llama.attention.head_count_kv': c.n_kv_head,
                'llama.rope.dimension_count': hd, 'llama.rope.freq_base': c.rope_theta,
                'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.bos_token_id': tok.bos_id,
                'tokenizer.ggml.eos_token_id': tok.eos_id, 'tokenizer.ggml.eot_token_id': tok.eot_id,
                'tokenizer.ggml.unknown_token_id': tok.unk_id, 'tokenizer.ggml.add_bos_token': True,
                'tokenizer.ggml.add_space_prefix': False,
                'tokenizer.chat_template': export.chat_template(system)}
    assert {k: meta[k] for k in expected} == expected
    assert meta['llama.attention.layer_norm_rms_epsilon'] == pytest.approx(torch.finfo(torch.float32).eps)
    sp = tok.sp
    assert meta['tokenizer.ggml.tokens'] == [sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert meta['tokenizer.ggml.scores'] == pytest.approx([sp.get_score(i) for i in range(tok.vocab_size)])
    types = meta['tokenizer.ggml.token_type']
    assert types[:7] == [2, 3, 3, 3, 3, 3, 3] and types[tok.encode('\n')[0]] == 4  # unk, controls, user-defined
    assert all(types[i] == 6 for i in range(tok.vocab_size) if sp.is_byte(i))
    # tensors: names and shapes, values (q and k rows reordered back), and llama.cpp's arithmetic
    shapes = {'token_embd.weight': (c.vocab_size, c.n_embd), 'output_norm.weight': (c.n_embd,)}
    if not c.tie_embeddings:
        shapes['output.weight'] = (c.vocab_size, c.n_embd)
    ffn = model.blocks[0].mlp.up_proj.out_features
    for i in range(c.n_layer):
        shapes.update({f'blk.{i}.{n}.weight': s for n, s in [
            ('attn_norm', (c.n_embd,)), ('ffn_norm', (c.n_embd,)), ('attn_q', (c.n_head * hd, c.n_embd)),
            ('attn_k', (c.n_kv_head * hd, c.n_embd)), ('attn_v', (c.n_kv_head * hd, c.n_embd)),
            ('attn_output', (c.n_embd, c.n_head * hd)), ('ffn_gate', (ffn, c.n_embd)), ('ffn_up', (ffn, c.n_embd)),
            ('ffn_down', (c.n_embd, ffn))]})
    assert {n: tuple(t.shape) for n, t in w.items()} == shapes
    b = model.blocks[-1]
    half = hd // 2
    q = w[f'blk.{c.n_layer - 1}.attn_q.weight'].view(c.n_head, half, 2, c.n_embd)
    unpermuted = torch.cat([q[:, :, 0], q[:, :, 1]], dim=1).reshape(-1, c.n_embd)
    torch.testing.assert_close(unpermuted, b.attn.q_proj.weight.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(w[f'blk.{c.n_layer - 1}.ffn_down.weight'], b.mlp.down_proj.weight.detach(),
                               atol=atol, rtol=0)
    ids = [tok.bos_id] + tok.encode('the cat eats salt and flour.\nthe sea is cold today.')[:c.block_size - 1]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    theirs = llamacpp_forward(w, meta, torch.tensor(ids))
    return (theirs - ours).abs().max().item(), ours.abs().max().item()


def test_gguf_holds_every_tensor_the_metadata_and_our_function(exported):
    folder, model, tok = exported
    err, scale = check_gguf(os.path.join(folder, 'model-f32.gguf'), model, tok, atol=0)
    assert err < 1e-4 * max(1.0, scale)


def test_gguf_types_are_close_to_float32(exported, sft_trained, tmp_path):
    _, model, tok = exported
    errors = {}
    for kind in ('f16', 'bf16', 'q8_0'):
        folder = tmp_path / kind
        run('export.py', sft_trained[0], f'--gguf_type={kind}', f'--export_dir={folder}', check=True)
        path = str(folder / f'model-{kind}.gguf')
        reader = gguf.GGUFReader(path)
        matrices = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
        vectors = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1}
        assert matrices == {kind.upper()} and vectors == {'F32'}
        errors[kind], scale = check_gguf(path, model, tok, atol={'f16': 2e-3, 'bf16': 2e-2, 'q8_0': 2e-2}[kind])
        assert errors[kind] < 0.05 * scale, (kind, errors[kind], scale)
    assert errors['f16'] < errors['q8_0']


def make_checkpoint(path, tok, **shape):
    """A freshly initialised model of this shape saved as train.py saves one (for shapes the smoke model lacks)."""
    torch.manual_seed(0)
    args = {**dict(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=4, n_kv_head=4, n_embd=64), **shape}
    model = GPT(ModelConfig(**args))
    for name, p in model.named_parameters():
        if name.endswith('norm.weight'):  # not all ones, so a misplaced norm would show
            torch.nn.init.uniform_(p, 0.5, 1.5)
    torch.save({'model': model.state_dict(), 'model_args': args, 'iter': 0, 'best_val': None, 'config': {},
                'tokenizer_sha256': tok.sha256}, path)
    return model.eval()


@pytest.mark.parametrize('shape', [dict(n_kv_head=2), dict(n_kv_head=1, tie_embeddings=False)],
                         ids=['gqa', 'gqa-untied'])
def test_gqa_and_untied_embeddings(prepared, tmp_path, shape):
    cfg_path, _ = prepared
    tok = Tokenizer(load_cfg(cfg_path).tokenizer_path)
    model = make_checkpoint(tmp_path / 'ckpt.pt', tok, **shape)
    run('export.py', cfg_path, f'--ckpt={tmp_path}/ckpt.pt', '--gguf_type=f32', f'--export_dir={tmp_path}/x',
        check=True)
    err, scale = check_gguf(str(tmp_path / 'x' / 'model-f32.gguf'), model, tok, atol=0,
                            system=system_prompt(load_cfg(cfg_path)))
    assert err < 1e-4 * max(1.0, scale)
    transformers = pytest.importorskip('transformers', reason="transformers is a dev requirement")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'x' / 'hf'), dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == shape['n_kv_head']
    assert hf.config.tie_word_embeddings == shape.get('tie_embeddings', True)
    if not hf.config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
        torch.testing.assert_close(hf.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
    x = torch.tensor([[tok.bos_id] + tok.encode('the garden and the bike chain, slowly')])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=1e-4)


# ---- bad input ----

def test_refuses_foreign_checkpoints_and_occupied_folders(sft_trained, tmp_path):
    cfg_path, _ = sft_trained
    torch.save({'state_dict': {}}, tmp_path / 'foreign.pt')
    p = run('export.py', cfg_path, f'--ckpt={tmp_path}/foreign.pt', f'--export_dir={tmp_path}/a')
    assert p.returncode != 0 and 'foreign.pt' in p.stderr and 'Traceback' not in p.stderr
    assert not os.path.exists(tmp_path / 'a')
    # an earlier export is kept unless --overwrite=True; the new one replaces it whole
    run('export.py', cfg_path, '--gguf_type=f16', f'--export_dir={tmp_path}/b', check=True)
    p = run('export.py', cfg_path, '--gguf_type=none', f'--export_dir={tmp_path}/b')
    assert p.returncode != 0 and '--overwrite=True' in p.stderr and 'Traceback' not in p.stderr
    assert sorted(os.listdir(tmp_path / 'b')) == ['Modelfile', 'hf', 'model-f16.gguf']
    run('export.py', cfg_path, '--gguf_type=none', f'--export_dir={tmp_path}/b', '--overwrite=True', check=True)
    assert sorted(os.listdir(tmp_path / 'b')) == ['hf']
    assert sorted(os.listdir(tmp_path)) == ['b', 'foreign.pt']  # no temp folder left behind
    p = run('export.py', cfg_path, '--gguf_type=q4_k', f'--export_dir={tmp_path}/c')
    assert p.returncode != 0 and 'gguf_type' in p.stderr and 'q8_0' in p.stderr


def test_settings_the_formats_cannot_express_are_named(exported):
    _, model, tok = exported
    sp = export.read_sentencepiece(tok.path)
    assert sp['model_type'] == 'bpe' and not sp['add_dummy_prefix'] and sp['normalizer'] == 'identity'
    cfg = load_cfg('--gguf_type=f16')
    export.check_exportable(cfg, model, sp, tok.path)  # ours: fine
    with pytest.raises(SystemExit, match="tokenizer_type='unigram'.*--gguf_type=none"):
        export.check_exportable(cfg, model, {**sp, 'model_type': 'unigram'}, tok.path)
    with pytest.raises(SystemExit, match='add_dummy_prefix'):
        export.check_exportable(cfg, model, {**sp, 'add_dummy_prefix': True}, tok.path)
    with pytest.raises(SystemExit, match='vocab_size'):
        export.check_exportable(cfg, model, {**sp, 'pieces': sp['pieces'][:-1]}, tok.path)


def test_missing_extra_names_the_pip_command(sft_trained, tmp_path):
    # a package made unimportable (None in sys.modules) stands for one that is not installed
    code = ("import sys, runpy; sys.modules['gguf'] = None; sys.argv = ['export.py', *sys.argv[1:]]; "
            "runpy.run_path('export.py', run_name='__main__')")
    import subprocess
    import sys
    from conftest import REPO
    p = subprocess.run([sys.executable, '-c', code, sft_trained[0], f'--export_dir={tmp_path}/x'], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode != 0 and 'pip install -r requirements-export.txt' in p.stderr and 'gguf' in p.stderr
    assert not os.path.exists(tmp_path / 'x')


# ---- llama.cpp itself, where llama-cpp-python is installed (building it takes minutes: not in CI) ----

def test_llama_cpp_tokenizes_and_generates_like_us(exported):
    llama_cpp = pytest.importorskip('llama_cpp', reason="llama-cpp-python is not installed "
                                    "(pip install llama-cpp-python builds llama.cpp: minutes, so not in CI)")
    folder, model, tok = exported
    llm = llama_cpp.Llama(model_path=os.path.join(folder, 'model-f32.gguf'), n_ctx=model.cfg.block_size,
                          verbose=False)
    for text in HARD_TEXT:
        assert llm.tokenize(text.encode('utf-8'), add_bos=True, special=False) == [tok.bos_id] + tok.encode(text)
    for ids in prompts(tok):
        expected = greedy(model, ids, min(50, model.cfg.block_size - len(ids)))
        assert llama_greedy(llm, ids, len(expected)) == expected
    # a chat through the template inside the GGUF file (llama-cpp-python renders it), stopping at <|eot|>
    messages = CHATS[1]
    reply = greedy(model, render_for_reply(tok, messages), 40)
    reply = reply[:reply.index(tok.eot_id)] if tok.eot_id in reply else reply
    answer = llm.create_chat_completion(messages, temperature=0.0, max_tokens=40)['choices'][0]['message']['content']
    assert reply and answer == tok.decode(reply)


def test_a_lora_adapter_is_merged_into_its_base(prepared, tmp_path):
    from safetensors.torch import load_file
    from common import file_sha256
    from model import add_lora, adapter_state, merge_lora
    cfg_path, _ = prepared
    tok = Tokenizer(load_cfg(cfg_path).tokenizer_path)
    base = make_checkpoint(tmp_path / 'base.pt', tok, n_kv_head=2)
    lora = {'rank': 4, 'alpha': 8.0, 'dropout': 0.0, 'targets': ['q_proj', 'down_proj']}
    tuned = add_lora(base, **{k: lora[k] for k in ('rank', 'alpha', 'dropout', 'targets')})
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith('lora_B'):
                p.normal_(0, 0.05)  # as if trained: the update is no longer zero
    torch.save({'adapter': adapter_state(tuned), 'lora': lora, 'model_args': torch.load(tmp_path / 'base.pt')['model_args'],
                'base': {'path': str(tmp_path / 'base.pt'), 'sha256': file_sha256(tmp_path / 'base.pt')},
                'iter': 1, 'best_val': None, 'config': {}, 'tokenizer_sha256': tok.sha256}, tmp_path / 'adapter.pt')
    merged = merge_lora(tuned)
    run('export.py', cfg_path, f'--ckpt={tmp_path}/adapter.pt', '--gguf_type=none', f'--export_dir={tmp_path}/x',
        check=True)
    weights = load_file(str(tmp_path / 'x' / 'hf' / 'model.safetensors'))
    assert not any('lora' in k for k in weights)
    for i, block in enumerate(merged.blocks):
        assert torch.equal(weights[f'model.layers.{i}.self_attn.q_proj.weight'], block.attn.q_proj.weight)
        assert torch.equal(weights[f'model.layers.{i}.mlp.down_proj.weight'], block.mlp.down_proj.weight)
    assert not torch.equal(merged.blocks[0].attn.q_proj.weight, torch.load(tmp_path / 'base.pt')['model']['blocks.0.attn.q_proj.weight'])


# ---- issue 24: --overwrite=True replaces only an earlier export ----

def test_overwrite_replaces_only_an_earlier_export_never_the_runs_own_folders(trained, tmp_path):
    """export_dir pointed at out_dir, at data_dir, at a parent of out_dir, or at any folder of the
    user's: refused even with --overwrite=True, naming what is there; an earlier export is still
    replaced."""
    cfg_path, out = trained
    cfg = load_cfg(cfg_path)
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('mine')
    (tmp_path / 'afile').write_text('a file')
    for folder in (out, cfg.data_dir, os.path.dirname(out), mine, tmp_path / 'afile'):
        before = {p: os.path.getsize(p) for p in glob.glob(f'{folder}/**', recursive=True)
                  if os.path.isfile(p)}
        p = run('export.py', cfg_path, '--gguf_type=none', f'--export_dir={folder}',
                '--overwrite=True')
        assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
        assert 'did not write' in p.stderr and str(folder) in p.stderr, p.stderr
        assert {p: os.path.getsize(p) for p in before} == before
    p = run('export.py', cfg_path, '--gguf_type=none', f'--export_dir={mine}', '--overwrite=True')
    assert "'notes.txt'" in p.stderr
    # an earlier export (of either kind) is replaced, as before
    exp = tmp_path / 'exp'
    run('export.py', cfg_path, '--gguf_type=f16', f'--export_dir={exp}', check=True)
    assert sorted(os.listdir(exp)) == ['Modelfile', 'hf', 'model-f16.gguf']
    run('export.py', cfg_path, '--gguf_type=none', f'--export_dir={exp}', '--overwrite=True',
        check=True)
    assert sorted(os.listdir(exp)) == ['hf']
    assert sorted(os.listdir(tmp_path)) == ['afile', 'exp', 'mine']  # no temp folder left


def test_prepare_destination_refuses_the_working_folder_and_home(tmp_path, monkeypatch):
    """'.' and '~' as export_dir (checked in-process, in a scratch folder standing in for them)."""
    (tmp_path / 'work').mkdir()
    (tmp_path / 'work' / 'train.py').write_text('code')
    monkeypatch.chdir(tmp_path / 'work')
    monkeypatch.setenv('HOME', str(tmp_path / 'work'))
    for folder in ('.', os.path.expanduser('~'), os.getcwd() + '/'):
        with pytest.raises(SystemExit, match="did not write.*'train.py'"):
            export.prepare_destination(folder, overwrite=True)
    assert os.listdir(tmp_path) == ['work'] and os.listdir(tmp_path / 'work') == ['train.py']


def test_keys_export_cannot_honour_are_named(trained, tmp_path):
    p = run('export.py', trained[0], '--gguf_type=none', f'--export_dir={tmp_path}/e',
            '--compile=True', '--dtype=bfloat16', check=True)
    assert 'warning: --dtype, --compile are ignored' in p.stderr, p.stderr
    assert 'float32 on the CPU' in p.stderr
