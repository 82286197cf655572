"""The runtime's transport against torch.distributed/gloo: per-request overhead of the same messages, same processes.

    python bench/transport_bench.py [--quick] [--json bench/transport.json] [--workers 4]

One aggregator and N=4 workers on loopback, started by torch.distributed.launch (each rank one thread). A request
is what collaborative inference sends, with no compute in between: the image to every worker, each worker's tokens
back. Three ways of moving it, alternated in rounds:
- gloo: torch.distributed isend/irecv with one gloo group per aggregator-worker pair (header int64[3], the image,
  then tokens and a float64 timing back), as a gloo runtime does it;
- zmq: the runtime's wire (collab/wire.py: ROUTER/DEALER sockets with its options, JSON header + raw buffers,
  packed and unpacked by wire.pack / wire.unpack) driven in the aggregator's main thread;
- dispatcher: the runtime itself, collab.dispatch.Dispatcher and collab.worker.Worker with a model that returns
  zeros: what a request costs end to end through the dispatcher's I/O thread.
Payloads: the demo's (28x28 uint8 image, 2x64 fp32 tokens) and the paper's (224x224x3 uint8, 2x192 fp32 tokens).
Medians of per-request round-trip times, gloo and zmq alternated in blocks of 10 requests so that both see the same
load; the ratio is zmq (and dispatcher) over gloo.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import PAYLOADS, NullModel  # noqa: E402


def _gloo_groups(rank, world):
    import datetime

    import torch.distributed as dist

    dist.init_process_group('gloo', init_method='env://', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    groups = {}
    for r in range(1, world):
        g = dist.new_group([0, r], backend='gloo')
        if rank in (0, r):
            groups[r if rank == 0 else 0] = g
    return groups


def gloo_round(rank, world, groups, image, width, k):
    import torch
    import torch.distributed as dist

    times = []
    header = torch.tensor([1, 1, 0], dtype=torch.int64)
    img = torch.from_numpy(image)
    for _ in range(k):
        if rank == 0:
            t0 = time.perf_counter()
            answers = []
            for r in range(1, world):
                tok, ms = torch.empty(1, width), torch.empty(1, dtype=torch.float64)
                answers.append((dist.irecv(tok, r, group=groups[r]), dist.irecv(ms, r, group=groups[r])))
            sends = [(dist.isend(header, r, group=groups[r]), dist.isend(img, r, group=groups[r]))
                     for r in range(1, world)]
            for pair in sends + answers:
                for w in pair:
                    w.wait()
            times.append((time.perf_counter() - t0) * 1e6)
        else:
            h, x = torch.empty(3, dtype=torch.int64), torch.empty_like(img)
            dist.recv(h, 0, group=groups[0])
            dist.recv(x, 0, group=groups[0])
            dist.send(torch.zeros(1, width), 0, group=groups[0])
            dist.send(torch.zeros(1, dtype=torch.float64), 0, group=groups[0])
    return times


def zmq_round(rank, world, sock, peers, image, width, k):
    import zmq

    from collab import wire

    times = []
    for i in range(k):
        if rank == 0:
            t0 = time.perf_counter()
            for p in peers:
                sock.send_multipart([p] + wire.pack({'type': 'run', 'id': i, 'index': i, 'batch': 1}, [image]),
                                    copy=False)
            for _ in peers:
                wire.unpack(sock.recv_multipart(copy=False)[1:])
            times.append((time.perf_counter() - t0) * 1e6)
        else:
            header, arrays = wire.unpack(sock.recv_multipart(copy=False))
            sock.send_multipart(wire.pack({'type': 'result', 'id': header['id'], 'compute_ms': 0.0},
                                          [np.zeros((1, width), dtype=np.float32)]), zmq.NOBLOCK, copy=False)
    return times


def _port(endpoint):
    """The port of a bound endpoint, tcp://HOST:PORT."""
    return int(endpoint.rsplit(':', 1)[1])


def role(out, rounds, per_round):
    """One rank of the launched benchmark; rank 0 writes the results to `out`."""
    import torch.distributed as dist
    import zmq

    from collab import dispatch, launcher, wire, worker

    rank, world, _ = launcher.env_rank()
    groups = _gloo_groups(rank, world)
    ctx = zmq.Context()
    # Rank 0 binds on ports the kernel picks and tells the others over gloo: a fixed MASTER_PORT + k may already
    # be taken by one of gloo's own pair connections.
    sock = wire.router(ctx, 'tcp://*:*') if rank == 0 else None
    ports = [_port(sock.getsockopt_string(zmq.LAST_ENDPOINT)) if rank == 0 else None]
    dist.broadcast_object_list(ports)
    if rank == 0:
        peers = []
        while len(peers) < world - 1:  # each worker says hello once
            peers.append(sock.recv_multipart()[0])
    else:
        sock = wire.dealer(ctx, launcher.aggregator_endpoint(ports[0]))
        while True:
            try:
                sock.send_multipart(wire.pack({'type': 'hello'}), zmq.NOBLOCK)
                break
            except zmq.Again:
                time.sleep(0.01)
        peers = None
    results = {}
    for name, (shape, width) in PAYLOADS.items():
        image = np.zeros(shape, dtype=np.uint8)
        gloo, raw = [], []
        gloo_round(rank, world, groups, image, width, 5)  # warm-up
        zmq_round(rank, world, sock, peers, image, width, 5)
        for _ in range(rounds):
            gloo += gloo_round(rank, world, groups, image, width, per_round)
            raw += zmq_round(rank, world, sock, peers, image, width, per_round)
        results[name] = {'gloo_us': gloo, 'zmq_us': raw}
    sock.close(linger=0)
    # The dispatcher path: the runtime's own aggregator and workers, a model that computes nothing.
    for name, (shape, width) in PAYLOADS.items():
        d = dispatch.Dispatcher(world - 1, lambda i: {}, {'input_dtype': 'uint8', 'wire_dtype': 'fp32',
                                                          'mean': [0.5], 'std': [0.5], 'num_classes': 10},
                                'tcp://*:*', log=lambda line: None) if rank == 0 else None
        dport = [_port(d.endpoint) if rank == 0 else None]  # its socket belongs to its I/O thread now
        dist.broadcast_object_list(dport)
        if rank == 0:
            d.wait_ready(60)
            image = np.zeros(shape, dtype=np.uint8)
            times = []
            for i in range(5 + rounds * per_round):
                t0 = time.perf_counter()
                d.submit(image, i).wait(30)
                times.append((time.perf_counter() - t0) * 1e6)
            results[name]['dispatcher_us'] = times[5:]
            d.stop_workers()
            d.close()
        else:
            w = worker.Worker(NullModel(width, shape), launcher.aggregator_endpoint(dport[0]), rank - 1,
                              exit_on_loss=True, name=f'[rank {rank}]')
            w.say = lambda text: None
            w.run()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(out, 'w') as f:
            json.dump(results, f)


def summarise(raw, workers):
    out = {}
    for name, r in raw.items():
        med = {k[:-3]: statistics.median(v) for k, v in r.items()}
        shape, width = PAYLOADS[name]
        out[name] = {'p50_us': med, 'ratio_zmq_vs_gloo': med['zmq'] / med['gloo'],
                     'ratio_dispatcher_vs_gloo': med['dispatcher'] / med['gloo'],
                     'p90_us': {k[:-3]: float(np.percentile(v, 90)) for k, v in r.items()},
                     'requests': len(r['gloo_us']), 'image_bytes': int(np.prod(shape)), 'token_bytes': 4 * width,
                     'workers': workers}
    return out


def bench(quick, workers=4, verbose=True):
    from tests.helpers import env as test_env
    from tests.helpers import free_port

    rounds, per_round = (30, 10) if quick else (100, 10)  # short blocks, alternated: both see the same load
    tmp = tempfile.mkdtemp(prefix='devit-transport-')
    try:
        out = os.path.join(tmp, 'raw.json')
        cmd = [sys.executable, '-m', 'torch.distributed.launch', f'--nproc_per_node={workers + 1}',
               '--master_addr=127.0.0.1', f'--master_port={free_port()}', '--use_env', os.path.abspath(__file__),
               '--role', out, '--rounds', str(rounds), '--per-round', str(per_round)]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(test_env(), OMP_NUM_THREADS='1'), capture_output=True,
                              text=True, timeout=1200)
        if proc.returncode != 0 or not os.path.isfile(out):
            first = proc.stderr.find('Traceback')
            raise RuntimeError(f'transport benchmark failed (exit {proc.returncode}):\n'
                               f'{proc.stderr[max(first, 0):][:3000]}')
        with open(out) as f:
            result = summarise(json.load(f), workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        for name, r in result.items():
            p = r['p50_us']
            print(f'  [{name}] {r["requests"]} requests, p50 round trip: gloo {p["gloo"]:.0f} us, zmq '
                  f'{p["zmq"]:.0f} us, dispatcher {p["dispatcher"]:.0f} us', flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--json', default=None)
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--role', default=None, help=argparse.SUPPRESS)
    p.add_argument('--rounds', type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument('--per-round', type=int, default=100, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role:
        return role(args.role, args.rounds, args.per_round)
    result = bench(args.quick, args.workers)
    if args.json:
        import fileio

        fileio.write_json_atomic(args.json, result)
    return result


if __name__ == '__main__':
    main()
