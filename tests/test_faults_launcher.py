"""Launcher faults: a rank that dies (SIGKILL, as an OOM kill) or stalls brings every rank down with a non-zero exit
within a bounded time, never a hang; a busy ``--master_port`` is reported by the launcher, saying the address is in
use, within seconds."""
import socket
import textwrap
import time

import pytest
from faults import launch, make_split, read_text, stage1_args, start, wait_exit, wait_for_text, wait_gone
from helpers import free_port, launch_cmd, run


@pytest.fixture(scope='module')
def split(tmp_path_factory, fmnist_root):
    return make_split(tmp_path_factory.mktemp('launcher') / 'split4', fmnist_root)


def test_a_rank_that_dies_takes_all_ranks_down(split, tmp_path):
    output = tmp_path / 'run.out'
    proc = start(launch(stage1_args(split, tmp_path / 'out', 3)), output, fault='crash@2:1')
    fault = wait_for_text(proc, output, 'fault injected: crash')
    code = wait_exit(proc, 60)
    ended = time.time()
    text = read_text(output)
    assert code != 0, text
    assert ended - fault < 30, f'{ended - fault:.0f} s from the crash to the exit'
    # the launcher names the rank that died and how; the survivor saw its peer go (gloo), then was stopped
    assert 'rank      : 1 (local_rank: 1)' in text and 'Signal 9 (SIGKILL)' in text, text
    assert not wait_gone(str(tmp_path / 'out'), timeout=5), 'a rank outlived the launcher'
    assert not (tmp_path / 'out' / 'sub-dataset0' / 'checkpoint_last.pth').exists()


@pytest.mark.slow
def test_a_rank_that_stalls_is_bounded_by_dist_timeout(split, tmp_path):
    output = tmp_path / 'run.out'
    timeout = 5
    proc = start(launch(stage1_args(split, tmp_path / 'out', 3, '--dist-timeout', str(timeout))), output,
                 fault='hang@2:1')
    fault = wait_for_text(proc, output, 'fault injected: hang')
    code = wait_exit(proc, 60)
    ended = time.time()
    text = read_text(output)
    assert code != 0, text
    assert timeout - 1 < ended - fault < timeout + 30, f'{ended - fault:.0f} s from the stall to the exit'
    assert f'Timed out waiting {timeout * 1000}ms' in text, text  # rank 0's collective gave up after --dist-timeout
    assert not wait_gone(str(tmp_path / 'out'), timeout=5), 'a rank outlived the launcher'


def test_busy_master_port_is_reported(split, tmp_path):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', port))
        busy.listen()
        cmd = launch(stage1_args(split, tmp_path / 'out', 1))
        cmd = [a if not a.startswith('--master_port=') else f'--master_port={port}' for a in cmd]
        output = tmp_path / 'run.out'
        started = time.time()
        code = wait_exit(start(cmd, output), 60)
    text = read_text(output)
    assert code != 0
    assert time.time() - started < 60
    # torch 2.14's launcher (static TCP rendezvous) fails to open its store and says why
    assert f'port: {port}' in text and 'EADDRINUSE' in text and 'address already in use' in text, text
    assert not (tmp_path / 'out').exists()


def test_a_finished_run_tears_its_process_group_down(tmp_path):
    """cli.run_main destroys the process group of a run that ended well, on every rank, so that no gloo thread is
    left running into interpreter shutdown, where it can abort a rank whose work is done (exit -6)."""
    script = tmp_path / 'job.py'
    script.write_text(textwrap.dedent('''
        import argparse
        import sys

        import torch
        import torch.distributed as dist

        import cli
        import utils


        def main(argv):
            args = argparse.Namespace(local_rank=None, device=None, dist_url='env://', dist_timeout=60)
            utils.init_distributed(args)
            total = torch.ones(1)
            dist.all_reduce(total)
            return args.rank, int(total.item())


        rank, total = cli.run_main(main)
        # one write per line: both ranks share the launcher's stdout, and print() writes the newline apart
        sys.stdout.write(f'rank {rank} of {total}: process group left after run_main: {dist.is_initialized()}\\n')
        sys.stdout.flush()
    '''))
    proc = run(launch_cmd(str(script)), timeout=120)
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith('rank '))
    assert lines == [f'rank {r} of 2: process group left after run_main: False' for r in (0, 1)], proc.stdout
