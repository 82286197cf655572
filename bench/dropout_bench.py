"""Measurement: ensemble heads trained with device dropout, and the top-1 with each device missing.

    PORT=29612 python bench/dropout_bench.py [--demo output/demo] [--rates 0.1 0.2] [--quick] [--docs | --docs-only]

A head trained only with every device present has never seen a device's tokens zero-filled, which is what the
runtime feeds it when a device is missing (`collab_infer.py --dropout-tolerant` or `--deadline-ms`).
`ensemble.py --device-dropout p` zeroes each device's tokens with probability p per training image. For each rate,
demo.sh's own stage-3 command line (recorded as bench/strategies_bench.py records it: same recipe, epochs, launcher)
runs again on the finished demo's students (DEMO/stage2) with `--device-dropout p --eval-missing`, into
DEMO/dropout/p{p}; the row without dropout is the demo's own stage 3 (DEMO/stage3/missing_devices.json).

Writes DEMO/dropout/dropout.json; `--docs` also rewrites the `dropout` table of docs/results.md. The service's
fault drill (bench/serve_bench.py) serves the p=0.2 head when it exists.
"""
import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import fileio  # noqa: E402
from bench.strategies_bench import Demo, sh  # noqa: E402
from models.checkpoint import checkpoint_info  # noqa: E402

DOCS = os.path.join(ROOT, 'docs', 'results.md')
DEMO = os.path.join(ROOT, 'output', 'demo')


def read_json(path):
    with open(path) as f:
        return json.load(f)


def head_path(demo_out, rate):
    return os.path.join(demo_out, 'dropout', f'p{rate:g}', 'checkpoint.pth')


def row(label, missing):
    return {'head': label, 'all': missing['all'], 'missing': missing['missing'],
            'missing_mean': statistics.fmean(missing['missing']), 'missing_worst': min(missing['missing'])}


def train_head(demo, demo_out, rate):
    """demo.sh's stage 3 on DEMO's students with --device-dropout `rate`; its missing_devices.json."""
    out = os.path.dirname(head_path(demo_out, rate))
    os.makedirs(out, exist_ok=True)
    teacher = os.path.join(demo_out, 'teacher', 'sub-dataset0', 'checkpoint.pth')
    cmd = demo.command('stage3', demo_out, teacher)
    cmd[cmd.index('--output_dir') + 1] = out
    cmd += ['--device-dropout', str(rate), '--overwrite']
    seconds = sh(cmd, os.path.join(out, 'stage3.log'), demo.omp)
    print(f'device dropout {rate:g}: {seconds:.0f} s', flush=True)
    return read_json(os.path.join(out, 'missing_devices.json'))


def markdown(report):
    n = len(report['rows'][0]['missing'])
    lines = ['| ensemble head | all devices | ' + ' | '.join(f'device {i} missing' for i in range(n))
             + ' | mean missing | worst missing |', '|---|' + '---:|' * (n + 3)]
    for r in report['rows']:
        lines.append(f'| {r["head"]} | {r["all"]:.2f} | ' + ' | '.join(f'{a:.2f}' for a in r['missing'])
                     + f' | {r["missing_mean"]:.2f} | {r["missing_worst"]:.2f} |')
    groups = '; '.join(f'device {i}: {", ".join(g)}' for i, g in enumerate(report['groups']))
    return (f'`PORT=29612 python bench/dropout_bench.py --docs` on the students of `{report["demo"]}` ({groups}); '
            f'stage 3 with demo.sh\'s recipe{" (--quick)" if report["quick"] else ""}, top-1 % on '
            f'{report["test_images"]} test images.\n\n' + '\n'.join(lines) + '\n\n' + summary(report))


def summary(report):
    """One line per dropout head: its cost with every device up, and its worst device missing against all up."""
    plain, heads = report['rows'][0], report['rows'][1:]
    worst = plain['missing'].index(plain['missing_worst'])
    text = (f'Without dropout the ensemble loses {plain["all"] - plain["missing_worst"]:.2f} points when device '
            f'{worst} ({", ".join(report["groups"][worst])}) is missing.')
    for r in heads:
        text += (f' {r["head"]}: {r["all"] - plain["all"]:+.2f} points with every device up, at most '
                 f'{r["all"] - r["missing_worst"]:.2f} points lost with one device missing.')
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--demo', default=DEMO, help='a finished demo.sh output folder (its stage2 students and teacher)')
    p.add_argument('--rates', type=cli.probability, nargs='+', default=[0.1, 0.2])
    p.add_argument('--quick', action='store_true', help='record demo.sh --quick (for a demo made with --quick)')
    p.add_argument('--port', type=int, default=int(os.environ.get('PORT', '29612')))
    p.add_argument('--docs', action='store_true', help='also rewrite the dropout table of docs/results.md')
    p.add_argument('--docs-only', action='store_true',
                   help="rewrite the table of docs/results.md from DEMO/dropout/dropout.json, training nothing")
    args = p.parse_args(argv)
    demo_out = os.path.abspath(args.demo)
    if args.docs_only:
        done = os.path.join(demo_out, 'dropout', 'dropout.json')
        if not os.path.isfile(done):
            sys.exit(f'error: {done} not found: run this script without --docs-only first')
        return fileio.replace_block(DOCS, 'dropout', markdown(read_json(done)))
    plain = os.path.join(demo_out, 'stage3', 'missing_devices.json')
    if not os.path.isfile(plain):
        sys.exit(f'error: {plain} not found: run demo.sh (its stage 3 runs --eval-missing) first')
    demo = Demo(args.quick, args.port)
    rows = [row('trained without dropout (the demo\'s stage 3)', read_json(plain))]
    rows += [row(f'`--device-dropout {r:g}`', train_head(demo, demo_out, r)) for r in args.rates]
    manifest = read_json(os.path.join(demo_out, 'stage2', 'split.json'))
    ckpt = checkpoint_info(os.path.join(demo_out, 'stage3', 'checkpoint.pth'))
    stage3_args = ckpt.get('args') or {}
    report = {'demo': os.path.relpath(demo_out, ROOT), 'quick': args.quick, 'rows': rows,
              'groups': [d['class_names'] for d in manifest['divisions']],
              'test_images': stage3_args.get('limit_val') or 10000}
    fileio.write_json_atomic(os.path.join(demo_out, 'dropout', 'dropout.json'), report)
    text = markdown(report)
    print(text)
    if args.docs:
        fileio.replace_block(DOCS, 'dropout', text)


if __name__ == '__main__':
    main()
