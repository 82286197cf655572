"""The aggregator's side of the three ways of serving an image, and the batch evaluation run.

- collab (DeViT): the image goes to every device worker; worker i runs backbone i and returns only its final tokens
  B×(P·d_i); the ensemble head runs here. A device that is missing (died, stalled past --timeout, or late for the
  --deadline-ms) is an error, unless the run is --dropout-tolerant or has a deadline: then its tokens are
  zero-filled, as the head trained with --device-dropout expects, and the answer says which devices were used.
- layer-split: the teacher's blocks cut into N consecutive groups, one per worker; the image goes to stage 0,
  activations B×T×D travel from stage to stage directly (each stage binds a socket, the aggregator tells stage r
  where r+1 is), and the last stage returns the logits.
- monolithic: the teacher or the whole ensemble in this one process.

`setup` builds what the batch evaluation (`run`) and the service (collab/host/service.py) share: the head, the
dispatcher with its workers, the preprocessing. A client's `__call__(x, index)` is one request.
"""
import asyncio
import itertools
import os
import sys
import threading
import time
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import cli
from data_transforms import build_transform, recorded_mean_std
from datasets import build_dataset, load_image
from fileio import DatasetError
from models import factory
from models.checkpoint import args_dict, checkpoint_info
from models.ensemble_model import DeViTEnsemble, load_ensemble, read_ensemble_checkpoint

from .. import backends, keys, launcher, sessions, wire, worker
from ..dispatch import CollabError, Dispatcher
from . import report, torch_models

MODES = ('collab', 'layer-split', 'monolithic')
WARMUP = worker.WARMUP


class Reply(NamedTuple):
    """One request as seen by the aggregator. times: ms for latency (end to end), send, compute (slowest worker, or
    sum of stages), gather, head. nbytes: payload bytes of this request by kind, all links. worker_ms: each rank's
    own forward time. used / missing: the devices whose tokens were used, and why the others were not."""
    logits: np.ndarray
    times: dict
    nbytes: dict
    worker_ms: dict
    used: list
    missing: dict


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1e3


def slot_names(what: str = 'device'):
    """How messages name slot i: by rank under a launcher (rank i+1), by index for standalone workers."""
    if launcher.launched():
        return lambda i: f'worker rank {i + 1} ({what} {i})'
    return lambda i: f'{what} {i}'


def where(index: int) -> str:
    return 'during warm-up' if index == WARMUP else f'at image {index}'


# ---------------------------------------------------------------------------------------------------------------
# The model side of the aggregator

class HeadSpec(NamedTuple):
    """What the aggregator holds and expects of its devices."""
    head: object  # torch_models.TorchHead or backends.OnnxHead: .run(tokens) -> logits
    widths: list
    input: dict  # size, channels, mean, std
    specs: list  # per device {model, kwargs}
    num_classes: int
    class_names: list | None
    train_args: dict  # the checkpoint's training arguments (data defaults)
    ensemble: DeViTEnsemble | None  # torch only (the monolithic baseline uses it)



def load_head(args) -> HeadSpec:
    """The ensemble head of --model-path: a stage-3 checkpoint (--backend torch) or an export (onnxruntime)."""
    if args.backend == 'onnxruntime':
        head = backends.OnnxHead(args.model_path, args.threads, fp16=args.fp16_model)
        train_args = dict(head.manifest.get('data') or {})  # (its `source` is informational, never read)
        return HeadSpec(head, head.widths, head.input, head.specs, head.num_classes, head.class_names, train_args,
                        None)
    ckpt = read_ensemble_checkpoint(args.model_path)
    ens = load_ensemble(ckpt, args.ema).eval()
    size, chans = factory.input_spec(ens.backbones[0])
    train_args = args_dict(ckpt.get('args')) or {}
    mean, std = recorded_mean_std(train_args, chans)
    return HeadSpec(torch_models.TorchHead(ens), ens.token_widths(),
                    {'size': int(size), 'channels': int(chans), 'mean': list(mean), 'std': list(std)},
                    [dict(s) for s in ens.config['backbones']], ens.num_classes, None, train_args, ens)


def resolve_data_args(args, train_args) -> None:
    """Dataset, path and transforms default to those the ensemble was trained with (its checkpoint's 'args')."""
    if args.dataset is None:
        args.dataset = train_args.get('dataset') or 'fashion_mnist'
        path = train_args.get('data_path')
        if args.data_path is None and path and os.path.exists(path):
            args.data_path = path
    args.tiny_transforms = args.tiny_transforms or bool(train_args.get('tiny_transforms'))


class Preprocess:
    """An image (file or bytes) -> 1×C×S×S normalised float32, as the evaluation transform of the dataset."""

    def __init__(self, args, size: int, chans: int, mean=None, std=None):
        self.transform = build_transform(False, size, chans, args.tiny_transforms, args, mean=mean, std=std)
        self.grey_as_is = bool(args.tiny_transforms)  # TinyTransform takes one grey channel as it is

    def file(self, path: str) -> torch.Tensor:
        return self.transform(load_image(path))

    def bytes(self, data: bytes, max_pixels: int | None = None) -> torch.Tensor:
        """A PNG or JPEG file's bytes (no other format); one of more than `max_pixels` pixels is refused from its
        header, before it is decoded."""
        import io

        from PIL import Image, UnidentifiedImageError

        if not data:
            raise DatasetError('the body is empty: send the image file (PNG or JPEG) as the body')
        try:
            with Image.open(io.BytesIO(data), formats=('PNG', 'JPEG')) as img:
                if max_pixels and img.size[0] * img.size[1] > max_pixels:
                    raise DatasetError(f'the image has {img.size[0] * img.size[1]} pixels; at most {max_pixels} '
                                       'are taken')
                return self.transform(img if self.grey_as_is and img.mode == 'L' else img.convert('RGB'))
        except UnidentifiedImageError:
            raise DatasetError(f'the body ({len(data)} bytes) is not an image file PIL can read (send a PNG or '
                               'JPEG)') from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DatasetError(f'cannot read the image ({len(data)} bytes): {err}') from None


def class_names_for(args, spec_names, size, chans):
    if spec_names:
        return list(spec_names)
    try:  # names only: prediction still works without the dataset
        return build_dataset(args.dataset, args.data_path, 'val', input_size=size, in_chans=chans,
                             tiny=True).class_names
    except (DatasetError, OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Images fed by the aggregator

class ImageSource:
    """Batches (x B×C×H×W normalised, labels B or None, ids, index of the first image) from a dataset or files."""

    def __init__(self, args, img_size: int, in_chans: int, mean=None, std=None):
        self.batch_size = args.batch_size
        self.files = list(args.images or [])
        if self.files:
            self.pre = Preprocess(args, img_size, in_chans, mean, std)
            self.num_images = len(self.files)
            self.class_names = class_names_for(args, None, img_size, in_chans)
            self.num_classes = len(self.class_names) if self.class_names else None
        else:
            ds = build_dataset(args.dataset, args.data_path, 'val', input_size=img_size, in_chans=in_chans,
                               tiny=args.tiny_transforms, args=args)
            self.class_names, self.num_classes = ds.class_names, ds.num_classes
            self.dataset = Subset(ds, range(min(args.limit or len(ds), len(ds))))
            self.num_images = len(self.dataset)

    def __iter__(self):
        if self.files:
            for i in range(0, len(self.files), self.batch_size):
                names = self.files[i:i + self.batch_size]
                yield torch.stack([self.pre.file(f) for f in names]), None, names, i
        else:
            loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)
            i = 0
            for x, y in loader:
                yield x, y, list(range(i, i + len(y))), i
                i += len(y)


# ---------------------------------------------------------------------------------------------------------------
# Clients

class LoopEvent(threading.Event):
    """A threading.Event that a coroutine of the running event loop can also await: `set` from any thread wakes it."""

    def __init__(self):
        super().__init__()
        self.loop = asyncio.get_running_loop()
        self.future = self.loop.create_future()

    def set(self):
        super().set()
        try:
            if asyncio.get_running_loop() is self.loop:
                return self._resolve()
        except RuntimeError:  # (another thread, with no loop running)
            pass
        try:
            self.loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:  # the loop has closed: nobody awaits it any more
            pass

    def clear(self):
        super().clear()
        if self.future.done():
            self.future = self.loop.create_future()

    def _resolve(self):
        if not self.future.done():
            self.future.set_result(None)

    async def wait_async(self, timeout=None) -> bool:
        """True once set, False after `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                await self.future
        except TimeoutError:
            return self.is_set()
        return True


class CollabClient:
    """DeViT: the image to every device, tokens back, the ensemble head here. Thread-safe (the gRPC front end
    calls it from its threads); `acall` for a coroutine (the HTTP front end's)."""

    def __init__(self, dispatcher: Dispatcher, spec: HeadSpec, codec: wire.ImageCodec):
        self.dispatcher, self.spec, self.codec = dispatcher, spec, codec
        self.num_devices = len(spec.widths)
        self.dropped: list[dict] = []  # devices missing from an answer: when, why, and when they were back
        self._lost: dict[int, dict] = {}
        self._lock = threading.Lock()

    def __call__(self, x, index: int) -> Reply:
        return self.gather(self.submit(x, index), index)

    async def acall(self, x, index: int) -> Reply:
        """The same from a coroutine: the dispatcher's thread wakes the event loop itself (no thread in between)."""
        done = LoopEvent()
        req = self.submit(x, index, done)
        timeout = self.dispatcher.timeout + 60
        if not await done.wait_async(timeout):
            raise CollabError(f'request {req.id} got no answer within {timeout:g} s (the dispatcher is stuck?) '
                              f'{where(index)}')
        return self.gather(req, index)

    def submit(self, x, index: int, done=None):
        return self.dispatcher.submit(self.codec.encode(np.asarray(x, dtype=np.float32)), index, done)

    def gather(self, req, index: int) -> Reply:
        """The ensemble's answer to a submitted request (waiting for it), the head run here."""
        try:
            req.wait(self.dispatcher.timeout + 60)
        except CollabError as err:
            raise CollabError(f'{err} {where(index)}') from None
        t_gathered = time.perf_counter()
        tokens = [None] * self.num_devices
        worker_ms = {}
        for i, (arr, header) in req.results.items():
            tokens[i] = arr
            worker_ms[i + 1] = float(header.get('compute_ms', 0.0))
        logits = self.spec.head.run(tokens)
        t_head = time.perf_counter()
        self._track(req.missing, sorted(req.results), index)
        return Reply(logits, {'latency': _ms(req.submitted, t_head), 'send': _ms(req.submitted, req.sent),
                              'compute': max(worker_ms.values()), 'gather': _ms(req.sent, t_gathered),
                              'head': _ms(t_gathered, t_head)},
                     dict(req.nbytes), worker_ms, sorted(req.results), dict(req.missing))

    def _track(self, missing: dict, used: list, index: int) -> None:
        names = self.dispatcher.slots
        with self._lock:
            for i, reason in sorted(missing.items()):
                if i not in self._lost:
                    entry = {'rank': i + 1, 'device': i, 'at_image': index, 'reason': reason}
                    self._lost[i] = entry
                    self.dropped.append(entry)
                    print(f'warning: answering without {names[i].name} {where(index)}: {reason}', file=sys.stderr,
                          flush=True)
            for i in used:
                if i in self._lost:
                    self._lost.pop(i)['back_at_image'] = index
                    print(f'{names[i].name} answers again {where(index)}', file=sys.stderr, flush=True)

    def close(self) -> None:
        self.dispatcher.stop_workers()
        self.dispatcher.close()


class PipelineClient:
    """Layer-split: the image to stage 0, the logits back from stage N-1; stage times and activation bytes ride
    along with the activations."""

    def __init__(self, dispatcher: Dispatcher, codec: wire.ImageCodec):
        self.dispatcher, self.codec, self.n = dispatcher, codec, len(dispatcher.slots)
        self.dropped: list[dict] = []

    def __call__(self, x, index: int) -> Reply:
        req = self.dispatcher.submit(self.codec.encode(np.asarray(x, dtype=np.float32)), index)
        try:
            req.wait(self.dispatcher.timeout + 60)
        except CollabError as err:
            raise CollabError(f'{err} {where(index)} (a pipeline stops at its first broken stage: '
                              f'stages 0..{self.n - 1})') from None
        t_gathered = time.perf_counter()
        logits, header = req.results[self.n - 1]
        record = header['record']
        worker_ms = {r: float(record[r]) for r in range(1, self.n + 1)}
        return Reply(np.asarray(logits), {'latency': _ms(req.submitted, t_gathered),
                                          'send': _ms(req.submitted, req.sent), 'compute': sum(worker_ms.values()),
                                          'gather': _ms(req.sent, t_gathered), 'head': 0.0},
                     dict(req.nbytes), worker_ms, list(range(self.n)), {})

    def close(self) -> None:
        self.dispatcher.stop_workers()
        self.dispatcher.close()


class LocalClient:
    """Monolithic: one model in this process. An ensemble's backbones count as compute and its head as head."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model.to(device), device
        self.ensemble = isinstance(model, DeViTEnsemble)
        self.dropped: list[dict] = []

    @torch.inference_mode()
    def __call__(self, x, index: int) -> Reply:
        t0 = time.perf_counter()
        x = torch.as_tensor(x).to(self.device)
        if self.ensemble:
            tokens = [self.model.device_tokens(i, x) for i in range(self.model.num_devices)]
            _synchronize(self.device)
            t1 = time.perf_counter()
            logits = self.model.head_forward(tokens).eval_logits()
        else:
            logits = self.model(x)
            _synchronize(self.device)
            t1 = time.perf_counter()
        logits = logits.cpu().numpy()
        t2 = time.perf_counter()
        return Reply(logits, {'latency': _ms(t0, t2), 'send': 0.0, 'compute': _ms(t0, t1), 'gather': 0.0,
                              'head': _ms(t1, t2)}, {}, {0: _ms(t0, t1)}, [], {})

    def close(self) -> None:
        pass


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Set-up

def _check_world(world: int, num_workers: int, mode: str) -> None:
    if not launcher.launched() or (world == num_workers + 1 and num_workers >= 1):
        return
    what = f'an ensemble of {num_workers} devices' if mode == 'collab' else 'a pipeline'
    need = f'{num_workers + 1} processes (--nproc_per_node={num_workers + 1})' if mode == 'collab' else \
        'at least 2 processes'
    raise ValueError(f'--mode {mode} with {what} needs {need}: rank 0 aggregates, ranks 1..N are the devices; '
                     f'got world size {world}')


def settings(args, mean, std, num_classes: int) -> dict:
    """What every worker is told in its welcome: the run's choices, made here."""
    return {'input_dtype': args.input_dtype, 'wire_dtype': 'fp16' if args.fp16_tokens else 'fp32',
            'mean': [float(v) for v in mean], 'std': [float(v) for v in std], 'num_classes': int(num_classes)}


def _log_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def listen_endpoint(args) -> str:
    """Where the aggregator listens for workers: every interface with --keys, else 127.0.0.1 (a launcher whose
    MASTER_ADDR is another host's needs --keys or --insecure); --collab-host chooses. One line says which."""
    host = args.collab_host
    if host is None:
        master = os.environ.get('MASTER_ADDR', '127.0.0.1') if launcher.launched() else '127.0.0.1'
        host = '*' if args.keys or not keys.is_loopback(master) else '127.0.0.1'
    said = keys.check_bind('0.0.0.0' if host in ('*', '') else host, args.keys, args.insecure, 'the aggregator')
    if said:
        _log_line(said)
    if ':' in host and not host.startswith('['):
        host = f'[{host}]'
    return f'tcp://{host}:{launcher.aggregator_port(args.collab_port)}'


def max_message(args, floats_per_image: int) -> int:
    """The size cap of a worker's message to the aggregator: a full batch of its answer, in float64 at most."""
    batch = max(args.batch_size, getattr(args, 'max_batch', 1) or 1, 1)
    return wire.HEADER_BYTES + min(batch, wire.MAX_BATCH) * int(floats_per_image) * 8


def setup_collab(args, on_broken=None, threaded=True) -> tuple[CollabClient, HeadSpec]:
    """The head and the dispatcher of --mode collab, its workers joined (the service does not wait for them).
    on_broken(why): what to do if the dispatcher's I/O thread ever dies (the service exits). threaded=False: a
    caller-driven dispatcher, for the batch evaluation's one thread."""
    spec = load_head(args)
    resolve_data_args(args, spec.train_args)
    n = len(spec.widths)
    _check_world(launcher.env_rank()[1], n, 'collab')
    if args.cpu_quota and len(args.cpu_quota) != n:
        raise ValueError(f'--cpu-quota has {len(args.cpu_quota)} values for {n} devices')
    inp = spec.input
    num_classes = args.nb_classes or spec.num_classes
    dispatcher = Dispatcher(
        n, lambda i: {'input': inp, 'token_width': spec.widths[i], 'model': spec.specs[i]},
        settings(args, inp['mean'], inp['std'], num_classes), listen_endpoint(args), args.timeout, args.deadline_ms,
        args.dropout_tolerant, names=slot_names(), log=_log_line, keys=args.keys,
        max_message=max_message(args, max(spec.widths)), on_broken=on_broken, threaded=threaded)
    return CollabClient(dispatcher, spec, wire.ImageCodec(args.input_dtype, inp['mean'], inp['std'])), spec


def setup(args):
    """The aggregator of a batch run: (client, source, extra report fields) once every worker has joined."""
    world = launcher.env_rank()[1]
    if args.mode == 'collab':
        client, spec = setup_collab(args, threaded=False)
        size, chans = spec.input['size'], spec.input['channels']
        source = ImageSource(args, size, chans, spec.input['mean'], spec.input['std'])
        try:
            client.dispatcher.wait_ready(args.startup_timeout)
        except CollabError:
            client.close()
            raise
        extra = {'num_devices': len(spec.widths), 'token_widths': spec.widths, 'image_shape': [chans, size, size],
                 'world_size': world if launcher.launched() else len(spec.widths) + 1,
                 'workers': client.dispatcher.health()}
        return client, source, extra

    if args.backend != 'torch':
        raise ValueError(f'--mode {args.mode} runs PyTorch models: use --backend torch')
    spec = load_head(args) if args.model_path else None
    resolve_data_args(args, spec.train_args if spec else {})
    if args.mode == 'layer-split' or args.monolithic_model == 'teacher':
        size, chans, tokens, dim = torch_models.teacher_shape(args.teacher_model, args.teacher_kwargs)
    else:
        if spec is None:
            raise ValueError('--mode monolithic needs --model-path (ensemble) or --monolithic-model teacher')
        size, chans = spec.input['size'], spec.input['channels']
    source = ImageSource(args, size, chans)
    num_classes = args.nb_classes or (spec.num_classes if spec else None) or source.num_classes
    if not num_classes:
        raise ValueError('number of classes unknown: give --nb-classes, --model-path or a dataset')
    extra = {'num_devices': 1, 'image_shape': [chans, size, size], 'world_size': world}

    if args.mode == 'monolithic':
        if args.monolithic_model == 'teacher':
            model = torch_models.build_teacher(args.teacher_model, args.teacher_kwargs, num_classes,
                                               args.teacher_path, args.seed)
            extra.update(model=args.teacher_model, random_weights=not args.teacher_path)
        else:
            model = spec.ensemble
            extra.update(model='ensemble', num_devices=model.num_devices)
        return LocalClient(model, torch_models.compute_device(args.device, 0)), source, extra

    if not launcher.launched():
        raise ValueError('--mode layer-split runs its stages as the launcher\'s ranks 1..N: start it with '
                         'torch.distributed.launch or torchrun and N+1 processes')
    n = world - 1
    _check_world(world, n, 'layer-split')
    if n < 1:
        raise ValueError(f'--mode layer-split needs at least 2 processes, got world size {world}')
    teacher_args = args_dict(checkpoint_info(args.teacher_path).get('args')) if args.teacher_path else None
    mean, std = recorded_mean_std(teacher_args, chans)  # as the teacher was trained
    inp = {'size': size, 'channels': chans, 'mean': list(mean), 'std': list(std)}
    teacher = {'model': args.teacher_model, 'kwargs': dict(args.teacher_kwargs)}
    dispatcher = Dispatcher(
        n, lambda i: {'input': {'size': size, 'channels': chans}, 'activation': [tokens, dim], 'model': teacher},
        settings(args, mean, std, num_classes), listen_endpoint(args), args.timeout, pipeline=True,
        names=slot_names('stage'), log=_log_line, keys=args.keys, max_message=max_message(args, num_classes),
        threaded=False)
    client = PipelineClient(dispatcher, wire.ImageCodec(args.input_dtype, inp['mean'], inp['std']))
    try:
        dispatcher.wait_ready(args.startup_timeout)
    except CollabError:
        client.close()
        raise
    extra.update(num_devices=n, model=args.teacher_model, random_weights=not args.teacher_path,
                 activation_floats_per_image=tokens * dim, workers=dispatcher.health())
    return client, source, extra


def run_worker(args) -> int:
    """Ranks 1..N under a launcher: this rank's device (or stage) as a worker of collab.worker. The exit code."""
    rank, world, local_rank = launcher.env_rank()
    name = f'[rank {rank}]'
    launcher.exit_with_launcher(name=name)
    if args.mode == 'monolithic':
        return 0  # nothing to do: the baseline runs on rank 0 alone
    quota = None
    if args.cpu_quota:
        if rank > len(args.cpu_quota):
            print(f'{name} error: --cpu-quota has {len(args.cpu_quota)} values, none for rank {rank}',
                  file=sys.stderr, flush=True)
            return 2
        quota = args.cpu_quota[rank - 1]
    endpoint = launcher.aggregator_endpoint(args.collab_port)
    fault = worker.Fault(args.fault if args.fault_rank == rank else None, args.fault_after, args.fault_seconds,
                         name)
    common = {'cpu_quota': quota, 'exit_on_loss': True, 'startup_timeout': args.startup_timeout, 'fault': fault,
              'extra': {'threads': sessions.default_threads(args.threads)}, 'cpu_reserve': args.cpu_reserve,
              'keys': args.keys}
    if args.mode == 'collab':
        path = args.worker_model_path or args.model_path
        return worker.start(lambda: worker.load_model(args.backend, path, rank - 1, args.threads, args.device,
                                                      args.ema, local_rank, args.fp16_model),
                            endpoint, rank - 1, name, **common)
    return worker.start(lambda: torch_models.TorchStage(args.teacher_model, args.teacher_kwargs, args.teacher_path,
                                                        args.seed, rank - 1, world - 1, args.device, local_rank,
                                                        args.threads),
                        endpoint, rank - 1, name, role='stage', num_stages=world - 1, **common)


# ---------------------------------------------------------------------------------------------------------------
# The run

def measure(client, source: ImageSource, warmup: int, keep_logits: bool = False, progress: bool = False):
    """Feed every batch through `client`: (per-request records, per-image rows, seconds of the measured part);
    `keep_logits`: each row also holds its image's logits (`logits`); `progress`: a bar of the images done."""
    batches = iter(source)
    first = next(batches, None)
    if first is None:
        raise ValueError('no images to run: the dataset is empty')
    for _ in range(warmup):
        client(first[0], WARMUP)
    requests, images = [], []
    bar = cli.progress(total=source.num_images, enabled=progress, desc='images', unit='img')
    t0 = time.perf_counter()
    for x, labels, ids, index in itertools.chain([first], batches):
        reply = client(x, index)
        bar.update(len(ids))
        preds = reply.logits.argmax(axis=1).tolist()
        record = {f'{k}_ms': v for k, v in reply.times.items()}
        record.update(request=len(requests), first_image=index, batch=len(ids), bytes=reply.nbytes,
                      worker_ms=reply.worker_ms, devices=' '.join(map(str, reply.used)))
        requests.append(record)
        results = sum(reply.nbytes.get(k, 0) for k in report.RESULT_KINDS)
        for j, (image, pred) in enumerate(zip(ids, preds)):
            label = None if labels is None else int(labels[j])
            images.append({**record, 'image': image, 'label': label, 'pred': pred,
                           'correct': None if label is None else int(pred == label),
                           'bytes': results / len(ids), 'input_bytes': reply.nbytes.get('input', 0) / len(ids),
                           'worker_ms': ' '.join(f'{ms:.3f}' for _, ms in sorted(reply.worker_ms.items())),
                           **({'logits': reply.logits[j]} if keep_logits else {})})
    seconds = time.perf_counter() - t0
    bar.close()
    return requests, images, seconds


def run(args):
    """The aggregator of a batch run: measure, write --report / --csv, print the table. Returns the report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    client, source, extra = setup(args)
    try:
        requests, images, seconds = measure(client, source, args.warmup, keep_logits=bool(args.logits),
                                            progress=not getattr(args, 'no_progress', False))
    finally:
        client.close()
    meta = {'mode': args.mode, 'batch_size': args.batch_size, 'warmup': args.warmup, 'backend': args.backend,
            'transport': 'zmq', 'input_dtype': args.input_dtype, 'wire_dtype': 'fp16' if args.fp16_tokens else 'fp32',
            'model_precision': 'fp16' if args.fp16_model else 'fp32',
            'threads': torch.get_num_threads(),
            'device': (args.device or 'cpu') if args.backend == 'onnxruntime' else
            str(torch_models.compute_device(args.device, 0)),
            'dataset': None if args.images else args.dataset, 'model_path': args.model_path,
            'dropout_tolerant': bool(args.dropout_tolerant), 'deadline_ms': args.deadline_ms,
            'cpu_quota': args.cpu_quota, 'dropped_ranks': client.dropped, **extra}
    summary = report.summarise(requests, images, meta, seconds)
    if args.images:
        names = source.class_names
        summary['predictions'] = [{'file': i['image'], 'class': i['pred'],
                                   'name': names[i['pred']] if names and i['pred'] < len(names) else None}
                                  for i in images]
        for p in summary['predictions']:
            print(f"{p['file']}\t{p['class']}\t{p['name'] or ''}")
    print(report.format_table(summary), flush=True)
    if args.report:
        report.write_json(args.report, summary)
    if args.csv:
        report.write_csv(args.csv, images)
    if args.logits:
        report.write_logits(args.logits, images)
    return summary
