"""Stage 3 of DeViT: ensemble -- fuse the N students with an ensemble head, trained against the full teacher.

Loss: (1-α)·base + α·KD(ensemble logits, teacher) + MSE(ensemble cls feature, teacher cls token)
+ MSE(ensemble dist feature, teacher dist token). Backbones and head are trained together on the full dataset.
``--model-path`` is stage 2's output folder (students ``sub-dataset{i}/checkpoint.pth``); ``--teacher-path`` is the
full teacher's checkpoint.

    python -m torch.distributed.launch --nproc_per_node=4 --master_addr=127.0.0.1 --master_port=29500 --use_env \\
        ensemble.py --batch-size 128 --eval-batch-size 256 --epochs 50 --model dedeit --model-path ./model_path \\
        --model-ema --lr 3e-4 --data-path ./datasets --dataset cifar100 --num_division 4 --output_dir ./output \\
        --teacher-model deit_base_distilled_patch16_224 --teacher-path ./teacher_ckpt.pth --sub_classes 25 25 25 25
Recipe files: ``-c configs/cifar100/stage3.yaml`` (the command above), ``-c configs/small.yaml``.
Writes OUTPUT/{checkpoint.pth, checkpoint_last.pth, log.txt}; the checkpoint's ensemble config
(``models.ensemble_model.CONFIG_KEY``) lets ``collab_infer.py`` rebuild the model on N devices.
"""
import argparse
import os

import torch
import torch.nn as nn

import cli
import datasets
import engine
import fileio
import utils
from fileio import UsageError
from losses import DistillationLoss, build_base_criterion
from models import factory
from models.checkpoint import checkpoint_info, load_weights, read_checkpoint
from models.ensemble_model import CONFIG_KEY, load_students


def get_parser():
    parents = [cli.data_args(), cli.augment_args(), cli.division_args(select=False), cli.model_args(),
               cli.optim_args(), cli.distill_args(relations=False), cli.run_args()]
    parser = argparse.ArgumentParser('DeViT stage 3: ensemble of the students', parents=parents)
    group = parser.add_argument_group('ensemble')
    group.add_argument('--device-dropout', type=cli.probability, default=0.0,
                       help='training probability of zeroing one device\'s tokens (robust to a missing device)')
    group.add_argument('--eval-missing', action='store_true',
                       help='also report test accuracy with each device missing in turn (tokens zero-filled, as the '
                            'collaborative runtime does); writes OUTPUT/missing_devices.json')
    parser.set_defaults(distillation_type='hard')  # stage 3 always learns from the full teacher (seed omits the flag)
    return parser


def teacher_checkpoint(teacher_path):
    """The full teacher: a checkpoint file, or a stage-1 style folder of one division (as the demo's teacher)."""
    if teacher_path is None:
        raise UsageError('--teacher-path is required: the full teacher checkpoint')
    if os.path.isdir(teacher_path):
        for candidate in (os.path.join(teacher_path, engine.CHECKPOINT_BEST),
                          os.path.join(utils.division_dir(teacher_path, 0), engine.CHECKPOINT_BEST)):
            if os.path.isfile(candidate):
                return candidate
        raise UsageError(f'--teacher-path {teacher_path} holds no {engine.CHECKPOINT_BEST}')
    if not os.path.isfile(teacher_path):
        raise UsageError(f'--teacher-path {teacher_path} does not exist')
    return teacher_path


def check_students(model_path, num_division):
    """The students must be stage-2 checkpoints (distill_sub.py's), not e.g. stage 1's sub-teachers."""
    for division in range(num_division):
        path = os.path.join(utils.division_dir(model_path, division), engine.CHECKPOINT_BEST)
        stage = checkpoint_info(path).get('stage') if os.path.isfile(path) else None
        if stage is not None and stage != 2:
            raise UsageError(f'student {path} is a stage-{stage} checkpoint; --model-path must be the output '
                             f'folder of distill_sub.py (stage 2)')


def check_teacher_classes(path, num_classes):
    """A teacher trained through the split must have kept the global class order (one division, classes 0..K-1)."""
    checkpoint = read_checkpoint(path)
    if checkpoint.get('stage') in (2, 3):
        raise UsageError(f'teacher {path} is a stage-{checkpoint["stage"]} checkpoint, not a full teacher')
    classes = checkpoint.get('classes')
    if classes is not None and list(classes) != list(range(num_classes)):
        raise UsageError(f'teacher {path} was trained on classes {classes[:8]}..., not on all {num_classes} '
                         f'classes in their global order')


class WithoutDevice(nn.Module):
    """The ensemble at inference with device `missing` absent: its tokens are zero-filled, the others' are used."""

    def __init__(self, ensemble, missing):
        super().__init__()
        self.ensemble, self.missing = ensemble, missing

    def forward(self, x):
        present = [i != self.missing for i in range(self.ensemble.num_devices)]
        tokens = [self.ensemble.device_tokens(i, x) if p else None for i, p in enumerate(present)]
        return self.ensemble.head_forward(tokens, present).eval_logits()


def evaluate_missing(args, ensemble, val_set):
    """Test top-1 with all devices and with each one missing, written to OUTPUT/missing_devices.json. After
    training the best checkpoint is evaluated; with --eval, the weights --resume loaded."""
    path = args.resume if args.eval else os.path.join(args.output_dir, engine.CHECKPOINT_BEST)
    if not args.eval:
        load_weights(ensemble, path, reset_head=False, what='ensemble')
    loader = engine.build_eval_loader(args, engine.limit(val_set, args.limit_val))
    device = torch.device(args.device)
    result = {'checkpoint': path, 'all': engine.evaluate(ensemble, loader, device)['acc1'],
              'missing': [engine.evaluate(WithoutDevice(ensemble, i), loader, device)['acc1']
                          for i in range(ensemble.num_devices)]}
    if utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        fileio.write_json_atomic(os.path.join(args.output_dir, 'missing_devices.json'), result)
        print(f'test acc1 with all {ensemble.num_devices} devices {result["all"]:.2f}%; with device i missing: '
              + ', '.join(f'{i}: {a:.2f}%' for i, a in enumerate(result['missing'])), flush=True)
    return result


def main(argv=None):
    args = cli.parse_args(get_parser(), argv)
    utils.init_distributed(args)
    if not args.model_path or not os.path.isdir(args.model_path):
        raise UsageError(f'--model-path {args.model_path} must be the output folder of distill_sub.py')
    manifest = datasets.read_manifest(args.model_path, required=True)
    utils.check_divisions(args, manifest)
    check_students(args.model_path, args.num_division)
    engine.check_output_dir(args, args.output_dir)
    num_classes = manifest['num_classes']
    teacher_path = teacher_checkpoint(args.teacher_path)
    check_teacher_classes(teacher_path, num_classes)
    student0 = os.path.join(utils.division_dir(args.model_path, 0), engine.CHECKPOINT_BEST)
    utils.inherit_normalization(args, [p for p in (student0, teacher_path) if os.path.isfile(p)])

    utils.seed_everything(args.seed)  # same initial head on every rank and in every rerun
    teacher = factory.create_model(args.teacher_model, num_classes, args.teacher_kwargs, args.input_size)
    load_weights(teacher, teacher_path, reset_head=False)
    ensemble = load_students(args.model_path, args.num_division, num_classes=num_classes,
                             embed_dim=teacher.num_features, model=args.model, model_kwargs=args.model_kwargs,
                             device_dropout=args.device_dropout)
    size, chans = factory.input_spec(ensemble.backbones[0])
    if factory.input_spec(teacher) != (size, chans):
        raise UsageError(f'teacher input {factory.input_spec(teacher)} differs from the students\' {(size, chans)}'
                         f' (size, channels): pass --teacher-kwargs img_size=... in_chans=...')
    engine.set_normalization(args, chans)
    data = {split: datasets.build_dataset(args.dataset, args.data_path, split, input_size=size, in_chans=chans,
                                          tiny=args.tiny_transforms, args=args) for split in ('train', 'val')}
    if data['train'].num_classes != num_classes:
        raise UsageError(f'{args.data_path} has {data["train"].num_classes} classes but the students\' split '
                         f'manifest has {num_classes}')
    if utils.is_main_process():
        print(f'ensemble of {ensemble.num_devices} students (widths {ensemble.widths}) -> {num_classes} classes; '
              f'{len(data["train"])} train / {len(data["val"])} val images', flush=True)

    distill_loss = DistillationLoss(build_base_criterion(engine.build_mixup(args, num_classes) is not None,
                                                         args.smoothing),
                                    args.distillation_type, args.distillation_alpha, args.distillation_tau)
    task = engine.EnsembleTask(ensemble, teacher, distill_loss)
    extra = {'stage': 3, CONFIG_KEY: ensemble.config, 'num_classes': num_classes}
    result = engine.fit(args, task, data['train'], data['val'], args.output_dir, extra_checkpoint=extra,
                        num_classes=num_classes)
    if utils.is_main_process() and not args.eval:
        print(f'ensemble: best test acc1 {result["best_acc1"] or 0.0:.2f}%', flush=True)
    if args.eval_missing:
        result['missing_devices'] = evaluate_missing(args, ensemble, data['val'])
    return result


if __name__ == '__main__':
    cli.run_main(main)
