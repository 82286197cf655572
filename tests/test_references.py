"""Reported sizes checked against references built here, not against the code that reports them: the MACs of
`python -m models.stats` against a hand formula, its parameter counts against timm's own models (or, for CCT, which
timm lacks, a hand count).

What models.stats counts (its docstring): multiply-accumulates of every Linear and convolution (weights only, not
biases) and of every matmul (attention's QKᵀ and AV, CCT's sequence pooling); nothing else. So, per image:
    patch embedding   n_patches · (C·P²) · d                       (a P×P conv, stride P)
    CCT tokenizer     Σ_layers H_out·W_out · C_in·C_out · k²        (before each max-pool)
    ViT block         qkv 3·N·d²  +  QKᵀ N²·d  +  AV N²·d  +  proj N·d²  +  MLP 2·N·d·h
    CCT pooling       N·d (Linear(d, 1))  +  N·d (softmax weights @ tokens)
    ensemble head     per token kind (cls; dist when distilled): Σd_i · D (projection)  +  D · K (classifier)
with N the tokens (patches + cls + dist), d the width, h the MLP hidden size, D the teacher's width, K the classes.
"""
import json
import subprocess
import sys

import pytest
import timm
import torch
from helpers import ROOT, env

from models.stats import main as stats_main


def vit_block_macs(N: int, d: int, h: int) -> int:
    qkv, qk, av, proj, mlp = 3 * N * d * d, N * N * d, N * N * d, N * d * d, 2 * N * d * h
    return qkv + qk + av + proj + mlp


def head_macs(widths: list[int], D: int, K: int, distilled: bool) -> int:
    return (2 if distilled else 1) * (sum(widths) * D + D * K)


def head_params(widths: list[int], D: int, K: int, distilled: bool) -> int:
    return (2 if distilled else 1) * (sum(widths) * D + D + D * K + K)


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def vit_reference(distilled: bool, img: int, patch: int, chans: int, d: int, depth: int, mlp_ratio: float):
    """(MACs, params) of one ViT student: MACs by the formula, params of timm's own DeiT / ViT of that shape."""
    n_patches = (img // patch) ** 2
    N, h = n_patches + (2 if distilled else 1), int(d * mlp_ratio)
    macs = n_patches * chans * patch * patch * d + depth * vit_block_macs(N, d, h)
    ref = timm.create_model('deit_tiny_distilled_patch16_224' if distilled else 'vit_tiny_patch16_224', num_classes=0,
                            img_size=img, patch_size=patch, in_chans=chans, embed_dim=d, depth=depth,
                            num_heads=2, mlp_ratio=mlp_ratio)
    return macs, numel(ref)


def cct_reference(img: int, chans: int, d: int, depth: int, mlp_ratio: float, k: int, n_conv: int, planes: int):
    """(MACs, params) of one CCT backbone, both by hand (official CCT defaults: conv stride max(1, k//2 - 1), padding
    max(1, k//2), no conv bias, max-pool 3/2/1; no bias on qkv)."""
    stride, pad = max(1, k // 2 - 1), max(1, k // 2)
    chans_seq = [chans] + [planes] * (n_conv - 1) + [d]
    size, macs, params = img, 0, 0
    for cin, cout in zip(chans_seq, chans_seq[1:]):
        size = (size + 2 * pad - k) // stride + 1
        macs += size * size * cin * cout * k * k
        params += cin * cout * k * k
        size = (size + 2 - 3) // 2 + 1  # max-pool
    N, h = size * size, int(d * mlp_ratio)
    macs += depth * vit_block_macs(N, d, h) + 2 * N * d
    block_params = 2 * d + 3 * d * d + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    params += N * d + depth * block_params + 2 * d + (d + 1)  # pos_embed, blocks, final norm, attention_pool
    return macs, params


def check(stats: dict, student_macs: int, student_params: int, n: int, width: int, distilled: bool, D: int, K: int):
    widths = [width] * n
    floats = width * (2 if distilled else 1)
    assert stats['flops_per_student'] == [student_macs] * n
    assert stats['params_per_student'] == [student_params] * n
    assert stats['flops_head'] == head_macs(widths, D, K, distilled)
    assert stats['params_head'] == head_params(widths, D, K, distilled)
    assert stats['flops'] == n * student_macs + head_macs(widths, D, K, distilled)
    assert stats['flops_2x'] == 2 * stats['flops']
    assert stats['params'] == n * student_params + head_params(widths, D, K, distilled)
    assert stats['floats_per_device'] == [floats] * n
    assert stats['bytes_per_device_fp32'] == 4 * floats and stats['bytes_total_fp16'] == 2 * floats * n


def test_stats_cli_dedeit_224_equals_the_hand_formula():
    cmd = [sys.executable, '-m', 'models.stats', '--model', 'dedeit', '--num_division', '4', '--nb-classes', '1000',
           '--input-size', '224', '--json']
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    macs, params = vit_reference(True, 224, 16, 3, 192, 12, 4.0)
    assert (macs, params) == (1_260_619_776, 5_524_800)  # DeiT-Tiny: "1.3G" MACs, 5.5M parameters (without head)
    check(stats, macs, params, n=4, width=192, distilled=True, D=768, K=1000)


@pytest.mark.parametrize('model,kw,n,D,K', [
    ('dedeit', {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 24, 'depth': 2, 'num_heads': 2,
                'mlp_ratio': 2}, 3, 32, 10),
    ('devit', {'img_size': 32, 'patch_size': 8, 'in_chans': 3, 'embed_dim': 32, 'depth': 3, 'num_heads': 2,
               'mlp_ratio': 3}, 2, 48, 7),
    ('decct', {'img_size': 28, 'in_chans': 1, 'kernel_size': 3, 'n_conv_layers': 3, 'conv_planes': 8,
               'embed_dim': 32, 'depth': 2, 'num_heads': 2, 'mlp_ratio': 2}, 2, 48, 10),
    ('decct', {'img_size': 64, 'in_chans': 3, 'kernel_size': 7, 'n_conv_layers': 2, 'conv_planes': 16,
               'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'mlp_ratio': 3}, 4, 40, 5),
])
def test_stats_tiny_configs_equal_the_hand_formula(capsys, model, kw, n, D, K):
    args = ['--model', model, '--num_division', str(n), '--nb-classes', str(K), '--input-size', str(kw['img_size']),
            '--embed-dim-teacher', str(D), '--json', '--model-kwargs',
            *[f'{k}={v}' for k, v in kw.items() if k != 'img_size']]
    stats_main(args)
    stats = json.loads(capsys.readouterr().out)
    if model == 'decct':
        macs, params = cct_reference(kw['img_size'], kw['in_chans'], kw['embed_dim'], kw['depth'], kw['mlp_ratio'],
                                     kw['kernel_size'], kw['n_conv_layers'], kw['conv_planes'])
    else:
        macs, params = vit_reference(model == 'dedeit', kw['img_size'], kw['patch_size'], kw['in_chans'],
                                     kw['embed_dim'], kw['depth'], kw['mlp_ratio'])
    check(stats, macs, params, n=n, width=kw['embed_dim'], distilled=model == 'dedeit', D=D, K=K)
