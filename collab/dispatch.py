"""The aggregator's dispatcher: who the workers are and every request in flight, on one ZeroMQ ROUTER socket.

One thread owns the socket (ZeroMQ sockets are not thread-safe; collab.owner). Threaded (the service), that is an
I/O thread of the dispatcher's own, or while the HTTP server runs its asyncio loop (`attach`): any thread may
`submit` a request and wait for it, so several requests are in flight across the devices. Caller-driven
(``threaded=False``, the batch evaluation and the benchmarks), it is the one thread that uses the dispatcher:
`submit` sends at once and `Request.wait` turns the loop itself until the answer is in, with no hop between threads
(two wake-ups per request fewer, which at the demo's scale is most of the dispatcher's cost). All run on this same
code.

Slots. The ensemble has N devices (or the layer-split pipeline N stages); slot i is whichever worker process last
joined as device i. Its state:
- waiting: nobody joined yet;
- up: joined, answering;
- late: joined, but its answer to the last request missed the deadline (or --timeout); it is still connected. With a
  deadline it keeps getting requests (its late replies are discarded, the aggregator cancels what it no longer
  wants); without one it gets none until its late reply shows it is back, so a stalled device does not hold every
  request for --timeout;
- gone: its connection closed (process killed, board rebooted: seen at once through the socket monitor, or after
  the ZMTP heartbeat timeout for a silent host), or it said bye. The same worker command started again joins as a
  new session, and the slot is up again from its first answer.
A second worker joining for a slot that is up replaces the first (a board that rebooted faster than its old
connection timed out), which is told to stop.

Requests. ``submit(image)`` sends it to the slots the policy picks and returns a `Request`; its `wait()` returns when
every target answered, or at the deadline (``deadline_ms``: answer with what arrived, missing devices zero-filled by
the head), or at ``timeout`` without a deadline. A missing device is an error (`CollabError`) unless the dispatcher
is dropout-tolerant or has a deadline. Replies to requests that are already answered are discarded by id.

Without PyTorch: numpy + pyzmq only, like the workers (Python 3.6+).
"""
import collections
import itertools
import os
import queue
import sys
import threading
import time
import traceback

import zmq

from . import keys as fleet_keys
from . import logs, wire
from .owner import SocketOwner
from .slots import HELLO_FIELDS, HELLO_REQUIRED, Slot, mismatch  # noqa: F401 (mismatch: the API)

STATES = ('waiting', 'up', 'late', 'gone')
STOP_WAIT_S = 3.0
DEVICE_ANSWER = {'compute_ms': (int, float, type(None))}  # the header fields of a result (absent: None)
STAGE_ANSWER = dict(DEVICE_ANSWER, record=list)


class CollabError(RuntimeError):
    """A request that cannot be answered: a device failed (and the run is not dropout-tolerant), or none is up."""


def _now():
    return time.perf_counter()


class Request:
    """One image (or batch) in flight. After `wait()`: results {slot: (array, header)}, missing {slot: reason},
    times (perf_counter: submitted, sent, done) and nbytes by kind (payload; 'control' is the JSON headers)."""

    def __init__(self, rid, payload, index, drive=None, done=None):
        self.id, self.payload, self.index, self._drive = rid, payload, index, drive
        self.batch = int(payload.shape[0])
        self.send_to, self.expect = [], []
        self.results, self.missing = {}, {}
        self.error = None
        self.nbytes = collections.Counter()
        self.submitted = _now()
        self.sent = self.done_at = self.expires = None
        self.done = done or threading.Event()

    def complete(self):
        return all(i in self.results or i in self.missing for i in self.expect)

    def wait(self, timeout=None):
        done = self.done.wait(timeout) if self._drive is None else self._drive(self.done, timeout)
        if not done:
            raise CollabError(f'request {self.id} got no answer within {timeout:g} s (the dispatcher is stuck?)')
        if self.error:
            raise CollabError(self.error)
        return self


class Dispatcher(SocketOwner):
    """The aggregator's side of the wire.

    num_slots: devices of the ensemble (or stages of the pipeline). expected(i): what slot i's hello must match
    (see `mismatch`). settings: the run's settings sent in every welcome (input_dtype, wire_dtype, mean, std,
    num_classes). endpoint: where to bind (tcp://*:PORT). timeout: seconds a request may wait without a deadline.
    deadline_ms: answer with what arrived by then. dropout_tolerant: a missing device is not an error.
    pipeline: layer-split (image to slot 0, the answer from slot N-1, all slots needed). names(i): how messages
    name slot i. log: where join/leave lines go (a callable taking one line). keys: the fleet's key folder
    (collab.keys): CURVE on the socket, only the devices' keys admitted, each bound to its device index.
    max_message: the size cap of an incoming message (bytes). on_broken(why): called if the I/O thread ever dies.
    threaded: an I/O thread of its own (any thread may submit and wait); False: caller-driven, for one thread only.
    """

    def __init__(self, num_slots, expected, settings, endpoint, timeout=30.0, deadline_ms=None,
                 dropout_tolerant=False, pipeline=False, names=None, log=None, keys=None, max_message=None,
                 on_broken=None, threaded=True):
        self.expected, self.settings, self.endpoint = expected, dict(settings), endpoint
        self.timeout, self.deadline_ms = float(timeout), deadline_ms
        self.dropout_tolerant, self.pipeline = dropout_tolerant, pipeline
        names = names or (lambda i: f'device {i}')
        self.slots = [Slot(i, names(i)) for i in range(num_slots)]
        self.log = log or (lambda line: (sys.stderr.write(line + '\n'), sys.stderr.flush()))
        self.session = wire.session_id()
        self.refusals = collections.deque(maxlen=16)  # the latest (slot index or None, pid, reason)
        self.on_broken = on_broken
        self._say_once = logs.Throttled(lambda line: self.log(line))  # (key, line): once a minute per key
        self.by_peer = {}
        self.open = {}  # request id -> Request
        self.changed = threading.Condition()  # (an RLock: a caller-driven wait turns the loop while holding it)
        self._ids = itertools.count(1)
        self._calls = queue.Queue()  # (SimpleQueue is 3.7+: this module runs on the boards too)
        self._closing = False
        self.stopping = False  # told the workers to stop: their leaving is expected, not news
        self.broken, self.late_discarded = None, 0
        # Events counted over the dispatcher's life (the service's metrics read them): joins, rejoins, refused
        # (hellos), malformed (messages dropped), deadline_misses, timeouts.
        self.stats = collections.Counter()
        self.ctx = zmq.Context()
        self.auth, self.public_keys, secure = None, {}, None
        if keys:
            secure = self._secure(keys, num_slots)
        try:
            self.sock = wire.router(self.ctx, endpoint, secure, max_message)
        except OSError:
            self._close_auth()
            raise
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the port bound, also for tcp://*:*
        self.mon = wire.monitor(self.sock)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._poller = zmq.Poller()
        for s in (self.sock, self.mon, self._wake_r):
            self._poller.register(s, zmq.POLLIN)
        self._own(threaded)

    def _secure(self, keys_dir, num_slots):
        """CURVE server with a ZAP handler admitting the devices' keys in `keys_dir` (each as its own index)."""
        fleet_keys.check_curve()
        public, secret = fleet_keys.aggregator_pair(keys_dir)
        allowed = fleet_keys.device_publics(keys_dir, num_slots)
        self.public_keys = {i: k.decode('ascii') for k, i in allowed.items()}
        missing = [self.slots[i].name for i in range(num_slots) if i not in self.public_keys]
        if len(missing) == num_slots:
            raise fleet_keys.KeyFileError(f'{keys_dir} holds no key for any of the {num_slots} devices '
                                          f'(python -m collab.keys init {keys_dir} --devices {num_slots})')
        if missing:
            self.log(f'warning: {", ".join(missing)} hold no key in {keys_dir} (revoked?): they cannot join')
        self.auth = fleet_keys.Authenticator(self.ctx, allowed, self.log).begin()
        return lambda sock: fleet_keys.server(sock, public, secret)

    def _close_auth(self):
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    # -- called from any thread

    def submit(self, payload, index=-1, done=None):
        """Send `payload` (the encoded image batch, B×C×H×W) to the workers; returns the Request to wait() on.
        done: a threading.Event (or subclass) to set when it is answered, for a caller that waits otherwise."""
        if self.broken:
            raise CollabError(self.broken)
        req = Request(next(self._ids), payload, index, self._drive if self.caller_driven else None, done)
        self._call(lambda: self._start(req))
        return req

    def wait_ready(self, timeout, strict=True):
        """Block until every slot is up. strict: a refused worker is an error at once (the batch evaluation, whose
        workers were started with it). CollabError naming the missing slots after `timeout` seconds."""
        end = _now() + timeout
        with self.changed:
            while True:
                if strict and self.refusals:
                    i, pid, reason = self.refusals[0]
                    who = self.slots[i].name if i is not None else f'a worker (pid {pid})'
                    raise CollabError(f'{who} was refused: {reason}')
                waiting = [s for s in self.slots if s.state != 'up']
                if not waiting:
                    return
                if self.broken:
                    raise CollabError(self.broken)
                left = end - _now()
                if left <= 0:
                    raise CollabError('no worker joined for ' + ', '.join(s.name for s in waiting)
                                      + f' within {timeout:g} s (their own errors, if any, are above)')
                self._pause(min(left, 0.5))

    def health(self):
        if self.caller_driven:
            self._step(0)  # caller-driven: what arrived since the last call first
        return [s.health() for s in self.slots]

    def stop_workers(self, reason='the aggregator is stopping', wait_s=STOP_WAIT_S):
        """Tell every connected worker to stop and wait (up to `wait_s`) until they have left."""
        self._call(lambda: self._stop_all(reason))
        end = _now() + wait_s
        with self.changed:
            while any(s.state in ('up', 'late') for s in self.slots) and _now() < end and not self.broken:
                self._pause(0.1)

    def close(self):
        if self._closing:
            return
        self._closing = True
        self.aloop = None  # (an attached loop that is still running must not turn it any more)
        if self.thread is not None:
            self._wake()
            self.thread.join(5)
        for s in (self.mon, self.sock):
            s.close(linger=wire.LINGER_MS)
        self._close_auth()
        self.ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the loop

    def _step(self, timeout_ms):
        """One turn of the loop: wait up to `timeout_ms` for a socket, then handle what is ready. False once the
        dispatcher is broken."""
        if self.broken:
            return False
        try:
            ready = dict(self._poller.poll(timeout_ms))
            if self.mon in ready:
                self._on_events()  # connections first: a closed fd is forgotten before it can be reused
            if self._wake_r in ready or not self._calls.empty():
                self._on_calls()
            if self.sock in ready:
                self._on_messages()
            if self.open:
                self._expire()
            return True
        except Exception:  # the dispatcher must never die silently with requests waiting on it
            self.broken = 'the dispatcher failed: ' + traceback.format_exc().strip().splitlines()[-1]
            self.log(f'error: {self.broken}\n{traceback.format_exc()}')
            for req in list(self.open.values()):
                req.error = self.broken
                req.done.set()
            with self.changed:
                self.changed.notify_all()
            if self.on_broken is not None:
                self.on_broken(self.broken)
            return False

    def _poll_ms(self):
        if not self.open:
            return 1000
        soonest = min(r.expires for r in self.open.values())
        return max(0, min(1000, int((soonest - _now()) * 1e3) + 1))

    def _on_calls(self):
        try:
            os.read(self._wake_r, 4096)  # (more left: the poller wakes again)
        except BlockingIOError:
            pass
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            fn()

    def _on_events(self):
        for event, fd in wire.events(self.mon):
            if event in wire.HANDSHAKE_FAILED:
                self.stats['unauthenticated'] += 1
                self._say_once(('handshake',), f'refused a connection that failed the CURVE handshake (no key, or '
                                              f'one this fleet does not hold): {self.stats["unauthenticated"]} so '
                                              f'far, logged once a minute')
            if event != zmq.EVENT_DISCONNECTED:
                continue
            for s in self.slots:
                if s.fd == fd and s.state in ('up', 'late'):
                    self._lose(s, 'closed the connection (process died?)')

    def _on_messages(self):
        """Every message waiting on the socket (which the poller said is readable)."""
        for frames in wire.waiting(self.sock):
            try:
                self._on_message(frames)
            except Exception as err:  # past every check and still wrong: dropped, never the end of the dispatcher
                self._malformed(frames[0].bytes, f'{type(err).__name__}: {err}')

    def _malformed(self, peer, why):
        self.stats['malformed'] += 1
        s = self._slot_of(peer)
        who = s.name if s is not None else 'a peer that has not joined'
        self._say_once(('malformed', peer), f'warning: dropped a malformed message from {who}: {str(why)[:200]} '
                                            f'({self.stats["malformed"]} so far; logged once a minute per peer)')

    def _on_message(self, frames):
        peer, body = frames[0].bytes, frames[1:]
        try:
            header, arrays = wire.unpack(body)
        except wire.ProtocolError as err:
            return self._malformed(peer, err)
        kind = header['type']
        if kind == 'hello':
            key_index = fleet_keys.user_device(body[0]) if self.auth is not None else None
            self._on_hello(peer, wire.source_fd(frames[0]), header, key_index)
        elif kind in ('result', 'failed'):
            self._on_result(peer, header, arrays, wire.sizes(body))
        elif kind == 'bye':
            s = self._slot_of(peer)
            if s is not None:
                self._lose(s, f'left: {str(header.get("reason", "bye"))[:200]}')
        else:
            self._malformed(peer, f'a message of type {kind[:40]!r}')

    def _slot_of(self, peer):
        i = self.by_peer.get(peer)
        return None if i is None or self.slots[i].peer != peer else self.slots[i]

    def _send(self, peer, header, arrays=()):
        return self._send_frames(peer, wire.pack(header, arrays))

    def _send_frames(self, peer, frames):
        """(header, payload) bytes sent, or None when the peer is not reachable (gone, or its queue is full)."""
        try:
            self.sock.send_multipart([peer] + frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            return None
        return wire.sizes(frames)

    def _notify(self):
        with self.changed:
            self.changed.notify_all()

    def _refuse(self, peer, index, hello, reason):
        self._send(peer, {'type': 'refused', 'reason': reason})
        pid, host = str(hello.get('pid'))[:20], str(hello.get('host'))[:64]
        who = self.slots[index].name if index is not None else 'a worker'
        self.stats['refused'] += 1
        self._say_once(('refused', index, reason[:60]), f'refused {who} (pid {pid} on {host}): {reason} '
                                                        f'({self.stats["refused"]} refused so far)')
        self.refusals.append((index, pid, reason))
        self._notify()

    def _on_hello(self, peer, fd, hello, key_index=None):
        if hello.get('v') != wire.PROTOCOL:
            return self._refuse(peer, None, hello, f'it speaks protocol {str(hello.get("v"))[:20]}, this '
                                                   f'aggregator {wire.PROTOCOL}: update both')
        try:
            wire.check(hello, {k: t for k, t in HELLO_FIELDS.items() if k in hello or k in HELLO_REQUIRED})
        except wire.ProtocolError as err:
            return self._refuse(peer, None, hello, f'its hello is malformed: {err}')
        index = hello['index']
        role = 'stage' if self.pipeline else 'device'
        if hello.get('role') != role:
            return self._refuse(peer, None, hello, f'it is a {hello.get("role")} but this aggregator runs '
                                                   f'{"the layer-split pipeline" if self.pipeline else "collab"}')
        if not isinstance(index, int) or not 0 <= index < len(self.slots):
            return self._refuse(peer, None, hello, f'there is no {role} {index} (this run has '
                                                   f'{len(self.slots)}: 0..{len(self.slots) - 1})')
        if self.auth is not None and key_index != index:
            return self._refuse(peer, None, hello, f'it holds the key of device {key_index} but says it is '
                                                   f'{role} {index}')
        s = self.slots[index]
        if s.session == hello.get('session') and s.state in ('up', 'late'):
            if s.peer != peer:  # the same process reconnected (a link that came back)
                self.by_peer[peer], s.peer, s.fd = index, peer, fd
            return self._welcome(s)  # a resent hello: its welcome may still be on the way
        reason = mismatch(self.expected(index), hello)
        if reason:
            return self._refuse(peer, index, hello, reason)
        if s.state in ('up', 'late') and s.peer is not None:
            self._send(s.peer, {'type': 'stop', 'reason': f'replaced by a newer worker (pid {hello.get("pid")} on '
                                                          f'{hello.get("host")})'})
            self.log(f'{s.name}: pid {hello.get("pid")} replaces pid {s.info.get("pid")}')
            self._lose(s, 'replaced by a newer worker')
        rejoin = s.joins > 0
        s.peer, s.fd, s.session, s.info = peer, fd, hello.get('session'), hello
        s.joins += 1
        self.stats['rejoins' if rejoin else 'joins'] += 1
        self.by_peer[peer] = index
        s.set('up', None)
        self.log(f'{s.name} {"rejoined" if rejoin else "joined"}: pid {hello.get("pid")} on {hello.get("host")}, '
                 f'{hello.get("backend")}, {(hello.get("model") or {}).get("model")}'
                 + (f', cpu quota {hello["cpu_quota"]:g}' if hello.get('cpu_quota') else ''))
        if self.pipeline:
            if all(x.state == 'up' for x in self.slots):
                for x in self.slots:
                    self._welcome(x)
        else:
            self._welcome(s)
        self._notify()

    def _welcome(self, s):
        if self.pipeline and not all(x.state == 'up' for x in self.slots):
            return  # stages are told where the next one is once all have joined
        w = dict(self.settings, type='welcome', agg=self.session, index=s.index)
        if self.pipeline and s.index + 1 < len(self.slots):
            w['next'] = self.slots[s.index + 1].info.get('endpoint')
            w['next_key'] = self.public_keys.get(s.index + 1)
        if self.pipeline and s.index > 0:
            w['prev_key'] = self.public_keys.get(s.index - 1)
        self._send(s.peer, w)

    def _lose(self, s, reason):
        """Slot s is gone: forget its peer, and answer (or fail) what waited for it."""
        if s.state == 'gone':
            return
        was_up = s.state in ('up', 'late')
        s.set('gone', reason)
        self.by_peer.pop(s.peer, None)
        s.peer = s.fd = None
        if was_up and not self.stopping:
            self.log(f'{s.name} is gone: {reason}')
        for req in list(self.open.values()):
            if self.pipeline:  # every stage is on the path of every request
                req.missing.setdefault(s.index, reason)
                self._finish(req)
            elif s.index in req.expect and s.index not in req.results:
                req.missing.setdefault(s.index, reason)
                self._finish_if_complete(req)
        self._notify()

    def _stop_all(self, reason):
        self.stopping = True
        for s in self.slots:
            if s.peer is not None and s.state in ('up', 'late'):
                self._send(s.peer, {'type': 'stop', 'reason': reason})

    # -- requests

    def _strict(self):
        return self.pipeline or (self.deadline_ms is None and not self.dropout_tolerant)

    def _start(self, req):
        now = _now()
        req.expires = now + (self.deadline_ms / 1e3 if self.deadline_ms is not None else self.timeout)
        if self.pipeline:
            req.send_to, req.expect = [0], [len(self.slots) - 1]
            usable = [s for s in self.slots if s.state in ('up', 'late')]
            if len(usable) < len(self.slots):
                down = [s for s in self.slots if s.state not in ('up', 'late')]
                return self._fail(req, f'{down[0].name} is {down[0].state} ({down[0].reason}): a pipeline stops at '
                                       'its first broken stage')
        else:
            wanted = ('up', 'late') if self.deadline_ms is not None or self._strict() else ('up',)
            req.send_to = req.expect = [s.index for s in self.slots if s.state in wanted]
            for s in self.slots:
                if s.state not in wanted:
                    req.missing[s.index] = f'{s.state} ({s.reason})' if s.reason else s.state
            if self._strict() and req.missing:
                i = min(req.missing)
                return self._fail(req, f'{self.slots[i].name} is {req.missing[i]}; --dropout-tolerant or '
                                       '--deadline-ms answers from the devices still up')
            if not req.send_to:
                return self._fail(req, 'no device is up: ' + '; '.join(f'{self.slots[i].name} {r}'
                                                                      for i, r in sorted(req.missing.items())))
        frames = wire.pack({'type': 'run', 'id': req.id, 'agg': self.session, 'index': req.index,
                            'batch': req.batch}, [req.payload])
        self.open[req.id] = req
        for i in req.send_to:
            s = self.slots[i]
            sent = self._send_frames(s.peer, frames)  # (packed once for every device)
            if sent is None:
                self._lose(s, 'closed the connection (process died?)')
                continue
            req.nbytes['control'] += sent[0]
            req.nbytes['input'] += sent[1]
        req.sent = _now()
        self._finish_if_complete(req)

    def _fail(self, req, error):
        req.error = error
        req.sent = req.done_at = _now()
        req.done.set()

    def _on_result(self, peer, header, arrays, size):
        s = self._slot_of(peer)
        if s is None:
            return
        rid = header.get('id')
        req = self.open.get(rid) if type(rid) is int and header.get('agg') == self.session else None
        if req is None or s.index not in req.expect or s.index in req.missing or s.index in req.results:
            s.late_replies += 1
            self.late_discarded += 1
            if s.state == 'late':
                s.set('up', None)  # it answers again: it serves the next request
            return
        req.nbytes['control'] += size[0]
        bad = None if header['type'] == 'failed' else self._bad_answer(s, req, header, arrays)
        if bad:
            self._malformed(peer, bad)
            req.missing[s.index] = f'sent a malformed answer ({bad})'
            s.missed += 1
        elif header['type'] == 'failed':
            req.missing[s.index] = f'failed: {str(header.get("message"))[:300]}'
        else:
            req.results[s.index] = (arrays[0], header)
            kind = 'output' if self.pipeline else 'tokens'
            req.nbytes[kind] += size[1]
            if self.pipeline:
                req.nbytes['activations'] += int(header.get('record', [0])[0])
            s.answered += 1
            s.last_latency_ms = (_now() - req.submitted) * 1e3
            s.last_compute_ms = header.get('compute_ms')
            if s.state == 'late':
                s.set('up', None)
        self._finish_if_complete(req)

    def _bad_answer(self, s, req, header, arrays):
        """Why an answer of slot s to `req` cannot be used (None: it can): one array of the dtype and shape that
        the slot declared at join, finite."""
        if self.pipeline:
            dtype, width, fields = '<f4', self.settings.get('num_classes'), STAGE_ANSWER
        else:
            dtype, width = wire.WIRE_DTYPES[self.settings['wire_dtype']], s.info.get('token_width')
            fields = DEVICE_ANSWER
        try:
            wire.check(header, fields, arrays, dtype, (req.batch, width))
        except wire.ProtocolError as err:
            return str(err)
        return None

    def _expire(self):
        now = _now()
        for req in [r for r in self.open.values() if r.expires <= now]:
            for i in req.expect:
                if i in req.results or i in req.missing:
                    continue
                s = self.slots[i]
                if self.deadline_ms is not None:
                    req.missing[i] = f'missed the {self.deadline_ms:g} ms deadline'
                    if s.peer is not None:
                        self._send(s.peer, {'type': 'cancel', 'id': req.id})
                else:
                    req.missing[i] = f'did not answer within {self.timeout:g} s (stalled?)'
                s.missed += 1
                self.stats['deadline_misses' if self.deadline_ms is not None else 'timeouts'] += 1
                if s.state == 'up':
                    s.set('late', req.missing[i])
            self._finish(req)

    def _finish_if_complete(self, req):
        if req.id in self.open and req.complete():
            self._finish(req)

    def _finish(self, req):
        self.open.pop(req.id, None)
        failed = sorted(req.missing) if self.pipeline else [i for i in req.expect if i in req.missing]
        if failed and self._strict():
            i = failed[0]
            req.error = f'{self.slots[i].name} {req.missing[i]}'
        elif not req.results and not req.error:
            req.error = 'no device answered: ' + '; '.join(f'{self.slots[i].name} {r}'
                                                          for i, r in sorted(req.missing.items()))
        req.done_at = _now()
        req.done.set()  # (its waiter waits on this alone: nothing waits on `changed` for a request)
