"""Collaborative runtime, the fault its own tests (tests/test_collab.py: a worker that exits, stalls, or drops out)
leave out: the aggregator's host goes down. Two launchers stand for two hosts (``--nnodes 2``): node 0 runs the
aggregator, node 1 a device worker. The aggregator is SIGKILLed while the worker is busy; the worker must notice,
say which link it lost, and exit non-zero, and its launcher with it, within a bounded time."""
import os
import signal
import sys
import time

from collab_fixtures import save_ensemble
from faults import processes_with, read_text, start, wait_exit, wait_for_text, wait_gone
from helpers import ROOT, free_port

STALL = 2  # seconds the worker pauses at image 20 (the marker that serving is under way)


def node_cmd(node, port, ckpt, data):
    return [sys.executable, '-m', 'torch.distributed.launch', '--nnodes=2', f'--node_rank={node}', '--nproc_per_node=1',
            '--master_addr=127.0.0.1', f'--master_port={port}', '--use_env', os.path.join(ROOT, 'collab_infer.py'),
            '--model-path', ckpt, '--data-path', data, '--limit', '3000', '--timeout', '20',
            '--fault', 'stall', '--fault-rank', '1', '--fault-after', '20', '--fault-seconds', str(STALL)]


def rank_pid(marker, rank):
    for pid in processes_with(marker):
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                if f'\0RANK={rank}\0'.encode() in b'\0' + f.read():
                    return pid
        except OSError:
            pass
    return None


def test_aggregator_host_dies_worker_exits_with_clear_error(tmp_path, fmnist_root):
    ckpt = save_ensemble(tmp_path / 'ensemble.pth', 1)
    port = free_port()
    nodes = [start(node_cmd(n, port, ckpt, fmnist_root), tmp_path / f'node{n}.out') for n in (0, 1)]
    try:
        wait_for_text(nodes[1], tmp_path / 'node1.out', 'fault injected: stall')
        aggregator = rank_pid(ckpt, 0)
        assert aggregator is not None
        os.kill(aggregator, signal.SIGKILL)
        killed = time.time()
        code = wait_exit(nodes[1], STALL + 30)
        ended = time.time()
    finally:
        for proc in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        left = wait_gone(ckpt, timeout=10)
    worker = read_text(tmp_path / 'node1.out')
    assert code != 0, worker
    assert '[rank 1] error: lost its link to rank 0 (the aggregator at tcp://127.0.0.1:' in worker, worker
    assert 'closed the connection' in worker, worker
    assert ended - killed < STALL + 20
    assert nodes[0].wait() != 0  # the aggregator's launcher reports its dead rank too
    assert not left, 'a collab process outlived the run'
