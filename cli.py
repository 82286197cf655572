"""The command line every script shares: argument types, the flag groups, recipes (-c FILE.yaml), one-line errors.

Each entry script composes the flag groups it uses (``data_args``, ``augment_args``, ``division_args``,
``model_args``, ``optim_args``, ``distill_args``, ``run_args``; ``training_parents`` gives a training stage's set)
and parses with ``parse_args``, which first applies the defaults of ``-c/--config FILE.yaml``; ``run_main`` runs its
``main`` and turns bad input into one ``error:`` line (exit code 2). The seed's four commands are accepted flag for
flag by the scripts they belong to.
"""
import argparse
import math
import os
import sys

import torch.distributed as dist
from timm.utils import ParseKwargs as TimmParseKwargs

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
#     argparse.ArgumentParser('...', parents=[cli.data_args(), cli.model_args(), ...])
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


def add_progress_flag(parser):
    """--no-progress of the tools that show a bar (progress)."""
    parser.add_argument('--no-progress', action='store_true',
                        help='no progress bar (there is none either when stderr is not a terminal)')


def progress(iterable=None, *, enabled=True, **kwargs):
    """A tqdm bar on stderr for long work outside training: shown when ``enabled`` (no --no-progress) and stderr is a
    terminal, so that logs and pipes get the tool's lines alone."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not enabled or not sys.stderr.isatty(), dynamic_ncols=True, mininterval=0.5,
                **kwargs)


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
        dist.barrier()  # every rank done with its collectives before any tears the group down
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
