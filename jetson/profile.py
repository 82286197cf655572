"""Device profile: how fast this device runs each candidate student shape, for the heterogeneous planner (plan.py).

    python -m jetson.profile --output dev.json                          # dedeits grid at 224, torch + onnxruntime
    python -m jetson.profile --output slow.json --cpu-quota 0.25 --threads 1   # this CPU held to 1/4 of a core
    python -m jetson.profile --output d.json --family decct --widths 128 256 --depths 4 6 --link tcp://10.0.0.1:29600
    python -m jetson.profile --link-server 0.0.0.0:29600                # on the aggregator: the far end of --link
    python -m jetson.profile --output pc.json --onnx-dir cands/ --backend onnxruntime   # exports the candidates...
    python3 -m jetson.profile --output nano.json --onnx-dir cands/ --backend onnxruntime  # ...a board times them

What is measured. Each candidate is the family's student (``--family``: dedeits -> ``dedeit``, devits -> ``devit``,
decct -> ``decct``) at ``--input-size`` x ``--in-chans`` with ``embed_dim`` = width, ``depth``, ``num_heads`` =
width / ``--head-dim`` (rounded, at least 1) and ``--model-kwargs`` for everything else, built as the runtime builds
a device's share of an ensemble: the backbone without classifier, returning the tokens the device sends (cls and dist
for distilled students). Its batch-1 latency is timed with PyTorch (inference mode, CUDA synchronised when on CUDA)
and with onnxruntime (the candidate exported in-process by ``torch.onnx.export``, opset 17, to a temporary file, or
to ``--onnx-dir``), after ``--warmup`` untimed runs: median and p95 of ``--iters`` runs (``--rounds R``: the grid
timed R times over, alternating candidates, so that a drift of the device's speed falls on all of them alike).
Also: parameters, MACs (torch's FlopCounterMode where torch has it), floats sent per image, an estimate of the
memory the candidate needs (fp32 weights + three times its largest activation), the memory of the device
(``/proc/meminfo``: total and available, read with the framework loaded) and, with ``--link``, the link to the
aggregator: a rate given in Mbit/s, or measured against ``--link-server`` (median round trip of 1-byte messages;
median of 3 timed 4 MB sends).

``--cpu-quota q`` holds this process to ``q`` of one core while it times (the kernel's CFS quota, collab.quota, as
``collab_infer.py --cpu-quota`` does for a worker), so a profile of an emulated slow device and a throttled run
agree; ``--cpu-reserve`` also claims that much CPU (a CFS weight), for a busy machine where other processes would
otherwise hold the emulated device below its quota. A board with onnxruntime and no torch (``--backend
onnxruntime``) times candidates exported elsewhere: with torch, ``--onnx-dir DIR`` keeps the exports and writes
``DIR/candidates.json``; without torch it reads them back.
Device-side module: Python 3.6+; torch, timm and the project's models are imported only when torch is used.

The profile schema and its reader: collab/profiles.py; the link measurement: jetson/links.py.
"""
import argparse
import ast
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings

from collab import quota
from collab.profiles import FORMAT, SHAPE_KWARGS, VERSION, ProfileError, validate_profile
from fileio import write_json_atomic
from jetson.links import measure_link, parse_link, serve_link

CANDIDATES_FILE = 'candidates.json'
DEFAULT_GRID = {  # widths, depths: around each family's own student (dedeit 192x12, decct 256x6)
    'dedeits': ((64, 128, 192, 256, 320, 384), (4, 6, 8, 12)),
    'devits': ((64, 128, 192, 256, 320, 384), (4, 6, 8, 12)),
    'decct': ((128, 192, 256, 320, 384), (2, 4, 6, 8)),
}
META_KEYS = ('width', 'depth', 'num_heads', 'params', 'macs', 'token_floats', 'memory_mb')  # of a candidate
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



# ---------------------------------------------------------------------------------------------------------------------
# Small measurements: memory, timing, link

def memory_info(meminfo='/proc/meminfo'):
    """{'total_mb', 'available_mb'} from /proc/meminfo (None where it cannot be read)."""
    out = {'total_mb': None, 'available_mb': None}
    try:
        with open(meminfo) as f:
            fields = dict(line.split(':', 1) for line in f if ':' in line)
    except OSError:
        return out
    for key, name in (('total_mb', 'MemTotal'), ('available_mb', 'MemAvailable')):
        if name in fields:
            out[key] = round(int(fields[name].split()[0]) / 1024.0, 1)  # kB
    return out


def percentile(values, q):
    """Linear-interpolation percentile (numpy's default), standard library only."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(timed):
    """{'median', 'p95', 'iters', 'cpu_median'} of ``time_calls``' (wall ms, process CPU ms) pairs."""
    wall = [w for w, _ in timed]
    return {'median': round(statistics.median(wall), 4), 'p95': round(percentile(wall, 95), 4),
            'iters': len(wall), 'cpu_median': round(statistics.median(c for _, c in timed), 4)}


def time_calls(fn, warmup, iters, sync=None):
    """(wall ms, CPU ms of this process) of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones. CPU
    time is what the call needs; wall time also holds what throttling or other processes take away from it."""
    times = []
    for i in range(warmup + iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if sync is not None:
            sync()
        if i >= warmup:
            times.append(((time.perf_counter() - t0) * 1000.0, (time.process_time() - c0) * 1000.0))
    return times


class Throttle:
    """``with Throttle(q):`` holds this process to ``q`` of one core for the block (no-op for q None; ``reserve``:
    and claims that much, see collab.quota); counts the CFS periods in which the kernel throttled it."""

    def __init__(self, fraction, reserve=False):
        self.fraction = fraction
        self.reserve = reserve
        self.limit = None
        self.throttled_periods = 0

    def __enter__(self):
        if self.fraction is not None:
            self.limit = quota.limit_cpu(self.fraction, reserve=self.reserve)
        return self

    def __exit__(self, *exc):
        if self.limit is not None:
            self.throttled_periods += self.limit.stat().get('nr_throttled', 0)
            self.limit.remove()
            self.limit = None


# ---------------------------------------------------------------------------------------------------------------------
# Candidates

def parse_kwargs(items):
    """k=v words (values as Python literals where they parse, else strings), as timm's --model-kwargs."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ProfileError(f'--model-kwargs: expected KEY=VALUE items, got {item!r}')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def heads_for(width, head_dim):
    """num_heads for ``width`` at about ``head_dim`` per head; ProfileError when that does not divide the width."""
    heads = max(1, int(round(width / float(head_dim))))
    if width % heads:
        raise ProfileError(f'width {width} is not divisible by the {heads} heads of size ~{head_dim} it would '
                           'get; choose widths that are multiples of --head-dim')
    return heads


def shape_grid(widths, depths, head_dim):
    return [(w, d, heads_for(w, head_dim)) for w in widths for d in depths]


def candidate_kwargs(base, width, depth, heads):
    kwargs = dict(base)
    kwargs.update(embed_dim=width, depth=depth, num_heads=heads)
    return kwargs


def _torch_backbone(model, kwargs):
    """(module returning what a device sends, backbone) as the runtime builds a device's share."""
    from models.ensemble_model import create_backbone
    from models.features import DeviceTokens, has_dist_token

    backbone = create_backbone(model, kwargs)
    return DeviceTokens(backbone, has_dist_token(backbone)).eval(), backbone


def family_info(family, base):
    """(student model name, its own width and depth) of ``family``, built with ``base`` kwargs."""
    import torch

    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from models.stats import FAMILIES

    if family not in FAMILIES:
        raise ProfileError('--family {}: choose from {}'.format(family, ', '.join(sorted(FAMILIES))))
    model = FAMILIES[family].student
    meta = torch.device('meta') if hasattr(torch, 'get_default_device') else None
    if meta is not None:
        with meta:
            _, backbone = _torch_backbone(model, base)
    else:
        _, backbone = _torch_backbone(model, base)
    return model, backbone.num_features, len(backbone.blocks)


def memory_estimate_mb(module, x):
    """fp32 weights + three times the largest activation of one forward (input, output and one temporary)."""
    import torch

    largest = [x.numel()]

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())
    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in module.parameters())
    return round((params + 3 * largest[0]) * 4 / 2.0 ** 20, 2)


def count_macs(module, x):
    try:
        from models.stats import count_macs as macs
        return int(macs(module, x))
    except Exception:  # noqa: BLE001  (torch without FlopCounterMode: MACs are optional)
        return None


def torch_timer(module, x, warmup, sync, throttle):
    """``run(n)``: ``warmup`` untimed then ``n`` timed forwards of ``module`` under ``throttle``."""
    import torch

    def run(n):
        grad_off = torch.inference_mode() if hasattr(torch, 'inference_mode') else torch.no_grad()
        with grad_off, throttle:
            return time_calls(lambda: module(x), warmup, n, sync)
    return run


def export_onnx(module, x, path):
    """torch.onnx.export, opset 17, the TorchScript exporter where torch offers a choice (fast, one file)."""
    import inspect

    import torch

    kwargs = {'opset_version': 17, 'input_names': ['image'], 'output_names': ['tokens']}
    if 'dynamo' in inspect.signature(torch.onnx.export).parameters:
        kwargs['dynamo'] = False
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(module, (x,), path, **kwargs)


def ort_session(path, threads, device):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = ['CPUExecutionProvider']
    if device.startswith('cuda') and 'CUDAExecutionProvider' in ort.get_available_providers():
        providers.insert(0, 'CUDAExecutionProvider')
    return ort.InferenceSession(path, options, providers=providers)


def onnx_timer(path, shape, threads, device, warmup, throttle):
    """``run(n)`` as torch_timer's, for an onnxruntime session of the file at ``path``."""
    import numpy as np

    session = ort_session(path, threads, device)
    name = session.get_inputs()[0].name
    x = np.random.RandomState(0).randn(*shape).astype(np.float32)

    def run(n):
        with throttle:
            return time_calls(lambda: session.run(None, {name: x}), warmup, n)
    return run


def time_candidates(prepared, rounds, iters):
    """Time each prepared (entry, {backend: run}) and fill its latency_ms; yields the entries as they are done.

    With ``rounds`` > 1 every candidate is held at once and the grid is timed ``rounds`` times over, a share of the
    ``iters`` each time, so that a drift in the device's speed (heat, other load) spreads over all candidates
    instead of falling on a few."""
    if rounds > 1:
        prepared = list(prepared)
    shares = [iters // rounds + (r < iters % rounds) for r in range(rounds)]
    pending = []
    for r, n in enumerate(shares):
        for entry, timers in (prepared if r == 0 else pending):
            times = entry.setdefault('_times', {})
            for backend, run in timers.items():
                times.setdefault(backend, []).extend(run(n) if n else [])
            if r == 0 and rounds > 1:
                pending.append((entry, timers))
            if r == rounds - 1:
                for backend, t in entry.pop('_times').items():
                    entry['latency_ms'][backend] = summarize(t)
                yield entry


def have(module):
    import importlib
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------------------------------
# The profile

def get_args_parser():
    p = argparse.ArgumentParser('Device profile for the DeViT planner', add_help=False)
    p.add_argument('-h', '--help', action='help')
    p.add_argument('--output', default=None, help='the profile JSON to write')
    p.add_argument('--name', default=None, help='device name in tables and plans (default: host name, and quota)')
    p.add_argument('--family', default='dedeits', help='dedeits, devits or decct')
    p.add_argument('--input-size', type=int, default=224)
    p.add_argument('--in-chans', type=int, default=3)
    p.add_argument('--widths', type=int, nargs='+', default=None, help='candidate widths (default: per family)')
    p.add_argument('--depths', type=int, nargs='+', default=None, help='candidate depths (default: per family)')
    p.add_argument('--head-dim', type=int, default=64, help='num_heads = width / head-dim (rounded, at least 1)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V',
                   help='kwargs every candidate shares, e.g. patch_size=7 mlp_ratio=2')
    p.add_argument('--backend', default='both', choices=['torch', 'onnxruntime', 'both'],
                   help='both: torch, and onnxruntime where it is installed')
    p.add_argument('--device', default='auto', help='auto (cuda where torch sees it), cpu, cuda')
    p.add_argument('--cpu-quota', type=float, default=None, metavar='Q',
                   help='time under Q of one CPU core (CFS quota), as collab_infer.py --cpu-quota runs a worker')
    p.add_argument('--cpu-reserve', action='store_true',
                   help='with --cpu-quota: also claim that much CPU (CFS weight), so that other busy processes on '
                        'this machine do not slow the emulated device below its quota')
    p.add_argument('--threads', type=int, default=0, help='intra-op threads (0: the library default)')
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--iters', type=int, default=30, help='timed forwards per candidate and backend')
    p.add_argument('--rounds', type=int, default=1,
                   help='time the grid this many times over, alternating candidates (holds all of them in memory)')
    p.add_argument('--link', default=None, metavar='tcp://HOST:PORT|MBPS',
                   help='the link to the aggregator: measured against its --link-server, or a rate in Mbit/s')
    p.add_argument('--link-server', default=None, metavar='[HOST:]PORT',
                   help='serve the far end of --link tcp://... here (on the aggregator) and do nothing else')
    p.add_argument('--onnx-dir', default=None,
                   help='keep the ONNX exports and candidates.json here; without torch, time the ones found here')
    return p


def check_args(args):
    for flag, value in (('--input-size', args.input_size), ('--in-chans', args.in_chans),
                        ('--head-dim', args.head_dim), ('--iters', args.iters), ('--rounds', args.rounds)):
        if value <= 0:
            raise ProfileError(f'{flag} must be positive, got {value}')
    if args.warmup < 0 or args.threads < 0:
        raise ProfileError('--warmup and --threads must be >= 0')
    for flag, values in (('--widths', args.widths), ('--depths', args.depths)):
        if values and min(values) <= 0:
            raise ProfileError(f'{flag} must be positive integers, got {values}')
    if args.cpu_quota is not None:
        quota.quota_us(args.cpu_quota)  # a bad fraction: QuotaError before anything runs
        reason = quota.unavailable_reason()
        if reason:
            raise ProfileError(f'--cpu-quota needs a writable cgroup cpu controller: {reason}')
    if not args.output:
        raise ProfileError('--output is required (the profile JSON to write)')


def backends_to_time(requested, torch_ok, ort_ok):
    if requested == 'both':
        chosen = [b for b, ok in (('torch', torch_ok), ('onnxruntime', ort_ok)) if ok]
        if not chosen:
            raise ProfileError('neither torch nor onnxruntime can be imported here')
        return chosen
    ok = torch_ok if requested == 'torch' else ort_ok
    if not ok:
        raise ProfileError(f'--backend {requested}: {requested} cannot be imported here')
    return [requested]


def profile_with_torch(args, backends, base, throttle):
    """Candidates built, timed and (for onnxruntime) exported here."""
    import torch

    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import models  # noqa: F401  (registers the students in timm)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model, default_width, default_depth = family_info(args.family, base)
    widths, depths = DEFAULT_GRID.get(args.family, DEFAULT_GRID['dedeits'])
    grid = shape_grid(args.widths or widths, args.depths or depths, args.head_dim)
    shape = (1, args.in_chans, args.input_size, args.input_size)
    onnx_dir = args.onnx_dir or tempfile.mkdtemp(prefix='devit-profile-')
    os.makedirs(onnx_dir, exist_ok=True)
    sync = torch.cuda.synchronize if device.startswith('cuda') else None
    exported = []

    def prepare():
        for width, depth, heads in grid:
            kwargs = candidate_kwargs(base, width, depth, heads)
            torch.manual_seed(0)
            try:
                module, _ = _torch_backbone(model, kwargs)
            except (TypeError, ValueError, RuntimeError, AssertionError) as err:
                raise ProfileError(f'cannot build {model} {kwargs}: {err}') from None
            x = torch.randn(*shape)
            entry = {'width': width, 'depth': depth, 'num_heads': heads,
                     'params': sum(p.numel() for p in module.parameters()), 'macs': count_macs(module, x),
                     'token_floats': int(module.width), 'memory_mb': memory_estimate_mb(module, x),
                     'latency_ms': {}}
            timers = {}
            if 'onnxruntime' in backends or args.onnx_dir:
                path = os.path.join(onnx_dir, f'{model}_w{width}_d{depth}.onnx')
                try:
                    export_onnx(module, x, path)
                    exported.append(dict({k: entry[k] for k in META_KEYS}, file=os.path.basename(path)))
                    if 'onnxruntime' in backends:
                        timers['onnxruntime'] = onnx_timer(path, shape, args.threads, device, args.warmup, throttle)
                except Exception as err:  # noqa: BLE001  (an exporter gap for one shape: keep the torch timing)
                    entry['errors'] = {'onnxruntime': f'export failed: {type(err).__name__}: {err}'}
                if not args.onnx_dir and os.path.exists(path):
                    os.unlink(path)  # the session holds the model
            if 'torch' in backends:
                timers['torch'] = torch_timer(module.to(device), x.to(device), args.warmup, sync, throttle)
            yield entry, timers

    candidates = []
    try:
        for entry in time_candidates(prepare(), args.rounds, args.iters):
            candidates.append(entry)
            print(_row(entry), flush=True)
    finally:
        if not args.onnx_dir:
            import shutil
            shutil.rmtree(onnx_dir, ignore_errors=True)
    if args.onnx_dir:
        write_json_atomic(os.path.join(onnx_dir, CANDIDATES_FILE), {
            'format': 'devit-candidates', 'version': VERSION, 'family': args.family, 'model': model,
            'model_kwargs': base, 'input_size': args.input_size, 'in_chans': args.in_chans,
            'family_default': {'width': default_width, 'depth': default_depth}, 'candidates': exported})
    threads = torch.get_num_threads()
    versions = {'torch': torch.__version__}
    return model, {'width': default_width, 'depth': default_depth}, candidates, device, threads, versions


def profile_from_onnx_dir(args, throttle):
    """Candidates exported elsewhere (``--onnx-dir`` with torch), timed here with onnxruntime only."""
    path = os.path.join(args.onnx_dir, CANDIDATES_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise ProfileError(f'--onnx-dir {args.onnx_dir}: cannot read {CANDIDATES_FILE} ({err}); write it where '
                           'torch is installed: python -m jetson.profile --onnx-dir DIR ...') from None
    for key in ('input_size', 'in_chans'):
        if meta.get(key) != getattr(args, key):
            raise ProfileError(f'--onnx-dir {args.onnx_dir} was exported at {key} {meta.get(key)}, '
                               f'not {getattr(args, key)}')
    device = 'cpu' if args.device == 'auto' else args.device
    shape = (1, args.in_chans, args.input_size, args.input_size)

    def prepare():
        for c in meta['candidates']:
            if (args.widths and c['width'] not in args.widths) or (args.depths and c['depth'] not in args.depths):
                continue
            entry = dict({k: c[k] for k in META_KEYS}, latency_ms={})
            yield entry, {'onnxruntime': onnx_timer(os.path.join(args.onnx_dir, c['file']), shape, args.threads,
                                                    device, args.warmup, throttle)}

    candidates = []
    for entry in time_candidates(prepare(), args.rounds, args.iters):
        candidates.append(entry)
        print(_row(entry), flush=True)
    if not candidates:
        raise ProfileError(f'--onnx-dir {args.onnx_dir}: no candidate matches --widths/--depths')
    return meta['model'], meta['family_default'], candidates, device, args.threads or None, {}, meta


def _row(c):
    lat = '  '.join('{} {:.2f} ms (p95 {:.2f})'.format(b, v['median'], v['p95']) for b, v in c['latency_ms'].items())
    return '  {:>4} x {:<3} {:>2} heads  {:>6.2f}M params  {}'.format(
        c['width'], c['depth'], c['num_heads'], c['params'] / 1e6, lat or '(no timing)')


def profile(args):
    """Measure this device; returns the profile dict (schema in the module docstring)."""
    check_args(args)
    base = parse_kwargs(args.model_kwargs)
    bad = [k for k in SHAPE_KWARGS + ('img_size', 'in_chans', 'num_classes') if k in base]
    if bad:
        raise ProfileError('--model-kwargs must not set {}: use --widths, --depths, --head-dim, --input-size and '
                           '--in-chans'.format(', '.join(bad)))
    base.update(img_size=args.input_size, in_chans=args.in_chans)
    torch_ok, ort_ok = have('torch'), have('onnxruntime')
    backends = backends_to_time(args.backend, torch_ok, ort_ok)
    throttle = Throttle(args.cpu_quota, args.cpu_reserve)
    link = None
    if args.link:  # first, so that an unreachable aggregator fails fast
        kind = parse_link(args.link)
        if kind[0] == 'given':
            link = {'mbps': kind[1], 'rtt_ms': None, 'source': f'given (--link {args.link})'}
        else:
            with throttle:
                link = measure_link(kind[1], kind[2])
    if torch_ok:
        model, default, candidates, device, threads, versions = profile_with_torch(args, backends, base, throttle)
    else:
        if not args.onnx_dir:
            raise ProfileError('torch is not installed here: time ONNX exports made elsewhere with --onnx-dir DIR '
                               '(python -m jetson.profile --onnx-dir DIR ... on a machine with torch)')
        model, default, candidates, device, threads, versions, meta = profile_from_onnx_dir(args, throttle)
        base = meta['model_kwargs']
    memory = memory_info()  # with the framework loaded: what is left for a model
    if ort_ok:
        import onnxruntime
        versions['onnxruntime'] = onnxruntime.__version__
    host = socket.gethostname()
    name = args.name or (host if args.cpu_quota is None else f'{host}@{args.cpu_quota:g}')
    return {
        'format': FORMAT, 'version': VERSION, 'name': name,
        'source': 'measured by python -m jetson.profile on {} at {}'.format(host, time.strftime('%Y-%m-%d %H:%M')),
        'family': args.family, 'model': model, 'model_kwargs': base, 'input_size': args.input_size,
        'in_chans': args.in_chans, 'family_default': default, 'memory': memory, 'link': link,
        'cpu_quota': args.cpu_quota, 'cpu_reserve': bool(args.cpu_reserve and args.cpu_quota is not None),
        'threads': threads, 'device': device,
        'throttled_periods': throttle.throttled_periods if args.cpu_quota is not None else None,
        'candidates': candidates,
        'system': dict(versions, host=host, platform=platform.platform(), machine=platform.machine(),
                       python=platform.python_version(), load_average=_load()),
    }


def _load():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        if args.link_server:
            return serve_link(args.link_server)
        result = validate_profile(profile(args))
        write_json_atomic(args.output, result)
    except (ProfileError, OSError, quota.QuotaError) as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(2)
    throttled = '' if args.cpu_quota is None else f', under --cpu-quota {args.cpu_quota:g}'
    print(f'wrote {args.output} ({len(result["candidates"])} candidates{throttled})')
    return result


if __name__ == '__main__':
    main()
