"""Shared plumbing for the stage scripts: one argument parser, distributed set-up, seeding, checkpoints, logging.

Every stage script builds its parser as ``argparse.ArgumentParser(parents=[get_args_parser()])`` and adds only
its own flags, so the seed's four commands are accepted flag for flag by all of them.
"""
import argparse
import ast
import datetime
import glob
import json
import math
import os
import random
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

from models.checkpoint import CheckpointError, read_checkpoint  # noqa: F401  (one error type, one reader)


class UsageError(ValueError):
    """Bad command-line input that argparse alone cannot detect (reported as one line, exit code 2)."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f'must be a finite number > 0, got {text}')
    return value


def non_negative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f'must be a finite number >= 0, got {text}')
    return value


def probability(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be in [0, 1], got {text}')
    return value


class ParseKwargs(argparse.Action):
    """timm's ``--model-kwargs k=v ...`` action; an item without ``=`` is a usage error, not a traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition('=')
            if not sep or not key:
                raise argparse.ArgumentError(self, f'expected KEY=VALUE items, got {item!r}')
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def get_args_parser():
    """Parent parser (``add_help=False``) with every flag shared by the stage scripts."""
    parser = argparse.ArgumentParser('DeViT', add_help=False)

    group = parser.add_argument_group('data')
    group.add_argument('--dataset', '--data-set', dest='dataset', default='fashion_mnist',
                       choices=['cifar100', 'IMNET', 'imagenet', 'flowers', 'cars', 'fashion_mnist', 'folder'])
    group.add_argument('--data-path', '--data_path', dest='data_path', default=None,
                       help='dataset root, or the output folder of splite_dataset.py for stages 1 and 2')
    group.add_argument('--num_division', '--num-division', dest='num_division', type=positive_int, default=4)
    group.add_argument('--start-division', '--start_division', dest='start_division', type=non_negative_int,
                       default=0, help='train this division only')
    group.add_argument('--all-divisions', action='store_true', help='train every division, one after another')
    group.add_argument('--sub_classes', '--sub-classes', dest='sub_classes', type=positive_int, nargs='+',
                       default=None, help='classes per division; checked against the split manifest')
    group.add_argument('--input-size', type=positive_int, default=None,
                       help="image size fed to the model (default: the model's img_size, else the dataset's)")
    group.add_argument('--tiny-transforms', action='store_true',
                       help='plain to-tensor + normalise (+ flip) instead of DeiT augmentation: for tiny CPU runs')
    group.add_argument('--color-jitter', type=non_negative_float, default=0.3)
    group.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='RandAugment policy ("none" to disable)')
    group.add_argument('--train-interpolation', default='bicubic')
    group.add_argument('--reprob', type=probability, default=0.25, help='random erasing probability')
    group.add_argument('--remode', default='pixel')
    group.add_argument('--recount', type=positive_int, default=1)
    group.add_argument('--repeated-aug', action='store_true', help='repeated-augmentation sampler under DDP')
    group.add_argument('--num_workers', '--num-workers', dest='num_workers', type=non_negative_int, default=None,
                       help='data loader workers (default: 0 with --tiny-transforms, else 8)')
    group.add_argument('--pin-mem', action='store_true')
    group.add_argument('--limit-train', type=positive_int, default=None, help='use only the first K training images')
    group.add_argument('--limit-val', type=positive_int, default=None, help='use only the first K test images')
    group.add_argument('--skip-bad-images', action='store_true',
                       help='skip unreadable image files (logged, counted in the summary) instead of stopping')

    group = parser.add_argument_group('model')
    group.add_argument('--model', default='dedeit', help='timm model name of the trained model')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='overrides passed to timm.create_model, e.g. img_size=28 patch_size=7 in_chans=1')
    group.add_argument('--model-path', '--model_path', dest='model_path', default=None,
                       help='initial weights: a checkpoint file (stages 1, 2) or the stage-2 output folder (stage 3)')
    group.add_argument('--drop-path', type=non_negative_float, default=0.1)
    group.add_argument('--model-ema', action='store_true')
    group.add_argument('--model-ema-decay', type=probability, default=0.99996)

    group = parser.add_argument_group('optimisation')
    group.add_argument('--batch-size', type=positive_int, default=64)
    group.add_argument('--eval-batch-size', type=positive_int, default=None)
    group.add_argument('--epochs', type=positive_int, default=300)
    group.add_argument('--opt', default='adamw')
    group.add_argument('--opt-eps', type=positive_float, default=1e-8)
    group.add_argument('--momentum', type=non_negative_float, default=0.9)
    group.add_argument('--weight-decay', type=non_negative_float, default=0.05)
    group.add_argument('--clip-grad', type=positive_float, default=None)
    group.add_argument('--lr', type=positive_float, default=5e-4)
    group.add_argument('--unscale-lr', action='store_true', help='do not scale lr by batch*world/512')
    group.add_argument('--sched', default='cosine')
    group.add_argument('--warmup-lr', type=non_negative_float, default=1e-6)
    group.add_argument('--min-lr', type=non_negative_float, default=1e-5)
    group.add_argument('--warmup-epochs', type=non_negative_float, default=5)
    group.add_argument('--smoothing', type=probability, default=0.1)
    group.add_argument('--mixup', type=non_negative_float, default=0.8)
    group.add_argument('--cutmix', type=non_negative_float, default=1.0)
    group.add_argument('--cutmix-minmax', type=float, nargs=2, default=None)
    group.add_argument('--mixup-prob', type=probability, default=1.0)
    group.add_argument('--mixup-switch-prob', type=probability, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])

    group = parser.add_argument_group('distillation')
    group.add_argument('--teacher-model', default='deit_base_distilled_patch16_224')
    group.add_argument('--teacher-kwargs', nargs='*', default={}, action=ParseKwargs)
    group.add_argument('--teacher-path', default=None,
                       help='teacher checkpoint file, or the stage-1 output folder (division i uses sub-dataset{i})')
    group.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'])
    group.add_argument('--distillation-alpha', type=probability, default=0.5)
    group.add_argument('--distillation-tau', type=positive_float, default=1.0)
    group.add_argument('--gama', '--gamma', dest='gama', type=non_negative_float, nargs=3, default=[0.2, 0.1, 0.3],
                       metavar=('GQ', 'GK', 'GV'), help='weights of the q, k, v relation losses')
    group.add_argument('--layer-map', default='middle', choices=['middle', 'all'],
                       help="student↔teacher layers for the relation loss ('middle' as the paper's code)")

    group = parser.add_argument_group('run')
    group.add_argument('--output_dir', '--output-dir', dest='output_dir', default='./output')
    group.add_argument('--resume', default='', help='checkpoint to resume from (checkpoint_last.pth)')
    group.add_argument('--auto-resume', action='store_true', help='resume from OUTPUT/checkpoint_last.pth if present')
    group.add_argument('--overwrite', action='store_true', help='allow starting over in a folder with checkpoints')
    group.add_argument('--eval', action='store_true', help='evaluate only')
    group.add_argument('--seed', type=int, default=0)
    group.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    group.add_argument('--tensorboard', action='store_true', help='also write TensorBoard scalars')
    group.add_argument('--no-progress', action='store_true', help='no tqdm bars')
    group.add_argument('--dist-url', default='env://')
    group.add_argument('--dist-timeout', type=positive_float, default=600.0, help='seconds for collective ops')
    group.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=None,
                       help=argparse.SUPPRESS)  # passed by torch.distributed.launch without --use_env
    return parser


def parse_args(parser, argv=None):
    """Parse, then finish the derived fields; argparse-style exit 2 on inconsistent values."""
    args = parser.parse_args(argv)
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if args.num_workers is None:
        args.num_workers = 0 if args.tiny_transforms else 8
    if args.sub_classes is not None and len(args.sub_classes) != args.num_division:
        parser.error(f'--sub_classes has {len(args.sub_classes)} values but --num_division is {args.num_division}')
    if args.start_division >= args.num_division:
        parser.error(f'--start-division {args.start_division} is out of range for --num_division {args.num_division}')
    return args


def run_main(main, argv=None):
    """Run a script's ``main``; expected errors (bad paths, checkpoints, shapes) become one line and exit code 2.

    ``ValueError`` is what our modules raise for bad input, each with a message naming the culprit.
    Set ``DEVIT_DEBUG=1`` to get the full traceback instead.
    """
    if os.environ.get('DEVIT_DEBUG'):
        return main(argv)
    try:
        return main(argv)
    except (ValueError, FloatingPointError, OSError) as err:  # OSError: missing files, read-only or full disk
        _report_error(err)


def _report_error(err):
    rank = os.environ.get('RANK')
    prefix = f'[rank {rank}] ' if rank not in (None, '0') else ''
    message = str(err)
    if 'Original Traceback' in message:  # re-raised from a DataLoader worker: its last line is our message
        message = message.strip().splitlines()[-1].split(': ', 1)[-1]
    print(f'{prefix}error: {message}', file=sys.stderr, flush=True)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------------

def init_distributed(args):
    """Set ``args.rank/world_size/local_rank/distributed/device`` from the launcher's environment.

    Works under ``torch.distributed.launch --use_env``, ``torchrun`` and plain ``python`` (world size 1).
    Backend: nccl with CUDA, gloo otherwise.
    """
    env_world = int(os.environ.get('WORLD_SIZE', '1'))
    args.rank = int(os.environ.get('RANK', '0'))
    args.world_size = env_world
    local = os.environ.get('LOCAL_RANK', args.local_rank if args.local_rank is not None else 0)
    args.local_rank = int(local)
    args.distributed = env_world > 1
    use_cuda = torch.cuda.is_available() if args.device is None else args.device.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise UsageError('--device cuda was asked for but CUDA is not available')
    if use_cuda:
        torch.cuda.set_device(args.local_rank)
        args.device = f'cuda:{args.local_rank}'
    else:
        args.device = 'cpu'
    if args.distributed and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo', init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank,
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
    if 'LOCAL_RANK' in os.environ:
        exit_with_launcher()
    return args


def exit_with_launcher(interval=1.0):
    """End this rank when its launcher dies (collab.launcher.exit_with_launcher: one watchdog for the stage scripts
    and the runtime, which needs one without PyTorch)."""
    from collab.launcher import exit_with_launcher as follow

    follow(interval)


def is_main_process():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values, device='cpu'):
    """Sum a list of numbers over all ranks (identity without DDP)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_object(obj):
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` without DDP."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and logs
# ----------------------------------------------------------------------------------------------------------------

def save_checkpoint(obj, path):
    """``torch.save`` that never leaves a half-written file: temp file in the same folder, fsync, rename.

    A failed write (full disk, I/O error) raises ``OSError`` naming ``path``; the previous file there is untouched.
    A process killed mid-write leaves only a hidden ``.NAME.*.tmp`` file, removed by ``remove_stale_temp_files``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # torch.save reports a failed write as an opaque RuntimeError whose context is the real OSError
        cause = next((e for e in (err, err.__context__) if isinstance(e, OSError)), None)
        if cause is not None:
            raise OSError(f'cannot write checkpoint {path}: {cause.strerror or cause}; the previous '
                          f'{os.path.basename(path)} is kept') from err
        raise
    _fsync_dir(folder)


def remove_stale_temp_files(folder, names):
    """Delete the temp files that ``save_checkpoint`` of ``folder/NAME`` leaves when its process is killed.

    Call only where no other process is writing those checkpoints (the start of a run). Returns the removed paths.
    """
    stale = [p for name in names for p in glob.glob(os.path.join(glob.escape(folder), f'.{name}.*.tmp'))]
    for p in stale:
        os.unlink(p)
    return stale


def checkpoint_info(path):
    """A checkpoint dict whose tensors are memory-mapped, not read: cheap access to ``stage``, ``classes``, ``args``.

    Falls back to ``read_checkpoint`` (a full read, and its one-line error for a missing or truncated file).
    """
    try:
        obj = torch.load(path, map_location='cpu', mmap=True, weights_only=False)
    except Exception:  # legacy (non-zip) format or a broken file
        return read_checkpoint(path)
    return obj if isinstance(obj, dict) else read_checkpoint(path)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path, text):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    with os.fdopen(fd, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value):
    # numpy scalars and 0-d tensors as their Python number, anything else (paths, dtypes) as its text
    try:
        return value.item()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return str(value)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + '\n')


def append_log(path, record):
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def check_writable_dir(path):
    """Fail before training when the output folder cannot be written (read-only disk, permissions)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-probe-', dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f'output folder {path} is not writable: {err.strerror}') from None


def args_to_dict(args):
    return {k: v for k, v in vars(args).items() if not k.startswith('_')}


# ----------------------------------------------------------------------------------------------------------------
# Divisions (what stages 1-3 share about the split)
# ----------------------------------------------------------------------------------------------------------------

def division_dir(root, division):
    return os.path.join(root, f'sub-dataset{division}')


def read_manifest(folder, required=True):
    """The split manifest of ``folder`` (a split output, or a stage output that copied it), or None."""
    import datasets  # local: keeps utils light for the split script

    manifest = datasets.read_manifest(folder)
    if manifest is None and required:
        raise UsageError(f'{folder} has no {datasets.MANIFEST}: give the output folder of splite_dataset.py')
    return manifest


def divisions_to_run(args, manifest):
    """``--start-division i`` alone runs division i; ``--all-divisions`` runs i..N-1."""
    count = manifest['num_division']
    if args.num_division != count:
        raise UsageError(f'--num_division {args.num_division} does not match the manifest, which has {count} divisions')
    check_sub_classes(args, manifest)
    if args.all_divisions:
        return list(range(args.start_division, count))
    return [args.start_division]


def check_sub_classes(args, manifest):
    if args.sub_classes is None:
        return
    sizes = [len(d['classes']) for d in manifest['divisions']]
    if list(args.sub_classes) != sizes:
        raise UsageError(f'--sub_classes {" ".join(map(str, args.sub_classes))} contradicts the manifest, whose '
                         f'divisions have {" ".join(map(str, sizes))} classes')


def copy_manifest(manifest, output_dir):
    """Each stage's output folder carries the manifest, so the next stage can check against it."""
    if is_main_process():
        write_json_atomic(os.path.join(output_dir, 'split.json'), manifest)


def create_model(name, num_classes, kwargs, input_size=None, **extra):
    """``timm.create_model`` with ``--input-size`` passed as ``img_size`` (as DeiT) and clear errors."""
    import timm

    import models  # noqa: F401  (registers dedeit/devit)
    kwargs = dict(kwargs)
    if input_size and 'img_size' not in kwargs:
        kwargs['img_size'] = input_size
    if not timm.is_model(name):
        raise UsageError(f'unknown model {name!r} (not registered in timm)')
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs, **extra)
    except TypeError as err:
        raise UsageError(f'bad model arguments for {name}: {err}') from None


def input_spec(model):
    """(image size, input channels) the data must have for a timm ViT-like ``model``."""
    embed = model.patch_embed
    return embed.img_size[0], embed.proj.in_channels
