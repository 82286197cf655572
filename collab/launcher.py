"""The runtime's processes and their launcher: ranks from the environment, the aggregator's address, following a
dead launcher.

torch's launchers (``torch.distributed.launch --use_env``, ``torchrun``) only start the processes here: they set
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and nothing in the runtime uses torch.distributed. Rank 0
is the aggregator; it listens for workers on MASTER_PORT + 1 (or ``--collab-port``), at MASTER_ADDR for the others.

Device-side module: Python 3.6+, standard library only.
"""
import os
import sys
import threading
import time

DEFAULT_PORT = 29501  # the aggregator's port without a launcher: torch's default MASTER_PORT 29500, plus one


def env_rank():
    """(rank, world size, local rank) as set by the launchers; (0, 1, 0) for a plain process."""
    env = os.environ
    return int(env.get('RANK', '0')), int(env.get('WORLD_SIZE', '1')), int(env.get('LOCAL_RANK', '0'))


def launched():
    """True under torch.distributed.launch --use_env or torchrun (they set LOCAL_RANK)."""
    return 'LOCAL_RANK' in os.environ


def aggregator_port(port=None):
    """The port the aggregator listens on for workers: `port`, else MASTER_PORT + 1 under a launcher, else 29501."""
    if port:
        return int(port)
    if os.environ.get('MASTER_PORT'):
        return int(os.environ['MASTER_PORT']) + 1
    return DEFAULT_PORT


def aggregator_endpoint(port=None, host=None):
    """tcp://HOST:PORT of the aggregator as a worker dials it (HOST: MASTER_ADDR under a launcher)."""
    host = host or os.environ.get('MASTER_ADDR') or '127.0.0.1'
    if ':' in host and not host.startswith('['):
        host = f'[{host}]'  # IPv6
    return f'tcp://{host}:{aggregator_port(port)}'


def exit_with_launcher(interval=1.0, name=None):
    """End this process when its launcher dies.

    torch's launchers start each rank in a session of its own, so a launcher killed with SIGKILL (or its process
    group) cannot stop them: orphaned ranks would go on, hang, or write files beside a rerun. A daemon thread
    watches the parent and exits once it is gone.
    """
    parent = os.getppid()
    who = name or '[rank {}]'.format(os.environ.get('RANK', '?'))

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        try:
            sys.stderr.write(f'{who} error: the launcher (pid {parent}) is gone; stopping\n')
            sys.stderr.flush()
        finally:
            os._exit(1)
    thread = threading.Thread(target=watch, name='exit-with-launcher')
    thread.daemon = True
    thread.start()
    return thread
