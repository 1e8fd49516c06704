import io
import os
import re
import time
import types

import pytest
import torch

from conftest import load_cfg, run
import sample
from checkpoint import load_model
from model import ModelConfig
from tokenizer import Tokenizer, render_turn


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


# ---- chat ----

def test_repl_with_piped_stdin_answers_each_line_and_resets(sft_trained):
    from conftest import SFT_CONVERSATIONS
    cfg, _ = sft_trained
    (q1, a1), (q2, a2) = SFT_CONVERSATIONS[0]
    q3, a3 = SFT_CONVERSATIONS[1][0]
    p = run('sample.py', cfg, '--interactive', '--temperature=0', '--max_new_tokens=60',
            input=f'{q1}\n{q2}\n/reset\n{q3}\n\n/quit\nnever read\n', check=True)
    # replies stop at <|eot|>: exactly the trained reply, nothing generated after it; stdout holds only
    # replies, one per line, and the status goes to stderr
    assert p.stdout.splitlines() == [a1, a2, a3]
    assert p.stderr.splitlines() == ['(conversation reset)']


def test_compiled_decode_chats_the_same_and_says_its_compile_time_once(sft_trained):
    """--compile_decode=True (the default; the other tests run eagerly to save compile time): the same replies,
    across turns and a reset (one cache, one compiled step), and the compile said once, on stderr."""
    from conftest import SFT_CONVERSATIONS
    cfg, _ = sft_trained
    (q1, a1), (q2, a2) = SFT_CONVERSATIONS[0]
    p = run('sample.py', cfg, '--interactive', '--temperature=0', '--max_new_tokens=60', '--compile_decode=True',
            input=f'{q1}\n{q2}\n/reset\n{q1}\n', check=True)
    assert p.stdout.splitlines() == [a1, a2, a1]
    assert p.stderr.count('compiling the decode step') == 1 and '(conversation reset)' in p.stderr


def test_repl_exits_cleanly_at_end_of_input_and_on_bad_system_file(sft_trained):
    cfg, _ = sft_trained
    p = run('sample.py', cfg, '--interactive', '--temperature=0', input='')
    assert p.returncode == 0 and p.stderr == ''
    p = run('sample.py', cfg, '--interactive', '--system_file=/nonexistent/voice.txt', input='hi\n')
    assert p.returncode != 0 and 'voice.txt' in p.stderr


def test_chat_keeps_the_kv_cache_across_turns(sft_trained, monkeypatch, capsys):
    """The second turn must feed only its new tokens, not the whole conversation again."""
    from conftest import SFT_CONVERSATIONS
    from contextlib import nullcontext
    cfg_path, out = sft_trained
    cfg = load_cfg(cfg_path, '--temperature=0')
    tok = Tokenizer(cfg.tokenizer_path)
    model, _ = load_model(os.path.join(out, 'sft', 'ckpt.pt'), 'cpu', tok.sha256)
    fed = []
    forward = model.forward
    monkeypatch.setattr(model, 'forward', lambda idx, *a, **k: fed.append(idx.shape[1]) or forward(idx, *a, **k))
    (q1, a1), (q2, a2) = SFT_CONVERSATIONS[0]
    monkeypatch.setattr('sys.stdin', io.StringIO(f'{q1}\n{q2}\n'))
    sample.chat(cfg, model, tok, nullcontext(), torch.Generator().manual_seed(0))
    assert capsys.readouterr().out.splitlines() == [a1, a2]
    prefills = [n for n in fed if n > 1]
    first = len(sample.render_conversation(tok, [{'role': 'system', 'content': cfg.system},
                                                 {'role': 'user', 'content': q1}])[0]) + 1
    second = 1 + len(render_turn(tok, 'user', q2)[0]) + 1  # <eot>, the user turn, <asst>
    assert prefills == [first, second]
    assert sum(fed) == first + second + len(tok.encode(a1)) + len(tok.encode(a2))  # + one step per reply token


def test_chat_survives_a_conversation_longer_than_the_context(sft_trained):
    cfg, _ = sft_trained
    lines = ''.join(f'what does the cat eat? and the sea? number {i}\n' for i in range(12))
    p = run('sample.py', cfg, '--interactive', '--max_new_tokens=20', input=lines, check=True)
    assert len(p.stdout.splitlines()) == 12


def test_repl_system_command_and_ctrl_c(sft_trained):
    import signal
    import subprocess
    import sys
    from conftest import REPO, SFT_CONVERSATIONS, SFT_SYSTEM
    cfg, _ = sft_trained
    q3, a3 = SFT_CONVERSATIONS[1][0]
    # /system sets a new system prompt and starts over: with the one it was trained on, it answers as trained
    p = run('sample.py', cfg, '--interactive', '--temperature=0', '--system=something else entirely',
            input=f'/system {SFT_SYSTEM}\n{q3}\n', check=True)
    assert p.stdout.splitlines() == [a3] and 'system prompt set' in p.stderr
    # Ctrl-C while waiting for the next message: a clean exit, no traceback
    proc = subprocess.Popen([sys.executable, 'sample.py', cfg, '--interactive', '--temperature=0'], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    proc.stdin.write(f'{q3}\n')
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == a3  # it has answered, and now waits for the next line
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and 'Traceback' not in err


def test_bare_system_restores_the_configured_prompt_not_the_built_in_one(sft_trained):
    from conftest import SFT_CONVERSATIONS, SFT_SYSTEM
    cfg, _ = sft_trained
    q3, a3 = SFT_CONVERSATIONS[1][0]
    p = run('sample.py', cfg, '--interactive', '--temperature=0', f'--system={SFT_SYSTEM}',
            input=f'/system you are a pirate.\n/system\n{q3}\n', check=True)
    assert p.stdout.splitlines() == [a3]  # answered with the prompt it was trained (and configured) with
    assert p.stderr.splitlines() == ['(system prompt set, conversation reset)',
                                     '(configured system prompt restored, conversation reset)']


class Parrot:
    """A 'model' whose every reply is the same text, with newlines and a backslash in it."""

    def __init__(self, tok, reply):
        self.cfg, self.ids, self.prompts = ModelConfig(block_size=256), tok.encode(reply) + [tok.eot_id], []

    def generate(self, ids, *args, **kwargs):
        self.prompts.append(ids)
        yield from self.ids


def test_piped_chat_writes_each_reply_on_one_line(trained, monkeypatch, capsys):
    from contextlib import nullcontext
    # (a short system prompt: the built-in one, in this tiny tokenizer, is too long to fit beside a
    # message, and chat would say so on stderr)
    cfg = load_cfg(trained[0], '--system=be brief.')
    tok = Tokenizer(cfg.tokenizer_path)
    reply = 'first line\nsecond line \\ with a backslash\n\nlast'
    monkeypatch.setattr(sample, 'KVCache',
                        lambda model: types.SimpleNamespace(pos=0, reset=lambda: None))
    monkeypatch.setattr('sys.stdin', io.StringIO('hi\n/reset\nagain\n'))
    sample.chat(cfg, Parrot(tok, reply), tok, nullcontext(), None)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines == ['first line\\nsecond line \\\\ with a backslash\\n\\nlast'] * 2
    unescaped = re.sub(r'\\(.)', lambda m: {'n': '\n', 'r': '\r'}.get(m.group(1), m.group(1)), lines[0])
    assert unescaped == reply and err == '(conversation reset)\n'


def test_slash_notes_shows_the_last_message_as_the_model_read_it(trained, monkeypatch, capsys):
    """/notes: the notes put in front of the last message (why the reply said what it said), on
    stderr; nothing before a message, after /reset, or with retrieval off."""
    from contextlib import nullcontext
    import retrieval
    cfg = load_cfg(trained[0], '--system=be brief.', '--retrieve_k=1')
    tok = Tokenizer(cfg.tokenizer_path)
    index = retrieval.Index(['[Dev]\n- owns the bike shop', '[Biscuit]\n- a ginger cat'],
                            ['Dev', 'Biscuit'])
    monkeypatch.setattr(sample, 'KVCache',
                        lambda model: types.SimpleNamespace(pos=0, reset=lambda: None))
    asked = '/notes\nwho owns the shop?\n/notes\n/reset\n/notes\n'
    monkeypatch.setattr('sys.stdin', io.StringIO(asked))
    parrot = Parrot(tok, 'dev.')
    sample.chat(cfg, parrot, tok, nullcontext(), None, index)
    out, err = capsys.readouterr()
    assert out.splitlines() == ['dev.']
    assert err == ('(no message yet)\n(your last message as the model read it:)\nnotes:\n[Dev]\n'
                   '- owns the bike shop\n\nquestion: who owns the shop?\n(end)\n'
                   '(conversation reset)\n(no message yet)\n')
    monkeypatch.setattr('sys.stdin', io.StringIO('hi\n/notes\n'))
    sample.chat(cfg, parrot, tok, nullcontext(), None)
    assert capsys.readouterr().err == '(retrieval is off: the model reads your messages as typed)\n'


def test_chat_replaces_bytes_that_are_not_utf8_and_lone_surrogates(sft_trained):
    cfg, _ = sft_trained
    p = run('sample.py', cfg, '--interactive', '--temperature=0', '--max_new_tokens=5',
            input=b'caf\xe9 \xff\xfe?\n{"x": "\\ud83d"}\n'.decode('utf-8', 'surrogateescape'),
            encoding='utf-8', errors='surrogateescape')
    assert p.returncode == 0 and 'Traceback' not in p.stderr and len(p.stdout.splitlines()) == 2, p.stderr
    assert sample.clean('a\ud83d b\udcff') == 'a\ufffd b\ufffd'
    p = run('sample.py', cfg, '--start=caf\udce9', '--max_new_tokens=3')  # an argument from a latin-1 terminal
    assert p.returncode == 0 and 'Traceback' not in p.stderr and p.stdout.startswith('caf\ufffd'), p.stderr


def test_chat_on_a_terminal_edits_the_line_and_recalls_history(sft_trained):
    """Arrow keys edit the message (readline) and up recalls an earlier one, instead of typing ^[[D."""
    pytest.importorskip('readline')
    import pty
    import select
    import sys
    from conftest import REPO
    cfg, _ = sft_trained
    pid, fd = pty.fork()
    if pid == 0:  # the child: sample.py on a terminal
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, 'sample.py', cfg, '--interactive', '--max_new_tokens=5'],
                  {**os.environ, 'TERM': 'xterm'})
    seen = b''

    def read_until(marker, timeout=120):
        nonlocal seen
        deadline = time.time() + timeout
        while marker not in seen:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                return False
            try:
                data = os.read(fd, 4096)
            except OSError:  # the child has gone
                return False
            if not data:
                return False
            seen += data
        return True

    try:
        assert read_until(b'> '), seen
        seen = b''
        os.write(fd, b'/reset\r')
        assert read_until(b'> '), seen
        seen = b''
        os.write(fd, b'\x1b[A\r')  # up: the last message again
        assert read_until(b'> '), seen
        assert b'conversation reset' in seen, seen  # not a reply to '\x1b[A'
        seen = b''
        os.write(fd, b'/qit\x1b[D\x1b[Du\r')  # left twice, then the missing letter: /quit
        read_until(b'never', timeout=60)  # reads until the chat has left
        for _ in range(300):  # (a chat that did not take /quit is still running: fail, do not wait for ever)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        assert done, f"the chat did not leave on /quit typed with arrow-key edits: {seen!r}"
        pid = None
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, seen
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def test_completion_into_a_closed_pipe_is_quiet(trained):
    import subprocess
    import sys
    from conftest import REPO
    proc = subprocess.Popen([sys.executable, 'sample.py', trained[0], '--start=the', '--max_new_tokens=50',
                             '--num_samples=3'], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head -0`
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert 'Traceback' not in err and 'BrokenPipe' not in err, err


# ---- a prompt longer than the context: <s>, the system turn and <|asst|> stay, as in training ----

LONG = ' '.join(f'word{i}' for i in range(300)) + ' and so, what is the question?'


def test_chat_feeds_bos_the_system_turn_and_leaves_the_reply_its_room(trained, monkeypatch, capsys):
    from contextlib import nullcontext
    cfg = load_cfg(trained[0], '--system=be brief.', '--max_new_tokens=20',
                   '--compile_decode=False')
    tok = Tokenizer(cfg.tokenizer_path)
    monkeypatch.setattr(sample, 'KVCache',
                        lambda model: types.SimpleNamespace(pos=0, reset=lambda: None))
    monkeypatch.setattr('sys.stdin', io.StringIO(f'{LONG}\n'))
    model = Parrot(tok, 'ok')
    model.cfg = ModelConfig(block_size=64)
    sample.chat(cfg, model, tok, nullcontext(), None)
    fed = model.prompts[0]
    head = sample.render_conversation(tok, [{'role': 'system', 'content': 'be brief.'}])[0]
    assert fed[:len(head)] == head and fed[len(head)] == tok.usr_id and fed[-1] == tok.asst_id
    assert len(fed) + 20 <= 64 and LONG.endswith(tok.decode(fed[len(head) + 1:-1]))
    assert 'last' in capsys.readouterr().err  # the cut is said, on stderr


def test_a_system_prompt_too_long_for_the_context_keeps_its_head(trained, monkeypatch, capsys):
    from contextlib import nullcontext
    system = 'be very brief and say nothing twice. ' * 20
    cfg = load_cfg(trained[0], f'--system={system}', '--max_new_tokens=30',
                   '--compile_decode=False')
    tok = Tokenizer(cfg.tokenizer_path)
    monkeypatch.setattr(sample, 'KVCache',
                        lambda model: types.SimpleNamespace(pos=0, reset=lambda: None))
    monkeypatch.setattr('sys.stdin', io.StringIO('what does the cat eat?\n'))
    model = Parrot(tok, 'ok')
    model.cfg = ModelConfig(block_size=64)
    sample.chat(cfg, model, tok, nullcontext(), None)
    fed = model.prompts[0]
    assert fed[:2] == [tok.bos_id, tok.sys_id] and fed[-1] == tok.asst_id and len(fed) + 30 <= 64
    usr = fed.index(tok.usr_id)
    assert system.startswith(tok.decode(fed[2:usr])) and usr > 10
    assert tok.decode(fed[usr + 1:-1]) == 'what does the cat eat?'
    assert 'system prompt' in capsys.readouterr().err


def test_completion_keeps_bos_and_the_end_of_a_long_prompt(trained, monkeypatch, capsys):
    from contextlib import nullcontext
    cfg = load_cfg(trained[0], f'--start={LONG}', '--max_new_tokens=10', '--compile_decode=False')
    tok = Tokenizer(cfg.tokenizer_path)
    monkeypatch.setattr(sample, 'KVCache',
                        lambda model: types.SimpleNamespace(pos=0, reset=lambda: None))
    model = Parrot(tok, 'ok')
    model.cfg = ModelConfig(block_size=64)
    sample.complete(cfg, model, tok, nullcontext(), None)
    fed = model.prompts[0]
    assert fed[0] == tok.bos_id and tok.bos_id not in fed[1:]
    assert LONG.endswith(tok.decode(fed[1:]))
    assert 50 <= len(fed) <= 64 - 10  # and room for what it writes
    assert capsys.readouterr().out.startswith(LONG)  # the whole prompt is still printed
