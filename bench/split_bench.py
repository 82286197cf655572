"""Benchmark: materialising an ImageFolder split with hard links vs copying the files.

    python bench/split_bench.py [--quick] [--files 20000] [--file-kb 110] [--json bench/split.json] [--scaling]

Writes a synthetic ImageFolder tree (valid JPEG headers, `--file-kb` KB per file: 110 KB is ImageNet's mean JPEG
size) into a temporary folder, then times `splite_dataset.split_dataset` end to end (listing, image header checks,
manifest and the tree of files) with link_mode='hardlink' and with link_mode='copy'. ratio = copy seconds / link
seconds, the median of `--repeats` alternating runs, each after os.sync() so that writes from before it are not
flushed inside it (copies that outgrow the dirty page cache do pay for their own flushing). `--scaling` also times
both modes on 1k, 10k and 100k small files to show that the cost grows linearly with the file count.
"""
import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fileio
from splite_dataset import split_dataset

TARGET = 10.0


def jpeg_payloads(file_bytes: int, variants: int = 8, seed: int = 0) -> list:
    """`variants` byte strings of about `file_bytes` each: a small real noise JPEG, padded after its end marker."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(variants):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, 'JPEG')
        head = buf.getvalue()
        out.append(head + rng.bytes(max(0, file_bytes - len(head))))
    return out


def make_tree(root: str, num_files: int, num_classes: int, file_bytes: int, val_fraction: float = 0.1) -> int:
    """root/{train,val}/class{k}/{i}.jpg with num_files files in all; returns the bytes written."""
    payloads = jpeg_payloads(file_bytes)
    n_val = int(num_files * val_fraction)
    written = 0
    for split, n in (('train', num_files - n_val), ('val', n_val)):
        for k in range(num_classes):
            os.makedirs(os.path.join(root, split, f'class{k}'), exist_ok=True)
        for i in range(n):
            data = payloads[i % len(payloads)]
            with open(os.path.join(root, split, f'class{i % num_classes}', f'{i}.jpg'), 'wb') as f:
                f.write(data)
            written += len(data)
    return written


def time_split(src: str, out: str, link_mode: str, num_division: int) -> tuple:
    os.sync()  # start from a clean page cache state: earlier writes must not be flushed inside this timing
    start = time.perf_counter()
    m = split_dataset('folder', src, num_division, out, link_mode=link_mode)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds, m['stats']


def compare(workdir: str, num_files: int, file_kb: float, num_classes: int, num_division: int, repeats: int) -> dict:
    """Median seconds of `repeats` alternating hard-link and copy splits of one generated tree."""
    src = os.path.join(workdir, f'src-{num_files}')
    tree_bytes = make_tree(src, num_files, num_classes, int(file_kb * 1024))
    split_dataset('folder', src, num_division, os.path.join(workdir, 'warm'))  # warm the dentry and page caches
    shutil.rmtree(os.path.join(workdir, 'warm'))
    runs = {'hardlink': [], 'copy': []}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(time_split(src, os.path.join(workdir, mode), mode, num_division))
    shutil.rmtree(src)
    link_s, link_stats = float(np.median([s for s, _ in runs['hardlink']])), runs['hardlink'][0][1]
    copy_s, copy_stats = float(np.median([s for s, _ in runs['copy']])), runs['copy'][0][1]
    return {'files': link_stats['files'], 'file_kb': file_kb, 'tree_bytes': tree_bytes, 'repeats': repeats,
            'link_seconds': link_s, 'copy_seconds': copy_s, 'ratio': copy_s / link_s,
            'link_bytes_copied': link_stats['bytes_copied'], 'copy_bytes_copied': copy_stats['bytes_copied'],
            'link_us_per_file': 1e6 * link_s / link_stats['files'],
            'copy_us_per_file': 1e6 * copy_s / copy_stats['files']}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='2,000 files (and 1k/5k/10k for --scaling)')
    p.add_argument('--files', type=int, default=None, help='files in the tree (default 20000, 2000 with --quick)')
    p.add_argument('--file-kb', type=float, default=110.0, help='size of each file in KB (ImageNet mean: ~110)')
    p.add_argument('--classes', type=int, default=100)
    p.add_argument('--repeats', type=int, default=3, help='timed runs per mode; the median is reported')
    p.add_argument('--num-division', type=int, default=4)
    p.add_argument('--scaling', action='store_true', help='also time 1k, 10k and 100k files')
    p.add_argument('--scaling-file-kb', type=float, default=2.0, help='file size for --scaling (CIFAR-like PNGs)')
    p.add_argument('--tmp', default=None, help='where to build the trees (default: the system temp dir)')
    p.add_argument('--json', default=None, help='write {"split_link_vs_copy": {...}} here (merged into a dict file)')
    args = p.parse_args(argv)
    num_files = args.files or (2000 if args.quick else 20000)

    workdir = tempfile.mkdtemp(prefix='devit-bench-split-', dir=args.tmp)
    try:
        r = compare(workdir, num_files, args.file_kb, args.classes, args.num_division, args.repeats)
        print(f'{r["files"]} files of {args.file_kb:g} KB: hardlink {r["link_seconds"]:.2f} s '
              f'({r["link_us_per_file"]:.0f} us/file, {r["link_bytes_copied"]} bytes copied), copy '
              f'{r["copy_seconds"]:.2f} s ({r["copy_us_per_file"]:.0f} us/file, '
              f'{r["copy_bytes_copied"] / 1e6:.1f} MB copied): ratio {r["ratio"]:.1f} (target {TARGET:g})')
        scaling = []
        if args.scaling:
            counts = (1000, 5000, 10000) if args.quick else (1000, 10000, 100000)
            for n in counts:
                s = compare(workdir, n, args.scaling_file_kb, args.classes, args.num_division, args.repeats)
                scaling.append({k: s[k] for k in ('files', 'link_seconds', 'copy_seconds', 'link_us_per_file',
                                                  'copy_us_per_file', 'ratio')})
                print(f'  scaling {s["files"]:>7} files of {args.scaling_file_kb:g} KB: hardlink '
                      f'{s["link_seconds"]:6.2f} s ({s["link_us_per_file"]:4.0f} us/file), copy '
                      f'{s["copy_seconds"]:6.2f} s ({s["copy_us_per_file"]:4.0f} us/file), ratio {s["ratio"]:.1f}')
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {'ratio': round(r['ratio'], 3), 'target': TARGET,
              'what': (f'splite_dataset.py on an ImageFolder of {r["files"]} files x {args.file_kb:g} KB, copy time / '
                       f'hard-link time (whole split: listing, header checks, manifest, tree); hard links copy '
                       f'{r["link_bytes_copied"]} bytes vs {r["copy_bytes_copied"]} for copy'),
              'details': {**r, 'scaling': scaling}}
    if args.json:
        doc = {}
        if os.path.isfile(args.json):
            with open(args.json) as f:
                doc = json.load(f)
        doc['split_link_vs_copy'] = result
        fileio.write_json_atomic(args.json, doc)
    return result


if __name__ == '__main__':
    main()
