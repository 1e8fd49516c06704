"""plot.py: learning curves from train.py's metrics.jsonl (matplotlib optional)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, run
import plot


def write_run(folder, rows):
    folder.mkdir(parents=True)
    with open(folder / 'metrics.jsonl', 'w') as f:
        for row in rows:
            f.write(json.dumps(row) + '\n')
    return folder


def curve(values, seconds_per_step=None, every=10):
    rows = []
    for i, v in enumerate(values):
        row = {'iter': i * every, 'val_loss': 2 * v, 'val_bpb': v}
        if seconds_per_step:
            row['elapsed'] = i * every * seconds_per_step
        rows += [row, {'iter': i * every + 1, 'loss': 3.0, 'lr': 1e-3}]  # training lines are skipped
    return rows


def test_reads_evaluations_and_labels(tmp_path):
    a = write_run(tmp_path / 'runs' / 'a', curve([3.0, 2.5, 2.0], 0.5))
    label, pts = plot.read_run(str(a), 'val_bpb')
    assert label == 'a' and pts == [(0, 0.0, 3.0), (10, 5.0, 2.5), (20, 10.0, 2.0)]
    label, pts = plot.read_run(f"muon={a / 'metrics.jsonl'}", 'val_loss')
    assert label == 'muon' and [v for _, _, v in pts] == [6.0, 5.0, 4.0]


def test_a_resumed_run_keeps_the_last_value_of_each_step(tmp_path):
    rows = curve([3.0, 2.5], 1.0) + [{'iter': 10, 'val_bpb': 2.4, 'val_loss': 4.8, 'elapsed': 10.0},
                                     {'iter': 20, 'val_bpb': 2.2, 'val_loss': 4.4, 'elapsed': 20.0}]
    _, pts = plot.read_run(str(write_run(tmp_path / 'r', rows)), 'val_bpb')
    assert [(s, v) for s, _, v in pts] == [(0, 3.0), (10, 2.4), (20, 2.2)]


def test_reach_interpolates_between_evaluations():
    pts = [(0, 0.0, 3.0), (10, 5.0, 2.5), (20, 10.0, 2.0)]
    assert plot.reach(pts, 2.25) == (15.0, 7.5)
    assert plot.reach(pts, 3.0) == (0, 0.0)
    assert plot.reach(pts, 1.9) is None


def test_table_prints_last_points_and_when_each_run_reaches_a_value(tmp_path):
    a = write_run(tmp_path / 'a', curve([3.0, 2.5, 2.0], 0.5))
    b = write_run(tmp_path / 'b', curve([3.0, 2.8, 2.6], 0.25))
    p = run('plot.py', f'fast={a}', f'slow={b}', '--table', '--reach=2.6', check=True)
    assert 'fast: 2.0000 at step 20, 10.0 s; reaches 2.6 at step 8, 4.0 s' in p.stdout
    assert 'slow: 2.6000 at step 20, 5.0 s; reaches 2.6 at step 20, 5.0 s' in p.stdout


def test_draws_a_png_against_steps_and_seconds(tmp_path):
    pytest.importorskip('matplotlib')
    a = write_run(tmp_path / 'a', curve([3.0, 2.5, 2.0], 0.5))
    b = write_run(tmp_path / 'b', curve([3.1, 2.4, 2.2, 2.1], 0.3))
    old = write_run(tmp_path / 'old', curve([3.0, 2.9]))  # no elapsed: steps only, with a warning
    out = tmp_path / 'curves.png'
    p = run('plot.py', a, b, old, f'--out={out}', '--title=test', '--ymax=3.0', check=True)
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 5000
    assert 'wrote' in p.stdout and 'old recorded no elapsed time' in p.stderr


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path):
    a = write_run(tmp_path / 'a', curve([3.0, 2.5]))
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', sys.argv[1]]; "
            "import runpy; runpy.run_path('plot.py', run_name='__main__')")
    p = subprocess.run([sys.executable, '-c', code, str(a)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode != 0 and 'pip install matplotlib' in p.stderr and 'Traceback' not in p.stderr


@pytest.mark.parametrize('content, words', [(None, 'no such file'), ('not json\n', 'line 1 is not valid JSON'),
                                            ('{"iter": 1, "loss": 3.0}\n', "no 'val_bpb' entries")])
def test_bad_input_is_a_clear_error(tmp_path, content, words):
    path = tmp_path / 'metrics.jsonl'
    if content is not None:
        path.write_text(content)
    p = run('plot.py', path, '--table')
    assert p.returncode != 0 and words in p.stderr and 'Traceback' not in p.stderr
