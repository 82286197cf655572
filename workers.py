"""Loader workers that import this project's modules from any working folder, and never outlive their rank.

The stage scripts' loader workers come from a fork server (``worker_context``). This module is the first thing the
server imports (WORKER_PRELOAD), and it imports nothing heavy, so that the server starts watching its rank at once.
"""
import ctypes
import functools
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys

from fileio import UsageError

# What a loader worker needs (the dataset classes and transforms, the worker loop) and the modules the stage scripts
# import: the fork server imports them once, so that a worker starts as a fork of it instead of importing torch,
# timm and torchvision afresh (16 workers a rank did that, for minutes on two cores).
WORKER_PRELOAD = ('workers', 'engine', 'datasets', 'timm.data', 'torchvision.transforms', 'torch.utils.data')
PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
_RANK_PID = 'DEVIT_FORK_SERVER_RANK'  # set for the fork server only: the rank it serves
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_context():
    """The multiprocessing context of the loader workers: a fork server with WORKER_PRELOAD imported.

    Workers come from a fork server, not from a fork of this rank: a rank has threads (gloo's, the launcher
    watchdog), and a fork taken while one of them holds a lock can leave the worker deadlocked (Python 3.14 made
    forkserver the Linux default for this reason). The server is a fresh single-threaded process, so forking it
    is safe; everything a worker receives is pickled (datasets.build_dataset's datasets and transforms are).
    """
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    start_fork_server()
    return context


def fork_server_env():
    """The environment the fork server starts in, so that it imports this project's modules by the files this rank
    imported, from any working folder. Python 3.11 starts it as ``python -c ...``, whose sys.path begins with the
    working folder (a ``./datasets`` folder or ``./utils.py`` there would win) and ignores the sys.path it is
    handed; PYTHONSAFEPATH drops that entry and PYTHONPATH puts the project's folder before site-packages (where
    another package named ``datasets`` may be installed)."""
    env = dict(os.environ, PYTHONSAFEPATH='1', **{_RANK_PID: str(os.getpid())})
    env['PYTHONPATH'] = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get('PYTHONPATH')) if p)
    return env


def check_worker_imports(env):
    """One clear error, before training, where the fork server would still import another file for one of this
    project's modules (a .pth file that puts a folder first on sys.path, ``python -E``/``-I``): asked of a bare
    interpreter started as the server is (same flags, environment and folder), which imports nothing."""
    ours = {name: module.__file__ for name, module in list(sys.modules.items())
            if '.' not in name and not name.startswith('__') and getattr(module, '__file__', None)
            and os.path.dirname(os.path.abspath(module.__file__)) in (PROJECT_ROOT, os.path.join(PROJECT_ROOT, name))}
    probe = ('import importlib.util, json, sys\n'
             'print(json.dumps({n: getattr(importlib.util.find_spec(n), "origin", None) for n in sys.argv[1:]}))')
    flags = subprocess._args_from_interpreter_flags()
    found = json.loads(subprocess.run([sys.executable, *flags, '-c', probe, *sorted(ours)], env=env, check=True,
                                      stdout=subprocess.PIPE, text=True).stdout)
    for name, origin in sorted(found.items()):
        if origin is None or os.path.realpath(origin) != os.path.realpath(ours[name]):
            raise UsageError(f'loader workers would import the module {name!r} from {origin or "a namespace folder"}'
                             f', not this project\'s {ours[name]}: rename or remove that one, or run with '
                             f'--num_workers 0')


def start_fork_server():
    """Start this rank's fork server (no-op when it runs) in fork_server_env(), after check_worker_imports."""
    from multiprocessing import forkserver

    env = fork_server_env()
    check_worker_imports(env)
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def die_with_parent(parent):
    """SIGKILL this process when ``parent`` (the process that started it) ends, however it ends (Linux prctl).

    A loader worker watches its parent, which for a fork server's worker is the server, not the rank; the server
    waits for a pipe that the workers hold open. Without this, a rank killed by SIGKILL would leave its server and
    its workers running for ever, each waiting for the other."""
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:  # it ended before prctl took effect
        os._exit(1)


def worker_init_fn():
    """The DataLoader's ``worker_init_fn``: each worker dies with this rank's fork server (and so with the rank)."""
    return functools.partial(_worker_dies_with_server, multiprocessing.forkserver._forkserver._forkserver_pid)


def _worker_dies_with_server(server, worker_id):
    die_with_parent(server)


def _fork_server_dies_with_its_rank():
    rank = os.environ.pop(_RANK_PID, None)  # set by start_fork_server for the server alone, not for its workers
    if rank is not None:
        die_with_parent(int(rank))


_fork_server_dies_with_its_rank()
