"""Shared test fixtures: the repository root on sys.path and the real Fashion-MNIST files."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


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
