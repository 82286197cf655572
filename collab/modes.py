"""The three ways of serving an image, each an aggregator-side client and (for the distributed two) a worker loop.

- collab (DeViT): rank 0 sends the image to every worker r = 1..N; worker r runs backbone r-1 and returns only its
  final tokens B×(P·d); rank 0 runs the ensemble head. With --dropout-tolerant a worker that dies or stalls is
  dropped and its tokens are zero-filled from then on.
- layer-split: the teacher's blocks cut into N consecutive groups, one per worker; rank 0 sends the image to rank
  1, activations B×T×D travel 1 -> 2 -> ... -> N, and rank N returns the logits.
- monolithic: the teacher or the whole ensemble in one process (rank 0 only).

Protocol (all int64 unless said): at start rank 0 sends every worker a hello [protocol, mode, uint8 input?, fp16
wire?, num_classes] and each answers [floats it sends per image, image size, channels]. Each request is a header
[RUN, B, index of the first image] then the image (uint8 or fp32); a collab worker answers tokens (fp32 or fp16)
and [its forward ms] (float64); a stage forwards header, activations and a float64 record [activation bytes,
ms of stage 1..N]. A [STOP, 0, 0] header ends the run.
"""
import itertools
import os
import signal
import sys
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from datasets import DatasetError, build_dataset, build_transform, load_image

from . import report, runtime
from .comm import HEADER_LEN, RUN, STOP, WARMUP, Links, PeerError, env_rank, header, init_gloo

MODES = ('collab', 'layer-split', 'monolithic')
PROTOCOL = 1
INFO_LEN = 3


class Settings(NamedTuple):
    """What rank 0 decides for everybody (a worker on another host may have been started with other flags)."""
    mode: str
    input_dtype: str
    fp16: bool
    num_classes: int

    def hello(self) -> torch.Tensor:
        return torch.tensor([PROTOCOL, MODES.index(self.mode), self.input_dtype == 'uint8', self.fp16,
                             self.num_classes], dtype=torch.int64)

    @classmethod
    def from_hello(cls, t: torch.Tensor) -> 'Settings':
        v = t.tolist()
        if v[0] != PROTOCOL:
            raise ValueError(f'the aggregator speaks protocol {v[0]}, this worker {PROTOCOL}: update both')
        return cls(MODES[v[1]], 'uint8' if v[2] else 'fp32', bool(v[3]), int(v[4]))

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.float16 if self.fp16 else torch.float32


class Reply(NamedTuple):
    """One request as seen by rank 0. times: ms for latency (end to end), send, compute (slowest worker, or sum of
    stages), gather, head. nbytes: payload bytes of this request by kind, all links. worker_ms: each rank's own
    forward time."""
    logits: torch.Tensor
    times: dict[str, float]
    nbytes: dict[str, int]
    worker_ms: dict[int, float]


def device_name(rank: int) -> str:
    return f'worker rank {rank} (device {rank - 1})'


def pairs(num_workers: int):
    """Links used by any mode: aggregator <-> each worker, and worker r -> r+1 for the pipeline."""
    return [(0, r) for r in range(1, num_workers + 1)] + [(r, r + 1) for r in range(1, num_workers)]


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1e3


# ---------------------------------------------------------------------------------------------------------------
# Images fed by rank 0

class ImageSource:
    """Batches (x B×C×H×W normalised, labels B or None, ids, index of the first image) from a dataset or files."""

    def __init__(self, args, img_size: int, in_chans: int):
        self.batch_size = args.batch_size
        self.files = list(args.images or [])
        self.class_names = None
        if self.files:
            self.transform = build_transform(False, img_size, in_chans, args.tiny_transforms, args)
            self.num_images = len(self.files)
            try:  # names only: prediction mode still works without the dataset
                self.class_names = build_dataset(args.dataset, args.data_path, 'val', input_size=img_size,
                                                 in_chans=in_chans, tiny=True).class_names
            except (DatasetError, OSError, ValueError):
                pass
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
                yield torch.stack([self.transform(load_image(f)) for f in names]), None, names, i
        else:
            loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)
            i = 0
            for x, y in loader:
                yield x, y, list(range(i, i + len(y))), i
                i += len(y)


# ---------------------------------------------------------------------------------------------------------------
# Clients (rank 0)

class CollabClient:
    """DeViT: image to every worker, tokens back, ensemble head here."""

    def __init__(self, links: Links, ensemble, settings: Settings, timeout: float, dropout_tolerant: bool):
        self.links, self.ens, self.settings = links, ensemble, settings
        self.codec = runtime.InputCodec(settings.input_dtype, runtime.input_spec(ensemble.backbones[0])[1])
        self.timeout, self.dropout_tolerant = timeout, dropout_tolerant
        self.widths = ensemble.token_widths()
        self.live = list(range(1, len(self.widths) + 1))
        self.dropped: list[dict] = []

    def _lose(self, rank: int, err: PeerError, index: int) -> None:
        where = 'during warm-up' if index == WARMUP else f'at image {index}'
        message = f'{device_name(rank)} {err} {where}'
        if not self.dropout_tolerant:
            raise PeerError(rank, message + '; --dropout-tolerant answers from the devices still up') from None
        self.live.remove(rank)
        self.dropped.append({'rank': rank, 'device': rank - 1, 'at_image': index, 'reason': str(err)})
        print(f'warning: dropping {message}; going on with ranks {self.live}', file=sys.stderr, flush=True)
        if not self.live:
            raise PeerError(rank, 'every worker is gone: ' + '; '.join(
                f'rank {d["rank"]} {d["reason"]}' for d in self.dropped))

    def __call__(self, x: torch.Tensor, index: int) -> Reply:
        links, B = self.links, x.shape[0]
        payload = self.codec.encode(x)
        before = links.totals()
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        # Receives are posted first so a fast worker never waits for rank 0 to get round to it.
        answers = {r: (links.irecv((B, self.widths[r - 1]), self.settings.wire_dtype, r, 'tokens'),
                       links.irecv((1,), torch.float64, r, 'control')) for r in self.live}
        sends = {r: (links.isend(header(RUN, B, index), r, 'control'), links.isend(payload, r, 'input'))
                 for r in self.live}
        for r, pending in sends.items():
            try:
                for p in pending:
                    links.wait(p, deadline, self.timeout)
            except PeerError as err:
                self._lose(r, err, index)
        t_sent = time.perf_counter()
        tokens: list[torch.Tensor | None] = [None] * len(self.widths)
        worker_ms = {}
        for r in list(self.live):
            try:
                tok, ms = (links.wait(p, deadline, self.timeout) for p in answers[r])
            except PeerError as err:
                self._lose(r, err, index)
                continue
            tokens[r - 1], worker_ms[r] = tok.float(), float(ms[0])
        t_gathered = time.perf_counter()
        with torch.inference_mode():
            logits = self.ens.head_forward(tokens).eval_logits()
        t_head = time.perf_counter()
        after = links.totals()
        return Reply(logits, {'latency': _ms(t0, t_head), 'send': _ms(t0, t_sent), 'compute': max(worker_ms.values()),
                              'gather': _ms(t_sent, t_gathered), 'head': _ms(t_gathered, t_head)},
                     {k: after[k] - before.get(k, 0) for k in after}, worker_ms)

    def close(self) -> None:
        stop(self.links, self.live)


class PipelineClient:
    """Layer-split: image to rank 1, logits back from rank N; stage times and activation bytes ride along."""

    def __init__(self, links: Links, settings: Settings, num_workers: int, in_chans: int, timeout: float):
        self.links, self.settings, self.n, self.timeout = links, settings, num_workers, timeout
        self.codec = runtime.InputCodec(settings.input_dtype, in_chans)

    def __call__(self, x: torch.Tensor, index: int) -> Reply:
        links, B, last = self.links, x.shape[0], self.n
        payload = self.codec.encode(x)
        before = links.totals()
        t0 = time.perf_counter()
        deadline = t0 + self.timeout
        answers = (links.irecv((B, self.settings.num_classes), torch.float32, last, 'output'),
                   links.irecv((self.n + 1,), torch.float64, last, 'control'))
        try:
            for p in (links.isend(header(RUN, B, index), 1, 'control'), links.isend(payload, 1, 'input')):
                links.wait(p, deadline, self.timeout)
            t_sent = time.perf_counter()
            logits, record = (links.wait(p, deadline, self.timeout) for p in answers)
        except PeerError as err:
            raise PeerError(err.rank, f'{device_name(err.rank)} {err} at image {index} '
                                      f'(a pipeline stops at its first broken stage: ranks 1..{last})') from None
        t_gathered = time.perf_counter()
        after = links.totals()
        nbytes = {k: after[k] - before.get(k, 0) for k in after}
        nbytes['activations'] = int(record[0])
        worker_ms = {r: float(record[r]) for r in range(1, self.n + 1)}
        return Reply(logits, {'latency': _ms(t0, t_gathered), 'send': _ms(t0, t_sent),
                              'compute': sum(worker_ms.values()), 'gather': _ms(t_sent, t_gathered), 'head': 0.0},
                     nbytes, worker_ms)

    def close(self) -> None:
        stop(self.links, [1])  # the stop travels down the pipeline


class LocalClient:
    """Monolithic: one model in this process. An ensemble's backbones count as compute and its head as head."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model.to(device), device
        self.ensemble = isinstance(model, runtime.DeViTEnsemble)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, index: int) -> Reply:
        t0 = time.perf_counter()
        x = x.to(self.device)
        if self.ensemble:
            tokens = [self.model.device_tokens(i, x) for i in range(self.model.num_devices)]
            runtime.synchronize(self.device)
            t1 = time.perf_counter()
            logits = self.model.head_forward(tokens).eval_logits()
        else:
            logits = self.model(x)
            runtime.synchronize(self.device)
            t1 = time.perf_counter()
        logits = logits.cpu()
        t2 = time.perf_counter()
        return Reply(logits, {'latency': _ms(t0, t2), 'send': 0.0, 'compute': _ms(t0, t1), 'gather': 0.0,
                              'head': _ms(t1, t2)}, {}, {0: _ms(t0, t1)})

    def close(self) -> None:
        pass


def stop(links: Links, ranks) -> None:
    """Tell workers to finish; best effort, since some may be gone."""
    for r in ranks:
        try:
            links.send(header(STOP), r, 'control', deadline=time.perf_counter() + 2.0)
        except PeerError:
            pass


# ---------------------------------------------------------------------------------------------------------------
# Worker loops

class Fault:
    """Test hook (--fault-rank R --fault-after K --fault exit|kill|stall): rank R fails at the request holding image
    K. exit: the process vanishes (exit code 0, so a local launcher does not tear the group down first, as with a
    device on another host); kill: SIGKILL; stall: sleep --fault-seconds once, then go on."""

    def __init__(self, args, rank: int):
        self.kind = args.fault if args.fault and args.fault_rank == rank else None
        self.after, self.seconds, self.rank = args.fault_after, args.fault_seconds, rank

    def check(self, index: int, batch: int) -> None:
        if self.kind is None or index == WARMUP or index + batch <= self.after:
            return
        print(f'[rank {self.rank}] fault injected: {self.kind} at image {self.after}', file=sys.stderr, flush=True)
        kind, self.kind = self.kind, None
        if kind == 'exit':
            os._exit(0)
        if kind == 'kill':
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.seconds)


def next_request(links: Links, src: int) -> torch.Tensor | None:
    h = links.recv((HEADER_LEN,), torch.int64, src, 'control')
    return None if int(h[0]) == STOP else h


def serve_collab(links: Links, backbone, settings: Settings, img_shape, device: torch.device, fault: Fault):
    codec = runtime.InputCodec(settings.input_dtype, img_shape[0])
    while (h := next_request(links, 0)) is not None:
        B, index = int(h[1]), int(h[2])
        fault.check(index, B)
        x = links.recv((B, *img_shape), codec.torch_dtype, 0, 'input')
        t0 = time.perf_counter()  # the worker's own time: normalising a uint8 image is part of it
        with torch.inference_mode():
            tokens = backbone(codec.decode(x).to(device))
        runtime.synchronize(device)
        ms = _ms(t0, time.perf_counter())
        links.send(tokens.to(settings.wire_dtype), 0, 'tokens')
        links.send(torch.tensor([ms], dtype=torch.float64), 0, 'control')


def serve_stage(links: Links, stage, rank: int, num_workers: int, settings: Settings, img_shape, act_shape,
                device: torch.device, fault: Fault):
    codec = runtime.InputCodec(settings.input_dtype, img_shape[0])
    prev, nxt = rank - 1, (rank + 1 if rank < num_workers else 0)
    while (h := next_request(links, prev)) is not None:
        B, index = int(h[1]), int(h[2])
        fault.check(index, B)
        if rank == 1:
            x = links.recv((B, *img_shape), codec.torch_dtype, 0, 'input')
            record = torch.zeros(num_workers + 1, dtype=torch.float64)
        else:
            x = links.recv((B, *act_shape), settings.wire_dtype, prev, 'activations')
            record = links.recv((num_workers + 1,), torch.float64, prev, 'control')
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = stage((codec.decode(x) if rank == 1 else x.float()).to(device))
        runtime.synchronize(device)
        record[rank] = _ms(t0, time.perf_counter())
        if nxt:
            out = out.to(settings.wire_dtype)
            record[0] += out.numel() * out.element_size()
            links.send(h, nxt, 'control')
            links.send(out, nxt, 'activations')
        else:
            links.send(out.float(), 0, 'output')
        links.send(record, nxt, 'control')
    if nxt:
        links.send(header(STOP), nxt, 'control')


# ---------------------------------------------------------------------------------------------------------------
# Set-up per role

def _num_classes(args, ensemble, source: ImageSource) -> int:
    n = args.nb_classes or (ensemble.num_classes if ensemble is not None else None) or source.num_classes
    if not n:
        raise ValueError('number of classes unknown: give --nb-classes, --model-path or a dataset')
    return n


def _check_world(world: int, num_workers: int, mode: str, rank: int) -> None:
    if world == num_workers + 1 and num_workers >= 1:
        return
    if rank != 0:
        # Leave the message to rank 0; waiting a moment keeps the launcher from killing it before it prints.
        time.sleep(2)
        sys.exit(2)
    what = f'an ensemble of {num_workers} devices' if mode == 'collab' else 'a pipeline'
    need = f'{num_workers + 1} processes (--nproc_per_node={num_workers + 1})' if mode == 'collab' else \
        'at least 2 processes'
    raise ValueError(f'--mode {mode} with {what} needs {need}: rank 0 aggregates, ranks 1..N are the devices; '
                     f'got world size {world}')


def _receive_infos(links: Links, num_workers: int, settings: Settings, timeout: float) -> dict[int, list[int]]:
    deadline = time.perf_counter() + timeout
    infos = {}
    for r in range(1, num_workers + 1):
        links.send(settings.hello(), r, 'control', deadline, timeout)
    for r in range(1, num_workers + 1):
        try:
            infos[r] = links.recv((INFO_LEN,), torch.int64, r, 'control', deadline, timeout).tolist()
        except PeerError as err:
            raise PeerError(r, f'{device_name(r)} {err} while starting (see its own error above)') from None
    return infos


def check_workers(infos: dict[int, list[int]], widths: list[int] | None, img_size: int, in_chans: int) -> None:
    """Refuse workers whose model does not fit: another input shape, or (collab) another token width than the
    ensemble head expects from that device."""
    for r, (width, size, chans) in infos.items():
        if (size, chans) != (img_size, in_chans):
            raise ValueError(f'{device_name(r)} expects {chans}×{size}×{size} images, the aggregator '
                             f'{in_chans}×{img_size}×{img_size}: its model does not match')
        if widths is not None and width != widths[r - 1]:
            raise ValueError(f'{device_name(r)} sends {width} floats per image but the ensemble head expects '
                             f"{widths[r - 1]} from device {r - 1}: its checkpoint does not match the aggregator's "
                             '--model-path')


def resolve_data_args(args, ckpt_args) -> None:
    """Dataset, path and transforms default to those the ensemble was trained with (its checkpoint's 'args')."""
    if args.dataset is None:
        args.dataset = ckpt_args.get('dataset') or 'fashion_mnist'
        path = ckpt_args.get('data_path')
        if args.data_path is None and path and os.path.exists(path):
            args.data_path = path
    args.tiny_transforms = args.tiny_transforms or bool(ckpt_args.get('tiny_transforms'))


def run_aggregator(args, world: int):
    """Rank 0 of the distributed modes, or the only process of monolithic: returns (client, source, extra report
    fields) once every worker has answered the hello."""
    ensemble = None
    if args.model_path:
        ckpt = runtime.read_ensemble_checkpoint(args.model_path)
        ensemble = runtime.ensemble_from_checkpoint(ckpt, args.ema, args.model_path)
        resolve_data_args(args, runtime.checkpoint_args(ckpt))
        del ckpt
    else:
        resolve_data_args(args, {})
    if args.mode == 'collab':
        if ensemble is None:
            raise ValueError('--mode collab needs --model-path (the stage-3 ensemble checkpoint)')
        img_size, in_chans = runtime.input_spec(ensemble.backbones[0])
    elif args.mode == 'layer-split' or args.monolithic_model == 'teacher':
        img_size, in_chans = runtime.teacher_input_spec(args.teacher_model, args.teacher_kwargs)
    else:
        if ensemble is None:
            raise ValueError('--mode monolithic needs --model-path (ensemble) or --monolithic-model teacher')
        img_size, in_chans = runtime.input_spec(ensemble.backbones[0])
    num_workers = ensemble.num_devices if args.mode == 'collab' else world - 1
    if args.mode != 'monolithic':
        _check_world(world, num_workers, args.mode, 0)
    source = ImageSource(args, img_size, in_chans)
    settings = Settings(args.mode, args.input_dtype, args.fp16_tokens, _num_classes(args, ensemble, source))
    extra = {'num_devices': num_workers if args.mode != 'monolithic' else 1,
             'image_shape': [in_chans, img_size, img_size]}

    if args.mode == 'monolithic':
        if args.monolithic_model == 'teacher':
            model = runtime.build_teacher(args.teacher_model, args.teacher_kwargs, settings.num_classes,
                                          args.teacher_path, args.seed)
            extra.update(model=args.teacher_model, random_weights=not args.teacher_path)
        else:
            model = ensemble
            extra.update(model='ensemble', num_devices=ensemble.num_devices)
        return LocalClient(model, runtime.compute_device(args.device, 0)), source, extra

    init_gloo(args.dist_timeout)
    links = Links(pairs(num_workers), args.dist_timeout)
    infos = _receive_infos(links, num_workers, settings, args.startup_timeout)
    try:
        check_workers(infos, ensemble.token_widths() if args.mode == 'collab' else None, img_size, in_chans)
    except ValueError:
        stop(links, range(1, num_workers + 1))
        raise
    if args.mode == 'collab':
        client = CollabClient(links, ensemble, settings, args.timeout, args.dropout_tolerant)
        extra['token_widths'] = ensemble.token_widths()
    else:
        client = PipelineClient(links, settings, num_workers, in_chans, args.timeout)
        extra.update(model=args.teacher_model, random_weights=not args.teacher_path,
                     activation_floats_per_image=infos[1][0])
    return client, source, extra


def run_worker(args, rank: int, world: int, local_rank: int) -> None:
    """Ranks 1..N: load this device's part, answer the hello, serve requests until STOP."""
    device = runtime.compute_device(args.device, local_rank)
    if args.mode == 'collab':
        path = args.worker_model_path or args.model_path
        if not path:
            raise ValueError('--mode collab needs --model-path (the stage-3 ensemble checkpoint)')
        ckpt = runtime.read_ensemble_checkpoint(path)
        num_workers = len(ckpt[runtime.CONFIG_KEY]['backbones'])
    else:
        num_workers = world - 1
    _check_world(world, num_workers, args.mode, rank)
    init_gloo(args.dist_timeout)
    links = Links(pairs(num_workers), args.dist_timeout)
    settings = Settings.from_hello(links.recv((5,), torch.int64, 0, 'control'))
    if settings.mode != args.mode:
        raise ValueError(f'this worker was started with --mode {args.mode}, the aggregator with {settings.mode}')
    fault = Fault(args, rank)
    try:
        if args.mode == 'collab':
            backbone = runtime.load_backbone(ckpt, rank - 1, args.ema, path).to(device)
            size, chans = runtime.input_spec(backbone.backbone)
            del ckpt
            links.send(torch.tensor([backbone.width, size, chans]), 0, 'control')
            serve_collab(links, backbone, settings, (chans, size, size), device, fault)
        else:
            teacher = runtime.build_teacher(args.teacher_model, args.teacher_kwargs, settings.num_classes,
                                            args.teacher_path, args.seed)
            stage = runtime.split_stages(teacher, num_workers)[rank - 1].to(device)
            size, chans = runtime.input_spec(teacher)
            _, tokens, dim = runtime.activation_shape(teacher, 1)
            links.send(torch.tensor([tokens * dim, size, chans]), 0, 'control')
            serve_stage(links, stage, rank, num_workers, settings, (chans, size, size), (tokens, dim), device,
                        fault)
    except PeerError as err:
        message = f'lost its link to rank {err.rank}: {err}'
        if args.dropout_tolerant:  # the aggregator may have dropped this device and finished without it
            print(f'[rank {rank}] {message}; the aggregator may have dropped this device (--dropout-tolerant)',
                  file=sys.stderr, flush=True)
            os._exit(0)
        raise PeerError(err.rank, message) from None


def serve(args):
    """Run this process's role. Returns (client, source, extra) on rank 0, None on workers."""
    rank, world, local_rank = env_rank()
    if args.threads:
        torch.set_num_threads(args.threads)
    if rank == 0:
        return run_aggregator(args, world)
    if args.mode == 'monolithic':
        return None  # nothing to do: the baseline runs on rank 0 alone
    run_worker(args, rank, world, local_rank)
    return None


# ---------------------------------------------------------------------------------------------------------------
# The run

def measure(client, source: ImageSource, warmup: int):
    """Feed every batch through `client`: (per-request records, per-image rows, seconds of the measured part)."""
    batches = iter(source)
    first = next(batches, None)
    if first is None:
        raise ValueError('no images to run: the dataset is empty')
    for _ in range(warmup):
        client(first[0], WARMUP)
    requests, images = [], []
    t0 = time.perf_counter()
    for x, labels, ids, index in itertools.chain([first], batches):
        reply = client(x, index)
        preds = reply.logits.argmax(dim=1).tolist()
        record = {f'{k}_ms': v for k, v in reply.times.items()}
        record.update(request=len(requests), first_image=index, batch=len(ids), bytes=reply.nbytes,
                      worker_ms=reply.worker_ms)
        requests.append(record)
        results = sum(reply.nbytes.get(k, 0) for k in report.RESULT_KINDS)
        for j, (image, pred) in enumerate(zip(ids, preds)):
            label = None if labels is None else int(labels[j])
            images.append({**record, 'image': image, 'label': label, 'pred': pred,
                           'correct': None if label is None else int(pred == label),
                           'bytes': results / len(ids), 'input_bytes': reply.nbytes.get('input', 0) / len(ids)})
    return requests, images, time.perf_counter() - t0


def run(args):
    """Serve this process's role; on rank 0 measure, write --report / --csv, print the table. Returns the report
    on rank 0, None elsewhere."""
    role = serve(args)
    if role is None:
        if dist.is_initialized():
            dist.destroy_process_group()
        return None
    client, source, extra = role
    try:
        requests, images, seconds = measure(client, source, args.warmup)
    finally:
        client.close()
    meta = {'mode': args.mode, 'world_size': env_rank()[1], 'batch_size': args.batch_size, 'warmup': args.warmup,
            'input_dtype': args.input_dtype, 'wire_dtype': 'fp16' if args.fp16_tokens else 'fp32',
            'threads': torch.get_num_threads(), 'device': str(runtime.compute_device(args.device, 0)),
            'dataset': None if args.images else args.dataset, 'model_path': args.model_path,
            'dropout_tolerant': bool(args.dropout_tolerant),
            'dropped_ranks': getattr(client, 'dropped', []), **extra}
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
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary
