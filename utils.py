"""Plumbing of the stage scripts: distributed set-up, seeding, checkpoints, the split's divisions.

The command line (flag groups, recipes, one-line errors) is cli.py's; files written atomically and the docs'
generated blocks are fileio.py's.
"""
import argparse
import datetime
import glob
import os
import random
import tempfile

import numpy as np
import torch
import torch.distributed as dist

from fileio import UsageError, write_json_atomic
from models.checkpoint import checkpoint_info

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
