"""Benchmark: one device's model in onnxruntime vs PyTorch eager, the export's reason to exist on a CPU.

    python bench/onnx_bench.py [--quick] [--json bench/onnx.json]

`onnx_vs_torch_student`: p50 latency of one `dedeit` student's device graph (image -> cls|dist tokens, what a
device computes; random weights) at 224x224, batch 1, one intra-op thread, in onnxruntime (the graph
export_onnx.py writes: models.onnx_export.export_graph, opset 17) / in PyTorch eager (`torch.inference_mode`,
`torch.set_num_threads(1)`). The two alternate in rounds of a few calls each, so a busy neighbour slows both alike;
the ratio is of the medians over all calls. Target <= 0.85: the export must pay for itself.
`onnx_vs_torch_student_demo`: the same at the demo's scale (28x28 grey images, patch 7, width 64, depth 2, 2 heads).

onnxruntime runs with intra_op_num_threads=1, inter_op_num_threads=1 and sequential execution. Its other session
options (graph optimisation level, parallel execution) are timed in the same rounds and listed under `options`, so
the figure shows whether another setting would do better here.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import onnxruntime as ort  # noqa: E402

from models.ensemble_model import create_backbone  # noqa: E402
from models.onnx_export import DeviceGraph, export_graph  # noqa: E402

TARGET = 0.85
PAPER = {}  # dedeit's own defaults: 224x224, patch 16, width 192, depth 12, 3 heads
DEMO = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 64, 'depth': 2, 'num_heads': 2}
LEVELS = {'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
DEFAULT_OPTION = 'all/sequential'


def ort_session(path, level='all', mode='sequential'):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = LEVELS[level]
    options.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if mode == 'sequential' else
                              ort.ExecutionMode.ORT_PARALLEL)
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def compare(kwargs, rounds, calls, workdir, name):
    """Alternate PyTorch eager and onnxruntime sessions (each option) on one model; ms per call of each."""
    torch.manual_seed(0)
    graph = DeviceGraph(create_backbone('dedeit', kwargs), distilled=True).eval()
    size, chans = graph.backbone.patch_embed.img_size[0], graph.backbone.patch_embed.proj.in_channels
    x = torch.randn(1, chans, size, size)
    path = os.path.join(workdir, f'{name}.onnx')
    export_graph(graph, [torch.cat([x, x])], ['image'], 'tokens', path)
    feed = {'image': x.numpy()}
    sessions = {f'{level}/{mode}': ort_session(path, level, mode)
                for level in LEVELS for mode in ('sequential', 'parallel')}
    with torch.inference_mode():
        ref = graph(x).numpy()
    for s in sessions.values():  # same tokens before anything is timed
        assert np.abs(s.run(None, feed)[0] - ref).max() < 1e-4

    def run_torch():
        with torch.inference_mode():
            graph(x)
    runners = {'torch': run_torch, **{k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}}
    for fn in runners.values():  # warm-up
        for _ in range(3):
            fn()
    times = {k: [] for k in runners}
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for k in order:
            for _ in range(calls):
                t0 = time.perf_counter()
                runners[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return p50, {k: len(v) for k, v in times.items()}, sum(p.numel() for p in graph.parameters())


def bench(quick=False):
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix='devit-bench-onnx-') as workdir:
        for key, kwargs, scale, (rounds, calls) in (
                ('onnx_vs_torch_student', PAPER, '224x224 dedeit (width 192, depth 12, 3 heads, patch 16)',
                 (5, 4) if quick else (11, 10)),
                ('onnx_vs_torch_student_demo', DEMO, "the demo's scale: 28x28x1, patch 7, width 64, depth 2, 2 heads",
                 (5, 20) if quick else (11, 100))):
            load = os.getloadavg()[0]
            p50, counts, params = compare(kwargs, rounds, calls, workdir, key)
            options = {k: v / p50['torch'] for k, v in p50.items() if k != 'torch'}
            best = min(options, key=options.get)
            results[key] = {
                'ratio': options[DEFAULT_OPTION], 'target': TARGET, 'direction': 'max',
                'what': f'onnxruntime / PyTorch eager p50 latency of one student\'s device graph, {scale}, batch 1, '
                        f'1 thread ({p50[DEFAULT_OPTION]:.2f} vs {p50["torch"]:.2f} ms; best option {best}: '
                        f'{options[best]:.3f})',
                'torch_p50_ms': p50['torch'], 'onnxruntime_p50_ms': p50[DEFAULT_OPTION],
                'session_options': DEFAULT_OPTION + ', intra_op_num_threads=1, inter_op_num_threads=1',
                'options': {k: {'p50_ms': p50[k], 'ratio': r} for k, r in options.items()},
                'calls_each': counts['torch'], 'rounds': rounds, 'params': params, 'threads': 1,
                'load_before': load, 'load_after': os.getloadavg()[0],
                'onnxruntime': ort.__version__, 'torch': torch.__version__}
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--json', default=None, help='write the results here')
    args = p.parse_args(argv)
    results = bench(args.quick)
    for key, r in results.items():
        print(f'{key}: {r["ratio"]:.3f} (target <= {r["target"]}) {r["what"]}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    main()
