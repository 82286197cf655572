"""Collaborative inference with a DeViT ensemble: N workers each run one backbone, rank 0 runs the head.

Run with N+1 processes (rank 0 the aggregator, rank r the device holding backbone r-1), on one machine:

    python -m torch.distributed.launch --nproc_per_node=5 --master_addr=127.0.0.1 --master_port=29500 --use_env \\
        collab_infer.py --model-path output/ensemble/checkpoint.pth --limit 200 --timeout 10 --report collab.json

or across hosts with torchrun (host 0 runs the aggregator and maybe some workers):

    torchrun --nnodes=2 --node_rank=K --nproc_per_node=... --master_addr=HOST0 --master_port=29500 \\
        collab_infer.py --model-path ENSEMBLE_CKPT ...

(ranks are numbered node by node, so rank 0 runs on node 0; set GLOO_SOCKET_IFNAME when the hosts have several
network interfaces). Each host may pass its own --model-path: a worker takes backbone r-1 from it, and rank 0
refuses a worker whose tokens do not fit the head.

Baselines on the same images: `--mode layer-split` (the teacher's blocks cut into N consecutive stages, random
weights unless --teacher-path; same N+1 processes) and `--mode monolithic` (the teacher, or the whole ensemble,
in one process: plain `python collab_infer.py --mode monolithic ...`). `--images a.png b.png` predicts files.
"""
import argparse
import os
import sys

import utils
from collab.comm import PeerError, env_rank
from collab.modes import MODES, run

DEFAULT_TEACHER = 'deit_base_distilled_patch16_224'


def get_parser():
    parser = argparse.ArgumentParser('DeViT collaborative inference', parents=[utils.get_args_parser()])
    # None: taken from the ensemble checkpoint's training args, so a bare --model-path is enough.
    parser.set_defaults(dataset=None, batch_size=1, teacher_model=None)
    group = parser.add_argument_group('collaborative inference')
    group.add_argument('--mode', default='collab', choices=MODES,
                       help='collab (DeViT), layer-split (teacher cut into N stages) or monolithic (one process)')
    group.add_argument('--limit', type=utils.positive_int, default=None, help='first K images of the test set')
    group.add_argument('--images', nargs='+', default=None, metavar='FILE',
                       help='predict these image files instead of evaluating a dataset')
    group.add_argument('--timeout', type=utils.positive_float, default=30.0,
                       help='seconds a request may take before a silent worker counts as failed')
    group.add_argument('--startup-timeout', type=utils.positive_float, default=300.0,
                       help='seconds the workers may take to load their models')
    group.add_argument('--dropout-tolerant', action='store_true',
                       help='drop a failed worker and answer from the others (its tokens zero-filled)')
    group.add_argument('--fp16-tokens', action='store_true', help='send tokens (and activations) as fp16')
    group.add_argument('--input-dtype', default='fp32', choices=['uint8', 'fp32'],
                       help='send the preprocessed image as uint8 pixels (normalised by the worker) or fp32')
    group.add_argument('--worker-model-path', default=None,
                       help='checkpoint a worker takes its backbone from (default: --model-path)')
    group.add_argument('--ema', action='store_true', help="use the checkpoint's EMA weights")
    group.add_argument('--nb-classes', type=utils.positive_int, default=None,
                       help='classes of a teacher without an ensemble checkpoint (default: the dataset\'s)')
    group.add_argument('--monolithic-model', default=None, choices=['teacher', 'ensemble'],
                       help='what --mode monolithic runs (default: the teacher if --teacher-model/--teacher-path '
                            'is given or there is no --model-path, else the ensemble)')
    group.add_argument('--warmup', type=utils.non_negative_int, default=2, help='unmeasured requests first')
    group.add_argument('--threads', type=utils.positive_int, default=None, help='torch threads per process')
    group.add_argument('--report', default=None, metavar='FILE.json', help='write the report here')
    group.add_argument('--csv', default=None, metavar='FILE.csv', help='write one row per image here')
    # Fault injection for the tests: worker R exits, is killed or stalls at the request holding image K.
    group.add_argument('--fault', default=None, choices=['exit', 'kill', 'stall'], help=argparse.SUPPRESS)
    group.add_argument('--fault-rank', type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument('--fault-after', type=utils.non_negative_int, default=0, help=argparse.SUPPRESS)
    group.add_argument('--fault-seconds', type=utils.positive_float, default=3600.0, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.monolithic_model is None:
        teacher = args.teacher_model or args.teacher_path or not args.model_path
        args.monolithic_model = 'teacher' if teacher else 'ensemble'
    args.teacher_model = args.teacher_model or DEFAULT_TEACHER
    if args.dropout_tolerant and args.mode != 'collab':
        parser.error('--dropout-tolerant needs --mode collab (a pipeline cannot skip a stage)')
    if args.fault and args.fault_rank is None:
        parser.error('--fault needs --fault-rank')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except PeerError as err:
        rank = env_rank()[0]
        print(f'{f"[rank {rank}] " if rank else ""}error: {err}', file=sys.stderr, flush=True)
        # A process group with a dead or stalled peer can block in its teardown: leave at once.
        os._exit(1)


if __name__ == '__main__':
    utils.run_main(main)
