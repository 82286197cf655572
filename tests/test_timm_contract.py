"""Every model the project registers with timm keeps timm's model contract, checked the way timm checks its own
models (its tests/test_models.py: forward, default cfgs, TorchScript, FX forward / backward, FX + TorchScript):
TorchScript, torch.fx (plain symbolic_trace and timm's FX feature extraction), FX backward, FX then TorchScript,
each giving eager's outputs; a complete pretrained_cfg; forward_features / forward_head(pre_logits=True) /
reset_classifier(0) as timm's ViTs; gradient checkpointing.

Parametrised over timm's registry (every entrypoint defined in this repository's `models` package), at the default
input size (224², 3 channels; depth 2 to stay fast, as timm's own tests shrink models) and at the demo's size
(28×28 grey images).
"""
import functools

import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names, get_model_input_config, model_entrypoint
from timm.models.vision_transformer import VisionTransformer

import models
from models.cct import CompactTransformer
from models.pruning import model_shape, reshape_

pytestmark = [
    pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning'),
    # CCT's DropPath differs between train and eval graphs; the nodes returned here exist in both
    pytest.mark.filterwarnings('ignore:NOTE. The nodes obtained by tracing the model in eval mode:UserWarning'),
]

REGISTERED = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.split('.')[0] == models.__name__)
SIZES = ('default', 'demo')
TOL = 1e-5

# The demo's shapes: 28×28 grey images; ViTs cut 7×7 patches, CCTs tokenize with three 3×3 conv + pool layers.
DEMO_KW = {
    VisionTransformer: {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 64, 'depth': 2, 'num_heads': 2},
    CompactTransformer: {'img_size': 28, 'in_chans': 1, 'kernel_size': 3, 'n_conv_layers': 3, 'conv_planes': 16,
                         'embed_dim': 64, 'depth': 2, 'num_heads': 2},
}
DEFAULT_KW = {'depth': 2}


@functools.cache
def model_class(name: str) -> type:
    return type(timm.create_model(name, depth=1, num_classes=0))


def size_kwargs(name: str, size: str) -> dict:
    if size == 'default':
        return DEFAULT_KW
    for base, kw in DEMO_KW.items():
        if issubclass(model_class(name), base):
            return kw
    raise AssertionError(f'{name} ({model_class(name).__name__}) has no demo-size kwargs: add its family to DEMO_KW')


def build(name: str, size: str, **kw) -> torch.nn.Module:
    return timm.create_model(name, **{**size_kwargs(name, size), **kw})


def input_for(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    """A random batch of the shape timm reports for the model as built (channels and size from its traits)."""
    return torch.randn(batch, *get_model_input_config(model)['input_size'])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_registry_lists_the_project_models():
    assert {'dedeit', 'devit', 'decct', 'cct_14_7x2'} <= set(REGISTERED)
    assert all(timm.is_model(n) for n in REGISTERED)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('name', REGISTERED)
def test_pretrained_cfg_is_complete(name, size):
    model = build(name, size).eval()
    cfg, sd = model.pretrained_cfg, model.state_dict()
    assert cfg['architecture'] == name
    C, H, W = cfg['input_size']
    assert len(cfg['mean']) == len(cfg['std']) == C and all(s > 0 for s in cfg['std'])
    assert 0 < cfg['crop_pct'] <= 1 and cfg['interpolation'] and cfg['num_classes'] == 1000
    classifier = (cfg['classifier'],) if isinstance(cfg['classifier'], str) else cfg['classifier']
    for c in classifier:
        assert f'{c}.weight' in sd and sd[f'{c}.weight'].shape == (model.num_classes, model.num_features)
    # the first conv is the stem timm adapts for other channel counts: it reads the image channels
    conv = sd[f'{cfg["first_conv"]}.weight']
    assert conv.ndim == 4 and conv.shape[1] == model.in_chans
    # timm's current-input view of the model as built (the cfg keeps the source resolution) runs through it
    current = get_model_input_config(model)
    expected = (3, 224, 224) if size == 'default' else (1, 28, 28)
    assert current['input_size'] == expected and current['first_conv'] == cfg['first_conv']
    with torch.no_grad():
        assert model(input_for(model)).shape == (2, 1000)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('name', REGISTERED)
def test_features_head_and_reset_classifier(name, size):
    """As timm's test_model_default_cfgs_non_std, and the values agree, not only the shapes."""
    model = build(name, size, num_classes=7).eval()
    x = input_for(model)
    assert model.num_classes == 7 and model.num_features > 0 and model.head_hidden_size > 0
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (2, model.patch_embed.num_patches + model.num_prefix_tokens, model.num_features)
        assert pre.shape == (2, model.head_hidden_size)
        assert max_diff(model.forward_head(feats), logits) <= TOL
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert max_diff(model(x), pre) <= TOL  # no classifier: forward gives the pre-logits features
        model.reset_classifier(3)
        assert model.num_classes == 3 and model(x).shape == (2, 3)
        headless = build(name, size, num_classes=0).eval()
        assert headless(x).shape == (2, headless.num_features)


@pytest.mark.parametrize('name', REGISTERED)
def test_grad_checkpointing(name):
    """Checkpointed blocks recompute in backward (the first block runs twice) and give the same output and grads."""
    model = build(name, 'demo').eval()
    x = input_for(model)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def run():
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ref_out, ref_grads = run()
    assert len(calls) == 1
    model.set_grad_checkpointing()
    calls.clear()
    out, grads = run()
    assert len(calls) == 2
    assert max_diff(out, ref_out) <= TOL
    assert max(max_diff(g, r) for g, r in zip(grads, ref_grads)) <= TOL
    model.set_grad_checkpointing(False)
    calls.clear()
    run()
    assert len(calls) == 1


def _return_node(model: torch.nn.Module) -> str:
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes[-1] == eval_nodes[-1], (train_nodes[-1], eval_nodes[-1])
    return eval_nodes[-1]


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('name', REGISTERED)
def test_scripted_and_traced_match_eager(name, size):
    """torch.jit.script, torch.fx.symbolic_trace, timm's FX feature extractor and FX then TorchScript all give
    eager's outputs (timm's test_model_forward_torchscript / _forward_fx / _forward_fx_torchscript)."""
    with timm.set_scriptable(True):
        model = build(name, size).eval()
    x = input_for(model)
    with torch.no_grad():
        logits, feats = model(x), model.forward_features(x)
        scripted = torch.jit.script(model)
        traced = torch.fx.symbolic_trace(model)
        out = _return_node(model)
        extractor = create_feature_extractor(model, [out, 'norm'])
        fx_scripted = torch.jit.script(extractor)
        assert max_diff(scripted(x), logits) <= TOL
        assert max_diff(traced(x), logits) <= TOL
        for got in (extractor(x), fx_scripted(x)):
            assert max_diff(got[out], logits) <= TOL and max_diff(got['norm'], feats) <= TOL
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize('name', REGISTERED)
def test_shrunk_model_scripts_and_traces(name):
    """A shrunk student (fewer heads and MLP neurons per layer, models/pruning.py) keeps the contract too."""
    model = build(name, 'demo').eval()
    full = model_shape(model)
    reshape_(model, {'heads': [1] * len(full['heads']), 'hidden': [h // 2 for h in full['hidden']]})
    x = input_for(model)
    with torch.no_grad():
        logits = model(x)
        for converted in (torch.jit.script(model), torch.fx.symbolic_trace(model)):
            assert max_diff(converted(x), logits) <= TOL


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('name', REGISTERED)
def test_fx_backward(name, size):
    """timm's test_model_backward_fx: the traced model in train mode gives every parameter a gradient."""
    model = build(name, size, num_classes=42).train()
    extractor = create_feature_extractor(model, [_return_node(model)])
    out = torch.cat(tuple(extractor(input_for(model)).values()))
    out.mean().backward()
    missing = [n for n, p in extractor.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing}'
    assert sum(p.grad.numel() for p in extractor.parameters()) == sum(p.numel() for p in model.parameters())
    assert out.shape[-1] == 42 and torch.isfinite(out).all()


@pytest.mark.parametrize('name', [n for n in REGISTERED if issubclass(model_class(n), CompactTransformer)])
def test_cct_rejects_a_wrong_input_size(name):
    model = build(name, 'demo').eval()
    with pytest.raises(AssertionError, match='does not match the model'):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize('name', REGISTERED)
def test_forward_intermediates_and_features_only(name):
    """As timm's test_model_forward_intermediates(_features): block outputs on the token grid, the final features
    equal forward_features, and `features_only=True` wraps the model into a list of feature maps."""
    model = build(name, 'demo').eval()
    x = input_for(model)
    info = timm.models.FeatureInfo(model.feature_info, range(len(model.feature_info)))
    assert info.module_name() == [f'blocks.{i}' for i in range(len(model.blocks))]
    with torch.no_grad():
        feats = model.forward_features(x)
        final, maps = model.forward_intermediates(x)
        tokens = model.forward_intermediates(x, indices=[1], norm=True, output_fmt='NLC', intermediates_only=True)
    assert max_diff(final, feats) <= TOL and len(maps) == len(model.blocks)
    assert max_diff(tokens[0], feats[:, model.num_prefix_tokens:]) <= TOL  # last block, normed: the image tokens
    grid = model.patch_embed.grid_size
    for c, r, m in zip(info.channels(), info.reduction(), maps):
        assert m.shape == (2, c, *grid) and grid[0] <= -(-28 // r) + 1
    extractor = build(name, 'demo', features_only=True, out_indices=(0, 1)).eval()
    with torch.no_grad():
        outs = extractor(x)
    assert extractor.feature_info.channels() == [model.num_features] * 2
    assert [o.shape for o in outs] == [(2, model.num_features, *grid)] * 2
    assert all(torch.isfinite(o).all() for o in outs)
