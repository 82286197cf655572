"""Shrinking a student: gates on attention heads and MLP neurons, importance, and physical pruning.

Gates (`gated`) are forward pre-hooks, so timm's ViT is never forked:
- head gates multiply the input of `blocks[l].attn.proj` (B×N×(H·d), the heads' outputs side by side) per head;
- neuron gates multiply the input of `blocks[l].mlp.fc2` (B×N×hidden, the activations after GELU) per neuron.

Importance (`importance`) of a head or neuron is E_x |∂L/∂g| at g = 1 (Michel et al., 2019, "Are Sixteen Heads
Really Better than One?"), L the cross-entropy of the model's eval logits on the division's labels. The gates are
per sample (B×H), so one backward gives every sample's own gradient and the absolute value is taken per sample.

Pruning (`prune_`) removes rows and columns, so the result is smaller and faster: q, k and v rows of the fused
`attn.qkv` and `attn.proj` columns per head; `mlp.fc1` rows and `mlp.fc2` columns per neuron. timm's Attention
(1.0.31) reshapes with `num_heads`, `head_dim` and `attn_dim`, which are updated, so its own forward runs the
pruned shapes (fused attention kept).

Two descriptions of a pruned model:
- its *shape*, `{'heads': [H'_l], 'hidden': [h'_l]}` per layer: all a rebuild needs (`reshape_(fresh_model, shape)`
  then load the weights). An ensemble's backbone spec carries it as `kwargs['shrink']`, which
  `models.ensemble_model.create_backbone` (so `build_ensemble` and the collaborative runtime) applies after timm
  builds the whole model; works for every student whose blocks are timm Blocks (`dedeit`, `devit`, `decct`);
- its *policy*, the shape plus which heads/neurons of the parent were kept (`kept_heads`, `kept_neurons`), their
  importances and the ratios: what `shrink.py` writes to `shrink.json` and to the checkpoint's `shrink_policy`.
"""
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from .checkpoint import CheckpointError, extract_state_dict, load_state_dict_checked, read_checkpoint
from .features import get_blocks

Shape = dict[str, list[int]]

POLICY_FILE = 'shrink.json'
PRUNED_FILE = 'pruned.pth'


# ----------------------------------------------------------------------------------------------------------------
# Model structure
# ----------------------------------------------------------------------------------------------------------------

def _attn(block: nn.Module) -> nn.Module:
    attn = getattr(block, 'attn', None)
    if attn is None:
        raise TypeError(f'{type(block).__name__} has no `attn`; shrinking needs timm ViT blocks')
    for name in ('qkv', 'proj', 'num_heads', 'head_dim', 'attn_dim'):
        if not hasattr(attn, name):
            # timm < 1.0.20 reshaped the attention output with the embed width C, which pruned heads break.
            raise TypeError(f'{type(attn).__name__} has no `{name}`: head pruning needs timm>=1.0.20\'s Attention')
    if getattr(attn, 'gate', None) is not None or not isinstance(getattr(attn, 'norm', nn.Identity()), nn.Identity):
        raise TypeError('head pruning does not support gated or scale-normed attention')
    return attn


def _mlp(block: nn.Module) -> nn.Module:
    mlp = getattr(block, 'mlp', None)
    if not isinstance(mlp, Mlp) or not isinstance(mlp.norm, nn.Identity):
        raise TypeError(f'neuron pruning needs timm\'s plain Mlp (fc1 -> act -> fc2), got {type(mlp).__name__}')
    return mlp


def model_shape(model: nn.Module) -> Shape:
    """Current per-layer head counts and MLP hidden sizes."""
    blocks = get_blocks(model)
    return {'heads': [int(_attn(b).num_heads) for b in blocks],
            'hidden': [int(_mlp(b).fc1.out_features) for b in blocks]}


def shape_of(spec: Mapping[str, Any]) -> Shape:
    """The rebuild shape of a shape, a policy or a checkpoint's `shrink_policy`."""
    try:
        return {'heads': [int(h) for h in spec['heads']], 'hidden': [int(h) for h in spec['hidden']]}
    except (KeyError, TypeError) as err:
        raise ValueError(f'a shrink spec needs per-layer lists "heads" and "hidden", got {dict(spec)!r}') from err


# ----------------------------------------------------------------------------------------------------------------
# Gates
# ----------------------------------------------------------------------------------------------------------------

def _head_hook(gate: torch.Tensor, num_heads: int):
    def hook(module, args):
        x = args[0]  # B×N×(H·d)
        B, N, C = x.shape
        g = gate.reshape(-1, 1, num_heads, 1).to(x.dtype)  # (1 or B)×1×H×1
        return ((x.reshape(B, N, num_heads, C // num_heads) * g).reshape(B, N, C),) + tuple(args[1:])
    return hook


def _neuron_hook(gate: torch.Tensor):
    def hook(module, args):
        x = args[0]  # B×N×hidden
        return (x * gate.reshape(-1, 1, x.shape[-1]).to(x.dtype),) + tuple(args[1:])
    return hook


@contextmanager
def gated(model: nn.Module, head_gates: Sequence[torch.Tensor | None] | None = None,
          neuron_gates: Sequence[torch.Tensor | None] | None = None) -> Iterator[nn.Module]:
    """Inside the block, layer l's heads are scaled by `head_gates[l]` (H_l or B×H_l) and its MLP neurons by
    `neuron_gates[l]` (hidden_l or B×hidden_l); None skips a layer. Hooks are removed on exit."""
    blocks = get_blocks(model)
    handles = []
    try:
        for gates, kind in ((head_gates, 'head'), (neuron_gates, 'neuron')):
            if gates is None:
                continue
            if len(gates) != len(blocks):
                raise ValueError(f'{len(gates)} {kind} gates for a model with {len(blocks)} blocks')
            for block, g in zip(blocks, gates, strict=True):
                if g is None:
                    continue
                if kind == 'head':
                    attn = _attn(block)
                    handles.append(attn.proj.register_forward_pre_hook(_head_hook(g, attn.num_heads)))
                else:
                    handles.append(_mlp(block).fc2.register_forward_pre_hook(_neuron_hook(g)))
        yield model
    finally:
        for h in handles:
            h.remove()


def importance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               device: torch.device | str = 'cpu', max_batches: int | None = None
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Per-layer head and neuron importance, sum over samples of |∂CE/∂g| at g = 1, in eval mode.

    Returns (head scores: a H_l tensor per layer, neuron scores: a hidden_l tensor per layer, number of samples).
    Sums, not means, so shards of a distributed run add up; divide by the count for a mean.
    """
    shape = model_shape(model)
    heads = [torch.zeros(h, dtype=torch.float64) for h in shape['heads']]
    neurons = [torch.zeros(h, dtype=torch.float64) for h in shape['hidden']]
    was_training = model.training
    model.eval()
    count = 0
    for step, (x, y) in enumerate(batches):
        if max_batches is not None and step >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        B = x.shape[0]
        hg = [torch.ones(B, h, device=device, requires_grad=True) for h in shape['heads']]
        ng = [torch.ones(B, h, device=device, requires_grad=True) for h in shape['hidden']]
        with gated(model, hg, ng):
            loss = F.cross_entropy(model(x), y, reduction='sum')
        grads = torch.autograd.grad(loss, hg + ng)
        for acc, g in zip(heads + neurons, grads, strict=True):
            acc += g.detach().abs().sum(0).double().cpu()
        count += B
    model.train(was_training)
    return heads, neurons, count


# ----------------------------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------------------------

def _slice_linear(linear: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None
                  ) -> nn.Linear:
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if out_idx is not None:
        w = w[out_idx]
        b = b[out_idx] if b is not None else None
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if b is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _check_keep(keep: Sequence[int], n: int, what: str) -> torch.Tensor:
    idx = sorted({int(i) for i in keep})
    if not idx:
        raise ValueError(f'{what}: keep at least one')
    if len(idx) != len(keep) or idx[0] < 0 or idx[-1] >= n:
        raise ValueError(f'{what}: kept indices {list(keep)} must be distinct and within 0..{n - 1}')
    return torch.tensor(idx, dtype=torch.long)


def prune_heads_(block: nn.Module, keep: Sequence[int]) -> None:
    """Keep the heads `keep` of `block.attn`: q, k, v rows of `qkv` (laid out 3×H×d) and the columns of `proj`."""
    attn = _attn(block)
    H, d = attn.num_heads, attn.head_dim
    idx = _check_keep(keep, H, 'heads')
    cols = (idx[:, None] * d + torch.arange(d)).flatten()  # this head's slots inside one of q / k / v
    rows = torch.cat([cols + j * H * d for j in range(3)])
    attn.qkv = _slice_linear(attn.qkv, out_idx=rows.to(attn.qkv.weight.device))
    attn.proj = _slice_linear(attn.proj, in_idx=cols.to(attn.proj.weight.device))
    attn.num_heads = len(idx)
    attn.attn_dim = len(idx) * d  # head_dim and scale are unchanged


def prune_neurons_(block: nn.Module, keep: Sequence[int]) -> None:
    """Keep the MLP hidden neurons `keep`: rows of `fc1`, columns of `fc2`."""
    mlp = _mlp(block)
    idx = _check_keep(keep, mlp.fc1.out_features, 'neurons').to(mlp.fc1.weight.device)
    mlp.fc1 = _slice_linear(mlp.fc1, out_idx=idx)
    mlp.fc2 = _slice_linear(mlp.fc2, in_idx=idx)


def prune_(model: nn.Module, kept_heads: Sequence[Sequence[int] | None],
           kept_neurons: Sequence[Sequence[int] | None]) -> nn.Module:
    """Prune in place to the given per-layer kept heads / neurons (None keeps a layer whole); returns `model`."""
    blocks = get_blocks(model)
    if len(kept_heads) != len(blocks) or len(kept_neurons) != len(blocks):
        raise ValueError(f'a policy for {len(kept_heads)}/{len(kept_neurons)} layers given to a model with '
                         f'{len(blocks)} blocks')
    for block, heads, neurons in zip(blocks, kept_heads, kept_neurons, strict=True):
        if heads is not None:
            prune_heads_(block, heads)
        if neurons is not None:
            prune_neurons_(block, neurons)
    return model


def reshape_(model: nn.Module, shape: Mapping[str, Any]) -> nn.Module:
    """Give a fresh model the pruned `shape` (the first H'_l heads and h'_l neurons; weights are loaded after)."""
    shape = shape_of(shape)
    full = model_shape(model)
    if len(shape['heads']) != len(full['heads']) or len(shape['hidden']) != len(full['hidden']):
        raise ValueError(f'shrink spec for {len(shape["heads"])} layers, model has {len(full["heads"])} blocks')
    for key in ('heads', 'hidden'):
        bad = [(i, s, f) for i, (s, f) in enumerate(zip(shape[key], full[key], strict=True)) if not 1 <= s <= f]
        if bad:
            raise ValueError(f'shrink spec {key} out of range at layers {[(i, s) for i, s, _ in bad]} '
                             f'(model has {full[key]})')
    return prune_(model, [range(h) if h != f else None for h, f in zip(shape['heads'], full['heads'], strict=True)],
                  [range(h) if h != f else None for h, f in zip(shape['hidden'], full['hidden'], strict=True)])


def keep_count(n: int, ratio: float) -> int:
    """How many of n to keep for a kept fraction `ratio`: round half up, at least one, at most n."""
    return min(n, max(1, math.floor(ratio * n + 0.5)))


def select(scores: Sequence[torch.Tensor], ratio: float) -> list[list[int]]:
    """Per layer, the indices (ascending) of the keep_count(n, ratio) highest scores; ties keep the lower index."""
    kept = []
    for s in scores:
        order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
        kept.append(sorted(order[:keep_count(len(s), ratio)]))
    return kept


def make_policy(head_scores: Sequence[torch.Tensor], neuron_scores: Sequence[torch.Tensor], head_ratio: float,
                neuron_ratio: float, **info: Any) -> dict[str, Any]:
    """A JSON-able policy: kept heads/neurons per layer (ratios = fractions kept) and the rebuild shape."""
    kept_heads, kept_neurons = select(head_scores, head_ratio), select(neuron_scores, neuron_ratio)
    return {
        'heads': [len(k) for k in kept_heads],
        'hidden': [len(k) for k in kept_neurons],
        'kept_heads': kept_heads,
        'kept_neurons': kept_neurons,
        'parent_heads': [len(s) for s in head_scores],
        'parent_hidden': [len(s) for s in neuron_scores],
        'head_ratio': head_ratio,
        'neuron_ratio': neuron_ratio,
        'ratio_meaning': 'fraction kept per layer (at least one head and one neuron per layer)',
        'head_importance': [[float(v) for v in s] for s in head_scores],
        'neuron_importance': [[float(v) for v in s] for s in neuron_scores],
        **info,
    }


def apply_policy_(model: nn.Module, policy: Mapping[str, Any]) -> nn.Module:
    """Prune a model of the policy's parent shape to the policy (its kept heads and neurons, with their weights)."""
    full = model_shape(model)
    parent = {'heads': policy.get('parent_heads', full['heads']), 'hidden': policy.get('parent_hidden', full['hidden'])}
    if parent != full:
        raise ValueError(f'the shrink policy was made for a model of shape {parent}, this one is {full}')
    return prune_(model, policy['kept_heads'], policy['kept_neurons'])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def infer_shape(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Shape | None:
    """The pruned shape a state dict implies for `model`'s architecture (head_dim from the model), or None when
    the state dict is not a pruned version of it (unpruned, or another architecture: left to the loader's check)."""
    try:
        full = model_shape(model)
    except TypeError:
        return None
    shape: Shape = {'heads': [], 'hidden': []}
    for i, block in enumerate(get_blocks(model)):
        qkv, fc1 = state_dict.get(f'blocks.{i}.attn.qkv.weight'), state_dict.get(f'blocks.{i}.mlp.fc1.weight')
        if qkv is None or fc1 is None or qkv.dim() != 2 or fc1.dim() != 2:
            return None
        step = 3 * block.attn.head_dim
        if qkv.shape[0] % step or not 1 <= qkv.shape[0] // step <= full['heads'][i] \
                or not 1 <= fc1.shape[0] <= full['hidden'][i]:
            return None
        shape['heads'].append(qkv.shape[0] // step)
        shape['hidden'].append(int(fc1.shape[0]))
    return None if shape == full else shape


def checkpoint_shape(ckpt: Mapping[str, Any], model: nn.Module,
                     state_dict: Mapping[str, torch.Tensor] | None = None) -> Shape | None:
    """A student checkpoint's pruned shape: its `shrink_policy`, else inferred from its state dict; None if unpruned."""
    if ckpt.get('shrink_policy') is not None:
        return shape_of(ckpt['shrink_policy'])
    if state_dict is None:
        state_dict = extract_state_dict(ckpt)
    return infer_shape(model, state_dict)


def resolve_shrink_source(source: str | os.PathLike, division: int | None = None) -> str:
    """`--load-shrink`: a shrink.py output folder (division i: `sub-dataset{i}/pruned.pth`), a pruned checkpoint,
    or a `shrink.json` policy file."""
    source = os.fspath(source)
    if os.path.isdir(source):
        sub = os.path.join(source, f'sub-dataset{division or 0}')
        for name in (PRUNED_FILE, 'checkpoint.pth', POLICY_FILE):
            if os.path.isfile(os.path.join(sub, name)):
                return os.path.join(sub, name)
        raise CheckpointError(f'--load-shrink {source} has nothing for division {division or 0} '
                              f'(expected {os.path.join(sub, PRUNED_FILE)})')
    if not os.path.isfile(source):
        raise CheckpointError(f'--load-shrink {source} does not exist')
    return source


def read_policy(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            policy = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f'cannot read shrink policy {os.fspath(path)}: {err}') from None
    if not isinstance(policy, dict) or 'kept_heads' not in policy or 'kept_neurons' not in policy:
        raise CheckpointError(f'{os.fspath(path)} is not a shrink policy (no kept_heads / kept_neurons)')
    return policy


def load_shrunk(model: nn.Module, source: str | os.PathLike, division: int | None = None,
                use_ema: bool = False) -> nn.Module:
    """Shrink a freshly built student in place for re-distillation (`distill_sub.py --load-shrink`).

    source: a pruned checkpoint (or shrink.py's output folder): the model takes its pruned shape and its weights
    (classifier reset when the class count differs); or a `shrink.json` policy: the model, holding the unpruned
    weights it was given (`--model-path`), keeps the policy's heads and neurons with their weights.
    """
    path = resolve_shrink_source(source, division)
    if path.endswith('.json'):
        return apply_policy_(model, read_policy(path))
    ckpt = read_checkpoint(path)
    state_dict = extract_state_dict(ckpt, use_ema=use_ema, source=path)
    shape = checkpoint_shape(ckpt, model, state_dict)
    if shape is None:
        raise CheckpointError(f'--load-shrink {path} is not a pruned version of this student (its shapes are the '
                              f'unpruned ones or another architecture\'s); give the output of shrink.py')
    reshape_(model, shape)
    load_state_dict_checked(model, state_dict, reset_head=True, what='shrunk student', source=path)
    return model
