"""Matching a student to a teacher of another width, depth or head count.

Depth: `layer_pairs` maps student layers to teacher layers. Heads: the relation loss concatenates heads, so head counts
need no mapping. Width: the relation matrices are N×N whatever the width, so no projection is needed for them; a
learned Linear(student_dim -> teacher_dim) is available for tokens and, optionally, for q/k/v themselves.
"""
import math
from collections.abc import Mapping

import torch
from torch import nn

from .features import QKV, get_blocks

LAYER_MODES = ('middle', 'all')


def layer_pairs(student_depth: int, teacher_depth: int, mode: str = 'middle') -> list[tuple[int, int]]:
    """Student->teacher layer pairs (0-based).

    'middle' (the paper's code): the single pair (L_s/2 - 1, L_t/2 - 1), clamped at 0 for one-layer models.
    'all': every student layer s -> round_half_up((s + 1) · L_t / L_s) - 1, so the last layers meet and the map is
    the identity when depths are equal.
    """
    if student_depth < 1 or teacher_depth < 1:
        raise ValueError(f'depths must be >= 1, got student {student_depth}, teacher {teacher_depth}')
    if mode == 'middle':
        return [(max(student_depth // 2 - 1, 0), max(teacher_depth // 2 - 1, 0))]
    if mode == 'all':
        return [(s, min(max(math.floor((s + 1) * teacher_depth / student_depth + 0.5) - 1, 0), teacher_depth - 1))
                for s in range(student_depth)]
    raise ValueError(f'unknown layer mode {mode!r}; choose from {LAYER_MODES}')


def token_count(source: nn.Module | Mapping[int, QKV]) -> int:
    """Tokens N a model's blocks see (patches + prefix tokens), or N of captured q/k/v ({layer: (q, k, v)})."""
    if isinstance(source, nn.Module):
        return source.patch_embed.num_patches + source.num_prefix_tokens
    return next(iter(source.values()))[0].shape[-2]


def check_token_counts(student: nn.Module | Mapping[int, QKV], teacher: nn.Module | Mapping[int, QKV]) -> None:
    """Relations compare N×N token matrices, so both must see the same number of tokens N.

    student/teacher: the models (checked before training, from their patch embedding and prefix tokens), or the
    q/k/v they gave for some layers (every layer of a ViT has the same token count). ValueError on a mismatch.
    """
    counts = [token_count(m) for m in (student, teacher)]
    if counts[0] != counts[1]:
        raise ValueError(f'token count mismatch: the student has {counts[0]} tokens, the teacher {counts[1]}; give '
                         f'both the same input size and patch size, and both a distillation token or neither')


def _attn_dims(model: nn.Module) -> tuple[int, int]:
    """(num_heads, attention width H·d) of the first block."""
    attn = get_blocks(model)[0].attn
    return attn.num_heads, attn.qkv.out_features // 3


class FeatureAdapter(nn.Module):
    """Maps student features to the teacher's: layer pairs, token projection and optional q/k/v projection.

    project_tokens: Linear(student_dim -> teacher_dim) for B×...×student_dim tokens (Identity if the widths agree).
    project_qkv: one Linear per q/k/v from the student's attention width to the teacher's; the projected student
    features are reshaped to the teacher's head count, so relations are then taken at the teacher's head size.
    Only modules that are switched on hold parameters (unused parameters upset DDP).
    """

    def __init__(
            self,
            student_dim: int,
            teacher_dim: int,
            student_depth: int,
            teacher_depth: int,
            mode: str = 'middle',
            *,
            project_tokens: bool = False,
            project_qkv: bool = False,
            student_attn_dim: int | None = None,
            teacher_attn_dim: int | None = None,
            teacher_heads: int | None = None,
    ):
        super().__init__()
        self.pairs = layer_pairs(student_depth, teacher_depth, mode)
        self.student_depth = student_depth
        self.teacher_dim = teacher_dim
        self.token_proj = nn.Linear(student_dim, teacher_dim) if project_tokens and student_dim != teacher_dim \
            else nn.Identity()
        self.qkv_proj = None
        if project_qkv:
            if teacher_heads is None:
                raise ValueError('project_qkv needs teacher_heads')
            s_attn, t_attn = student_attn_dim or student_dim, teacher_attn_dim or teacher_dim
            self.teacher_heads = teacher_heads
            self.qkv_proj = nn.ModuleList(nn.Linear(s_attn, t_attn) for _ in range(3))

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, mode: str = 'middle', **kwargs) -> 'FeatureAdapter':
        """Sizes read from the models themselves (num_features, blocks, attention widths and heads)."""
        _, s_attn = _attn_dims(student)
        t_heads, t_attn = _attn_dims(teacher)
        return cls(student.num_features, teacher.num_features, len(get_blocks(student)), len(get_blocks(teacher)),
                   mode, student_attn_dim=s_attn, teacher_attn_dim=t_attn, teacher_heads=t_heads, **kwargs)

    @property
    def student_layers(self) -> list[int]:
        return sorted({s for s, _ in self.pairs})

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for _, t in self.pairs})

    def project_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """B×...×student_dim -> B×...×teacher_dim."""
        return self.token_proj(x)

    def _project(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        B, _, N, _ = x.shape
        y = proj(x.transpose(1, 2).reshape(B, N, -1))  # heads concatenated: B×N×(H_s·d_s) -> B×N×(H_t·d_t)
        return y.reshape(B, N, self.teacher_heads, -1).transpose(1, 2)

    def forward(self, student_qkv: Mapping[int, QKV], teacher_qkv: Mapping[int, QKV]
                ) -> tuple[dict[int, QKV], Mapping[int, QKV]]:
        """Check token counts and, with project_qkv, project the student's q/k/v; returns (student, teacher) dicts."""
        check_token_counts(student_qkv, teacher_qkv)
        if self.qkv_proj is None:
            return dict(student_qkv), teacher_qkv
        projected = {i: tuple(self._project(x, proj) for x, proj in zip(qkv, self.qkv_proj, strict=True))
                     for i, qkv in student_qkv.items()}
        return projected, teacher_qkv
