"""splite_dataset.py: class-disjoint, complete, deterministic splits that build_dataset reads back; clear failures."""
import errno
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from helpers import env
from test_datasets import labels_match_images, write_cars, write_cifar100, write_flowers, write_image_folder

import grouping
import splite_dataset
from datasets import FASHION_MNIST_CLASSES, build_dataset
from fileio import DatasetError
from splite_dataset import class_groups, main, split_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'splite_dataset.py')


def authors_groups(num_classes, num_division, seed=42):
    """The authors' split, written as they do it: the global `random` module, then floor cuts."""
    random.seed(seed)
    labels = list(range(num_classes))
    random.shuffle(labels)
    cuts = [i * num_classes // num_division for i in range(num_division)] + [num_classes]
    return [sorted(labels[cuts[i]:cuts[i + 1]]) for i in range(num_division)]


def shuffled_cut(num_classes, sizes, seed=42):
    """The global-`random` shuffle cut at cumulative `sizes` (what --sub_classes and --plan sizes mean)."""
    random.seed(seed)
    labels = list(range(num_classes))
    random.shuffle(labels)
    bounds = np.cumsum([0, *sizes])
    return [sorted(labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def leftovers(path) -> list:
    """Everything named after the output folder beside it: the folder itself and any temp/trash dirs."""
    parent, base = os.path.split(str(path))
    return sorted(n for n in os.listdir(parent) if n == base or n.startswith(f'.{base}.'))


# --- Fashion-MNIST (real files) -----------------------------------------------------------------------------------

def test_fashion_mnist_split_is_disjoint_complete_and_counted(fmnist_root, tmp_path):
    m = split_dataset('fashion_mnist', fmnist_root, 3, tmp_path / 'out')
    groups = [d['classes'] for d in m['divisions']]
    assert sorted(c for g in groups for c in g) == list(range(10))  # disjoint and complete
    assert groups == authors_groups(10, 3) and [len(g) for g in groups] == [3, 3, 4]
    on_disk = json.loads((tmp_path / 'out' / 'split.json').read_text())
    assert on_disk['storage'] == 'indices' and on_disk['num_classes'] == 10 and on_disk['source_path'] == fmnist_root
    assert (on_disk['strategy'], on_disk['seed'], on_disk['plan'], on_disk['confusion']) == ('random', 42, None, None)
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
    assert [d['classes'] for d in c['divisions']] == authors_groups(10, 2, seed=8)
    m = split_dataset('fashion_mnist', fmnist_root, 3, tmp_path / 'u', sub_classes=[2, 3, 5])
    assert [d['classes'] for d in m['divisions']] == shuffled_cut(10, [2, 3, 5])
    assert [d['train_count'] for d in m['divisions']] == [12000, 18000, 30000]
    one = split_dataset('fashion_mnist', fmnist_root, 1, tmp_path / 'one')
    assert one['divisions'][0]['classes'] == list(range(10))  # one division labels classes as the full dataset


@pytest.mark.parametrize('num_classes,num_division', [(100, 4), (100, 6), (10, 4)])
def test_authors_groups_reproduced(num_classes, num_division):
    random.seed(1234)
    state = random.getstate()
    groups = class_groups(num_classes, num_division)
    assert random.getstate() == state  # a private generator: the global one is untouched
    assert groups == authors_groups(num_classes, num_division)
    assert grouping.random_groups(range(num_classes), grouping.authors_sizes(num_classes, num_division), 42) == groups
    assert class_groups(num_classes, num_division, seed=7) == authors_groups(num_classes, num_division, seed=7)


def test_group_sizes_and_sub_classes():
    assert [len(g) for g in class_groups(10, 4)] == [2, 3, 2, 3]  # the authors' floors, not larger groups first
    assert class_groups(100, 4, [10, 20, 30, 40], seed=3) == shuffled_cut(100, [10, 20, 30, 40], seed=3)
    assert class_groups(10, 1) == [list(range(10))]
    assert sorted(c for g in class_groups(1000, 7, seed=5) for c in g) == list(range(1000))


# --- confusion strategies ------------------------------------------------------------------------------------

def block_confusion(num_classes, num_blocks, seed=0):
    """Confusion counts where class c is confused (a lot) only with the classes c' = c mod num_blocks, plus faint
    noise everywhere; returns (matrix, blocks)."""
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 3, (num_classes, num_classes))
    blocks = [list(range(b, num_classes, num_blocks)) for b in range(num_blocks)]
    for block in blocks:
        for a in block:
            for b in block:
                if a != b:
                    m[a, b] += rng.integers(40, 100)
    np.fill_diagonal(m, 900)
    return m, blocks


@pytest.mark.parametrize('exact', [True, False])
def test_confusion_strategies_on_block_confusion(exact, monkeypatch):
    if not exact:  # the local search used for many classes, on the same small problems
        monkeypatch.setattr(grouping, 'EXACT_LIMIT', 0)
    m, blocks = block_confusion(12, 3)
    assert sorted(grouping.confusion_groups(m, [4, 4, 4], together=True)) == blocks  # each block one group
    spread = grouping.confusion_groups(m, [3, 3, 3, 3], together=False)
    assert all(sorted(c % 3 for c in g) == [0, 1, 2] for g in spread)  # one class of each block in each group
    assert grouping.within_confusion(m, spread) < 0.05 < 0.95 < grouping.within_confusion(m, sorted(blocks))
    m, blocks = block_confusion(10, 4, seed=1)  # blocks of 3, 3, 2, 2 into the authors' sizes 2, 3, 2, 3
    together = class_groups(10, 4, strategy='confusion-together', confusion=m)
    assert sorted(map(sorted, together)) == sorted(blocks) and [len(g) for g in together] == [2, 3, 2, 3]
    assert together == class_groups(10, 4, strategy='confusion-together', confusion=m.copy())  # deterministic


def test_exact_search_is_optimal_and_local_search_close():
    rng = np.random.default_rng(0)
    for trial in range(6):
        m = rng.exponential(1.0, (9, 9)) ** 3
        sizes = [[3, 3, 3], [2, 3, 4]][trial % 2]
        best = {}
        for together in (True, False):
            g = grouping.confusion_groups(m, sizes, together)
            w = grouping.within_confusion(m, g)
            others = [grouping.within_confusion(m, grouping.random_groups(range(9), sizes, s)) for s in range(200)]
            assert (w >= max(others)) if together else (w <= min(others)), (trial, together)
            best[together] = w
        assert best[True] > best[False]


def test_confusion_split_through_the_cli(fmnist_root, tmp_path):
    m, blocks = block_confusion(10, 2)  # {0,2,4,6,8} and {1,3,5,7,9}
    conf = tmp_path / 'confusion.json'
    conf.write_text(json.dumps({'format': 'devit-confusion', 'dataset': 'fashion_mnist', 'classes': 10,
                                'class_names': FASHION_MNIST_CLASSES, 'matrix': m.tolist()}))
    base = ['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--confusion', str(conf)]
    assert main([*base, '--num_division', '5', '--strategy', 'confusion-spread', '--output_path',
                 str(tmp_path / 'spread')]) == 0
    manifest = json.loads((tmp_path / 'spread' / 'split.json').read_text())
    assert all(sorted(c % 2 for c in d['classes']) == [0, 1] for d in manifest['divisions'])
    assert (manifest['strategy'], manifest['confusion']) == ('confusion-spread', str(conf))
    assert manifest['confusion_within'] < 0.05
    assert main([*base, '--num_division', '2', '--strategy', 'confusion-together', '--output_path',
                 str(tmp_path / 'together')]) == 0
    manifest = json.loads((tmp_path / 'together' / 'split.json').read_text())
    assert sorted(d['classes'] for d in manifest['divisions']) == blocks
    ds = build_dataset('fashion_mnist', tmp_path / 'together', 'val', division=1, tiny=True)
    assert ds.local_to_global == manifest['divisions'][1]['classes'] and len(ds) == 5000


BAD_MATRICES = {
    'wrong size': ([[1] * 9 for _ in range(9)], 'is 9x9 but the dataset has 10 classes'),
    'not square': ([[1] * 11] + [[1] * 10 for _ in range(9)], 'is not square: row 0 has 11 entries, expected 10'),
    'negative': ([[-(i == 3 and j == 5) for j in range(10)] for i in range(10)], 'negative entry (-1 at row 3'),
    'NaN': ([[float('nan') if i == j == 2 else 1 for j in range(10)] for i in range(10)], 'non-finite entry (nan'),
    'infinite': ([[float('inf') if (i, j) == (0, 1) else 1 for j in range(10)] for i in range(10)],
                 'non-finite entry (inf at row 0, column 1)'),
    'text': ([['x'] * 10 for _ in range(10)], 'row 0 has an entry that is not a number'),
    'classes field': ({'classes': 12}, 'says "classes": 12 but its matrix is 10x10'),
    'other dataset': ({'dataset': 'cifar100'}, 'is of dataset cifar100, not fashion_mnist'),
}


@pytest.mark.parametrize('case', list(BAD_MATRICES))
def test_bad_confusion_matrices_refused_with_one_line(case, fmnist_root, tmp_path, capsys):
    matrix, expected = BAD_MATRICES[case]
    obj = {'matrix': [[1] * 10 for _ in range(10)], **matrix} if isinstance(matrix, dict) else {'matrix': matrix}
    path = tmp_path / f'{case}.json'
    path.write_text(json.dumps(obj))  # NaN and Infinity as Python's json writes them
    argv = ['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '2', '--strategy',
            'confusion-together', '--confusion', str(path), '--output_path', str(tmp_path / 'out')]
    if case in ('wrong size', 'not square', 'negative', 'NaN'):  # as a process: nothing but the one line
        r = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=120, env=env(),
                           check=False)
        rc, err = r.returncode, r.stderr
    else:
        rc, err = main(argv), capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('error: '), err
    assert expected in lines[0] and str(path) in lines[0], lines[0]
    assert not (tmp_path / 'out').exists()


def test_confusion_flags_misused(fmnist_root, tmp_path, capsys):
    conf = tmp_path / 'c.json'
    conf.write_text(json.dumps({'matrix': np.eye(10, dtype=int).tolist()}))
    base = ['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '2', '--output_path',
            str(tmp_path / 'out')]
    for extra, expected in ((['--strategy', 'confusion-spread'], 'needs a confusion matrix: --confusion'),
                            (['--confusion', str(conf)], 'are used by --strategy confusion-together or'),
                            (['--teacher-path', 'x.pth'], '--teacher-path is used by --strategy'),
                            (['--confusion', str(conf), '--teacher-path', 'x.pth', '--strategy', 'confusion-spread'],
                             'not both')):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith('error: ') and expected in err, (extra, err)
    assert not (tmp_path / 'out').exists()


# --- a confusion matrix computed from a checkpoint ------------------------------------------------------------

TINY_KW = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 16, 'depth': 1, 'num_heads': 1}


def save_teacher(path, classes=tuple(range(10))):
    """A random-weight full-class `dedeit` saved as train_subdata.py saves one (args record the model)."""
    import torch

    import utils
    from models import factory
    torch.manual_seed(0)
    model = factory.create_model('dedeit', len(classes), TINY_KW)
    utils.save_checkpoint({'model': model.state_dict(), 'classes': list(classes), 'stage': 1,
                           'args': {'model': 'dedeit', 'model_kwargs': TINY_KW, 'tiny_transforms': True}}, path)
    return model


def test_write_confusion_from_a_checkpoint_and_split_with_it(fmnist_root, tmp_path):
    from types import SimpleNamespace

    import torch

    import engine
    model = save_teacher(tmp_path / 'teacher.pth')
    out = tmp_path / 'confusion.json'
    r = subprocess.run([sys.executable, SCRIPT, '--dataset', 'fashion_mnist', '--data_path', fmnist_root,
                        '--teacher-path', str(tmp_path / 'teacher.pth'), '--write-confusion', str(out),
                        '--batch-size', '500'], capture_output=True, text=True, timeout=300, env=env(), check=False)
    assert r.returncode == 0, r.stderr
    conf = json.loads(out.read_text())
    m = np.asarray(conf['matrix'])
    assert m.shape == (10, 10) and conf['classes'] == 10 and conf['images'] == 10000 and conf['split'] == 'val'
    assert (m.sum(axis=1) == 1000).all()  # rows are the true classes: 1,000 test images each
    assert (conf['model'], conf['checkpoint'], conf['class_names']) == ('dedeit', str(tmp_path / 'teacher.pth'),
                                                                         FASHION_MNIST_CLASSES)
    val = build_dataset('fashion_mnist', fmnist_root, 'val', tiny=True, in_chans=1)
    args = SimpleNamespace(rank=0, eval_batch_size=1000, num_workers=0, pin_mem=False)
    acc = engine.evaluate(model, engine.build_eval_loader(args, val), torch.device('cpu'))['acc1']
    assert abs(100 * conf['accuracy'] - acc) < 1e-6 and np.trace(m) == round(acc * 100)
    predicted = m.sum(axis=0)  # the model's own argmax counts, by another route
    with torch.inference_mode():
        preds = torch.cat([model.eval()(x).argmax(1) for x, _ in torch.utils.data.DataLoader(val, batch_size=2000)])
    assert predicted.tolist() == torch.bincount(preds, minlength=10).tolist()
    # the file, or the checkpoint itself, drives a confusion split; the groups are those of the matrix
    expected = grouping.confusion_groups(m, [2, 3, 2, 3], together=False)
    assert main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '4', '--strategy',
                 'confusion-spread', '--confusion', str(out), '--output_path', str(tmp_path / 'a')]) == 0
    assert main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '4', '--strategy',
                 'confusion-spread', '--teacher-path', str(tmp_path / 'teacher.pth'), '--output_path',
                 str(tmp_path / 'b')]) == 0
    for name in 'ab':
        manifest = json.loads((tmp_path / name / 'split.json').read_text())
        assert [d['classes'] for d in manifest['divisions']] == expected
    assert manifest['confusion'] == str(tmp_path / 'teacher.pth')


def test_confusion_counted_on_the_training_images(fmnist_root, tmp_path, capsys):
    """--confusion-split train: the teacher's confusions on its 60,000 training images (eval transform), so no test
    label chooses the groups; the split records where its matrix was counted, and a file of another split is refused."""
    from types import SimpleNamespace

    import torch

    model = save_teacher(tmp_path / 'teacher.pth')
    out, split, ckpt = tmp_path / 'confusion.json', tmp_path / 'split', str(tmp_path / 'teacher.pth')
    assert main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--teacher-path', ckpt, '--write-confusion',
                 str(out), '--confusion-split', 'train', '--batch-size', '2000', '--num_division', '4', '--strategy',
                 'confusion-together', '--output_path', str(split)]) == 0
    conf = json.loads(out.read_text())
    m = np.asarray(conf['matrix'])
    assert conf['split'] == 'train' and conf['images'] == 60000 and (m.sum(axis=1) == 6000).all()
    # the model's own argmax counts over the training images, by another route (the train transform, unflipped)
    train = build_dataset('fashion_mnist', fmnist_root, 'train', tiny=True, in_chans=1, args=SimpleNamespace(hflip=0.0))
    with torch.inference_mode():
        preds = torch.cat([model.eval()(x).argmax(1) for x, _ in torch.utils.data.DataLoader(train, batch_size=4000)])
    assert m.sum(axis=0).tolist() == torch.bincount(preds, minlength=10).tolist()
    manifest = json.loads((split / 'split.json').read_text())
    assert manifest['confusion_split'] == 'train'
    assert [d['classes'] for d in manifest['divisions']] == grouping.confusion_groups(m, [2, 3, 2, 3], together=True)
    capsys.readouterr()
    base = ['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '4', '--output_path',
            str(tmp_path / 'b'), '--strategy', 'confusion-spread']
    for extra, expected in ((['--confusion', str(out), '--confusion-split', 'val'], 'was counted on the train split'),
                            (['--confusion-split', 'train'], '--confusion-split is for the matrix of --teacher-path')):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith('error: ') and expected in err, (extra, err)
    assert not (tmp_path / 'b').exists()


def test_teacher_of_other_classes_refused(fmnist_root, tmp_path, capsys):
    save_teacher(tmp_path / 'sub.pth', classes=range(5))
    assert main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--teacher-path', str(tmp_path / 'sub.pth'),
                 '--write-confusion', str(tmp_path / 'c.json')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'not on all 10 classes of fashion_mnist' in err, err
    assert not (tmp_path / 'c.json').exists()


# --- device plans ---------------------------------------------------------------------------------------------

def write_plan(path, counts, classes=None, **extra):
    classes = classes or [None] * len(counts)
    plan = {'format': 'devit-plan', 'version': 1, 'num_classes': sum(counts), **extra,
            'devices': [{'index': i, 'num_classes': k, 'classes': c, 'model': 'dedeit',
                         'model_kwargs': {'embed_dim': 64, 'depth': 2, 'num_heads': 2}}
                        for i, (k, c) in enumerate(zip(counts, classes))]}
    path.write_text(json.dumps(plan))
    return str(path)


def test_plan_sizes_and_pinned_classes(fmnist_root, tmp_path):
    plan = write_plan(tmp_path / 'plan.json', [4, 6])
    base = ['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--plan']
    assert main([*base, plan, '--output_path', str(tmp_path / 'sizes')]) == 0  # --num_division from the plan
    manifest = json.loads((tmp_path / 'sizes' / 'split.json').read_text())
    assert [d['classes'] for d in manifest['divisions']] == shuffled_cut(10, [4, 6])
    assert manifest['plan'] == plan and manifest['num_division'] == 2
    pinned = write_plan(tmp_path / 'pinned.json', [3, 7], [[9, 0, 4], [1, 2, 3, 5, 6, 7, 8]])
    assert main([*base, pinned, '--num_division', '2', '--output_path', str(tmp_path / 'pinned')]) == 0
    manifest = json.loads((tmp_path / 'pinned' / 'split.json').read_text())
    assert [d['classes'] for d in manifest['divisions']] == [[0, 4, 9], [1, 2, 3, 5, 6, 7, 8]]
    ds = build_dataset('fashion_mnist', tmp_path / 'pinned', 'train', division=0, tiny=True)
    assert ds.class_names == [FASHION_MNIST_CLASSES[c] for c in (0, 4, 9)]
    # one device pinned, the others by the strategy on the remaining classes
    m, _ = block_confusion(10, 2)
    mixed = class_groups(10, None, strategy='confusion-together', confusion=m,
                         plan=[(2, [1, 0]), (4, None), (4, None)])
    assert mixed[0] == [0, 1] and sorted(mixed[1:]) == [[2, 4, 6, 8], [3, 5, 7, 9]]
    assert class_groups(10, 3, plan=[(2, [1, 0]), (4, None), (4, None)])[0] == [0, 1]


def test_bad_plans_refused_with_one_line(fmnist_root, tmp_path, capsys):
    cases = {
        'sum': (write_plan(tmp_path / 'sum.json', [4, 5], num_classes=10), [],
                "the devices' class counts sum to 9 but the dataset has 10"),
        'count': (write_plan(tmp_path / 'count.json', [4, 6]), ['--num_division', '3'],
                  '--plan has 2 devices but --num_division is 3'),
        'sub_classes': (write_plan(tmp_path / 'sub.json', [4, 6]), ['--sub_classes', '4', '6'],
                        'do not pass --sub_classes with it'),
        'twice': (write_plan(tmp_path / 'twice.json', [2, 8], [[0, 1], [1, 2, 3, 4, 5, 6, 7, 8]]), [],
                  'class 1 is listed by devices 0 and 1'),
        'range': (write_plan(tmp_path / 'range.json', [2, 8], [[0, 10], None]), [], 'lists class 10, outside 0..9'),
        'length': (write_plan(tmp_path / 'len.json', [2, 8], [[0], None]), [],
                   'device 0 lists 1 classes but "num_classes" is 2'),
        'classes': (write_plan(tmp_path / 'cls.json', [50, 50]), [], 'is for 100 classes but the dataset has 10'),
        'missing': (str(tmp_path / 'none.json'), [], 'none.json does not exist'),
    }
    for case, (plan, extra, expected) in cases.items():
        rc = main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--plan', plan, *extra,
                   '--output_path', str(tmp_path / 'out')])
        err = capsys.readouterr().err
        assert rc == 2 and err.count('\n') == 1 and err.startswith('error: ') and expected in err, (case, err)
        assert not (tmp_path / 'out').exists()


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
