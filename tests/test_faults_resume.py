"""Kill and resume: a stage-1 and a stage-2 run under ``torch.distributed.launch --nproc_per_node=2`` are SIGKILLed
(the launcher's whole process group) in the middle of an epoch, then rerun with ``--resume .../checkpoint_last.pth``
(stage 1) or ``--auto-resume`` (stage 2). They must end exactly where an uninterrupted run ends: same epochs, same
optimizer step count, same weights; and no kill, not even one inside ``utils.save_checkpoint``, may leave a
checkpoint that does not load.
"""
import os
import random
import signal
import time

import pytest
import torch
from faults import (
    BATCH,
    TRAIN,
    digest,
    kill_group,
    launch,
    load,
    make_split,
    read_log,
    stage1_args,
    stage2_args,
    start,
    temp_files,
    wait_for_text,
)
from helpers import run

import engine
import utils

EPOCHS = 3
STEPS = TRAIN // (2 * BATCH)  # optimizer steps per epoch with 2 ranks
KILL_AT = STEPS + STEPS // 2  # a global step in the middle of epoch 1


@pytest.fixture(scope='module')
def split(tmp_path_factory, fmnist_root):
    return make_split(tmp_path_factory.mktemp('resume') / 'split4', fmnist_root)


def kill_mid_epoch(args, out, tmp_path):
    """Run ``args`` under the launcher until every rank stands at global step KILL_AT, then SIGKILL the group."""
    output = tmp_path / 'killed.out'
    proc = start(launch(args), output, fault=f'hang@{KILL_AT}')
    wait_for_text(proc, output, 'fault injected: hang')
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    folder = out / 'sub-dataset0'
    assert [r['epoch'] for r in read_log(folder)] == [0], 'the kill did not land in epoch 1'
    for name in (engine.CHECKPOINT_LAST, engine.CHECKPOINT_BEST):  # the last finished epoch, intact
        assert load(folder / name)['epoch'] == 0
    return folder


def assert_same_run(resumed, full):
    log_resumed, log_full = read_log(resumed), read_log(full)
    assert [r['epoch'] for r in log_resumed] == [r['epoch'] for r in log_full] == list(range(EPOCHS))
    assert log_resumed[-1]['num_updates'] == log_full[-1]['num_updates'] == EPOCHS * STEPS
    a, b = load(full / engine.CHECKPOINT_LAST), load(resumed / engine.CHECKPOINT_LAST)
    assert a['epoch'] == b['epoch'] == EPOCHS - 1
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for key, state in a['optimizer']['state'].items():
        assert int(state['step']) == int(b['optimizer']['state'][key]['step']) == EPOCHS * STEPS
    for name, tensor in a['model'].items():
        torch.testing.assert_close(b['model'][name], tensor, msg=name)
    for name, tensor in a['model_ema'].items():
        torch.testing.assert_close(b['model_ema'][name], tensor, msg=name)
    assert log_resumed[-1]['test_acc1'] == pytest.approx(log_full[-1]['test_acc1'])
    assert load(resumed / engine.CHECKPOINT_BEST)['best_acc1'] == a['best_acc1']
    assert not temp_files(resumed)


@pytest.fixture(scope='module')
def stage1_full(split, tmp_path_factory):
    out = tmp_path_factory.mktemp('stage1_full')
    run(launch(stage1_args(split, out, EPOCHS)))
    return out


def test_stage1_killed_mid_epoch_resumes_with_resume_flag(split, stage1_full, tmp_path):
    out = tmp_path / 'stage1'
    folder = kill_mid_epoch(stage1_args(split, out, EPOCHS), out, tmp_path)
    proc = run(launch(stage1_args(split, out, EPOCHS, '--resume', str(folder / engine.CHECKPOINT_LAST))))
    assert 'resumed from' in proc.stdout and 'epoch 1' in proc.stdout
    assert_same_run(folder, stage1_full / 'sub-dataset0')


def test_stage2_killed_mid_epoch_resumes_with_auto_resume(split, stage1_full, tmp_path):
    full = tmp_path / 'stage2_full'
    run(launch(stage2_args(split, stage1_full, full, EPOCHS)))
    out = tmp_path / 'stage2'
    folder = kill_mid_epoch(stage2_args(split, stage1_full, out, EPOCHS), out, tmp_path)
    run(launch(stage2_args(split, stage1_full, out, EPOCHS, '--auto-resume')))
    assert_same_run(folder, full / 'sub-dataset0')
    assert load(folder / engine.CHECKPOINT_BEST)['stage'] == 2


# ---------------------------------------------------------------------------------------------------------------
# A kill inside utils.save_checkpoint. The writer is a forked copy of this process (no interpreter start-up cost)
# that is SIGKILLed while torch.save is writing.

def _forked(child):
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            child()
        finally:
            os._exit(0)
    return pid


def _blob(version, size=4_000_000):
    return {'version': version, 'model': {'w': torch.full((size,), float(version))}, 'epoch': version}


def test_kill_inside_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / engine.CHECKPOINT_BEST
    utils.save_checkpoint(_blob(1, 1000), path)
    before = digest(path)

    def die_while_writing():
        def torch_save(obj, f, *args, **kwargs):  # half a checkpoint reaches the disk, then the kill
            f.write(b'PK\x03\x04' + b'\0' * 100_000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = torch_save
        utils.save_checkpoint(_blob(2, 1000), path)

    _, status = os.waitpid(_forked(die_while_writing), 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert digest(path) == before and load(path)['version'] == 1
    stale = temp_files(tmp_path)
    assert len(stale) == 1 and os.path.getsize(stale[0]) > 100_000  # the half-written file is only a hidden temp
    assert sorted(os.listdir(tmp_path)) == sorted([engine.CHECKPOINT_BEST, os.path.basename(stale[0])])
    assert engine.resume_path(utils.get_args_parser().parse_args(['--auto-resume']), str(tmp_path)) is None
    assert utils.remove_stale_temp_files(str(tmp_path), [engine.CHECKPOINT_BEST]) == stale  # fit does this at start
    assert os.listdir(tmp_path) == [engine.CHECKPOINT_BEST]


def test_kill_at_random_moments_of_repeated_saves(tmp_path):
    """A writer saving 16 MB checkpoints in a loop is killed at seeded random moments: the file always loads, whole."""
    path = tmp_path / engine.CHECKPOINT_LAST
    rng = random.Random(0)
    version = 0
    for _ in range(3):
        read, write = os.pipe()

        def save_forever(start=version + 1, write=write):
            for v in range(start, start + 1000):
                utils.save_checkpoint(_blob(v), path)
                os.write(write, b'.')

        pid = _forked(save_forever)
        os.close(write)
        saved = os.read(read, 1)  # one full save has happened
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while chunk := os.read(read, 64):
            saved += chunk
        os.close(read)
        state = load(path)
        assert state['version'] >= version + len(saved)  # the newest completed save, or one later
        assert torch.equal(state['model']['w'], torch.full((4_000_000,), float(state['version'])))
        version = state['version']
        utils.remove_stale_temp_files(str(tmp_path), [engine.CHECKPOINT_LAST])
    assert os.listdir(tmp_path) == [engine.CHECKPOINT_LAST]
