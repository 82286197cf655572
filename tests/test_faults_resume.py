"""Kill and resume: a stage-1 and a stage-2 run under ``torch.distributed.launch --nproc_per_node=2`` are SIGKILLed
(the launcher's whole process group) in the middle of an epoch, then rerun with ``--resume .../checkpoint_last.pth``
(stage 1) or ``--auto-resume`` (stage 2). They must end exactly where an uninterrupted run ends: same epochs, same
optimizer step count, same weights; and no kill, not even one inside ``utils.save_checkpoint``, may leave a
checkpoint that does not load. Stages 2 and 3 of the trained chain (tests/conftest.py) lose a rank to a crash in the
middle of an epoch and, resumed, end with the weights of the chain's own uninterrupted runs.
"""
import glob
import os
import signal
import sys
import time

import pytest
import torch
from faults import (
    BATCH,
    TRAIN,
    kill_group,
    launch,
    load,
    make_split,
    read_log,
    read_text,
    stage1_args,
    stage2_args,
    start,
    temp_files,
    wait_exit,
    wait_for_text,
    wait_gone,
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
    kill_group(proc)  # the launcher's process group; its ranks live in sessions of their own ...
    assert proc.returncode == -signal.SIGKILL
    assert not wait_gone(str(out)), 'ranks outlived their SIGKILLed launcher'  # ... and follow it (utils)
    folder = out / 'sub-dataset0'
    assert [r['epoch'] for r in read_log(folder)] == [0], 'the kill did not land in epoch 1'
    for name in (engine.CHECKPOINT_LAST, engine.CHECKPOINT_BEST):  # the last finished epoch, intact
        assert load(folder / name)['epoch'] == 0
    return folder


def assert_complete(resumed):
    """Every epoch once, and as many optimizer steps as an uninterrupted run makes (EPOCHS x STEPS)."""
    log = read_log(resumed)
    assert [r['epoch'] for r in log] == list(range(EPOCHS))
    assert [r['num_updates'] for r in log] == [STEPS * (e + 1) for e in range(EPOCHS)]
    state = load(resumed / engine.CHECKPOINT_LAST)
    assert state['epoch'] == EPOCHS - 1 and state['num_updates'] == EPOCHS * STEPS
    assert {int(s['step']) for s in state['optimizer']['state'].values()} == {EPOCHS * STEPS}
    assert load(resumed / engine.CHECKPOINT_BEST)['best_acc1'] == state['best_acc1']
    assert not temp_files(resumed)


def assert_same_run(resumed, full):
    assert_complete(resumed)
    log_resumed, log_full = read_log(resumed), read_log(full)
    assert [r['num_updates'] for r in log_resumed] == [r['num_updates'] for r in log_full]
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


@pytest.mark.slow
def test_stage1_killed_mid_epoch_resumes_with_resume_flag(split, stage1_full, tmp_path):
    out = tmp_path / 'stage1'
    folder = kill_mid_epoch(stage1_args(split, out, EPOCHS), out, tmp_path)
    proc = run(launch(stage1_args(split, out, EPOCHS, '--resume', str(folder / engine.CHECKPOINT_LAST))))
    assert 'resumed from' in proc.stdout and 'epoch 1' in proc.stdout
    assert_same_run(folder, stage1_full / 'sub-dataset0')


@pytest.mark.slow
def test_stage2_killed_mid_epoch_resumes_with_auto_resume(split, stage1_full, tmp_path):
    """As stage 1, less the uninterrupted twin run (launcher start-ups dominate this suite's time): the counts an
    uninterrupted run reaches are EPOCHS x STEPS, and stage 1 shows that resumed weights equal a twin's."""
    out = tmp_path / 'stage2'
    folder = kill_mid_epoch(stage2_args(split, stage1_full, out, EPOCHS), out, tmp_path)
    proc = run(launch(stage2_args(split, stage1_full, out, EPOCHS, '--auto-resume')))
    assert f'resumed from {folder / engine.CHECKPOINT_LAST}: epoch 1' in proc.stdout
    assert_complete(folder)
    assert load(folder / engine.CHECKPOINT_BEST)['stage'] == 2


# ---------------------------------------------------------------------------------------------------------------
# The trained chain's stages 2 and 3 (5 and 4 epochs, --model-ema, 2 ranks): rank 1 is SIGKILLed (DEVIT_FAULT=crash,
# as an OOM kill) in the middle of epoch 2, the launcher ends the run, and a rerun with --auto-resume must end with
# the weights, EMA weights, optimizer state and per-epoch figures of the chain's uninterrupted run.

def crash_then_resume(args, folder, steps_per_epoch, tmp_path):
    crash_at = 2 * steps_per_epoch + steps_per_epoch // 2
    output = tmp_path / 'crashed.out'
    proc = start(launch(args), output, fault=f'crash@{crash_at}:1')
    assert wait_exit(proc, 600) != 0
    assert f'fault injected: crash at global step {crash_at}' in read_text(output)
    assert not wait_gone(str(folder)), 'ranks outlived the crashed run'
    assert [r['epoch'] for r in read_log(folder)] == [0, 1], 'the crash did not land in epoch 2'
    assert load(folder / engine.CHECKPOINT_LAST)['epoch'] == 1
    proc = run(launch([*args, '--auto-resume']), timeout=600)
    assert f'resumed from {folder / engine.CHECKPOINT_LAST}: epoch 2' in proc.stdout


def assert_same_as_uninterrupted(resumed, full):
    log_resumed, log_full = read_log(resumed), read_log(full)
    keys = ('epoch', 'num_updates', 'train_loss', 'test_acc1', 'test_ema_acc1', 'best_acc1')
    assert [[r[k] for k in keys] for r in log_resumed] == [[r[k] for k in keys] for r in log_full]
    a, b = load(full / engine.CHECKPOINT_LAST), load(resumed / engine.CHECKPOINT_LAST)
    assert a['epoch'] == b['epoch'] and a['num_updates'] == b['num_updates']
    for part in ('model', 'model_ema'):
        assert a[part].keys() == b[part].keys()
        for name, tensor in a[part].items():
            torch.testing.assert_close(b[part][name], tensor, rtol=0, atol=0, msg=f'{part} {name}')
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for key, state in a['optimizer']['state'].items():
        for name, value in state.items():
            torch.testing.assert_close(b['optimizer']['state'][key][name], value, rtol=0, atol=0,
                                       msg=f'optimizer state {key} {name}')
    assert load(resumed / engine.CHECKPOINT_BEST)['epoch'] == load(full / engine.CHECKPOINT_BEST)['epoch']
    assert not temp_files(resumed)


@pytest.mark.slow
def test_stage2_crashed_rank_resumes_to_the_uninterrupted_weights(trained_chain, tmp_path):
    """Division 0 alone (--start-division 0) against division 0 of the chain's --all-divisions run: a division's
    training does not depend on the divisions trained before it in the same call."""
    out = tmp_path / 'stage2'
    args = trained_chain.args('stage2', out, divisions=('--start-division', '0'))
    full = trained_chain.stage2 / 'sub-dataset0'
    crash_then_resume(args, out / 'sub-dataset0', read_log(full)[0]['num_updates'], tmp_path)
    assert_same_as_uninterrupted(out / 'sub-dataset0', full)
    assert load(out / 'sub-dataset0' / engine.CHECKPOINT_LAST)['stage'] == 2


@pytest.mark.slow
def test_stage3_crashed_rank_resumes_to_the_uninterrupted_weights(trained_chain, tmp_path):
    out = tmp_path / 'stage3'
    args = trained_chain.args('stage3', out)
    crash_then_resume(args, out, read_log(trained_chain.stage3)[0]['num_updates'], tmp_path)
    assert_same_as_uninterrupted(out, trained_chain.stage3)
    assert load(out / engine.CHECKPOINT_LAST)['stage'] == 3


# ---------------------------------------------------------------------------------------------------------------
# A kill inside utils.save_checkpoint: a writer process saves 16 MB checkpoints in a loop, each write slowed down
# halfway through its data, and is SIGKILLed in the middle of its third save.

WRITER = """
import sys, time, types
import torch
# utils.save_checkpoint needs torch only: stand in for models.checkpoint to spare the writer timm's import time
sys.modules['models'] = types.ModuleType('models')
sys.modules['models.checkpoint'] = types.SimpleNamespace(checkpoint_info=None)
import utils

class HalfThenWait:  # the file torch.save writes to: half of each big record, a pause, then the rest
    def __init__(self, f):
        self.f = f
    def write(self, data):
        data = memoryview(data)
        if len(data) > 1_000_000:
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            time.sleep(2)
            data = data[len(data) // 2:]
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)

real_save = torch.save
torch.save = lambda obj, f, *a, **k: real_save(obj, HalfThenWait(f), *a, **k)
for version in range(1, 100):
    print('writing', version, flush=True)
    utils.save_checkpoint({'version': version, 'model': {'w': torch.full((4_000_000,), float(version))}}, sys.argv[1])
    print('saved', version, flush=True)
"""


def test_kill_inside_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / engine.CHECKPOINT_BEST
    output = tmp_path / 'writer.out'
    proc = start([sys.executable, '-c', WRITER, str(path)], output)
    wait_for_text(proc, output, 'writing 3', timeout=120)
    time.sleep(0.5)  # well inside the 2 s pause: half of the third checkpoint is on disk
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL and 'saved 3' not in output.read_text()
    state = load(path)  # the previous checkpoint, whole
    assert state['version'] == 2 and torch.equal(state['model']['w'], torch.full((4_000_000,), 2.0))
    stale = temp_files(tmp_path)
    assert len(stale) == 1 and os.path.getsize(stale[0]) > 4_000_000  # the half-written one: a hidden temp file
    assert sorted(os.listdir(tmp_path)) == sorted([engine.CHECKPOINT_BEST, os.path.basename(stale[0]), 'writer.out'])
    assert glob.glob(str(tmp_path / '*.pth*')) == [str(path)]  # nothing a glob or a resume could mistake
    assert utils.remove_stale_temp_files(str(tmp_path), [engine.CHECKPOINT_BEST]) == stale  # what fit does first
    assert not temp_files(tmp_path)
