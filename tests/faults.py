"""Shared by tests/test_faults_*.py: stage commands with tiny models, processes that are really killed, and the
checks on what a fault leaves behind.

Faults inside a run are injected with ``DEVIT_FAULT=KIND@STEP[:RANK]`` (see ``engine.injected_fault``): ``hang``
makes the ranks stop at a known optimizer step so that the test can SIGKILL the launcher's process group there,
``crash`` SIGKILLs one rank, ``nan`` poisons the loss.
"""
import glob
import os
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest
import torch
from helpers import ROOT, STUDENT_KW, TEACHER, TEACHER_KW, TINY, digest, env, kill_group, launch_cmd, read_log  # noqa: F401

import cli
import splite_dataset
from models.checkpoint import read_checkpoint

BATCH = 32  # TINY's --batch-size
TRAIN = 256  # TINY's --limit-train: 256 / (2 ranks x 32) = 4 optimizer steps per epoch under the launcher


@contextmanager
def one_thread():
    """In-process training on one thread (other processes share this machine's cores), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_split(folder, fmnist_root, num_division=4):
    code = splite_dataset.main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division',
                                str(num_division), '--output_path', str(folder)])
    assert code == 0
    return folder


def stage1_args(split, out, epochs, *extra):
    return ['train_subdata.py', *TINY, '--model', TEACHER, '--model-kwargs', *TEACHER_KW, '--epochs', str(epochs),
            '--model-ema', '--data-path', str(split), '--start-division', '0', '--output_dir', str(out), *extra]


def stage2_args(split, teacher, out, epochs, *extra):
    return ['distill_sub.py', *TINY, '--model', 'dedeit', '--model-kwargs', *STUDENT_KW, '--epochs', str(epochs),
            '--teacher-model', TEACHER, '--teacher-kwargs', *TEACHER_KW, '--teacher-path', str(teacher),
            '--distillation-type', 'hard', '--model-ema', '--data-path', str(split), '--start-division', '0',
            '--output_dir', str(out), *extra]


def launch(args, nproc=2, launcher='launch'):
    return launch_cmd(*args, nproc=nproc, launcher=launcher)


def start(cmd, output, fault=None, **extra_env):
    """Start ``cmd`` in its own process group (so the whole launcher tree can be killed), output to a file."""
    e = dict(env(), **extra_env)
    if fault:
        e['DEVIT_FAULT'] = fault
    with open(output, 'w') as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_text(proc, output, text, timeout=180):
    """Poll ``output`` until it holds ``text``; returns the time it appeared. Fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in read_text(output):
            return time.time()
        if proc.poll() is not None:
            raise AssertionError(f'process ended (exit {proc.returncode}) before printing {text!r}:\n'
                                 f'{read_text(output)[-4000:]}')
        time.sleep(0.05)
    kill_group(proc)
    raise AssertionError(f'{text!r} not printed within {timeout} s:\n{read_text(output)[-4000:]}')


def wait_exit(proc, timeout):
    """Wait for ``proc``; on timeout kill its group and fail: a fault must never turn into a hang."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f'still running {timeout} s after the fault: the run hangs') from None


def processes_with(marker):
    """Pids of the processes whose command line contains ``marker`` (e.g. a run's unique output folder).

    torch's launchers start every rank in a session of its own, so a rank is not in the launcher's process group.
    """
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f'/proc/{entry}/cmdline', 'rb') as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def wait_gone(marker, timeout=20):
    """Wait until no process mentions ``marker``; returns the pids still there (SIGKILLed) after ``timeout``."""
    deadline = time.time() + timeout
    while (left := processes_with(marker)) and time.time() < deadline:
        time.sleep(0.1)
    for pid in left:  # never leave a stray rank behind, even when the test fails on it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def read_text(path):
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except FileNotFoundError:
        return ''


def temp_files(folder):
    """What ``utils.save_checkpoint`` leaves when it is killed mid-write."""
    return glob.glob(os.path.join(folder, '.*.tmp'))


def load(path):
    return read_checkpoint(path)


def error_lines(text):
    return [line for line in text.splitlines() if 'error:' in line]


def no_project_traceback(text):
    """True when no traceback line points into this project's own files (the launcher's are allowed)."""
    return f'File "{ROOT}/' not in text.replace(os.path.join(ROOT, '.venv'), '')


def run_inprocess(main, argv, capsys):
    """A script's ``main`` under ``cli.run_main`` in this process: (exit code, its stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main, argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()
