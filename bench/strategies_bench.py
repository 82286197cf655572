"""Measurement: which classes share a device -- the authors' random split against confusion-driven splits.

    PORT=29611 python bench/strategies_bench.py [--quick] [--teacher CKPT] [--out DIR] [--second-seed 1]
        [--only random-42 random-1 confusion-together confusion-spread] [--reuse]

For each strategy (random with the authors' seed 42; random with `--second-seed`, whose difference from seed 42 is
the run-to-run spread; confusion-together; confusion-spread), Fashion-MNIST is split into demo.sh's divisions by
`splite_dataset.py --strategy ...`, then demo.sh's stages 1-3 run with demo.sh's own command lines (recipe, models,
epochs, launcher, NPROC), stage 3 with `--eval-missing`. The command lines come from demo.sh itself: it is run once
with PYTHON set to a recorder that writes each command down instead of running it (`--quick` records
`demo.sh --quick`: slices of the data, one epoch per stage, smaller models), so this script follows demo.sh.

All strategies share one full teacher: `--teacher CKPT`; by default the finished demo's
output/demo/teacher/sub-dataset0/checkpoint.pth when its model is the one demo.sh trains in this mode, else
demo.sh's teacher is trained once into OUT/base. Its confusion matrix on its own 60,000 training images
(`splite_dataset.py --write-confusion OUT/confusion.json --confusion-split train`, as demo.sh writes it) drives both
confusion strategies: no test label takes part in choosing the groups whose test accuracy the table reports.

Writes OUT/strategies.json and OUT/strategies.md (default OUT: output/strategies, output/strategies-quick with
--quick): per strategy the groups (class names), the share of the teacher's confusion inside groups, each
sub-teacher's and student's top-1 on its division's test images, the ensemble's top-1 on all test images, and the
mean and worst top-1 with one device missing (its tokens zero-filled). Accuracies in percent. Every stage's log is
in OUT/runs/NAME/. `--reuse` keeps a strategy's finished run (same teacher, same mode) instead of training again;
with `--only`, the strategies not named keep their finished runs' rows in the table.
"""
import argparse
import ast
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs', 'results.md')  # its `strategies` block
sys.path.insert(0, ROOT)
import fileio  # noqa: E402
import grouping  # noqa: E402
import utils  # noqa: E402
from models.checkpoint import checkpoint_info  # noqa: E402

# splite_dataset.py flags that choose the classes: dropped from demo.sh's split, set per strategy here.
SPLIT_CHOICE = {'--strategy', '--seed', '--confusion', '--confusion-split', '--teacher-path', '--teacher-model',
                '--teacher-kwargs', '--plan', '--sub_classes', '--sub-classes', '--write-confusion', '--input-size',
                '--tiny-transforms', '--batch-size'}
DEMO_TEACHER = os.path.join(ROOT, 'output', 'demo', 'teacher', 'sub-dataset0', 'checkpoint.pth')
RECORDER = '''#!{python}
import json, os, sys
with open(os.environ['DEVIT_RECORD'], 'a') as f:
    f.write(json.dumps({{'argv': sys.argv[1:], 'omp': os.environ.get('OMP_NUM_THREADS')}}) + '\\n')
'''


# ----------------------------------------------------------------------------------------------------------------
# demo.sh's command lines

class Demo:
    """demo.sh's commands, recorded: `split1`/`split` (N divisions) argv, and per stage (teacher, stage1, stage2,
    stage3) the launcher prefix and the script's argv; `out` is the OUT they were recorded with."""

    def __init__(self, quick, port):
        tmp = tempfile.mkdtemp(prefix='strategies-record-')
        try:
            recorder, record = os.path.join(tmp, 'python'), os.path.join(tmp, 'commands.jsonl')
            with open(recorder, 'w') as f:
                f.write(RECORDER.format(python=sys.executable))
            os.chmod(recorder, 0o755)
            self.out = os.path.join(tmp, 'demo')
            env = dict(os.environ, PYTHON=recorder, OUT=self.out, PORT=str(port), DEVIT_RECORD=record)
            proc = subprocess.run(['bash', os.path.join(ROOT, 'demo.sh'), *(['--quick'] if quick else [])], env=env,
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f'error: recording demo.sh failed: {proc.stderr.strip()[-2000:]}')
            with open(record) as f:
                records = [json.loads(line) for line in f]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.stages, self.omp, splits = {}, None, []
        for r in records:
            argv = r['argv']
            script = next((i for i, a in enumerate(argv) if a.endswith('.py')), None)
            if script is None:
                continue
            if argv[script] == 'splite_dataset.py':
                if {'--output_path', '--output-path'} & set(argv):  # not a --write-confusion alone
                    splits.append(without(argv[script:], SPLIT_CHOICE))
            elif '--output_dir' in argv:
                stage = os.path.basename(argv[argv.index('--output_dir') + 1])
                self.stages[stage] = (argv[:script], argv[script:])
                self.omp = r['omp']
        missing = [s for s in ('teacher', 'stage1', 'stage2', 'stage3') if s not in self.stages]
        one = [s for s in splits if value(s, '--num_division', '--num-division') == '1']
        many = [s for s in splits if s not in one]
        if len(one) != 1 or len(many) != 1 or missing:
            sys.exit(f'error: demo.sh no longer runs a 1-division split, an N-division split and stages teacher, '
                     f'stage1-3 (found {len(one)} and {len(many)} splits; stages missing: {missing})')
        self.split1, self.split = one[0], many[0]
        self.num_division = int(value(self.split, '--num_division', '--num-division'))
        self.data = value(self.split, '--data_path', '--data-path')
        self.teacher_ckpt = os.path.join(self.out, 'teacher', 'sub-dataset0', 'checkpoint.pth')
        _, t = self.stages['teacher']
        self.teacher_model = t[t.index('--model') + 1]
        self.teacher_kwargs = kwargs_after(t, '--model-kwargs')

    def mapped(self, argv, run, teacher):
        """argv with the recorded OUT replaced by `run` and the recorded teacher checkpoint by `teacher`."""
        out = []
        for a in argv:
            if a == self.teacher_ckpt:
                a = teacher
            elif a == self.out or a.startswith(self.out + os.sep):
                a = run + a[len(self.out):]
            out.append(a)
        return out

    def command(self, stage, run, teacher):
        launcher, argv = self.stages[stage]
        argv = self.mapped(argv, run, teacher)
        if stage == 'stage3' and '--eval-missing' not in argv:
            argv.append('--eval-missing')
        return [sys.executable, *launcher, *argv]


def value(argv, *names):
    """The value after the first of `names` in argv (`--flag value` or `--flag=value`), or None."""
    for i, a in enumerate(argv):
        flag, eq, rest = a.partition('=')
        if flag in names:
            return rest if eq else argv[i + 1]
    return None


def without(argv, flags):
    """argv less the `flags` and their values (the split's choice of classes, which this bench sets itself)."""
    out, skip = [], False
    for a in argv:
        if a.split('=', 1)[0] in flags:
            skip = '=' not in a
            continue
        if skip and not a.startswith('--'):
            continue
        skip = False
        out.append(a)
    return out


def kwargs_after(argv, flag):
    """The `k=v` items after `flag`, parsed as cli.ParseKwargs does."""
    i, kwargs = argv.index(flag) + 1, {}
    while i < len(argv) and not argv[i].startswith('--'):
        key, _, value = argv[i].partition('=')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
        i += 1
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# Running

def sh(cmd, log, omp):
    """Run `cmd` in the repository root, output to `log`; exit with its tail on failure. Returns seconds."""
    started = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT)
    if omp:
        env['OMP_NUM_THREADS'] = omp
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode:
        with open(log) as f:
            sys.exit(f'error: {" ".join(cmd)} failed (exit {proc.returncode}); {log}:\n{f.read()[-3000:]}')
    return time.time() - started


def teacher_matches(path, demo):
    if not os.path.isfile(path):
        return False
    args = checkpoint_info(path).get('args') or {}
    return args.get('model') == demo.teacher_model and dict(args.get('model_kwargs') or {}) == demo.teacher_kwargs


def get_teacher(args, demo):
    """The shared full teacher: --teacher, the finished demo's, or demo.sh's stage 0 run into OUT/base."""
    if args.teacher:
        if not teacher_matches(args.teacher, demo):
            sys.exit(f'error: --teacher {args.teacher} is not a {demo.teacher_model} {demo.teacher_kwargs} checkpoint, '
                     f'the teacher demo.sh{" --quick" if args.quick else ""} trains')
        return os.path.abspath(args.teacher)
    if teacher_matches(DEMO_TEACHER, demo):
        return DEMO_TEACHER
    base = os.path.join(args.out, 'base')
    trained = os.path.join(base, 'teacher', 'sub-dataset0', 'checkpoint.pth')
    if args.reuse and teacher_matches(trained, demo):
        return trained
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    print(f'training the teacher: demo.sh\'s teacher into {base}', flush=True)
    sh([sys.executable, *demo.mapped(demo.split1, base, trained)], os.path.join(base, 'split1.log'), demo.omp)
    seconds = sh(demo.command('teacher', base, trained), os.path.join(base, 'teacher.log'), demo.omp)
    print(f'  teacher: {seconds:.0f} s', flush=True)
    return trained


def strategies(args):
    """[(name, splite_dataset.py flags, run it now)] in table order; the others enter the table from an earlier run."""
    conf = ['--confusion', os.path.join(args.out, 'confusion.json')]
    table = [('random-42', ['--strategy', 'random', '--seed', '42']),
             (f'random-{args.second_seed}', ['--strategy', 'random', '--seed', str(args.second_seed)]),
             ('confusion-together', ['--strategy', 'confusion-together', *conf]),
             ('confusion-spread', ['--strategy', 'confusion-spread', *conf])]
    unknown = set(args.only or ()) - {n for n, _ in table}
    if unknown:
        sys.exit(f'error: --only {" ".join(sorted(unknown))}: the strategies are {", ".join(n for n, _ in table)}')
    return [(n, f, not args.only or n in args.only) for n, f in table]


def accuracy(path):
    return float(checkpoint_info(path)['test_acc1'])


def run_key(teacher, args, flags):
    """What a finished run depends on: the teacher file (path and modification time), the mode, the split flags."""
    return {'teacher': teacher, 'teacher_mtime_ns': os.stat(teacher).st_mtime_ns, 'quick': args.quick, 'flags': flags}


def earlier_result(run, key):
    """The result.json of a finished run with the same teacher, mode and flags, or None."""
    path = os.path.join(run, 'result.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if result.get('key') == key else None


def run_strategy(name, flags, args, demo, teacher, confusion):
    """Split, stages 1-3 of demo.sh, and the row of the table."""
    run = os.path.join(args.out, 'runs', name)
    result_file = os.path.join(run, 'result.json')
    key = run_key(teacher, args, flags)
    if args.reuse and earlier_result(run, key) is not None:
        print(f'{name}: reusing {result_file}', flush=True)
        return earlier_result(run, key)
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    seconds = {'split': sh([sys.executable, *demo.mapped(demo.split, run, teacher), *flags],
                           os.path.join(run, 'split.log'), demo.omp)}
    for stage in ('stage1', 'stage2', 'stage3'):
        seconds[stage] = sh(demo.command(stage, run, teacher), os.path.join(run, f'{stage}.log'), demo.omp)
        print(f'  {name} {stage}: {seconds[stage]:.0f} s', flush=True)
    split_dir = demo.mapped([value(demo.split, '--output_path', '--output-path')], run, teacher)[0]
    with open(os.path.join(split_dir, 'split.json')) as f:
        manifest = json.load(f)
    with open(os.path.join(run, 'stage3', 'missing_devices.json')) as f:
        missing = json.load(f)
    n = manifest['num_division']
    groups = [d['classes'] for d in manifest['divisions']]
    result = {
        'name': name, 'strategy': manifest['strategy'], 'seed': manifest['seed'], 'key': key,
        'groups': groups, 'group_names': [d['class_names'] for d in manifest['divisions']],
        'confusion_within': grouping.within_confusion(confusion, groups),
        'sub_teacher_acc1': [accuracy(os.path.join(utils.division_dir(os.path.join(run, 'stage1'), i),
                                                   'checkpoint.pth')) for i in range(n)],
        'student_acc1': [accuracy(os.path.join(utils.division_dir(os.path.join(run, 'stage2'), i),
                                               'checkpoint.pth')) for i in range(n)],
        'ensemble_acc1': missing['all'], 'missing_acc1': missing['missing'],
        'missing_mean_acc1': statistics.fmean(missing['missing']), 'missing_worst_acc1': min(missing['missing']),
        'seconds': seconds,
    }
    fileio.write_json_atomic(result_file, result)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Report

def markdown(report):
    rows = report['strategies']
    lines = [f'# Class assignment strategies on {report["dataset"]} ({report["num_division"]} divisions'
             f'{", quick mode" if report["quick"] else ""})', '',
             f'Teacher `{os.path.relpath(report["teacher"], ROOT)}`: top-1 {report["teacher_acc1"]:.2f}% on the '
             f'{report["confusion_images"]} '
             f'{report["confusion_split"]} images its confusion matrix was counted on. Stages 1-3: demo.sh'
             f'{" --quick" if report["quick"] else ""}\'s commands. Accuracies in percent; "inside" is the share of '
             f'the teacher\'s off-diagonal confusion (C + Cᵀ) between classes of the same division.', '',
             '| strategy | groups | inside | sub-teachers | students | ensemble | one device missing: mean | worst |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        groups = ' / '.join(', '.join(g) for g in r['group_names'])
        lines.append(f'| {r["name"]} | {groups} | {100 * r["confusion_within"]:.1f}% | '
                     f'{" ".join(f"{a:.1f}" for a in r["sub_teacher_acc1"])} | '
                     f'{" ".join(f"{a:.1f}" for a in r["student_acc1"])} | {r["ensemble_acc1"]:.2f} | '
                     f'{r["missing_mean_acc1"]:.2f} | {r["missing_worst_acc1"]:.2f} |')
    if report.get('spread') is not None:
        lines += ['', f'Run-to-run spread (ensemble top-1, random seed 42 vs seed {report["second_seed"]}): '
                      f'{report["spread"]:.2f} points.']
        for name, delta in report['vs_random'].items():
            lines.append(f'- {name}: {delta:+.2f} points against random-42 '
                         f'({"more" if abs(delta) > report["spread"] else "not more"} than the spread).')
        lines += ['', verdict(report)]
    lines += ['', f'Measured in {report["seconds"]:.0f} s on {os.cpu_count()} cores shared with other jobs.']
    return '\n'.join(lines) + '\n'


def verdict(report):
    """Which split the demo should use: a confusion strategy only if it beats random-42 by more than the spread;
    and the worst top-1 with one device missing, against random-42 and the two random seeds' difference."""
    winners = [n for n, d in report['vs_random'].items() if d > report['spread']]
    text = (f'The demo should use `--strategy {winners[0]}`: it beats the authors\' split by more than the spread.'
            if winners else 'No strategy beats the authors\' split by more than the spread: the demo keeps `random` '
                            '(seed 42), the paper\'s grouping.')
    by_name = {r['name']: r['missing_worst_acc1'] for r in report['strategies']}
    base, second = by_name.get('random-42'), by_name.get(f'random-{report["second_seed"]}')
    if base is not None and second is not None:
        others = ', '.join(f'{n} {w - base:+.2f}' for n, w in by_name.items() if n.startswith('confusion'))
        text += (f' Worst top-1 with one device missing, against random-42: {others} points (random seeds 42 and '
                 f'{report["second_seed"]} differ by {abs(second - base):.2f}).')
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help="demo.sh --quick's commands: a smoke run of the tooling")
    p.add_argument('--teacher', default=None, help='full-class teacher checkpoint of the mode\'s demo.sh model')
    p.add_argument('--out', default=None, help='output folder (default output/strategies[-quick])')
    p.add_argument('--second-seed', type=int, default=1, help='seed of the second random split (the spread)')
    p.add_argument('--only', nargs='+', default=None,
                   help='run these strategies only (names as in the table); the others\' finished runs stay in it')
    p.add_argument('--reuse', action='store_true', help='keep finished runs with the same teacher and mode')
    p.add_argument('--port', type=int, default=int(os.environ.get('PORT', 29561)),
                   help='master port of the launcher (default $PORT or 29561)')
    p.add_argument('--docs-only', action='store_true',
                   help="rewrite the table of docs/results.md from OUT/strategies.json, training nothing")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out or os.path.join(ROOT, 'output', 'strategies-quick' if args.quick
                                                        else 'strategies'))
    if args.docs_only:
        done = os.path.join(args.out, 'strategies.json')
        if not os.path.isfile(done):
            sys.exit(f'error: {done} not found: run this script without --docs-only first')
        with open(done) as f:
            publish(json.load(f), args.out, docs=True)
        return 0
    started = time.time()
    demo = Demo(args.quick, args.port)
    os.makedirs(args.out, exist_ok=True)
    teacher = get_teacher(args, demo)
    conf_file = os.path.join(args.out, 'confusion.json')
    sh([sys.executable, 'splite_dataset.py', '--dataset', 'fashion_mnist', '--data_path', demo.data,
        '--teacher-path', teacher, '--write-confusion', conf_file, '--confusion-split', 'train'],
       os.path.join(args.out, 'confusion.log'), demo.omp)
    with open(conf_file) as f:
        conf = json.load(f)
    confusion = grouping.confusion_from_json(conf, conf['classes'], conf_file)
    rows = []
    for name, flags, now in strategies(args):
        if not now:  # --only: the other strategies' finished runs still make their rows
            earlier = earlier_result(os.path.join(args.out, 'runs', name), run_key(teacher, args, flags))
            rows += [earlier] if earlier else []
            continue
        print(f'{name}: {" ".join(flags)}', flush=True)
        rows.append(run_strategy(name, flags, args, demo, teacher, confusion))
        r = rows[-1]
        print(f'  {name}: ensemble {r["ensemble_acc1"]:.2f}%, one missing: mean {r["missing_mean_acc1"]:.2f}%, '
              f'worst {r["missing_worst_acc1"]:.2f}%', flush=True)
    by_name = {r['name']: r for r in rows}
    base, second = by_name.get('random-42'), by_name.get(f'random-{args.second_seed}')
    report = {'dataset': 'fashion_mnist', 'num_division': demo.num_division, 'quick': args.quick,
              'teacher': teacher, 'teacher_acc1': 100 * conf['accuracy'], 'confusion_images': conf['images'],
              'confusion_split': conf.get('split'),
              'confusion': conf_file, 'second_seed': args.second_seed, 'strategies': rows,
              'spread': abs(base['ensemble_acc1'] - second['ensemble_acc1']) if base and second else None,
              'vs_random': {r['name']: r['ensemble_acc1'] - base['ensemble_acc1']
                            for r in rows if base and r['name'].startswith('confusion')},
              'seconds': time.time() - started}
    fileio.write_json_atomic(os.path.join(args.out, 'strategies.json'), report)
    print(publish(report, args.out, docs=not args.quick))
    return 0


def publish(report, out, docs):
    """OUT/strategies.md and, with `docs`, the same table in docs/results.md (its generated block, below that page's
    own heading); the markdown."""
    text = markdown(report)
    fileio.write_text_atomic(os.path.join(out, 'strategies.md'), text)
    if docs:
        fileio.replace_block(DOCS, 'strategies', text.split('\n', 2)[2])
    return text


if __name__ == '__main__':
    sys.exit(main())
