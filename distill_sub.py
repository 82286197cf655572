"""Stage 2 of DeViT: decompose -- distil a small student from each sub-teacher on its sub-dataset.

Loss: (1-α)·base + α·KD(dist head, sub-teacher) + (γq·Lq + γk·Lk + γv·Lv) / depth, the relations taken on the
mapped student/teacher layers (``--layer-map``). ``--teacher-path`` is stage 1's output folder (division i uses
``sub-dataset{i}/checkpoint.pth``) or one checkpoint file.

    python -m torch.distributed.launch --nproc_per_node=4 --master_addr=127.0.0.1 --master_port=29500 --use_env \\
        distill_sub.py --batch-size 256 --eval-batch-size 512 --epochs 100 --model dedeit --model-path ./ckpt.pth \\
        --model-ema --lr 8e-5 --data-path ./sub_datasets --dataset cifar100 \\
        --teacher-model deit_base_distilled_patch16_224 --teacher-path ./teacher_ckpt.pth \\
        --distillation-type hard --gama 0.2 0.1 0.3 --num_division 4 --start-division 0 --output_dir ./output
Recipe files: ``-c configs/cifar100/stage2.yaml`` (the command above), ``-c configs/small.yaml``.
Writes OUTPUT/sub-dataset{i}/{checkpoint.pth, checkpoint_last.pth, log.txt}, the input of ensemble.py.
``distill(args)`` runs the stage on parsed arguments (shrink.py re-distils pruned students through it).
"""
import argparse
import functools
import os

import cli
import datasets
import engine
import utils
from collab.host import plan
from fileio import UsageError
from losses import DistillationLoss, build_base_criterion
from models import factory
from models.adapter import check_token_counts, layer_pairs
from models.checkpoint import checkpoint_info, load_weights
from models.pruning import load_shrunk


def get_parser():
    parser = argparse.ArgumentParser('DeViT stage 2: distil students from sub-teachers',
                                     parents=cli.training_parents(distillation='relations'))
    group = parser.add_argument_group('students')
    group.add_argument('--plan', default=None, metavar='PLAN.json',
                       help="plan.py's output: division i gets device i's student (explicit --model-kwargs win)")
    group.add_argument('--load-shrink', default=None, metavar='POLICY',
                       help='distil a shrunk student again: shrink.py\'s output folder (division i: '
                            'sub-dataset{i}/pruned.pth), a pruned checkpoint, or a shrink.json policy applied to '
                            'the --model-path weights')
    return parser


def teacher_file(teacher_path, division):
    """``--teacher-path`` may be stage 1's output folder or a single checkpoint file."""
    if teacher_path is None:
        raise UsageError('--teacher-path is required: the stage-1 output folder or a checkpoint file')
    if os.path.isdir(teacher_path):
        path = os.path.join(utils.division_dir(teacher_path, division), engine.CHECKPOINT_BEST)
        if not os.path.isfile(path):
            raise UsageError(f'--teacher-path {teacher_path} has no sub-teacher for division {division} '
                             f'(missing {path})')
        return path
    if not os.path.isfile(teacher_path):
        raise UsageError(f'--teacher-path {teacher_path} does not exist')
    return teacher_path


def check_teacher(path, division, classes):
    """A sub-teacher is a stage-1 checkpoint of this division's classes (or an outside checkpoint without either)."""
    info = checkpoint_info(path)
    stage = info.get('stage')
    if stage is not None and stage != 1:
        raise UsageError(f'teacher {path} is a stage-{stage} checkpoint; stage 2 distils from a stage-1 '
                         f'sub-teacher (the output of train_subdata.py)')
    if info.get('classes') is not None and list(info['classes']) != list(classes):
        raise UsageError(f'teacher {path} has a head for classes {list(info["classes"])[:8]} '
                         f'({len(info["classes"])}), but division {division} has classes {list(classes)[:8]}')


def make_task(args, division, num_classes, planned=None):
    """Student i (fresh, from --model-path, or re-shrunk by --load-shrink), frozen sub-teacher i, KD + relations.
    planned: {division: (model, model_kwargs)} from --plan."""
    if planned:  # kept in the checkpoint's args, from which ensemble.py builds each (unlike) backbone
        args.model, args.model_kwargs = planned[division]
    student = factory.create_model(args.model, num_classes, args.model_kwargs, args.input_size,
                                   drop_path_rate=args.drop_path)
    if args.model_path:
        load_weights(student, args.model_path, reset_head=True)
    if args.load_shrink:
        load_shrunk(student, args.load_shrink, division)
    if hasattr(student, 'set_distilled_training'):
        student.set_distilled_training(True)  # both heads in training, their mean at eval (as DeiT)
    teacher = factory.create_model(args.teacher_model, num_classes, args.teacher_kwargs, args.input_size)
    load_weights(teacher, teacher_file(args.teacher_path, division), reset_head=False)
    if any(g > 0 for g in args.gama):  # relations compare N×N token maps; KD alone does not care
        check_token_counts(student, teacher)
    mixup_active = engine.build_mixup(args, num_classes) is not None
    loss = DistillationLoss(build_base_criterion(mixup_active, args.smoothing), args.distillation_type,
                            args.distillation_alpha, args.distillation_tau)
    pairs = layer_pairs(len(student.blocks), len(teacher.blocks), args.layer_map)
    return engine.DecomposeTask(student, teacher, loss, pairs, args.gama)


def distill(args):
    """Stage 2 on parsed arguments (after utils.init_distributed): every teacher is checked before anything
    trains; returns engine.run_divisions' summary per division."""
    manifest = datasets.read_manifest(args.data_path, required=True)
    planned = plan.students_for(args.plan, manifest, args.model, args.model_kwargs) if args.plan else None
    teachers = [teacher_file(args.teacher_path, d) for d in utils.divisions_to_run(args, manifest)]
    for division, path in zip(utils.divisions_to_run(args, manifest), teachers, strict=True):
        check_teacher(path, division, manifest['divisions'][division]['classes'])
    utils.inherit_normalization(args, teachers)
    return engine.run_divisions(args, functools.partial(make_task, args, planned=planned), stage=2)


def main(argv=None):
    args = cli.parse_args(get_parser(), argv)
    utils.init_distributed(args)
    return distill(args)


if __name__ == '__main__':
    cli.run_main(main)
