"""Batch-1 latency (and, with ``--power``, energy) of one model on this device: what one DeViT edge device adds.

PyTorch eager (``--backend torch``, the default):

    python -m jetson.latency --model dedeit --input-size 224 --fp16 --power --json lat.json
    python -m jetson.latency --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=8 depth=1 \\
        --input-size 32 --device cpu --warmup 2 --iters 20
    # device i's backbone out of an ensemble checkpoint (its keys are backbones.{i}.*, without a classifier):
    python -m jetson.latency --model dedeit --model-kwargs num_classes=0 \\
        --checkpoint output/ensemble/checkpoint.pth --checkpoint-prefix backbones.0.

onnxruntime (``--backend onnxruntime``), on a graph of export_onnx.py; needs numpy and onnxruntime, not PyTorch:

    python3 -m jetson.latency --backend onnxruntime --model EXPORT/device0.onnx --fp16 --json lat_ort.json
    python3 -m jetson.latency --backend onnxruntime --model EXPORT/device0.onnx --provider cpu --threads 1

torch: the model is ``timm.create_model(--model, **--model-kwargs)`` after ``import models`` (the project's students
``dedeit``/``devit``); stock timm names work without it. fp16 (``--fp16``) uses half weights and input, on CUDA only.
onnxruntime: ``--provider auto`` takes the first of TensorRT, CUDA and CPU that this onnxruntime build has. The
input shapes are the graph's own, with the batch dimension set to 1 (every input gets random float32 values, so
head.onnx can be timed too). fp16 is the TensorRT provider's fp16 mode on the same graph, or with CUDA the
graph's fp16 copy that the export's manifest names (export_onnx.py --fp16); on a CPU it is skipped and the JSON
says so. Sessions are opened as the runtime's workers open them (collab/sessions.py).
Timing: ``time.perf_counter`` around each call on one random input, after ``--warmup`` untimed calls, with
``torch.cuda.synchronize()`` before reading the clock on CUDA (onnxruntime's ``run`` returns host arrays, so it has
finished when it returns).

Runs on Python 3.6 (JetPack 4.6); PyTorch and timm are imported only by the torch backend.
"""
import argparse
import ast
import json
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from collab import manifest as export_manifest
from collab.sessions import DEVICES, provider_names, session
from jetson.power import PowerMonitor
from jetson.power_sources import SOURCES, SourceUnavailable, jetson_model

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ('torch', 'onnxruntime')


class ParseKwargs(argparse.Action):
    """``k=v`` pairs into a dict, each value a Python literal where it parses as one (timm's train.py form)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = {}
        for value in values:
            if not value:
                continue
            key, value = value.split('=', 1)
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = value
        setattr(namespace, self.dest, kw)


def get_args_parser():
    p = argparse.ArgumentParser('Batch-1 latency of one model', add_help=False)
    p.add_argument('-h', '--help', action='help')
    p.add_argument('--backend', default='torch', choices=BACKENDS,
                   help='torch (PyTorch eager) or onnxruntime (an exported .onnx graph)')
    p.add_argument('--model', default='dedeit',
                   help='torch: timm name (dedeit, devit, deit_base_distilled_patch16_224, ...); '
                        'onnxruntime: path of an .onnx graph (EXPORT/device0.onnx)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='k=v overrides for timm.create_model, e.g. img_size=32 patch_size=8 depth=1 num_classes=0')
    p.add_argument('--checkpoint', default='',
                   help='weights: a state dict, or a dict holding one under "model" (our checkpoints) or "state_dict"')
    p.add_argument('--checkpoint-key', default='auto',
                   help='key of the state dict inside --checkpoint (e.g. model_ema)')
    p.add_argument('--checkpoint-prefix', default='',
                   help='keep only keys with this prefix, stripped (backbones.0. for one device of an ensemble)')
    p.add_argument('--input-size', type=int, default=224, help='image side (DeiT flag; torch backend)')
    p.add_argument('--in-chans', type=int, default=3, help='image channels (torch backend)')
    p.add_argument('--warmup', type=int, default=20)
    p.add_argument('--iters', type=int, default=200)
    p.add_argument('--device', default='auto', help='torch: auto (cuda if present), cpu, cuda, cuda:1')
    p.add_argument('--provider', default='auto', choices=DEVICES,
                   help='onnxruntime execution provider (auto: TensorRT, else CUDA, else CPU, as present)')
    p.add_argument('--trt-cache', default='',
                   help='TensorRT provider: engine cache folder (default: trt_cache/ beside the graph)')
    p.add_argument('--fp16', action='store_true', help='also time fp16 (GPU only; skipped on CPU)')
    p.add_argument('--threads', type=int, default=0,
                   help='torch.set_num_threads / onnxruntime intra-op threads (0: the library default)')
    p.add_argument('--json', default='', help='write the results here')
    p.add_argument('--power', action='store_true', help='sample board power around the timed loops (mJ/inference)')
    p.add_argument('--power-source', default='auto', choices=SOURCES)
    p.add_argument('--power-interval-ms', type=float, default=100.0)
    p.add_argument('--power-csv', default='', help='log of the power samples')
    p.add_argument('--power-rail', default=None, help='rail instead of the board total (a name, or "sum")')
    return p


# ---------------------------------------------------------------------------------------------------------------------
# torch

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
    import torch

    ckpt = torch.load(str(path), map_location='cpu', weights_only=True)
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
    import timm

    note = import_project_models()
    try:
        model = timm.create_model(args.model, pretrained=False, **args.model_kwargs)
    except RuntimeError as e:  # timm: "Unknown model"
        hint = f' (import models failed: {note})' if note else ''
        raise SystemExit(f'{e}{hint}') from e
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, args.checkpoint_key, args.checkpoint_prefix)
    return model.eval(), note


class TorchRunner:
    """One timm model in PyTorch eager: ``call(precision)`` gives the function to time."""

    def __init__(self, args):
        import torch

        self.torch = torch
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        self.device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                                   'cpu' if args.device == 'auto' else args.device)
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
        self.model, self.models_note = build_model(args)
        self.model.to(self.device)
        self.x = torch.randn(1, args.in_chans, args.input_size, args.input_size, device=self.device)
        self.precisions, self.skipped = ['fp32'], {}
        if args.fp16:
            if self.device.type == 'cuda':
                self.precisions.append('fp16')
            else:
                self.skipped['fp16'] = 'fp16 is timed on CUDA only; this run is on CPU'
        self.label = str(self.device)

    def call(self, precision):
        torch, model, x = self.torch, self.model, self.x
        if precision == 'fp16':
            model, x = model.half(), x.half()
        cuda = self.device.type == 'cuda'

        def run():
            with torch.inference_mode():
                model(x)
            if cuda:
                torch.cuda.synchronize(self.device)
        return run

    def facts(self, args):
        import timm

        torch = self.torch
        return {'model_kwargs': args.model_kwargs, 'checkpoint': args.checkpoint or None,
                'params': sum(p.numel() for p in self.model.parameters()),
                'input_size': [1, args.in_chans, args.input_size, args.input_size], 'device': str(self.device),
                'device_name': torch.cuda.get_device_name(self.device) if self.device.type == 'cuda' else
                platform.processor() or platform.machine(),
                'threads': torch.get_num_threads(), 'torch': torch.__version__, 'timm': timm.__version__,
                'models_import_error': self.models_note}


# ---------------------------------------------------------------------------------------------------------------------
# onnxruntime

def fp16_copy(path):
    """The fp16 copy of graph ``path`` that the manifest beside it names (export_onnx.py --fp16), or None."""
    p = Path(path)
    try:
        m = export_manifest.read(str(p.parent))
    except export_manifest.ModelError:
        return None
    for entry in m['devices'] + ([m['head']] if m['head'] else []):
        if entry['file'] == p.name and entry.get('fp16_file') and (p.parent / entry['fp16_file']).is_file():
            return p.parent / entry['fp16_file']
    return None


def random_feeds(session, rng):
    """One random float32 array per graph input, batch dimension (and any other symbolic one) set to 1."""
    feeds, shapes = {}, {}
    for inp in session.get_inputs():
        if inp.type != 'tensor(float)':
            raise SystemExit(f'input {inp.name} of the graph is {inp.type}, expected tensor(float)')
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
        shapes[inp.name] = shape
    return feeds, shapes


class OrtRunner:
    """One .onnx graph in onnxruntime with one execution provider (sessions opened by collab/sessions.py)."""

    def __init__(self, args):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise SystemExit(f'--backend onnxruntime needs the onnxruntime package ({e})') from e
        self.ort = ort
        self.path = Path(args.model)
        if not self.path.is_file():
            raise SystemExit(f'--model {args.model}: no such .onnx file (give a graph of export_onnx.py)')
        self.threads = args.threads
        self.trt_cache = args.trt_cache or None  # None: trt_cache/ beside the graph
        self.rng = np.random.RandomState(0)  # numpy < 1.17 (JetPack 4) has no default_rng
        try:
            self.provider = provider_names(args.provider)[0]
            self.sessions = {'fp32': self.session(self.path, args.provider, fp16=False)}
            self.feeds, self.shapes = random_feeds(self.sessions['fp32'], self.rng)
            self.precisions, self.skipped = ['fp32'], {}
            if args.fp16:
                if self.provider == 'TensorrtExecutionProvider':
                    self.sessions['fp16'] = self.session(self.path, args.provider, fp16=True)
                elif self.provider == 'CUDAExecutionProvider' and fp16_copy(self.path) is not None:
                    self.sessions['fp16'] = self.session(fp16_copy(self.path), args.provider, fp16=True)
                elif self.provider == 'CUDAExecutionProvider':
                    self.skipped['fp16'] = f'no fp16 copy of {self.path} in its manifest (export_onnx.py --fp16)'
                else:
                    self.skipped['fp16'] = 'fp16 is timed on the CUDA and TensorRT providers only; this run is on CPU'
                if 'fp16' in self.sessions:
                    self.precisions.append('fp16')
        except ValueError as e:  # ModelError (a graph onnxruntime cannot load), or a provider this build lacks
            raise SystemExit(f'error: {e}') from None
        self.label = self.provider

    def session(self, path, provider, fp16):
        return session(str(path), self.threads or None, provider, fp16=fp16, trt_cache=self.trt_cache)

    def call(self, precision):
        sess, feeds = self.sessions[precision], self.feeds

        def run():
            sess.run(None, feeds)
        return run

    def facts(self, args):
        params = None
        try:
            import onnx
            params = int(sum(np.prod(t.dims) for t in onnx.load(str(self.path)).graph.initializer))
        except ImportError:  # onnx is not needed to run a graph, only to count its weights
            pass
        first = next(iter(self.shapes.values()))
        used = self.sessions['fp32'].get_providers()
        return {'model_kwargs': {}, 'checkpoint': None, 'params': params, 'input_size': first,
                'input_shapes': self.shapes, 'device': 'cpu' if self.provider == 'CPUExecutionProvider' else 'cuda',
                'device_name': platform.processor() or platform.machine(), 'provider': self.provider,
                'providers_used': used, 'threads': self.threads or None, 'onnxruntime': self.ort.__version__,
                'torch': None, 'timm': None, 'models_import_error': None,
                'fp16_model': str(fp16_copy(self.path)) if self.provider == 'CUDAExecutionProvider' and
                'fp16' in self.sessions else None}


# ---------------------------------------------------------------------------------------------------------------------
# Timing

def time_calls(fn, warmup, iters):
    """Milliseconds of each of ``iters`` calls after ``warmup`` untimed ones, and the timed span (t0, t1) in
    ``time.perf_counter`` seconds (for the power window)."""
    times, t_first = [], None
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        if i == warmup:
            t_first = t0
        fn()
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
    runner = OrtRunner(args) if args.backend == 'onnxruntime' else TorchRunner(args)
    for prec, why in runner.skipped.items():
        print(f'{prec} skipped: {why}')
    name = Path(args.model).name if args.backend == 'onnxruntime' else args.model

    monitor = None
    if args.power:
        monitor = PowerMonitor(args.power_source, args.power_interval_ms, args.power_csv or None, args.power_rail)
        try:
            monitor.__enter__()
        except SourceUnavailable as e:
            raise SystemExit(f'error: --power-source {args.power_source}: {e}') from None
        print(monitor.note)
    results = {}
    try:
        for prec in runner.precisions:
            times, (t0, t1) = time_calls(runner.call(prec), args.warmup, args.iters)
            r = summarize(times)
            if monitor is not None and monitor.available:
                r['energy_mJ_per_inference'] = monitor.energy_per_inference_mj(t0, t1, args.iters)
                r['mean_power_mW'] = monitor.mean_power_mw(t0, t1)
                r['power_window_s'] = t1 - t0
                if t1 - t0 < 10 * monitor.interval_s:
                    warnings.warn(f'{prec}: timed window {t1 - t0:.2f} s is under 10 power samples; raise --iters '
                                  'for a steady energy figure', stacklevel=1)
            results[prec] = r
            line = (f'{name} {prec} on {runner.label}: {r["mean_ms"]:.2f} ± {r["std_ms"]:.2f} ms '
                    f'(p50 {r["p50_ms"]:.2f}, p90 {r["p90_ms"]:.2f}, p95 {r["p95_ms"]:.2f}, p99 {r["p99_ms"]:.2f}; '
                    f'{r["iters"]} iters)')
            if r.get('energy_mJ_per_inference') is not None:
                line += f', {r["energy_mJ_per_inference"]:.1f} mJ/inference at {r["mean_power_mW"]:.0f} mW'
            print(line)
    finally:
        if monitor is not None:
            monitor.stop()

    out = {'backend': args.backend, 'model': args.model, 'batch_size': 1, 'jetson': jetson_model(),
           'warmup': args.warmup, 'iters': args.iters, 'python': platform.python_version()}
    out.update(runner.facts(args))
    out.update({
        'results': results, 'skipped': runner.skipped,
        'power': None if monitor is None else {
            'source': monitor.source_name, 'note': monitor.note, 'interval_ms': args.power_interval_ms,
            'energy_is': 'total board, idle included (the paper\'s convention)', 'error': monitor.error},
    })
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float) + '\n')
    return out


if __name__ == '__main__':
    main()
