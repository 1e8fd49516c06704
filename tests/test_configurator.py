import json

import pytest

from conftest import load_cfg, run
from configurator import KEYS, configure, save_config


def die_message(*argv):
    with pytest.raises(SystemExit) as e:
        configure(list(map(str, argv)))
    assert e.value.code != 0
    return str(e.value.code)


def test_defaults_and_overrides():
    cfg = load_cfg('--vocab_size=1024', '--tokenizer_type=unigram', '--out_dir=out/x')
    assert cfg.vocab_size == 1024 and cfg.tokenizer_type == 'unigram'
    assert cfg.data_dir == 'out/x/data' and cfg.tokenizer_path == 'out/x/tokenizer.model'
    assert load_cfg().seed == KEYS['seed'][0]


def test_value_split_on_first_equals_and_literal_else_string():
    assert load_cfg('--out_dir=a=b').out_dir == 'a=b'
    assert load_cfg('--out_dir=123').out_dir == '123'  # a str key keeps the text
    assert load_cfg("--sources={'x': {'kind': 'text', 'path': 'f'}}").sources == {'x': {'kind': 'text', 'path': 'f'}}
    assert load_cfg('--prepare_sources=["a", "b"]').prepare_sources == ['a', 'b']


def test_unknown_key_on_command_line_suggests_closest():
    msg = die_message('--vocab_sise=100')
    assert 'vocab_sise' in msg and "did you mean 'vocab_size'" in msg


def test_unknown_key_in_config_file_names_file_line_and_suggestion(tmp_path):
    p = tmp_path / 'c.py'
    p.write_text("vocab_size = 1024\n\nsead = 3\n")
    msg = die_message(p)
    assert str(p) in msg and 'line 3' in msg and "'sead'" in msg and "did you mean 'seed'" in msg


def test_type_mismatch_is_an_error():
    msg = die_message('--vocab_size=big')
    assert 'vocab_size' in msg and 'int' in msg
    assert 'analyze_only' in die_message('--analyze_only=1')  # bools take True/False only


def test_int_is_fine_for_float_none_accepts_anything_bools_accept_words(tmp_path):
    assert load_cfg('--analyze_only=true').analyze_only is True
    assert load_cfg('--analyze_only').analyze_only is True  # a bare flag means True
    assert load_cfg('--tokenizer_sources={"a": 5}').tokenizer_sources == {'a': 5}  # None default
    p = tmp_path / 'c.py'
    p.write_text("vocab_size = 'many'\n")
    assert str(p) in die_message(p) and 'vocab_size' in die_message(p)


def test_float_key_accepts_int():
    from configurator import check_type
    KEYS['_test_float'] = (0.5, 'test')
    try:
        assert check_type('_test_float', 2, 'x') == 2.0 and isinstance(check_type('_test_float', 2, 'x'), float)
    finally:
        del KEYS['_test_float']


def test_config_files_run_in_order_command_line_wins_and_is_visible(tmp_path):
    a, b = tmp_path / 'a.py', tmp_path / 'b.py'
    a.write_text("import math\nvocab_size = 1000\nseed = 1\n")
    b.write_text("seed = seed + 1\nif analyze_only:\n    out_dir = 'out/analyzed'\n")
    cfg = load_cfg(a, b, '--analyze_only=True', '--vocab_size=64')
    assert (cfg.seed, cfg.vocab_size, cfg.out_dir) == (2, 64, 'out/analyzed')


def test_include_runs_another_file_relative_to_the_includer(tmp_path):
    (tmp_path / 'base.py').write_text("vocab_size = 777\nseed = 5\n")
    (tmp_path / 'child.py').write_text("include('base.py')\nseed = 6\n")
    cfg = load_cfg(tmp_path / 'child.py')
    assert (cfg.vocab_size, cfg.seed) == (777, 6)
    (tmp_path / 'bad.py').write_text("include('base.py')\nvocab_sizee = 1\n")
    assert 'vocab_sizee' in die_message(tmp_path / 'bad.py')


def test_missing_config_file_and_broken_config_file(tmp_path):
    assert 'nope.py' in die_message(tmp_path / 'nope.py')
    p = tmp_path / 'broken.py'
    p.write_text("seed = 1/0\n")
    assert str(p) in die_message(p) and 'ZeroDivisionError' in die_message(p)


def test_save_config_json(tmp_path):
    cfg = load_cfg('--seed=7')
    save_config(cfg, tmp_path / 'config.json')
    data = json.loads((tmp_path / 'config.json').read_text())
    assert data['seed'] == 7 and set(KEYS) <= set(data)


def test_help_lists_every_key_and_errors_exit_nonzero():
    p = run('prepare.py', '--help')
    assert p.returncode == 0
    for name in KEYS:
        assert f'--{name}=' in p.stdout
    p = run('tokenizer.py', '--bogus_key=1')
    assert p.returncode != 0 and 'bogus_key' in p.stderr


def test_every_profile_loads_for_every_stage():
    import glob
    for path in sorted(glob.glob('config/*.py')):
        cfg = load_cfg(path)
        assert cfg.mixture and cfg.sources, path
        first = open(path).readline()
        assert first.startswith('# ') and len(first) > 30, f"{path} needs a one-line comment saying what it is for"
    assert load_cfg('config/demo.py', '--phase=sft').mixture == {'primer': 1.0}


def test_a_config_that_mutates_a_default_does_not_change_the_defaults(tmp_path):
    p = tmp_path / 'c.py'
    p.write_text("sources.update({'extra': {'kind': 'text', 'path': 'x'}})\n")
    assert 'extra' in load_cfg(p).sources
    assert 'extra' not in KEYS['sources'][0] and 'extra' not in load_cfg().sources
