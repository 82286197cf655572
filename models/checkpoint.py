"""Loading weights into students, teachers and ensembles by key name, with one clear error when they do not fit."""
import argparse
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

_logger = logging.getLogger(__name__)

# Wrappers whose prefix never belongs to the model itself: DDP / ModelEmaV3 ('module.') and torch.compile.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model. `utils` re-exports it."""


class LoadResult(NamedTuple):
    source: str  # path, or '<dict>'
    reset: list[str]  # classifier keys left at the model's fresh init (checkpoint's were dropped or absent)
    dropped: list[str]  # checkpoint classifier keys not loaded
    resampled: list[str]  # e.g. ['pos_embed: 14x14 -> 7x7']


# Besides tensors and plain values, the seed's checkpoints (DeiT's main.py) store their args as a Namespace.
SAFE_GLOBALS = [argparse.Namespace]


def safe_load(path, **kw):
    """torch.load with weights_only=True: tensors, containers and plain values (and SAFE_GLOBALS) only, so that a
    checkpoint cannot run code when it is read. A file that needs more is refused with one line naming what."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(os.fspath(path), map_location='cpu', weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        if 'weights_only' not in str(e) and 'Weights only' not in str(e):
            raise
        what = next((line.strip() for line in str(e).splitlines() if 'GLOBAL' in line or 'Unsupported' in line),
                    'objects other than tensors and plain values')
        raise CheckpointError(f'{os.fspath(path)} is refused: reading it would run code ({what[:160]}); only '
                              'tensors and plain values are loaded (re-save its state_dict from a Python you trust)'
                              ) from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load on CPU, raising CheckpointError naming the path when the file is missing, truncated or not torch."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        obj = safe_load(path)
    except CheckpointError:
        raise
    except Exception as e:  # truncated zip, pickle errors, EOF: all mean "not a usable checkpoint"
        raise CheckpointError(f'cannot read checkpoint {path} ({type(e).__name__}: {e}); is the file truncated?') from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'checkpoint {path} holds a {type(obj).__name__}, expected a dict')
    return obj


def checkpoint_info(path):
    """A checkpoint dict whose tensors are memory-mapped, not read: cheap access to ``stage``, ``classes``, ``args``.

    Falls back to ``read_checkpoint`` (a full read, and its one-line error for a missing or truncated file).
    """
    try:
        obj = safe_load(path, mmap=True)
    except Exception:  # legacy (non-zip) format, a broken file, or one that is refused: read_checkpoint says which
        return read_checkpoint(path)
    return obj if isinstance(obj, dict) else read_checkpoint(path)


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def extract_state_dict(obj: Mapping[str, Any], use_ema: bool = False, source: str = '<dict>') -> dict[str, Any]:
    """The model's state dict from a checkpoint dict ('model' / 'model_ema' / 'state_dict') or a plain state dict."""
    if use_ema:
        if obj.get('model_ema') is None:
            raise CheckpointError(f'{source} has no EMA weights (keys: {sorted(obj)[:_MAX_LISTED]})')
        sd = obj['model_ema']
    elif 'model' in obj or 'state_dict' in obj:
        sd = obj['model'] if 'model' in obj else obj['state_dict']
    else:
        sd = obj
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f'{source} is neither a state dict nor a dict with "model"/"model_ema" '
                              f'(keys: {sorted(map(str, obj))[:_MAX_LISTED]})')
    return strip_prefixes(sd)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('classifier') or ('head', 'head_dist')
    return (names,) if isinstance(names, str) else tuple(names)


def _is_head_key(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + '.') for n in names)


def _listed(keys: list[str]) -> str:
    more = f', ... ({len(keys) - _MAX_LISTED} more)' if len(keys) > _MAX_LISTED else ''
    return ', '.join(keys[:_MAX_LISTED]) + more


def _shape_hint(sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> str:
    """Say in one phrase why a checkpoint looks like another architecture (depth, width)."""
    def depth(d):
        return len({m.group(1) for k in d for m in [re.match(r'blocks\.(\d+)\.', k)] if m})

    def width(d):
        t = d.get('cls_token', d.get('pos_embed'))
        return None if t is None else t.shape[-1]

    hints = []
    if depth(sd) != depth(model_sd):
        hints.append(f'checkpoint has {depth(sd)} blocks, model {depth(model_sd)}')
    if width(sd) != width(model_sd):
        hints.append(f'checkpoint width {width(sd)}, model {width(model_sd)}')
    return f' (different architecture? {"; ".join(hints)})' if hints else ''


def _resample_pos_embed(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> list[str]:
    old, new = sd.get('pos_embed'), model.state_dict().get('pos_embed')
    if old is None or new is None or old.shape == new.shape or old.shape[-1] != new.shape[-1]:
        return []
    prefix = 0 if getattr(model, 'no_embed_class', False) else getattr(model, 'num_prefix_tokens', 1)
    old_grid = math.isqrt(old.shape[1] - prefix)
    grid = getattr(getattr(model, 'patch_embed', None), 'grid_size', None)
    if grid is None or old_grid * old_grid != old.shape[1] - prefix:
        return []  # not a square grid with the model's prefix tokens: reported as a shape mismatch
    sd['pos_embed'] = resample_abs_pos_embed(old, new_size=list(grid), old_size=[old_grid, old_grid],
                                             num_prefix_tokens=prefix)
    msg = f'pos_embed: {old_grid}x{old_grid} -> {grid[0]}x{grid[1]}'
    _logger.info(f'{what}: resampled {msg}')
    return [msg]


def load_state_dict_checked(
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        *,
        reset_head: bool = True,
        resample_pos_embed: bool = True,
        what: str = 'model',
        source: str = '<dict>',
) -> LoadResult:
    """Load `state_dict` (prefixes already stripped) into `model` by key name; every other key must match exactly.

    reset_head: when the classifier keys differ in shape or presence (another class count, or a model built with
    num_classes=0), drop the checkpoint's and keep the model's fresh classifier.
    resample_pos_embed: a pos_embed of another grid size is resampled with timm's resample_abs_pos_embed.
    A model with a `convert_state_dict(sd)` method (models.cct: official CCT checkpoints) renames the keys first.
    """
    convert = getattr(model, 'convert_state_dict', None)
    sd = convert(state_dict) if callable(convert) else dict(state_dict)
    model_sd = model.state_dict()
    resampled = _resample_pos_embed(model, sd, what) if resample_pos_embed else []

    reset: list[str] = []
    dropped: list[str] = []
    names = classifier_names(model)
    ckpt_head = {k for k in sd if _is_head_key(k, names)}
    model_head = {k for k in model_sd if _is_head_key(k, names)}
    head_differs = ckpt_head != model_head or any(sd[k].shape != model_sd[k].shape for k in ckpt_head)
    if reset_head and head_differs:
        shapes = {k: tuple(sd[k].shape) for k in sorted(ckpt_head)}
        for k in ckpt_head:
            del sd[k]
        reset, dropped = sorted(model_head), sorted(ckpt_head)
        _logger.info(f'{what}: classifier reset (checkpoint {shapes or "none"}, model keeps fresh {reset or "none"})')

    missing = sorted(set(model_sd) - set(sd) - set(reset))
    unexpected = sorted(set(sd) - set(model_sd))
    mismatched = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}'
                  for k in sorted(set(sd) & set(model_sd)) if sd[k].shape != model_sd[k].shape]
    if missing or unexpected or mismatched:
        parts = [f'{len(missing)} missing keys [{_listed(missing)}]' if missing else '',
                 f'{len(unexpected)} unexpected keys [{_listed(unexpected)}]' if unexpected else '',
                 f'{len(mismatched)} shape mismatches [{_listed(mismatched)}]' if mismatched else '']
        raise CheckpointError(
            f'cannot load {what} from {source} into {type(model).__name__}: '
            + '; '.join(p for p in parts if p) + _shape_hint(sd, model_sd))
    model.load_state_dict(sd, strict=not reset)
    return LoadResult(source, reset, dropped, resampled)


def load_weights(
        model: nn.Module,
        source: str | os.PathLike | Mapping[str, Any],
        *,
        reset_head: bool = True,
        use_ema: bool = False,
        what: str = 'model',
        resample_pos_embed: bool = True,
) -> LoadResult:
    """Load a checkpoint into `model` by key name.

    source: a path, or an already loaded dict: a plain state dict or a checkpoint dict with 'model' / 'model_ema'
    ('module.' prefixes are stripped). use_ema picks 'model_ema'. `what` names the model in messages ('teacher',
    'student 2', ...). Raises CheckpointError listing missing/unexpected keys and shape mismatches. Returns a
    LoadResult saying which classifier keys were reset and whether pos_embed was resampled.
    """
    if isinstance(source, Mapping):
        name, obj = '<dict>', source
    else:
        name = os.fspath(source)
        obj = read_checkpoint(name)
    sd = extract_state_dict(obj, use_ema=use_ema, source=name)
    return load_state_dict_checked(model, sd, reset_head=reset_head, resample_pos_embed=resample_pos_embed,
                                   what=what, source=name)


# ----------------------------------------------------------------------------------------------------------------
# The training checkpoint: one layout, built and restored here (engine.fit, shrink.py and the benchmarks use it).

TRAINING_KEYS = ('model', 'model_ema', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'num_updates', 'best_acc1',
                 'test_acc1', 'args')


def _state(obj: Any) -> Any:
    """A state dict from a module, optimizer, scheduler or scaler; None and plain mappings pass through."""
    if obj is None or isinstance(obj, Mapping):
        return obj
    return obj.state_dict()


def args_dict(args: Any) -> dict[str, Any] | None:
    """A run's arguments as a plain dict (from an argparse Namespace or a mapping), private fields dropped."""
    if args is None:
        return None
    items = vars(args).items() if not isinstance(args, Mapping) else args.items()
    return {k: v for k, v in items if not str(k).startswith('_')}


def training_state(
        model: nn.Module | Mapping[str, torch.Tensor],
        *,
        args: Any = None,
        model_ema: nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        scaler: Any = None,
        epoch: int | None = None,
        num_updates: int = 0,
        best_acc1: float | None = None,
        test_acc1: float | None = None,
        **extra: Any,
) -> dict[str, Any]:
    """The checkpoint dict of this project: the TRAINING_KEYS plus `extra`.

    model / model_ema (the EMA's module, not its wrapper) as state dicts; optimizer, lr_scheduler and scaler as
    their state dicts (None when absent); args as a plain dict. `extra` holds what a stage adds: `stage`,
    `division`, `classes`, `num_classes`, the ensemble's config, a shrink policy. Write it with
    utils.save_checkpoint; `restore_training_state` reads it back for resume.
    """
    return {'model': _state(model), 'model_ema': _state(model_ema), 'optimizer': _state(optimizer),
            'lr_scheduler': _state(lr_scheduler), 'scaler': _state(scaler), 'epoch': epoch,
            'num_updates': num_updates, 'best_acc1': best_acc1, 'test_acc1': test_acc1, 'args': args_dict(args),
            **extra}


def _first_lines(err: Exception, count: int = 3) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return ' '.join(lines[:count])


def restore_training_state(path: str | os.PathLike, model: nn.Module, optimizer: Any, lr_scheduler: Any,
                           model_ema: nn.Module | None = None, scaler: Any = None,
                           expect: Mapping[str, Any] | None = None) -> tuple[int, float | None, int]:
    """Load a `training_state` checkpoint into the objects of a run; returns (next epoch, best acc1, updates).

    expect: entries (`stage`, `division`, `classes`) the checkpoint must match where it records them. A
    checkpoint that is not a training checkpoint, or whose weights do not fit `model`, is a CheckpointError.
    """
    path = os.fspath(path)
    state = read_checkpoint(path)
    missing = [k for k in ('model', 'optimizer', 'lr_scheduler', 'epoch') if state.get(k) is None]
    if missing:
        raise CheckpointError(f'{path} is not a training checkpoint of this project (no {", ".join(missing)})')
    for key in ('stage', 'division', 'classes'):
        if key in (expect or {}) and state.get(key) is not None and state[key] != expect[key]:
            raise CheckpointError(f'{path} was written with {key} {state[key]}, this run has {key} {expect[key]}: '
                                  f'resume a run with the script and division that wrote it')
    try:
        model.load_state_dict(state['model'])
    except RuntimeError as err:
        raise CheckpointError(f'{path} does not fit the model being trained: {_first_lines(err)}') from None
    optimizer.load_state_dict(state['optimizer'])
    lr_scheduler.load_state_dict(state['lr_scheduler'])
    if model_ema is not None and state.get('model_ema') is not None:
        model_ema.load_state_dict(state['model_ema'])
    if scaler is not None and state.get('scaler') is not None:
        scaler.load_state_dict(state['scaler'])
    return state['epoch'] + 1, state.get('best_acc1'), state.get('num_updates', 0)
