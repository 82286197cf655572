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
