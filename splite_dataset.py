"""Stage 0 of DeViT: split a dataset into N class-disjoint sub-datasets.

    python3 splite_dataset.py --dataset cifar100 --data_path ./your_datasets --num_division 4 \\
        --output_path ./sub_datasets [--sub_classes 25 25 25 25] [--seed 42] [--overwrite] [--copy]
        [--strategy random|confusion-together|confusion-spread] [--confusion confusion.json]
        [--plan plan.json] [--teacher-path CKPT [--teacher-model NAME] [--teacher-kwargs k=v ...]
        [--confusion-split val|train]]
    python3 splite_dataset.py --dataset fashion_mnist --data_path DATA --teacher-path CKPT \\
        --write-confusion confusion.json --confusion-split train

Which classes form each division (module `grouping`):
- `--strategy random` (default) is the authors' split: Python's random.Random(seed) shuffles list(range(C)) and
  group i = labels[i*C//N:(i+1)*C//N] (`--seed 42` by default); `--sub_classes` cuts the same shuffled list at the
  cumulative sizes instead.
- `--strategy confusion-together` / `confusion-spread` group the classes so that the confusion of a trained
  full-class model between classes of the same group is as high / as low as the sizes allow. The matrix comes from
  `--confusion FILE.json` or is computed from `--teacher-path CKPT` (model name, kwargs, input size and transforms
  default to those the checkpoint was trained with; `--teacher-model`, `--teacher-kwargs`, `--input-size`,
  `--tiny-transforms` override them) on the images of `--confusion-split`: `val` (default) or `train` (the
  training images, through the eval transform). Where the validation split is the test set the accuracies are
  reported on (Fashion-MNIST, CIFAR-100), groups chosen from its confusions have seen its labels: use `train`
  (demo.sh and bench/strategies_bench.py do), so that no test label chooses the groups. `--write-confusion
  OUT.json` saves the matrix; without `--output_path` that is all the command does.
- `--plan plan.json` (written by plan.py) gives the class count of division i, `devices[i].num_classes`, and, where
  `devices[i].classes` is a list of class ids, exactly those classes; the strategy assigns the others.
  `--num_division` defaults to the plan's device count and must equal it when given.
Each group is kept in ascending id order, so `--num_division 1` labels classes exactly as the full dataset does.

confusion.json: {"format": "devit-confusion", "version": 1, "dataset", "split" ("val" or "train"), "classes": C,
"class_names", "checkpoint", "model", "model_kwargs", "images", "accuracy" (top-1, fraction), "matrix": C×C counts,
rows = true class, columns = predicted}; only "matrix" is required of a file written by other tools.

Output: `OUT/split.json` and `OUT/sub-dataset{i}/`, which `datasets.build_dataset(name, OUT, split, division=i)`
reads with labels 0..k-1. split.json: {"dataset", "num_division", "seed", "strategy", "plan" (path or null),
"confusion" (its source or null), "confusion_split" (the split it was counted on, or null), "confusion_within"
(share of the off-diagonal confusion inside divisions, or null), "divisions": [{"index", "classes", "class_names",
...}], ...}. ImageFolder sources become `sub-dataset{i}/{train,val}/<class>/` trees of hard links (copies with
`--copy`, or where the output is on another filesystem); array and annotation-file sources (CIFAR-100 pickles,
Fashion-MNIST, Flowers102, StanfordCars) become `sub-dataset{i}/indices.json` = {"train": [...], "val": [...]}, row
numbers into the source split named by `source_path`.
Everything is written into a temporary folder beside OUT and renamed at the end, so a failed run leaves nothing.
"""
import argparse
import errno
import json
import os
import shutil
import sys
import tempfile

import numpy as np

import cli
import fileio
import grouping
from datasets import DATASET_NAMES, MANIFEST, SPLITS, Samples, canonical_name, check_image_file, read_samples
from fileio import DatasetError, UsageError
from grouping import AUTHORS_SEED, STRATEGIES, GroupingError

LINK_MODES = ('hardlink', 'copy')
# os.link fails with these where a link is impossible (another filesystem, no link support, link count limit).
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP}
PLAN_FORMAT = 'devit-plan'
CONFUSION_SPLITS = ('val', 'train')  # the images a confusion matrix is counted on (--confusion-split)


class SplitError(ValueError):
    """Bad split input: the message is printed as one `error: ...` line."""


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SplitError(f'{what} {path} does not exist') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SplitError(f'{what} {path} is not readable JSON ({e})') from None


def read_plan(plan, num_classes: int, source: str = '<plan>') -> list:
    """[(num_classes, classes or None) per device] of a plan.json object, checked against the dataset."""
    if not isinstance(plan, dict) or not isinstance(plan.get('devices'), list) or not plan['devices']:
        raise SplitError(f'--plan {source} has no "devices" list')
    if plan.get('format', PLAN_FORMAT) != PLAN_FORMAT:
        raise SplitError(f'--plan {source} has format {plan["format"]!r}, expected {PLAN_FORMAT!r}')
    if plan.get('num_classes') not in (None, num_classes):
        raise SplitError(f'--plan {source} is for {plan["num_classes"]} classes but the dataset has {num_classes}')
    devices, taken = [], {}
    for i, d in enumerate(plan['devices']):
        k = d.get('num_classes') if isinstance(d, dict) else None
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SplitError(f'--plan {source}: device {i} needs a positive integer "num_classes", got {k!r}')
        if d.get('index', i) != i:
            raise SplitError(f'--plan {source}: device {i} has "index" {d["index"]}; devices must be listed in order')
        classes = d.get('classes')
        if classes is not None:
            if not isinstance(classes, list) or not all(isinstance(c, int) and not isinstance(c, bool)
                                                        for c in classes):
                raise SplitError(f'--plan {source}: device {i} "classes" must be a list of class ids or null')
            if len(classes) != k:
                raise SplitError(f'--plan {source}: device {i} lists {len(classes)} classes but "num_classes" is {k}')
            for c in classes:
                if not 0 <= c < num_classes:
                    raise SplitError(f'--plan {source}: device {i} lists class {c}, outside 0..{num_classes - 1}')
                if c in taken:
                    raise SplitError(f'--plan {source}: class {c} is listed by devices {taken[c]} and {i}')
                taken[c] = i
        devices.append((k, classes))
    total = sum(k for k, _ in devices)
    if total != num_classes:
        raise SplitError(f'--plan {source}: the devices\' class counts sum to {total} but the dataset has '
                         f'{num_classes} classes')
    return devices


def class_groups(num_classes: int, num_division: int | None = None, sub_classes=None, seed: int = AUTHORS_SEED,
                 strategy: str = 'random', confusion=None, plan=None) -> list:
    """The class ids of each division (lists, each sorted).

    Sizes: plan's `num_classes` per device, else `sub_classes`, else the authors' cut. Assignment: classes pinned by
    the plan stay where they are; the rest go by `strategy`: 'random' (random.Random(seed) shuffle cut at the
    sizes: the authors' groups when nothing is pinned), 'confusion-together' / 'confusion-spread'
    (grouping.confusion_groups on `confusion`, a C×C array). `plan`: the list from `read_plan`.
    """
    if seed < 0:
        raise SplitError(f'--seed must be non-negative, got {seed}')
    if strategy not in STRATEGIES:
        raise SplitError(f'--strategy must be one of {", ".join(STRATEGIES)}, got {strategy!r}')
    if plan is not None:
        if sub_classes:
            raise SplitError('--plan gives the class count of every division; do not pass --sub_classes with it')
        if num_division is not None and num_division != len(plan):
            raise SplitError(f'--plan has {len(plan)} devices but --num_division is {num_division}')
        num_division = len(plan)
    if num_division is None:
        raise SplitError('--num_division is required (or --plan)')
    if num_division < 1:
        raise SplitError(f'--num_division must be at least 1, got {num_division}')
    if num_division > num_classes:
        raise SplitError(f'--num_division {num_division} exceeds the {num_classes} classes of the dataset')
    if plan is not None:
        sizes, pinned = [k for k, _ in plan], [c for _, c in plan]
    elif sub_classes:
        sizes = [int(k) for k in sub_classes]
        if len(sizes) != num_division:
            raise SplitError(f'--sub_classes has {len(sizes)} sizes but --num_division is {num_division}')
        if min(sizes) < 1:
            raise SplitError(f'--sub_classes sizes must be positive, got {" ".join(map(str, sizes))}')
        if sum(sizes) != num_classes:
            raise SplitError(f'--sub_classes sum to {sum(sizes)} but the dataset has {num_classes} classes')
        pinned = [None] * num_division
    else:
        sizes, pinned = grouping.authors_sizes(num_classes, num_division), [None] * num_division
    free = [i for i, p in enumerate(pinned) if p is None]
    taken = {c for p in pinned if p is not None for c in p}
    rest = [c for c in range(num_classes) if c not in taken]
    free_sizes = [sizes[i] for i in free]
    if not free:
        assigned = []
    elif strategy == 'random':
        assigned = grouping.random_groups(rest, free_sizes, seed)
    else:
        if confusion is None:
            raise SplitError(f'--strategy {strategy} needs a confusion matrix: --confusion FILE.json or '
                             f'--teacher-path CKPT')
        sub = np.asarray(confusion, dtype=np.float64)[np.ix_(rest, rest)]
        local = grouping.confusion_groups(sub, free_sizes, together=strategy == 'confusion-together')
        assigned = [[rest[j] for j in g] for g in local]
    groups = [sorted(p) if p is not None else None for p in pinned]
    for i, g in zip(free, assigned, strict=True):
        groups[i] = g
    return groups


def _check_paths(data_path: str, output_path: str, overwrite: bool) -> tuple:
    src, out = os.path.realpath(data_path), os.path.realpath(output_path)
    if not os.path.isdir(src):
        raise SplitError(f'--data_path {data_path} does not exist or is not a directory')
    if out == src or src.startswith(out + os.sep):
        raise SplitError(f'--output_path {output_path} would contain the source --data_path {data_path}')
    if any(out == d or out.startswith(d + os.sep) for d in (os.path.join(src, s) for s in ('train', 'val', 'test'))):
        raise SplitError(f'--output_path {output_path} is inside the class folders of --data_path {data_path}')
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise SplitError(f'--output_path {output_path} exists and is not a directory')
        if os.listdir(out) and not overwrite:
            raise SplitError(f'--output_path {output_path} exists and is not empty; pass --overwrite to replace it')
    return src, out


def _materialise(samples: Samples, indices, dest_root: str, split: str, link_mode: str, done=None) -> tuple:
    """Link or copy the files of `indices` under dest_root/split/, keeping paths relative to the split root.

    Returns (files written, bytes copied, link_mode used): 'hardlink' falls back to 'copy' when os.link is refused.
    `done` (if given) is called once a file.
    """
    copied, made = 0, set()
    cut, prefix = len(samples.folder_root), os.path.join(dest_root, split)  # files all start with folder_root
    for i in indices:
        src = samples.files[i]
        dst = prefix + src[cut:]
        d = dst.rpartition(os.sep)[0]
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        if done is not None:
            done()
        if link_mode == 'hardlink':
            try:
                os.link(src, dst)
                continue
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise
                link_mode = 'copy'
        shutil.copyfile(src, dst)
        copied += os.path.getsize(dst)
    return len(indices), copied, link_mode


def load_confusion(confusion, strategy: str, dataset: str, class_names: list, expected_split: str | None = None
                   ) -> tuple:
    """(checked C×C matrix or None, its source: a path or the checkpoint it was computed from, the split it was
    counted on or None where the file does not say) for `strategy`. expected_split: refuse a matrix that says it
    was counted on another split."""
    if strategy == 'random':
        if confusion is not None:
            raise SplitError('--confusion and --teacher-path are used by --strategy confusion-together or '
                             'confusion-spread only (or --write-confusion)')
        return None, None, None
    if confusion is None:
        raise SplitError(f'--strategy {strategy} needs a confusion matrix: --confusion FILE.json or '
                         f'--teacher-path CKPT')
    if isinstance(confusion, (str, os.PathLike)):
        source, obj = os.path.abspath(confusion), _read_json(os.fspath(confusion), '--confusion')
    else:
        source, obj = confusion.get('checkpoint'), confusion
    try:
        matrix = grouping.confusion_from_json(obj, len(class_names), source or '<confusion>', dataset, class_names)
    except GroupingError as e:
        raise SplitError(str(e)) from None
    split = obj.get('split') if isinstance(obj, dict) else None
    if expected_split is not None and split is not None and split != expected_split:
        raise SplitError(f'--confusion-split {expected_split}, but the confusion matrix {source or ""} was counted '
                         f'on the {split} split')
    return matrix, source, split


def split_dataset(dataset: str, data_path: str, num_division: int | None, output_path: str, sub_classes=None,
                  seed: int = AUTHORS_SEED, overwrite: bool = False, link_mode: str = 'hardlink',
                  strategy: str = 'random', confusion=None, plan: str | None = None,
                  confusion_split: str | None = None, progress: bool = False) -> dict:
    """Split `dataset` at `data_path` into `num_division` class-disjoint parts under `output_path`; return the manifest.

    link_mode: 'hardlink' (copy fallback across filesystems) or 'copy' for ImageFolder sources; array sources always
    store indices. strategy / seed / sub_classes: see `class_groups`. confusion: a confusion.json path or its loaded
    object (needed by the confusion strategies only); confusion_split: the split it must have been counted on (None:
    any). plan: a plan.json path; num_division may then be None. progress: a bar of the files written
    (cli.progress). The returned dict also has `stats`
    ({'bytes_copied', 'files'}), which is not written to split.json. Raises SplitError / DatasetError on bad input,
    before anything is written.
    """
    if link_mode not in LINK_MODES:
        raise SplitError(f'link_mode must be one of {LINK_MODES}, got {link_mode!r}')
    name = canonical_name(dataset)
    src, out = _check_paths(data_path, output_path, overwrite)
    samples = {s: read_samples(name, src, s) for s in SPLITS}
    class_names = samples['train'].class_names
    num_classes = len(class_names)
    devices = read_plan(_read_json(plan, '--plan'), num_classes, plan) if plan is not None else None
    matrix, confusion_source, confusion_split = load_confusion(confusion, strategy, name, class_names,
                                                               confusion_split)
    groups = class_groups(num_classes, num_division, sub_classes, seed, strategy, matrix, devices)
    num_division = len(groups)
    storage = samples['train'].storage
    if samples['train'].files is not None:  # fail on an unreadable image now, not in the middle of training
        for s in SPLITS:
            for f in samples[s].files:
                check_image_file(f)

    # Row numbers of each division, in source order.
    group_of = np.empty(len(class_names), dtype=np.int64)
    for i, g in enumerate(groups):
        group_of[g] = i
    rows = {s: [np.flatnonzero(group_of[samples[s].targets] == i) for i in range(num_division)] for s in SPLITS}

    manifest = {
        'format_version': 1, 'dataset': name, 'source_path': src, 'seed': int(seed), 'num_division': num_division,
        'num_classes': num_classes, 'strategy': strategy, 'plan': os.path.abspath(plan) if plan is not None else None,
        'confusion': confusion_source, 'confusion_split': confusion_split,
        'confusion_within': grouping.within_confusion(matrix, groups) if matrix is not None else None,
        'storage': storage,
        'link_mode': link_mode if storage == 'files' else None,
        'divisions': [{'index': i, 'classes': g, 'class_names': [class_names[c] for c in g],
                       'local_to_global': g, 'train_count': len(rows['train'][i]),
                       'val_count': len(rows['val'][i]), 'path': f'sub-dataset{i}'}
                      for i, g in enumerate(groups)],
    }
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.tmp-')
    stats = {'files': 0, 'bytes_copied': 0}
    bar = cli.progress(total=sum(len(r) for s in SPLITS for r in rows[s]), enabled=progress and storage == 'files',
                       desc='split', unit='file')
    try:
        for i in range(num_division):
            sub = os.path.join(tmp, f'sub-dataset{i}')
            os.makedirs(sub)
            if storage == 'files':
                for s in SPLITS:
                    os.makedirs(os.path.join(sub, s), exist_ok=True)
                    n, nbytes, used = _materialise(samples[s], rows[s][i], sub, s, link_mode, bar.update)
                    stats['files'] += n
                    stats['bytes_copied'] += nbytes
                    if used != link_mode:
                        link_mode = manifest['link_mode'] = used
            else:
                with open(os.path.join(sub, 'indices.json'), 'w') as f:
                    json.dump({s: rows[s][i].tolist() for s in SPLITS}, f)
        bar.close()
        with open(os.path.join(tmp, MANIFEST), 'w') as f:
            json.dump(manifest, f, indent=1)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if os.path.isdir(out):  # empty, or --overwrite: move it aside, put the new one in place, then delete it
            trash = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.old-')
            os.rename(out, os.path.join(trash, 'old'))
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(os.path.join(trash, 'old'), out)
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, 'stats': stats}


def compute_confusion(dataset: str, data_path: str, teacher_path: str, teacher_model: str | None = None,
                      teacher_kwargs: dict | None = None, input_size: int | None = None, batch_size: int = 256,
                      tiny: bool | None = None, split: str = 'val') -> dict:
    """The confusion.json object of a full-class checkpoint on split `split` ('val' or 'train') of `dataset` at
    `data_path`.

    A plain eval loop (the eval transform on either split, no augmentation, argmax of `model(x)`). 'train' counts
    the model's confusions on its own training images, so that no validation (test) label takes part in choosing
    the groups. teacher_model / teacher_kwargs / input_size / tiny default to the `args` the checkpoint was trained
    with (train_subdata.py records them). Raises SplitError for a checkpoint that is unreadable, does not fit the
    model, or has other classes.
    """
    if split not in CONFUSION_SPLITS:
        raise SplitError(f'--confusion-split must be one of {", ".join(CONFUSION_SPLITS)}, got {split!r}')
    import torch
    from torch.utils.data import DataLoader

    from data_transforms import build_transform
    from datasets import ArrayDataset, FileDataset
    from models import factory
    from models.checkpoint import CheckpointError, extract_state_dict, load_state_dict_checked, read_checkpoint

    name = canonical_name(dataset)
    class_names = read_samples(name, data_path, 'val').class_names
    num_classes = len(class_names)
    try:
        state = read_checkpoint(teacher_path)
        trained = state.get('args') if isinstance(state.get('args'), dict) else {}
        if state.get('classes') is not None and list(state['classes']) != list(range(num_classes)):
            raise SplitError(f'--teacher-path {teacher_path} was trained on classes {list(state["classes"])[:8]}..., '
                             f'not on all {num_classes} classes of {name} in their global order')
        model_name = teacher_model or trained.get('model')
        if not model_name:
            raise SplitError(f'--teacher-model is required: {teacher_path} does not record its model')
        if teacher_kwargs is None:
            teacher_kwargs = (trained.get('model_kwargs') or {}) if model_name == trained.get('model') else {}
        input_size = input_size or trained.get('input_size')
        tiny = bool(trained.get('tiny_transforms')) if tiny is None else tiny
        model = factory.create_model(model_name, num_classes, teacher_kwargs, input_size)
        load_state_dict_checked(model, extract_state_dict(state, source=teacher_path), reset_head=False,
                                what='teacher', source=teacher_path)
        size, chans = factory.input_spec(model)
    except (UsageError, CheckpointError) as e:
        raise SplitError(str(e)) from None
    del state
    samples = read_samples(name, data_path, split)
    transform = build_transform(False, size, chans, tiny)
    identity = list(range(num_classes))
    data = (ArrayDataset(samples, transform, identity) if samples.images is not None
            else FileDataset(samples, transform, identity))
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model.to(device).eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    with torch.inference_mode():
        for images, targets in DataLoader(data, batch_size=batch_size, shuffle=False):
            predicted = model(images.to(device)).argmax(dim=1).cpu()
            counts += torch.bincount(targets * num_classes + predicted, minlength=num_classes * num_classes)
    matrix = counts.view(num_classes, num_classes)
    images = int(matrix.sum())
    return {'format': grouping.CONFUSION_FORMAT, 'version': 1, 'dataset': name, 'split': split,
            'classes': num_classes, 'class_names': class_names, 'checkpoint': os.path.abspath(teacher_path),
            'model': model_name, 'model_kwargs': teacher_kwargs, 'images': images,
            'accuracy': float(matrix.diagonal().sum()) / max(images, 1), 'matrix': matrix.tolist()}


def write_confusion(path: str, confusion: dict) -> None:
    """Write a confusion.json object atomically, one matrix row a line."""
    head = json.dumps({k: v for k, v in confusion.items() if k != 'matrix'}, indent=1, default=str)
    rows = ',\n'.join('  ' + json.dumps(r) for r in confusion['matrix'])
    fileio.write_text_atomic(path, head[:-2] + ',\n "matrix": [\n' + rows + '\n ]\n}\n')


def summary(manifest: dict, output_path: str) -> str:
    how = manifest['link_mode'] or 'index lists'
    strategy = f'strategy {manifest["strategy"]}, seed {manifest["seed"]}'
    if manifest.get('confusion_within') is not None:
        strategy = f'strategy {manifest["strategy"]} ({100 * manifest["confusion_within"]:.1f}% of the confusion ' \
                   f'inside groups)'
    if manifest.get('plan'):
        strategy += f', plan {manifest["plan"]}'
    lines = [(f'{manifest["dataset"]}: {manifest["num_classes"]} classes, {strategy} -> '
             f'{manifest["num_division"]} divisions in {output_path} ({how})')]
    for d in manifest['divisions']:
        ids = ' '.join(map(str, d['classes'][:8])) + (' ...' if len(d['classes']) > 8 else '')
        lines.append(f'  {d["path"]}: {len(d["classes"]):>4} classes, train {d["train_count"]:>7}, '
                     f'val {d["val_count"]:>6}  [{ids}]')
    return '\n'.join(lines)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f'error: {message}\n')


class _Kwargs(argparse.Action):
    """cli.ParseKwargs (`k=v ...`), imported only when the flag is used: the split itself stays light."""

    def __call__(self, parser, namespace, values, option_string=None):
        from cli import ParseKwargs

        ParseKwargs.__call__(self, parser, namespace, values, option_string)


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def get_args_parser():
    p = _OneLineParser('Split a dataset into class-disjoint sub-datasets (DeViT stage 0)')
    p.add_argument('--dataset', required=True, help=f'one of {", ".join(DATASET_NAMES)}')
    p.add_argument('--data_path', '--data-path', dest='data_path', required=True)
    p.add_argument('--num_division', '--num-division', dest='num_division', type=int, default=None,
                   help='number of divisions (default with --plan: its device count)')
    p.add_argument('--output_path', '--output-path', dest='output_path', default=None,
                   help='the split folder (required unless --write-confusion alone is wanted)')
    p.add_argument('--sub_classes', '--sub-classes', dest='sub_classes', type=int, nargs='+', default=None,
                   help='classes per division (uneven split); must sum to the class count')
    p.add_argument('--seed', type=int, default=AUTHORS_SEED, help='seed of the random strategy (the authors\': 42)')
    p.add_argument('--strategy', choices=STRATEGIES, default='random',
                   help='random: the authors\' seeded shuffle; confusion-together / confusion-spread: confusable '
                        'classes in the same division / in different divisions')
    p.add_argument('--plan', default=None, help='plan.json of plan.py: classes per division (and pinned classes)')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --output_path')
    p.add_argument('--copy', action='store_true', help='copy files instead of hard-linking them (folder datasets)')
    cli.add_progress_flag(p)
    g = p.add_argument_group('confusion matrix (the confusion strategies)')
    g.add_argument('--confusion', default=None, help='a saved confusion.json')
    g.add_argument('--teacher-path', default=None,
                   help='a full-class checkpoint: compute the matrix on the images of --confusion-split')
    g.add_argument('--teacher-model', default=None, help='its timm model (default: recorded in the checkpoint)')
    g.add_argument('--teacher-kwargs', nargs='*', default=None, action=_Kwargs, metavar='KEY=VALUE',
                   help='its model kwargs (default: recorded in the checkpoint)')
    g.add_argument('--input-size', type=_positive, default=None)
    g.add_argument('--tiny-transforms', action='store_true', default=None,
                   help='plain eval transform (default: as the checkpoint was trained)')
    g.add_argument('--batch-size', type=_positive, default=256, help='evaluation batch size')
    g.add_argument('--confusion-split', choices=CONFUSION_SPLITS, default=None,
                   help='the images --teacher-path\'s matrix is counted on: val (default) or train (no test label '
                        'chooses the groups where val is the test set); with --confusion, the split the file must '
                        'say it was counted on')
    g.add_argument('--write-confusion', default=None, metavar='OUT.json',
                   help='save the matrix computed from --teacher-path (alone: no split)')
    return p


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.output_path is None and args.write_confusion is None:
        parser.error('the following arguments are required: --output_path')
    if args.output_path is not None and args.num_division is None and args.plan is None:
        parser.error('the following arguments are required: --num_division (or --plan)')
    target = args.output_path
    try:
        if args.write_confusion is not None and args.teacher_path is None:
            raise SplitError('--write-confusion needs --teacher-path CKPT, the model to compute the matrix from')
        if args.confusion is not None and args.teacher_path is not None:
            raise SplitError('give --confusion FILE.json or --teacher-path CKPT, not both')
        if args.confusion_split is not None and args.confusion is None and args.teacher_path is None:
            raise SplitError('--confusion-split is for the matrix of --teacher-path CKPT (or a check of --confusion '
                             'FILE.json)')
        if args.output_path is not None:  # refuse a bad output folder before the (possibly long) evaluation
            _check_paths(args.data_path, args.output_path, args.overwrite)
        confusion = args.confusion
        if args.teacher_path is not None:
            if args.output_path is not None and args.strategy == 'random' and args.write_confusion is None:
                raise SplitError('--teacher-path is used by --strategy confusion-together or confusion-spread only '
                                 '(or --write-confusion)')
            confusion = compute_confusion(args.dataset, args.data_path, args.teacher_path, args.teacher_model,
                                          args.teacher_kwargs, args.input_size, args.batch_size, args.tiny_transforms,
                                          args.confusion_split or 'val')
            if args.write_confusion is not None:
                target = args.write_confusion
                write_confusion(args.write_confusion, confusion)
                print(f'{args.write_confusion}: confusion of {confusion["checkpoint"]} on {confusion["images"]} '
                      f'{confusion["dataset"]} {confusion["split"]} images (top-1 {100 * confusion["accuracy"]:.2f}%)')
            if args.output_path is None:
                return 0
            if args.strategy == 'random':  # only written, not used
                confusion = None
        target = args.output_path
        manifest = split_dataset(args.dataset, args.data_path, args.num_division, args.output_path,
                                 sub_classes=args.sub_classes, seed=args.seed, overwrite=args.overwrite,
                                 link_mode='copy' if args.copy else 'hardlink', strategy=args.strategy,
                                 confusion=confusion, plan=args.plan, confusion_split=args.confusion_split,
                                 progress=not args.no_progress)
    except (SplitError, DatasetError, GroupingError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:
        print(f'error: writing {target} failed: {e}', file=sys.stderr)
        return 2
    print(summary(manifest, args.output_path))
    return 0


if __name__ == '__main__':
    sys.exit(main())
