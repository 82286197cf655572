"""Batch-1 latency (and, with ``--power``, energy) of one model on this device: what one DeViT edge device adds.

    python -m jetson.latency --model dedeit --input-size 224 --fp16 --power --json lat.json
    python -m jetson.latency --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=8 depth=1 \\
        --input-size 32 --device cpu --warmup 2 --iters 20
    # device i's backbone out of an ensemble checkpoint (its keys are backbones.{i}.*, without a classifier):
    python -m jetson.latency --model dedeit --model-kwargs num_classes=0 \\
        --checkpoint output/ensemble/checkpoint.pth --checkpoint-prefix backbones.0.

The model is ``timm.create_model(--model, **--model-kwargs)`` after ``import models`` (the project's students
``dedeit``/``devit``); stock timm names work without it. Timing: ``time.perf_counter`` around each forward of one
random image, with ``torch.cuda.synchronize()`` before reading the clock on CUDA, after ``--warmup`` untimed runs.
fp16 (``--fp16``) is timed only on CUDA, with half weights and input; on a CPU it is skipped and the JSON says so
(CPU fp16 kernels are slow and say nothing about a Jetson's GPU).
"""
import argparse
import json
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
from timm.utils import ParseKwargs

from jetson.power import SOURCES, PowerMonitor, jetson_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def get_args_parser():
    p = argparse.ArgumentParser('Batch-1 latency of one model', add_help=False)
    p.add_argument('-h', '--help', action='help')
    p.add_argument('--model', default='dedeit', help='timm name (dedeit, devit, deit_base_distilled_patch16_224, ...)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='k=v overrides for timm.create_model, e.g. img_size=32 patch_size=8 depth=1 num_classes=0')
    p.add_argument('--checkpoint', default='',
                   help='weights: a state dict, or a dict holding one under "model" (our checkpoints) or "state_dict"')
    p.add_argument('--checkpoint-key', default='auto',
                   help='key of the state dict inside --checkpoint (e.g. model_ema)')
    p.add_argument('--checkpoint-prefix', default='',
                   help='keep only keys with this prefix, stripped (backbones.0. for one device of an ensemble)')
    p.add_argument('--input-size', type=int, default=224, help='image side (DeiT flag)')
    p.add_argument('--in-chans', type=int, default=3)
    p.add_argument('--warmup', type=int, default=20)
    p.add_argument('--iters', type=int, default=200)
    p.add_argument('--device', default='auto', help='auto (cuda if present), cpu, cuda, cuda:1')
    p.add_argument('--fp16', action='store_true', help='also time fp16 (CUDA only; skipped on CPU)')
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: leave as is)')
    p.add_argument('--json', default='', help='write the results here')
    p.add_argument('--power', action='store_true', help='sample board power around the timed loops (mJ/inference)')
    p.add_argument('--power-source', default='auto', choices=SOURCES)
    p.add_argument('--power-interval-ms', type=float, default=100.0)
    p.add_argument('--power-csv', default='', help='log of the power samples')
    p.add_argument('--power-rail', default=None, help='rail instead of the board total (a name, or "sum")')
    return p


def import_project_models():
    """Register the project's models in timm; returns None, or why they could not be imported (stock timm names
    still work then)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        import models  # noqa: F401  (registers dedeit, devit in timm)
    except Exception as e:  # noqa: BLE001  (absent or half-written: stock timm names still work)
        return f'{type(e).__name__}: {e}'
    return None


def load_checkpoint(model, path, key='auto', prefix=''):
    """Load ``path`` into ``model`` strictly, by key name; one clear error listing what does not match."""
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    if key == 'auto':
        key = next((k for k in ('model', 'state_dict') if isinstance(ckpt, dict) and k in ckpt), None)
    state = ckpt[key] if key else ckpt
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {re.sub(r'^module\.', '', k): v for k, v in state.items()}  # from a DDP wrapper; 3.8 has no removeprefix
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f'{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}'
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise SystemExit(f'{path} (key {key!r}, prefix {prefix!r}) does not fit {type(model).__name__}: '
                         f'missing {missing[:8]}{"..." if len(missing) > 8 else ""}, '
                         f'unexpected {unexpected[:8]}{"..." if len(unexpected) > 8 else ""}, shapes {shapes[:8]}')
    model.load_state_dict(state)


def build_model(args):
    note = import_project_models()
    try:
        model = timm.create_model(args.model, pretrained=False, **args.model_kwargs)
    except RuntimeError as e:  # timm: "Unknown model"
        hint = f' (import models failed: {note})' if note else ''
        raise SystemExit(f'{e}{hint}') from e
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, args.checkpoint_key, args.checkpoint_prefix)
    return model.eval(), note


def time_model(model, x, warmup, iters, device):
    """Milliseconds of each of ``iters`` forwards after ``warmup`` untimed ones, and the timed span (t0, t1) in
    ``time.perf_counter`` seconds (for the power window)."""
    cuda = device.type == 'cuda'
    times, t_first = [], None
    with torch.inference_mode():
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            if i == warmup:
                t_first = t0
            model(x)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return times, (t_first, time.perf_counter())


def summarize(times_ms):
    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p95, p99 = np.percentile(t, [50, 90, 95, 99])
    return {'mean_ms': t.mean(), 'std_ms': t.std(ddof=1) if t.size > 1 else 0.0, 'min_ms': t.min(), 'max_ms': t.max(),
            'p50_ms': p50, 'p90_ms': p90, 'p95_ms': p95, 'p99_ms': p99, 'iters': int(t.size)}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          'cpu' if args.device == 'auto' else args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    model, models_note = build_model(args)
    model.to(device)
    x = torch.randn(1, args.in_chans, args.input_size, args.input_size, device=device)

    precisions, skipped = ['fp32'], {}
    if args.fp16:
        if device.type == 'cuda':
            precisions.append('fp16')
        else:
            skipped['fp16'] = 'fp16 is timed on CUDA only; this run is on CPU'
            print(f'fp16 skipped: {skipped["fp16"]}')

    monitor = None
    if args.power:
        monitor = PowerMonitor(args.power_source, args.power_interval_ms, args.power_csv or None, args.power_rail)
        monitor.__enter__()
        print(monitor.note)
    results = {}
    try:
        for prec in precisions:
            if prec == 'fp16':
                model.half()
                x = x.half()
            times, (t0, t1) = time_model(model, x, args.warmup, args.iters, device)
            r = summarize(times)
            if monitor is not None and monitor.available:
                r['energy_mJ_per_inference'] = monitor.energy_per_inference_mj(t0, t1, args.iters)
                r['mean_power_mW'] = monitor.mean_power_mw(t0, t1)
                r['power_window_s'] = t1 - t0
                if t1 - t0 < 10 * monitor.interval_s:
                    warnings.warn(f'{prec}: timed window {t1 - t0:.2f} s is under 10 power samples; '
                                  'raise --iters for a steady energy figure', stacklevel=1)
            results[prec] = r
            line = (f'{args.model} {prec} on {device}: {r["mean_ms"]:.2f} ± {r["std_ms"]:.2f} ms '
                    f'(p50 {r["p50_ms"]:.2f}, p90 {r["p90_ms"]:.2f}, p95 {r["p95_ms"]:.2f}, p99 {r["p99_ms"]:.2f}; '
                    f'{r["iters"]} iters)')
            if r.get('energy_mJ_per_inference') is not None:
                line += f', {r["energy_mJ_per_inference"]:.1f} mJ/inference at {r["mean_power_mW"]:.0f} mW'
            print(line)
    finally:
        if monitor is not None:
            monitor.stop()

    out = {
        'model': args.model, 'model_kwargs': args.model_kwargs, 'checkpoint': args.checkpoint or None,
        'params': sum(p.numel() for p in model.parameters()),
        'input_size': [1, args.in_chans, args.input_size, args.input_size], 'batch_size': 1,
        'device': str(device), 'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else
        platform.processor() or platform.machine(),
        'jetson': jetson_model(), 'threads': torch.get_num_threads(), 'warmup': args.warmup, 'iters': args.iters,
        'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
        'results': results, 'skipped': skipped, 'models_import_error': models_note,
        'power': None if monitor is None else {
            'source': monitor.source_name, 'note': monitor.note, 'interval_ms': args.power_interval_ms,
            'energy_is': 'total board, idle included (the paper\'s convention)', 'error': monitor.error},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float) + '\n')
    return out


if __name__ == '__main__':
    main()
