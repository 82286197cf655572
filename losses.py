"""Losses of the three stages.

Stage 1 (sub-teachers): base criterion. Stage 2 (decompose): DistillationLoss + relation_terms. Stage 3 (ensemble):
DistillationLoss + token_loss. Composite losses return (loss, parts) where parts holds detached tensors for logging.
"""
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

DISTILLATION_TYPES = ('none', 'soft', 'hard')
Parts = dict[str, torch.Tensor]


def build_base_criterion(mixup_active: bool, smoothing: float = 0.0) -> nn.Module:
    """As DeiT: soft-target CE under mixup/cutmix (mixup already smooths the targets), else label smoothing or CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, distillation_type: str,
            tau: float = 1.0) -> torch.Tensor:
    """KD between B×K logits.

    soft: KL(log_softmax(s/τ) ‖ log_softmax(t/τ)), summed, · τ² / numel(s), as DeiT. The teacher stays in log space
    (log_target=True) so probabilities that underflow to 0 never reach a log.
    hard: cross-entropy to the teacher's argmax.
    """
    if distillation_type == 'soft':
        return F.kl_div(
            F.log_softmax(student_logits / tau, dim=1),
            F.log_softmax(teacher_logits / tau, dim=1),
            reduction='sum',
            log_target=True,
        ) * (tau * tau) / student_logits.numel()
    if distillation_type == 'hard':
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
    raise ValueError(f'unknown distillation type {distillation_type!r}; choose from {DISTILLATION_TYPES}')


def _heads_concat(x: torch.Tensor) -> torch.Tensor:
    """B×H×N×d -> B×N×(H·d)."""
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relation KL for one of q, k, v of one layer.

    student: B×H_s×N×d_s, teacher: B×H_t×N×d_t (heads and widths may differ; B and N may not).
    X = heads concatenated (B×N×(H·d)); R = X Xᵀ / sqrt(d) (N×N, d the model's own head size);
    L = KLDiv(log_softmax(R_s), log_softmax(R_t), reduction='batchmean', log_target=True).
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(f'relation_loss expects B×H×N×d tensors, got {tuple(student.shape)} and '
                         f'{tuple(teacher.shape)}')
    if student.shape[0] != teacher.shape[0] or student.shape[2] != teacher.shape[2]:
        raise ValueError(f'relation_loss needs the same batch and token count: student B={student.shape[0]} '
                         f'N={student.shape[2]}, teacher B={teacher.shape[0]} N={teacher.shape[2]}')
    # N×N logits over wide dot products can overflow fp16: compute in fp32 even under autocast.
    with torch.autocast(device_type=student.device.type, enabled=False):
        rel = []
        for x in (student, teacher):
            xs = _heads_concat(x.float())
            rel.append(F.log_softmax(xs @ xs.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1))
        return F.kl_div(rel[0], rel[1], reduction='batchmean', log_target=True)


def relation_terms(
        student_qkv: Mapping[int, Sequence[torch.Tensor]],
        teacher_qkv: Mapping[int, Sequence[torch.Tensor]],
        pairs: Sequence[tuple[int, int]],
        gammas: Sequence[float],
        student_depth: int,
) -> tuple[torch.Tensor, Parts]:
    """Stage-2 relation add-on: Σ over (s, t) in pairs of γ0·L(q) + γ1·L(k) + γ2·L(v), divided by student_depth.

    student_qkv / teacher_qkv: {layer: (q, k, v)} from models.capture_qkv. Terms with γ = 0 are not computed.
    parts: 'rel_q', 'rel_k', 'rel_v' (unweighted, summed over pairs, / depth) and 'relation' (the weighted total).
    """
    if len(gammas) != 3:
        raise ValueError(f'gammas must be 3 weights (q, k, v), got {list(gammas)}')
    total = None
    parts: Parts = {}
    for j, (name, gamma) in enumerate(zip(('rel_q', 'rel_k', 'rel_v'), gammas, strict=True)):
        if gamma == 0:
            continue
        term = sum(relation_loss(student_qkv[s][j], teacher_qkv[t][j]) for s, t in pairs) / student_depth
        parts[name] = term.detach()
        total = gamma * term if total is None else total + gamma * term
    if total is None:
        ref = next(iter(student_qkv.values()))[0] if student_qkv else torch.zeros(())
        total = ref.new_zeros(())
    parts['relation'] = total.detach()
    return total, parts


def token_loss(feat_cls: torch.Tensor, teacher_cls: torch.Tensor, feat_dist: torch.Tensor | None = None,
               teacher_dist: torch.Tensor | None = None) -> tuple[torch.Tensor, Parts]:
    """Stage-3 token matching: MSE(ensemble cls, teacher cls) + MSE(ensemble dist, teacher dist), B×D each.

    The dist term is skipped when either side has no distillation token (e.g. a ViT-L teacher).
    """
    loss = F.mse_loss(feat_cls, teacher_cls)
    parts: Parts = {'token_cls': loss.detach()}
    if feat_dist is not None and teacher_dist is not None:
        dist = F.mse_loss(feat_dist, teacher_dist)
        parts['token_dist'] = dist.detach()
        loss = loss + dist
    return loss, parts


def split_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cls logits, dist logits or None) from a tensor, a (logits, logits_dist) tuple, or Features/EnsembleOutput."""
    if torch.is_tensor(outputs):
        return outputs, None
    if hasattr(outputs, 'logits'):
        return outputs.logits, outputs.logits_dist
    logits, logits_dist = outputs
    return logits, logits_dist


class DistillationLoss(nn.Module):
    """DeiT's distillation wrapper around a base criterion.

    outputs: B×K logits, or (cls logits, dist logits) / Features / EnsembleOutput. The base criterion is applied
    to the cls logits; KD (vs teacher_logits, B×K) to the dist logits, or to the only logits when the model has no
    distillation head (`devit` students). loss = (1-α)·base + α·KD; 'none' returns the base loss exactly.
    """

    def __init__(self, base_criterion: nn.Module, distillation_type: str = 'none', alpha: float = 0.5,
                 tau: float = 1.0):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f'unknown distillation type {distillation_type!r}; choose from {DISTILLATION_TYPES}')
        self.base_criterion = base_criterion
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, outputs: Any, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, Parts]:
        logits, logits_dist = split_outputs(outputs)
        base = self.base_criterion(logits, targets)
        if self.distillation_type == 'none':
            return base, {'base': base.detach()}
        if teacher_logits is None:
            raise ValueError(f'distillation type {self.distillation_type!r} needs teacher_logits')
        kd = kd_loss(logits if logits_dist is None else logits_dist, teacher_logits, self.distillation_type,
                     self.tau)
        loss = base * (1 - self.alpha) + kd * self.alpha
        return loss, {'base': base.detach(), 'kd': kd.detach()}
