"""Collaborative-inference benchmarks: the runtime's overhead, traffic vs a layer-split pipeline, scaling in N.

    python bench/collab_bench.py [--quick] [--json bench/collab.json]

Every number comes from real runs of `collab_infer.py` under `torch.distributed.launch` on loopback (one process per
device plus the aggregator, each limited to `--threads` intra-op threads, talking over the runtime's ZeroMQ wire),
with random-weight ensembles written by `write_ensemble` (models.ensemble_model: create_backbone + DeViTEnsemble,
saved as {'model', 'ensemble_config', 'args'}) and random-weight teachers. Two scales:

- paper: 224x224, four `dedeit` students (DeiT-Tiny shape) vs `deit_base_distilled_patch16_224`;
- demo:  28x28 Fashion-MNIST with demo.sh's own student and teacher shapes (read from demo.sh).

Benchmarks (keys of the JSON):
- collab_vs_slowest[_n2|_demo]: per image, end-to-end latency / the slowest worker's own forward time in that same
  request; the median over images (and over repeated runs). 1.0 would be a runtime that costs nothing. N=4 at the
  paper scale is the headline; `_n2` is N=2 with one thread per process, so each worker has a core to itself.
- collab_vs_floor[_n2]: demo scale, per image, end-to-end latency / the floor a runtime on these cores could reach:
  max(slowest worker's forward, sum of the forwards / usable cores) + one raw pyzmq round trip of the same sizes
  measured in the same run (bench/wire_bench.py's raw case). N=4 and N=2.
- collab_speedup_vs_teacher[_demo]: p50 latency of the monolithic teacher in one process (batch 1, timed here at one
  thread and at all cores, the faster counts) / p50 latency of the collaborative N=4 run; the two alternate.
- bytes_vs_layer_split[_demo]: intermediate bytes per image of the teacher cut into N=4 consecutive stages (three
  hops of T x D activations, plus the logits back to the aggregator) / the tokens the N students send back. Counted
  by the runtime in real runs and checked against the shapes. Input distribution is reported apart, uint8 and fp32.
- fp16_tokens: bytes with fp32 tokens / with --fp16-tokens (measured), and the accuracy change of a trained demo
  ensemble (output/demo/stage3/checkpoint.pth, 2,000 test images) when it exists.
- collab_scaling: N = 1, 2, 4, 8 students of one total size (a DeiT-Small budget: width 384/sqrt(N), so the total
  parameter count stays ~22M): latency, slowest compute, overhead ratio and bytes for each N.

On this 2-core machine N workers share the cores: with N > 2 every forward runs about N/2 times slower than alone,
which the worker's own time includes; the overhead ratio is still latency over the slowest of those times.
"""
import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import timm  # noqa: E402

import models  # noqa: E402,F401  (registers dedeit)
import utils  # noqa: E402
from models.checkpoint import training_state  # noqa: E402
from models.ensemble_model import CONFIG_KEY, DeViTEnsemble, create_backbone  # noqa: E402
from models.features import token_width  # noqa: E402
from tests.helpers import env as test_env  # noqa: E402
from tests.helpers import free_port, launch_cmd  # noqa: E402

DEMO_CHECKPOINT = os.path.join(ROOT, 'output', 'demo', 'stage3', 'checkpoint.pth')
DATA_ARGS = ['--dataset', 'fashion_mnist', '--tiny-transforms']
N = 4  # devices in the paper and the demo
# One total size split N ways (same total parameters: width W/sqrt(N)); N=4 is the paper's four DeiT-Tiny students.
SCALING_SHAPES = {1: (384, 6), 2: (272, 4), 4: (192, 3), 8: (136, 2)}  # N -> (embed_dim, num_heads), depth 12


class ModelSpec(NamedTuple):
    name: str
    kwargs: dict

    def cli(self) -> list[str]:
        """`--teacher-kwargs`-style k=v words."""
        return [f'{k}={v}' for k, v in self.kwargs.items()]


class Scale(NamedTuple):
    name: str
    student: ModelSpec
    teacher: ModelSpec
    num_classes: int


def demo_shapes(path: str = os.path.join(ROOT, 'demo.sh')) -> tuple[ModelSpec, ModelSpec]:
    """(student, teacher) of the full demo, read from demo.sh so that the benchmark follows it."""
    text = open(path).read()

    def grab(var: str) -> str:
        m = re.search(rf'^{var}=(\S+)$', text, re.M)
        if not m:
            raise ValueError(f'{var}= not found in {path}')
        return m.group(1)

    def kwargs(var: str) -> dict:
        m = re.search(rf'^{var}=\(([^)]*)\)', text, re.M)  # the first assignment: the full demo's, not --quick's
        if not m:
            raise ValueError(f'{var}=(...) not found in {path}')
        return {k: int(v) if v.lstrip('-').isdigit() else float(v)
                for k, v in (w.split('=', 1) for w in m.group(1).split())}

    return ModelSpec(grab('STUDENT'), kwargs('STUDENT_KW')), ModelSpec(grab('TEACHER'), kwargs('TEACHER_KW'))


def scales() -> dict[str, Scale]:
    demo_student, demo_teacher = demo_shapes()
    return {'paper': Scale('paper', ModelSpec('dedeit', {}), ModelSpec('deit_base_distilled_patch16_224', {}), 1000),
            'demo': Scale('demo', demo_student, demo_teacher, 10)}


def scaling_student(n: int) -> ModelSpec:
    dim, heads = SCALING_SHAPES[n]
    return ModelSpec('dedeit', {'embed_dim': dim, 'num_heads': heads, 'depth': 12})


# ----------------------------------------------------------------------------------------------------------------
# Models and runs

def _meta(spec: ModelSpec, num_classes: int, backbone: bool = False) -> torch.nn.Module:
    with torch.device('meta'):
        if backbone:
            return create_backbone(spec.name, spec.kwargs)
        return timm.create_model(spec.name, num_classes=num_classes, **spec.kwargs)


def write_ensemble(path: str, students: Sequence[ModelSpec], teacher: ModelSpec, num_classes: int,
                   seed: int = 0) -> str:
    """A random-weight stage-3 checkpoint (as ensemble.py writes it) of `students`, head at the teacher's width."""
    torch.manual_seed(seed)
    embed_dim = _meta(teacher, num_classes).num_features
    ens = DeViTEnsemble([create_backbone(s.name, s.kwargs) for s in students], num_classes, embed_dim)
    utils.save_checkpoint(training_state(ens, args={'dataset': 'fashion_mnist', 'tiny_transforms': True},
                                         **{CONFIG_KEY: ens.config}), path)
    return path


class Runner:
    """Runs collab_infer.py as real processes; keeps every report (with its per-image CSV rows) under `workdir`.

    prefix: words put before the launcher (bench/links_bench.py runs everything inside a network namespace).
    """

    def __init__(self, workdir: str, verbose: bool = True, prefix: Sequence[str] = ()):
        self.workdir = workdir
        self.verbose = verbose
        self.prefix = list(prefix)
        self.count = 0

    def __call__(self, nproc: int, argv: Sequence[str], threads: int, tag: str, timeout: float = 900) -> dict:
        self.count += 1
        stem = os.path.join(self.workdir, f'{self.count:02d}-{tag}')
        argv = [*map(str, argv), '--threads', str(threads), '--report', stem + '.json', '--csv', stem + '.csv',
                '--collab-port', str(free_port())]
        cmd = [*self.prefix, *launch_cmd('collab_infer.py', *argv, nproc=nproc)]
        env = dict(test_env(), OMP_NUM_THREADS=str(threads))
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f'{" ".join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}')
        with open(stem + '.json') as f:
            report = json.load(f)
        with open(stem + '.csv', newline='') as f:
            report['rows'] = list(csv.DictReader(f))
        report['wall_seconds'] = time.perf_counter() - started
        if self.verbose:
            lat = report['latency_ms']
            print(f'  [{tag}] {report["mode"]} world {report["world_size"]} x{threads} thread(s): '
                  f'{report["num_images"]} images, latency p50 {lat["p50"]:.2f} ms, '
                  f'results {report["bytes_per_image"]:.0f} B/img, input {report["input_bytes_per_image"]:.0f} B/img '
                  f'({report["wall_seconds"]:.0f} s)',
                  flush=True)
        return report


def collab_argv(ckpt: str, limit: int, *, fp16: bool = False, input_dtype: str = 'uint8', warmup: int = 3) -> list:
    return ['--model-path', ckpt, '--limit', limit, '--warmup', warmup, '--input-dtype', input_dtype,
            '--timeout', 300, *(['--fp16-tokens'] if fp16 else [])]


def teacher_argv(scale: Scale, mode: str, limit: int, *, fp16: bool = False, input_dtype: str = 'fp32',
                 warmup: int = 2) -> list:
    kw = ['--teacher-kwargs', *scale.teacher.cli()] if scale.teacher.kwargs else []
    return ['--mode', mode, '--teacher-model', scale.teacher.name, *kw, '--nb-classes', scale.num_classes,
            *DATA_ARGS, '--limit', limit, '--warmup', warmup, '--input-dtype', input_dtype, '--timeout', 600,
            *(['--fp16-tokens'] if fp16 else [])]


class TeacherTimer:
    """The monolithic baseline: the teacher (random weights) in this process, batch 1, as the runtime's monolithic
    mode times it (inference mode, forward only), at each thread count in turn; the best is the baseline."""

    def __init__(self, scale: Scale, threads: Sequence[int]):
        torch.manual_seed(0)
        self.name = scale.teacher.name
        self.model = timm.create_model(scale.teacher.name, num_classes=scale.num_classes, **scale.teacher.kwargs).eval()
        c, s = self.model.patch_embed.proj.in_channels, self.model.patch_embed.img_size[0]
        self.x = torch.randn(1, c, s, s)
        self.threads = list(threads)

    @torch.inference_mode()
    def __call__(self, images: int, verbose: bool = True) -> dict[int, float]:
        """Median ms per image at each thread count."""
        prev = torch.get_num_threads()
        out = {}
        try:
            for t in self.threads:
                torch.set_num_threads(t)
                self.model(self.x)  # warm-up
                times = []
                for _ in range(images):
                    start = time.perf_counter()
                    self.model(self.x)
                    times.append(1e3 * (time.perf_counter() - start))
                out[t] = statistics.median(times)
        finally:
            torch.set_num_threads(prev)
        if verbose:
            print(f'  [teacher] {self.name} in this process, {images} images: '
                  + ', '.join(f'{t} thread(s) p50 {ms:.2f} ms' for t, ms in out.items()), flush=True)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Statistics of runs

def overhead(reports: Sequence[Mapping]) -> dict:
    """Per image: latency / slowest worker's own forward in that request; median (the ratio) and spread."""
    per_image = [float(r['latency_ms']) / float(r['compute_ms']) for rep in reports for r in rep['rows']]
    per_run = [statistics.median(float(r['latency_ms']) / float(r['compute_ms']) for r in rep['rows'])
               for rep in reports]
    lat = [float(r['latency_ms']) for rep in reports for r in rep['rows']]
    comp = [float(r['compute_ms']) for rep in reports for r in rep['rows']]
    last = reports[-1]
    return {
        'ratio': statistics.median(per_image),
        'ratio_p90': _percentile(per_image, 90),
        'ratio_per_run': per_run,
        'ratio_of_means': statistics.fmean(lat) / statistics.fmean(comp),
        'report_latency_vs_slowest_mean_compute': [rep['latency_vs_slowest_compute'] for rep in reports],
        'latency_p50_ms': statistics.median(lat),
        'latency_p95_ms': _percentile(lat, 95),
        'slowest_compute_p50_ms': statistics.median(comp),
        'overhead_p50_ms': statistics.median(a - b for a, b in zip(lat, comp, strict=True)),
        'breakdown_p50_ms': last['breakdown_p50_ms'],
        'worker_compute_ms': last['worker_compute_ms'],
        'images': len(per_image), 'runs': len(reports), 'world_size': last['world_size'], 'threads': last['threads'],
    }


def floor_ratio(reports: Sequence[Mapping], raw_ms: float, cores: int) -> dict:
    """Per image: latency / (max(slowest forward, sum of forwards / cores) + raw_ms); median and the parts."""
    ratios, floors = [], []
    for rep in reports:
        for r in rep['rows']:
            ms = [float(v) for v in r['worker_ms'].split()]
            floors.append(max(max(ms), sum(ms) / cores) + raw_ms)
            ratios.append(float(r['latency_ms']) / floors[-1])
    return {'ratio': statistics.median(ratios), 'ratio_p90': _percentile(ratios, 90),
            'floor_p50_ms': statistics.median(floors), 'raw_round_trip_ms': raw_ms, 'usable_cores': cores,
            'latency_p50_ms': p50(reports), 'images': len(ratios), 'runs': len(reports)}


def _percentile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def p50(reports: Sequence[Mapping]) -> float:
    return statistics.median(float(r['latency_ms']) for rep in reports for r in rep['rows'])


def agreement(a: Mapping, b: Mapping) -> float:
    """Fraction of images on which two runs over the same images predict the same class."""
    pa = {r['image']: r['pred'] for r in a['rows']}
    pb = {r['image']: r['pred'] for r in b['rows']}
    common = pa.keys() & pb.keys()
    return sum(pa[k] == pb[k] for k in common) / max(len(common), 1)


# ----------------------------------------------------------------------------------------------------------------
# Analytic traffic, from the models' shapes

def analytic_bytes(scale: Scale, students: Sequence[ModelSpec], n_stages: int) -> dict:
    """Bytes per image each design puts on the wire, from shapes alone (the runtime's protocol)."""
    backbones = [_meta(s, scale.num_classes, backbone=True) for s in students]
    teacher = _meta(scale.teacher, scale.num_classes)
    floats = sum(token_width(b, dist=True) for b in backbones)
    tokens = teacher.patch_embed.num_patches + teacher.num_prefix_tokens
    c, s = teacher.patch_embed.proj.in_channels, teacher.patch_embed.img_size[0]
    pixels = c * s * s
    out = {}
    for wire, size in (('fp32', 4), ('fp16', 2)):
        out[f'collab_tokens_{wire}'] = floats * size
        out[f'layer_split_activations_{wire}'] = (n_stages - 1) * tokens * teacher.embed_dim * size
        # The last stage returns the logits, always fp32 (collab_infer sends `out.float()`).
        out[f'layer_split_total_{wire}'] = out[f'layer_split_activations_{wire}'] + scale.num_classes * 4
    for dtype, size in (('uint8', 1), ('fp32', 4)):
        out[f'collab_input_{dtype}'] = len(students) * pixels * size  # the image goes to every device
        out[f'layer_split_input_{dtype}'] = pixels * size  # the image goes to the first stage only
    out.update(activation_shape=[tokens, teacher.embed_dim], hops=n_stages - 1, token_floats=floats,
               image_shape=[c, s, s])
    return out


# ----------------------------------------------------------------------------------------------------------------
# The benchmarks

def bench(quick: bool, workdir: str, trained_checkpoint: str = DEMO_CHECKPOINT, verbose: bool = True) -> dict:
    run = Runner(workdir, verbose)
    sc = scales()
    paper, demo = sc['paper'], sc['demo']
    rounds = 1 if quick else 3
    lim = {'paper': 12 if quick else 40, 'teacher': 3 if quick else 6, 'split': 3 if quick else 5,
           'demo': 100 if quick else 400, 'scaling': 8 if quick else 20}

    ckpt = {n: write_ensemble(os.path.join(workdir, f'paper-n{n}.pth'), [scaling_student(n)] * n, paper.teacher,
                              paper.num_classes) for n in ((1, 2, 4) if quick else (1, 2, 4, 8))}
    ckpt['demo'] = write_ensemble(os.path.join(workdir, 'demo.pth'), [demo.student] * N, demo.teacher,
                                  demo.num_classes)
    ckpt['demo2'] = write_ensemble(os.path.join(workdir, 'demo-n2.pth'), [demo.student] * 2, demo.teacher,
                                   demo.num_classes)
    cores = os.cpu_count() or 1

    # Paper scale, N=4, alternating with the monolithic teacher timed in this process.
    if verbose:
        print(f'paper scale (224x224): {N} x {paper.student.name} vs {paper.teacher.name}', flush=True)
    threads = sorted({1, cores})
    p4, mono = [], []
    teacher = TeacherTimer(paper, threads)
    for _ in range(rounds):
        p4.append(run(N + 1, collab_argv(ckpt[4], lim['paper']), 1, 'paper-collab-n4'))
        mono.append(teacher(lim['teacher'], verbose))
    del teacher
    p2 = [run(3, collab_argv(ckpt[2], lim['paper']), 1, 'paper-collab-n2')]
    p1 = [run(2, collab_argv(ckpt[1], lim['scaling']), 1, 'paper-collab-n1')]
    p8 = [] if quick else [run(9, collab_argv(ckpt[8], lim['scaling']), 1, 'paper-collab-n8')]
    split = run(N + 1, teacher_argv(paper, 'layer-split', lim['split'], input_dtype='fp32', warmup=1), 1,
                'paper-layer-split')
    split16 = None if quick else run(N + 1, teacher_argv(paper, 'layer-split', lim['split'], fp16=True,
                                                         input_dtype='uint8', warmup=1), 1, 'paper-layer-split-fp16')
    p4_16 = None if quick else run(N + 1, collab_argv(ckpt[4], lim['split'], fp16=True, input_dtype='fp32'), 1,
                                   'paper-collab-n4-fp16')

    # Demo scale.
    if verbose:
        print(f'demo scale (28x28): {N} x {demo.student.name} {demo.student.kwargs} vs {demo.teacher.name} '
              f'{demo.teacher.kwargs}', flush=True)
    from bench.wire_bench import raw_round_trip_us

    raw_us = [raw_round_trip_us('demo')]
    d4, dmono = [], []
    teacher = TeacherTimer(demo, threads)
    for _ in range(rounds):
        d4.append(run(N + 1, collab_argv(ckpt['demo'], lim['demo']), 1, 'demo-collab-n4'))
        dmono.append(teacher(lim['demo'], verbose))
    d4_16 = run(N + 1, collab_argv(ckpt['demo'], lim['demo'], fp16=True, input_dtype='fp32'), 1,
                'demo-collab-n4-fp16')
    d2 = run(3, collab_argv(ckpt['demo2'], lim['demo']), 1, 'demo-collab-n2')
    raw_us.append(raw_round_trip_us('demo'))
    dsplit = run(N + 1, teacher_argv(demo, 'layer-split', lim['demo'] // 3, input_dtype='fp32'), 1,
                 'demo-layer-split')
    dsplit16 = None if quick else run(N + 1, teacher_argv(demo, 'layer-split', lim['demo'] // 3, fp16=True,
                                                          input_dtype='uint8'), 1, 'demo-layer-split-fp16')

    # Trained demo ensemble: the accuracy cost of fp16 tokens.
    trained = None
    have_trained = bool(trained_checkpoint) and os.path.isfile(trained_checkpoint)
    if have_trained and not quick:
        a = run(N + 1, collab_argv(trained_checkpoint, 2000), 1, 'trained-fp32')
        b = run(N + 1, collab_argv(trained_checkpoint, 2000, fp16=True), 1, 'trained-fp16')
        trained = {'checkpoint': os.path.relpath(trained_checkpoint, ROOT), 'images': a['num_images'],
                   'accuracy_fp32': a['accuracy'], 'accuracy_fp16': b['accuracy'],
                   'accuracy_change': b['accuracy'] - a['accuracy'], 'prediction_agreement': agreement(a, b)}

    results = {}
    # --- overhead
    o4, o2, od = overhead(p4), overhead(p2), overhead(d4)
    results['collab_vs_slowest'] = {
        'ratio': o4['ratio'], 'target': 1.15, 'direction': 'max',
        'what': f'paper scale, N={N} x dedeit at 224x224 on loopback, 1 thread per process ({cores} cores shared by '
                f'{N + 1} processes): per-image latency / slowest worker\'s own forward in the same request, median '
                f'of {o4["images"]} images over {o4["runs"]} run(s)',
        **o4}
    results['collab_vs_slowest_n2'] = {
        'ratio': o2['ratio'], 'target': 1.15, 'direction': 'max',
        'what': f'N=2 students of the same total size (2 x dedeit {SCALING_SHAPES[2][0]} wide) at 224x224, 1 thread '
                'per process: each worker has a core to itself', **o2}
    od_n2 = overhead([d2]) if d2 else None
    results['collab_vs_slowest_demo'] = {
        'ratio': od['ratio'], 'target': 1.15, 'direction': 'max',
        'what': f'demo scale, N={N} demo students (28x28, {demo.student.kwargs}): a forward takes about a millisecond,'
                ' so loopback messages and process wake-ups dominate', **od, 'n2': od_n2}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else cores
    raw_ms = statistics.median(raw_us) / 1e3
    for key, n, reps in (('collab_vs_floor', N, d4), ('collab_vs_floor_n2', 2, [d2])):
        f = floor_ratio(reps, raw_ms, usable)
        results[key] = {
            'ratio': f['ratio'], 'target': 1.3, 'direction': 'max',
            'what': f'demo scale, N={n}: per-image latency / (max(slowest forward, sum of forwards / {usable} cores) '
                    f'+ raw pyzmq round trip {raw_ms * 1e3:.0f} us), median of {f["images"]} images: what the '
                    'runtime adds to what these cores and the transport must cost', **f}
    # --- speed-up vs the teacher
    for key, scale, mono_ms, runs, n2 in (('collab_speedup_vs_teacher', paper, mono, p4, p2),
                                          ('collab_speedup_vs_teacher_demo', demo, dmono, d4, [d2] if d2 else None)):
        best = min(threads, key=lambda t: statistics.median(m[t] for m in mono_ms))
        teacher_ms = statistics.median(m[best] for m in mono_ms)
        results[key] = {
            'ratio': teacher_ms / p50(runs), 'target': 1.0, 'direction': 'min',
            'what': f'{scale.name} scale: p50 latency of the monolithic {scale.teacher.name}'
                    f'{" " + str(scale.teacher.kwargs) if scale.teacher.kwargs else ""} (random weights, batch 1, one '
                    f'process, best of {threads} threads: {best}) / p50 of the N={N} collaborative run (1 thread per '
                    f'process, {cores} cores in all); collaborative runs and teacher timings alternate',
            'teacher_p50_ms_by_threads': {t: statistics.median(m[t] for m in mono_ms) for t in threads},
            'collab_p50_ms': p50(runs),
            **({'collab_n2_p50_ms': p50(n2), 'speedup_n2': teacher_ms / p50(n2)} if n2 else {})}
    # --- bytes
    results['bytes_vs_layer_split'] = bytes_entry(paper, [paper.student] * N,
                                                  [r for r in (p4[-1], split, p4_16, split16) if r])
    results['bytes_vs_layer_split_demo'] = bytes_entry(demo, [demo.student] * N,
                                                       [r for r in (d4[-1], dsplit, d4_16, dsplit16) if r])
    results['bytes_vs_layer_split_demo']['what'] = (
        'demo scale (28x28, 4 demo students vs the demo teacher in 4 stages): only '
        f'{results["bytes_vs_layer_split_demo"]["analytic"]["activation_shape"][0]} tokens per activation, so the '
        'pipeline ships less and the ratio is smaller: ' + results['bytes_vs_layer_split_demo']['what'])
    # --- fp16
    fp32_b, fp16_b = d4[-1]['bytes_per_image'], d4_16['bytes_per_image']
    results['fp16_tokens'] = {
        'ratio': fp32_b / fp16_b, 'target': 1.99, 'direction': 'min',
        'what': 'collab bytes per image with fp32 tokens / with --fp16-tokens (demo scale, measured); '
                + (f'accuracy of the trained demo ensemble on 2,000 test images: {trained["accuracy_fp32"]:.4f} '
                   f'(fp32) -> {trained["accuracy_fp16"]:.4f} (fp16), change {trained["accuracy_change"]:+.4f}'
                   if trained else 'accuracy change measured in the full run only' if have_trained else
                   f'accuracy change not measured: no trained ensemble at {os.path.relpath(DEMO_CHECKPOINT, ROOT)} '
                   '(run demo.sh first)'),
        'demo_collab_bytes': {'fp32': fp32_b, 'fp16': fp16_b},
        'demo_layer_split_bytes': {'fp32': dsplit['bytes_per_image'],
                                   'fp16': dsplit16['bytes_per_image'] if dsplit16 else None},
        'paper_collab_bytes': {'fp32': p4[-1]['bytes_per_image'],
                               'fp16': p4_16['bytes_per_image'] if p4_16 else None},
        'paper_layer_split_bytes': {'fp32': split['bytes_per_image'],
                                    'fp16': split16['bytes_per_image'] if split16 else None},
        'prediction_agreement_random_weights': agreement(d4[-1], d4_16),
        'trained': trained}
    # --- scaling
    rows = []
    for n, reps in ((1, p1), (2, p2), (4, p4), (8, p8)):
        if not reps:
            continue
        o = overhead(reps)
        params = n * sum(p.numel() for p in _meta(scaling_student(n), 0, backbone=True).parameters())
        rows.append({'n': n, 'student': {'embed_dim': SCALING_SHAPES[n][0], 'num_heads': SCALING_SHAPES[n][1],
                                         'depth': 12},
                     'student_params_total': params, 'latency_p50_ms': o['latency_p50_ms'],
                     'slowest_compute_p50_ms': o['slowest_compute_p50_ms'], 'overhead_ratio': o['ratio'],
                     'bytes_per_image': reps[-1]['bytes_per_image'],
                     'input_bytes_per_image_uint8': reps[-1]['input_bytes_per_image']})
    base = rows[0]['latency_p50_ms']
    for r in rows:
        r['speedup_vs_n1'] = base / r['latency_p50_ms']
    results['collab_scaling'] = {
        'ratio': rows[-1]['bytes_per_image'] / rows[0]['bytes_per_image'], 'target': None, 'direction': None,
        'what': f'N = {", ".join(str(r["n"]) for r in rows)} students of one total size (width 384/sqrt(N), depth '
                f'12, 224x224; ratio = bytes at N={rows[-1]["n"]} / at N=1, growing as sqrt(N)); on {cores} cores '
                'latency stops improving past N=2 since the workers share them',
        'rows': rows}
    return results


def bytes_entry(scale: Scale, students: Sequence[ModelSpec], reports: Sequence[Mapping]) -> dict:
    """Bytes per image measured in `reports` (collab and layer-split runs of one scale), checked against the shapes;
    ratio = layer-split results / collab results, both fp32."""
    a = analytic_bytes(scale, students, N)
    design = {'collab': 'collab', 'layer-split': 'layer_split'}
    measured, inputs = {}, {}
    for r in reports:
        measured[f'{design[r["mode"]]}_{r["wire_dtype"]}'] = r['bytes_per_image']
        inputs[f'{design[r["mode"]]}_{r["input_dtype"]}'] = r['input_bytes_per_image']
    expect = {f'{d}_{w}': a[f'collab_tokens_{w}' if d == 'collab' else f'layer_split_total_{w}']
              for d in design.values() for w in ('fp32', 'fp16')}
    expect_in = {f'{d}_{t}': a[f'{d}_input_{t}'] for d in design.values() for t in ('uint8', 'fp32')}
    mismatches = {k: [v, expect[k]] for k, v in measured.items() if abs(v - expect[k]) > 0.5}
    mismatches.update({f'input_{k}': [v, expect_in[k]] for k, v in inputs.items() if abs(v - expect_in[k]) > 0.5})
    ratio = measured['layer_split_fp32'] / measured['collab_fp32']
    return {
        'ratio': ratio, 'target': 50.0, 'direction': 'min',
        'what': (f'bytes per image, {scale.teacher.name} in {N} consecutive stages ({a["hops"]} hops of '
                 f'{a["activation_shape"][0]}x{a["activation_shape"][1]} fp32 activations + logits back: '
                 f'{measured["layer_split_fp32"]:.0f} B) / {N} students\' tokens ({measured["collab_fp32"]:.0f} B); '
                 f'activations alone: {a["layer_split_activations_fp32"] / a["collab_tokens_fp32"]:.1f}x. Input, '
                 f'apart: collab {a["collab_input_uint8"]} B uint8 / {a["collab_input_fp32"]} B fp32 (the image to '
                 f'every device), layer-split {a["layer_split_input_uint8"]} / {a["layer_split_input_fp32"]} B '
                 '(first stage only)'),
        'measured': measured, 'measured_input': inputs, 'analytic': a,
        'analytic_matches_measured': not mismatches, 'mismatches': mismatches,
        'ratio_with_input_uint8': (a['layer_split_total_fp32'] + a['layer_split_input_uint8'])
        / (a['collab_tokens_fp32'] + a['collab_input_uint8']),
        'ratio_with_input_fp32': (a['layer_split_total_fp32'] + a['layer_split_input_fp32'])
        / (a['collab_tokens_fp32'] + a['collab_input_fp32'])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='fewer images and runs, N = 1, 2, 4 only')
    p.add_argument('--json', default=None, help='write the results here')
    p.add_argument('--trained-checkpoint', default=DEMO_CHECKPOINT,
                   help='a trained demo ensemble for the fp16 accuracy check (skipped when missing)')
    p.add_argument('--keep', default=None, help='keep the reports, CSVs and checkpoints in this folder')
    args = p.parse_args(argv)
    workdir = args.keep or tempfile.mkdtemp(prefix='devit-bench-collab-')
    os.makedirs(workdir, exist_ok=True)
    try:
        results = bench(args.quick, workdir, args.trained_checkpoint)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    from bench.common import finish

    return finish(results, args.json)


if __name__ == '__main__':
    main()
