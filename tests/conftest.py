"""Shared test fixtures: the repository root on sys.path, the real Fashion-MNIST files, and one DeViT chain trained
for real (split -> teacher -> sub-teachers -> students -> ensemble) that the learning, truth and resume tests share.

``@pytest.mark.slow`` marks tests that are necessary but too slow for every run; CI runs them too
(``pytest -m slow``), a quick local run can leave them out (``pytest -m 'not slow'``).
"""
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: necessary but slow (tens of seconds); CI runs it, '
                                       "`pytest -m 'not slow'` leaves it out")
    # collab.wire ignores this one for itself (an infinity met by its finiteness test); pytest resets the filters
    config.addinivalue_line('filterwarnings', 'ignore:invalid value encountered in dot:RuntimeWarning:collab.wire')


@pytest.fixture(scope='session')
def fmnist_root():
    """Debian's dataset-fashion-mnist files; skips (saying how to get them) where they are absent."""
    if not os.path.isfile(os.path.join(FASHION_MNIST, 'train-images-idx3-ubyte.gz')):
        pytest.skip(f'Fashion-MNIST not in {FASHION_MNIST}: apt-get install dataset-fashion-mnist')
    return FASHION_MNIST


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads spinning against other processes cost far more than
    they gain, so each test runs single-threaded (subprocesses get OMP_NUM_THREADS=1 from helpers.env)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# The trained chain: the demo's recipe (demo.sh) at a size that learns on two cores in seconds. Every figure the
# learning tests bound comes from these budgets; change one and re-measure the thresholds in tests/test_learning.py.

CHAIN_TEACHER = 'deit_tiny_distilled_patch16_224'
CHAIN_TEACHER_KW = ['img_size=28', 'patch_size=7', 'in_chans=1', 'embed_dim=64', 'depth=2', 'num_heads=2',
                    'mlp_ratio=2']
CHAIN_STUDENT_KW = ['img_size=28', 'patch_size=7', 'in_chans=1', 'embed_dim=32', 'depth=2', 'num_heads=2',
                    'mlp_ratio=2']
# demo.sh's COMMON, at batch 16 per rank: plain transforms, no mixup/cutmix/smoothing/drop-path, lr not scaled.
CHAIN_RECIPE = ['--dataset', 'fashion_mnist', '--tiny-transforms', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
                '--drop-path', '0', '--unscale-lr', '--warmup-epochs', '0.5', '--min-lr', '1e-5', '--weight-decay',
                '0.05', '--batch-size', '16', '--eval-batch-size', '500', '--no-progress', '--seed', '0']
CHAIN_NPROC = 2  # ranks per stage, under the seed's launcher (torch.distributed.launch --use_env)


@dataclass(frozen=True)
class Chain:
    """Folders of the trained chain, and the exact command of each stage so that a test can rerun one."""
    fmnist: str
    split1: Path
    split4: Path
    teacher: Path  # train_subdata.py output folder: sub-dataset0/ is the 10-class teacher
    stage1: Path
    stage2: Path
    stage3: Path

    @property
    def teacher_ckpt(self) -> Path:
        return self.teacher / 'sub-dataset0' / 'checkpoint.pth'

    def args(self, stage, output_dir, divisions=('--all-divisions',)):
        """argv (script first) of ``stage`` ('teacher', 'stage1', 'stage2', 'stage3') writing to ``output_dir``."""
        teacher = ['--teacher-model', CHAIN_TEACHER, '--teacher-kwargs', *CHAIN_TEACHER_KW]
        out = ['--output_dir', str(output_dir)]
        if stage == 'teacher':  # from scratch, on all 10 classes: 10 epochs of 2,000 images
            return ['train_subdata.py', *CHAIN_RECIPE, '--model', CHAIN_TEACHER, '--model-kwargs', *CHAIN_TEACHER_KW,
                    '--lr', '4e-3', '--warmup-epochs', '1', '--epochs', '10', '--limit-train', '2000',
                    '--limit-val', '1000', '--data-path', str(self.split1), '--num_division', '1',
                    '--start-division', '0', *out]
        if stage == 'stage1':  # the teacher fine-tuned on each division: 2 epochs of 1,000 images
            return ['train_subdata.py', *CHAIN_RECIPE, '--model', CHAIN_TEACHER, '--model-kwargs', *CHAIN_TEACHER_KW,
                    '--model-path', str(self.teacher_ckpt), '--lr', '5e-4', '--epochs', '2', '--limit-train', '1000',
                    '--limit-val', '500', '--data-path', str(self.split4), *divisions, *out]
        if stage == 'stage2':  # a dedeit student per division from its sub-teacher: 5 epochs of 1,000 images
            return ['distill_sub.py', *CHAIN_RECIPE, '--model', 'dedeit', '--model-kwargs', *CHAIN_STUDENT_KW,
                    '--model-ema', *teacher, '--teacher-path', str(self.stage1), '--distillation-type', 'hard',
                    '--gama', '0.2', '0.1', '0.3', '--lr', '4e-3', '--epochs', '5', '--limit-train', '1000',
                    '--limit-val', '500', '--data-path', str(self.split4), *divisions, *out]
        if stage == 'stage3':  # the 4 students + head against the full teacher: 4 epochs of 2,000 images
            return ['ensemble.py', *CHAIN_RECIPE, '--model', 'dedeit', '--model-path', str(self.stage2),
                    '--model-ema', *teacher, '--teacher-path', str(self.teacher_ckpt), '--lr', '3e-3', '--epochs',
                    '4', '--limit-train', '2000', '--limit-val', '1000', '--data-path', self.fmnist,
                    '--num_division', '4', *out]
        raise ValueError(stage)


@pytest.fixture(scope='session')
def trained_chain(tmp_path_factory, fmnist_root):
    """split -> teacher (from scratch) -> stage 1 -> stage 2 -> stage 3 (--eval-missing), each training stage a real
    run under ``torch.distributed.launch --use_env`` with 2 ranks; built once per session."""
    from helpers import launch_cmd, run

    import splite_dataset

    base = tmp_path_factory.mktemp('chain')
    chain = Chain(fmnist_root, base / 'split1', base / 'split4', base / 'teacher', base / 'stage1', base / 'stage2',
                  base / 'stage3')
    for n, folder in ((1, chain.split1), (4, chain.split4)):
        assert splite_dataset.main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division',
                                    str(n), '--output_path', str(folder)]) == 0
    for stage in ('teacher', 'stage1', 'stage2', 'stage3'):
        extra = ['--eval-missing'] if stage == 'stage3' else []
        run(launch_cmd(*chain.args(stage, getattr(chain, stage)), *extra, nproc=CHAIN_NPROC), timeout=600)
    return chain
