"""The model side of deployment: what each process loads, how the image travels, how a ViT is cut into stages.

- `load_ensemble` (aggregator, monolithic) and `load_backbone` (worker i: backbone i only) read a stage-3
  checkpoint, a dict with 'model', 'model_ema', 'ensemble_config' (= DeViTEnsemble.config) and 'args'.
- `InputCodec` sends the preprocessed image either as fp32 or as uint8 pixels (4x fewer bytes), normalised on the
  receiving worker, as a camera that ships raw frames would.
- `Stage` / `split_stages`: a timm ViT's blocks cut into consecutive groups for the layer-split baseline.
"""
import argparse
import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import nn

import models  # noqa: F401  (registers dedeit / devit with timm)
from datasets import default_mean_std
from models.checkpoint import (
    CheckpointError,
    extract_state_dict,
    load_state_dict_checked,
    load_weights,
    read_checkpoint,
)
from models.ensemble_model import DeViTEnsemble, build_ensemble, create_backbone
from models.features import has_dist_token, prefix_tokens, token_width

CONFIG_KEY = 'ensemble_config'


def read_ensemble_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint dict; CheckpointError (a ValueError) naming the path if missing, truncated or not stage 3."""
    ckpt = read_checkpoint(path)
    if CONFIG_KEY not in ckpt:
        raise CheckpointError(f'{path} has no {CONFIG_KEY!r}: give the checkpoint written by ensemble.py (stage 3)')
    return ckpt


def checkpoint_args(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The training arguments saved in a checkpoint, as a dict ({} when absent)."""
    a = ckpt.get('args')
    return vars(a) if isinstance(a, argparse.Namespace) else dict(a or {})


def ensemble_from_checkpoint(ckpt: Mapping[str, Any], use_ema: bool = False, source: str = '<dict>'
                             ) -> DeViTEnsemble:
    ens = build_ensemble(ckpt[CONFIG_KEY])
    load_state_dict_checked(ens, extract_state_dict(ckpt, use_ema=use_ema, source=source), reset_head=False,
                            resample_pos_embed=False, what='ensemble', source=source)
    return ens.eval()


def load_ensemble(path: str, use_ema: bool = False) -> DeViTEnsemble:
    """The whole ensemble (backbones + head) of a stage-3 checkpoint, in eval mode."""
    return ensemble_from_checkpoint(read_ensemble_checkpoint(path), use_ema, os.fspath(path))


class Backbone(nn.Module):
    """Device i's share of the ensemble: its backbone, returning what the device sends, B×(P·d_i)."""

    def __init__(self, backbone: nn.Module, distilled: bool):
        super().__init__()
        self.backbone = backbone
        self.distilled = distilled
        self.width = token_width(backbone, dist=distilled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prefix_tokens(self.backbone, x, dist=self.distilled)


def load_backbone(ckpt: Mapping[str, Any], index: int, use_ema: bool = False, path: str = '<dict>') -> Backbone:
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
    return Backbone(backbone, has_dist_token(backbone) if distilled is None else bool(distilled)).eval()


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


def input_spec(model: nn.Module) -> tuple[int, int]:
    """(image size, input channels) of a timm ViT-like model."""
    embed = model.patch_embed
    return int(embed.img_size[0]), int(embed.proj.in_channels)


class InputCodec:
    """Image on the wire: 'fp32' sends the normalised tensor; 'uint8' sends pixels, normalised by the receiver.

    uint8 quantises the preprocessed (resized, cropped) image; for images that were uint8 at that size already
    (Fashion-MNIST and CIFAR at native size) the pixels arrive exactly and the worker's tensor equals the
    aggregator's up to float rounding.
    """

    def __init__(self, dtype: str, in_chans: int):
        if dtype not in ('uint8', 'fp32'):
            raise ValueError(f'input dtype must be uint8 or fp32, got {dtype!r}')
        self.dtype = dtype
        mean, std = default_mean_std(in_chans)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.uint8 if self.dtype == 'uint8' else torch.float32

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W normalised float -> what is sent."""
        if self.dtype == 'fp32':
            return x.float()
        return (x * self.std + self.mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """What was received -> B×C×H×W normalised float (as datasets.TinyTransform normalises)."""
        if self.dtype == 'fp32':
            return x
        return (x.float().div_(255) - self.mean) / self.std


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


def teacher_input_spec(name: str, kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """(image size, channels) of a teacher without building its weights (on the meta device)."""
    if not timm.is_model(name):
        raise ValueError(f'unknown teacher model {name!r} (not registered in timm)')
    with torch.device('meta'):
        return input_spec(timm.create_model(name, num_classes=1, **dict(kwargs)))


def compute_device(requested: str | None, local_rank: int) -> torch.device:
    """CUDA (one GPU per local rank, wrapping round) when available and not refused, else CPU."""
    if requested is not None and not requested.startswith('cuda'):
        return torch.device(requested)
    if not torch.cuda.is_available():
        if requested is not None:
            raise ValueError('--device cuda was asked for but CUDA is not available')
        return torch.device('cpu')
    return torch.device('cuda', local_rank % torch.cuda.device_count())


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
