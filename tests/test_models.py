import argparse
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from losses import relation_terms
from models import (
    CheckpointError,
    DeViTEnsemble,
    EnsembleOutput,
    FeatureAdapter,
    build_ensemble,
    capture_qkv,
    check_token_counts,
    create_backbone,
    forward_features,
    layer_pairs,
    load_students,
    load_weights,
    prefix_tokens,
)
from models.stats import count_macs, model_stats
from models.stats import main as stats_main

TINY = {'img_size': 32, 'patch_size': 8, 'in_chans': 3, 'embed_dim': 32, 'depth': 3, 'num_heads': 2}


def tiny(name='dedeit', num_classes=5, **kw):
    return timm.create_model(name, num_classes=num_classes, **{**TINY, **kw})



@pytest.mark.parametrize('name', ['dedeit', 'devit'])
def test_registered_students(name):
    assert name in timm.list_models()
    model = tiny(name).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    if name == 'dedeit':
        model.set_distilled_training(True)
        model.train()
        cls_logits, dist_logits = model(torch.randn(2, 3, 32, 32))
        assert cls_logits.shape == dist_logits.shape == (2, 5)


def test_grayscale_student():
    model = tiny('dedeit', in_chans=1, img_size=28, patch_size=7).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)


def test_default_config():
    model = timm.create_model('dedeit')
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (192, 12, 3)
    assert model.patch_embed.patch_size == (16, 16) and model.pos_embed.shape == (1, 198, 192)
    assert model.num_classes == 1000 and model.pretrained_cfg['classifier'] == ('head', 'head_dist')
    assert model.dist_token is not None
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('dedeit', pretrained=True)


def test_parity_with_timm_deit_tiny():
    ref = timm.create_model('deit_tiny_distilled_patch16_224', img_size=64).eval()
    ours = timm.create_model('dedeit', img_size=64).eval()
    result = load_weights(ours, ref.state_dict())
    assert result.reset == [] and result.resampled == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
        feats = forward_features(ours, x)
    assert diff < 1e-5
    assert (feats.eval_logits() - ref(x)).abs().max().item() < 1e-5
    assert set(ours.state_dict()) == set(ref.state_dict())


def _manual_qkv(model, x, i):
    """q/k/v of block i from the block's own weights: norm1(block input) @ W_qkv^T + b, split into heads."""
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for blk in model.blocks[:i]:
            h = blk(h)
        attn = model.blocks[i].attn
        y = F.linear(model.blocks[i].norm1(h), attn.qkv.weight, attn.qkv.bias)
        B, N, _ = y.shape
        return y.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)


@pytest.mark.parametrize('name,kwargs', [
    ('dedeit', TINY),
    ('deit_base_distilled_patch16_224', {'img_size': 32, 'depth': 2}),
    ('vit_large_patch16_224', {'img_size': 32, 'depth': 2}),
])
def test_capture_qkv_matches_weights(name, kwargs):
    model = timm.create_model(name, num_classes=4, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = [0, len(model.blocks) - 1]
    with torch.no_grad(), capture_qkv(model, layers) as qkv:
        model(x)
    assert all(len(m.attn.qkv._forward_hooks) == 0 for m in model.blocks)
    heads = model.blocks[0].attn.num_heads
    for i in layers:
        manual = _manual_qkv(model, x, i)
        for j in range(3):
            assert qkv[i][j].shape == (2, heads, manual.shape[3], model.embed_dim // heads)
            assert torch.allclose(qkv[i][j], manual[j], atol=1e-5)


@pytest.mark.parametrize('name', ['dedeit', 'devit'])
def test_forward_features_one_pass(name):
    model = tiny(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = forward_features(model, x, qkv_layers=[1, -1])
        assert sorted(feats.qkv) == [1, 2]
        assert torch.allclose(feats.eval_logits(), model(x), atol=1e-6)
        tokens = prefix_tokens(model, x)
    if name == 'dedeit':
        assert torch.allclose(feats.logits, model.head(feats.cls))
        assert tokens.shape == (2, 64) and torch.allclose(tokens, torch.cat([feats.cls, feats.dist], 1))
    else:
        assert feats.logits_dist is None and feats.dist is None and tokens.shape == (2, 32)


def test_layer_pairs():
    assert layer_pairs(12, 12) == [(5, 5)]
    assert layer_pairs(12, 24) == [(5, 11)]
    assert layer_pairs(1, 1) == [(0, 0)]
    assert layer_pairs(12, 24, 'all') == [(s, 2 * s + 1) for s in range(12)]
    assert layer_pairs(4, 12, 'all') == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert layer_pairs(5, 5, 'all') == [(s, s) for s in range(5)]
    pairs = layer_pairs(12, 4, 'all')
    assert pairs[-1] == (11, 3) and all(0 <= t < 4 for _, t in pairs)
    with pytest.raises(ValueError, match='unknown layer mode'):
        layer_pairs(4, 4, 'first')


def test_adapter_heterogeneous_student_and_teacher():
    student = tiny('dedeit', embed_dim=32, depth=3, num_heads=2)
    teacher = tiny('dedeit', embed_dim=48, depth=4, num_heads=3).eval()
    for mode in ('middle', 'all'):
        adapter = FeatureAdapter.from_models(student, teacher, mode, project_tokens=True, project_qkv=True)
        x = torch.randn(2, 3, 32, 32)
        s = forward_features(student, x, adapter.student_layers)
        with torch.no_grad():
            t = forward_features(teacher, x, adapter.teacher_layers)
        s_qkv, t_qkv = adapter(s.qkv, t.qkv)
        assert s_qkv[adapter.pairs[0][0]][0].shape == t_qkv[adapter.pairs[0][1]][0].shape
        loss, _ = relation_terms(s_qkv, t_qkv, adapter.pairs, (0.2, 0.1, 0.3), 3)
        loss = loss + F.mse_loss(adapter.project_tokens(s.cls), t.cls)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())
        # without projection the raw relations work across widths and heads too
        raw, _ = relation_terms(s.qkv, t.qkv, adapter.pairs, (0.2, 0.1, 0.3), 3)
        assert torch.isfinite(raw)


def test_adapter_token_count_mismatch():
    student = tiny('dedeit')  # 32/8 -> 16 patches + 2 prefix tokens
    teacher = tiny('dedeit', patch_size=16).eval()  # 4 patches + 2
    x = torch.randn(1, 3, 32, 32)
    s = forward_features(student, x, [1])
    t = forward_features(teacher, x, [1])
    with pytest.raises(ValueError, match='18 tokens.*6'):
        check_token_counts(s.qkv, t.qkv)
    with pytest.raises(ValueError, match='token count mismatch'):
        FeatureAdapter(32, 32, 3, 3)(s.qkv, t.qkv)


def _backbones(sizes, name='dedeit'):
    return [create_backbone(name, {**TINY, **kw}) for kw in sizes]


@pytest.mark.parametrize('sizes', [
    [{'embed_dim': 32, 'num_heads': 2}, {'embed_dim': 48, 'num_heads': 3, 'depth': 2}],
    [{'embed_dim': 32}, {'embed_dim': 48, 'num_heads': 3}, {'embed_dim': 24, 'depth': 1, 'num_heads': 1},
     {'embed_dim': 64, 'num_heads': 4, 'depth': 2}],
])
def test_ensemble_forward(sizes):
    ens = DeViTEnsemble(_backbones(sizes), num_classes=10, embed_dim=40)
    x = torch.randn(3, 3, 32, 32)
    out = ens(x)  # train mode
    assert isinstance(out, EnsembleOutput)
    assert out.logits.shape == out.logits_dist.shape == (3, 10)
    assert out.feat_cls.shape == out.feat_dist.shape == (3, 40)
    (out.logits.sum() + out.logits_dist.sum()).backward()
    assert all(b.patch_embed.proj.weight.grad is not None for b in ens.backbones)
    ens.eval()
    with torch.no_grad():
        logits = ens(x)
        tokens = [ens.device_tokens(i, x) for i in range(ens.num_devices)]
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert [t.shape[1] for t in tokens] == [2 * s['embed_dim'] for s in sizes] == ens.token_widths()
    assert torch.allclose(ens.head_forward(tokens).eval_logits(), logits, atol=1e-6)
    rebuilt = build_ensemble(json.loads(json.dumps(ens.config)))
    rebuilt.load_state_dict(ens.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), logits, atol=1e-6)


def test_ensemble_missing_devices_and_dropout():
    ens = DeViTEnsemble(_backbones([{}, {'embed_dim': 48, 'num_heads': 3}]), 6, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = [ens.device_tokens(i, x) for i in range(2)]
        missing = ens.head_forward([tokens[0], None])
        masked = ens.head_forward(tokens, present_mask=[True, False])
        zeroed = ens.head_forward([tokens[0], torch.zeros_like(tokens[1])])
    assert torch.allclose(missing.logits, zeroed.logits) and torch.allclose(masked.logits, zeroed.logits)
    with pytest.raises(ValueError, match='device 1 sent 5 floats'):
        ens.head_forward([tokens[0], torch.zeros(2, 5)])
    drop = DeViTEnsemble(_backbones([{}, {}]), 6, 32, device_dropout=0.5).train()
    mask = drop._present(None, 1000, 'cpu')
    assert mask.any(dim=1).all() and 0.2 < (~mask).float().mean() < 0.5
    assert torch.isfinite(drop(x).logits).all()
    with pytest.raises(ValueError, match='no distillation token'):
        DeViTEnsemble(_backbones([{}], 'devit') + _backbones([{}]), 6, 32, distilled=True)
    plain = DeViTEnsemble(_backbones([{}, {}], 'devit'), 6, 32).eval()
    assert not plain.distilled and plain(x).shape == (2, 6)


def _student_ckpts(tmp_path, sizes, wrap_module=False):
    students = []
    for i, kw in enumerate(sizes):
        model_kwargs = {**TINY, **kw}
        model_kwargs.pop('img_size')
        student = timm.create_model('dedeit', num_classes=3, img_size=32, **model_kwargs)
        sd = student.state_dict()
        if wrap_module:
            sd = {f'module.{k}': v for k, v in sd.items()}
        args = {'model': 'dedeit', 'model_kwargs': model_kwargs, 'input_size': 32}
        folder = tmp_path / f'sub-dataset{i}'
        folder.mkdir()
        torch.save({'model': sd, 'args': argparse.Namespace(**args) if i % 2 else args, 'epoch': 3},
                   folder / 'checkpoint.pth')
        students.append(student.eval())
    return students


def test_load_students(tmp_path):
    students = _student_ckpts(tmp_path, [{'embed_dim': 32}, {'embed_dim': 48, 'num_heads': 3, 'depth': 2}],
                              wrap_module=True)
    ens = load_students(tmp_path, 2, num_classes=6, embed_dim=40).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for i, s in enumerate(students):
            assert torch.equal(ens.device_tokens(i, x), prefix_tokens(s, x))
            assert torch.equal(ens.state_dict()[f'backbones.{i}.pos_embed'], s.pos_embed)
    assert not any(k.startswith('backbones.0.head') for k in ens.state_dict())
    assert ens.config['backbones'][1]['kwargs']['embed_dim'] == 48
    assert load_students(tmp_path, None, num_classes=6, embed_dim=40).num_devices == 2
    with pytest.raises(CheckpointError, match='missing student checkpoints'):
        load_students(tmp_path, 3, num_classes=6, embed_dim=40)
    with pytest.raises(CheckpointError, match='not found'):
        load_students(tmp_path / 'nope', 2, num_classes=6, embed_dim=40)


def test_checkpoint_round_trip(tmp_path):
    model = tiny()
    ema = tiny()
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': {f'module.{k}': v for k, v in model.state_dict().items()}, 'model_ema': ema.state_dict(),
                'epoch': 1}, path)
    fresh = tiny()
    result = load_weights(fresh, path)
    assert result.source == str(path) and result.reset == []
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    load_weights(fresh, str(path), use_ema=True)
    assert torch.equal(fresh.pos_embed, ema.pos_embed)
    with pytest.raises(CheckpointError, match='no EMA'):
        load_weights(fresh, {'model': model.state_dict()}, use_ema=True)


def test_head_reset_on_class_count_change():
    src = tiny(num_classes=1000)
    dst = tiny(num_classes=10)
    result = load_weights(dst, {'model': src.state_dict()}, what='teacher')
    assert result.reset == ['head.bias', 'head.weight', 'head_dist.bias', 'head_dist.weight']
    assert result.dropped == result.reset
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert dst.head.weight.shape == (10, 32)
    with pytest.raises(CheckpointError, match=r'head\.weight: checkpoint \(1000, 32\) vs model \(10, 32\)'):
        load_weights(tiny(num_classes=10), src.state_dict(), reset_head=False)
    backbone = create_backbone('dedeit', TINY)  # no classifier at all
    assert load_weights(backbone, src.state_dict()).dropped[0] == 'head.bias'


def test_pos_embed_resampled():
    src = tiny(img_size=32)
    dst = tiny(img_size=64)
    result = load_weights(dst, src.state_dict())
    assert result.resampled == ['pos_embed: 4x4 -> 8x8']
    assert torch.equal(dst.pos_embed[:, :2], src.pos_embed[:, :2])
    with pytest.raises(CheckpointError, match='pos_embed'):
        load_weights(tiny(img_size=64), src.state_dict(), resample_pos_embed=False)


def test_bad_checkpoints(tmp_path):
    model = tiny()
    with pytest.raises(CheckpointError, match=r'missing keys \[blocks\.3\..*3 blocks, model 4'):
        load_weights(tiny(depth=4), model.state_dict())
    with pytest.raises(CheckpointError, match='unexpected keys'):
        load_weights(tiny(depth=2), model.state_dict())
    with pytest.raises(CheckpointError, match=r'shape mismatches.*width 32, model 48'):
        load_weights(tiny(embed_dim=48), model.state_dict())
    devit_mismatch = r'unexpected keys \[dist_token.*pos_embed: checkpoint \(1, 18, 32\) vs model \(1, 17, 32\)'
    with pytest.raises(CheckpointError, match=devit_mismatch):
        load_weights(tiny('devit'), model.state_dict())
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': model.state_dict()}, path)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='truncated.pth'):
        load_weights(tiny(), truncated)
    with pytest.raises(CheckpointError, match='not found'):
        load_weights(tiny(), tmp_path / 'absent.pth')
    with pytest.raises(CheckpointError, match='neither a state dict'):
        load_weights(tiny(), {'epoch': 3, 'args': {}})
    assert issubclass(CheckpointError, ValueError)


def test_load_ensemble_round_trip(tmp_path):
    ens = DeViTEnsemble(_backbones([{}, {'embed_dim': 48, 'num_heads': 3}]), 6, 32).eval()
    path = tmp_path / 'ens.pth'
    torch.save({'model': ens.state_dict(), 'ensemble_config': ens.config}, path)
    loaded = models.load_ensemble(path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ens(x))
    with pytest.raises(CheckpointError, match='ensemble_config'):
        models.load_ensemble({'model': ens.state_dict()})


def test_count_macs_includes_attention():
    model = create_backbone('devit', TINY).eval()
    N, D, L, P = 17, 32, 3, 8
    expected = 16 * (3 * P * P) * D + L * (12 * N * D * D + 2 * N * N * D)
    assert count_macs(model, torch.zeros(1, 3, 32, 32)) == expected


def test_stats_cli(capsys):
    kwargs = ['patch_size=8', 'embed_dim=32', 'depth=3', 'num_heads=2']
    stats = stats_main(['--model', 'dedeit', '--num_division', '2', '--nb-classes', '10', '--input-size', '32',
                        '--embed-dim-teacher', '48', '--json', '--model-kwargs', *kwargs])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(stats))
    ens = DeViTEnsemble(_backbones([{}, {}]), 10, 48)
    assert printed['params'] == sum(p.numel() for p in ens.parameters())
    assert printed['flops'] == sum(printed['flops_per_student']) + printed['flops_head'] > 0
    assert printed['flops_2x'] == 2 * printed['flops']
    assert printed['bytes_per_device_fp32'] == 2 * 32 * 4 and printed['bytes_per_device_fp16'] == 2 * 32 * 2
    assert model_stats('devit', 2, 10, 32, {'patch_size': 8, 'embed_dim': 32, 'depth': 3, 'num_heads': 2}, 48)[
        'bytes_per_device_fp32'] == 32 * 4
    stats_main(['--model', 'devit', '--num_division', '2', '--input-size', '32', '--model-kwargs', *kwargs])
    assert 'FLOPs (MACs, paper convention)' in capsys.readouterr().out
