"""Helpers for tests that run the project's scripts as real processes (launcher, loopback, Fashion-MNIST).

Most tests run tiny models on CPU with ``TINY`` below, which sets flags away from their defaults; the demo does so
through ``configs/small.yaml``. Each default they leave is still run by a test (flag, its default, who sets
it otherwise, and the test that runs the default):

- --tiny-transforms (off: DeiT's RandAugment, erasing, crops): set by TINY, demo, faults.py.
    default run by: test_default_path.py (both datasets); test_datasets.py::test_deit_transforms and
    ::test_every_dataset_and_transform_pickles[deit]
- --num_workers (8; 0 with --tiny-transforms): set by TINY (so 0), test_faults_data.py (1).
    default run by: test_default_path.py; tests/stress_default_path.py
- --mixup 0.8, --cutmix 1.0: set by TINY, demo (0, 0).
    default run by: test_default_path.py
- --smoothing 0.1: set by TINY, demo (0).
    default run by: test_default_path.py
- --drop-path 0.1: set by demo (0).
    default run by: every TINY run; test_default_path.py
- --warmup-epochs 5: set by TINY (0), demo (0.43).
    default run by: test_default_path.py (with its warning line)
- lr scaled by batch*world/512 (--unscale-lr off): set by demo.
    default run by: every TINY run; test_default_path.py
- --batch-size 64, --eval-batch-size (= batch): set by TINY, demo.
    default run by: sizes only: no code path depends on them
- --limit-train, --limit-val (every image): set by TINY, demo --quick.
    default run by: test_default_path.py; the full demo
- tqdm bars on rank 0 (--no-progress off): set by TINY, demo.
    default run by: test_default_path.py
- --model-ema (off; the seed turns it on): set by faults.py, test_pipeline.py stage 2.
    default run by: off: the other TINY runs; on as the seed: test_default_path.py
- --repeated-aug, --pin-mem (off), --hflip 0.5, --mean/--std (ImageNet's): no helper changes them, so every test
    runs the default; the other settings: test_pipeline.py::test_other_launcher_forms[torchrun] (both switches on),
    test_datasets.py::test_hflip_mean_and_std_reach_both_recipes, test_config.py (values from a recipe file)
- --dist-timeout 600: set by test_faults_launcher.py (5).
    default run by: every other launcher run
"""
import contextlib
import glob
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny models shared by the pipeline tests: 28×28 grey images, patch 7 -> 16 patches (+ cls + dist).
TEACHER = 'deit_tiny_distilled_patch16_224'
TEACHER_KW = ['img_size=28', 'patch_size=7', 'in_chans=1', 'embed_dim=32', 'depth=2', 'num_heads=2']
STUDENT_KW = ['img_size=28', 'patch_size=7', 'in_chans=1', 'embed_dim=16', 'depth=2', 'num_heads=2']
TINY = ['--dataset', 'fashion_mnist', '--tiny-transforms', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
        '--batch-size', '32', '--eval-batch-size', '100', '--limit-train', '256', '--limit-val', '100',
        '--no-progress', '--warmup-epochs', '0']


def write_rgb_folder(root, num_classes=10, n_train=24, n_val=6, size=32, seed=0):
    """An RGB ImageFolder of PNG files, ``root/{train,val}/class{k}/{i}.png``: each class a colour of its own plus
    per-pixel noise, so a model can learn it. Returns ``root`` as a string."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(num_classes, 3))
    for split, count in (('train', n_train), ('val', n_val)):
        for k in range(num_classes):
            folder = os.path.join(root, split, f'class{k}')
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = np.clip(colours[k] + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))
    return str(root)


def _unassigned_ports():
    """The ports below the range the kernel hands out (bind to 0, outgoing connections)."""
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(min(20000, low // 2), low)


_PORTS = _unassigned_ports()
_GIVEN_PORTS = set()


def free_port():
    """A free loopback port below the kernel's ephemeral range.

    A port the kernel hands out (bind to 0) may be handed again to any outgoing connection (gloo's, another test
    suite's) between this call and the server's bind; one below that range is only ever taken by an explicit bind.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(_PORTS)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise RuntimeError('no free loopback port found below the ephemeral range')


def env():
    """One thread per process: several ranks share this machine's cores."""
    e = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, PYTHONUNBUFFERED='1', PYTHONFAULTHANDLER='1')
    e.pop('DEVIT_DEBUG', None)
    return e


def launch_cmd(script, *args, nproc=2, launcher='launch'):
    """The seed's launcher form (``torch.distributed.launch --use_env``), ``torchrun``, or plain python (nproc=0)."""
    script = os.path.join(ROOT, script)
    if launcher == 'python' or nproc == 0:
        return [sys.executable, script, *args]
    port = str(free_port())
    if launcher == 'torchrun':
        return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1',
                f'--master_port={port}', script, *args]
    return [sys.executable, '-m', 'torch.distributed.launch', f'--nproc_per_node={nproc}', '--master_addr=127.0.0.1',
            f'--master_port={port}', '--use_env', script, *args]


def kill_group(proc, sig=signal.SIGKILL):
    """Signal the process group of `proc` (started with start_new_session=True) and reap it."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait()


def descendants(pid):
    """Every process below ``pid``, parents before their children (from /proc: the children of each of a process's
    threads, since a child belongs to the thread that started it)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = []
        for children in glob.glob(f'/proc/{parent}/task/*/children'):
            with contextlib.suppress(OSError), open(children) as f:
                kids += [int(k) for k in f.read().split()]
        found += kids
        todo += kids
    return found


def run(cmd, timeout=300, check=True):
    """Run ``cmd``; on failure show its output in the assertion message.

    A run past ``timeout`` is a hang: every process under it (launcher, ranks, loader workers) gets SIGABRT, which
    faulthandler (on through ``env()``) answers with each Python thread's traceback, and the test fails with them.
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = [proc.pid, *descendants(proc.pid)]
        for pid in reversed(hung):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGABRT)
        time.sleep(3)
        for pid in hung:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f'{" ".join(cmd)}\nstill running after {timeout} s (a hang); tracebacks of its '
                             f'{len(hung)} processes follow\n--- stdout\n{stdout[-4000:]}\n--- stderr\n'
                             f'{stderr[-30000:]}') from None
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n'
                             f'--- stderr\n{proc.stderr[-4000:]}')
    return proc


def error_lines(stderr):
    """Lines our scripts print for bad input (``error: ...``), ignoring launcher noise."""
    return [line for line in stderr.splitlines() if 'error:' in line]


def read_log(folder):
    with open(os.path.join(folder, 'log.txt')) as f:
        return [json.loads(line) for line in f if line.strip()]


def digest(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()
