"""Read-only and full disks, made real: tests run as root, for whom chmod blocks nothing, so the output folder is a
tmpfs mounted read-only, or a tmpfs too small for a third checkpoint, inside a private mount namespace
(``unshare -m``) that only the training process sees. Where mounting is not allowed these tests are skipped, and
the in-process test below still covers the read-only message."""
import errno
import os
import shlex
import subprocess
import tempfile

import pytest
from faults import error_lines, launch, load, make_split, one_thread, read_log, stage1_args, temp_files
from helpers import ROOT, env

import cli
import engine
import fileio
import train_subdata
from fileio import UsageError


def _can_mount():
    with tempfile.TemporaryDirectory() as d:
        try:
            proc = subprocess.run(['unshare', '-m', 'sh', '-c', f'mount -t tmpfs -o size=1m tmpfs {shlex.quote(d)}'],
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason='no private mount namespace here (unshare -m / mount)')


@pytest.fixture(scope='module')
def split(tmp_path_factory, fmnist_root):
    return make_split(tmp_path_factory.mktemp('disk') / 'split4', fmnist_root)


def in_namespace(mountpoint, options, cmd, keep=None):
    """Run ``cmd`` with a fresh tmpfs (mount ``options``) at ``mountpoint``, visible to this command only.

    ``keep``: a folder the tmpfs content is copied to afterwards, since the mount dies with the namespace.
    """
    os.makedirs(mountpoint, exist_ok=True)
    m = shlex.quote(str(mountpoint))
    script = f'mount -t tmpfs -o {options} tmpfs {m} || exit 99; '
    if 'ro' in options.split(','):
        script = f'mount -t tmpfs -o size=1m tmpfs {m} && mount -o remount,ro {m} || exit 99; '
    script += '"$@"; rc=$?; '
    if keep is not None:
        script += f'cp -a {m}/. {shlex.quote(str(keep))}/; '
    script += 'exit $rc'
    if keep is not None:
        os.makedirs(keep, exist_ok=True)
    proc = subprocess.run(['unshare', '-m', 'sh', '-c', script, 'sh', *cmd], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 99, proc.stderr
    return proc


@needs_mount
def test_read_only_output_fails_before_training(split, tmp_path):
    ro = tmp_path / 'ro'
    proc = in_namespace(ro, 'ro', launch(stage1_args(split, ro / 'out', 1), launcher='python'))
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == [f'error: output folder {ro}/out/sub-dataset0 is not writable: '
                                        f'Read-only file system'], proc.stderr
    assert 'division 0:' not in proc.stdout and 'epoch' not in proc.stdout  # nothing was built or trained


def test_read_only_output_message_in_process(tmp_path, monkeypatch):
    """The same check without a mount: the probe file cannot be created (as on a read-only disk)."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(fileio.tempfile, 'mkstemp', read_only)
    args = cli.parse_args(train_subdata.get_parser(), [])
    with pytest.raises(UsageError, match='is not writable: Read-only file system'):
        engine.check_output_dir(args, str(tmp_path / 'out'))


@needs_mount
def test_disk_full_keeps_the_last_good_checkpoints(split, tmp_path):
    # The size of one checkpoint of this run, from the same run in this process (world size 1, as below).
    with one_thread():
        train_subdata.main(stage1_args(split, tmp_path / 'probe', 1)[1:])
    size = os.path.getsize(tmp_path / 'probe' / 'sub-dataset0' / engine.CHECKPOINT_LAST)
    # room for checkpoint.pth + checkpoint_last.pth of epoch 0, not for the temp file of epoch 1's first save
    full, kept = tmp_path / 'full', tmp_path / 'kept'
    proc = in_namespace(full, f'size={int(2.5 * size)}', launch(stage1_args(split, full / 'out', 3), launcher='python'),
                        keep=kept)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and 'cannot write checkpoint' in lines[0] and 'No space left on device' in lines[0], \
        proc.stderr
    assert 'is kept' in lines[0]
    folder = kept / 'out' / 'sub-dataset0'
    assert [r['epoch'] for r in read_log(folder)] == [0]
    for name in (engine.CHECKPOINT_BEST, engine.CHECKPOINT_LAST):
        assert load(folder / name)['epoch'] == 0
    assert not temp_files(folder)
