"""chat.py: prompts built from a conversation or a text and fitted to the context (sample.py,
serve.py and eval.py all build theirs here)."""
from conftest import load_cfg

import chat
import retrieval
from tokenizer import Tokenizer, render_conversation, render_for_reply

LONG = ' '.join(f'word{i}' for i in range(300)) + ' and so, what is the question?'


def test_long_history_keeps_the_system_prompt_and_drops_the_oldest_turns(trained):
    tok = Tokenizer(load_cfg(trained[0]).tokenizer_path)
    messages = [{'role': 'system', 'content': 'be brief.'}]
    for i in range(10):
        messages += [{'role': 'user', 'content': f'question number {i}'},
                     {'role': 'assistant', 'content': f'answer {i}'}]
    messages.append({'role': 'user', 'content': 'last question'})
    kept, ids = chat.fit_history(tok, messages, 60)
    assert len(ids) <= 60 and kept[0] == messages[0] and kept[-1] == messages[-1]
    assert 3 <= len(kept) < len(messages) and kept[1:] == messages[len(messages) - len(kept) + 1:]
    assert ids == render_conversation(tok, kept)[0] + [tok.asst_id]


def test_a_message_longer_than_the_context_keeps_bos_the_system_turn_and_its_end(trained):
    tok = Tokenizer(load_cfg(trained[0]).tokenizer_path)
    system = [{'role': 'system', 'content': 'be brief.'}]
    messages = system + [{'role': 'user', 'content': 'hi'},
                         {'role': 'assistant', 'content': 'hello'},
                         {'role': 'user', 'content': LONG}]
    assert len(tok.encode(LONG)) > 200
    kept, ids = chat.fit_history(tok, messages, 60)
    head = render_conversation(tok, system)[0]  # <s> <|sys|> be brief.
    assert ids[:len(head)] == head and ids[0] == tok.bos_id and ids[1] == tok.sys_id
    assert ids[len(head)] == tok.usr_id and ids[-1] == tok.asst_id
    # the oldest exchange went first, then the start of the message: its end is what is left
    assert kept[:-1] == system and LONG.endswith(kept[-1]['content'])
    assert kept[-1]['content'].endswith('what is the question?')
    assert ids == render_for_reply(tok, kept)
    assert 55 <= len(ids) <= 60  # cut no more than needed




def test_chat_prompt_gives_user_messages_their_notes_and_fits_a_long_system_prompt(trained,
                                                                                    capsys):
    tok = Tokenizer(load_cfg(trained[0]).tokenizer_path)
    pages = {'Biscuit': '- ginger tom, hates the hoover', 'Dev': '- owns the bike shop'}
    index = retrieval.Index([f'[{t}]\n{b}' for t, b in pages.items()], list(pages))
    messages = [{'role': 'system', 'content': 'be brief.'},
                {'role': 'user', 'content': 'what does biscuit hate?'},
                {'role': 'assistant', 'content': 'the hoover.'},
                {'role': 'user', 'content': 'and dev?'}]
    kept, ids = chat.chat_prompt(tok, messages, 512, 64, index, 2)
    assert kept == retrieval.with_notes_conversation(index, messages, 2)  # as the SFT rows had them
    assert '[Biscuit]' in kept[1]['content'] and '[Dev]' in kept[3]['content']
    assert ids == render_for_reply(tok, kept)
    # a system prompt that alone fills the context is cut to its head, and said
    kept, ids = chat.chat_prompt(tok, [{'role': 'system', 'content': LONG}, messages[1]], 64, 16)
    assert LONG.startswith(kept[0]['content']) and len(kept[0]['content']) < len(LONG)
    assert len(ids) <= 64 - 16
    assert 'system prompt' in capsys.readouterr().err


def test_completion_prompt_keeps_bos_and_the_end_of_a_long_text(trained):
    tok = Tokenizer(load_cfg(trained[0]).tokenizer_path)
    said = []
    short = chat.completion_prompt(tok, 'a short one', 64, 16, said.append)
    assert short == [tok.bos_id] + tok.encode('a short one')
    assert said == []
    ids = chat.completion_prompt(tok, LONG, 64, 16, said.append)
    assert ids[0] == tok.bos_id and len(ids) <= 64 - 16 and LONG.endswith(tok.decode(ids[1:]))
    assert 'the model sees <s> and its last' in said[0]
