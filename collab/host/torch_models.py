"""The PyTorch side of deployment: device i's backbone alone, the layer-split baseline's stages, the compute device.

- `load_device` (a worker with --backend torch): backbone i of a stage-3 checkpoint (read by
  models.ensemble_model.read_ensemble_checkpoint: a dict with 'model', 'model_ema', 'ensemble_config', 'args'),
  built alone from its spec and loaded from the keys `backbones.{i}.*`.
- `Stage` / `split_stages`: a timm ViT's blocks cut into consecutive groups for the layer-split baseline.
"""
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

import models  # noqa: F401  (registers dedeit / devit with timm)
from data_transforms import recorded_mean_std
from models import factory
from models.checkpoint import CheckpointError, args_dict, extract_state_dict, load_state_dict_checked, load_weights
from models.ensemble_model import CONFIG_KEY, create_backbone, read_ensemble_checkpoint
from models.features import DeviceTokens, has_dist_token

from ..backends import describe
from ..sessions import default_threads


def load_backbone(ckpt: Mapping[str, Any], index: int, use_ema: bool = False, path: str = '<dict>') -> DeviceTokens:
    """Backbone `index` of a stage-3 checkpoint dict, built alone (keys `backbones.{index}.*`), in eval mode."""
    config = ckpt[CONFIG_KEY]
    specs = config['backbones']
    if not 0 <= index < len(specs):
        raise CheckpointError(f'{path} holds {len(specs)} backbones; there is no device {index}')
    backbone = create_backbone(specs[index]['model'], specs[index].get('kwargs'))
    prefix = f'backbones.{index}.'
    state = {k[len(prefix):]: v for k, v in extract_state_dict(ckpt, use_ema=use_ema, source=path).items()
             if k.startswith(prefix)}
    load_state_dict_checked(backbone, state, reset_head=False, resample_pos_embed=False,
                            what=f'backbone {index}', source=path)
    distilled = config.get('distilled')
    return DeviceTokens(backbone, has_dist_token(backbone) if distilled is None else bool(distilled)).eval()


def load_device(path: str, index: int, use_ema: bool = False) -> tuple[DeviceTokens, dict, dict]:
    """(backbone `index` of the checkpoint at `path`, its input {size, channels, mean, std}, its spec)."""
    path = os.fspath(path)
    ckpt = read_ensemble_checkpoint(path)
    module = load_backbone(ckpt, index, use_ema, path)
    size, chans = factory.input_spec(module.backbone)
    mean, std = recorded_mean_std(args_dict(ckpt.get('args')), chans)
    spec = ckpt[CONFIG_KEY]['backbones'][index]
    return module, {'size': int(size), 'channels': int(chans), 'mean': list(mean), 'std': list(std)}, \
        {'model': spec['model'], 'kwargs': dict(spec.get('kwargs') or {})}


def build_teacher(name: str, kwargs: Mapping[str, Any], num_classes: int, path: str | None = None,
                  seed: int = 0) -> nn.Module:
    """A timm teacher in eval mode; weights from `path`, else random from `seed` (the same on every rank)."""
    if not timm.is_model(name):
        raise ValueError(f'unknown teacher model {name!r} (not registered in timm)')
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, **dict(kwargs))
    if path:
        load_weights(model, path, reset_head=False, what='teacher')
    return model.eval()


class Stage(nn.Module):
    """Blocks [start, end) of a timm ViT; the first stage also embeds, the last also normalises and classifies.

    Input: the image B×C×H×W (first stage) or activations B×T×D; output: activations B×T×D or logits B×K (last).
    """

    def __init__(self, model: nn.Module, start: int, end: int):
        super().__init__()
        self.model = model  # shared, not copied: each stage only runs its part
        self.start, self.end = start, end
        self.first, self.last = start == 0, end == len(model.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.first:
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk in m.blocks[self.start:self.end]:
            x = blk(x)
        if self.last:
            x = m.forward_head(m.norm(x))
        return x


def split_stages(model: nn.Module, n: int) -> list[Stage]:
    """n consecutive groups of blocks, as even as possible (earlier groups take the remainder)."""
    depth = len(model.blocks)
    if not 1 <= n <= depth:
        raise ValueError(f'cannot cut a model of {depth} blocks into {n} stages')
    sizes = [depth // n + (i < depth % n) for i in range(n)]
    bounds = [sum(sizes[:i]) for i in range(n + 1)]
    return [Stage(model, bounds[i], bounds[i + 1]) for i in range(n)]


def activation_shape(model: nn.Module, batch: int) -> tuple[int, int, int]:
    """B×T×D of the activations passed between stages (T = patches + prefix tokens: cls, dist, registers)."""
    return batch, model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim


def teacher_shape(name: str, kwargs: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(image size, channels, tokens T, width D) of a teacher, without building its weights (meta device)."""
    if not timm.is_model(name):
        raise ValueError(f'unknown teacher model {name!r} (not registered in timm)')
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=1, **dict(kwargs))
    size, chans = factory.input_spec(model)
    _, tokens, dim = activation_shape(model, 1)
    return int(size), int(chans), int(tokens), int(dim)


def compute_device(requested: str | None, local_rank: int) -> torch.device:
    """CUDA (one GPU per local rank, wrapping round) when available and not refused, else CPU."""
    if requested is not None and not requested.startswith('cuda'):
        return torch.device(requested)
    if not torch.cuda.is_available():
        if requested is not None:
            raise ValueError('--device cuda was asked for but CUDA is not available')
        return torch.device('cpu')
    return torch.device('cuda', local_rank % torch.cuda.device_count())


# ---------------------------------------------------------------------------------------------------------------
# The runtime's PyTorch backends (collab/backends.py has the onnxruntime ones, with the same interface)

class TorchDevice:
    """Device `index` of a stage-3 checkpoint: that backbone alone, built and loaded by key name."""

    backend = 'torch'

    def __init__(self, checkpoint, index, ema=False, device=None, local_rank=0, threads=None):
        if default_threads(threads):
            torch.set_num_threads(default_threads(threads))
        self.torch = torch
        self.device = compute_device(device, local_rank)
        self.module, self.input, self.spec = load_device(checkpoint, index, ema)
        self.module.to(self.device)
        self.index, self.source, self.token_width = index, os.fspath(checkpoint), self.module.width

    def run(self, x):
        torch = self.torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
            return out.float().cpu().numpy()

    def describe(self):
        return describe(self)


class TorchHead:
    """The head of a stage-3 ensemble (its backbones are not used here)."""

    backend = 'torch'

    def __init__(self, ensemble):
        self.torch, self.ensemble = torch, ensemble
        self.widths = ensemble.token_widths()
        self.num_classes = ensemble.num_classes
        self.specs = [dict(s) for s in ensemble.config['backbones']]

    def run(self, tokens):
        torch = self.torch
        with torch.inference_mode():
            t = [None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in tokens]
            return self.ensemble.head_forward(t).eval_logits().numpy()


class TorchStage:
    """Layer-split baseline: blocks of stage `index` of `num_stages` of a timm teacher (random weights unless a
    checkpoint is given). The teacher is built at `prepare`, once the aggregator has said how many classes."""

    backend = 'torch'

    def __init__(self, name, kwargs, path, seed, index, num_stages, device=None, local_rank=0, threads=None):
        if default_threads(threads):
            torch.set_num_threads(default_threads(threads))
        self.torch = torch
        self.name, self.kwargs, self.path, self.seed = name, dict(kwargs), path, seed
        self.index, self.num_stages = index, num_stages
        self.device = compute_device(device, local_rank)
        size, chans, tokens, dim = teacher_shape(name, kwargs)
        self.input = {'size': size, 'channels': chans}
        self.activation = [tokens, dim]
        self.spec = {'model': name, 'kwargs': self.kwargs}
        self.source = path or f'(random weights, seed {seed})'
        self.stage = None

    def prepare(self, num_classes):
        teacher = build_teacher(self.name, self.kwargs, num_classes, self.path, self.seed)
        self.stage = split_stages(teacher, self.num_stages)[self.index].to(self.device)

    def run(self, x):
        torch = self.torch
        with torch.inference_mode():
            return self.stage(torch.from_numpy(np.ascontiguousarray(x)).to(self.device)).float().cpu().numpy()

    def describe(self):
        return {'backend': self.backend, 'source': self.source, 'model': self.spec, 'activation': self.activation,
                'input': self.input}
