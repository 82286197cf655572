"""The collaborative runtime as a service, without its network front ends (collab/host/http_api.py, grpc_api.py;
started by collab/host/server.py): images checked and decoded, batched, sent to the devices through the dispatcher,
answered as logits and probabilities.

Workers join whenever they start (`python -m collab.worker --aggregator tcp://HOST:P ...` on each board, or the
launcher's ranks 1..N), leave, and join again; the service answers with the devices that are up.

Images that arrive while the devices are busy go out together (`--max-batch`, default 8 images in one message per
device; a request that finds none waiting goes out at once), one such batch in flight across the devices at a
time; each is one request of the same dispatcher the batch evaluation uses. A request of B images (an Open
Inference Protocol tensor [B, C, S, S]) is one dispatcher request of its own.
"""
import collections
import contextlib
import io
import os
import sys
import threading
import time

import numpy as np

from fileio import DatasetError

from ..dispatch import CollabError
from .modes import LoopEvent, Preprocess, class_names_for, setup_collab

FORMATS = ('PNG', 'JPEG')
INLINE_PIXELS = 65536  # an image of at most this many pixels is decoded on the event loop
INLINE_BYTES = 4 * INLINE_PIXELS  # and a binary tensor of at most this many bytes read there (a 224x224 RGB uint8 one)


class Refused(Exception):
    """A request the service does not answer: the HTTP status it maps to and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def default_max_pixels(size: int) -> int:
    """Decoded pixels an image may have: room for a photograph far above the model's input, not a bomb."""
    return max(256 * size * size, 4_000_000)


class Batcher:
    """Images waiting for the devices go out together: a batch is the oldest waiting job and every other one already
    waiting (up to `max_batch` images; a job of more images goes alone); each caller gets its rows of the answer. A
    lone job never waits for company. At most `LANES` batches are in flight.

    The callers run the batches themselves (no thread of the batcher's own, so no hop to one and back): a caller
    that finds a lane free takes the next batch, sends it, and hands out the rows; a caller whose job is waiting
    for a lane sleeps until its job is answered or, when a lane frees up while jobs still wait, is woken to run the
    next batch. A caller is a thread (`batcher(x, index)`, the gRPC front end's) or a coroutine of the event loop
    (`await batcher.run(x, index)`, the HTTP front end's: no thread hop at all), in one queue."""

    LANES = 1  # (measured: with one batch in flight the next grows, fewer messages per image: 1.1x the rate of 2)

    def __init__(self, client, max_batch: int):
        self.client, self.max_batch = client, max_batch
        self.waiting: collections.deque = collections.deque()
        self.running = 0
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray, index: int):
        """(the batch's Reply, this job's first row in it, the batch size) for B×C×H×W images."""
        job = self._queue(x, index, threading.Event())
        while not job['finished']:
            jobs = self._take()
            if jobs is None:
                job['wake'].wait()
                job['wake'].clear()  # (then the state is looked at again: a wake-up in between is not lost)
            else:
                x = self._stack(jobs)
                try:
                    reply = self.client(x, jobs[0]['index'])
                except Exception as err:  # CollabError, or a bug: every caller of the batch gets it
                    self._release(jobs, x, error=err)
                else:
                    self._release(jobs, x, reply)
        return self._answer(job)

    async def run(self, x: np.ndarray, index: int):
        """The same, awaited on the running event loop."""
        job = self._queue(x, index, LoopEvent())
        while not job['finished']:
            jobs = self._take()
            if jobs is None:
                await job['wake'].wait_async()
                job['wake'].clear()
            else:
                x = self._stack(jobs)
                try:
                    reply = await self.client.acall(x, jobs[0]['index'])
                except Exception as err:
                    self._release(jobs, x, error=err)
                except BaseException:  # cancelled: the lane is freed all the same, and the batch's callers told
                    self._release(jobs, x, error=CollabError('the request was cancelled'))
                    raise
                else:
                    self._release(jobs, x, reply)
        return self._answer(job)

    def _queue(self, x, index, wake) -> dict:
        job = {'x': x, 'index': index, 'finished': False, 'wake': wake}
        with self._lock:
            self.waiting.append(job)
        return job

    @staticmethod
    def _answer(job):
        if 'error' in job:
            raise job['error']
        return job['reply'], job['row'], job['size']

    @staticmethod
    def _stack(jobs: list) -> np.ndarray:
        return jobs[0]['x'] if len(jobs) == 1 else np.concatenate([j['x'] for j in jobs])

    def _take(self):
        """The next batch, taken from the waiting jobs, or None (every lane busy, or nothing waits)."""
        with self._lock:
            if self.running >= self.LANES or not self.waiting:
                return None
            self.running += 1
            jobs = [self.waiting.popleft()]
            n = len(jobs[0]['x'])
            while self.waiting and n + len(self.waiting[0]['x']) <= self.max_batch:
                jobs.append(self.waiting.popleft())
                n += len(jobs[-1]['x'])
            return jobs

    def _release(self, jobs: list, x: np.ndarray, reply=None, error=None) -> None:
        """Every job of a batch answered (its rows of `reply`, or `error`), and the lane freed."""
        row = 0
        for j in jobs:
            if error is None:
                j.update(reply=reply, row=row, size=len(x))
                row += len(j['x'])
            else:
                j['error'] = error
        with self._lock:
            self.running -= 1
            head = self.waiting[0] if self.waiting else None
        for j in jobs:
            j['finished'] = True
            j['wake'].set()
        if head is not None:
            head['wake'].set()  # a lane is free and jobs wait: the oldest one's caller runs the next batch


class Service:
    """The ensemble behind a CollabClient, for any front end: decode, infer, health."""

    def __init__(self, args):
        self.args = args
        self.client, spec = setup_collab(args, on_broken=self._on_broken)
        self.size, self.chans = spec.input['size'], spec.input['channels']
        self.mean = np.asarray(spec.input['mean'], np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(spec.input['std'], np.float32).reshape(1, -1, 1, 1)
        self.num_classes = args.nb_classes or spec.num_classes
        self.preprocess = Preprocess(args, self.size, self.chans, spec.input['mean'], spec.input['std'])
        self.class_names = class_names_for(args, spec.class_names, self.size, self.chans)
        self.topk = args.topk
        self.max_pixels = getattr(args, 'max_pixels', None) or default_max_pixels(self.size)
        self.decoding = threading.BoundedSemaphore(getattr(args, 'decode_concurrency', 2))
        self.batcher = Batcher(self.client, args.max_batch)
        self.on_reply = None  # called with (Reply, batch size) after each answer (the metrics)
        self.started = time.time()
        self.count = 0
        self.stats = {'answered': 0, 'bad_request': 0, 'unavailable': 0}
        self._lock = threading.Lock()

    @staticmethod
    def _on_broken(why: str) -> None:
        """The dispatcher's thread died (a bug): /health says so for a second, then the process exits 1 so that its
        supervisor starts it again, rather than staying up and answering 503."""
        print(f'error: {why}; exiting so that a supervisor restarts the service', file=sys.stderr, flush=True)
        threading.Timer(1.0, os._exit, (1,)).start()

    @property
    def dispatcher(self):
        return self.client.dispatcher

    def next_id(self) -> int:
        with self._lock:
            self.count += 1
            return self.count

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    # -- input ----------------------------------------------------------------------------------------------------

    def check_header(self, data: bytes) -> int:
        """Refuse (413/400) an image by its header alone: its format and its pixel count, before decoding. Returns
        the pixel count."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise Refused(400, 'the body is empty: send the image file (PNG or JPEG) as the body')
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                w, h = img.size
        except UnidentifiedImageError:
            raise Refused(400, f'the body ({len(data)} bytes) is not an image file this service reads (send a PNG '
                               'or JPEG)') from None
        except (OSError, SyntaxError, ValueError) as err:
            raise Refused(400, f'cannot read the image ({len(data)} bytes): {err}') from None
        if w * h > self.max_pixels:
            raise Refused(413, f'the image is {w}x{h} = {w * h} pixels; at most {self.max_pixels} are taken '
                               '(--max-pixels)')
        return w * h

    def decode(self, data: bytes, bounded: bool = True) -> np.ndarray:
        """An image file whose header passed `check_header` -> 1×C×S×S normalised float32 (the dataset's evaluation
        transform). bounded: one of --decode-concurrency decodes at a time."""
        with self.decoding if bounded else contextlib.nullcontext():
            try:
                x = self.preprocess.bytes(data, max_pixels=self.max_pixels)
            except DatasetError as err:
                raise Refused(400, str(err)) from None
        return x.unsqueeze(0).numpy()

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """B×C×S×S uint8 pixels -> normalised float32, as ToTensor + Normalize do."""
        return ((pixels.astype(np.float32) / np.float32(255.0)) - self.mean) / self.std

    # -- inference ------------------------------------------------------------------------------------------------

    def infer(self, x: np.ndarray, index: int | None = None):
        """B×C×S×S normalised float32 -> (logits B×K float32, the batch's Reply, batch size). Refused(503)
        when the ensemble cannot answer."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        try:
            got = self.batcher(x, self.next_id() if index is None else index)
        except CollabError as err:
            raise self._unavailable(str(err)) from None
        return self._logits(len(x), *got)

    async def infer_async(self, x: np.ndarray, index: int | None = None):
        """The same, awaited on the running event loop (the HTTP front end's)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        try:
            got = await self.batcher.run(x, self.next_id() if index is None else index)
        except CollabError as err:
            raise self._unavailable(str(err)) from None
        return self._logits(len(x), *got)

    def _unavailable(self, why: str) -> Refused:
        self._count('unavailable')
        return Refused(503, why)

    def _logits(self, n: int, reply, row: int, batch: int):
        if self.on_reply is not None:
            self.on_reply(reply, batch)
        logits = np.asarray(reply.logits[row:row + n], dtype=np.float32)
        if not np.isfinite(logits).all():
            raise self._unavailable('the ensemble produced a non-finite logit')
        self._count('answered')
        return logits, reply, batch

    async def predict(self, body: bytes, topk: int | None, offload) -> dict:
        """POST /predict's answer for one image file. An image of at most INLINE_PIXELS is decoded on the event loop
        (quicker than a hop to a thread); a bigger one by `await offload(fn, *args)` (a thread pool's)."""
        t0 = time.perf_counter()
        index = self.next_id()
        try:
            if self.check_header(body) <= INLINE_PIXELS:
                x = self.decode(body, bounded=False)
            else:
                x = await offload(self.decode, body)
        except Refused:
            self._count('bad_request')
            raise
        t1 = time.perf_counter()
        logits, reply, batch = await self.infer_async(x, index)
        probs = softmax(logits[0].astype(np.float64))
        k = max(1, min(topk or self.topk, len(probs)))
        top = np.argsort(-probs)[:k]
        names = self.class_names
        return {
            'request': index,
            'top': [{'class': int(c), 'name': names[c] if names and c < len(names) else None,
                     'probability': float(probs[c])} for c in top],
            'logits': [float(v) for v in logits[0]],
            'devices': reply.used,
            'missing': {str(i): why for i, why in sorted(reply.missing.items())},
            'batch': batch,
            'latency_ms': {'total': (time.perf_counter() - t0) * 1e3, 'preprocess': (t1 - t0) * 1e3,
                           **{k: v for k, v in reply.times.items() if k != 'latency'}},
        }

    # -- state ----------------------------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the ensemble can answer: every device up, or one up when it may answer without the others."""
        if self.dispatcher.broken:
            return False
        states = [d['state'] for d in self.dispatcher.health()]
        up = sum(s in ('up', 'late') for s in states)
        if self.args.dropout_tolerant or self.args.deadline_ms is not None:
            return up >= 1
        return up == len(states)

    def health(self, authorised: bool) -> dict:
        """GET /health: the devices' states; their models, hosts, pids and sessions only for a caller with the
        token (or when the service has no token)."""
        devices = self.dispatcher.health()
        up = sum(d['state'] == 'up' for d in devices)
        status = 'ok' if up == len(devices) else 'down' if up == 0 and not any(
            d['state'] == 'late' for d in devices) else 'degraded'
        public = ('index', 'state', 'reason', 'since', 'last_latency_ms', 'last_compute_ms', 'joins', 'answered',
                  'missed', 'late_replies')
        if self.dispatcher.broken:
            status = 'broken'
        out = {'status': status, 'ready': self.ready(),
               'devices': devices if authorised else [{k: d[k] for k in public} for d in devices],
               'uptime_s': time.time() - self.started, 'requests': dict(self.stats, total=self.count)}
        if authorised:
            out.update(deadline_ms=self.args.deadline_ms, timeout_s=self.args.timeout,
                       dropout_tolerant=self.args.dropout_tolerant, backend=self.args.backend,
                       model_path=self.args.model_path, late_replies_discarded=self.dispatcher.late_discarded)
        return out

    def close(self) -> None:
        self.client.close()
