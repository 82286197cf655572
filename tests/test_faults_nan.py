"""Non-finite training: a NaN loss stops the run with one line naming the epoch and step, and the checkpoints of the
last good epoch stay as they were; weights that turn non-finite with a finite loss are never saved either."""
import time

import pytest
import torch
from faults import (
    error_lines,
    launch,
    load,
    make_split,
    one_thread,
    read_log,
    stage1_args,
    start,
    temp_files,
    wait_exit,
)
from helpers import TEACHER, TEACHER_KW, TINY
from torch.utils.data import TensorDataset

import cli
import engine
import train_subdata
import utils
from losses import build_base_criterion
from models import factory


@pytest.fixture(scope='module')
def split(tmp_path_factory, fmnist_root):
    return make_split(tmp_path_factory.mktemp('nan') / 'split4', fmnist_root)


def assert_good_epoch0(folder):
    assert [r['epoch'] for r in read_log(folder)] == [0]
    for name in (engine.CHECKPOINT_LAST, engine.CHECKPOINT_BEST):
        state = load(folder / name)
        assert state['epoch'] == 0
        for weights in (state['model'], state['model_ema']):
            assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert not temp_files(folder)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_checkpoints(split, tmp_path):
    out, output = tmp_path / 'run', tmp_path / 'run.out'
    # 4 steps an epoch with 2 ranks: global step 6 is epoch 1, step 2
    proc = start(launch(stage1_args(split, out, 3)), output, fault='nan@6')
    started = time.time()
    code = wait_exit(proc, 240)
    text = output.read_text()
    assert code != 0, text
    lines = error_lines(text)
    assert lines and 'loss is nan at epoch 1 step 2 (global step 6)' in lines[0], text
    assert 'last good checkpoint is kept' in lines[0]
    assert time.time() - started < 240
    assert_good_epoch0(out / 'sub-dataset0')


class _Data(TensorDataset):
    def __init__(self, n, classes):
        g = torch.Generator().manual_seed(n)
        self.targets = torch.randint(0, classes, (n,), generator=g)
        super().__init__(torch.randn(n, 1, 28, 28, generator=g), self.targets)


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """A finite loss whose update makes a weight Inf (as an fp16 overflow can): fit stops before saving epoch 1."""
    args = cli.parse_args(train_subdata.get_parser(), [*TINY, '--model', TEACHER, '--model-kwargs', *TEACHER_KW,
                                                       '--epochs', '3', '--model-ema', '--device', 'cpu'])
    utils.init_distributed(args)
    model = factory.create_model(args.model, 3, args.model_kwargs)
    task = engine.SupervisedTask(model, build_base_criterion(False, 0.0))
    real = engine.train_one_epoch

    def poisoned(task, loader, optimizer, epoch, **kwargs):
        stats = real(task, loader, optimizer, epoch, **kwargs)
        if epoch == 1:
            with torch.no_grad():
                task.model.head.weight[0, 0] = float('inf')
        return stats
    monkeypatch.setattr(engine, 'train_one_epoch', poisoned)
    with one_thread(), pytest.raises(FloatingPointError,
                                     match=r'model weights became non-finite in epoch 1 \(head.weight\)'):
        engine.fit(args, task, _Data(64, 3), _Data(32, 3), str(tmp_path), num_classes=3)
    assert_good_epoch0(tmp_path)
