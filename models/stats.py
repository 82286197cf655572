"""Size, compute and traffic of an ensemble of N students (+ its head).

    python -m models.stats --model dedeit --num_division 4 --nb-classes 1000 --input-size 224 --json
    python -m models.stats --family decct                     # one of the paper's families, next to its figures
    python -m models.stats --paper-table --docs     # all three as a markdown table, into docs/families.md

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on one image. `flops` follows the paper's (and
DeiT's "1.3G for DeiT-Tiny") convention, which is multiply-accumulates (MACs); `flops_2x` is 2×MACs, what
FlopCounterMode itself reports. Counted: the weight multiply-accumulates of every Linear and convolution and every
matmul (attention's QKᵀ and AV: the fused kernel is switched off while counting so its matmuls are visible; CCT's
sequence pooling). Not counted, as in fvcore: biases, norms, softmax, GELU, pooling and residual adds. Per ViT block
of N tokens, width d and MLP hidden size h that is 4·N·d² + 2·N²·d + 2·N·d·h (tests/test_references.py checks the
totals against that formula).
"""
import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.utils import ParseKwargs
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .ensemble_model import DeViTEnsemble, create_backbone

DOCS_FAMILIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'families.md')


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, *inputs: Any, call: Callable[..., Any] | None = None) -> int:
    """Multiply-accumulates of `call(*inputs)` (default: module) as FlopCounterMode's count / 2, with the fused
    attention of `module`'s submodules off."""
    fused = [(m, m.fused_attn) for m in module.modules() if hasattr(m, 'fused_attn')]
    for m, _ in fused:
        m.fused_attn = False  # the CPU fused kernel has no flop formula; its math path is plain matmuls
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            (call or module)(*inputs)
    finally:
        for m, f in fused:
            m.fused_attn = f
    return counter.get_total_flops() // 2


def _input_shape(backbone: nn.Module, input_size: int | None, in_chans: int | None) -> tuple[int, int, int]:
    pe = getattr(backbone, 'patch_embed', None)
    if pe is not None and getattr(pe, 'img_size', None) is not None:
        h, w = pe.img_size
        return pe.proj.in_channels, h, w
    return in_chans or 3, input_size or 224, input_size or 224


def ensemble_stats(ensemble: DeViTEnsemble, input_size: int | None = None,
                   in_chans: int | None = None) -> dict[str, Any]:
    """Params, MACs per image and bytes sent per device of an ensemble (all backbones + head)."""
    was_training = ensemble.training
    ensemble.eval()
    widths = ensemble.token_widths()
    student_params = [count_params(b) for b in ensemble.backbones]
    student_macs = []
    for b in ensemble.backbones:
        x = torch.zeros(1, *_input_shape(b, input_size, in_chans))
        student_macs.append(count_macs(b, x))
    tokens = [torch.zeros(1, w) for w in widths]
    head_macs = count_macs(ensemble, tokens, call=ensemble.head_forward)
    head_params = count_params(ensemble) - sum(student_params)
    ensemble.train(was_training)
    flops = sum(student_macs) + head_macs
    return {
        'num_division': ensemble.num_devices,
        'params': count_params(ensemble),
        'params_per_student': student_params,
        'params_head': head_params,
        'flops': flops,
        'flops_2x': 2 * flops,
        'flops_convention': 'flops = MACs (paper / DeiT convention); flops_2x = 2*MACs',
        'flops_per_student': student_macs,
        'flops_head': head_macs,
        'floats_per_device': widths,
        'bytes_per_device_fp32': widths[0] * 4 if len(set(widths)) == 1 else [w * 4 for w in widths],
        'bytes_per_device_fp16': widths[0] * 2 if len(set(widths)) == 1 else [w * 2 for w in widths],
        'bytes_total_fp32': 4 * sum(widths),
        'bytes_total_fp16': 2 * sum(widths),
    }


def model_stats(
        model: str = 'dedeit',
        num_division: int = 4,
        nb_classes: int = 1000,
        input_size: int = 224,
        model_kwargs: Mapping[str, Any] | None = None,
        embed_dim_teacher: int = 768,
) -> dict[str, Any]:
    """Stats of N identical `model` students (img_size=input_size unless model_kwargs sets it) + ensemble head."""
    kwargs = {'img_size': input_size, **dict(model_kwargs or {})}
    backbones = [create_backbone(model, kwargs) for _ in range(num_division)]
    ensemble = DeViTEnsemble(backbones, nb_classes, embed_dim_teacher)
    stats = {'model': model, 'model_kwargs': kwargs, 'nb_classes': nb_classes, 'embed_dim_teacher': embed_dim_teacher}
    stats.update(ensemble_stats(ensemble, input_size))
    return stats


def teacher_stats(model: str, nb_classes: int = 1000, input_size: int = 224,
                  model_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Params and MACs of a monolithic teacher, for comparison (and its width, the ensemble head's target)."""
    m = timm.create_model(model, num_classes=nb_classes, **{'img_size': input_size, **dict(model_kwargs or {})})
    m.eval()
    return {'model': model, 'params': count_params(m), 'embed_dim': m.num_features,
            'flops': count_macs(m, torch.zeros(1, *_input_shape(m, input_size, None)))}


@dataclass(frozen=True)
class Family:
    """One of the paper's three decompositions: students, teacher and the paper's figures (ImageNet, 224², N=4)."""
    label: str
    student: str
    teacher: str
    paper_params: float
    paper_flops: float
    note: str  # why our count differs from the paper's, in one line


FAMILIES = {
    'devits': Family(
        'DeViTs (from ViT-L/16)', 'devit', 'vit_large_patch16_224', 23.0e6, 5.9e9,
        'our students have DeiT-Tiny\'s shape (5.52M, 1.25G each) and the head projects to ViT-L\'s '
        '1024-d cls token (1.8M); the paper\'s 5.9G means about 1.47G per student, so its students (shrunk from '
        'ViT-L) are somewhat larger than DeiT-Tiny or its counter counts more than matmuls and convolutions.'),
    'dedeits': Family(
        'DeDeiTs (from DeiT-B)', 'dedeit', 'deit_base_distilled_patch16_224', 23.9e6, 5.9e9,
        'four DeiT-Tiny-distilled backbones are 22.1M; our head projects cls and dist separately and classifies each '
        '(2.7M) where the paper\'s total leaves about 1.8M for its head; the FLOPs gap is the one of DeViTs.'),
    'decct': Family(
        'DeCCTs (from CCT-14/7x2)', 'decct', 'cct_14_7x2', 18.3e6, 5.1e9,
        '`decct`\'s shape is our choice, picked to land on the paper\'s totals: CCT-14/7x2 shrunk to 4 heads of 64 '
        '(dim 256), 6 layers, MLP ratio 3, 32 tokenizer channels; a CCT-7/7x2 shape (7 layers, MLP ratio 2, 64 '
        'channels) would give 19.0M / 6.4G.'),
}


def family_stats(family: str, num_division: int = 4, nb_classes: int = 1000, input_size: int = 224,
                 model_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`model_stats` of a paper family (students + head projecting to its teacher's width), its teacher's size and
    the paper's figures. Built on the meta device: shapes only, so ViT-L costs neither memory nor time."""
    if family not in FAMILIES:
        raise ValueError(f'unknown family {family!r}; choose from {", ".join(FAMILIES)}')
    fam = FAMILIES[family]
    with torch.device('meta'):
        teacher = teacher_stats(fam.teacher, nb_classes, input_size)
        stats = model_stats(fam.student, num_division, nb_classes, input_size, model_kwargs, teacher['embed_dim'])
    stats.update(family=family, label=fam.label, teacher=teacher, note=fam.note,
                 paper={'params': fam.paper_params, 'flops': fam.paper_flops})
    return stats


def _delta(ours: float, paper: float) -> str:
    return f'{100 * (ours / paper - 1):+.0f}%'


def paper_table(num_division: int = 4, nb_classes: int = 1000, input_size: int = 224,
                families: Sequence[str] = tuple(FAMILIES)) -> str:
    """Markdown: the families' params and FLOPs (ours next to the paper's), one note per family."""
    rows = [family_stats(f, num_division, nb_classes, input_size) for f in families]
    lines = [
        f'Size of the ensembles ({num_division} students + ensemble head, {input_size}x{input_size} input, '
        f'{nb_classes} classes), from `python -m models.stats --paper-table`. FLOPs are multiply-accumulates '
        '(the paper\'s and DeiT\'s convention), matmuls and convolutions counted by torch\'s FlopCounterMode, '
        'attention included.',
        '',
        '| family | students | params (ours) | params (paper) | FLOPs (ours) | FLOPs (paper) | teacher (ours) |',
        '|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        t = r['teacher']
        lines.append(
            f'| {r["label"]} | {num_division} x `{r["model"]}` + head | {r["params"] / 1e6:.1f}M '
            f'({_delta(r["params"], r["paper"]["params"])}) | {r["paper"]["params"] / 1e6:.1f}M | '
            f'{r["flops"] / 1e9:.2f}G ({_delta(r["flops"], r["paper"]["flops"])}) | {r["paper"]["flops"] / 1e9:.1f}G | '
            f'`{t["model"]}` {t["params"] / 1e6:.1f}M / {t["flops"] / 1e9:.1f}G |')
    lines.append('')
    lines += [f'- {r["label"].split()[0]}: {r["note"]}' for r in rows]
    return '\n'.join(lines) + '\n'


def _human(n: float) -> str:
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= scale:
            return f'{n / scale:.2f}{unit}'
    return str(n)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('DeViT ensemble size, FLOPs and traffic', add_help=False)
    parser.add_argument('--model', default='dedeit', type=str)
    parser.add_argument('--num_division', '--num-division', dest='num_division', default=4, type=int)
    parser.add_argument('--nb-classes', '--nb_classes', dest='nb_classes', default=1000, type=int)
    parser.add_argument('--input-size', default=224, type=int)
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    parser.add_argument('--embed-dim-teacher', default=768, type=int,
                        help='width of the ensemble head projection (the teacher width; 768 for DeiT-B)')
    parser.add_argument('--teacher-model', default=None, type=str, help='also report this monolithic teacher')
    parser.add_argument('--teacher-kwargs', nargs='*', default={}, action=ParseKwargs)
    parser.add_argument('--family', choices=sorted(FAMILIES), default=None,
                        help="one of the paper's families: its students, teacher width and the paper's figures "
                             '(overrides --model, --embed-dim-teacher, --teacher-model)')
    parser.add_argument('--paper-table', action='store_true',
                        help='all three families next to the paper\'s figures, as a markdown table')
    parser.add_argument('--output', default=None, help='with --paper-table: also write the table to this file')
    parser.add_argument('--docs', action='store_true',
                        help='with --paper-table: also write it into its generated block of docs/families.md')
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    args = parser.parse_args(argv)
    if args.paper_table:
        table = paper_table(args.num_division, args.nb_classes, args.input_size)
        if args.output:
            with open(args.output, 'w') as f:
                f.write(table)
        if args.docs:
            from fileio import replace_block

            replace_block(DOCS_FAMILIES, 'paper-table', table)
        print(table, end='')
        return {'table': table}
    if args.family:
        stats = family_stats(args.family, args.num_division, args.nb_classes, args.input_size, args.model_kwargs)
        args.model = stats['model']
    else:
        stats = model_stats(args.model, args.num_division, args.nb_classes, args.input_size, args.model_kwargs,
                            args.embed_dim_teacher)
    if args.teacher_model and not args.family:
        stats['teacher'] = teacher_stats(args.teacher_model, args.nb_classes, args.input_size, args.teacher_kwargs)
    if args.json:
        print(json.dumps(stats))
        return stats
    n = stats['num_division']
    rows = [
        ('students', f'{n} x {args.model} {stats["model_kwargs"]}'),
        ('params (all)', _human(stats['params'])),
        ('  per student', ', '.join(_human(p) for p in stats['params_per_student'])),
        ('  ensemble head', _human(stats['params_head'])),
        ('FLOPs (MACs, paper convention)', _human(stats['flops'])),
        ('  per student', ', '.join(_human(f) for f in stats['flops_per_student'])),
        ('  ensemble head', _human(stats['flops_head'])),
        ('FLOPs (2 x MACs)', _human(stats['flops_2x'])),
        ('floats sent per device', ', '.join(map(str, stats['floats_per_device']))),
        ('bytes per device fp32 / fp16', f'{stats["bytes_per_device_fp32"]} / {stats["bytes_per_device_fp16"]}'),
    ]
    if 'teacher' in stats:
        t = stats['teacher']
        rows += [(f'teacher {t["model"]} params', _human(t['params'])), ('teacher FLOPs (MACs)', _human(t['flops']))]
    if 'paper' in stats:
        p = stats['paper']
        rows += [(f'paper {stats["label"]}', f'{_human(p["params"])} params, {_human(p["flops"])} FLOPs'),
                 ('why they differ', stats['note'])]
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f'{k:<{width}}  {v}')
    return stats


if __name__ == '__main__':
    from cli import run_main  # bad input as one error line

    run_main(main)
