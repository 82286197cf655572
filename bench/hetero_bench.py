"""A fleet of unlike devices on throttled CPUs: the planned decomposition against the uniform (paper) one, 224x224.

    python bench/hetero_bench.py [--quick] [--json bench/hetero.json]

The fleet: four devices, two of them 4x slower than the other two, emulated on this machine's CPU with the kernel's
CFS quota (collab.quota): worker quotas 0.6 0.6 0.15 0.15 of one core. Not 1 1 0.25 0.25: this machine has 2 cores
for 5 processes (4 workers and the aggregator), and 1 + 1 + 0.25 + 0.25 = 2.5 cores do not fit, so the fast workers
would be slowed by contention rather than by their quota, and neither the profiles nor the plan would describe the
run. 0.8 0.8 0.2 0.2 would fit exactly (2.0 cores), with nothing left for the aggregator, the kernel and the other
jobs of this shared machine, so the four workers running at once fall behind the profiles, each measured alone (the
fast ones by 25-50% in a trial at a load of 10). 0.6 + 0.6 + 0.15 + 0.15 = 1.5 cores keeps the 4x ratio and leaves
half a core. A quota caps a process but gives it nothing on a busy machine (at a load of 10, a process capped at 0.8
of a core got about 0.25): every emulated device here also reserves its fraction (``reserve=True``,
``--cpu-reserve``: a CFS weight in proportion to its quota), so it runs at its quota while other jobs compete, and
never faster. The load average is recorded with the results.

Steps, all in this run:
1. profile each kind of device: ``python -m jetson.profile --cpu-quota 0.6 --cpu-reserve`` and ``--cpu-quota
   0.15`` (torch, one thread, a dedeits grid at 224x224 around the paper's 192x12, alternated over 3 rounds; the
   link is loopback, measured against a link server in this process, under the same quota). The two run at the same
   time, so that both see this shared machine in the same state, as the fleet's four workers will;
2. plan: ``plan.py --devices fast fast slow slow --classes 1000 --input-dtype uint8`` (ImageNet's class count);
3. build random-weight stage-3 checkpoints (collab_bench.write_ensemble) of the planned students and of the uniform
   plan's (4 x dedeit 192x12): latency does not depend on the weights; the capacity rule keeps the planned total at
   or above the uniform total (both are reported);
4. run each through the runtime: ``collab_infer.py --cpu-quota 0.6 0.6 0.15 0.15 --cpu-reserve`` under the launcher
   (N+1 processes, one thread each, uint8 images), planned and uniform alternating, 2 rounds (1 with --quick);
5. a cross-check without the runtime, "concurrent forwards": each student's forward in its own process under its
   quota, the four in lock-step image by image (a barrier before each image, as the runtime starts all devices on
   the same image), the image's latency the slowest of the four: what the plan's compute part predicts. It is
   reported under "forwards" and separates the profiles' error from the runtime's own cost.

Keys, both from the collab_infer.py runs: ``hetero_plan_vs_uniform`` = p50 latency of the planned fleet / p50 of the
uniform one (target <= 0.6), and ``plan_prediction_error`` = |predicted - measured| / measured p50 of the planned
fleet (target <= 0.2), predicted = the plan's collaborative latency, transfers included (the image to each device and
its tokens back over the loopback link each profile measured). The machine is shared: the load average before and
after is recorded, and a busy machine slows the aggregator (which has no quota) before the reserved workers.
"""
import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import collab_bench  # noqa: E402
from collab import quota  # noqa: E402
from collab.host import plan as planner  # noqa: E402
from collab.profiles import read_profile  # noqa: E402
from jetson.links import LinkHandler, LinkServer  # noqa: E402

QUOTAS = (0.6, 0.6, 0.15, 0.15)
KINDS = {'fast': 0.6, 'slow': 0.15}
TEACHER = collab_bench.ModelSpec('deit_base_distilled_patch16_224', {})
NUM_CLASSES = 1000
SIZE = 224


def grid(quick):
    return ((128, 192, 256), (4, 8, 12)) if quick else ((128, 192, 256, 320), (4, 6, 8, 12))


def profile_devices(workdir, quick, verbose=True):
    """{kind: profile path}: the kinds profiled at the same time (so both see this machine in the same state, as
    the fleet's workers do), each under its quota, the grid alternated over 3 rounds, the loopback link measured."""
    server = LinkServer(('127.0.0.1', 0), LinkHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    widths, depths = grid(quick)
    paths, procs = {}, {}
    started = time.perf_counter()
    try:
        for kind, q in KINDS.items():
            paths[kind] = os.path.join(workdir, f'{kind}.json')
            cmd = [sys.executable, '-m', 'jetson.profile', '--output', paths[kind], '--name', f'{kind}@{q:g}',
                   '--cpu-quota', str(q), '--cpu-reserve', '--threads', '1', '--backend', 'torch',
                   '--input-size', str(SIZE), '--widths', *map(str, widths), '--depths', *map(str, depths),
                   '--warmup', '1', '--iters', '6' if quick else '12', '--rounds', '3',
                   '--link', f'tcp://127.0.0.1:{server.server_address[1]}']
            procs[kind] = (cmd, subprocess.Popen(cmd, cwd=ROOT, env=collab_bench.test_env(), stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True))
        for kind, (cmd, proc) in procs.items():
            out, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f'{" ".join(cmd)}\nexit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}')
            if verbose:
                print(f'  [profile {kind} @ {KINDS[kind]}]\n{out.rstrip()}', flush=True)
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        server.shutdown()
        server.server_close()
    if verbose:
        print(f'  profiles: {time.perf_counter() - started:.0f} s', flush=True)
    return paths


def make_plan(workdir, paths, verbose=True):
    out = os.path.join(workdir, 'plan.json')
    devices = [paths['fast'], paths['fast'], paths['slow'], paths['slow']]
    cmd = [sys.executable, os.path.join(ROOT, 'plan.py'), '--devices', *devices, '--classes', str(NUM_CLASSES),
           '--family', 'dedeits', '--backend', 'torch', '--input-dtype', 'uint8', '--output', out]
    proc = subprocess.run(cmd, cwd=ROOT, env=collab_bench.test_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f'{" ".join(cmd)}\nexit {proc.returncode}\n{proc.stderr[-3000:]}')
    if verbose:
        print(proc.stdout.rstrip(), flush=True)
    return planner.read_plan(out), proc.stdout


def students(plan):
    planned = [collab_bench.ModelSpec(*planner.student_for(plan, i)) for i in range(len(plan['devices']))]
    uniform = [collab_bench.ModelSpec(plan['uniform']['model'], dict(plan['uniform']['model_kwargs']))] * len(planned)
    return planned, uniform


# ---------------------------------------------------------------------------------------------------------------------
# Concurrent forwards: each device's student in its own process under its quota, in lock-step

def _device(spec, fraction, images, warmup, barrier, results, index):
    import torch

    from collab.quota import limit_cpu
    from models.ensemble_model import create_backbone
    from models.features import DeviceTokens, has_dist_token

    torch.set_num_threads(1)
    torch.manual_seed(index)
    backbone = create_backbone(spec.name, spec.kwargs)
    module = DeviceTokens(backbone, has_dist_token(backbone)).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    times = []
    with torch.inference_mode():
        module(x)
        limit = limit_cpu(fraction, reserve=True)
        for i in range(warmup + images):
            barrier.wait()
            t0 = time.perf_counter()
            module(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
        limit.remove()
    results.put((index, times))


def concurrent_forwards(specs, quotas, images, warmup=2):
    """Per image, the slowest device's forward (ms), and each device's median."""
    ctx = multiprocessing.get_context('spawn')
    barrier, results = ctx.Barrier(len(specs)), ctx.Queue()
    procs = [ctx.Process(target=_device, args=(s, q, images, warmup, barrier, results, i))
             for i, (s, q) in enumerate(zip(specs, quotas))]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    per_device = [got[i] for i in range(len(specs))]
    return [max(t) for t in zip(*per_device)], [statistics.median(t) for t in per_device]


# ---------------------------------------------------------------------------------------------------------------------
# The runtime: throttled workers that claim their quota

RUNTIME_FLAGS = ['--cpu-quota', *map(str, QUOTAS), '--cpu-reserve']


def runtime_runs(ckpt, images, rounds, workdir, verbose=True):
    """collab_infer.py on each checkpoint ({name: path}), alternating, `rounds` times: {name: [report, ...]}."""
    run = collab_bench.Runner(workdir, verbose)
    reports = {name: [] for name in ckpt}
    for _ in range(rounds):
        for name, path in ckpt.items():
            argv = collab_bench.collab_argv(path, images) + RUNTIME_FLAGS
            reports[name].append(run(len(QUOTAS) + 1, argv, 1, f'hetero-{name}'))
    return reports


def bench(quick, workdir, verbose=True):
    reason = quota.unavailable_reason()
    if reason:
        raise RuntimeError(f'hetero bench needs CPU quotas: {reason}')
    load_before = os.getloadavg()[0]
    paths = profile_devices(workdir, quick, verbose)
    plan, table = make_plan(workdir, paths, verbose)
    planned, uniform = students(plan)
    rounds = 1 if quick else 2
    images = 8 if quick else 20

    # the runtime: stage-3 style checkpoints of both (random weights), served by collab_infer.py under the quotas
    ckpt = {name: collab_bench.write_ensemble(os.path.join(workdir, f'{name}.pth'), specs, TEACHER, NUM_CLASSES)
            for name, specs in (('planned', planned), ('uniform', uniform))}
    reports = runtime_runs(ckpt, images, rounds, workdir, verbose)
    p50 = {k: collab_bench.p50(v) for k, v in reports.items()}
    runtime = {'p50_ms': p50, 'ratio': p50['planned'] / p50['uniform'], 'flags': RUNTIME_FLAGS,
               'predicted_ms': plan['predicted_ms'], 'uniform_predicted_ms': plan['uniform']['predicted_ms'],
               'prediction_error': abs(plan['predicted_ms'] - p50['planned']) / p50['planned'],
               'uniform_prediction_error': abs(plan['uniform']['predicted_ms'] - p50['uniform']) / p50['uniform'],
               'worker_compute_ms': {k: v[-1]['worker_compute_ms'] for k, v in reports.items()},
               'breakdown_p50_ms': {k: v[-1]['breakdown_p50_ms'] for k, v in reports.items()},
               'images': images * rounds}

    # cross-check: concurrent forwards, alternating
    fwd = {'planned': [], 'uniform': []}
    per_device = {'planned': [], 'uniform': []}
    for _ in range(rounds):
        for name, specs in (('planned', planned), ('uniform', uniform)):
            lat, dev = concurrent_forwards(specs, QUOTAS, images)
            fwd[name] += lat
            per_device[name].append(dev)
            if verbose:
                print(f'  [forwards {name}] p50 {statistics.median(lat):.1f} ms; per device '
                      + ', '.join(f'{m:.1f}' for m in dev), flush=True)
    fwd_p50 = {k: statistics.median(v) for k, v in fwd.items()}
    predicted_compute = max(d['predicted_ms']['compute'] for d in plan['devices'])
    uniform_compute = max(planner_uniform_compute(plan, paths))
    result = {
        'runtime': runtime,
        'plan': {k: plan[k] for k in ('num_classes', 'capacity_per_class', 'predicted_ms', 'chosen')},
        'devices': [{k: d[k] for k in ('index', 'name', 'num_classes', 'width', 'depth', 'params', 'predicted_ms')}
                    for d in plan['devices']],
        'uniform': plan['uniform'],
        'params_planned': sum(d['params'] for d in plan['devices']),
        'params_uniform': len(plan['devices']) * plan['uniform']['params'],
        'table': table,
        'quotas': list(QUOTAS),
        'forwards': {
            'what': 'cross-check without the runtime: each student in its own process under its quota, in lock-step; '
                    'predicted = the plan\'s compute part',
            'p50_ms': fwd_p50, 'ratio': fwd_p50['planned'] / fwd_p50['uniform'],
            'predicted_compute_ms': predicted_compute, 'uniform_predicted_compute_ms': uniform_compute,
            'prediction_error': abs(predicted_compute - fwd_p50['planned']) / fwd_p50['planned'],
            'uniform_prediction_error': abs(uniform_compute - fwd_p50['uniform']) / fwd_p50['uniform'],
            'per_device_median_ms': per_device, 'images': images * rounds},
    }
    result['ensemble_params'] = {name: sum(t.numel() for t in torch.load(path, weights_only=True)['model'].values())
                                 for name, path in ckpt.items()}
    result['load'] = [load_before, os.getloadavg()[0]]

    how = (f'collab_infer.py {" ".join(RUNTIME_FLAGS)}, 5 processes, {images * rounds} images each, alternating; load '
           f'average {load_before:.1f} before, {result["load"][1]:.1f} after')
    sizes = f'{result["params_planned"] / 1e6:.1f}M vs {result["params_uniform"] / 1e6:.1f}M parameters'
    shapes = ', '.join(f'{d["width"]}x{d["depth"]}/{d["num_classes"]}' for d in plan['devices'])
    return {
        'hetero_plan_vs_uniform': dict(
            ratio=runtime['ratio'], target=0.6, direction='max',
            what=f'224x224, fleet at quotas {" ".join(map(str, QUOTAS))} of a core: p50 of the planned students '
                 f'({shapes} width x depth / classes) / p50 of 4 x dedeit 192x12 ({sizes}); {how}', **result),
        'plan_prediction_error': dict(
            ratio=runtime['prediction_error'], target=0.2, direction='max',
            what=f'|predicted - measured| / measured p50 of the planned fleet (predicted {plan["predicted_ms"]:.1f} '
                 f'ms from the profiles, transfers included; measured {runtime["p50_ms"]["planned"]:.1f} ms); {how}',
            uniform_prediction_error=runtime['uniform_prediction_error'],
            forwards_prediction_error=result['forwards']['prediction_error']),
    }


def planner_uniform_compute(plan, paths):
    """Each device's predicted compute (no transfer) of the uniform student, from its profile."""
    width, depth = plan['uniform']['model_kwargs']['embed_dim'], plan['uniform']['model_kwargs']['depth']
    out = []
    for d in plan['devices']:
        prof = read_profile(d['profile'])
        cand = next(c for c in prof['candidates'] if (c['width'], c['depth']) == (width, depth))
        out.append(cand['latency_ms'][plan['backend']]['median'])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--json', default=None, help='write the results here')
    args = p.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix='devit-bench-hetero-')
    results = bench(args.quick, workdir)
    for key, r in results.items():
        print(f'{key}: {r["ratio"]:.3f} (target <= {r["target"]}) -- {r["what"]}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1, default=float)
    print(f'work files in {workdir}')
    return results


if __name__ == '__main__':
    main()
