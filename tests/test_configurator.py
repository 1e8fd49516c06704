import glob
import json
import os

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
    cfg = load_cfg(a, b, '--analyze_only=True', '--vocab_size=640')
    assert (cfg.seed, cfg.vocab_size, cfg.out_dir) == (2, 640, 'out/analyzed')


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


def test_every_number_key_has_a_valid_range_that_holds_its_default():
    """New keys need one too: a range beside the default, in the KEYS table (see the comment above it)."""
    from configurator import in_range, key_spec
    for name in KEYS:
        default, valid, _ = key_spec(name)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert isinstance(valid, str), f"{name}: give it a valid range, e.g. '>= 0'"
            assert in_range(default, valid), (name, default, valid)
        elif isinstance(valid, tuple):
            assert default in valid, name
        elif default is None:
            assert valid in (list, dict), f"{name}: say whether it takes a list or a dict"
    assert not in_range(float('nan'), '>= 0') and in_range(0.0, '[0, 1)') and not in_range(1.0, '[0, 1)')
    assert in_range(1.0, '(0, 1]') and not in_range(0.0, '(0, 1]') and in_range(-5, '< 0') and not in_range(3, '<= 2')


def test_values_out_of_range_stop_with_the_key_where_it_was_set_and_the_range(tmp_path):
    msg = die_message('--dropout=1.5')
    assert 'dropout=1.5' in msg and '--dropout' in msg and '[0, 1)' in msg
    p = tmp_path / 'c.py'
    p.write_text("seed = 3\nlearning_rate = float('nan')\n")
    msg = die_message(p)
    assert 'learning_rate=nan' in msg and f'{p} line 2' in msg and 'finite' in msg
    assert 'line 2' in die_message(p, '--seed=1')  # a later override of another key changes nothing
    assert load_cfg(p, '--learning_rate=0.1').learning_rate == 0.1  # the command line wins, and is checked
    assert 'one of' in die_message('--tokenizer_type=bpee') and "did you mean 'bpe'" in die_message('--tokenizer_type=bpee')
    assert '96' in die_message('--n_embd=100', '--n_head=3')  # a value that works is suggested
    assert "did you mean 'q8_0'" in die_message('--gguf_type=q8')  # export.py's choices, checked by configure too


def test_a_string_where_a_list_is_expected_is_a_list_of_its_comma_separated_names(tmp_path):
    assert load_cfg('--prepare_sources=roam').prepare_sources == ['roam']
    assert load_cfg('--eval_sources=roam, primer').eval_sources == ['roam', 'primer']
    assert load_cfg('--lora_targets=q_proj,v_proj').lora_targets == ['q_proj', 'v_proj']
    assert load_cfg('--val_sources=[]').val_sources == [] and load_cfg('--val_sources=None').val_sources is None
    p = tmp_path / 'c.py'
    p.write_text("val_sources = 'roam'\n")
    assert load_cfg(p).val_sources == ['roam']
    assert 'must be None or a dict' in die_message('--tokenizer_sources=roam')
    assert 'must be None or a list' in die_message("--val_sources={'roam': 1}")


def test_help_shows_valid_values_and_survives_a_closed_pipe():
    import subprocess
    import sys
    from conftest import REPO
    p = run('train.py', '--help')
    assert '--batch_size=16  (>= 1)' in p.stdout and "--dtype='auto'  (one of 'auto'" in p.stdout
    # `python train.py --help | head -1`: the reader goes away before the help is written
    proc = subprocess.Popen([sys.executable, 'train.py', '--help'], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and 'BrokenPipeError' not in err and 'Traceback' not in err, err


def test_profile_paths_follow_out_dir(tmp_path):
    cfg = load_cfg('config/demo.py', '--out_dir=out/elsewhere', '--phase=sft')
    assert cfg.init_from == 'out/elsewhere/pretrain/ckpt.pt' and cfg.ckpt == 'out/elsewhere/sft/ckpt.pt'
    assert load_cfg('config/demo.py', '--phase=lora').ckpt == 'out/demo/lora/ckpt.pt'
    for argv in (['config/smoke.py', '--phase=sft'], ['config/dev_sft.py'], ['config/prod_sft.py']):
        cfg = load_cfg(*argv, '--out_dir=/elsewhere')
        assert cfg.init_from.startswith('/elsewhere/pretrain/'), argv
        assert not [k for k, v in vars(cfg).items() if isinstance(v, str) and '{' in v and k != 'system'], argv
    for profile in sorted(glob.glob('config/*.py')):  # no shipped profile keeps a path of its own out_dir
        for phase in ('pretrain', 'sft'):
            cfg = load_cfg(profile, '--out_dir=/elsewhere', f'--phase={phase}')
            stale = [k for k, v in vars(cfg).items() if isinstance(v, str) and v.startswith('out/') and k != 'cache_dir']
            assert not stale, (profile, phase, stale)
    copy = tmp_path / 'mine.py'  # a profile of one's own, built on a shipped one, with its own out_dir
    copy.write_text(f"include({os.path.abspath('config/dev_sft.py')!r})\nout_dir = 'out/mine'\n")
    assert load_cfg(copy).init_from == 'out/mine/pretrain/best.pt'
    assert load_cfg(copy).set_by['init_from'].startswith(os.path.abspath('config/dev_sft.py'))


def test_profiles_pretrain_with_muon_and_fine_tune_with_adamw():
    # Muon + WSD won where it was measured (pretraining: shakespeare, demo, dev; BENCHMARKS.md); fine-tuning and
    # prod were not measured with it. dev_sft.py includes dev.py, so it must set AdamW back itself.
    for argv in (['config/shakespeare.py'], ['config/demo.py'], ['config/dev.py']):
        cfg = load_cfg(*argv)
        assert (cfg.optimizer, cfg.lr_schedule) == ('muon', 'wsd'), argv
    for argv in (['config/demo.py', '--phase=sft'], ['config/dev_sft.py'], ['config/prod_pretrain.py'],
                 ['config/prod_sft.py']):
        cfg = load_cfg(*argv)
        assert (cfg.optimizer, cfg.lr_schedule) == ('adamw', 'cosine'), argv


def test_a_tilde_means_home_in_every_path_key(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    home = str(tmp_path)
    cfg = load_cfg('--out_dir=~/exp', '--init_from={out_dir}/pretrain/best.pt', '--ckpt=~/c.pt',
                   '--export_dir=~/e', '--cache_dir=~/cache', '--system_file=~/voice.txt',
                   '--eval_out=~/res')
    assert cfg.out_dir == f'{home}/exp' and cfg.data_dir == f'{home}/exp/data'
    assert cfg.tokenizer_path == f'{home}/exp/tokenizer.model'
    assert cfg.init_from == f'{home}/exp/pretrain/best.pt'
    assert (cfg.ckpt, cfg.export_dir) == (f'{home}/c.pt', f'{home}/e')
    assert cfg.cache_dir == f'{home}/cache'
    assert (cfg.system_file, cfg.eval_out) == (f'{home}/voice.txt', f'{home}/res')
    cfg = load_cfg('--data_dir=~/d', '--tokenizer_path=~/t.model', '--boolq=download',
                   '--init_from=scratch')
    assert (cfg.data_dir, cfg.tokenizer_path) == (f'{home}/d', f'{home}/t.model')
    assert (cfg.boolq, cfg.init_from) == ('download', 'scratch')


def test_an_empty_out_dir_is_refused(tmp_path):
    assert 'out_dir' in die_message('--out_dir=') and 'empty' in die_message('--out_dir=  ')
    (tmp_path / 'c.py').write_text("out_dir = ''\n")
    assert 'c.py line 1' in die_message(tmp_path / 'c.py')


@pytest.mark.parametrize('phase', ['', '..', '.', '../other', 'sft/../..'])
def test_a_phase_that_is_not_a_folder_inside_out_dir_is_refused(phase):
    """Checkpoints go to <out_dir>/<phase>: '..' would put them (and replace ckpt.pt) outside."""
    message = die_message(f'--phase={phase}')
    assert 'phase' in message and 'out_dir' in message and 'sft' in message, message
    assert configure(['--phase=sft']).ckpt_dir == os.path.join('out/demo', 'sft')
