"""Stage 1 of DeViT: fine-tune the big pretrained model on each class-disjoint sub-dataset (the sub-teachers).

Single process:   python train_subdata.py --data-path ./sub_datasets --dataset cifar100 --model-path ./ckpt.pth ...
Distributed (as the seed):
    python -m torch.distributed.launch --nproc_per_node=4 --master_addr=127.0.0.1 --master_port=29500 --use_env \\
        train_subdata.py --batch-size 256 --eval-batch-size 512 --epochs 100 \\
        --model deit_base_distilled_patch16_224 --model-path ./ckpt.pth --model-ema --lr 1e-4 \\
        --data-path ./sub_datasets --dataset cifar100 --num_division 4 --start-division 0 --output_dir ./output
Recipes: ``-c configs/cifar100/stage1.yaml`` (the command above as a file), ``-c configs/small.yaml`` (a small
dataset, model trained from scratch); flags on the command line override the file.
Writes OUTPUT/sub-dataset{i}/{checkpoint.pth, checkpoint_last.pth, log.txt}, the input of distill_sub.py.
"""
import argparse
import os

import cli
import engine
import utils
from losses import build_base_criterion
from models import factory
from models.checkpoint import load_weights


def get_parser():
    return argparse.ArgumentParser('DeViT stage 1: fine-tune sub-teachers', parents=cli.training_parents())


def main(argv=None):
    args = cli.parse_args(get_parser(), argv)
    utils.init_distributed(args)
    if args.model_path and os.path.isfile(args.model_path):
        utils.inherit_normalization(args, [args.model_path])

    def make_task(division, num_classes):
        model = factory.create_model(args.model, num_classes, args.model_kwargs, args.input_size,
                                     drop_path_rate=args.drop_path)
        if args.model_path:
            load_weights(model, args.model_path, reset_head=True)
        mixup_active = engine.build_mixup(args, num_classes) is not None
        return engine.SupervisedTask(model, build_base_criterion(mixup_active, args.smoothing))

    return engine.run_divisions(args, make_task, stage=1)


if __name__ == '__main__':
    cli.run_main(main)
