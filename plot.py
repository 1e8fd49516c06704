"""
Learning curves: validation bits per byte (or loss) against steps and against seconds of training,
for one or several runs, from the metrics.jsonl that train.py writes into <out_dir>/runs/<run_id>/.

    python plot.py out/shakespeare/runs/pretrain-20261123-101500
    python plot.py muon=out/a/runs/x adamw=out/b/runs/y --out=curves.png --metric=loss
    python plot.py out/sweep/runs/* --out=sweep.png --title="lr sweep" --ymax=3.0
    python plot.py out/a/runs/x out/b/runs/y --table --reach=2.30    # numbers, no drawing

A run is its folder or its metrics.jsonl, optionally named `label=path` (the label defaults to the
folder's name). `seconds` is train.py's `elapsed`: time spent training (compiling included,
evaluations and checkpoints not), so runs that evaluate more often are not penalised for it.

matplotlib is an optional extra (`pip install matplotlib`); reading and checking the runs needs only
the standard library, so `--table` prints each run's last point (and with --reach=X, the step and
the second at which it first got to X, interpolated between evaluations) without it.
"""
import argparse
import json
import os
import sys

from common import atomic_file, die

METRICS = {'bpb': ('val_bpb', 'val bits per byte'),
           'loss': ('val_loss', 'val loss (nats per token)')}


def read_run(spec, key):
    """(label, [(step, elapsed seconds or None, value)]) of one run's evaluations."""
    label, eq, path = spec.partition('=')
    if not eq:
        label, path = '', spec
    if os.path.isdir(path):
        path = os.path.join(path, 'metrics.jsonl')
    if not os.path.isfile(path):
        die(f"{path}: no such file (give a run folder <out_dir>/runs/<run_id> or its "
            f"metrics.jsonl)")
    label = label or os.path.basename(os.path.dirname(os.path.abspath(path)))
    points = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{path} line {n} is not valid JSON ({e.msg}): is it a metrics.jsonl from "
                    "train.py?")
            if key in row:
                points.append((row['iter'], row.get('elapsed'), row[key]))
    if not points:
        die(f"{path} has no '{key}' entries: the run evaluated nothing yet (val_sources=[]?)"
            + (", or predates train.py's bits per byte: use "
               "--metric=loss" if key == 'val_bpb' else ''))
    # a resumed run appends to its metrics.jsonl: keep the last value at each step
    return label, sorted({step: (step, t, v) for step, t, v in points}.values())


def reach(pts, target):
    """(step, seconds) at which a curve first gets down to `target`, linearly interpolated between
    the two evaluations around it; None if it never does."""
    for (s0, t0, v0), (s1, t1, v1) in zip([pts[0]] + pts, pts):
        if v1 <= target:
            f = 1.0 if v0 == v1 else (v0 - target) / (v0 - v1)
            seconds = t0 + f * (t1 - t0) if t0 is not None and t1 is not None else None
            return s0 + f * (s1 - s0), seconds
    return None


def plot(runs, out, ylabel, title='', ymax=None):
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        die("plot.py needs matplotlib, an optional extra: pip install matplotlib (or print the "
            "numbers with --table)")
    timed = [(label, pts) for label, pts in runs if all(t is not None for _, t, _ in pts)]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 4.2), squeeze=False)
    for label, pts in runs:
        axes[0][0].plot([s for s, _, _ in pts], [v for _, _, v in pts], marker='.', label=label)
    for label, pts in timed:
        axes[0][1].plot([t for _, t, _ in pts], [v for _, _, v in pts], marker='.', label=label)
    for ax, xlabel in zip(axes[0], ('steps', 'seconds of training')):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ymax is not None:
            ax.set_ylim(top=ymax)
    axes[0][-1].legend(fontsize='small')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format='png', dpi=90)
    plt.close(fig)
    untimed = [label for label, pts in runs if (label, pts) not in timed]
    if untimed:
        print(f"warning: {', '.join(untimed)} recorded no elapsed time (an older train.py): "
              f"plotted "
              "against steps only", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', help="run folders or metrics.jsonl files, optionally as "
                                           "label=path")
    p.add_argument('--metric', choices=sorted(METRICS), default='bpb',
                   help="what to plot (default: bpb)")
    p.add_argument('--out', default='curves.png', help="PNG file to write (default: curves.png)")
    p.add_argument('--title', default='')
    p.add_argument('--ymax', type=float, default=None,
                   help="cut the y axis here (the first evaluations are high)")
    p.add_argument('--table', action='store_true', help="print each run's last evaluation; draw "
                                                        "nothing")
    p.add_argument('--reach', type=float, default=None,
                   help="with --table: when each run first gets to this value")
    args = p.parse_args(argv)
    key, ylabel = METRICS[args.metric]
    runs = [read_run(spec, key) for spec in args.runs]
    if args.table:
        for label, pts in runs:
            step, t, v = pts[-1]
            line = f"{label}: {v:.4f} at step {step}" + (f", {t:.1f} s" if t is not None else '')
            if args.reach is not None:
                got = reach(pts, args.reach)
                if got:
                    seconds = f", {got[1]:.1f} s" if got[1] is not None else ''
                    line += f"; reaches {args.reach} at step {got[0]:.0f}{seconds}"
                else:
                    line += f"; never reaches {args.reach}"
            print(line)
        return
    plot(runs, args.out, ylabel, args.title, args.ymax)
    print(f"wrote {args.out} ({len(runs)} run{'s' * (len(runs) > 1)})")


if __name__ == '__main__':
    main()
