"""Shared plumbing for the stage scripts: argument groups and recipes, distributed set-up, seeding, checkpoints, logs.

Each stage script composes the argument groups it uses (``data_args``, ``augment_args``, ``division_args``,
``model_args``, ``optim_args``, ``distill_args``, ``run_args``; ``training_parents`` gives a training stage's set)
and parses with ``parse_args``, which first applies the defaults of ``-c/--config FILE.yaml``. The seed's four
commands are accepted flag for flag by the scripts they belong to.
"""
import argparse
import datetime
import glob
import json
import math
import os
import random
import re
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ParseKwargs as TimmParseKwargs

from fileio import write_bytes_atomic, write_json_atomic, write_text_atomic  # noqa: F401  (one writer)
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


class ParseKwargs(TimmParseKwargs):
    """timm's ``--model-kwargs k=v ...`` action; an item without ``=`` (or without a key) is a usage error."""

    def __call__(self, parser, namespace, values, option_string=None):
        for item in values:
            key, sep, _ = item.partition('=')
            if not sep or not key:
                raise argparse.ArgumentError(self, f'expected KEY=VALUE items, got {item!r}')
        super().__call__(parser, namespace, values, option_string)


# Each group below is a parent parser (``add_help=False``) of one concern; an entry script composes those it uses:
#     argparse.ArgumentParser('...', parents=[utils.data_args(), utils.model_args(), ...])
# so its --help lists only its own flags. Every flag keeps the seed's spelling, with a hyphenated alias.

def _flag_group(title):
    """A parent parser (``add_help=False``) holding one argument group: (parser, group)."""
    parser = argparse.ArgumentParser(add_help=False)
    return parser, parser.add_argument_group(title)


def data_args(training=True):
    """What is read and how it is fed: dataset, path, transforms; for training also input size, normalisation and
    the loader (``training=False``: the dataset alone, for the deployment runtime, which takes the rest from the
    checkpoint)."""
    parser, group = _flag_group('data')
    group.add_argument('--dataset', '--data-set', dest='dataset', default='fashion_mnist',
                       choices=['cifar100', 'IMNET', 'imagenet', 'flowers', 'cars', 'fashion_mnist', 'folder'])
    group.add_argument('--data-path', '--data_path', dest='data_path', default=None,
                       help='dataset root, or the output folder of splite_dataset.py for stages 1 and 2')
    group.add_argument('--tiny-transforms', action='store_true',
                       help='plain to-tensor + normalise (+ flip) instead of DeiT augmentation: for tiny CPU runs')
    if not training:
        return parser
    group.add_argument('--input-size', type=positive_int, default=None,
                       help="image size fed to the model (default: the model's img_size, else the dataset's)")
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='M',
                       help='normalisation mean, one value or one per input channel (default: ImageNet\'s); '
                            'recorded in the checkpoints, later stages take it from their input checkpoints')
    group.add_argument('--std', type=positive_float, nargs='+', default=None, metavar='S',
                       help='normalisation std, as --mean')
    group.add_argument('--num_workers', '--num-workers', dest='num_workers', type=non_negative_int, default=None,
                       help='data loader workers (default: 0 with --tiny-transforms, else 8)')
    group.add_argument('--pin-mem', action='store_true')
    group.add_argument('--limit-train', type=positive_int, default=None, help='use only the first K training images')
    group.add_argument('--limit-val', type=positive_int, default=None, help='use only the first K test images')
    group.add_argument('--skip-bad-images', action='store_true',
                       help='skip unreadable image files (logged, counted in the summary) instead of stopping')
    return parser


def augment_args():
    """Training-time augmentation (DeiT's recipe, as timm names it), mixup/cutmix and label smoothing."""
    parser, group = _flag_group('augmentation')
    group.add_argument('--hflip', type=probability, default=0.5,
                       help='horizontal flip probability (0: no flips, e.g. for text or road signs)')
    group.add_argument('--color-jitter', type=non_negative_float, default=0.3)
    group.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='RandAugment policy ("none" to disable)')
    group.add_argument('--train-interpolation', default='bicubic')
    group.add_argument('--reprob', type=probability, default=0.25, help='random erasing probability')
    group.add_argument('--remode', default='pixel')
    group.add_argument('--recount', type=positive_int, default=1)
    group.add_argument('--repeated-aug', action='store_true', help='repeated-augmentation sampler under DDP')
    group.add_argument('--smoothing', type=probability, default=0.1)
    group.add_argument('--mixup', type=non_negative_float, default=0.8)
    group.add_argument('--cutmix', type=non_negative_float, default=1.0)
    group.add_argument('--cutmix-minmax', type=float, nargs=2, default=None)
    group.add_argument('--mixup-prob', type=probability, default=1.0)
    group.add_argument('--mixup-switch-prob', type=probability, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])
    return parser


def division_args(select=True):
    """The split's divisions. ``select``: also the flags that choose which divisions a run trains (stages 1, 2)."""
    parser, group = _flag_group('divisions')
    group.add_argument('--num_division', '--num-division', dest='num_division', type=positive_int, default=4)
    group.add_argument('--sub_classes', '--sub-classes', dest='sub_classes', type=positive_int, nargs='+',
                       default=None, help='classes per division; checked against the split manifest')
    if select:
        group.add_argument('--start-division', '--start_division', dest='start_division', type=non_negative_int,
                           default=0, help='train this division only')
        group.add_argument('--all-divisions', action='store_true',
                           help='train divisions --start-division..N-1, one after another')
    return parser


def model_args():
    """The model being trained: timm name, size overrides, initial weights, drop-path, EMA."""
    parser, group = _flag_group('model')
    group.add_argument('--model', default='dedeit', help='timm model name of the trained model')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='overrides passed to timm.create_model, e.g. img_size=28 patch_size=7 in_chans=1')
    group.add_argument('--model-path', '--model_path', dest='model_path', default=None,
                       help='initial weights: a checkpoint file (stages 1, 2) or the stage-2 output folder (stage 3)')
    group.add_argument('--drop-path', type=non_negative_float, default=0.1)
    group.add_argument('--model-ema', action='store_true')
    group.add_argument('--model-ema-decay', type=probability, default=0.99996)
    return parser


def optim_args():
    """Optimiser, learning-rate schedule, batch sizes and epochs."""
    parser, group = _flag_group('optimisation')
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
    return parser


def add_teacher_flags(group, default='deit_base_distilled_patch16_224'):
    """--teacher-model, --teacher-kwargs, --teacher-path (stages 2 and 3; the runtime's baselines)."""
    group.add_argument('--teacher-model', default=default)
    group.add_argument('--teacher-kwargs', nargs='*', default={}, action=ParseKwargs)
    group.add_argument('--teacher-path', default=None,
                       help='teacher checkpoint file, or the stage-1 output folder (division i uses sub-dataset{i})')


def distill_args(relations=True):
    """The teacher and the KD loss; ``relations``: also stage 2's q/k/v relation terms."""
    parser, group = _flag_group('distillation')
    add_teacher_flags(group)
    group.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'])
    group.add_argument('--distillation-alpha', type=probability, default=0.5)
    group.add_argument('--distillation-tau', type=positive_float, default=1.0)
    if relations:
        group.add_argument('--gama', '--gamma', dest='gama', type=non_negative_float, nargs=3,
                           default=[0.2, 0.1, 0.3], metavar=('GQ', 'GK', 'GV'),
                           help='weights of the q, k, v relation losses')
        group.add_argument('--layer-map', default='middle', choices=['middle', 'all'],
                           help="student↔teacher layers for the relation loss ('middle' as the paper's code)")
    return parser


def add_common_flags(group):
    """-c/--config, --seed, --device: every entry script that builds models."""
    group.add_argument('-c', '--config', default=None, metavar='FILE.yaml',
                       help='recipe: a YAML file of flag defaults (e.g. configs/small.yaml); the command line wins')
    group.add_argument('--seed', type=int, default=0)
    group.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')


def run_args():
    """Recipe file, output, resume, seed, device and the distributed set-up."""
    parser, group = _flag_group('run')
    add_common_flags(group)
    group.add_argument('--output_dir', '--output-dir', dest='output_dir', default='./output')
    group.add_argument('--resume', default='', help='checkpoint to resume from (checkpoint_last.pth)')
    group.add_argument('--auto-resume', action='store_true', help='resume from OUTPUT/checkpoint_last.pth if present')
    group.add_argument('--overwrite', action='store_true', help='allow starting over in a folder with checkpoints')
    group.add_argument('--eval', action='store_true', help='evaluate only')
    group.add_argument('--tensorboard', action='store_true', help='also write TensorBoard scalars')
    group.add_argument('--no-progress', action='store_true', help='no tqdm bars')
    group.add_argument('--dist-url', default='env://')
    group.add_argument('--dist-timeout', type=positive_float, default=600.0, help='seconds for collective ops')
    group.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int, default=None,
                       help=argparse.SUPPRESS)  # passed by torch.distributed.launch without --use_env
    return parser


def training_parents(distillation=None):
    """The groups of a training stage: data, augmentation, divisions, model, optimisation (+ distillation), run.

    distillation: None (stage 1), 'relations' (stage 2: KD and q/k/v relations) or 'kd' (stage 3: KD only).
    """
    parents = [data_args(), augment_args(), division_args(), model_args(), optim_args()]
    if distillation is not None:
        parents.append(distill_args(relations=distillation == 'relations'))
    return parents + [run_args()]


def get_args_parser():
    """Every group in one parent parser (``add_help=False``): what a tool that takes any stage's flags composes."""
    return argparse.ArgumentParser('DeViT', add_help=False, parents=training_parents('relations'))


# ----------------------------------------------------------------------------------------------------------------
# Recipes (-c/--config FILE.yaml), as timm's train.py: the file sets defaults, the command line wins.

def config_defaults(parser, path):
    """Flag defaults from the YAML file ``path`` for ``parser``, checked as the command line would be.

    Keys are the flags' names without dashes, as argparse stores them (``warmup_epochs``; ``warmup-epochs`` is
    accepted too). A key that is not a flag of this script, or a value the flag refuses, ends the run with one
    ``error:`` line (argparse's exit 2).
    """
    import yaml  # local: only a run with -c needs it

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except OSError as err:
        parser.error(f'cannot read config {path}: {err.strerror or err}')
    except yaml.YAMLError as err:
        parser.error(f'config {path} is not valid YAML: {" ".join(str(err).split())}')
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        parser.error(f'config {path} must be a mapping of flag names to values, not a {type(cfg).__name__}')
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'config') and a.dest != argparse.SUPPRESS}
    unknown = sorted(k for k in cfg if str(k).replace('-', '_') not in actions)
    if unknown:
        parser.error(f'config {path}: {", ".join(map(str, unknown))} '
                     f'{"is not a flag" if len(unknown) == 1 else "are not flags"} of {parser.prog}')
    return {str(k).replace('-', '_'): _config_value(parser, actions[str(k).replace('-', '_')], v, path)
            for k, v in cfg.items()}


def _config_value(parser, action, value, path):
    """``value`` as the flag of ``action`` would store it from the command line (type, choices, nargs)."""
    key = action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            parser.error(f'config {path}: {key} is a switch: true or false, not {value!r}')
        return value
    if isinstance(action, ParseKwargs):
        if isinstance(value, dict):
            return dict(value)
        value = value if isinstance(value, list) else str(value).split()
        namespace = argparse.Namespace()
        try:
            action(parser, namespace, [str(v) for v in value])
        except argparse.ArgumentError as err:
            parser.error(f'config {path}: {key}: {err.message}')
        return getattr(namespace, action.dest)
    if value is None:
        return None
    many = action.nargs not in (None, '?')
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        parser.error(f'config {path}: {key} takes one value, not a list')
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        parser.error(f'config {path}: {key} takes {action.nargs} values, got {len(items)}')
    out = []
    for item in items:
        try:
            item = action.type(str(item)) if action.type is not None else item
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            parser.error(f'config {path}: {key}: {err}')
        if action.choices is not None and item not in action.choices:
            parser.error(f'config {path}: {key}: {item!r} is not one of {", ".join(map(str, action.choices))}')
        out.append(item)
    return out if many else out[0]


def parse_args(parser, argv=None):
    """Parse ``argv`` (after the defaults of ``-c/--config FILE.yaml``), then finish the derived fields.

    Inconsistent values end the run as argparse does (usage, one ``error:`` line, exit 2).
    """
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument('-c', '--config', default=None)
    known, _ = first.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**config_defaults(parser, known.config))
    args = parser.parse_args(argv)
    if getattr(args, 'eval_batch_size', 0) is None:
        args.eval_batch_size = args.batch_size
    if getattr(args, 'num_workers', 0) is None:
        args.num_workers = 0 if args.tiny_transforms else 8
    for flag in ('mean', 'std'):
        values = getattr(args, flag, None)
        if values is not None and len(values) not in (1, 3):
            parser.error(f'--{flag} takes one value (every channel) or three (R, G, B), got {len(values)}')
    sub_classes = getattr(args, 'sub_classes', None)
    if sub_classes is not None and len(sub_classes) != args.num_division:
        parser.error(f'--sub_classes has {len(sub_classes)} values but --num_division is {args.num_division}')
    if getattr(args, 'start_division', 0) >= getattr(args, 'num_division', 1):
        parser.error(f'--start-division {args.start_division} is out of range for --num_division {args.num_division}')
    return args


def run_main(main, argv=None):
    """Run a script's ``main``; expected errors (bad paths, checkpoints, shapes) become one line and exit code 2.

    ``ValueError`` is what our modules raise for bad input, each with a message naming the culprit.
    Set ``DEVIT_DEBUG=1`` to get the full traceback instead. A run that ends well destroys its process group before
    the interpreter exits: gloo's threads left running into interpreter shutdown can abort the process
    ("terminate called without an active exception", exit -6) after all its work is done.
    """
    if os.environ.get('DEVIT_DEBUG'):
        result = main(argv)
    else:
        try:
            result = main(argv)
        except (ValueError, FloatingPointError, OSError) as err:  # OSError: missing files, read-only or full disk
            _report_error(err)
    if dist.is_available() and dist.is_initialized():
        barrier()  # every rank done with its collectives before any tears the group down
        dist.destroy_process_group()
    return result


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


def inherit_normalization(args, checkpoints):
    """Unset ``--mean``/``--std`` take the values recorded in the first of ``checkpoints`` (the files a stage starts
    from: its teacher, its students) that has them, so a model always sees inputs normalised as in its training.
    Values given on the command line win; where they differ from the recorded ones, one warning line says so."""
    for path in checkpoints:
        recorded = checkpoint_info(path).get('args') or {}
        recorded = vars(recorded) if isinstance(recorded, argparse.Namespace) else recorded
        if not isinstance(recorded, dict):
            continue
        mean, std = recorded.get('mean'), recorded.get('std')
        if mean is None or std is None:
            continue
        if args.mean is None and args.std is None:
            args.mean, args.std = list(mean), list(std)
        elif _expand(args.mean, len(mean)) != list(mean) or _expand(args.std, len(std)) != list(std):
            if is_main_process():
                print(f'warning: --mean {args.mean} --std {args.std} differ from the normalisation {path} was '
                      f'trained with (mean {list(mean)}, std {list(std)})', flush=True)
        return


def _expand(values, count):
    if values is None:
        return None
    values = [float(v) for v in values]
    return values * count if len(values) == 1 else values


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


# Generated blocks of the docs: a table a script makes from its result files sits in a markdown page between
#     <!-- generated NAME: COMMAND -->
#     <!-- end generated NAME -->
# (each marker on a line of its own); COMMAND is what regenerates it, NAME tells a page's blocks apart.
BLOCK_BEGIN = re.compile(r'^<!-- generated (?P<name>[A-Za-z0-9_.-]+): (?P<command>\S.*?) -->$')
BLOCK_END = re.compile(r'^<!-- end generated (?P<name>[A-Za-z0-9_.-]+) -->$')


def wrap_markdown(text, width=120):
    """Lines of at most ``width`` characters, never breaking inside a `code span`."""
    import textwrap

    words = text.replace('\n', ' ').split(' ')
    glued, span = [], None  # words of one code span joined by NUL, so textwrap keeps them on one line
    for word in words:
        span = word if span is None else span + '\0' + word
        if span.count('`') % 2 == 0:
            glued.append(span)
            span = None
    glued += [span] if span is not None else []
    return textwrap.fill(' '.join(glued), width, break_long_words=False, break_on_hyphens=False).replace('\0', ' ')


def generated_blocks(text, where='the text'):
    """{name: (command, body lines, begin line index, end line index)} of the generated blocks of markdown ``text``;
    a marker without its partner, a block inside another or a name used twice is a ``UsageError``."""
    blocks, open_name, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        begin, end = BLOCK_BEGIN.match(line), BLOCK_END.match(line)
        if begin:
            if open_name is not None:
                raise UsageError(f'{where}, line {i + 1}: block {begin["name"]!r} begins inside block {open_name!r}')
            if begin['name'] in blocks:
                raise UsageError(f'{where}, line {i + 1}: a second generated block named {begin["name"]!r}')
            open_name, command, start = begin['name'], begin['command'], i
        elif end:
            if end['name'] != open_name:
                raise UsageError(f'{where}, line {i + 1}: "end generated {end["name"]}" closes no open block of '
                                 f'that name')
            blocks[open_name] = (command, lines[start + 1:i], start, i)
            open_name = None
        elif line.startswith('<!-- generated') or line.startswith('<!-- end generated'):
            raise UsageError(f'{where}, line {i + 1}: malformed block marker {line!r}')
    if open_name is not None:
        raise UsageError(f'{where}: block {open_name!r} has no "<!-- end generated {open_name} -->" line')
    return blocks


def replace_blocks(edits):
    """``edits``: {path: {block name: markdown body}}. Every page is read and every block found first, so a missing
    block (``UsageError``, naming page and block) changes no page; then each page is rewritten atomically with only
    those blocks' bodies replaced, the rest kept byte for byte."""
    pages = {}
    for path, bodies in edits.items():
        with open(path, encoding='utf-8') as f:
            text = f.read()
        blocks = generated_blocks(text, path)
        for name in bodies:
            if name not in blocks:
                raise UsageError(f'{path} has no generated block {name!r}: add the lines '
                                 f'"<!-- generated {name}: COMMAND -->" and "<!-- end generated {name} -->" where it '
                                 f'belongs')
        lines = text.splitlines(keepends=True)
        for name in sorted(bodies, key=lambda n: -blocks[n][2]):  # from the last block up: earlier indices hold
            _, _, begin, end = blocks[name]
            body = bodies[name].rstrip('\n')
            lines[begin + 1:end] = [line + '\n' for line in body.split('\n')] if body.strip() else []
        pages[path] = ''.join(lines)
    for path, text in pages.items():
        mode = os.stat(path).st_mode & 0o777
        write_text_atomic(path, text)
        os.chmod(path, mode)  # the page keeps its permissions (the temp file had the owner's only)


def replace_block(path, name, body):
    """Put ``body`` (markdown) between the markers of the generated block ``name`` of the file ``path``, atomically
    (``replace_blocks`` for one block)."""
    replace_blocks({path: {name: body}})


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


# ----------------------------------------------------------------------------------------------------------------
# Divisions (what stages 1-3 share about the split)
# ----------------------------------------------------------------------------------------------------------------

def division_dir(root, division):
    return os.path.join(root, f'sub-dataset{division}')


def check_divisions(args, manifest):
    """``--num_division`` and ``--sub_classes`` must agree with the split manifest."""
    count = manifest['num_division']
    if args.num_division != count:
        raise UsageError(f'--num_division {args.num_division} does not match the manifest, which has {count} divisions')
    if args.sub_classes is None:
        return
    sizes = [len(d['classes']) for d in manifest['divisions']]
    if list(args.sub_classes) != sizes:
        raise UsageError(f'--sub_classes {" ".join(map(str, args.sub_classes))} contradicts the manifest, whose '
                         f'divisions have {" ".join(map(str, sizes))} classes')


def divisions_to_run(args, manifest):
    """``--start-division i`` alone runs division i; ``--all-divisions`` runs i..N-1."""
    check_divisions(args, manifest)
    if args.all_divisions:
        return list(range(args.start_division, manifest['num_division']))
    return [args.start_division]


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
