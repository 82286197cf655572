"""The ensemble of N students: one backbone per device, one head on the aggregator.

Each backbone (a student without its classifier) sends its final cls (and dist) tokens; the head concatenates them
over devices (sum of the widths d_i, which may differ), projects cls and dist separately to the teacher's width,
and classifies all classes with a cls head and a dist head whose logits are averaged at eval (as DeiT).
"""
import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import timm
import torch
from timm.layers import trunc_normal_
from torch import nn

from .checkpoint import (
    CheckpointError,
    LoadResult,
    extract_state_dict,
    load_state_dict_checked,
    load_weights,
    read_checkpoint,
)
from .features import has_dist_token, prefix_tokens, token_width
from .pruning import checkpoint_shape, reshape_, shape_of

_logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
# The key of a stage-3 checkpoint that holds DeViTEnsemble.config, from which build_ensemble rebuilds the model.
CONFIG_KEY = 'ensemble_config'


class EnsembleOutput(NamedTuple):
    """logits / logits_dist: B×K from the cls / dist heads (logits_dist None when not distilled).
    feat_cls / feat_dist: B×D projected features at the teacher's width D (matched to the teacher's tokens)."""
    logits: torch.Tensor
    logits_dist: torch.Tensor | None
    feat_cls: torch.Tensor
    feat_dist: torch.Tensor | None

    def eval_logits(self) -> torch.Tensor:
        return self.logits if self.logits_dist is None else (self.logits + self.logits_dist) / 2


def create_backbone(model_name: str, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """timm.create_model(model_name, num_classes=0, **model_kwargs), remembering the spec for `config`.

    model_kwargs['shrink'] = {'heads': [...], 'hidden': [...]} (per-layer head counts and MLP widths, see
    models/pruning.py) is not passed to timm: the model is built whole, then given that pruned shape.
    """
    kwargs = {k: v for k, v in dict(model_kwargs or {}).items() if k != 'num_classes'}
    shrink = kwargs.pop('shrink', None)
    model = timm.create_model(model_name, num_classes=0, **kwargs)
    if shrink:
        reshape_(model, shrink)
        kwargs['shrink'] = shape_of(shrink)
    model.devit_spec = {'model': model_name, 'kwargs': kwargs}
    return model


class DeViTEnsemble(nn.Module):
    """N backbones + ensemble head.

    backbones: timm students built without classifier (`create_backbone`, or num_classes=0); sizes may differ.
    num_classes: classes of the full dataset. embed_dim: the teacher's width (token loss targets).
    distilled: use dist tokens and a dist head; default: True when every backbone has a dist token.
    device_dropout: training-only probability with which each device's tokens are zeroed, independently per sample
    (never all devices of a sample), so the head learns to classify with devices missing, as it must in the
    runtime's dropout mode (`head_forward(..., present_mask)`).
    """

    def __init__(
            self,
            backbones: Sequence[nn.Module],
            num_classes: int,
            embed_dim: int,
            distilled: bool | None = None,
            *,
            device_dropout: float = 0.0,
            specs: Sequence[Mapping[str, Any] | None] | None = None,
    ):
        super().__init__()
        if not backbones:
            raise ValueError('an ensemble needs at least one backbone')
        with_dist = [has_dist_token(b) for b in backbones]
        if distilled is None:
            distilled = all(with_dist)
        if distilled and not all(with_dist):
            missing = [i for i, d in enumerate(with_dist) if not d]
            raise ValueError(f'distilled ensemble, but backbones {missing} have no distillation token')
        if not 0.0 <= device_dropout < 1.0:
            raise ValueError(f'device_dropout must be in [0, 1), got {device_dropout}')
        self.backbones = nn.ModuleList(backbones)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.distilled = distilled
        self.device_dropout = device_dropout
        self.widths = [b.num_features for b in backbones]
        self.specs = list(specs) if specs is not None else [getattr(b, 'devit_spec', None) for b in backbones]

        total = sum(self.widths)
        self.proj_cls = nn.Linear(total, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.proj_dist = nn.Linear(total, embed_dim) if distilled else None
        self.head_dist = nn.Linear(embed_dim, num_classes) if distilled else None
        for m in (self.proj_cls, self.head, self.proj_dist, self.head_dist):
            if m is not None:
                trunc_normal_(m.weight, std=.02)
                nn.init.zeros_(m.bias)

    @property
    def num_devices(self) -> int:
        return len(self.backbones)

    def token_widths(self) -> list[int]:
        """Floats each device sends per image."""
        return [token_width(b, dist=self.distilled) for b in self.backbones]

    def device_tokens(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """What device i computes and sends: B×(P·d_i), P = 2 (cls, dist) when distilled else 1."""
        return prefix_tokens(self.backbones[i], x, dist=self.distilled)

    def _present(self, present_mask, batch: int, device) -> torch.Tensor | None:
        mask = None
        if present_mask is not None:
            mask = torch.as_tensor(present_mask, dtype=torch.bool, device=device)
            mask = mask.expand(batch, self.num_devices) if mask.dim() == 1 else mask
            if mask.shape != (batch, self.num_devices):
                raise ValueError(f'present_mask must have {self.num_devices} entries (or B×{self.num_devices}), '
                                 f'got shape {tuple(mask.shape)}')
        if self.training and self.device_dropout > 0:
            keep = torch.rand(batch, self.num_devices, device=device) >= self.device_dropout
            # Never drop every device of a sample: restore one at random.
            none = ~keep.any(dim=1)
            keep[none, torch.randint(self.num_devices, (int(none.sum()),), device=device)] = True
            mask = keep if mask is None else mask & keep
        return mask

    def head_forward(self, tokens: Sequence[torch.Tensor | None],
                     present_mask: Sequence[bool] | torch.Tensor | None = None) -> EnsembleOutput:
        """Classify from the devices' tokens.

        tokens: N entries, B×(P·d_i) each (as `device_tokens`), or None for a device that did not answer.
        present_mask: N bools (or B×N): devices marked False, and None entries, are zero-filled. No rescaling, so
        training with device_dropout and inference with missing devices see the same inputs.
        """
        if len(tokens) != self.num_devices:
            raise ValueError(f'expected tokens from {self.num_devices} devices, got {len(tokens)}')
        ref = next((t for t in tokens if t is not None), None)
        if ref is None:
            raise ValueError('no device tokens: every device is missing')
        widths = self.token_widths()
        filled = []
        for i, (t, w) in enumerate(zip(tokens, widths, strict=True)):
            if t is None:
                t = ref.new_zeros(ref.shape[0], w)
            elif t.shape[-1] != w:
                raise ValueError(f'device {i} sent {t.shape[-1]} floats per image, expected {w}')
            filled.append(t)
        mask = self._present(present_mask, ref.shape[0], ref.device)
        if mask is not None:
            filled = [t * mask[:, i:i + 1].to(t.dtype) for i, t in enumerate(filled)]

        # Each device's payload is [cls (d_i) | dist (d_i)]: gather the cls parts and the dist parts over devices.
        pairs = list(zip(filled, self.widths, strict=True))
        feat_cls = self.proj_cls(torch.cat([t[:, :d] for t, d in pairs], dim=1))
        logits = self.head(feat_cls)
        feat_dist = logits_dist = None
        if self.distilled:
            feat_dist = self.proj_dist(torch.cat([t[:, d:2 * d] for t, d in pairs], dim=1))
            logits_dist = self.head_dist(feat_dist)
        return EnsembleOutput(logits, logits_dist, feat_cls, feat_dist)

    def forward(self, x: torch.Tensor) -> torch.Tensor | EnsembleOutput:
        """x: B×C×H×W. Eval: B×K logits (mean of both heads when distilled). Train: EnsembleOutput."""
        out = self.head_forward([self.device_tokens(i, x) for i in range(self.num_devices)])
        return out if self.training else out.eval_logits()

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able description; `build_ensemble(config)` rebuilds the same architecture."""
        missing = [i for i, s in enumerate(self.specs) if s is None]
        if missing:
            raise ValueError(f'backbones {missing} were not built with create_backbone (pass specs=...); '
                             'their model name and kwargs are unknown')
        return {
            'backbones': [{'model': s['model'], 'kwargs': dict(s['kwargs'])} for s in self.specs],
            'num_classes': self.num_classes,
            'embed_dim': self.embed_dim,
            'distilled': self.distilled,
            'device_dropout': self.device_dropout,
        }

    def load_backbone(self, i: int, source: PathLike | Mapping[str, Any], use_ema: bool = False) -> LoadResult:
        """Load a stage-2 student checkpoint into backbone i by key name (its classifier keys are dropped)."""
        return load_weights(self.backbones[i], source, use_ema=use_ema, reset_head=True,
                            what=f'student {i} (backbones.{i})')


def build_ensemble(config: Mapping[str, Any]) -> DeViTEnsemble:
    """Rebuild an ensemble (random weights) from `DeViTEnsemble.config`."""
    backbones = [create_backbone(b['model'], b.get('kwargs')) for b in config['backbones']]
    return DeViTEnsemble(backbones, config['num_classes'], config['embed_dim'], config.get('distilled'),
                         device_dropout=config.get('device_dropout', 0.0))


def student_checkpoint_paths(source: PathLike | Sequence[PathLike],
                             num_division: int | None = None) -> list[str]:
    """Stage-2 checkpoints: FOLDER/sub-dataset{i}/checkpoint.pth for i < num_division, or an explicit list.

    With a folder and num_division None, the divisions are counted (sub-dataset0, sub-dataset1, ... until a gap).
    """
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        if num_division is None:
            num_division = 0
            while os.path.isdir(os.path.join(source, f'sub-dataset{num_division}')):
                num_division += 1
        paths = [os.path.join(source, f'sub-dataset{i}', 'checkpoint.pth') for i in range(num_division)]
    elif isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f'student folder not found: {os.fspath(source)}')
    else:
        paths = [os.fspath(p) for p in source]
        if num_division is not None and len(paths) != num_division:
            raise CheckpointError(f'{len(paths)} student checkpoints given for {num_division} divisions')
    if not paths:
        raise CheckpointError(f'no student checkpoints in {source} (expected sub-dataset0/checkpoint.pth, ...)')
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(f'missing student checkpoints: {", ".join(missing)}')
    return paths


def student_spec(ckpt_args: Any, model: str | None = None,
                 model_kwargs: Mapping[str, Any] | None = None) -> tuple[str | None, dict[str, Any]]:
    """(model name, create kwargs) a student was trained with, from its checkpoint's 'args' (dict or Namespace).

    The checkpoint wins over the fallbacks `model` / `model_kwargs`; args['input_size'] gives img_size when the
    kwargs do not set it (DeiT passes img_size=args.input_size to create_model).
    """
    a = vars(ckpt_args) if isinstance(ckpt_args, argparse.Namespace) else dict(ckpt_args or {})
    name = a.get('model') or model
    kwargs = dict(model_kwargs or {})
    kwargs.update(a.get('model_kwargs') or {})
    if 'img_size' not in kwargs and a.get('input_size'):
        kwargs['img_size'] = a['input_size']
    if model and name != model:
        _logger.warning(f'student checkpoint says model {name!r}, caller asked for {model!r}; using {name!r}')
    return name, kwargs


def load_students(
        source: PathLike | Sequence[PathLike],
        num_division: int | None = None,
        *,
        num_classes: int,
        embed_dim: int,
        model: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        use_ema: bool = False,
        distilled: bool | None = None,
        device_dropout: float = 0.0,
) -> DeViTEnsemble:
    """Build the ensemble from N stage-2 student checkpoints (see `student_checkpoint_paths`).

    Each backbone is created from its checkpoint's args['model'] / args['model_kwargs'] (falling back to `model` /
    `model_kwargs`), so students may differ in size, then loaded by key name into `backbones.{i}` with its
    classifier keys dropped. A shrunk student (shrink.py, or distill_sub.py --load-shrink) is built with its pruned
    shape (`shrink_policy`, else read off the state dict) as the `shrink` model kwarg, which `config` then carries.
    The ensemble head is freshly initialised.
    """
    paths = student_checkpoint_paths(source, num_division)
    ckpts = [read_checkpoint(p) for p in paths]
    backbones = []
    for p, ckpt in zip(paths, ckpts, strict=True):
        name, kwargs = student_spec(ckpt.get('args'), model, model_kwargs)
        if not name:
            raise CheckpointError(f'{p} has no args["model"]; pass model=')
        backbone = create_backbone(name, kwargs)
        shape = checkpoint_shape(ckpt, backbone, extract_state_dict(ckpt, use_ema=use_ema, source=p))
        if shape is not None:  # a shrunk student: its pruned shape goes into the spec, so `config` rebuilds it
            backbone = create_backbone(name, {**kwargs, 'shrink': shape})
        backbones.append(backbone)
    ens = DeViTEnsemble(backbones, num_classes, embed_dim, distilled, device_dropout=device_dropout)
    for i, (p, ckpt) in enumerate(zip(paths, ckpts, strict=True)):
        load_state_dict_checked(ens.backbones[i], extract_state_dict(ckpt, use_ema=use_ema, source=p),
                                reset_head=True, what=f'student {i} (backbones.{i})', source=p)
        _logger.info(f'backbones.{i} <- {p}')
    return ens


def load_ensemble(source: PathLike | Mapping[str, Any], use_ema: bool = False,
                  config_key: str = CONFIG_KEY) -> DeViTEnsemble:
    """Rebuild and load a stage-3 checkpoint, which must hold the ensemble's `config` under `config_key`."""
    name = '<dict>' if isinstance(source, Mapping) else os.fspath(source)
    ckpt = source if isinstance(source, Mapping) else read_checkpoint(name)
    if config_key not in ckpt:
        raise CheckpointError(f'{name} has no {config_key!r}; is it a stage-3 (ensemble) checkpoint?')
    ens = build_ensemble(ckpt[config_key])
    load_state_dict_checked(ens, extract_state_dict(ckpt, use_ema=use_ema, source=name), reset_head=False,
                            resample_pos_embed=False, what='ensemble', source=name)
    return ens
