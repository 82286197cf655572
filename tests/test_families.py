"""The paper's three families: DeViTs (ViT-L teacher, `devit` students), DeDeiTs (DeiT-B, `dedeit`) and DeCCTs
(CCT-14/7x2, `decct`), plus ensembles that mix families. Tiny models on 28×28 grey images; stages 2 and 3 run as
real processes under the seed's launcher on a slice of Fashion-MNIST with random-weight teachers (plumbing, not
accuracy)."""
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import TEACHER, TINY, launch_cmd, read_log, run

import splite_dataset
import utils
from engine import EnsembleTask
from losses import DistillationLoss
from models import (
    DeViTEnsemble,
    capture_qkv,
    create_backbone,
    factory,
    forward_features,
    load_ensemble,
    load_students,
    load_weights,
)
from models.features import has_dist_token
from models.stats import family_stats, paper_table

# 28×28 grey images. ViTs: patch 7 -> 16 patches + cls. CCTs: three 3×3 conv + max-pool layers, 28 -> 14 -> 7 -> 4,
# so 16 tokens and no class token.
VIT_KW = {'img_size': 28, 'patch_size': 7, 'in_chans': 1}
CCT_KW = {'img_size': 28, 'in_chans': 1, 'kernel_size': 3, 'n_conv_layers': 3, 'conv_planes': 8, 'mlp_ratio': 2}
SMALL = {'embed_dim': 16, 'depth': 2, 'num_heads': 2}
WIDE = {'embed_dim': 32, 'depth': 2, 'num_heads': 2}
FAMILY = {  # family -> (student, teacher, student kwargs, teacher kwargs, processes per stage)
    # DDP over 2 ranks for the new CCT code; timm's ViT under DDP is covered by test_pipeline already
    'devits': ('devit', 'vit_large_patch16_224', {**VIT_KW, **SMALL}, {**VIT_KW, **WIDE}, 1),
    'decct': ('decct', 'cct_14_7x2', {**CCT_KW, **SMALL}, {**CCT_KW, **WIDE}, 2),
}
MODELS = {'dedeit': {**VIT_KW, **SMALL}, 'devit': {**VIT_KW, **SMALL}, 'decct': {**CCT_KW, **SMALL},
          'cct_14_7x2': {**CCT_KW, **WIDE}, 'vit_large_patch16_224': {**VIT_KW, **WIDE},
          TEACHER: {**VIT_KW, **WIDE}}  # timm's DeiT-Tiny distilled, the teacher with a dist token
FAST = ['--limit-train', '64', '--limit-val', '50', '--epochs', '1', '--drop-path', '0']


def kw_args(kwargs):
    return [f'{k}={v}' for k, v in kwargs.items()]



# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(MODELS))
def test_forward_backward(name):
    model = timm.create_model(name, num_classes=5, **MODELS[name])
    x = torch.randn(3, 1, 28, 28)
    feats = forward_features(model.train(), x, qkv_layers=[0, -1])
    assert feats.logits.shape == (3, 5) and feats.cls.shape == (3, model.num_features)
    assert (feats.dist is not None) == has_dist_token(model)
    assert all(t.shape[:2] == (3, 2) for qkv in feats.qkv.values() for t in qkv)
    loss = feats.logits.logsumexp(1).mean() + sum(t.pow(2).mean() for t in feats.qkv[0])
    if feats.logits_dist is not None:
        loss = loss + feats.logits_dist.logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    out = model.eval()(x)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    assert factory.input_spec(model) == (28, 1)  # what the stage scripts read to build the data


def test_cct_shapes_and_sizes():
    with torch.device('meta'):  # shapes only
        teacher = timm.create_model('cct_14_7x2')
        student = timm.create_model('decct', num_classes=0)
    assert (teacher.embed_dim, len(teacher.blocks), teacher.blocks[0].attn.num_heads) == (384, 14, 6)
    assert teacher.patch_embed.grid_size == (14, 14) and teacher.pos_embed.shape == (1, 196, 384)
    assert teacher.num_prefix_tokens == 0 and teacher.blocks[0].mlp.fc1.out_features == 3 * 384
    assert len(teacher.patch_embed.conv_layers) == 2 and teacher.patch_embed.proj.kernel_size == (7, 7)
    assert sum(p.numel() for p in teacher.parameters()) == pytest.approx(22.36e6, rel=2e-3)  # CCT paper: 22.36M
    assert (student.embed_dim, len(student.blocks), student.blocks[0].attn.num_heads) == (256, 6, 4)
    assert student.patch_embed.num_patches == 196  # same tokens as the teacher: relations compare N×N matrices
    sine = timm.create_model('decct', positional_embedding='sine', **MODELS['decct'])
    assert 'pos_embed' not in dict(sine.named_parameters()) and 'pos_embed' in sine.state_dict()
    with pytest.raises(ValueError, match='no tokens'):
        timm.create_model('decct', img_size=8, kernel_size=7, padding=0)


def official_forward(sd, x, num_heads, n_conv_layers):
    """CCT's forward written from the official code (SHI-Labs/Compact-Transformers) on its own key names: conv
    tokenizer, + positional_emb, blocks `x += attn(pre_norm(x)); x = norm1(x); x += linear2(gelu(linear1(x)))`,
    final norm, sequence pooling, fc. Returns the logits and each block's (q, k, v)."""
    for i in range(n_conv_layers):
        w = sd[f'tokenizer.conv_layers.{i}.0.weight']
        x = F.max_pool2d(F.relu(F.conv2d(x, w, stride=1, padding=1)), 3, 2, 1)
    x = x.flatten(2).transpose(1, 2) + sd['classifier.positional_emb']
    B, N, C = x.shape
    qkvs = []
    depth = len({k.split('.')[2] for k in sd if k.startswith('classifier.blocks.')})
    for i in range(depth):
        p = f'classifier.blocks.{i}.'

        def ln(t, name, p=p):
            return F.layer_norm(t, (C,), sd[p + name + '.weight'], sd[p + name + '.bias'])

        qkv = (ln(x, 'pre_norm') @ sd[p + 'self_attn.qkv.weight'].T).reshape(B, N, 3, num_heads, C // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        qkvs.append((q, k, v))
        attn = ((q @ k.transpose(-2, -1)) * (C // num_heads) ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(out, sd[p + 'self_attn.proj.weight'], sd[p + 'self_attn.proj.bias'])
        x = ln(x, 'norm1')
        x = x + F.linear(F.gelu(F.linear(x, sd[p + 'linear1.weight'], sd[p + 'linear1.bias'])),
                         sd[p + 'linear2.weight'], sd[p + 'linear2.bias'])
    x = F.layer_norm(x, (C,), sd['classifier.norm.weight'], sd['classifier.norm.bias'])
    weights = F.linear(x, sd['classifier.attention_pool.weight'], sd['classifier.attention_pool.bias']).softmax(1)
    pooled = (weights.transpose(1, 2) @ x).squeeze(1)
    return F.linear(pooled, sd['classifier.fc.weight'], sd['classifier.fc.bias']), qkvs


def _official_state_dict(model):
    """Our model's weights under the official checkpoint's key names (what cct_14_7x2_224_imagenet.pth holds)."""
    names = [('patch_embed.', 'tokenizer.'), ('.attn.', '.self_attn.'), ('.norm1.', '.pre_norm.'),
             ('.norm2.', '.norm1.'), ('.mlp.fc1.', '.linear1.'), ('.mlp.fc2.', '.linear2.')]
    out = {}
    for key, value in model.state_dict().items():
        for ours, theirs in names:
            key = key.replace(ours, theirs)
        key = {'pos_embed': 'positional_emb', 'head.weight': 'fc.weight', 'head.bias': 'fc.bias'}.get(key, key)
        out[key if key.startswith('tokenizer.') else 'classifier.' + key] = value.clone()
    return out


def test_cct_matches_official_code_and_qkv_hook():
    kwargs = {**CCT_KW, 'n_conv_layers': 2, **WIDE}  # 28 -> 14 -> 7: 49 tokens
    source = timm.create_model('cct_14_7x2', num_classes=5, **kwargs).eval()
    official = _official_state_dict(source)
    model = timm.create_model('cct_14_7x2', num_classes=5, **kwargs).eval()  # other random weights
    result = load_weights(model, official, reset_head=False, what='teacher')
    assert result.reset == [] and result.resampled == []
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), capture_qkv(model, [0, 1]) as qkv:
        logits = model(x)
        ref_logits, ref_qkv = official_forward(official, x, num_heads=2, n_conv_layers=2)
    assert torch.allclose(logits, ref_logits, atol=1e-5), (logits - ref_logits).abs().max()
    for i in (0, 1):
        for j in range(3):
            assert qkv[i][j].shape == (2, 2, 49, 16)
            assert torch.allclose(qkv[i][j], ref_qkv[i][j], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Ensembles that mix families
# ---------------------------------------------------------------------------------------------------------------

def _save_student(folder, i, name, kwargs, num_classes=5):
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    path = folder / f'sub-dataset{i}' / 'checkpoint.pth'
    utils.save_checkpoint({'model': model.state_dict(), 'args': {'model': name, 'model_kwargs': kwargs}}, path)
    return model


def test_mixed_ensemble_from_checkpoints(tmp_path):
    names = ['dedeit', 'dedeit', 'decct', 'decct']
    saved = [_save_student(tmp_path, i, n, MODELS[n]) for i, n in enumerate(names)]
    teacher = timm.create_model(TEACHER, num_classes=10, **MODELS[TEACHER])
    ens = load_students(tmp_path, 4, num_classes=10, embed_dim=teacher.num_features)
    assert not ens.distilled and ens.token_widths() == [16] * 4  # cls tokens and pooled features only
    assert [s['model'] for s in ens.config['backbones']] == names
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():  # the backbones are the stage-2 students, their classifiers dropped
        ens.eval()
        assert torch.allclose(ens.backbones[2].forward_head(ens.backbones[2].forward_features(x), pre_logits=True),
                              saved[2].eval().forward_head(saved[2].forward_features(x), pre_logits=True))
    # stage 3's task with a distilled teacher: KD on the one ensemble head, token MSE on cls only
    task = EnsembleTask(ens, teacher, DistillationLoss(torch.nn.CrossEntropyLoss(), 'hard')).train()
    loss, parts = task(x, torch.tensor([0, 3, 5, 9]))
    assert torch.isfinite(loss) and 'token_cls' in parts and 'token_dist' not in parts
    loss.backward()
    for i, backbone in enumerate(ens.backbones):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters()), i
    eval_logits = ens.eval()(x)
    assert eval_logits.shape == (4, 10)
    rebuilt = load_ensemble({'model': ens.state_dict(), 'ensemble_config': ens.config}).eval()
    assert torch.allclose(rebuilt(x), eval_logits, atol=1e-6)


def test_shrunk_decct_student_loads_into_an_ensemble(tmp_path):
    """The paper's head/neuron shrinking applies to DeCCTs too: a pruned decct checkpoint rebuilds by its shape."""
    shape = {'heads': [1, 2], 'hidden': [8, 32]}
    shrunk = timm.create_model('decct', num_classes=5, shrink=shape, **MODELS['decct'])
    assert [b.attn.num_heads for b in shrunk.blocks] == [1, 2] and shrunk.blocks[0].mlp.fc1.out_features == 8
    path = tmp_path / 'sub-dataset0' / 'checkpoint.pth'
    utils.save_checkpoint({'model': shrunk.state_dict(), 'args': {'model': 'decct', 'model_kwargs': MODELS['decct']}},
                          path)
    ens = load_students(tmp_path, 1, num_classes=10, embed_dim=32).eval()
    assert [b.attn.num_heads for b in ens.backbones[0].blocks] == [1, 2]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(ens.device_tokens(0, x), shrunk.eval().forward_head(shrunk.forward_features(x), True))


def test_ensemble_of_cct_backbones_sends_pooled_features():
    backbones = [create_backbone('decct', MODELS['decct']) for _ in range(2)]
    ens = DeViTEnsemble(backbones, num_classes=10, embed_dim=32).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        sent = ens.device_tokens(0, x)
        assert torch.allclose(sent, backbones[0].forward_head(backbones[0].forward_features(x), pre_logits=True))
    assert sent.shape == (2, 16)


# ---------------------------------------------------------------------------------------------------------------
# The paper's size table
# ---------------------------------------------------------------------------------------------------------------

def test_family_stats_and_paper_table(monkeypatch):
    decct = family_stats('decct')
    assert decct['teacher']['embed_dim'] == 384 and decct['floats_per_device'] == [256] * 4
    assert decct['params'] == pytest.approx(18.3e6, rel=0.02) and decct['flops'] == pytest.approx(5.1e9, rel=0.02)
    # the table itself, from these numbers (each family takes seconds even on the meta device)
    monkeypatch.setattr('models.stats.family_stats', lambda *args: decct)
    table = paper_table(families=['decct'])
    assert '| DeCCTs (from CCT-14/7x2) | 4 x `decct` + head | 18.4M (+0%) | 18.3M | 5.05G (-1%) | 5.1G |' in table


# ---------------------------------------------------------------------------------------------------------------
# Stages 2 and 3 as processes, per family and mixed
# ---------------------------------------------------------------------------------------------------------------

def _save_teacher(path, name, kwargs, num_classes):
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    utils.save_checkpoint({'model': model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope='module')
def family_runs(tmp_path_factory, fmnist_root):
    """split in 2 -> stage 2 (both divisions) -> stage 3, for `devit` and `decct`, under the seed's launcher."""
    out = tmp_path_factory.mktemp('families')
    splite_dataset.main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '2',
                         '--output_path', str(out / 'split')])
    for family, (student, teacher, s_kw, t_kw, nproc) in FAMILY.items():
        sub_teacher = _save_teacher(out / f'{family}_sub_teacher.pth', teacher, t_kw, 5)
        full_teacher = _save_teacher(out / f'{family}_teacher.pth', teacher, t_kw, 10)
        common = [*TINY, *FAST, '--teacher-model', teacher, '--teacher-kwargs', *kw_args(t_kw)]
        run(launch_cmd('distill_sub.py', *common, '--model', student, '--model-kwargs', *kw_args(s_kw),
                       '--teacher-path', sub_teacher, '--distillation-type', 'soft', '--gama', '0.2', '0.1', '0.3',
                       '--data-path', str(out / 'split'), '--num_division', '2', '--all-divisions',
                       '--output_dir', str(out / f'{family}2'), nproc=nproc))
        run(launch_cmd('ensemble.py', *common, '--model', student, '--model-path', str(out / f'{family}2'),
                       '--teacher-path', full_teacher, '--data-path', fmnist_root, '--num_division', '2',
                       '--output_dir', str(out / f'{family}3'), nproc=nproc))
    return out


@pytest.mark.slow  # (the family runs: two launcher chains, about a minute)
@pytest.mark.parametrize('family', list(FAMILY))
def test_family_stages(family_runs, family):
    student, _, _, t_kw, _ = FAMILY[family]
    for i in range(2):
        record = read_log(family_runs / f'{family}2' / f'sub-dataset{i}')[-1]
        # KD on the one head and the three relation terms (CCT's q/k/v hooks work as the ViTs')
        assert {'train_kd', 'train_rel_q', 'train_rel_k', 'train_rel_v'} <= set(record)
        assert all(0 <= record[k] < 1e3 for k in ('train_kd', 'train_rel_q', 'train_rel_v'))
    record = read_log(family_runs / f'{family}3')[-1]
    assert 'train_token_cls' in record and 'train_token_dist' not in record and 0 <= record['test_acc1'] <= 100
    ens = load_ensemble(str(family_runs / f'{family}3' / 'checkpoint.pth')).eval()
    assert not ens.distilled and [b['model'] for b in ens.config['backbones']] == [student] * 2
    assert ens.embed_dim == t_kw['embed_dim']  # projected to the teacher's cls token / pooled feature
    assert ens(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
def test_mixed_family_stage3_with_distilled_teacher(family_runs, fmnist_root):
    """Stage 3 of one `devit` and one `decct` student against a DeiT teacher (cls + dist tokens)."""
    mixed = family_runs / 'mixed2'
    for i, family in enumerate(('devits', 'decct')):
        (mixed / f'sub-dataset{i}').mkdir(parents=True)
        os.link(family_runs / f'{family}2' / f'sub-dataset{i}' / 'checkpoint.pth',
                mixed / f'sub-dataset{i}' / 'checkpoint.pth')
    os.link(family_runs / 'devits2' / 'split.json', mixed / 'split.json')
    teacher = _save_teacher(family_runs / 'deit_teacher.pth', TEACHER, MODELS[TEACHER], 10)
    run(launch_cmd('ensemble.py', *TINY, *FAST, '--model-path', str(mixed), '--teacher-model', TEACHER,
                   '--teacher-kwargs', *kw_args(MODELS[TEACHER]), '--teacher-path', teacher, '--data-path', fmnist_root,
                   '--num_division', '2', '--output_dir', str(family_runs / 'mixed3'), launcher='python'))
    record = read_log(family_runs / 'mixed3')[-1]
    assert 'train_token_cls' in record and 'train_token_dist' not in record
    ens = load_ensemble(str(family_runs / 'mixed3' / 'checkpoint.pth')).eval()
    assert [b['model'] for b in ens.config['backbones']] == ['devit', 'decct'] and not ens.distilled
    assert ens(torch.randn(2, 1, 28, 28)).shape == (2, 10)
