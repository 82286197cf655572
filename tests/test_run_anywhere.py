"""The stage scripts from any working folder, with their loader workers, and no process left after a killed run.

Each run is the seed's launcher form (``torch.distributed.launch --nproc_per_node=2 --use_env``) with real loader
workers (workers.worker_context's fork server). The code is a copy of this repository in a folder of its own, so
that the working folder and the code's folder differ as they do for a user:

- a working folder holding the seed's layout (``./datasets``, ``./sub_datasets``, ``./output``) and a ``./models``
  folder and ``./utils.py`` of the user's, the code in ``./proj``, with the default loader workers (8 a rank);
- an unrelated working folder, with another regular package named ``datasets`` installed in the environment
  (a throw-away venv whose own site-packages holds it, on top of this project's virtualenv through a .pth file);
- a clash the mechanism cannot cover (a .pth file that puts a folder with a ``datasets`` package first on
  sys.path): one error line naming the module and its file, before training, no worker traceback;
- ``kill -9`` of the launcher's process group, and of one rank: within 10 s no rank, fork server or loader worker
  of the run is left.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
from faults import make_split, no_project_traceback, read_text, wait_exit, wait_for_text
from helpers import ROOT, TEACHER, TEACHER_KW, TINY, descendants, env, error_lines, free_port, kill_group, launch_cmd
from helpers import run as run_checked

# TINY with the default loader workers (8 a rank): --tiny-transforms would set them to 0.
TINY_WORKERS = [a for a in TINY if a != '--tiny-transforms']


@pytest.fixture(scope='module')
def split(tmp_path_factory, fmnist_root):
    return make_split(tmp_path_factory.mktemp('anywhere') / 'split4', fmnist_root)


def copy_code(dest):
    """This repository's code (no tests, no virtualenv) in ``dest``."""
    shutil.copytree(ROOT, dest, ignore=lambda folder, names: [
        n for n in names if folder == ROOT and n in ('.git', '.venv', 'tests', '.ci', 'docs')
        or n == '__pycache__'])
    return str(dest)


def seed_layout(work, split):
    """The seed's data layout in ``work``, plus a ``./models`` folder and ``./utils.py`` of the user's."""
    (work / 'datasets').mkdir(parents=True)
    (work / 'datasets' / 'README').write_text('the full dataset lives here\n')
    shutil.copytree(split, work / 'sub_datasets')
    (work / 'output').mkdir()
    (work / 'models').mkdir()
    (work / 'models' / 'notes.txt').write_text('a user folder\n')
    (work / 'utils.py').write_text('raise ImportError("the user\'s own utils.py, not DeViT\'s")\n')


def throwaway_python(tmp_path, fake_first=False):
    """A venv on top of this project's virtualenv (.pth) whose own site-packages holds a regular package named
    ``datasets``; with ``fake_first`` a .pth file also puts a folder holding another ``datasets`` first on
    sys.path. Returns its python."""
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    site = venv / 'lib' / f'python{sys.version_info[0]}.{sys.version_info[1]}' / 'site-packages'
    (site / 'devit-base.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    for where in (site, tmp_path / 'first'):
        (where / 'datasets').mkdir(parents=True, exist_ok=True)
        (where / 'datasets' / '__init__.py').write_text('"""Not DeViT\'s datasets."""\nSOMETHING_ELSE = True\n')
    if fake_first:
        (site / 'aaa-first.pth').write_text(f'import sys; sys.path.insert(0, {str(tmp_path / "first")!r})\n')
    return str(venv / 'bin' / 'python')


def launcher(python, script, *args):
    return [python, '-m', 'torch.distributed.launch', '--nproc_per_node=2', '--master_addr=127.0.0.1',
            f'--master_port={free_port()}', '--use_env', script, *args]


def stage1(split, out, *extra, tiny=TINY):
    return [*tiny, '--model', TEACHER, '--model-kwargs', *TEACHER_KW, '--epochs', '1', '--limit-train', '128',
            '--data-path', str(split), '--start-division', '0', '--output_dir', str(out), *extra]


def user_env():
    """As a user's shell has it: no PYTHONPATH pointing at the code."""
    e = env()
    e.pop('PYTHONPATH')
    return e


def run_in(cwd, cmd, timeout=400):
    proc = subprocess.run(cmd, cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr


@pytest.mark.slow
def test_code_in_a_subfolder_of_a_working_folder_with_the_seed_layout(split, tmp_path):
    work = tmp_path / 'work'
    seed_layout(work, split)
    copy_code(work / 'proj')
    proc, text = run_in(work, launcher(sys.executable, 'proj/train_subdata.py',
                                       *stage1('./sub_datasets', './output', tiny=TINY_WORKERS)))
    assert proc.returncode == 0, text[-6000:]
    assert "Can't get attribute" not in text and 'Traceback' not in text, text[-6000:]
    assert (work / 'output' / 'sub-dataset0' / 'checkpoint.pth').is_file()
    with open(work / 'output' / 'sub-dataset0' / 'args.json') as f:
        assert json.load(f)['num_workers'] == 8  # the default


@pytest.mark.slow
def test_an_unrelated_folder_with_another_datasets_package_installed(split, tmp_path):
    python = throwaway_python(tmp_path)
    check = subprocess.run([python, '-c', 'import datasets; assert datasets.SOMETHING_ELSE'], cwd=tmp_path)
    assert check.returncode == 0
    code = copy_code(tmp_path / 'code')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    proc, text = run_in(elsewhere, launcher(python, os.path.join(code, 'train_subdata.py'),
                                            *stage1(split, tmp_path / 'out', '--num_workers', '2')))
    assert proc.returncode == 0, text[-6000:]
    assert "Can't get attribute" not in text, text[-6000:]
    assert (tmp_path / 'out' / 'sub-dataset0' / 'checkpoint.pth').is_file()


def test_a_clash_it_cannot_cover_is_one_line_before_training(split, tmp_path):
    python = throwaway_python(tmp_path, fake_first=True)
    proc, text = run_in(ROOT, launcher(python, os.path.join(ROOT, 'train_subdata.py'),
                                       *stage1(split, tmp_path / 'out', '--num_workers', '2')), timeout=200)
    assert proc.returncode != 0
    # each rank says it once (rank 0 plainly, the others with cli's '[rank N] ' prefix)
    errors = sorted({line[line.index('error:'):] for line in text.splitlines() if 'error:' in line})
    first = tmp_path / 'first' / 'datasets' / '__init__.py'
    assert errors == [f"error: loader workers would import the module 'datasets' from {first}, not this project's "
                      f"{ROOT}/datasets.py: rename or remove that one, or run with --num_workers 0"], text[-6000:]
    assert no_project_traceback(text) and "Can't get attribute" not in text, text[-6000:]
    assert not (tmp_path / 'out' / 'sub-dataset0' / 'log.txt').exists()


def alive(pids):
    """The pids of ``pids`` still running (zombies waiting for their reaper excluded)."""
    left = []
    for pid in pids:
        try:
            with open(f'/proc/{pid}/stat') as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
        except OSError:
            continue
        if state != 'Z':
            left.append(pid)
    return left


def cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


def start_stalled_run(split, tmp_path):
    """A 2-rank run with 2 loader workers a rank, stalled at its second step (DEVIT_FAULT hang): its launcher and
    every process under it (ranks, fork servers, workers)."""
    output = tmp_path / 'run.out'
    cmd = launcher(sys.executable, os.path.join(ROOT, 'train_subdata.py'),
                   *stage1(split, tmp_path / 'out', '--num_workers', '2', '--epochs', '3', '--limit-train', '256'))
    with open(output, 'w') as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(user_env(), DEVIT_FAULT='hang@2'), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_text(proc, output, 'fault injected: hang')
    time.sleep(1)
    run = descendants(proc.pid)
    forked = [p for p in run if 'multiprocessing.forkserver' in cmdline(p)]  # the servers and their workers
    assert len(forked) >= 2 + 2 * 2, [cmdline(p) for p in run]
    return proc, run, output


def check_none_left(run, output):
    deadline = time.time() + 10
    while alive(run) and time.time() < deadline:
        time.sleep(0.2)
    left = alive(run)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, [cmdline(p) for p in left] + [read_text(output)[-3000:]]


@pytest.mark.slow
def test_kill_9_of_the_launchers_group_leaves_no_process(split, tmp_path):
    proc, run, output = start_stalled_run(split, tmp_path)
    kill_group(proc)
    check_none_left(run, output)


@pytest.mark.slow
def test_kill_9_of_one_rank_leaves_no_process(split, tmp_path):
    proc, run, output = start_stalled_run(split, tmp_path)
    ranks = [p for p in run if 'train_subdata.py' in cmdline(p)]
    assert len(ranks) == 2
    os.kill(max(ranks), signal.SIGKILL)
    wait_exit(proc, 60)
    check_none_left(run, output)


def test_tensorboard_without_the_package_is_one_line_before_training(split, tmp_path):
    if importlib.util.find_spec('tensorboard') is not None:
        pytest.skip('tensorboard is installed here')
    proc = run_checked(launch_cmd(*['train_subdata.py', *stage1(split, tmp_path / 'out', '--tensorboard')], nproc=0),
               timeout=200, check=False)
    assert proc.returncode != 0
    wanted = 'error: --tensorboard needs the tensorboard package: pip install tensorboard'
    assert error_lines(proc.stderr) == [wanted], proc.stderr[-4000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-4000:]
    assert not (tmp_path / 'out' / 'sub-dataset0' / 'log.txt').exists()


def on_a_terminal(cmd, cwd):
    """Run ``cmd`` with its stderr on a pseudo-terminal (stdout on a pipe): (exit code, what stderr showed)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 120, 0, 0))  # a terminal of 120 columns
    proc = subprocess.Popen(cmd, cwd=cwd, env=user_env(), stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    shown = b''
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    proc.communicate(timeout=120)
    os.close(leader)
    return proc.returncode, shown.decode(errors='replace')


@pytest.mark.parametrize('how', ['terminal', 'terminal --no-progress', 'pipe'])
def test_split_progress_bar_only_on_a_terminal(tmp_path, how):
    from helpers import write_rgb_folder

    data = write_rgb_folder(tmp_path / 'rgb', num_classes=4, n_train=6, n_val=2, size=8)
    cmd = [sys.executable, os.path.join(ROOT, 'splite_dataset.py'), '--dataset', 'folder', '--data_path', data,
           '--num_division', '2', '--output_path', str(tmp_path / 'split')]
    if how.endswith('--no-progress'):
        cmd.append('--no-progress')
    if how == 'pipe':
        proc = subprocess.run(cmd, cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=120)
        code, shown = proc.returncode, proc.stderr
    else:
        code, shown = on_a_terminal(cmd, tmp_path)
    assert code == 0, shown
    bar = 'split: 100%' in shown and '32/32' in shown  # 4 classes x (6 + 2) images, one file each
    assert bar == (how == 'terminal'), shown


def test_the_long_tools_take_no_progress():
    """collab_infer.py's batch evaluation, export_onnx.py and splite_dataset.py share cli.progress and its flag."""
    import splite_dataset
    from collab.host import export, infer

    for parser in (export.get_parser(), infer.get_parser(), splite_dataset.get_args_parser()):
        assert any('--no-progress' in action.option_strings for action in parser._actions), parser.prog
