"""Stage 0 of DeViT: split a dataset into N class-disjoint sub-datasets.

    python3 splite_dataset.py --dataset cifar100 --data_path ./your_datasets --num_division 4 \\
        --output_path ./sub_datasets [--sub_classes 25 25 25 25] [--seed 0] [--overwrite] [--copy]

The class ids are shuffled with `--seed` and cut into `--num_division` groups (even sizes, or `--sub_classes`); each
group is kept in ascending id order, so `--num_division 1` labels classes exactly as the full dataset does.
Output: `OUT/split.json` and `OUT/sub-dataset{i}/`, which `datasets.build_dataset(name, OUT, split, division=i)`
reads with labels 0..k-1. ImageFolder sources become `sub-dataset{i}/{train,val}/<class>/` trees of hard links
(copies with `--copy`, or where the output is on another filesystem); array and annotation-file sources (CIFAR-100
pickles, Fashion-MNIST, Flowers102, StanfordCars) become `sub-dataset{i}/indices.json` = {"train": [...], "val":
[...]}, row numbers into the source split named by `source_path`.
Everything is written into a temporary folder beside OUT and renamed at the end, so a failed run leaves nothing.
"""
import argparse
import errno
import itertools
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from datasets import (
    DATASET_NAMES,
    MANIFEST,
    SPLITS,
    DatasetError,
    Samples,
    canonical_name,
    check_image_file,
    read_samples,
)

LINK_MODES = ('hardlink', 'copy')
# os.link fails with these where a link is impossible (another filesystem, no link support, link count limit).
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP}


class SplitError(ValueError):
    """Bad split input: the message is printed as one `error: ...` line."""


def plan_groups(num_classes: int, num_division: int, sub_classes=None, seed: int = 0) -> list:
    """Seeded shuffle of range(num_classes) cut into groups; each group sorted. Returns list of lists of ids."""
    if seed < 0:
        raise SplitError(f'--seed must be non-negative, got {seed}')
    if num_division < 1:
        raise SplitError(f'--num_division must be at least 1, got {num_division}')
    if num_division > num_classes:
        raise SplitError(f'--num_division {num_division} exceeds the {num_classes} classes of the dataset')
    if sub_classes:
        sizes = [int(k) for k in sub_classes]
        if len(sizes) != num_division:
            raise SplitError(f'--sub_classes has {len(sizes)} sizes but --num_division is {num_division}')
        if min(sizes) < 1:
            raise SplitError(f'--sub_classes sizes must be positive, got {" ".join(map(str, sizes))}')
        if sum(sizes) != num_classes:
            raise SplitError(f'--sub_classes sum to {sum(sizes)} but the dataset has {num_classes} classes')
    else:
        base, extra = divmod(num_classes, num_division)
        sizes = [base + (i < extra) for i in range(num_division)]
    perm = np.random.default_rng(seed).permutation(num_classes).tolist()
    bounds = np.cumsum([0] + sizes).tolist()
    return [sorted(perm[a:b]) for a, b in itertools.pairwise(bounds)]


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


def _materialise(samples: Samples, indices, dest_root: str, split: str, link_mode: str) -> tuple:
    """Link or copy the files of `indices` under dest_root/split/, keeping paths relative to the split root.

    Returns (files written, bytes copied, link_mode used): 'hardlink' falls back to 'copy' when os.link is refused.
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


def split_dataset(dataset: str, data_path: str, num_division: int, output_path: str, sub_classes=None, seed: int = 0,
                  overwrite: bool = False, link_mode: str = 'hardlink') -> dict:
    """Split `dataset` at `data_path` into `num_division` class-disjoint parts under `output_path`; return the manifest.

    link_mode: 'hardlink' (copy fallback across filesystems) or 'copy' for ImageFolder sources; array sources always
    store indices. The returned dict also has `stats` ({'bytes_copied', 'files'}), which is not written to split.json.
    Raises SplitError / DatasetError on bad input, before anything is written.
    """
    if link_mode not in LINK_MODES:
        raise SplitError(f'link_mode must be one of {LINK_MODES}, got {link_mode!r}')
    name = canonical_name(dataset)
    src, out = _check_paths(data_path, output_path, overwrite)
    samples = {s: read_samples(name, src, s) for s in SPLITS}
    class_names = samples['train'].class_names
    groups = plan_groups(len(class_names), num_division, sub_classes, seed)
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
        'num_classes': len(class_names), 'storage': storage,
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
    try:
        for i in range(num_division):
            sub = os.path.join(tmp, f'sub-dataset{i}')
            os.makedirs(sub)
            if storage == 'files':
                for s in SPLITS:
                    os.makedirs(os.path.join(sub, s), exist_ok=True)
                    n, nbytes, used = _materialise(samples[s], rows[s][i], sub, s, link_mode)
                    stats['files'] += n
                    stats['bytes_copied'] += nbytes
                    if used != link_mode:
                        link_mode = manifest['link_mode'] = used
            else:
                with open(os.path.join(sub, 'indices.json'), 'w') as f:
                    json.dump({s: rows[s][i].tolist() for s in SPLITS}, f)
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


def summary(manifest: dict, output_path: str) -> str:
    how = manifest['link_mode'] or 'index lists'
    lines = [(f'{manifest["dataset"]}: {manifest["num_classes"]} classes, seed {manifest["seed"]} -> '
             f'{manifest["num_division"]} divisions in {output_path} ({how})')]
    for d in manifest['divisions']:
        ids = ' '.join(map(str, d['classes'][:8])) + (' ...' if len(d['classes']) > 8 else '')
        lines.append(f'  {d["path"]}: {len(d["classes"]):>4} classes, train {d["train_count"]:>7}, '
                     f'val {d["val_count"]:>6}  [{ids}]')
    return '\n'.join(lines)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f'error: {message}\n')


def get_args_parser():
    p = _OneLineParser('Split a dataset into class-disjoint sub-datasets (DeViT stage 0)')
    p.add_argument('--dataset', required=True, help=f'one of {", ".join(DATASET_NAMES)}')
    p.add_argument('--data_path', '--data-path', dest='data_path', required=True)
    p.add_argument('--num_division', '--num-division', dest='num_division', type=int, required=True)
    p.add_argument('--output_path', '--output-path', dest='output_path', required=True)
    p.add_argument('--sub_classes', '--sub-classes', dest='sub_classes', type=int, nargs='+', default=None,
                   help='classes per division (uneven split); must sum to the class count')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --output_path')
    p.add_argument('--copy', action='store_true', help='copy files instead of hard-linking them (folder datasets)')
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        manifest = split_dataset(args.dataset, args.data_path, args.num_division, args.output_path,
                                 sub_classes=args.sub_classes, seed=args.seed, overwrite=args.overwrite,
                                 link_mode='copy' if args.copy else 'hardlink')
    except (SplitError, DatasetError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:
        print(f'error: writing {args.output_path} failed: {e}', file=sys.stderr)
        return 2
    print(summary(manifest, args.output_path))
    return 0


if __name__ == '__main__':
    sys.exit(main())
