"""The seed's four commands chained as a user runs them, with their defaults: split, then stages 1, 2 and 3 under
``torch.distributed.launch --nproc_per_node=2 ... --use_env``, with the DeiT recipe left on (RandAugment, random
erasing, mixup, cutmix, label smoothing, EMA as the seed's ``--model-ema``, 5 warm-up epochs) and the default 8
loader workers per loader from a fork server. Only model size, input size, one epoch and a small batch differ
from the seed's commands (and ``--all-divisions``, so that one launch trains every division as ``--start-division``
would one by one). Once on an RGB ImageFolder of PNG files and once on CIFAR-100 pickles in the real format."""
import json

import pytest
import timm
import torch
from helpers import launch_cmd, read_log, run, write_rgb_folder
from test_datasets import write_cifar100

import models  # noqa: F401  (registers dedeit)
from models.ensemble_model import load_ensemble

TEACHER = 'deit_tiny_distilled_patch16_224'
TEACHER_KW = {'img_size': 32, 'patch_size': 8, 'embed_dim': 32, 'depth': 1, 'num_heads': 2}
STUDENT_KW = {'img_size': 32, 'patch_size': 8, 'embed_dim': 16, 'depth': 1, 'num_heads': 2}
pytestmark = pytest.mark.slow  # about a minute for the two chains: `make test-slow` (CI) runs them

SMALL = ['--input-size', '32', '--epochs', '1', '--batch-size', '16', '--eval-batch-size', '32']


def kwargs(kw):
    return [f'{k}={v}' for k, v in kw.items()]


def pretrained(path, name, num_classes, kw):
    """Stands in for the seed's ./ckpt.pth and ./teacher_ckpt.pth: a timm-style {'model': state_dict} file."""
    torch.manual_seed(0)
    torch.save({'model': timm.create_model(name, num_classes=num_classes, **kw).state_dict()}, path)
    return str(path)


def seed_chain(tmp_path, dataset, data, num_classes):
    """split -> stage 1 -> stage 2 -> stage 3 with the seed's flags; returns the output folders."""
    split, out = tmp_path / 'sub_datasets', tmp_path / 'output'
    ckpt = pretrained(tmp_path / 'ckpt.pth', TEACHER, num_classes, TEACHER_KW)
    student_ckpt = pretrained(tmp_path / 'student_ckpt.pth', 'dedeit', num_classes, STUDENT_KW)
    run(launch_cmd('splite_dataset.py', '--dataset', dataset, '--data_path', str(data), '--num_division', '2',
                   '--output_path', str(split), launcher='python'))
    stage1 = run(launch_cmd(
        'train_subdata.py', *SMALL, '--model', TEACHER, '--model-kwargs', *kwargs(TEACHER_KW), '--model-path', ckpt,
        '--model-ema', '--lr', '1e-4', '--data-path', str(split), '--dataset', dataset, '--num_division', '2',
        '--start-division', '0', '--all-divisions', '--output_dir', str(out / 'stage1')), timeout=240)
    run(launch_cmd(
        'distill_sub.py', *SMALL, '--model', 'dedeit', '--model-kwargs', *kwargs(STUDENT_KW), '--model-path',
        student_ckpt, '--model-ema', '--lr', '8e-5', '--data-path', str(split), '--dataset', dataset,
        '--teacher-model', TEACHER, '--teacher-kwargs', *kwargs(TEACHER_KW), '--teacher-path', str(out / 'stage1'),
        '--distillation-type', 'hard', '--gama', '0.2', '0.1', '0.3', '--num_division', '2', '--start-division', '0',
        '--all-divisions', '--output_dir', str(out / 'stage2')), timeout=240)
    half = str(num_classes // 2)
    run(launch_cmd(
        'ensemble.py', *SMALL, '--model', 'dedeit', '--model-path', str(out / 'stage2'), '--model-ema', '--lr', '3e-4',
        '--data-path', str(data), '--dataset', dataset, '--num_division', '2', '--output_dir', str(out / 'stage3'),
        '--teacher-model', TEACHER, '--teacher-kwargs', *kwargs(TEACHER_KW), '--teacher-path', ckpt,
        '--sub_classes', half, half), timeout=240)
    return out, stage1


def check_chain(out, stage1, num_classes):
    folders = [out / stage / f'sub-dataset{i}' for stage in ('stage1', 'stage2') for i in range(2)] + [out / 'stage3']
    for folder in folders:
        for name in ('checkpoint.pth', 'checkpoint_last.pth', 'log.txt', 'args.json'):
            assert (folder / name).is_file(), folder / name
        record = read_log(folder)[-1]
        assert record['epoch'] == 0 and record['train_loss'] > 0 and 0.0 <= record['test_acc1'] <= 100.0
        args = json.loads((folder / 'args.json').read_text())
        # the defaults really were in force
        assert args['num_workers'] == 8 and not args['tiny_transforms'] and args['model_ema']
        assert (args['mixup'], args['cutmix'], args['smoothing'], args['reprob']) == (0.8, 1.0, 0.1, 0.25)
        assert args['aa'] == 'rand-m9-mstd0.5-inc1' and args['warmup_epochs'] == 5 and args['hflip'] == 0.5
        assert len(args['mean']) == len(args['std']) == 3  # the normalisation, recorded for the next stages
    assert stage1.stdout.count('warning: the warm-up (5 epochs) is as long as the training (1 epochs)') == 2
    ensemble = load_ensemble(str(out / 'stage3' / 'checkpoint.pth')).eval()
    with torch.no_grad():
        logits = ensemble(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, num_classes) and torch.isfinite(logits).all()


def test_seed_commands_with_defaults_on_an_rgb_image_folder(tmp_path):
    data = write_rgb_folder(tmp_path / 'data', num_classes=10, n_train=24, n_val=6)
    out, stage1 = seed_chain(tmp_path, 'folder', data, 10)
    check_chain(out, stage1, 10)


def test_seed_commands_with_defaults_on_cifar100_pickles(tmp_path):
    data = write_cifar100(tmp_path / 'cifar', num_classes=100, n_train=10, n_test=2)
    out, stage1 = seed_chain(tmp_path, 'cifar100', data, 100)
    check_chain(out, stage1, 100)
