"""collab_infer.py's command line: its flags, their checks, and the one call each mode makes (the batch evaluation,
the service, a worker rank). The modes themselves: collab/host/modes.py and collab/host/server.py.
"""
import argparse
import sys

import cli
from collab import launcher
from collab.backends import BACKENDS
from collab.dispatch import CollabError
from collab.host.modes import MODES, run, run_worker
from collab.worker import FP16_MODEL_NEEDS

DEFAULT_TEACHER = 'deit_base_distilled_patch16_224'


def get_parser():
    parser = argparse.ArgumentParser('DeViT collaborative inference', parents=[cli.data_args(training=False)])
    # None: taken from the ensemble checkpoint's training args, so a bare --model-path is enough.
    parser.set_defaults(dataset=None)
    group = parser.add_argument_group('models')
    group.add_argument('--model-path', '--model_path', dest='model_path', default=None,
                       help='the stage-3 ensemble checkpoint (--backend torch) or the folder export_onnx.py wrote')
    cli.add_teacher_flags(group, default=None)
    cli.add_common_flags(group)
    group = parser.add_argument_group('collaborative inference')
    group.add_argument('--batch-size', type=cli.positive_int, default=1, help='images per request')
    group.add_argument('--mode', default='collab', choices=MODES,
                       help='collab (DeViT), layer-split (teacher cut into N stages) or monolithic (one process)')
    group.add_argument('--backend', default='torch', choices=BACKENDS,
                       help='torch: --model-path is the stage-3 checkpoint; onnxruntime: the export_onnx.py folder')
    group.add_argument('--limit', type=cli.positive_int, default=None, help='first K images of the test set')
    group.add_argument('--images', nargs='+', default=None, metavar='FILE',
                       help='predict these image files instead of evaluating a dataset')
    group.add_argument('--timeout', type=cli.positive_float, default=30.0,
                       help='seconds a request may take before a silent worker counts as failed')
    group.add_argument('--deadline-ms', type=cli.positive_float, default=None,
                       help='answer each request with the devices whose tokens arrived within D ms (the others '
                            'zero-filled; a late device stays in service)')
    group.add_argument('--startup-timeout', type=cli.positive_float, default=300.0,
                       help='seconds the workers may take to join (batch runs)')
    group.add_argument('--dropout-tolerant', action='store_true',
                       help='answer from the devices still up when one fails (its tokens zero-filled)')
    group.add_argument('--fp16-tokens', action='store_true', help='send tokens (and activations) as fp16')
    group.add_argument('--fp16-model', action='store_true',
                       help="onnxruntime: run the export's half-precision graphs on the workers and the head "
                            '(export_onnx.py --fp16; on the TensorRT provider, TensorRT\'s fp16 kernels)')
    group.add_argument('--input-dtype', default='fp32', choices=['uint8', 'fp32'],
                       help='send the preprocessed image as uint8 pixels (normalised by the worker) or fp32')
    group.add_argument('--worker-model-path', default=None,
                       help='checkpoint (or export) a worker takes its model from (default: --model-path)')
    group.add_argument('--ema', action='store_true', help="use the checkpoint's EMA weights")
    group.add_argument('--nb-classes', type=cli.positive_int, default=None,
                       help='classes of a teacher without an ensemble checkpoint (default: the dataset\'s)')
    group.add_argument('--monolithic-model', default=None, choices=['teacher', 'ensemble'],
                       help='what --mode monolithic runs (default: the teacher if --teacher-model/--teacher-path '
                            'is given or there is no --model-path, else the ensemble)')
    group.add_argument('--warmup', type=cli.non_negative_int, default=2, help='unmeasured requests first')
    group.add_argument('--threads', type=cli.positive_int, default=None,
                       help='intra-op threads per process (torch threads, onnxruntime sessions)')
    group.add_argument('--cpu-quota', type=cli.positive_float, nargs='+', default=None, metavar='Q',
                       help='limit worker r to Q[r-1] of one CPU core (cgroup CFS quota: emulated slow devices)')
    group.add_argument('--cpu-reserve', action='store_true',
                       help='with --cpu-quota: each worker also claims its quota (CFS weight), so that other busy '
                            'processes do not hold an emulated device below it')
    group.add_argument('--collab-port', type=cli.positive_int, default=None,
                       help=f'port the aggregator listens on for workers (default MASTER_PORT + 1 under a launcher, '
                            f'else {launcher.DEFAULT_PORT})')
    group.add_argument('--report', default=None, metavar='FILE.json', help='write the report here')
    group.add_argument('--csv', default=None, metavar='FILE.csv', help='write one row per image here')
    cli.add_progress_flag(group)
    group.add_argument('--logits', default=None, metavar='FILE.npy',
                       help='write the logits the aggregator computed, one row per image (numpy .npy, float32)')
    group = parser.add_argument_group('security (docs/security.md)')
    group.add_argument('--keys', default=None, metavar='DIR',
                       help='CURVE keys of the fleet (python -m collab.keys init DIR --devices N): every device link '
                            'is authenticated and encrypted; without it everything binds 127.0.0.1 only')
    group.add_argument('--collab-host', default=None, metavar='ADDR',
                       help='address the aggregator listens on for workers (default: every interface with --keys, '
                            'else 127.0.0.1)')
    group.add_argument('--insecure', action='store_true',
                       help='allow listening on a non-loopback address without keys (a network you trust)')
    group = parser.add_argument_group('service')
    group.add_argument('--serve', action='store_true', help='serve HTTP requests until SIGINT/SIGTERM')
    group.add_argument('--port', type=cli.positive_int, default=8080, help='HTTP port of --serve')
    group.add_argument('--host', default='127.0.0.1',
                       help='HTTP address of --serve (another address needs --keys or --insecure)')
    group.add_argument('--topk', type=cli.positive_int, default=5, help='classes in each answer')
    group.add_argument('--max-batch', type=cli.positive_int, default=8,
                       help='images waiting for the devices sent together, at most this many (1: one at a time)')
    group.add_argument('--grpc-port', type=cli.positive_int, default=None,
                       help='serve the Open Inference Protocol over gRPC on this port too')
    group.add_argument('--model-name', default='devit', help='the model\'s name in the Open Inference Protocol')
    group.add_argument('--token-file', default=None, metavar='FILE',
                       help='tokens (python -m collab.keys token FILE): every endpoint but the health probes needs '
                            '"Authorization: Bearer TOKEN"')
    group.add_argument('--drain-s', type=cli.positive_float, default=10.0,
                       help='seconds SIGTERM waits for requests in flight before the workers are stopped')
    # Fault injection for the tests: worker R exits, is killed or stalls at the request holding image K.
    group.add_argument('--fault', default=None, choices=['exit', 'kill', 'stall'], help=argparse.SUPPRESS)
    group.add_argument('--fault-rank', type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument('--fault-after', type=cli.non_negative_int, default=0, help=argparse.SUPPRESS)
    group.add_argument('--fault-seconds', type=cli.positive_float, default=3600.0, help=argparse.SUPPRESS)
    group = parser.add_argument_group('service limits (docs/deployment.md)')
    group.add_argument('--max-body-mb', type=cli.positive_float, default=16.0, help='largest request body (413)')
    group.add_argument('--max-pixels', type=cli.positive_int, default=None,
                       help='largest decoded image, checked from its header before decoding (413; default '
                            'max(256 x input pixels, 4,000,000))')
    group.add_argument('--decode-concurrency', type=cli.positive_int, default=2, help='images decoded at once')
    group.add_argument('--body-timeout-s', type=cli.positive_float, default=10.0,
                       help='seconds a request body may take to arrive (408, the connection closed)')
    group.add_argument('--header-timeout-s', type=cli.positive_float, default=10.0,
                       help='seconds a request line and headers may take to arrive, from the connection opening or '
                            'the previous answer (408, the connection closed; an idle kept-alive one just closed)')
    group.add_argument('--max-inflight', type=cli.positive_int, default=64,
                       help='requests answered at once; more get 503 with Retry-After')
    group.add_argument('--max-connections', type=cli.positive_int, default=1000,
                       help='open connections, and requests running, at once (more get 503 with Retry-After)')
    group.add_argument('--backlog', type=cli.positive_int, default=2048, help='listen backlog of the HTTP socket')
    return parser


def parse_args(argv=None):
    parser = get_parser()
    args = cli.parse_args(parser, argv)
    if args.monolithic_model is None:
        teacher = args.teacher_model or args.teacher_path or not args.model_path
        args.monolithic_model = 'teacher' if teacher else 'ensemble'
    args.teacher_model = args.teacher_model or DEFAULT_TEACHER
    if args.dropout_tolerant and args.mode != 'collab':
        parser.error('--dropout-tolerant needs --mode collab (a pipeline cannot skip a stage)')
    if args.deadline_ms is not None and args.mode != 'collab':
        parser.error('--deadline-ms needs --mode collab (a pipeline cannot skip a stage)')
    if args.serve and args.mode != 'collab':
        parser.error('--serve needs --mode collab')
    if args.serve and (args.images or args.report or args.csv or args.logits or args.limit):
        parser.error('--serve answers HTTP requests: --images, --limit, --report, --csv and --logits are for batch '
                     'runs')
    if args.mode == 'collab' and not args.model_path:
        parser.error('--mode collab needs --model-path (the stage-3 checkpoint, or an export folder with '
                     '--backend onnxruntime)')
    if args.fp16_model and args.backend != 'onnxruntime':
        parser.error(FP16_MODEL_NEEDS)
    if args.fault and args.fault_rank is None:
        parser.error('--fault needs --fault-rank')
    if args.cpu_reserve and not args.cpu_quota:
        parser.error('--cpu-reserve needs --cpu-quota (the share each worker claims)')
    return args


def main(argv=None):
    args = parse_args(argv)
    if launcher.env_rank()[0] > 0:  # ranks 1..N of a launcher: a device (or stage) worker
        sys.exit(run_worker(args))
    if launcher.launched():
        launcher.exit_with_launcher(name='[rank 0]')
    try:
        if args.serve:
            from collab.host.server import serve

            return serve(args)
        return run(args)
    except CollabError as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        sys.exit(1)

