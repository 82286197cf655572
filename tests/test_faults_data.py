"""Bad data: corrupt and truncated images in an ImageFolder (``--dataset folder``), ``--skip-bad-images``, empty class
folders, labels out of range, and a split whose folders no longer match its manifest. Each gives one line naming
the culprit (exit 2), or, with ``--skip-bad-images``, a logged and counted skip."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from faults import error_lines, launch, make_split, no_project_traceback, read_log, run_inprocess
from helpers import TEACHER, run
from PIL import Image

import cli
import datasets
import engine
import splite_dataset
import train_subdata
from fileio import UsageError

CLASSES = ['ankle_boot', 'bag', 'coat', 'dress']
MODEL = ['--model', TEACHER, '--model-kwargs', 'img_size=28', 'patch_size=7', 'in_chans=1', 'embed_dim=16',
         'depth=1', 'num_heads=2']
FOLDER_RUN = ['--dataset', 'folder', '--tiny-transforms', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
              '--batch-size', '16', '--no-progress', '--warmup-epochs', '0', '--num_workers', '1', *MODEL]


@pytest.fixture(scope='module')
def tree(tmp_path_factory, fmnist_root):
    """A 4-class ImageFolder of real Fashion-MNIST PNGs: 16 train and 4 val images per class."""
    root = tmp_path_factory.mktemp('data') / 'tree'
    samples = datasets.read_samples('fashion_mnist', fmnist_root, 'train')
    for k, name in enumerate(CLASSES):
        rows = np.flatnonzero(samples.targets == k)[:20]
        for j, row in enumerate(rows):
            split = 'train' if j < 16 else 'val'
            os.makedirs(root / split / name, exist_ok=True)
            Image.fromarray(samples.images[row, 0].numpy()).save(root / split / name / f'{j:02d}.png')
    return root


def copy_tree(tree, tmp_path):
    dst = tmp_path / 'tree'
    shutil.copytree(tree, dst)
    return dst


def split_of(src, out, num_division):
    code = splite_dataset.main(['--dataset', 'folder', '--data_path', str(src), '--num_division', str(num_division),
                                '--output_path', str(out)])
    return code


def test_corrupt_image_is_refused_by_the_split_naming_it(tree, tmp_path, capsys):
    src = copy_tree(tree, tmp_path)
    bad = src / 'train' / 'bag' / '99_garbage.png'
    bad.write_bytes(os.urandom(300))
    out = tmp_path / 'split'
    assert split_of(src, out, 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: cannot read image') and str(bad) in err[0], err
    assert not out.exists()


def test_empty_class_folder_is_refused(tree, tmp_path, capsys):
    src = copy_tree(tree, tmp_path)
    (src / 'train' / 'empty_class').mkdir()
    (src / 'train' / 'empty_class' / 'notes.txt').write_text('no images here')
    assert split_of(src, tmp_path / 'split', 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'empty_class' in err[0] and 'has no images' in err[0], err


@pytest.fixture
def truncated(tree, tmp_path):
    """A split of the tree where one training PNG has a valid header but only half its data (passes the split)."""
    src = copy_tree(tree, tmp_path)
    bad = src / 'train' / 'coat' / '03.png'
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    split = tmp_path / 'split'
    assert split_of(src, split, 1) == 0
    return split, split / 'sub-dataset0' / 'train' / 'coat' / '03.png'


def test_truncated_image_stops_training_naming_the_file(truncated, tmp_path):
    split, bad = truncated
    out = tmp_path / 'out'
    proc = run(launch(['train_subdata.py', *FOLDER_RUN, '--epochs', '1', '--data-path', str(split), '--num_division',
                       '1', '--output_dir', str(out)], launcher='python'), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    # read in a DataLoader worker process: still one line, the worker's own message
    assert lines == [f'error: cannot read image {bad}: image file is truncated'], proc.stderr
    assert no_project_traceback(proc.stderr)
    assert not list(out.rglob('*.pth'))


@pytest.mark.slow
def test_skip_bad_images_logs_counts_and_trains(truncated, tmp_path):
    split, bad = truncated
    out = tmp_path / 'out'
    proc = run(launch(['train_subdata.py', *FOLDER_RUN, '--epochs', '2', '--data-path', str(split), '--num_division',
                       '1', '--output_dir', str(out), '--skip-bad-images']))
    assert f'skipped 1 unreadable image file(s): {bad}' in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith('warning: skipping')]
    assert warnings and all(str(bad) in line for line in warnings)
    log = read_log(out / 'sub-dataset0')
    assert [r['skipped_images'] for r in log] == [1, 1]
    assert log[-1]['num_updates'] == 2 * 64 // (2 * 16)  # batches keep their size: no step lost to the skip


def test_skip_bad_images_in_process_counts_distinct_files(truncated):
    split, bad = truncated
    args = cli.parse_args(train_subdata.get_parser(), ['--skip-bad-images', '--num_division', '1'])
    ds = datasets.build_dataset('folder', str(split), 'train', division=0, input_size=28, in_chans=1, tiny=True,
                                args=args)
    index = ds.files.index(str(bad))
    for _ in range(2):
        image, label = ds[index]  # the next readable image stands in
        assert image.shape == (1, 28, 28) and label == ds.targets[index + 1]
    assert ds.skipped_files() == [str(bad)]
    assert engine.skipped_images([ds]) == [str(bad)]


# ---------------------------------------------------------------------------------------------------------------
# Labels out of range and manifests that do not match the folders

@pytest.fixture(scope='module')
def fmnist_split(tmp_path_factory, fmnist_root):
    return make_split(tmp_path_factory.mktemp('data') / 'split4', fmnist_root)


def tampered(split, tmp_path, edit):
    dst = tmp_path / 'split4'
    shutil.copytree(split, dst)
    manifest = json.loads((dst / 'split.json').read_text())
    edit(manifest)
    (dst / 'split.json').write_text(json.dumps(manifest))
    return dst


def stage1(split, out, *extra):
    return ['--dataset', 'fashion_mnist', '--tiny-transforms', *MODEL, '--data-path', str(split),
            '--output_dir', str(out), '--epochs', '1', '--no-progress', *extra]


def test_class_id_out_of_range_in_manifest(fmnist_split, tmp_path, capsys):
    def edit(m):
        m['divisions'][0]['classes'][-1] = 99
    split = tampered(fmnist_split, tmp_path, edit)
    code, err = run_inprocess(train_subdata.main, stage1(split, tmp_path / 'out'), capsys)
    assert code == 2 and len(err) == 1, err
    assert 'division 0 lists class ids [99]' in err[0] and 'has 10 classes' in err[0]


def test_labels_outside_the_division(fmnist_split, tmp_path, capsys):
    kept = []

    def edit(m):  # the last class dropped from division 0, whose index list still holds its images
        m['divisions'][0]['classes'] = m['divisions'][0]['classes'][:-1]
        m['divisions'][0]['class_names'] = m['divisions'][0]['class_names'][:-1]
        kept.append(len(m['divisions'][0]['classes']))
    split = tampered(fmnist_split, tmp_path, edit)
    code, err = run_inprocess(train_subdata.main, stage1(split, tmp_path / 'out'), capsys)
    assert code == 2 and len(err) == 1, err
    assert f'train labels fall outside 0..{kept[0] - 1}' in err[0] and 'sub-dataset0' in err[0]


def test_labels_beyond_the_model_are_refused_before_training():
    data = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    data.targets = np.array([0, 1, 2, 5])
    with pytest.raises(UsageError, match=r'training labels range over 0..5 but the model has 3 classes'):
        engine.check_labels(data, data, 3)


def test_class_folder_deleted_from_a_split(tree, tmp_path, capsys):
    split = tmp_path / 'split'
    assert split_of(tree, split, 2) == 0
    manifest = json.loads((split / 'split.json').read_text())
    division = manifest['divisions'][0]
    shutil.rmtree(split / 'sub-dataset0' / 'train' / division['class_names'][0])
    code, err = run_inprocess(train_subdata.main, [*FOLDER_RUN, '--data-path', str(split), '--num_division', '2',
                                                   '--output_dir', str(tmp_path / 'out')], capsys)
    assert code == 2 and len(err) == 1, err
    assert f'sub-dataset0/train/{division["class_names"][0]}' in err[0] and 'has no images' in err[0]


def test_val_images_removed_from_a_split(tree, tmp_path, capsys):
    split = tmp_path / 'split'
    assert split_of(tree, split, 2) == 0
    manifest = json.loads((split / 'split.json').read_text())
    shutil.rmtree(split / 'sub-dataset1' / 'val' / manifest['divisions'][1]['class_names'][-1])
    code, err = run_inprocess(train_subdata.main, [*FOLDER_RUN, '--data-path', str(split), '--num_division', '2',
                                                   '--start-division', '1', '--output_dir', str(tmp_path / 'out')],
                              capsys)
    assert code == 2 and len(err) == 1, err
    assert 'sub-dataset1 has 4 val images but' in err[0] and 'lists 8' in err[0] and 'split again' in err[0]


def test_index_list_edited_after_the_split(fmnist_split, tmp_path, capsys):
    split = tampered(fmnist_split, tmp_path, lambda m: None)
    indices = json.loads((split / 'sub-dataset2' / 'indices.json').read_text())
    indices['train'] = indices['train'][:-10]
    (split / 'sub-dataset2' / 'indices.json').write_text(json.dumps(indices))
    code, err = run_inprocess(train_subdata.main, stage1(split, tmp_path / 'out', '--start-division', '2'), capsys)
    assert code == 2 and len(err) == 1, err
    assert 'has 11990 train images but' in err[0] and 'lists 12000' in err[0]
