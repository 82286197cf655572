"""splite_dataset.py: class-disjoint, complete, deterministic splits that build_dataset reads back; clear failures."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_datasets import labels_match_images, write_cars, write_cifar100, write_flowers, write_image_folder

import splite_dataset
from datasets import DatasetError, build_dataset
from splite_dataset import main, plan_groups, split_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leftovers(path) -> list:
    """Everything named after the output folder beside it: the folder itself and any temp/trash dirs."""
    parent, base = os.path.split(str(path))
    return sorted(n for n in os.listdir(parent) if n == base or n.startswith(f'.{base}.'))


# --- Fashion-MNIST (real files) -----------------------------------------------------------------------------------

def test_fashion_mnist_split_is_disjoint_complete_and_counted(fmnist_root, tmp_path):
    m = split_dataset('fashion_mnist', fmnist_root, 3, tmp_path / 'out')
    groups = [d['classes'] for d in m['divisions']]
    assert sorted(c for g in groups for c in g) == list(range(10))  # disjoint and complete
    assert [len(g) for g in groups] == [4, 3, 3] and all(g == sorted(g) for g in groups)
    on_disk = json.loads((tmp_path / 'out' / 'split.json').read_text())
    assert on_disk['storage'] == 'indices' and on_disk['num_classes'] == 10 and on_disk['source_path'] == fmnist_root
    assert on_disk['divisions'] == m['divisions']
    full = build_dataset('fashion_mnist', fmnist_root, 'train', tiny=True)
    for d in m['divisions']:
        assert (d['train_count'], d['val_count']) == (6000 * len(d['classes']), 1000 * len(d['classes']))
        assert d['local_to_global'] == d['classes'] and d['path'] == f'sub-dataset{d["index"]}'
        sub = build_dataset('fashion_mnist', tmp_path / 'out', 'train', division=d['index'], tiny=True)
        val = build_dataset('fashion_mnist', tmp_path / 'out', 'val', division=d['index'], tiny=True, in_chans=1)
        assert (len(sub), len(val)) == (d['train_count'], d['val_count']) and val[0][0].shape == (1, 28, 28)
        assert sub.local_to_global == d['classes'] and sub.num_classes == len(d['classes'])
        assert sorted(set(sub.targets.tolist())) == list(range(len(d['classes'])))
        rows = json.loads((tmp_path / 'out' / d['path'] / 'indices.json').read_text())['train']
        assert np.array_equal(np.asarray(d['classes'])[sub.targets], full.targets[rows])
        assert sub.class_names == [full.class_names[c] for c in d['classes']]
    # division=None on a split folder is the whole source dataset, global labels
    assert len(build_dataset('fashion_mnist', tmp_path / 'out', 'val', tiny=True)) == 10000


def test_seeds_and_uneven_groups(fmnist_root, tmp_path):
    a = split_dataset('fashion_mnist', fmnist_root, 2, tmp_path / 'a', seed=7)
    b = split_dataset('fashion_mnist', fmnist_root, 2, tmp_path / 'b', seed=7)
    c = split_dataset('fashion_mnist', fmnist_root, 2, tmp_path / 'c', seed=8)
    assert a['divisions'] == b['divisions'] and a['divisions'] != c['divisions']
    m = split_dataset('fashion_mnist', fmnist_root, 3, tmp_path / 'u', sub_classes=[2, 3, 5])
    assert [len(d['classes']) for d in m['divisions']] == [2, 3, 5]
    assert [d['train_count'] for d in m['divisions']] == [12000, 18000, 30000]
    one = split_dataset('fashion_mnist', fmnist_root, 1, tmp_path / 'one')
    assert one['divisions'][0]['classes'] == list(range(10))  # one division labels classes as the full dataset


def test_plan_groups():
    assert plan_groups(10, 4) == plan_groups(10, 4, seed=0)
    assert [len(g) for g in plan_groups(10, 4)] == [3, 3, 2, 2]
    assert [len(g) for g in plan_groups(100, 4, [10, 20, 30, 40], seed=3)] == [10, 20, 30, 40]
    assert sorted(c for g in plan_groups(1000, 7, seed=5) for c in g) == list(range(1000))


# --- ImageFolder: hard links ------------------------------------------------------------------------------------

def test_image_folder_split_hard_links_and_reads_back(tmp_path):
    names = [str(k) for k in range(1, 13)]  # '10' must not sort before '2'
    src = write_image_folder(tmp_path / 'data', names, n_train=2, n_val=1)
    m = split_dataset('folder', src, 3, tmp_path / 'out', seed=1)
    assert m['storage'] == 'files' and m['link_mode'] == 'hardlink'
    assert sorted(c for d in m['divisions'] for c in d['classes']) == list(range(12))
    for d in m['divisions']:
        assert d['class_names'] == [names[c] for c in d['classes']]
        sub = tmp_path / 'out' / d['path']
        for name in d['class_names']:
            for split, n in (('train', 2), ('val', 1)):
                for i in range(n):
                    linked, orig = sub / split / name / f'{i}.png', tmp_path / 'data' / split / name / f'{i}.png'
                    assert os.stat(linked).st_ino == os.stat(orig).st_ino
        for split in ('train', 'val'):
            ds = build_dataset('folder', tmp_path / 'out', split, division=d['index'], tiny=True, input_size=8)
            assert ds.local_to_global == d['classes'] and ds.class_names == d['class_names']
            assert len(ds) == len(d['classes']) * (2 if split == 'train' else 1) == d[f'{split}_count']
            assert labels_match_images(ds)  # image of global class g has label local_to_global.index(g)
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.out.')]


def test_copy_mode_and_cross_device_fallback(tmp_path, monkeypatch):
    src = write_image_folder(tmp_path / 'data', ['a', 'b', 'c'], n_train=1, n_val=1)
    orig = tmp_path / 'data' / 'train' / 'a' / '0.png'
    m = split_dataset('folder', src, 1, tmp_path / 'copy', link_mode='copy')
    assert m['link_mode'] == 'copy' and m['stats']['bytes_copied'] == 6 * orig.stat().st_size
    assert os.stat(tmp_path / 'copy' / 'sub-dataset0' / 'train' / 'a' / '0.png').st_ino != orig.stat().st_ino

    def cross_device(a, b):
        raise OSError(errno.EXDEV, 'Invalid cross-device link')
    monkeypatch.setattr(splite_dataset.os, 'link', cross_device)
    m = split_dataset('folder', src, 1, tmp_path / 'xdev')
    assert m['link_mode'] == 'copy'
    assert json.loads((tmp_path / 'xdev' / 'split.json').read_text())['link_mode'] == 'copy'
    assert len(build_dataset('folder', tmp_path / 'xdev', 'train', division=0, tiny=True)) == 3


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, capsys):
    src = write_image_folder(tmp_path / 'data', ['a', 'b'], n_train=1, n_val=1)

    def disk_full(a, b):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(splite_dataset.os, 'link', disk_full)
    assert main(['--dataset', 'folder', '--data_path', src, '--num_division', '2', '--output_path',
                 str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'No space left' in err and err.count('\n') == 1
    assert leftovers(tmp_path / 'out') == []


def test_overwrite_replaces_output(tmp_path, fmnist_root):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'stale.txt').write_text('x')
    assert main(['--dataset', 'fashion_mnist', '--data-path', fmnist_root, '--num_division', '2',
                 '--output-path', str(out), '--overwrite', '--seed', '3']) == 0
    assert sorted(os.listdir(out)) == ['split.json', 'sub-dataset0', 'sub-dataset1']
    assert leftovers(out) == ['out']
    empty = tmp_path / 'empty'
    empty.mkdir()  # an empty output folder is fine without --overwrite
    assert main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '1', '--output_path',
                 str(empty)]) == 0


@pytest.mark.parametrize('name,writer,n_train', [('cifar100', lambda p: write_cifar100(p, num_classes=12), 24),
                                                  ('flowers', write_flowers, 6), ('cars', write_cars, 4)])
def test_array_and_annotation_formats_split_as_index_lists(tmp_path, name, writer, n_train):
    src = writer(tmp_path / 'src')
    m = split_dataset(name, src, 2, tmp_path / 'out', seed=4)
    assert m['storage'] == 'indices' and m['link_mode'] is None
    assert sum(d['train_count'] for d in m['divisions']) == n_train
    for d in m['divisions']:
        assert os.listdir(tmp_path / 'out' / d['path']) == ['indices.json']
        for split in ('train', 'val'):
            ds = build_dataset(name, tmp_path / 'out', split, division=d['index'], tiny=True, input_size=8)
            assert len(ds) == d[f'{split}_count'] and ds.local_to_global == d['classes'] and labels_match_images(ds)


# --- the seed's own command, as a subprocess --------------------------------------------------------------------

def test_seed_command_verbatim(tmp_path, monkeypatch):
    write_cifar100(tmp_path / 'your_datasets', num_classes=100)
    cmd = [sys.executable, os.path.join(ROOT, 'splite_dataset.py'), '--dataset', 'cifar100', '--data_path',
           './your_datasets', '--num_division', '4', '--output_path', './sub_datasets']
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 5 and 'sub-dataset3:   25 classes, train      50' in r.stdout
    m = json.loads((tmp_path / 'sub_datasets' / 'split.json').read_text())
    assert m['dataset'] == 'cifar100' and [len(d['classes']) for d in m['divisions']] == [25] * 4
    monkeypatch.chdir(tmp_path)  # stage 1 gets the same relative path
    ds = build_dataset('cifar100', './sub_datasets', 'train', division=2, tiny=True)
    assert len(ds) == 50 and ds.num_classes == 25 and ds[0][0].shape == (3, 32, 32)
    assert ds.local_to_global == m['divisions'][2]['classes']


# --- bad input: exit 2, one `error:` line naming the problem, no output folder ----------------------------------

def _bad_cases(tmp, fm):
    folder = write_image_folder(tmp / 'imgs', ['x', 'y'], n_train=1, n_val=1)
    (tmp / 'imgs' / 'val' / 'y' / '0.png').write_bytes(b'not an image')
    (tmp / 'full').mkdir()
    (tmp / 'full' / 'keep.txt').write_text('mine')
    return {
        'missing data_path': (['--dataset', 'fashion_mnist', '--data_path', str(tmp / 'nowhere'), '--num_division',
                               '2'], 'nowhere does not exist'),
        'unknown dataset': (['--dataset', 'mnist', '--data_path', fm, '--num_division', '2'],
                            "unknown dataset 'mnist'"),
        'too many divisions': (['--dataset', 'fashion_mnist', '--data_path', fm, '--num_division', '11'],
                               '--num_division 11 exceeds the 10 classes'),
        'zero divisions': (['--dataset', 'fashion_mnist', '--data_path', fm, '--num_division', '0'], 'at least 1'),
        'sub_classes sum': (['--dataset', 'fashion_mnist', '--data_path', fm, '--num_division', '2', '--sub_classes',
                             '3', '4'], 'sum to 7 but the dataset has 10 classes'),
        'sub_classes length': (['--dataset', 'fashion_mnist', '--data_path', fm, '--num_division', '2',
                                '--sub_classes', '2', '3', '5'], 'has 3 sizes but --num_division is 2'),
        'unreadable image': (['--dataset', 'folder', '--data_path', folder, '--num_division', '2'],
                             f'cannot read image {tmp / "imgs" / "val" / "y" / "0.png"}'),
        'missing flag': (['--dataset', 'fashion_mnist', '--data_path', fm], 'required: --num_division'),
        'non-empty output': (['--dataset', 'fashion_mnist', '--data_path', fm, '--num_division', '2',
                              '--output_path', str(tmp / 'full')], 'is not empty; pass --overwrite'),
    }


@pytest.mark.parametrize('case', ['missing data_path', 'unknown dataset', 'too many divisions', 'zero divisions',
                                  'sub_classes sum', 'sub_classes length', 'unreadable image', 'missing flag',
                                  'non-empty output'])
def test_bad_input(case, tmp_path, fmnist_root, capsys):
    argv, expected = _bad_cases(tmp_path, fmnist_root)[case]
    out = tmp_path / 'out'
    if '--output_path' not in argv:
        argv = [*argv, '--output_path', str(out)]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count('\n') == 1 and err.startswith('error: ') and expected in err, err
    assert leftovers(out) == []
    assert os.listdir(tmp_path / 'full') == ['keep.txt']
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]


def test_bad_input_subprocess(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'splite_dataset.py'), '--dataset', 'cifar100',
                        '--data_path', str(tmp_path / 'none'), '--num_division', '4', '--output_path',
                        str(tmp_path / 'out')], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.startswith('error: ') and r.stderr.count('\n') == 1, r.stderr
    assert not os.path.exists(tmp_path / 'out')


def test_reading_a_split_checks_name_division_and_count(tmp_path, fmnist_root):
    from types import SimpleNamespace
    split_dataset('fashion_mnist', fmnist_root, 2, tmp_path / 'out')
    with pytest.raises(DatasetError, match='is a split of fashion_mnist, not cifar100'):
        build_dataset('cifar100', tmp_path / 'out', 'train', division=0)
    with pytest.raises(DatasetError, match='division 2 is out of range'):
        build_dataset('fashion_mnist', tmp_path / 'out', 'train', division=2)
    with pytest.raises(DatasetError, match='has 2 divisions but --num_division is 4'):
        build_dataset('fashion_mnist', tmp_path / 'out', 'train', division=0, args=SimpleNamespace(num_division=4))
