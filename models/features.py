"""What a student or teacher ViT exposes to the distillation losses and to the ensemble.

Everything here works on any timm-style ViT (students and stock teachers alike) through three attributes only:
`model.blocks` (a sequence of blocks), `block.attn.qkv` (the fused q/k/v Linear) and `block.attn.num_heads`.
q/k/v are read with forward hooks on `attn.qkv`, so timm's ViT code is never forked and fused attention is kept.
"""
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Features(NamedTuple):
    """Outputs of one forward pass.

    logits: B×K from the cls head (B×K of the single head for models without a distillation token).
    logits_dist: B×K from the distillation head, or None.
    cls: B×C final (normed) class token, the feature the cls head reads (for CCT, which has no class token, the
        sequence-pooled feature).
    dist: B×C final distillation token, or None.
    qkv: {layer: (q, k, v)}, each B×H×N×d, for the requested layers.
    """
    logits: torch.Tensor
    logits_dist: torch.Tensor | None
    cls: torch.Tensor
    dist: torch.Tensor | None
    qkv: dict[int, QKV]

    def eval_logits(self) -> torch.Tensor:
        """The logits `model(x)` gives in eval mode: the mean of both heads for distilled models, as timm."""
        return self.logits if self.logits_dist is None else (self.logits + self.logits_dist) / 2


def get_blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, 'blocks', None)
    if blocks is None:
        raise TypeError(f'{type(model).__name__} has no `blocks`; q/k/v capture needs a timm-style ViT')
    return blocks


def num_layers(model: nn.Module) -> int:
    return len(get_blocks(model))


def has_dist_token(model: nn.Module) -> bool:
    return getattr(model, 'dist_token', None) is not None


def _split_qkv(attn: nn.Module, out: torch.Tensor) -> QKV:
    """Reshape the fused qkv Linear output B×N×(3·H·d) exactly as timm's Attention does, into three B×H×N×d views."""
    B, N, _ = out.shape
    num_heads = attn.num_heads
    head_dim = getattr(attn, 'head_dim', None) or out.shape[-1] // (3 * num_heads)
    return out.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


@contextmanager
def capture_qkv(model: nn.Module, layers: Iterable[int]) -> Iterator[dict[int, QKV]]:
    """Context manager: forward hooks on `model.blocks[i].attn.qkv` for i in `layers` (negative indices allowed).

    Yields a dict that every forward pass inside the block fills with {i: (q, k, v)}, each B×H×N×d (views of the
    qkv output, no copies; they keep the autograd graph). Hooks are removed on exit.
    """
    blocks = get_blocks(model)
    depth = len(blocks)
    captured: dict[int, QKV] = {}
    handles = []
    try:
        for i in layers:
            if not -depth <= i < depth:
                raise IndexError(f'layer {i} out of range for a model with {depth} blocks')
            idx = i % depth
            attn = blocks[idx].attn

            def hook(module, inputs, output, idx=idx, attn=attn):
                captured[idx] = _split_qkv(attn, output)

            handles.append(attn.qkv.register_forward_hook(hook))
        yield captured
    finally:
        for h in handles:
            h.remove()


def _tokens(model: nn.Module, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final cls and dist tokens (B×C each) from forward_features' output B×N×C."""
    if has_dist_token(model):
        return feats[:, 0], feats[:, 1]
    # Non-distilled: whatever the classifier reads (the cls token under timm's default 'token' pooling; CCT's
    # sequence-pooled feature).
    return model.forward_head(feats, pre_logits=True), None


def forward_features(model: nn.Module, x: torch.Tensor, qkv_layers: Iterable[int] = ()) -> Features:
    """One forward pass giving logits of both heads, the final tokens and q/k/v of `qkv_layers`.

    x: B×C_in×H×W. For distilled models logits = head(cls) and logits_dist = head_dist(dist) in train and eval mode
    (timm's forward returns their mean in eval); for other models logits = model.forward_head(features).
    """
    with capture_qkv(model, qkv_layers) as qkv:
        feats = model.forward_features(x)
    cls, dist = _tokens(model, feats)
    if dist is not None:
        logits = model.head(model.head_drop(cls))
        logits_dist = model.head_dist(model.head_drop(dist))
    else:
        logits, logits_dist = model.forward_head(feats), None
    return Features(logits, logits_dist, cls, dist, dict(qkv))


def prefix_tokens(model: nn.Module, x: torch.Tensor, dist: bool = True) -> torch.Tensor:
    """What a device sends: its final cls (and dist, when present and `dist`) tokens concatenated, B×(P·C)."""
    cls_tok, dist_tok = _tokens(model, model.forward_features(x))
    if dist and dist_tok is not None:
        return torch.cat([cls_tok, dist_tok], dim=-1)
    return cls_tok


def token_width(model: nn.Module, dist: bool = True) -> int:
    """Number of floats per image `prefix_tokens` returns."""
    return model.num_features * (2 if dist and has_dist_token(model) else 1)


class DeviceTokens(nn.Module):
    """A backbone as device i runs it (the runtime's PyTorch worker, the exported device graph): image B×C×S×S ->
    the tokens it sends, `prefix_tokens` (cls, then dist when `distilled`), B×`width`."""

    def __init__(self, backbone: nn.Module, distilled: bool):
        super().__init__()
        self.backbone = backbone
        self.distilled = distilled
        self.width = token_width(backbone, dist=distilled)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return prefix_tokens(self.backbone, image, dist=self.distilled)
