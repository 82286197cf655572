"""A device worker: one model, one connection to the aggregator, requests answered until it is told to stop.

What a board runs (numpy, pyzmq and onnxruntime or PyTorch; Python 3.6+):

    python -m collab.worker --aggregator tcp://HOST:PORT --device-index I --model-path EXPORT_OR_CHECKPOINT \\
        [--backend torch|onnxruntime] [--fp16-model] [--cpu-quota Q [--cpu-reserve]] [--threads T]
        [--device cpu|cuda|tensorrt] [--keys DIR]

Under a launcher, collab_infer.py's ranks 1..N run this same code (rank r is device r-1; the aggregator's address
comes from MASTER_ADDR and MASTER_PORT + 1, or --collab-port).

A worker puts itself under its CPU quota (emulated slow device), loads its model, connects, and sends a hello
(again every second until answered: the aggregator may not be up yet) describing its model: token width, input
size and channels, model name and kwargs, backend. The aggregator checks it against the head and answers welcome
(with the settings of the run: input and wire dtypes, mean/std) or refused. Then it answers `run` requests in
order, skipping those the aggregator has cancelled (answers past their deadline), until `stop`.

- Refused (its model does not fit the head): one `error:` line, exit 2.
- The aggregator is lost (its connection closed, or silent past the ZMTP heartbeat timeout): under a launcher one
  `error:` line and exit 1 (the run is over); standalone, it joins again, so an aggregator that restarts gets its
  devices back without anyone touching the boards.
- SIGTERM / SIGINT / `stop`: a `bye` to the aggregator, exit 0. Under a launcher it also exits when the launcher dies.
"""
import argparse
import collections
import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import zmq

from . import backends, launcher, logs, quota, sessions, wire
from . import keys as fleet_keys
from .manifest import first_line

JOIN_RESEND_S = 1.0
FP16_MODEL_NEEDS = ('--fp16-model runs the half-precision graphs of an export (export_onnx.py --fp16): it needs '
                    '--backend onnxruntime')
RUN_FIELDS = {'id': int, 'batch': int, 'index': int}  # (and one array: Worker._bad_run)
WARMUP = -1  # the image index of warm-up requests (not counted by the fault hooks)


class Stopped(Exception):
    """Leave cleanly (SIGTERM, SIGINT, or the aggregator's stop)."""


class Refused(Exception):
    """The aggregator refused this worker; the reason is the message."""


class NoAggregator(Exception):
    """No aggregator answered within the startup timeout."""


class Fault:
    """Test hook (--fault exit|kill|stall --fault-after K [--fault-seconds S]): fail at the request holding image
    K. exit: the process vanishes (exit code 0, so a local launcher does not tear the others down first, as with a
    device on another host); kill: SIGKILL; stall: sleep S seconds once, then go on."""

    def __init__(self, kind=None, after=0, seconds=3600.0, name='worker'):
        self.kind, self.after, self.seconds, self.name = kind, after, seconds, name

    def check(self, index, batch):
        if self.kind is None or index == WARMUP or index + batch <= self.after:
            return
        sys.stderr.write(f'{self.name} fault injected: {self.kind} at image {self.after}\n')
        sys.stderr.flush()
        kind, self.kind = self.kind, None
        if kind == 'exit':
            os._exit(0)
        if kind == 'kill':
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.seconds)


class Worker:
    """Serves one model to the aggregator at `endpoint`.

    role: 'device' (collab: the image in, tokens out) or 'stage' (layer-split: stage `index` of `num_stages`,
    activations from the stage before on a PULL socket of its own, to the next one or, from the last, the logits
    to the aggregator). exit_on_loss: exit 1 when the aggregator is lost (under a launcher) instead of joining again.
    startup_timeout: seconds to wait for the first welcome (None: forever, as a board waiting for its aggregator).
    keys: the folder holding this device's secret key and the aggregator's public key (collab.keys): the link is
    CURVE-encrypted and talks only to that aggregator.
    """

    def __init__(self, model, endpoint, index, role='device', num_stages=None, exit_on_loss=False,
                 startup_timeout=None, fault=None, name=None, extra=None, keys=None):
        self.model, self.endpoint, self.index, self.role = model, endpoint, index, role
        self.num_stages = num_stages
        self.exit_on_loss, self.startup_timeout = exit_on_loss, startup_timeout
        self.name = name or f'[device {index}]'
        self.fault = fault or Fault(name=self.name)
        self.session = wire.session_id()
        self.extra = dict(extra or {})
        self.ctx = self.sock = self.mon = self.pull = self.push = self.auth = None
        self.pair = self.aggregator_key = None
        if keys:
            fleet_keys.check_curve()
            self.pair = fleet_keys.device_pair(keys, index)
            self.aggregator_key = fleet_keys.aggregator_public(keys)
        self._throttled = logs.Throttled(lambda line: self.say(line))
        self.stage_endpoint = None
        self.served = 0

    def say(self, text):
        sys.stderr.write(f'{self.name} {text}\n')
        sys.stderr.flush()

    # -- life cycle

    def run(self):
        """Join and serve until stopped. Returns the exit code (0 stopped, 1 aggregator lost, 2 refused)."""
        def on_signal(signum, frame):
            raise Stopped(signal.Signals(signum).name)
        if threading.current_thread() is threading.main_thread():  # (a worker may also run in a thread: tests)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, on_signal)
        self.ctx = zmq.Context()
        try:
            secure = None
            if self.pair:
                secure = lambda sock: fleet_keys.client(sock, *self.pair, self.aggregator_key)  # noqa: E731
            self.sock = wire.dealer(self.ctx, self.endpoint, secure, self.max_message())
            self.mon = wire.monitor(self.sock)
            if self.role == 'stage' and self.index > 0:
                secure = None
                if self.pair:  # only the stage before (its key comes in the welcome) gets through
                    self.auth = fleet_keys.Authenticator(self.ctx, {}, self.say).begin()
                    secure = lambda sock: fleet_keys.server(sock, *self.pair)  # noqa: E731
                self.pull = wire.pull(self.ctx, f'tcp://{wire.local_address(self.endpoint)}:*', secure,
                                      self.max_message())
                self.stage_endpoint = self.pull.getsockopt_string(zmq.LAST_ENDPOINT)
            while True:
                try:
                    welcome = self.join()
                except Refused as err:
                    self.say(f'error: the aggregator at {self.endpoint} refused this worker: {err}')
                    return 2
                except NoAggregator as err:
                    self.say(f'error: {err}')
                    return 1
                self.say(f'joined the aggregator at {self.endpoint} as {self.role} {self.index} '
                         f'({self.model.backend}, session {self.session})')
                lost = self.serve(welcome)
                if self.exit_on_loss:
                    self.say(f'error: lost its link to rank 0 (the aggregator at {self.endpoint}): {lost}')
                    return 1
                self.say(f'warning: lost the aggregator at {self.endpoint} ({lost}); joining again')
        except Stopped as why:
            self._send({'type': 'bye', 'reason': f'stopped ({why})'})
            self.say(f'stopped ({why}) after {self.served} requests')
            return 0
        finally:
            for s in (self.push, self.pull, self.mon, self.sock):
                if s is not None:
                    s.close(linger=500)
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()

    def max_message(self):
        """The size cap of a message to this worker: a full batch of its input (images, or activations)."""
        d = self.model.describe()
        inp = d.get('input') or {}
        per_image = (inp.get('channels') or 3) * (inp.get('size') or 224) ** 2 * 4
        if d.get('activation'):
            per_image = max(per_image, 8 * int(d['activation'][0]) * int(d['activation'][1]))
        return wire.HEADER_BYTES + wire.MAX_BATCH * per_image

    def warn_once(self, key, text):
        self._throttled(key, f'warning: {text} (logged once a minute)')

    def hello(self):
        h = {'type': 'hello', 'v': wire.PROTOCOL, 'role': self.role, 'index': self.index, 'session': self.session,
             'pid': os.getpid(), 'host': socket.gethostname(), 'endpoint': self.stage_endpoint}
        h.update(self.model.describe())
        h.update(self.extra)
        return h

    def join(self):
        """Send hellos until the aggregator answers; returns the welcome header."""
        hello = wire.pack(self.hello())
        start = time.monotonic()
        next_send, announced = 0.0, False
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while True:
            now = time.monotonic()
            if self.startup_timeout is not None and now - start > self.startup_timeout:
                raise NoAggregator(f'no aggregator answered at {self.endpoint} within {self.startup_timeout:g} s '
                                   '(is it running, and is that its address?)')
            if now >= next_send:
                try:
                    self.sock.send_multipart(hello, zmq.NOBLOCK)
                except zmq.Again:
                    pass  # not connected yet: IMMEDIATE queues nothing, the next resend goes out once it is
                next_send = now + JOIN_RESEND_S
            if not announced and now - start > 5:
                self.say(f'waiting for the aggregator at {self.endpoint}')
                announced = True
            poller.poll(200)
            if any(event in wire.HANDSHAKE_FAILED for event, _ in wire.events(self.mon)):
                self.warn_once('handshake', f'the secure handshake with {self.endpoint} failed: is it this fleet\'s '
                                            'aggregator, and does it hold this device\'s key (and this one its '
                                            'aggregator.key)?')
            for header, _ in self._drain(self.sock):
                kind = header['type']
                if kind == 'welcome':
                    return header
                if kind == 'refused':
                    raise Refused(header.get('reason', 'no reason given'))
                if kind == 'stop':
                    raise Stopped(header.get('reason', 'stop'))

    def _drain(self, sock):
        """The messages waiting on `sock` (which the poller said is readable), unpacked; malformed ones dropped."""
        for frames in wire.waiting(sock):
            try:
                yield wire.unpack(frames)
            except wire.ProtocolError as err:
                self.warn_once('malformed', f'dropped a malformed message: {err}')

    def _send(self, header, arrays=(), sock=None):
        try:
            sock = sock or self.sock  # (the next stage's socket waits for its connection: wire.push)
            sock.send_multipart(wire.pack(header, arrays), 0 if sock is self.push else zmq.NOBLOCK, copy=False)
            return True
        except (zmq.Again, zmq.ZMQError):
            return False  # not connected: the aggregator no longer waits for it, or the monitor says it is lost

    def serve(self, welcome):
        """Answer requests in order until the aggregator is lost (returns why) or says stop (raises Stopped)."""
        agg = welcome['agg']
        codec = wire.ImageCodec(welcome['input_dtype'], welcome['mean'], welcome['std'])
        wire_dtype = wire.WIRE_DTYPES[welcome['wire_dtype']]
        if self.role == 'stage':
            self.model.prepare(int(welcome['num_classes']))
            if self.auth is not None and welcome.get('prev_key'):
                self.auth.allowed = {welcome['prev_key'].encode('ascii'): self.index - 1}
            if welcome.get('next'):
                if self.push is not None:
                    self.push.close(linger=0)
                secure = None
                if self.pair and welcome.get('next_key'):
                    key = welcome['next_key'].encode('ascii')
                    secure = lambda sock: fleet_keys.client(sock, *self.pair, key)  # noqa: E731
                self.push = wire.push(self.ctx, welcome['next'], secure)
        expect = self._expected(welcome)
        inputs = [self.sock] + ([self.pull] if self.pull is not None else [])
        poller = zmq.Poller()
        for s in inputs + [self.mon]:
            poller.register(s, zmq.POLLIN)
        queue = collections.OrderedDict()  # id -> (header, arrays), in arrival order
        while True:
            ready = dict(poller.poll(0 if queue else 1000))  # only the sockets with something to read
            if self.mon in ready:
                for event, _ in wire.events(self.mon):
                    if event == zmq.EVENT_DISCONNECTED:
                        return 'closed the connection (process died, or the link is down)'
            for sock in inputs:
                if sock not in ready:
                    continue
                for header, arrays in self._drain(sock):
                    kind = header['type']
                    if kind == 'run' and header.get('agg') == agg:
                        bad = self._bad_run(header, arrays, *expect[sock is self.pull])
                        if bad:
                            self.warn_once('bad run', f'refused a request: {bad}')
                            self._send({'type': 'failed', 'id': header.get('id'), 'agg': agg,
                                        'message': f'bad request: {bad}'})
                        else:
                            queue[header['id']] = (header, arrays)
                    elif sock is self.pull:
                        self.warn_once('pull', f'ignored a {kind[:20]!r} message from the stage before (it only '
                                               'sends run)')
                    elif kind == 'cancel':
                        queue.pop(header.get('id'), None)
                    elif kind == 'stop':
                        raise Stopped(str(header.get('reason', 'stop'))[:300])
            if queue:
                _, (header, arrays) = queue.popitem(last=False)
                self.answer(header, arrays, agg, codec, wire_dtype)

    def _expected(self, welcome):
        """(dtype, per-image shape) of a `run` from the aggregator and from the stage before (the PULL socket)."""
        d = self.model.describe()
        inp = d.get('input') or {}
        image = ('|u1' if welcome['input_dtype'] == 'uint8' else '<f4',
                 (inp.get('channels'), inp.get('size'), inp.get('size')))
        activation = (wire.WIRE_DTYPES[welcome['wire_dtype']], tuple(d.get('activation') or (None, None)))
        return {False: image, True: activation}

    @staticmethod
    def _bad_run(header, arrays, dtype, shape):
        """Why a `run` cannot be served (None: it can): an int id, a batch of 1..MAX_BATCH images, one array of
        the declared dtype and shape, finite."""
        try:
            wire.check(header, RUN_FIELDS)
            if not 1 <= header['batch'] <= wire.MAX_BATCH:
                raise wire.ProtocolError(f'a batch of {header["batch"]} (1..{wire.MAX_BATCH} are served)')
            wire.check(header, {}, arrays, dtype, (header['batch'],) + shape)
        except wire.ProtocolError as err:
            return str(err)
        return None

    def answer(self, header, arrays, agg, codec, wire_dtype):
        index, batch = int(header.get('index', WARMUP)), int(header.get('batch', 1))
        self.fault.check(index, batch)
        first = self.role == 'device' or self.index == 0
        t0 = time.perf_counter()  # the worker's own time: normalising a uint8 image is part of it
        try:
            x = codec.decode(arrays[0]) if first else arrays[0].astype('float32')
            out = self.model.run(x)
        except Exception as err:  # a request the model cannot take must not end the worker
            self.say(f'warning: request {header.get("id")} failed: {first_line(err)}')
            self._send({'type': 'failed', 'id': header.get('id'), 'agg': agg, 'message': first_line(err)})
            return
        ms = (time.perf_counter() - t0) * 1e3
        self.served += 1
        reply = {'type': 'result', 'id': header['id'], 'agg': agg, 'compute_ms': ms}
        if self.role == 'device':
            self._send(reply, [np.asarray(out, dtype=wire_dtype)])
            return
        record = list(header.get('record') or [0.0] * (self.num_stages + 1))
        record[self.index + 1] = ms
        if self.index < self.num_stages - 1:
            out = out.astype(wire_dtype)
            record[0] += out.nbytes
            self._send({'type': 'run', 'id': header['id'], 'agg': agg, 'index': index, 'batch': batch,
                        'record': record}, [out], sock=self.push)
        else:
            reply['record'] = record
            self._send(reply, [out.astype('float32')])


# ---------------------------------------------------------------------------------------------------------------
# Building a worker

def load_model(backend, model_path, index, threads=None, device=None, ema=False, local_rank=0, fp16=False):
    """Device `index`'s model with `backend` (backends.OnnxDevice, or collab.host.torch_models.TorchDevice); `fp16`: the
    export's half-precision graph (onnxruntime only)."""
    if backend == 'onnxruntime':
        return backends.OnnxDevice(model_path, index, threads, device or 'cpu', fp16)
    if backend == 'torch':
        if fp16:
            raise ValueError(FP16_MODEL_NEEDS)
        from .host.torch_models import TorchDevice  # the one path of a worker that needs PyTorch (and the models)

        return TorchDevice(model_path, index, ema, device, local_rank, threads)
    raise ValueError(f'unknown backend {backend!r} (choose from {", ".join(backends.BACKENDS)})')


def apply_quota(fraction, reserve=False):
    """Put this process under `fraction` of a core (None: no limit; `reserve`: and claim that much, see
    collab.quota); one QuotaError line when not possible."""
    if fraction is None:
        return None
    return quota.limit_cpu(fraction, reserve=reserve)


def get_parser():
    p = argparse.ArgumentParser(prog='python -m collab.worker', description=__doc__.split('\n')[0])
    p.add_argument('--aggregator', default=None, metavar='tcp://HOST:PORT',
                   help='the aggregator (default under a launcher: MASTER_ADDR, port MASTER_PORT + 1 or '
                        '--collab-port; else tcp://127.0.0.1:29501)')
    p.add_argument('--collab-port', type=int, default=None, help='port of the aggregator, when --aggregator is not '
                                                                 'given')
    p.add_argument('--device-index', type=int, default=None,
                   help='which device of the ensemble this is (default under a launcher: RANK - 1)')
    p.add_argument('--model-path', required=True,
                   help='stage-3 checkpoint (--backend torch) or export folder (--backend onnxruntime)')
    p.add_argument('--backend', default='torch', choices=backends.BACKENDS)
    p.add_argument('--device', default=None, help='torch: cpu or cuda (default cuda when available); '
                                                  'onnxruntime: cpu (default), cuda, tensorrt or auto')
    p.add_argument('--fp16-model', action='store_true',
                   help="onnxruntime: run the export's fp16 copy of this device's graph (on TensorRT: the fp32 graph "
                        "with TensorRT's fp16 kernels)")
    p.add_argument('--threads', type=int, default=None, help='intra-op threads (default: OMP_NUM_THREADS)')
    p.add_argument('--cpu-quota', type=float, default=None, metavar='Q',
                   help='limit this worker to Q of one CPU core (cgroup CFS quota: an emulated slow device)')
    p.add_argument('--cpu-reserve', action='store_true',
                   help='with --cpu-quota: also claim that much CPU (CFS weight), so that other busy processes do '
                        'not hold the emulated device below its quota')
    p.add_argument('--ema', action='store_true', help="torch: use the checkpoint's EMA weights")
    p.add_argument('--keys', default=None, metavar='DIR',
                   help="the folder with this device's deviceI.key_secret and the aggregator's aggregator.key "
                        '(python -m collab.keys): the link is authenticated and encrypted (docs/security.md)')
    p.add_argument('--startup-timeout', type=float, default=None,
                   help='seconds to wait for the aggregator (default: forever; 300 under a launcher)')
    p.add_argument('--exit-on-loss', action='store_true',
                   help='exit 1 when the aggregator is lost instead of joining again (default under a launcher)')
    p.add_argument('--fault', default=None, choices=['exit', 'kill', 'stall'], help=argparse.SUPPRESS)
    p.add_argument('--fault-after', type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument('--fault-seconds', type=float, default=3600.0, help=argparse.SUPPRESS)
    return p


def start(model_factory, endpoint, index, name, role='device', num_stages=None, cpu_quota=None,
          exit_on_loss=False, startup_timeout=None, fault=None, extra=None, cpu_reserve=False, keys=None):
    """Quota, model, worker: the exit code of its run. Bad input (model file, quota) is one error line, exit 2."""
    try:
        apply_quota(cpu_quota, cpu_reserve)
        model = model_factory()
    except (ValueError, OSError, quota.QuotaError) as err:  # ModelError and CheckpointError are ValueErrors
        sys.stderr.write(f'{name} error: {first_line(err)}\n')
        return 2
    info = dict(extra or {}, cpu_quota=cpu_quota)
    try:
        worker = Worker(model, endpoint, index, role, num_stages, exit_on_loss, startup_timeout, fault, name, info,
                        keys)
    except ValueError as err:  # a key file missing, malformed or readable by others
        sys.stderr.write(f'{name} error: {first_line(err)}\n')
        return 2
    return worker.run()


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.fp16_model and args.backend != 'onnxruntime':
        parser.error(FP16_MODEL_NEEDS)
    if args.cpu_reserve and args.cpu_quota is None:
        parser.error('--cpu-reserve needs --cpu-quota (the share this worker claims)')
    rank = launcher.env_rank()[0]
    index = args.device_index if args.device_index is not None else (rank - 1 if launcher.launched() else None)
    if index is None or index < 0:
        parser.error('--device-index is required (which device of the ensemble this worker is)')
    name = f'[rank {rank}]' if launcher.launched() else f'[device {index}]'
    if launcher.launched():
        launcher.exit_with_launcher(name=name)
    endpoint = args.aggregator or launcher.aggregator_endpoint(args.collab_port)
    timeout = args.startup_timeout if args.startup_timeout is not None else (300.0 if launcher.launched() else None)

    def factory():
        return load_model(args.backend, args.model_path, index, args.threads, args.device, args.ema,
                          launcher.env_rank()[2], args.fp16_model)
    fault = Fault(args.fault, args.fault_after, args.fault_seconds, name)
    return start(factory, endpoint, index, name, cpu_quota=args.cpu_quota, cpu_reserve=args.cpu_reserve,
                 exit_on_loss=args.exit_on_loss or launcher.launched(), startup_timeout=timeout, fault=fault,
                 extra={'threads': sessions.default_threads(args.threads)}, keys=args.keys)


if __name__ == '__main__':
    sys.exit(main())
