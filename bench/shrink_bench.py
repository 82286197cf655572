"""Benchmark: shrinking DeViT students -- params, MACs, CPU latency and accuracy before and after.

    python bench/shrink_bench.py --demo output/demo [--work-dir DIR]       # the demo's four trained students
    python bench/shrink_bench.py [--quick] [--work-dir DIR] [--markdown FILE] [--json FILE]

With `--demo OUT` (a finished `bash demo.sh` run): every division's stage-2 student of OUT is shrunk at two ratios
by shrink.py (all divisions in one call) and re-distilled for one epoch from its sub-teacher in OUT/stage1 with the
demo's recipe; the control is shrink.py keeping everything (the same extra epoch, no pruning). Nothing is trained
from scratch, so this takes a few minutes; the table goes to docs/shrinking.md (its generated block shrink-demo).

Without `--demo`:
On Fashion-MNIST, division 0 of the demo's 4-way split, with the stage scripts as processes (plain python, world
size 1): a sub-teacher trained from scratch (train_subdata.py), the demo's student distilled from it
(distill_sub.py), then shrink.py at two ratios (fractions KEPT of the heads and of the MLP neurons in every layer)
with one epoch of re-distillation (--redistill-epochs, i.e. distill_sub.py --load-shrink). The control row is the
unpruned student distilled for the same extra epoch, so the re-distilled rows are compared with equal training.

Params and MACs: models.stats (MACs = the paper's "FLOPs" convention). Latency: batch 1, one thread, eval mode,
models interleaved in a shuffled order each round (so a busy neighbour slows all of them alike), median of `--runs`
rounds; the ratio is to the unpruned student measured in the same rounds. Accuracy: top-1 on the division's 3,000
test images. Training uses `--limit-train` images of the division's 18,000 per epoch (6,000 by default: this
2-core machine is shared). The table goes to docs/shrinking.md (its generated block shrink), or to `--markdown FILE`.
`--quick` (512 training and 300 test images, one epoch per stage) is a smoke run and writes no markdown unless
`--markdown` is given.
"""
import argparse
import copy
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import datasets  # noqa: E402
import engine  # noqa: E402
import fileio  # noqa: E402
from fileio import UsageError  # noqa: E402
from models.pruning import model_shape, prune_  # noqa: E402
from models.stats import count_macs, count_params  # noqa: E402
from shrinking import load_student  # noqa: E402

DATA = '/usr/share/datasets/fashion-mnist'
DOCS = os.path.join(ROOT, 'docs', 'shrinking.md')  # generated blocks shrink and shrink-demo (fileio.replace_block)
TEACHER = 'deit_tiny_distilled_patch16_224'
# The demo's student; the teacher is smaller than the demo's (192 wide, 6 deep) to keep the benchmark short on CPU.
STUDENT_KW = ['img_size=28', 'patch_size=4', 'in_chans=1', 'embed_dim=96', 'depth=3', 'num_heads=3', 'mlp_ratio=2']
TEACHER_KW = ['img_size=28', 'patch_size=4', 'in_chans=1', 'embed_dim=128', 'depth=4', 'num_heads=4', 'mlp_ratio=2']
RANDOM_SEEDS = 5
REPEATS = 5
RATIOS = [('keep 2/3', 2 / 3, 2 / 3), ('keep 1/3', 1 / 3, 1 / 3)]  # (name, head ratio, neuron ratio), kept
# The demo's students have 2 heads and 128 MLP neurons per layer.
DEMO_RATIOS = [('keep 1/2', 1 / 2, 1 / 2), ('keep 1/2 heads 1/4 MLP', 1 / 2, 1 / 4)]
DEMO_COMMON = ['--dataset', 'fashion_mnist', '--tiny-transforms', '--mixup', '0', '--cutmix', '0', '--smoothing',
               '0', '--drop-path', '0', '--batch-size', '256', '--eval-batch-size', '1000', '--unscale-lr',
               '--warmup-epochs', '0.43', '--min-lr', '1e-5', '--weight-decay', '0.05', '--no-progress',
               '--overwrite', '--all-divisions']
COMMON = ['--dataset', 'fashion_mnist', '--tiny-transforms', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
          '--drop-path', '0', '--batch-size', '128', '--eval-batch-size', '500', '--unscale-lr', '--warmup-epochs',
          '0.3', '--min-lr', '1e-5', '--weight-decay', '0.05', '--no-progress', '--num_division', '4',
          '--start-division', '0', '--overwrite']


def sh(cmd, log, threads):
    started = time.time()
    with open(log, 'w') as f:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads)))
    if proc.returncode:
        with open(log) as f:
            sys.exit(f'failed: {" ".join(cmd)}\n{f.read()[-3000:]}')
    return time.time() - started


def train(work, args):
    """Split, sub-teacher, student, shrunk students and the control; returns ({row: checkpoint path}, setup)."""
    limits = ['--limit-train', str(args.limit_train)] + (['--limit-val', '300'] if args.quick else [])
    e1, e2, e_re = args.teacher_epochs, args.student_epochs, args.redistill_epochs
    split, s1, s2 = (os.path.join(work, n) for n in ('split', 'stage1', 'stage2'))
    common = COMMON + limits
    teacher = ['--teacher-model', TEACHER, '--teacher-kwargs', *TEACHER_KW, '--teacher-path', s1,
               '--distillation-type', 'hard', '--gama', '0.2', '0.1', '0.3', '--data-path', split]
    steps = [] if os.path.isfile(os.path.join(split, 'split.json')) else [
        ('split', ['splite_dataset.py', '--dataset', 'fashion_mnist', '--data_path', DATA, '--num_division', '4',
                   '--output_path', split])]
    steps += [
        (f'sub-teacher, {e1} epochs', ['train_subdata.py', *common, '--model', TEACHER, '--model-kwargs', *TEACHER_KW,
                                       '--lr', '2e-3', '--epochs', str(e1), '--data-path', split, '--output_dir', s1]),
        (f'student, {e2} epochs', ['distill_sub.py', *common, '--model', 'dedeit', '--model-kwargs', *STUDENT_KW,
                                   '--lr', '2e-3', '--epochs', str(e2), *teacher, '--output_dir', s2]),
        (f'control: unpruned, +{e_re} epoch', [
            'distill_sub.py', *common, '--model', 'dedeit', '--model-kwargs', *STUDENT_KW, '--lr', '5e-4',
            '--epochs', str(e_re), '--model-path', os.path.join(s2, 'sub-dataset0', 'checkpoint.pth'), *teacher,
            '--output_dir', os.path.join(work, 'control')]),
    ]
    for name, head, neuron in RATIOS:
        steps.append((f'shrink {name}, +{e_re} epoch', [
            'shrink.py', *common, '--model-path', s2, '--head-ratio', repr(head), '--neuron-ratio', repr(neuron),
            '--importance-batches', str(args.importance_batches), '--redistill-epochs', str(e_re), '--lr', '5e-4',
            *teacher, '--output_dir', os.path.join(work, folder_name(name))]))
    timings = run_steps(steps, work, args)
    paths = {'unpruned': os.path.join(s2, 'sub-dataset0', 'checkpoint.pth'),
             'unpruned +re': os.path.join(work, 'control', 'sub-dataset0', 'checkpoint.pth')}
    paths.update(shrunk_paths(work, RATIOS, 0))
    return paths, {'train_seconds': sum(timings.values()), 'sub_teacher_epochs': e1, 'student_epochs': e2,
                   'redistill_epochs': e_re, 'train_images': args.limit_train,
                   'importance_images': args.importance_batches * 128}


def folder_name(row):
    return row.replace(' ', '_').replace('/', '_')


def shrunk_paths(work, ratios, division):
    """{row: checkpoint} of the pruned (before re-distillation) and re-distilled students of one division."""
    paths = {}
    for name, _, _ in ratios:
        folder = os.path.join(work, folder_name(name), f'sub-dataset{division}')
        paths[name] = os.path.join(folder, 'pruned.pth')
        paths[name + ' +re'] = os.path.join(folder, 'checkpoint.pth')
    return paths


def run_steps(steps, work, args):
    """Run the (name, command) steps, or with --reuse read the timings an earlier run saved; {name: seconds}."""
    timings_file = os.path.join(work, 'timings.json')
    if args.reuse:
        with open(timings_file) as f:
            return json.load(f)
    timings = {}
    for i, (name, cmd) in enumerate(steps):
        timings[name] = sh(cmd, os.path.join(work, f'step{i}.log'), args.threads)
        print(f'{name}: {timings[name]:.0f} s', flush=True)
    with open(timings_file, 'w') as f:
        json.dump(timings, f, indent=2)
    return timings


def train_demo(demo, work, args):
    """Shrink and re-distil the students of a finished demo run; returns ({division: {row: path}}, setup)."""
    split, stage1, stage2 = (os.path.join(demo, n) for n in ('split4', 'stage1', 'stage2'))
    first = os.path.join(stage2, 'sub-dataset0', 'args.json')
    if not os.path.isfile(first):
        sys.exit(f'error: {demo} holds no finished demo run ({first} is missing); run `bash demo.sh` first')
    with open(first) as f:
        demo_args = json.load(f)
    teacher_kw = [f'{k}={v}' for k, v in demo_args['teacher_kwargs'].items()]
    num_division = len(json.load(open(os.path.join(split, 'split.json')))['divisions'])
    common = [*DEMO_COMMON, '--data-path', split, '--num_division', str(num_division), '--model-path', stage2,
              '--teacher-model', demo_args['teacher_model'], '--teacher-kwargs', *teacher_kw,
              '--teacher-path', stage1, '--distillation-type', 'hard', '--gama', '0.2', '0.1', '0.3', '--lr', '5e-4',
              '--importance-batches', str(args.importance_batches), '--redistill-epochs', str(args.redistill_epochs)]
    rows = [('control', 1.0, 1.0), *DEMO_RATIOS]
    steps = [(f'shrink {name}, +{args.redistill_epochs} epoch', [
        'shrink.py', *common, '--head-ratio', repr(head), '--neuron-ratio', repr(neuron),
        '--output_dir', os.path.join(work, folder_name(name))]) for name, head, neuron in rows]
    timings = run_steps(steps, work, args)
    paths = {}
    for division in range(num_division):
        paths[division] = {'unpruned': os.path.join(stage2, f'sub-dataset{division}', 'checkpoint.pth'),
                           'unpruned +re': shrunk_paths(work, rows[:1], division)['control +re'],
                           **shrunk_paths(work, DEMO_RATIOS, division)}
    return paths, {'train_seconds': sum(timings.values()), 'redistill_epochs': args.redistill_epochs,
                   'importance_images': args.importance_batches * 256, 'demo': demo, 'split': split,
                   'student': demo_args['model'], 'student_kwargs': demo_args['model_kwargs']}


def latency(models, runs, warmup=20, seed=0):
    """Median seconds per image of each model (batch 1, one thread), interleaved in a shuffled order per round."""
    torch.set_num_threads(1)
    x = torch.randn(1, 1, 28, 28)
    names = list(models)
    times = {n: [] for n in names}
    rng = random.Random(seed)
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                models[n](x)
        for _ in range(runs):
            rng.shuffle(names)
            for n in names:
                started = time.perf_counter()
                models[n](x)
                times[n].append(time.perf_counter() - started)
    return {n: statistics.median(t) for n, t in times.items()}


def measure(paths, split, quick, runs, division=0, ratios=RATIOS):
    manifest = json.load(open(os.path.join(split, 'split.json')))
    classes = manifest['divisions'][division]['classes']
    models = {name: load_student(path, classes)[1] for name, path in paths.items()}
    val = datasets.build_dataset('fashion_mnist', split, 'val', division=division, in_chans=1, tiny=True)
    val = engine.limit(val, 300 if quick else None)
    loader = torch.utils.data.DataLoader(val, batch_size=500)
    torch.set_num_threads(1)
    acc = {name: engine.evaluate(m, loader, 'cpu')['acc1'] for name, m in models.items()}
    # Control for the importance ranking: the same shapes with heads and neurons drawn at random, without re-distilling.
    random_acc = {}
    for name, _, _ in ratios:
        shape = model_shape(models[name])
        accs = []
        for seed in range(RANDOM_SEEDS):
            rng = random.Random(seed)
            student = copy.deepcopy(models['unpruned'])
            full = model_shape(student)
            prune_(student, [sorted(rng.sample(range(f), k)) for f, k in zip(full['heads'], shape['heads'])],
                   [sorted(rng.sample(range(f), k)) for f, k in zip(full['hidden'], shape['hidden'])])
            accs.append(engine.evaluate(student, loader, 'cpu')['acc1'])
        random_acc[name] = statistics.mean(accs)
    x = torch.zeros(1, 1, 28, 28)
    rows = {}
    timed = {n: m for n, m in models.items() if not n.endswith('+re')}  # the re-distilled have the same shapes
    # REPEATS blocks of `runs` rounds: the median block's ratio is reported, with the spread over the blocks.
    blocks = [latency(timed, runs, seed=b) for b in range(REPEATS)]
    for name, m in timed.items():
        ratios = sorted(b[name] / b['unpruned'] for b in blocks)
        rows[name] = {'shape': model_shape(m), 'params': count_params(m), 'macs': count_macs(m, x),
                      'latency_ms': 1e3 * statistics.median(b[name] for b in blocks),
                      'latency_ratio': statistics.median(ratios), 'latency_ratio_range': [ratios[0], ratios[-1]],
                      'acc1': acc[name], 'acc1_random': random_acc.get(name), 'acc1_redistilled': acc[name + ' +re']}
    for r in rows.values():
        r['params_ratio'] = r['params'] / rows['unpruned']['params']
        r['macs_ratio'] = r['macs'] / rows['unpruned']['macs']
    return rows, len(val), classes


def row_cells(r):
    """The table cells of one measured row, from the heads column on."""
    return (f'{r["shape"]["heads"]} | {r["shape"]["hidden"]} | {r["params"] / 1e3:.1f}K ({r["params_ratio"]:.2f}) | '
            f'{r["macs"] / 1e6:.2f}M ({r["macs_ratio"]:.2f}) | {r["latency_ms"]:.3f} ms ({r["latency_ratio"]:.2f}, '
            f'{r["latency_ratio_range"][0]:.2f}-{r["latency_ratio_range"][1]:.2f}) | {r["acc1"]:.2f} | '
            f'{"-" if r["acc1_random"] is None else format(r["acc1_random"], ".2f")} | {r["acc1_redistilled"]:.2f} |')


TABLE_HEAD = ('heads per layer | MLP width per layer | params | MACs | latency (ratio) | top-1 pruned | '
              f'top-1 pruned at random ({RANDOM_SEEDS} seeds) | top-1 after re-distillation |')
LATENCY_NOTE = ('MACs = the paper\'s "FLOPs" (models.stats). Latency: CPU, batch 1, 1 thread, median of {runs} '
                'interleaved runs, as a ratio to the unpruned student measured in the same runs; median ratio of '
                f'{REPEATS} such blocks, and their range (the machine is shared). "after re-distillation" for the '
                'unpruned row is the control: the same extra epoch without pruning; "top-1 pruned" of the unpruned '
                'row is the student before shrinking. "at random": the same shapes with the kept heads and neurons '
                'drawn at random instead of by importance (mean over seeds, no re-distillation), a control for the '
                'ranking.')


def run_demo(work, args):
    paths, setup = train_demo(args.demo, work, args)
    started = time.time()
    divisions = {}
    for division, division_paths in paths.items():
        rows, test_images, classes = measure(division_paths, setup['split'], args.quick, args.runs, division,
                                             DEMO_RATIOS)
        divisions[division] = {'rows': rows, 'classes': classes, 'test_images': test_images}
    setup['measure_seconds'] = time.time() - started
    return {'divisions': divisions, 'setup': setup}


def markdown_demo(result):
    info = result['setup']
    kwargs = ' '.join(f'{k}={v}' for k, v in info['student_kwargs'].items())
    lines = [
        '# Shrinking the demo\'s students',
        '',
        f'Produced by `python bench/shrink_bench.py --demo {info["demo"]}` (shrinking and re-distillation '
        f'{info["train_seconds"]:.0f} s, measuring {info["measure_seconds"]:.0f} s on {info["machine"]}), on the four '
        f'students of that demo run (`{info["student"]}` {kwargs}). Accuracy: top-1 on each division\'s own test '
        'images (Fashion-MNIST). Shrinking keeps, in every layer, the given fraction of attention heads and of MLP '
        f'neurons ranked by importance E|dCE/dgate| on {info["importance_images"]} of the division\'s training '
        'images, removes the rest (rows/columns of qkv, proj, fc1, fc2), then re-distils for '
        f'{info["redistill_epochs"]} epoch from the division\'s sub-teacher (`shrink.py --redistill-epochs`, i.e. '
        '`distill_sub.py --load-shrink`, lr 5e-4).',
        '',
        LATENCY_NOTE.format(runs=info['latency_runs']),
        '',
        f'| division (classes) | student | {TABLE_HEAD}',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for division, d in result['divisions'].items():
        for name, r in d['rows'].items():
            lines.append(f'| {division} ({d["classes"]}) | {name} | {row_cells(r)}')
    lines.append('')
    return '\n'.join(lines)


def markdown(result):
    rows, info = result['rows'], result['setup']
    lines = [
        '# Shrinking a DeViT student (demo scale)',
        '',
        f'Produced by `python bench/shrink_bench.py` (training {info["train_seconds"]:.0f} s, measuring '
        f'{info["measure_seconds"]:.0f} s on {info["machine"]}). Fashion-MNIST, '
        f'division 0 of 4 (global classes {info["classes"]}'
        f'{": pullover, coat, shirt, the three hardest to tell apart" if info["classes"] == [2, 4, 6] else ""}), '
        f'{info["test_images"]} test images. Student `dedeit` {" ".join(STUDENT_KW)}, distilled for '
        f'{info["student_epochs"]} epochs ({info["train_images"]} training images per epoch) from a sub-teacher '
        f'`{TEACHER}` {" ".join(TEACHER_KW)} trained from scratch '
        f'for {info["sub_teacher_epochs"]} epochs. Shrinking keeps, in every layer, the given fraction of attention '
        f'heads and of MLP neurons ranked by importance E|dCE/dgate| on {info["importance_images"]} of the '
        'division\'s training images, removes '
        f'the rest (rows/columns of qkv, proj, fc1, fc2), then re-distils for {info["redistill_epochs"]} epoch '
        '(`distill_sub.py --load-shrink`).',
        '',
        LATENCY_NOTE.format(runs=info['latency_runs']),
        '',
        f'| student | {TABLE_HEAD}',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for name, r in rows.items():
        lines.append(f'| {name} | {row_cells(r)}')
    smallest = rows[RATIOS[-1][0]]
    lines += ['', 'At this size latency falls '
              f'less than MACs ({smallest["latency_ratio"]:.2f} vs {smallest["macs_ratio"]:.2f} at '
              f'{RATIOS[-1][0]}): the patch embedding, norms, softmax and per-op dispatch do not shrink.', '']
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--demo', default=None, metavar='OUT',
                        help='shrink the four students of a finished demo run in OUT (e.g. output/demo)')
    parser.add_argument('--quick', action='store_true', help='small slice and 1 epoch per stage (a smoke run)')
    parser.add_argument('--work-dir', default=None, help='keep the trained checkpoints here (default: a temp dir)')
    parser.add_argument('--markdown', default=None,
                        help='write the page to this file instead of docs/shrinking.md (none with --quick)')
    parser.add_argument('--json', default=None, help='also write the results as JSON')
    parser.add_argument('--reuse', action='store_true',
                        help='measure the checkpoints already in --work-dir (from an earlier run) without training')
    parser.add_argument('--runs', type=int, default=None, help='latency rounds (default 500, --quick 50)')
    parser.add_argument('--threads', type=int, default=1,
                        help='threads of each training process (1: this 2-core machine is shared)')
    parser.add_argument('--limit-train', type=int, default=None,
                        help='training images of the division used per epoch (default 6000 of 18000, --quick 512)')
    parser.add_argument('--teacher-epochs', type=int, default=None, help='sub-teacher epochs (default 3, --quick 1)')
    parser.add_argument('--student-epochs', type=int, default=None, help='student epochs (default 4, --quick 1)')
    parser.add_argument('--redistill-epochs', type=int, default=1, help='re-distillation (and control) epochs')
    parser.add_argument('--importance-batches', type=int, default=None,
                        help='of 128 images (default 40, --quick 2; --demo: of 256 images, default 20)')
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(DATA, 'train-images-idx3-ubyte.gz')):
        sys.exit(f'error: Fashion-MNIST not found in {DATA} (apt-get install dataset-fashion-mnist)')
    quick = {'runs': 50, 'limit_train': 512, 'teacher_epochs': 1, 'student_epochs': 1, 'importance_batches': 2}
    full = {'runs': 500, 'limit_train': 6000, 'teacher_epochs': 3, 'student_epochs': 4, 'importance_batches': 40}
    if args.demo:
        full['importance_batches'] = 20
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    runs = args.runs
    if args.reuse and not args.work_dir:
        parser.error('--reuse needs --work-dir')
    work = args.work_dir or tempfile.mkdtemp(prefix='devit-shrink-')
    os.makedirs(work, exist_ok=True)
    try:
        if args.demo:
            result = run_demo(work, args)
        else:
            paths, setup = train(work, args)
            started = time.time()
            rows, test_images, classes = measure(paths, os.path.join(work, 'split'), args.quick, runs)
            setup.update(measure_seconds=time.time() - started, test_images=test_images, classes=classes)
            result = {'rows': rows, 'setup': setup}
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result['setup'].update(latency_runs=runs, quick=args.quick, torch=torch.__version__,
                           machine=f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores')
    text = markdown_demo(result) if args.demo else markdown(result)
    print(text)
    if args.json:
        fileio.write_json_atomic(args.json, result)
    if args.markdown:
        fileio.write_text_atomic(args.markdown, text)
    elif not args.quick:  # the page's title is the docs page's own: the block starts below it
        try:
            fileio.replace_block(DOCS, 'shrink-demo' if args.demo else 'shrink', text.split('\n', 2)[2])
        except UsageError as err:
            print(f'error: {err}', file=sys.stderr)
            sys.exit(2)
    return result


if __name__ == '__main__':
    main()
