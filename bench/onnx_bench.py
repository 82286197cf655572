"""Benchmark: one device's model in onnxruntime vs PyTorch eager, the export's reason to exist on a CPU.

    python bench/onnx_bench.py [--quick] [--only student|collab] [--json bench/onnx.json]

`onnx_vs_torch_student`: p50 latency of one `dedeit` student's device graph (image -> cls|dist tokens, what a
device computes; random weights) at 224x224, batch 1, one intra-op thread, in onnxruntime (the graph
export_onnx.py writes: collab.host.onnx_graphs.export_graph, opset 17) / in PyTorch eager (`torch.inference_mode`,
`torch.set_num_threads(1)`). The two alternate in rounds of a few calls each, so a busy neighbour slows both alike;
the ratio is of the medians over all calls. Target <= 0.85: the export must pay for itself.
`onnx_vs_torch_student_demo`: the same at the demo's scale (28x28 grey images, patch 7, width 64, depth 2, 2 heads).

onnxruntime runs with intra_op_num_threads=1, inter_op_num_threads=1 and sequential execution (collab/sessions.py,
as the runtime's workers open it). Its other session options (graph optimisation level, parallel execution) are
timed in the same rounds and listed under `options`, so the figure shows whether another setting would do better.

`collab_onnx_vs_torch`: the collaborative runtime end to end, p50 latency per image with onnxruntime workers and
head (`collab_infer.py --backend onnxruntime --model-path EXPORT`) / with PyTorch ones (`--backend torch
--model-path CHECKPOINT`), at the paper's scale: four `dedeit` students at 224x224 (random weights, a head of
deit_base's width over 1000 classes, bench/collab_bench.py's `write_ensemble`), exported by export_onnx.py. Both
are real runs under torch.distributed.launch on loopback, 5 processes of one thread each, the image sent as uint8;
the two backends alternate run by run and the ratio is of the medians of the runs' p50. The slowest worker's own
forward (p50) of each is reported beside it, so the ratio splits into compute and the runtime's overhead.
`collab_onnx_vs_torch_demo`: the same with demo.sh's students on 28x28 images. Target <= 1.0: onnxruntime workers
must not make the collaborative answer slower.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
import onnxruntime as ort  # noqa: E402

from collab.host.onnx_graphs import export_graph  # noqa: E402
from collab.sessions import session  # noqa: E402
from models.ensemble_model import create_backbone  # noqa: E402
from models.features import DeviceTokens  # noqa: E402

TARGET = 0.85
BACKENDS = ('torch', 'onnxruntime')
PAPER = {}  # dedeit's own defaults: 224x224, patch 16, width 192, depth 12, 3 heads
DEMO = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 64, 'depth': 2, 'num_heads': 2}
LEVELS = ('all', 'extended', 'basic')  # of collab.sessions.LEVELS, timed side by side
DEFAULT_OPTION = 'all/sequential'


def compare(kwargs, rounds, calls, workdir, name):
    """Alternate PyTorch eager and onnxruntime sessions (each option) on one model; ms per call of each."""
    torch.manual_seed(0)
    graph = DeviceTokens(create_backbone('dedeit', kwargs), distilled=True).eval()
    size, chans = graph.backbone.patch_embed.img_size[0], graph.backbone.patch_embed.proj.in_channels
    x = torch.randn(1, chans, size, size)
    path = os.path.join(workdir, f'{name}.onnx')
    export_graph(graph, [torch.cat([x, x])], ['image'], 'tokens', path)
    feed = {'image': x.numpy()}
    sessions = {f'{level}/{mode}': session(path, 1, 'cpu', level, parallel=mode == 'parallel')
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


def bench_student(quick=False):
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


def export(checkpoint, folder, *flags):
    """export_onnx.py of `checkpoint` into `folder`, as a process (as a user runs it); the folder."""
    from tests.helpers import env

    subprocess.run([sys.executable, os.path.join(ROOT, 'export_onnx.py'), '--model-path', checkpoint, '--output_dir',
                    folder, *flags], cwd=ROOT, env=env(), check=True, capture_output=True, timeout=1800)
    return folder


def collab_compare(scale, rounds, limit, workdir, verbose=True):
    """Collaborative runs of one random-weight ensemble of `scale` on both backends, alternated: the reports."""
    from bench import collab_bench as collab

    ckpt = collab.write_ensemble(os.path.join(workdir, f'{scale.name}.pth'), [scale.student] * collab.N,
                                 scale.teacher, scale.num_classes)
    folder = export(ckpt, os.path.join(workdir, f'{scale.name}-export'), '--parity-images', '2')
    run = collab.Runner(workdir, verbose)
    paths = {'torch': ckpt, 'onnxruntime': folder}
    reports = {'torch': [], 'onnxruntime': []}
    for r in range(rounds):
        for backend in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
            argv = [*collab.collab_argv(paths[backend], limit), '--backend', backend]
            reports[backend].append(run(collab.N + 1, argv, threads=1, tag=f'{scale.name}-{backend}'))
    return reports


def collab_result(scale, reports, what):
    from bench import collab_bench as collab

    p50 = {b: statistics.median(collab.p50([rep]) for rep in reps) for b, reps in reports.items()}
    compute = {b: statistics.median(float(r['compute_ms']) for rep in reps for r in rep['rows'])
               for b, reps in reports.items()}
    ratio = p50['onnxruntime'] / p50['torch']
    return {'ratio': ratio, 'target': 1.0, 'direction': 'max',
            'what': f'collaborative p50 latency, onnxruntime workers and head / PyTorch ones, {what}, '
                    f'{collab.N} workers + aggregator at 1 thread each on loopback ({p50["onnxruntime"]:.2f} vs '
                    f'{p50["torch"]:.2f} ms; slowest worker forward p50 {compute["onnxruntime"]:.2f} vs '
                    f'{compute["torch"]:.2f} ms)',
            'p50_ms': p50, 'p50_ms_per_run': {b: [collab.p50([rep]) for rep in reps] for b, reps in reports.items()},
            'slowest_compute_p50_ms': compute, 'compute_ratio': compute['onnxruntime'] / compute['torch'],
            'prediction_agreement': collab.agreement(reports['torch'][0], reports['onnxruntime'][0]),
            'runs_each': len(reports['torch']), 'images_per_run': reports['torch'][0]['num_images'],
            'world_size': reports['torch'][0]['world_size'], 'threads': 1, 'student': scale.student._asdict(),
            'load_after': os.getloadavg()[0]}


def bench_collab(quick=False, verbose=True):
    from bench import collab_bench as collab

    sc = collab.scales()
    rounds = 2 if quick else 4
    results = {}
    with tempfile.TemporaryDirectory(prefix='devit-bench-collab-onnx-') as workdir:
        for key, scale, limit, what in (
                ('collab_onnx_vs_torch', sc['paper'], 10 if quick else 30,
                 'paper scale: 4 dedeit students at 224x224, random weights'),
                ('collab_onnx_vs_torch_demo', sc['demo'], 60 if quick else 300,
                 "the demo's scale: demo.sh's students at 28x28")):
            load = os.getloadavg()[0]
            results[key] = {**collab_result(scale, collab_compare(scale, rounds, limit, workdir, verbose), what),
                            'load_before': load}
    return results


def bench(quick=False):
    return {**bench_student(quick), **bench_collab(quick)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--only', choices=['student', 'collab'], default=None,
                   help='onnx_vs_torch_student* only, or collab_onnx_vs_torch* only')
    p.add_argument('--json', default=None, help='write the results here')
    args = p.parse_args(argv)
    results = {None: bench, 'student': bench_student, 'collab': bench_collab}[args.only](args.quick)
    from bench.common import finish

    return finish(results, args.json)


if __name__ == '__main__':
    main()
