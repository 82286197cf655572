import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from losses import (
    DistillationLoss,
    build_base_criterion,
    kd_loss,
    relation_loss,
    relation_terms,
    split_outputs,
    token_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


def _log_softmax(a, axis=-1):
    a = a - a.max(axis=axis, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=axis, keepdims=True))


def _relation_numpy(s, t):
    """The relation loss written out: heads concatenated, R = X X^T / sqrt(d_h), batchmean KL with log targets."""
    def rel(x):
        B, H, N, d = x.shape
        X = x.transpose(0, 2, 1, 3).reshape(B, N, H * d)
        return _log_softmax(X @ X.transpose(0, 2, 1) / np.sqrt(d))
    ls, lt = rel(s), rel(t)
    return (np.exp(lt) * (lt - ls)).sum() / s.shape[0]


def test_relation_loss_matches_numpy():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    expected = _relation_numpy(s.numpy(), t.numpy())
    assert relation_loss(s, t).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_relation_loss_zero_for_identical():
    x = torch.randn(3, 2, 7, 8)
    assert relation_loss(x, x.clone()).abs().item() < 1e-6


def test_relation_loss_heterogeneous_gradients():
    s = torch.randn(2, 3, 10, 16, requires_grad=True)  # width 48, 3 heads
    t = torch.randn(2, 12, 10, 64)  # width 768, 12 heads
    loss = relation_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_relation_loss_token_count_mismatch():
    with pytest.raises(ValueError, match='N=10.*N=6'):
        relation_loss(torch.randn(2, 3, 10, 16), torch.randn(2, 3, 6, 16))


def test_relation_loss_fp32_under_autocast():
    s, t = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = relation_loss(s, t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(relation_loss(s, t).item())


def test_soft_kd_equals_formula():
    g = torch.Generator().manual_seed(1)
    s, t, tau = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g), 2.0
    ls = _log_softmax(s.numpy() / tau)
    lt = _log_softmax(t.numpy() / tau)
    expected = (np.exp(lt) * (lt - ls)).sum() * tau * tau / s.numel()
    assert kd_loss(s, t, 'soft', tau).item() == pytest.approx(expected, rel=1e-5)


def test_hard_kd_uses_teacher_argmax():
    s = torch.randn(4, 5)
    t = torch.full((4, 5), -1.0)
    labels = torch.tensor([3, 0, 4, 1])
    t[torch.arange(4), labels] = 2.0
    assert torch.allclose(kd_loss(s, t, 'hard'), F.cross_entropy(s, labels))
    assert torch.allclose(kd_loss(s, 10 * t, 'hard'), F.cross_entropy(s, labels))  # only the argmax matters


def test_kd_unknown_type():
    with pytest.raises(ValueError, match='unknown distillation type'):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), 'medium')


@pytest.mark.parametrize('outputs_kind', ['tensor', 'tuple'])
def test_none_returns_base_loss_exactly(outputs_kind):
    base = torch.nn.CrossEntropyLoss()
    logits, logits_dist, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    outputs = logits if outputs_kind == 'tensor' else (logits, logits_dist)
    loss, parts = DistillationLoss(base, 'none')(outputs, y, teacher_logits=torch.randn(4, 5))
    assert torch.equal(loss, base(logits, y))
    assert set(parts) == {'base'}


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_distillation_loss_combines_base_and_kd_on_dist_head(kind):
    base = torch.nn.CrossEntropyLoss()
    logits, logits_dist, t = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    crit = DistillationLoss(base, kind, alpha=0.3, tau=2.0)
    loss, parts = crit((logits, logits_dist), y, t)
    expected = 0.7 * base(logits, y) + 0.3 * kd_loss(logits_dist, t, kind, 2.0)
    assert torch.allclose(loss, expected)
    assert torch.allclose(parts['kd'], kd_loss(logits_dist, t, kind, 2.0))
    # a model without a dist head distils on its only head
    loss_single, _ = crit(logits, y, t)
    assert torch.allclose(loss_single, 0.7 * base(logits, y) + 0.3 * kd_loss(logits, t, kind, 2.0))


def test_distillation_loss_needs_teacher():
    with pytest.raises(ValueError, match='teacher_logits'):
        DistillationLoss(torch.nn.CrossEntropyLoss(), 'soft')(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        DistillationLoss(torch.nn.CrossEntropyLoss(), 'bogus')


def test_split_outputs_named():
    from models import EnsembleOutput
    out = EnsembleOutput(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 3), None)
    a, b = split_outputs(out)
    assert a is out.logits and b is out.logits_dist


def test_base_criterion_choice():
    assert isinstance(build_base_criterion(True, 0.1), SoftTargetCrossEntropy)
    assert isinstance(build_base_criterion(False, 0.1), LabelSmoothingCrossEntropy)
    assert isinstance(build_base_criterion(False, 0.0), torch.nn.CrossEntropyLoss)
    soft_targets = torch.softmax(torch.randn(3, 4), dim=1)
    assert torch.isfinite(build_base_criterion(True)(torch.randn(3, 4), soft_targets))


def test_relation_terms_weighted_sum_over_pairs():
    g = torch.Generator().manual_seed(2)

    def qkv(h, d):
        return tuple(torch.randn(2, h, 6, d, generator=g) for _ in range(3))

    s_qkv = {1: qkv(2, 4), 3: qkv(2, 4)}
    t_qkv = {2: qkv(3, 8), 5: qkv(3, 8)}
    pairs, gammas, depth = [(1, 2), (3, 5)], (0.2, 0.1, 0.3), 4
    loss, parts = relation_terms(s_qkv, t_qkv, pairs, gammas, depth)
    expected = sum(gammas[j] * relation_loss(s_qkv[s][j], t_qkv[t][j]) for s, t in pairs for j in range(3)) / depth
    assert torch.allclose(loss, expected)
    assert set(parts) == {'rel_q', 'rel_k', 'rel_v', 'relation'}
    loss0, parts0 = relation_terms(s_qkv, t_qkv, pairs, (0.0, 0.1, 0.0), depth)
    assert set(parts0) == {'rel_k', 'relation'}
    assert torch.allclose(loss0, 0.1 * parts['rel_k'])


def test_token_loss():
    a, b, c, d = (torch.randn(3, 8) for _ in range(4))
    loss, parts = token_loss(a, b, c, d)
    assert torch.allclose(loss, F.mse_loss(a, b) + F.mse_loss(c, d))
    assert set(parts) == {'token_cls', 'token_dist'}
    loss_cls, parts_cls = token_loss(a, b, c, None)  # teacher without dist token (ViT-L)
    assert torch.allclose(loss_cls, F.mse_loss(a, b)) and set(parts_cls) == {'token_cls'}
