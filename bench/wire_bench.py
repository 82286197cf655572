"""The runtime's own cost per message against raw pyzmq, and CURVE's cost, with one worker process on loopback.

    python bench/wire_bench.py [--quick]

One aggregator (this process) and one worker (a child process), no compute: the image out, the tokens back, at the
demo's sizes (28x28 uint8, 128 fp32 tokens) and the paper's (224x224x3 uint8, 384 tokens). Each way has its own
worker, all up at once and taking turns request by request, so that all see the same load:
- raw: pyzmq ROUTER/DEALER, a literal JSON header frame + the buffer each way, the worker an echo loop;
- wire: the aggregator's loop on collab.wire.pack/unpack (with every check of a received message), the worker
  collab.worker.Worker itself;
- dispatcher: collab.dispatch.Dispatcher caller-driven (the batch evaluation's) and collab.worker.Worker: what a
  request costs;
- threaded: the same on the dispatcher's own I/O thread (the service's), a hop to it and back per request.
raw and dispatcher run with CURVE (collab.keys) and without. Medians of per-request round trips.

    python bench/wire_bench.py --profile DIR [--scale demo]

runs the caller-driven and the threaded dispatcher under cProfile, the aggregator's threads and the worker process
each, and prints where the time goes (DIR keeps the .prof files, for snakeviz or pstats).
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import PAYLOADS, NullModel  # noqa: E402
from collab import dispatch, keys, wire, worker  # noqa: E402

SETTINGS = {'input_dtype': 'uint8', 'wire_dtype': 'fp32', 'mean': [0.5], 'std': [0.5], 'num_classes': 10}


def _child(kind, endpoint, scale, keys_dir, profile=None):
    shape, width = PAYLOADS[scale]
    if kind == 'worker':
        w = worker.Worker(NullModel(width, shape), endpoint, 0, exit_on_loss=True, keys=keys_dir)
        if not profile:
            return w.run()
        prof = cProfile.Profile()
        try:
            return prof.runcall(w.run)
        finally:
            prof.dump_stats(profile)
    ctx = zmq.Context()
    secure = None
    if keys_dir:
        pair, server = keys.device_pair(keys_dir, 0), keys.aggregator_public(keys_dir)
        secure = lambda s: keys.client(s, *pair, server)  # noqa: E731
    sock = wire.dealer(ctx, endpoint, secure)
    tokens = np.zeros((1, width), np.float32)
    header = json.dumps({'type': 'result', 'id': 0, 'arrays': [['<f4', [1, width]]]}).encode()
    sock.send(b'ready')
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[0].bytes == b'stop':
            return 0
        sock.send_multipart([header, tokens], copy=False)


class Aggregator:
    """The aggregator's side of one round: `kind` ('raw', 'wire', 'dispatcher'), CURVE or not."""

    def __init__(self, kind, scale, keys_dir, profile=None):
        self.kind, self.keys_dir = kind, keys_dir
        shape, self.width = PAYLOADS[scale]
        self.image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
        self.d = self.ctx = self.auth = None
        endpoint = 'tcp://127.0.0.1:*'
        if kind in ('dispatcher', 'threaded'):
            self.d = dispatch.Dispatcher(1, lambda i: {}, SETTINGS, endpoint, log=lambda line: None, keys=keys_dir,
                                         threaded=kind == 'threaded')
            endpoint = self.d.endpoint
        else:
            self.ctx = zmq.Context()
            secure = None
            if keys_dir:
                public, secret = keys.aggregator_pair(keys_dir)
                self.auth = keys.Authenticator(self.ctx, keys.device_publics(keys_dir), lambda line: None).begin()
                secure = lambda s: keys.server(s, public, secret)  # noqa: E731
            self.sock = wire.router(self.ctx, endpoint, secure)
            endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        child = 'echo' if kind == 'raw' else 'worker'
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--child', child, '--endpoint',
                                      endpoint, '--scale', scale, *(['--keys', keys_dir] if keys_dir else []),
                                      *(['--profile', profile] if profile else [])],
                                     cwd=ROOT, stderr=subprocess.DEVNULL)
        if self.d is not None:
            self.d.wait_ready(60)
            return
        self.peer, hello = self.sock.recv_multipart()[:2]
        if kind == 'wire':
            self.sock.send_multipart([self.peer] + wire.pack(dict(SETTINGS, type='welcome', agg='A', index=0)))
        self.raw_header = json.dumps({'type': 'run', 'id': 0, 'agg': 'A', 'index': 0, 'batch': 1,
                                      'arrays': [['|u1', list(self.image.shape)]]}).encode()
        self.ids = 0

    def round_trip(self):
        t0 = time.perf_counter()
        if self.d is not None:
            self.d.submit(self.image).wait(30)
        elif self.kind == 'raw':
            self.sock.send_multipart([self.peer, self.raw_header, self.image], copy=False)
            frames = self.sock.recv_multipart(copy=False)
            np.frombuffer(frames[2].buffer, np.float32)
        else:
            self.ids += 1
            self.sock.send_multipart([self.peer] + wire.pack({'type': 'run', 'id': self.ids, 'agg': 'A', 'index': 0,
                                                              'batch': 1}, [self.image]), copy=False)
            frames = self.sock.recv_multipart(copy=False)
            header, arrays = wire.unpack(frames[1:])
            wire.check(header, {'id': int}, arrays, '<f4', (1, self.width))
        return (time.perf_counter() - t0) * 1e6

    def close(self):
        if self.d is not None:
            self.d.stop_workers()
            self.d.close()
        else:
            self.sock.send_multipart([self.peer] + (wire.pack({'type': 'stop', 'reason': 'bench'})
                                                    if self.kind == 'wire' else [b'stop']))
            self.proc.wait(10)
            self.sock.close(0)
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def raw_round_trip_us(scale, requests=500, warmup=50):
    """p50 of the raw pyzmq round trip (one echo process, `scale`'s message sizes): the floor of a request's
    transport, for bench/collab_bench.py's collab_vs_floor."""
    agg = Aggregator('raw', scale, None)
    try:
        for _ in range(warmup):
            agg.round_trip()
        return statistics.median(agg.round_trip() for _ in range(requests))
    finally:
        agg.close()


CASES = [('raw', False), ('raw', True), ('wire', False), ('dispatcher', False), ('dispatcher', True),
         ('threaded', False)]


def bench(quick=False):
    """p50 round trips of every case at both scales. All cases of a round are up at once and take turns request by
    request (one request in flight at a time), so a drift of the machine's load between them does not show up as a
    difference between cases; rounds start fresh processes."""
    rounds, per_round, warmup = (2, 600, 50) if quick else (4, 1500, 100)
    out = {}
    with tempfile.TemporaryDirectory(prefix='devit-wire-') as tmp:
        keys.init(tmp, 1)
        for scale in ('demo', 'paper'):
            times = {case: [] for case in CASES}
            for _ in range(rounds):
                aggs = {}
                try:
                    for case in CASES:
                        aggs[case] = Aggregator(case[0], scale, tmp if case[1] else None)
                    for i in range(warmup + per_round):
                        for case, agg in aggs.items():
                            t = agg.round_trip()
                            if i >= warmup:
                                times[case].append(t)
                finally:
                    for agg in aggs.values():
                        agg.close()
            p50 = {f'{kind}{"_curve" if curve else ""}': statistics.median(t) for (kind, curve), t in times.items()}
            out[scale] = {'p50_us': p50, 'requests': rounds * per_round, 'rounds': rounds,
                          'image_bytes': int(np.prod(PAYLOADS[scale][0])), 'token_bytes': PAYLOADS[scale][1] * 4}
    return out


def profile(folder, scale='demo', requests=3000):
    """cProfile of the dispatcher, caller-driven and threaded: the aggregator's side (the thread that turns the
    loop) and the worker process's; the top functions by own time of each, as text."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for kind in ('dispatcher', 'threaded'):
        agg_prof, worker_prof = (os.path.join(folder, f'{kind}-{side}.prof') for side in ('aggregator', 'worker'))
        prof = cProfile.Profile()
        if kind == 'threaded':  # the I/O thread is where its work is done
            loop = dispatch.Dispatcher._loop
            dispatch.Dispatcher._loop = lambda self, p=prof, f=loop: p.runcall(f, self)
        try:
            agg = Aggregator(kind, scale, None, profile=worker_prof)
            for _ in range(200):
                agg.round_trip()
            if kind == 'dispatcher':
                prof.enable()
            for _ in range(requests):
                agg.round_trip()
            prof.disable()
            agg.close()
        finally:
            if kind == 'threaded':
                dispatch.Dispatcher._loop = loop
        prof.dump_stats(agg_prof)
        for side, path in (('aggregator', agg_prof), ('worker', worker_prof)):
            text = io.StringIO()
            pstats.Stats(path, stream=text).strip_dirs().sort_stats('tottime').print_stats(12)
            body = text.getvalue()
            out.append(f'== {kind} dispatcher, {side} ({requests} requests, {scale} sizes)\n'
                       + body[body.find('   ncalls'):].rstrip())
    return '\n\n'.join(out)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--quick', action='store_true')
    p.add_argument('--child', choices=['echo', 'worker'])
    p.add_argument('--endpoint')
    p.add_argument('--scale', default='demo')
    p.add_argument('--keys')
    p.add_argument('--profile', metavar='DIR', help='cProfile the dispatcher and a worker; .prof files in DIR')
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child, args.endpoint, args.scale, args.keys, args.profile)
    if args.profile:
        print(profile(args.profile, args.scale))
        return 0
    print(json.dumps(bench(args.quick), indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
