"""The demo's report (`python demo_report.py`, whose docstring says what it writes): results.json, results.txt,
results.png, and with --docs the generated blocks of README.md and docs/results.md."""
import argparse
import io
import json
import os

import datasets
import fileio
import utils
from models.checkpoint import read_checkpoint
from models.ensemble_model import load_ensemble
from models.stats import count_params, ensemble_stats, teacher_stats

BEST = 'checkpoint.pth'


def checkpoint_summary(path):
    """(test accuracy as a fraction, params, MACs per image) of a stage-1/2 checkpoint."""
    state = read_checkpoint(path)
    args = state['args']
    kwargs = dict(args.get('model_kwargs') or {})
    stats = teacher_stats(args['model'], nb_classes=state['num_classes'], input_size=kwargs.pop('img_size', 224),
                          model_kwargs=kwargs)
    return {'acc': state['test_acc1'] / 100.0, 'params': stats['params'], 'flops': stats['flops']}


def division_summaries(folder, num_division):
    return [checkpoint_summary(os.path.join(utils.division_dir(folder, i), BEST)) for i in range(num_division)]


def split_summary(folder):
    """How a split grouped the classes: strategy, seed, confusion source and split, the groups (ids and names)."""
    manifest = datasets.read_manifest(folder, required=True)
    return {'strategy': manifest.get('strategy'), 'seed': manifest.get('seed'),
            'confusion_split': manifest.get('confusion_split'),
            'groups': [d['classes'] for d in manifest['divisions']],
            'group_names': [d['class_names'] for d in manifest['divisions']]}


def planned_summary(out, uniform_acc):
    """The planned decomposition of ``demo.sh --devices`` (OUT/planned), as ``planned_*`` keys; {} without one."""
    from collab.host import plan

    folder = os.path.join(out, 'planned')
    ensemble_path = os.path.join(folder, 'stage3', BEST)
    if not os.path.isfile(ensemble_path):
        return {}
    p = plan.read_plan(os.path.join(folder, 'plan.json'))
    n = len(p['devices'])
    sub_teachers = division_summaries(os.path.join(folder, 'stage1'), n)
    students = division_summaries(os.path.join(folder, 'stage2'), n)
    state = read_checkpoint(ensemble_path)
    ensemble = load_ensemble(state)
    acc = state['test_acc1'] / 100.0
    return {
        'planned_ensemble_acc': acc,
        'planned_minus_uniform_points': 100.0 * (acc - uniform_acc),
        'planned_ensemble_missing_acc': _missing(os.path.join(folder, 'stage3')),
        'planned_sub_teacher_acc': [s['acc'] for s in sub_teachers],
        'planned_student_acc': [s['acc'] for s in students],
        'planned_students': [{'device': d['name'], 'classes': d['num_classes'], 'width': d['width'],
                              'depth': d['depth'], 'params': s['params'], 'flops': s['flops']}
                             for d, s in zip(p['devices'], students)],
        'planned_params': {'ensemble': count_params(ensemble), 'students': sum(s['params'] for s in students)},
        'planned_flops': {'ensemble': ensemble_stats(ensemble)['flops']},
        'planned_split': split_summary(os.path.join(folder, 'split')),
        'plan': os.path.abspath(os.path.join(folder, 'plan.json')), 'plan_chosen': p['chosen'],
        'plan_predicted_ms': p['predicted_ms'], 'plan_uniform_predicted_ms': p['uniform']['predicted_ms'],
        'planned_ensemble_checkpoint': os.path.abspath(ensemble_path),
    }


def _missing(stage3):
    """Top-1 (fractions) with each device missing, from stage 3's --eval-missing file; None without one."""
    path = os.path.join(stage3, 'missing_devices.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [a / 100.0 for a in json.load(f)['missing']]


def build_report(out, seconds, command=None):
    teacher = checkpoint_summary(os.path.join(utils.division_dir(os.path.join(out, 'teacher'), 0), BEST))
    baseline = checkpoint_summary(os.path.join(utils.division_dir(os.path.join(out, 'baseline'), 0), BEST))
    manifest = datasets.read_manifest(os.path.join(out, 'stage2'), required=True)
    num_division = manifest['num_division']
    sub_teachers = division_summaries(os.path.join(out, 'stage1'), num_division)
    students = division_summaries(os.path.join(out, 'stage2'), num_division)
    ensemble_path = os.path.join(out, 'stage3', BEST)
    ensemble_state = read_checkpoint(ensemble_path)
    ensemble = load_ensemble(ensemble_state)
    ens_stats = ensemble_stats(ensemble)
    missing = _missing(os.path.join(out, 'stage3'))
    return {
        'teacher_acc': teacher['acc'],
        'ensemble_acc': ensemble_state['test_acc1'] / 100.0,
        'baseline_acc': baseline['acc'],
        'ensemble_missing_acc': missing,
        'sub_teacher_acc': [s['acc'] for s in sub_teachers],
        'student_acc': [s['acc'] for s in students],
        'seconds': seconds,
        'command': command,
        'ensemble_checkpoint': os.path.abspath(ensemble_path),
        'params': {'teacher': teacher['params'], 'sub_teacher': sub_teachers[0]['params'],
                   'student': students[0]['params'], 'ensemble': count_params(ensemble),
                   'baseline': baseline['params']},
        'flops': {'teacher': teacher['flops'], 'sub_teacher': sub_teachers[0]['flops'],
                  'student': students[0]['flops'], 'ensemble': ens_stats['flops'], 'baseline': baseline['flops']},
        'bytes_per_device_fp32': ens_stats['bytes_per_device_fp32'],
        'flops_convention': 'MACs per image (the paper/DeiT convention)',
        'num_division': num_division,
        'split': split_summary(os.path.join(out, f'split{num_division}')),
    } | planned_summary(out, ensemble_state['test_acc1'] / 100.0)


def format_table(report):
    p, f = report['params'], report['flops']
    rows = [('teacher (all 10 classes)', f'{100 * report["teacher_acc"]:.2f}', p['teacher'], f['teacher']),
            ('ensemble of students (all classes)', f'{100 * report["ensemble_acc"]:.2f}', p['ensemble'],
             f['ensemble']),
            ('baseline: one student, KD on all classes', f'{100 * report["baseline_acc"]:.2f}', p['baseline'],
             f['baseline'])]
    for i, (t, s) in enumerate(zip(report['sub_teacher_acc'], report['student_acc'])):
        rows.append((f'sub-teacher {i} (own classes)', f'{100 * t:.2f}', p['sub_teacher'], f['sub_teacher']))
        rows.append((f'student {i} (own classes)', f'{100 * s:.2f}', p['student'], f['student']))
    for i, acc in enumerate(report.get('ensemble_missing_acc') or []):
        rows.append((f'ensemble without device {i} (all classes)', f'{100 * acc:.2f}', p['ensemble'],
                     f['ensemble']))
    if 'planned_ensemble_acc' in report:
        pp, pf = report['planned_params'], report['planned_flops']
        rows.append((f'planned ensemble ({report["planned_minus_uniform_points"]:+.2f} vs uniform)',
                     f'{100 * report["planned_ensemble_acc"]:.2f}', pp['ensemble'], pf['ensemble']))
        for i, (s, acc) in enumerate(zip(report['planned_students'], report['planned_student_acc'])):
            rows.append((f'planned student {i}: {s["width"]}x{s["depth"]}, {s["classes"]} classes', f'{100 * acc:.2f}',
                         s['params'], s['flops']))
        for i, acc in enumerate(report.get('planned_ensemble_missing_acc') or []):
            rows.append((f'planned ensemble without device {i}', f'{100 * acc:.2f}', pp['ensemble'], pf['ensemble']))
    lines = [f'{"model":<42} {"top-1 %":>8} {"params":>10} {"MACs":>12}', '-' * 75]
    lines += [f'{name:<42} {acc:>8} {params:>10,} {flops:>12,}' for name, acc, params, flops in rows]
    split = report.get('split')
    if split:
        groups = ' / '.join(', '.join(g) for g in split['group_names'])
        lines.append(f'split: {split["strategy"]} (seed {split["seed"]}): {groups}')
    if 'planned_ensemble_acc' in report:
        groups = ' / '.join(', '.join(g) for g in report['planned_split']['group_names'])
        lines.append(f'planned split: {groups}; predicted latency {report["plan_predicted_ms"]:.2f} ms, uniform plan '
                     f'{report["plan_uniform_predicted_ms"]:.2f} ms ({report["plan"]})')
    lines.append(f'total time: {report["seconds"]:.0f} s; ensemble checkpoint: {report["ensemble_checkpoint"]}')
    return '\n'.join(lines)


def plot_report(report):
    """results.png as bytes: (left) top-1 of every model, (right) the ensemble with each device missing."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    from matplotlib import pyplot as plt

    n = report['num_division']
    names = ['teacher', 'ensemble', 'baseline'] + [f'student {i}' for i in range(n)]
    accs = [report['teacher_acc'], report['ensemble_acc'], report['baseline_acc'], *report['student_acc']]
    colours = ['tab:gray', 'tab:blue', 'tab:orange'] + ['tab:green'] * n
    if 'planned_ensemble_acc' in report:
        names.append('planned ensemble')
        accs.append(report['planned_ensemble_acc'])
        colours.append('tab:purple')
    missing = report.get('ensemble_missing_acc') or []
    fig, axes = plt.subplots(1, 2 if missing else 1, figsize=(10 if missing else 6, 4), squeeze=False,
                             gridspec_kw={'width_ratios': [3 + n, 1 + n] if missing else [1]})
    ax = axes[0][0]
    bars = ax.bar(names, [100 * a for a in accs], color=colours)
    ax.bar_label(bars, fmt='%.1f', fontsize=8)
    ax.set_ylabel('test top-1 (%)')
    ax.set_ylim(0, 105)
    ax.set_title('models (students: on their own classes)', fontsize=10)
    ax.tick_params(axis='x', rotation=30)
    if missing:
        ax = axes[0][1]
        labels = ['all'] + [f'no dev {i}' for i in range(len(missing))]
        bars = ax.bar(labels, [100 * report['ensemble_acc'], *(100 * a for a in missing)],
                      color=['tab:blue'] + ['tab:red'] * len(missing))
        ax.bar_label(bars, fmt='%.1f', fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title('ensemble, one device missing', fontsize=10)
        ax.tick_params(axis='x', rotation=30)
    fig.suptitle(f'DeViT demo: {n} devices, {report["seconds"]:.0f} s', fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser('Summarise the DeViT demo')
    parser.add_argument('--out', default='output/demo')
    parser.add_argument('--seconds', type=float, default=None,
                        help='wall time of the whole demo (default: the one OUT/results.json records, else 0)')
    parser.add_argument('--command', default=None,
                        help="the demo's command line, as the docs name it (default: the one OUT/results.json "
                             'records, else bash demo.sh)')
    parser.add_argument('--docs', action='store_true',
                        help='also write the tables into docs/results.md (and, for output/demo, README.md) and the '
                             'figure to docs/NAME.png, NAME the --out folder\'s name')
    args = parser.parse_args(argv)
    # A report made again (e.g. with --docs) keeps the wall time and the command line the demo recorded.
    earlier = recorded(args.out)
    seconds = earlier.get('seconds', 0.0) if args.seconds is None else args.seconds
    command = earlier.get('command') if args.command is None else args.command
    report = build_report(args.out, float(seconds or 0.0), command)
    table = format_table(report)
    fileio.write_json_atomic(os.path.join(args.out, 'results.json'), report)
    fileio.write_text_atomic(os.path.join(args.out, 'results.txt'), table + '\n')
    fileio.write_bytes_atomic(os.path.join(args.out, 'results.png'), plot_report(report))
    print(table)
    print(json.dumps({k: report[k] for k in ('teacher_acc', 'ensemble_acc', 'baseline_acc')}))
    if args.docs:
        write_docs(report, args.out)
    return report


# ----------------------------------------------------------------------------------------------------------------
# --docs: the demo's tables in the docs (generated blocks, fileio.replace_block) and its figure beside them

DOCS_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def recorded(out):
    """The OUT/results.json an earlier report wrote, else {}."""
    try:
        with open(os.path.join(out, 'results.json')) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _stage_args(out, stage):
    folder = os.path.join(out, stage)
    if stage != 'stage3':
        folder = utils.division_dir(folder, 0)
    with open(os.path.join(folder, 'args.json')) as f:
        return json.load(f)


def _shape(args):
    kwargs = args.get('model_kwargs') or {}
    return f"`{args['model']}` {' '.join(f'{k}={v}' for k, v in kwargs.items())}"


def docs_setup(out, report, short=False):
    """Where the figures come from: the command, data, models and epochs (read from each stage's args.json)."""
    teacher, stage2 = _stage_args(out, 'teacher'), _stage_args(out, 'stage2')
    manifest = datasets.read_manifest(os.path.join(out, 'stage2'), required=True)
    test = teacher.get('limit_val') or sum(d['val_count'] for d in manifest['divisions'])
    command = report.get('command') or ('bash demo.sh --quick' if teacher.get('limit_train') else 'bash demo.sh')
    command = f'`{command}`'
    data = (f", the first {teacher['limit_train']:,} training images per stage" if teacher.get('limit_train')
            else '')
    text = (f"{command} ({report['seconds']:.0f} s{data}): top-1 on {test:,} {manifest['dataset']} test images "
            '(sub-teachers and students: those of their own classes)')
    if not short:
        def epochs(args):
            return f"{args['epochs']} epoch{'s' if args['epochs'] != 1 else ''}"
        text += (f". Teacher {_shape(teacher)} from scratch, {epochs(teacher)}; sub-teachers "
                 f"{epochs(_stage_args(out, 'stage1'))}; students {_shape(stage2)}, {epochs(stage2)}; ensemble "
                 f"{epochs(_stage_args(out, 'stage3'))}; baseline {epochs(_stage_args(out, 'baseline'))}. MACs per "
                 'image (what the paper calls FLOPs)')
    return fileio.wrap_markdown(text + '.')


def docs_summary(report):
    """README's five rows: teacher, ensemble, baseline, the students, the ensemble with one device missing."""
    p, f, n = report['params'], report['flops'], report['num_division']
    pct = ' / '.join(f'{100 * a:.2f}' for a in report['student_acc'])
    rows = ['| model | top-1 % | params | MACs |', '|---|---:|---:|---:|',
            f"| teacher | {100 * report['teacher_acc']:.2f} | {p['teacher']:,} | {f['teacher'] / 1e6:.2f}M |",
            f"| ensemble of {n} students | {100 * report['ensemble_acc']:.2f} | {p['ensemble']:,} | "
            f"{f['ensemble'] / 1e6:.2f}M |",
            f"| baseline: one student, KD on all classes | {100 * report['baseline_acc']:.2f} | {p['baseline']:,} | "
            f"{f['baseline'] / 1e6:.2f}M |",
            f"| students {' / '.join(map(str, range(n)))} (own classes) | {pct} | {p['student']:,} each | "
            f"{f['student'] / 1e6:.2f}M each |"]
    missing = report.get('ensemble_missing_acc')
    rows.append(f"| ensemble with device {' / '.join(map(str, range(n)))} missing | "
                + (' / '.join(f'{100 * a:.2f}' for a in missing) if missing else 'not measured') + ' | | |')
    return '\n'.join(rows)


def docs_table(report, out):
    """docs/results.md: the figure (docs/NAME.png), then every model of the demo, each division with its classes."""
    p, f = report['params'], report['flops']
    manifest = datasets.read_manifest(os.path.join(out, 'stage2'), required=True)
    rows = ['| model | top-1 % | params | MACs |', '|---|---:|---:|---:|',
            f"| teacher (all classes) | {100 * report['teacher_acc']:.2f} | {p['teacher']:,} | {f['teacher']:,} |",
            f"| ensemble of {report['num_division']} students (all classes) | {100 * report['ensemble_acc']:.2f} | "
            f"{p['ensemble']:,} | {f['ensemble']:,} |",
            f"| baseline: one student, KD on all classes | {100 * report['baseline_acc']:.2f} | {p['baseline']:,} | "
            f"{f['baseline']:,} |"]
    for d, t, s in zip(manifest['divisions'], report['sub_teacher_acc'], report['student_acc']):
        names = ', '.join(d.get('class_names') or map(str, d['classes']))
        rows.append(f"| sub-teacher / student, division {d['index']} ({names}) | {100 * t:.2f} / {100 * s:.2f} | "
                    f"{p['sub_teacher']:,} / {p['student']:,} | {f['sub_teacher']:,} / {f['student']:,} |")
    for i, acc in enumerate(report.get('ensemble_missing_acc') or []):
        rows.append(f'| ensemble with device {i} missing (`--eval-missing`) | {100 * acc:.2f} | | |')
    if 'planned_ensemble_acc' in report:
        pp, pf = report['planned_params'], report['planned_flops']
        rows.append(f"| planned ensemble ({report['planned_minus_uniform_points']:+.2f} points against the uniform "
                    f"one) | {100 * report['planned_ensemble_acc']:.2f} | {pp['ensemble']:,} | {pf['ensemble']:,} |")
        for d, names, s, acc in zip(report['planned_students'], report['planned_split']['group_names'],
                                    report['planned_sub_teacher_acc'], report['planned_student_acc']):
            rows.append(f"| planned sub-teacher / student, {d['device']} ({', '.join(names)}; dedeit "
                        f"{d['width']}x{d['depth']}) | {100 * s:.2f} / {100 * acc:.2f} | {d['params']:,} | "
                        f"{d['flops']:,} |")
        for i, acc in enumerate(report.get('planned_ensemble_missing_acc') or []):
            rows.append(f'| planned ensemble with device {i} missing | {100 * acc:.2f} | | |')
    name = os.path.basename(os.path.normpath(out))
    text = (f"![{name}: top-1 of every model, and of the ensemble with one device missing]({name}.png)\n\n"
            + docs_setup(out, report) + '\n\n' + '\n'.join(rows))
    if 'planned_ensemble_acc' in report:
        text += '\n\n' + fileio.wrap_markdown(
            f"Predicted collaborative latency of the plan ({os.path.relpath(report['plan'], DOCS_ROOT)}): "
            f"{report['plan_predicted_ms']:.2f} ms, of the uniform plan {report['plan_uniform_predicted_ms']:.2f} ms "
            "(the profiles' estimates; the measured ratio on throttled CPUs is `hetero_plan_vs_uniform` in "
            '[benchmarks.md](benchmarks.md)).')
    return text


def docs_planned(report):
    """README's line on the planned decomposition of ``demo.sh --devices``."""
    shapes = ' / '.join(f"{d['width']}x{d['depth']}" for d in report['planned_students'])
    return (f"`bash demo.sh --devices` (two devices 4x slower than the other two): the planned ensemble (students "
            f"{shapes}) reaches {100 * report['planned_ensemble_acc']:.2f}% top-1, "
            f"{report['planned_minus_uniform_points']:+.2f} points against the uniform one "
            f"({100 * report['ensemble_acc']:.2f}%), for a predicted latency of {report['plan_predicted_ms']:.1f} ms "
            f"against {report['plan_uniform_predicted_ms']:.1f} ms.")


def write_docs(report, out, root=DOCS_ROOT):
    """The blocks NAME of docs/results.md (and, for NAME demo and a demo.sh --devices run, of README.md) and
    docs/NAME.png, NAME = --out's folder name (demo, demo-decct, demo-fleet)."""
    name = os.path.basename(os.path.normpath(out))
    edits = {os.path.join(root, 'docs', 'results.md'): {name: docs_table(report, out)}}
    if name == 'demo':
        edits[os.path.join(root, 'README.md')] = {name: docs_setup(out, report, short=True) + '\n\n'
                                                  + docs_summary(report)}
    elif 'planned_ensemble_acc' in report:
        edits[os.path.join(root, 'README.md')] = {name: fileio.wrap_markdown(docs_planned(report))}
    fileio.replace_blocks(edits)  # both pages or neither
    with open(os.path.join(out, 'results.png'), 'rb') as f:
        fileio.write_bytes_atomic(os.path.join(root, 'docs', f'{name}.png'), f.read())
    print(f'wrote the {name!r} blocks of the docs and docs/{name}.png')

