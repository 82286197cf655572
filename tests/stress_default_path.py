"""Stress run of the default data path: stage 1 under ``torch.distributed.launch --nproc_per_node=2 ... --use_env``
with the DeiT recipe and the default loader workers (8 per loader, from the fork server), repeated.

    .venv/bin/python tests/stress_default_path.py                 # 20 runs
    .venv/bin/python tests/stress_default_path.py --reps 5 --skip-bad-images --num-workers 1

Each run trains both divisions of a 10-class RGB ImageFolder split (24 training PNGs per class) for two epochs,
so that persistent training workers and the evaluation loader's workers meet across epochs. A run still going
after ``--timeout`` seconds is a hang: tests/helpers.run then dumps the traceback of every process under it
(launcher, ranks, loader workers). Prints one line per run and ``passed K/N``; exit status 1 unless all passed.
``--skip-bad-images`` adds a truncated PNG and the flag (workers then print a warning line per skip), the setting
of tests/test_faults_data.py::test_skip_bad_images_logs_counts_and_trains.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import launch_cmd, read_log, run, write_rgb_folder  # noqa: E402

MODEL = ['--model', 'deit_tiny_distilled_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=8',
         'embed_dim=32', 'depth=1', 'num_heads=2']


def prepare(work, skip_bad):
    data = write_rgb_folder(os.path.join(work, 'data'), num_classes=10, n_train=24, n_val=6)
    split = os.path.join(work, 'split')
    run(launch_cmd('splite_dataset.py', '--dataset', 'folder', '--data_path', data, '--num_division', '2',
                   '--output_path', split, launcher='python'))
    if skip_bad:  # after the split (which refuses unreadable files): half of one training PNG
        folder = os.path.join(split, 'sub-dataset0', 'train')
        victim = os.path.join(folder, sorted(os.listdir(folder))[0], '3.png')
        with open(victim, 'rb') as f:
            head = f.read()
        os.unlink(victim)  # a hard link of the source file: replace it, do not truncate the source
        with open(victim, 'wb') as f:
            f.write(head[:len(head) // 2])
    return split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--reps', type=int, default=20)
    parser.add_argument('--timeout', type=float, default=300.0, help='seconds before a run counts as a hang')
    parser.add_argument('--num-workers', type=int, default=None, help='default: the scripts\' own (8)')
    parser.add_argument('--skip-bad-images', action='store_true')
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix='devit-stress-')
    split = prepare(work, args.skip_bad_images)
    extra = (['--num_workers', str(args.num_workers)] if args.num_workers is not None else []) + \
        (['--skip-bad-images'] if args.skip_bad_images else [])
    passed = 0
    for rep in range(args.reps):
        out = os.path.join(work, f'out{rep}')
        cmd = launch_cmd('train_subdata.py', '--dataset', 'folder', '--data-path', split, '--num_division', '2',
                         '--all-divisions', '--input-size', '32', '--epochs', '2', '--batch-size', '16',
                         '--eval-batch-size', '32', '--model-ema', '--no-progress', *MODEL, *extra,
                         '--output_dir', out)
        started = time.time()
        try:
            run(cmd, timeout=args.timeout)
            epochs = [len(read_log(os.path.join(out, f'sub-dataset{i}'))) for i in range(2)]
            ok, why = epochs == [2, 2], f'epochs logged {epochs}'
        except AssertionError as err:
            ok, why = False, str(err).splitlines()[1] if len(str(err).splitlines()) > 1 else str(err)
            print(str(err)[-20000:], file=sys.stderr, flush=True)
        passed += ok
        print(f'run {rep + 1}/{args.reps}: {"pass" if ok else "FAIL"} in {time.time() - started:.0f} s ({why})',
              flush=True)
    print(f'passed {passed}/{args.reps}', flush=True)
    return 0 if passed == args.reps else 1


if __name__ == '__main__':
    sys.exit(main())
