"""Compact Convolutional Transformers (Hassani et al., arXiv 2104.05704) registered with timm: the DeCCTs' teacher
`cct_14_7x2` and the student `decct`.

CCT replaces ViT's patchify stem with a small conv tokenizer (conv -> ReLU -> max-pool, `n_conv_layers` times), has
no class token and classifies a *sequence-pooled* feature (softmax weights over the tokens from one Linear(dim, 1)).
It is assembled from timm's parts (Block, Attention with a fused qkv Linear, Mlp, DropPath) and exposes what the rest
of the project reads from a timm ViT: `blocks[i].attn.qkv` and `.num_heads` (q/k/v hooks), `patch_embed.img_size`,
`.proj.in_channels`, `.num_patches`, `.grid_size`, `num_prefix_tokens` (0), `num_features`, `forward_features` (B×N×C
after the final norm), `forward_head(x, pre_logits)` (sequence pooling, then the classifier) and `reset_classifier`.
With no class token, what a device sends and what stage 3's token loss matches is the pooled feature
(`forward_head(feats, pre_logits=True)`), as for any non-distilled model.

It keeps timm's model contract as timm's ViTs do: it scripts with TorchScript and traces with torch.fx (timm's FX
feature extraction included), has `set_grad_checkpointing`, `group_matcher`, `forward_intermediates` (so
`features_only=True` works) and a full `pretrained_cfg`; tests/test_timm_contract.py checks every registered model.

The block keeps the official order (SHI-Labs/Compact-Transformers), which is not timm's pre-norm block:
    x = x + attn(norm1(x));  x = norm2(x);  x = x + mlp(x)
so the official ImageNet checkpoint of CCT-14/7x2 loads as a local teacher checkpoint (`convert_state_dict` renames
its keys) and gives the official logits.
"""
import re
from collections.abc import Mapping

import torch
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import nn

from .pruning import reshape_
from .students import _cfg as student_cfg

POS_EMBED_TYPES = ('learnable', 'sine', 'none')


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ConvTokenizer(nn.Module):
    """CCT's tokenizer: n × (Conv k×k, no bias -> ReLU -> MaxPool), flattened to B×N×embed_dim.

    Channels: in_chans -> conv_planes -> ... -> embed_dim. Defaults as the official `_cct`: stride max(1, k//2 - 1),
    padding max(1, k//2), pool 3/2/1 (a 224 image with two 7×7 layers gives 14×14 = 196 tokens). Carries timm
    PatchEmbed's fields (`img_size`, `grid_size`, `num_patches`, `proj` = the first conv) for code written for ViTs.
    """
    __jit_unused_properties__ = ['proj']  # an alias, not a submodule: TorchScript compiles only the forward path

    def __init__(self, img_size=224, in_chans: int = 3, embed_dim: int = 384, n_conv_layers: int = 2,
                 kernel_size: int = 7, stride: int | None = None, padding: int | None = None,
                 pooling_kernel_size: int = 3, pooling_stride: int = 2, pooling_padding: int = 1,
                 conv_planes: int = 64, max_pool: bool = True):
        super().__init__()
        if n_conv_layers < 1:
            raise ValueError(f'n_conv_layers must be >= 1, got {n_conv_layers}')
        stride = max(1, kernel_size // 2 - 1) if stride is None else stride
        padding = max(1, kernel_size // 2) if padding is None else padding
        chans = [in_chans] + [conv_planes] * (n_conv_layers - 1) + [embed_dim]
        self.conv_layers = nn.Sequential(*[nn.Sequential(
            nn.Conv2d(chans[i], chans[i + 1], kernel_size, stride, padding, bias=False),
            nn.ReLU(),
            nn.MaxPool2d(pooling_kernel_size, pooling_stride, pooling_padding) if max_pool else nn.Identity(),
        ) for i in range(n_conv_layers)])
        self.img_size = to_2tuple(img_size)
        grid = list(self.img_size)
        for _ in range(n_conv_layers):
            grid = [_out_size(g, kernel_size, stride, padding) for g in grid]
            if max_pool:
                grid = [_out_size(g, pooling_kernel_size, pooling_stride, pooling_padding) for g in grid]
        if min(grid) < 1:
            raise ValueError(f'a {self.img_size[0]}x{self.img_size[1]} image leaves no tokens after {n_conv_layers} '
                             f'conv layers of kernel {kernel_size}, stride {stride}')
        self.grid_size = tuple(grid)
        self.num_patches = grid[0] * grid[1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    @property
    def proj(self) -> nn.Conv2d:
        """The first conv: `proj.in_channels` is the input channel count, as for timm's PatchEmbed."""
        return self.conv_layers[0][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fixed unpacking and torch._assert (as timm's PatchEmbed): both trace with torch.fx and script.
        _, _, H, W = x.shape
        msg = f'input {H}x{W} does not match the model ({self.img_size[0]}x{self.img_size[1]}); build it with img_size='
        torch._assert(H == self.img_size[0], msg)
        torch._assert(W == self.img_size[1], msg)
        return self.conv_layers(x).flatten(2).transpose(1, 2)


class CCTBlock(Block):
    """timm's Block (same submodules and key names) in CCT's order: the residual stream is normalised before the MLP."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(x)))


def sinusoidal_embedding(num_tokens: int, dim: int) -> torch.Tensor:
    """1×N×D fixed sine/cosine table, as the official CCT's 'sine' positional embedding."""
    pos = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    i = torch.arange(dim)
    table = pos / torch.pow(10000.0, (2 * (i // 2)).double() / dim)
    table[:, 0::2] = table[:, 0::2].sin()
    table[:, 1::2] = table[:, 1::2].cos()
    return table.float().unsqueeze(0)


class CompactTransformer(nn.Module):
    """CCT: conv tokenizer + positional embedding + transformer blocks + final norm + sequence pooling + head.

    Size overrides (as `timm.create_model` kwargs): img_size, in_chans, num_classes, embed_dim, depth, num_heads,
    mlp_ratio, n_conv_layers, kernel_size, stride, padding, conv_planes (tokenizer's inner channels),
    positional_embedding ('learnable' | 'sine' | 'none'). Regularisation defaults are CCT's: attention dropout 0.1,
    stochastic depth 0.1 (linearly increasing over the blocks), no dropout. The registered factories also take
    `shrink={'heads': [...], 'hidden': [...]}`, a pruned shape (models/pruning.py), as the ViT students do.
    """

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 384,
                 depth: int = 14, num_heads: int = 6, mlp_ratio: float = 3.0, n_conv_layers: int = 2,
                 kernel_size: int = 7, stride: int | None = None, padding: int | None = None,
                 pooling_kernel_size: int = 3, pooling_stride: int = 2, pooling_padding: int = 1,
                 conv_planes: int = 64, positional_embedding: str = 'learnable', global_pool: str = 'seq',
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.1, drop_path_rate: float = 0.1):
        super().__init__()
        if positional_embedding not in POS_EMBED_TYPES:
            raise ValueError(f'positional_embedding must be one of {POS_EMBED_TYPES}, got {positional_embedding!r}')
        if global_pool != 'seq':
            raise ValueError(f"CCT pools by sequence pooling only (global_pool='seq'), got {global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0  # no class token: every token is an image token
        self.no_embed_class = True

        self.patch_embed = ConvTokenizer(img_size, in_chans, embed_dim, n_conv_layers, kernel_size, stride, padding,
                                         pooling_kernel_size, pooling_stride, pooling_padding, conv_planes)
        num_tokens = self.patch_embed.num_patches
        if positional_embedding == 'learnable':
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
            trunc_normal_(self.pos_embed, std=.2)
        elif positional_embedding == 'sine':
            self.register_buffer('pos_embed', sinusoidal_embedding(num_tokens, embed_dim))
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        self.patch_drop = nn.Identity()  # timm ViT's stages, so layer-split code written for ViTs runs unchanged
        self.norm_pre = nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # torch.linspace, without a tensor
        self.blocks = nn.Sequential(*[CCTBlock(
            embed_dim, num_heads, mlp_ratio, qkv_bias=False, proj_drop=drop_rate, attn_drop=attn_drop_rate,
            drop_path=dpr[i], norm_layer=nn.LayerNorm) for i in range(depth)])
        reduction = self.patch_embed.img_size[0] // self.patch_embed.grid_size[0]
        self.feature_info = [{'module': f'blocks.{i}', 'num_chs': embed_dim, 'reduction': reduction}
                             for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim)
        self.attention_pool = nn.Linear(embed_dim, 1)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups as timm's ViT (stem, one group per block, final norm last), for layer-wise decay."""
        return {'stem': r'^pos_embed|patch_embed|norm_pre',
                'blocks': [(r'^blocks\.(\d+)', None), (r'^norm', (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != 'seq':
            raise ValueError(f"CCT pools by sequence pooling only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W -> B×N×D tokens after the final norm."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """As timm ViT's: the outputs of the blocks `indices` (last n if an int, all if None), B×D×H×W on the token
        grid ('NCHW') or B×N×D ('NLC'), final-normed if `norm`; with the final features unless `intermediates_only`.
        What `timm.create_model(..., features_only=True)` returns."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            x = checkpoint(blk, x) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.grid_size
            intermediates = [y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm / the classifier); the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence pooling: B×N×D -> B×D, the tokens weighted by softmax over N of attention_pool(x)."""
        weights = self.attention_pool(x).softmax(dim=1)  # B×N×1
        return (weights.transpose(1, 2) @ x).squeeze(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Called by models.checkpoint before loading: an official checkpoint's keys renamed, others unchanged."""
        return checkpoint_filter_fn(state_dict, self)


# Official key -> ours (applied in order to keys of the official checkpoints, e.g. cct_14_7x2_224_imagenet.pth).
_OFFICIAL_KEYS = [
    (r'^tokenizer\.', 'patch_embed.'),
    (r'^classifier\.positional_emb$', 'pos_embed'),
    (r'^classifier\.fc\.', 'head.'),
    (r'^classifier\.', ''),
    (r'\.self_attn\.', '.attn.'),
    (r'\.norm1\.', '.norm2.'),  # before pre_norm -> norm1, which would otherwise be renamed twice
    (r'\.pre_norm\.', '.norm1.'),
    (r'\.linear1\.', '.mlp.fc1.'),
    (r'\.linear2\.', '.mlp.fc2.'),
]


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None
                         ) -> dict[str, torch.Tensor]:
    """Rename the official CCT checkpoint's keys (`tokenizer.*`, `classifier.*`) to this module's; a state dict
    already in our names is returned as is."""
    if not any(k.startswith(('tokenizer.', 'classifier.')) for k in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _OFFICIAL_KEYS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _create_cct(variant: str, pretrained: bool = False, shrink=None, **kwargs) -> CompactTransformer:
    if pretrained:
        raise ValueError(f'{variant} has no hub weights here; load a local checkpoint with models.load_weights '
                         '(the official CCT checkpoints load directly)')
    model = build_model_with_cfg(CompactTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 feature_cfg={'out_indices': 3, 'feature_cls': 'getter'}, **kwargs)
    return reshape_(model, shrink) if shrink else model  # a shrunk student's pruned heads / neurons (models.pruning)


def _cfg(**kwargs):
    return student_cfg(crop_pct=.9, first_conv='patch_embed.conv_layers.0.0', **kwargs)


default_cfgs = generate_default_cfgs({'cct_14_7x2': _cfg(), 'decct': _cfg()})


@register_model
def cct_14_7x2(pretrained: bool = False, **kwargs) -> CompactTransformer:
    """CCT-14/7x2, the DeCCTs' teacher: 14 layers, 6 heads, dim 384, MLP ratio 3, two 7×7 conv layers (22.4M, 224²)."""
    model_args = {'embed_dim': 384, 'depth': 14, 'num_heads': 6, 'mlp_ratio': 3, 'n_conv_layers': 2, 'kernel_size': 7}
    return _create_cct('cct_14_7x2', pretrained, **dict(model_args, **kwargs))


@register_model
def decct(pretrained: bool = False, **kwargs) -> CompactTransformer:
    """DeCCT student: CCT-14/7x2 shrunk as the paper's decomposition does (heads 6 -> 4 at head size 64, so dim 256;
    14 -> 6 layers; MLP ratio 3 kept; tokenizer's inner channels 64 -> 32). Four of them plus the ensemble head make
    18.4M parameters and 5.05 GMACs at 224², against the paper's 18.3M / 5.1G for DeCCTs (docs/families.md)."""
    model_args = {'embed_dim': 256, 'depth': 6, 'num_heads': 4, 'mlp_ratio': 3, 'n_conv_layers': 2, 'kernel_size': 7,
                  'conv_planes': 32}
    return _create_cct('decct', pretrained, **dict(model_args, **kwargs))

