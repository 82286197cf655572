"""The collaborative runtime as a service: an HTTP front end on the aggregator, up until SIGINT / SIGTERM.

    python collab_infer.py --serve --port 8080 --model-path ENSEMBLE_OR_EXPORT [--deadline-ms 200] [--collab-port P]

Workers join whenever they start (`python -m collab.worker --aggregator tcp://HOST:P ...` on each board, or the
launcher's ranks 1..N), leave, and join again; the service answers with the devices that are up.

    POST /predict   body: a PNG or JPEG file            -> 200 {"top": [{"class", "name", "probability"}, ...],
                    (?topk=K, default --topk)                  "devices": [used], "missing": {device: why},
                                                               "latency_ms": {...}, "request": id}
                                                           400 {"error": ...}  the body is not an image
                                                           503 {"error": ...}  no answer (no device up, or a
                                                                                device failed without --deadline-ms
                                                                                or --dropout-tolerant)
    GET  /health                                        -> 200 {"status": "ok"|"degraded"|"down", "devices": [{
                                                               "index", "state": up|late|gone|waiting,
                                                               "last_latency_ms", "model", "backend", ...}], ...}

    curl -s --data-binary @shirt.png http://HOST:8080/predict
    curl -s http://HOST:8080/health

Requests are served by a thread each (http.server.ThreadingHTTPServer). Those that arrive while the devices are
busy go out together (`--max-batch`, default 8 images in one message per device; a request that finds none waiting goes
out at once), and two such batches are in flight across the devices at a time; each is one request of the same
dispatcher the batch evaluation uses. The answer says how many images shared its batch.
"""
import json
import queue
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch

from fileio import DatasetError

from ..dispatch import CollabError
from .modes import Preprocess, class_names_for, setup_collab

MAX_BODY = 32 * 1024 * 1024


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Batcher:
    """Images waiting for the devices go out together: a lane takes the oldest waiting image and every other one
    already waiting (up to `max_batch`), sends them as one batch and hands each caller its row of the answer. A
    lone image never waits for company. `lanes` batches are in flight at a time."""

    LANES = 2

    def __init__(self, client, max_batch: int):
        self.client, self.max_batch = client, max_batch
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(self.LANES):
            threading.Thread(target=self._lane, name=f'collab-batch-{i}', daemon=True).start()

    def __call__(self, x: np.ndarray, index: int):
        """(the batch's Reply, this image's row in it, the batch size) for one 1xCxHxW image."""
        job = {'x': x, 'index': index, 'done': threading.Event()}
        self.waiting.put(job)
        job['done'].wait()
        if 'error' in job:
            raise job['error']
        return job['reply'], job['row'], job['size']

    def _lane(self) -> None:
        while True:
            jobs = [self.waiting.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            try:
                reply = self.client(np.concatenate([j['x'] for j in jobs]), jobs[0]['index'])
                for row, j in enumerate(jobs):
                    j.update(reply=reply, row=row, size=len(jobs))
            except Exception as err:  # CollabError, or a bug: every caller of the batch gets it, the lane lives on
                for j in jobs:
                    j['error'] = err
            for j in jobs:
                j['done'].set()


class Service:
    """The HTTP service around a CollabClient."""

    def __init__(self, args):
        self.args = args
        self.client, spec = setup_collab(args)
        size, chans = spec.input['size'], spec.input['channels']
        self.preprocess = Preprocess(args, size, chans, spec.input['mean'], spec.input['std'])
        self.class_names = class_names_for(args, spec.class_names, size, chans)
        self.topk = args.topk
        self.batcher = Batcher(self.client, args.max_batch)
        self.started = time.time()
        self.count = 0
        self.stats = {'answered': 0, 'bad_request': 0, 'unavailable': 0}
        self._lock = threading.Lock()

    def next_id(self) -> int:
        with self._lock:
            self.count += 1
            return self.count

    def predict(self, body: bytes, topk: int | None = None) -> tuple[int, dict]:
        t0 = time.perf_counter()
        index = self.next_id()
        try:
            x = self.preprocess.bytes(body).unsqueeze(0)
        except DatasetError as err:
            self._count('bad_request')
            return 400, {'error': str(err), 'request': index}
        t1 = time.perf_counter()
        try:
            reply, row, batch = self.batcher(x.numpy(), index)
        except CollabError as err:
            self._count('unavailable')
            return 503, {'error': str(err), 'request': index}
        probs = softmax(reply.logits[row].astype(np.float64))
        k = max(1, min(topk or self.topk, len(probs)))
        top = np.argsort(-probs)[:k]
        names = self.class_names
        self._count('answered')
        return 200, {
            'request': index,
            'top': [{'class': int(c), 'name': names[c] if names and c < len(names) else None,
                     'probability': float(probs[c])} for c in top],
            'devices': reply.used,
            'missing': {str(i): why for i, why in sorted(reply.missing.items())},
            'batch': batch,
            'latency_ms': {'total': (time.perf_counter() - t0) * 1e3, 'preprocess': (t1 - t0) * 1e3,
                           **{k: v for k, v in reply.times.items() if k != 'latency'}},
        }

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def health(self) -> dict:
        devices = self.client.dispatcher.health()
        up = sum(d['state'] == 'up' for d in devices)
        status = 'ok' if up == len(devices) else 'down' if up == 0 and not any(
            d['state'] == 'late' for d in devices) else 'degraded'
        return {'status': status, 'devices': devices, 'deadline_ms': self.args.deadline_ms,
                'timeout_s': self.args.timeout, 'dropout_tolerant': self.args.dropout_tolerant,
                'backend': self.args.backend, 'model_path': self.args.model_path,
                'uptime_s': time.time() - self.started, 'requests': dict(self.stats, total=self.count),
                'late_replies_discarded': self.client.dispatcher.late_discarded}


def handler_for(service: Service):
    class Handler(BaseHTTPRequestHandler):
        server_version = 'devit-collab/1'
        protocol_version = 'HTTP/1.1'
        # Headers and body leave in two writes: with Nagle's algorithm on, a kept-alive connection waits for the
        # client's delayed ACK (40 ms on Linux) before the body goes.
        disable_nagle_algorithm = True

        def log_message(self, fmt, *args):  # one line per request would drown the join/leave lines
            pass

        def _reply(self, code: int, obj: dict) -> None:
            body = (json.dumps(obj) + '\n').encode()
            self.send_response(code)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = urlparse(self.path).path
            if path == '/health':
                return self._reply(200, service.health())
            return self._reply(404, {'error': f'no such endpoint {path}: POST /predict, GET /health'})

        def do_POST(self):
            url = urlparse(self.path)
            length = self.headers.get('Content-Length')
            if url.path != '/predict':
                self._drain(length)
                return self._reply(404, {'error': f'no such endpoint {url.path}: POST /predict, GET /health'})
            if length is None or not length.isdigit():
                self.close_connection = True
                return self._reply(411, {'error': 'the image must be sent with a Content-Length'})
            if int(length) > MAX_BODY:
                self.close_connection = True
                return self._reply(413, {'error': f'the body is {length} bytes; at most {MAX_BODY} are taken'})
            body = self.rfile.read(int(length))
            topk = parse_qs(url.query).get('topk', [None])[0]
            if topk is not None and not topk.isdigit():
                return self._reply(400, {'error': f'topk must be a positive integer, got {topk!r}'})
            code, obj = service.predict(body, int(topk) if topk else None)
            self._reply(code, obj)

        def _drain(self, length):
            if length and length.isdigit() and int(length) <= MAX_BODY:
                self.rfile.read(int(length))
            else:
                self.close_connection = True
    return Handler


def serve(args) -> int:
    """Run the service until SIGINT / SIGTERM; then stop the workers and return 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
    service = Service(args)
    try:
        server = ThreadingHTTPServer((args.host, args.port), handler_for(service))
    except OSError as err:
        service.client.close()
        raise OSError(f'cannot serve HTTP on {args.host}:{args.port}: {err.strerror or err}') from None
    server.daemon_threads = True
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=server.serve_forever, name='http', daemon=True)
    thread.start()
    host = args.host if args.host not in ('', '0.0.0.0') else 'localhost'
    print(f'serving on http://{host}:{server.server_address[1]} (POST /predict, GET /health); workers join at '
          f'{service.client.dispatcher.endpoint}; {len(service.client.dispatcher.slots)} devices expected',
          file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    print('stopping: the workers are told to stop', file=sys.stderr, flush=True)
    server.shutdown()
    server.server_close()
    service.client.close()
    print(f'stopped after {service.count} requests', file=sys.stderr, flush=True)
    return 0
