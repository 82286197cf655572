"""The wire between the aggregator and the workers: ZeroMQ sockets, multipart messages of a JSON header + raw arrays.

Sockets. The aggregator binds one ROUTER socket; every worker connects one DEALER socket to it, so a worker needs
only the aggregator's address, and a worker that restarts (or a board that reboots) simply connects again. ZeroMQ
reconnects by itself, queues nothing for a peer that is not connected (IMMEDIATE) and, with ZMTP heartbeats, closes
a connection whose peer went silent (a host that lost power sends no FIN). Both ends watch their socket's monitor:
a closed connection is seen at once, which is how the aggregator marks a killed worker gone and a worker notices a
dead aggregator. A layer-split stage also binds a PULL socket for the activations of the stage before it.

Messages. ``[header, buffer_0, buffer_1, ...]``: the header is a UTF-8 JSON object with ``type`` and, when buffers
follow, ``arrays`` = ``[[dtype, shape], ...]`` describing them (numpy's dtype strings, little-endian: ``'|u1'``,
``'<f2'``, ``'<f4'``, ``'<f8'``, ``'<i8'``); each buffer is the array's bytes, C order. No pickles: a peer can only
send arrays of those types and JSON.

    worker -> aggregator   hello    {v, role: device|stage, index, session, pid, host, backend, source,
                                     model: {model, kwargs}, token_width | activation, input: {size, channels, mean,
                                     std}, endpoint (stage > 0), cpu_quota, threads}
                           result   {id, agg, compute_ms [, record: stage ms and activation bytes]} + [tokens|logits]
                           failed   {id, agg, message}  (the model raised on this request)
                           bye      {reason}            (clean exit: SIGTERM, stop, replaced)
    aggregator -> worker   welcome  {agg, input_dtype, wire_dtype, mean, std, num_classes [, next: endpoint]}
                           refused  {reason}
                           run      {id, agg, index, batch} + [image]   (uint8 pixels or normalised float32)
                           cancel   {id}                (answer no longer wanted: drop it if still queued)
                           stop     {reason}
    stage r -> stage r+1   run      {id, agg, index, batch, record} + [activations]

Every request has an id; the aggregator session id ``agg`` (new at every start) rides along, so a reply to a request
the aggregator no longer waits for (late, expired, from before a restart) is recognised and discarded.

Device-side module: Python 3.6+, numpy + pyzmq.
"""
import json
import os
import socket
import uuid
import warnings

import numpy as np
import zmq

PROTOCOL = 1
DTYPES = ('|u1', '<f2', '<f4', '<f8', '<i8')
WIRE_DTYPES = {'fp32': '<f4', 'fp16': '<f2'}
_DTYPE = {name: np.dtype(name) for name in DTYPES}
_encode = json.JSONEncoder(separators=(',', ':')).encode  # (json.dumps with options builds an encoder per call)
_scan = json.decoder.JSONDecoder().scan_once  # json's C scanner: one JSON value from an offset
_ZEROS = {}  # dtype -> zeros, for `finite`
# (inf * 0 in `finite` sets numpy's invalid flag: the array is refused, the warning is noise)
warnings.filterwarnings('ignore', 'invalid value encountered in dot', RuntimeWarning, __name__)
INPUT_DTYPES = ('uint8', 'fp32')
MAX_BATCH = 256  # images in one request at most (a receiver refuses more)
HEADER_BYTES = 64 * 1024  # room for a header (and a hello) in the size cap of a socket's messages
HEARTBEAT_IVL_MS = 1000  # ZMTP ping interval; a silent peer's connection closes after HEARTBEAT_TIMEOUT_MS
HEARTBEAT_TIMEOUT_MS = 4000
LINGER_MS = 1000


class ProtocolError(ValueError):
    """A message that does not follow the protocol (bad JSON, unknown dtype, sizes that do not add up)."""


def session_id():
    """A fresh id for this process's session (a restarted worker or aggregator gets a new one)."""
    return f'{os.getpid()}-{uuid.uuid4().hex[:12]}'


def pack(header, arrays=()):
    """Frames of one message: the JSON header (with `arrays` describing the buffers) then each array's bytes."""
    head = _encode(header)
    if not arrays:
        return [head.encode('utf-8')]
    arrays = [np.ascontiguousarray(a) for a in arrays]
    if 'arrays' in header:
        head = _encode({k: v for k, v in header.items() if k != 'arrays'})
    # The description spliced in as text: a shape's list prints as JSON (a dict copy and nested lists through the
    # encoder cost more than the rest of the message on a small board).
    specs = ','.join(f'["{a.dtype.str}",{list(a.shape)}]' for a in arrays)
    sep = ',' if len(head) > 2 else ''
    return [(head[:-1] + sep + '"arrays":[' + specs + ']}').encode('utf-8')] + arrays


def _buffer(frame):
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


def unpack(frames):
    """(header dict, arrays) of a message; the arrays are read-only views of the frames. ProtocolError if bad:
    nothing a peer sends gets past here without being the message it says it is."""
    if not frames:
        raise ProtocolError('empty message')
    head = frames[0]
    header = _header(head.bytes if isinstance(head, zmq.Frame) else bytes(head))
    if not isinstance(header, dict) or not isinstance(header.get('type'), str):
        raise ProtocolError('the header is not an object with a "type"')
    specs = header.get('arrays') or []
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        described = len(specs) if isinstance(specs, list) else repr(specs)[:20]
        raise ProtocolError(f'the header describes {described} arrays but {len(frames) - 1} buffers came')
    arrays = []
    for spec, frame in zip(specs, frames[1:]):
        try:
            dtype, shape = spec
            count = 1
            for d in shape:
                if type(d) is not int or d < 0:
                    raise ValueError
                count *= d  # (Python's integers: a shape cannot overflow into a small size)
        except (TypeError, ValueError):
            raise ProtocolError(f'bad array description {json.dumps(spec)[:80]}') from None
        dt = _DTYPE.get(dtype) if isinstance(dtype, str) else None
        if dt is None:
            raise ProtocolError(f'unsupported dtype {json.dumps(dtype)[:20]} (allowed: {", ".join(DTYPES)})')
        buf = frame.buffer if isinstance(frame, zmq.Frame) else frame
        size = memoryview(buf).nbytes
        if size != count * dt.itemsize:
            raise ProtocolError(f'a buffer of {size} bytes does not have shape {shape} of {dtype}')
        arrays.append(np.ndarray(shape, dt, buf))
    return header, arrays


def _header(data):
    """The header's JSON object. Our own compact headers go straight to json's C scanner (json.loads's Python
    layers around it cost more than the scan, every message); anything else (whitespace around it, or not JSON)
    through json.loads, whose answer (or error) is the reference."""
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as err:
        raise ProtocolError(f'the header is not JSON: {err}') from None
    try:
        header, end = _scan(text, 0)
        if end == len(text):
            return header
    except (StopIteration, ValueError):
        pass
    try:
        return json.loads(text)
    except ValueError as err:
        raise ProtocolError(f'the header is not JSON: {err}') from None


def finite(a):
    """True when the float array `a` holds no NaN or infinity: x * 0 is 0 for every finite x and NaN for the
    others, so one dot product with zeros tells (cheaper than isfinite + all when, as at every message, the
    caches are cold)."""
    flat = a.reshape(-1)
    zeros = _ZEROS.get(flat.dtype.str)
    if zeros is None or zeros.size < flat.size:
        zeros = _ZEROS[flat.dtype.str] = np.zeros(flat.size, flat.dtype)  # (the largest array seen, per dtype)
    return flat.dot(zeros[:flat.size]) == 0


def check(header, fields, arrays=(), dtype=None, shape=None):
    """Raise ProtocolError unless `header` has each of `fields` ({name: type or tuple of types}) and, when
    `dtype`/`shape` are given, one array of that dtype and shape (None in `shape`: any size) holding finite
    numbers. The checks a receiver makes before it uses a message."""
    for name, kinds in fields.items():
        value = header.get(name)
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ProtocolError('"{}" is {} in a {} message'.format(name, json.dumps(value)[:40], header['type']))
    if dtype is None:
        return
    if len(arrays) != 1:
        raise ProtocolError('a {} message carries {} arrays, not 1'.format(header['type'], len(arrays)))
    a = arrays[0]
    fits = a.dtype.str == dtype and a.ndim == len(shape)
    if fits:
        for d, e in zip(a.shape, shape):
            if e is not None and d != e:
                fits = False
                break
    if not fits:
        raise ProtocolError('a {} message carries {} of {}, not {} of {}'.format(
            header['type'], list(a.shape), a.dtype.str, [d if d is not None else 'B' for d in shape], dtype))
    if a.dtype.kind == 'f' and not finite(a):
        raise ProtocolError('a {} message carries NaN or infinite values'.format(header['type']))


def sizes(frames):
    """(header bytes, payload bytes) of a message's frames."""
    lengths = [memoryview(_buffer(f)).nbytes for f in frames]
    return lengths[0], sum(lengths[1:])


# ---------------------------------------------------------------------------------------------------------------
# Sockets

def _socket(ctx, kind, options, attach, endpoint, error, secure=None, max_message=None):
    """A socket of `kind` with the common options (linger, ZMQ heartbeats, the size cap `max_message` in bytes) and
    `options`, made secure by `secure(sock)` (collab.keys.server / client), bound or connected (`attach`) to
    `endpoint`; a ZMQError there becomes `error(err)`, the socket closed."""
    sock = ctx.socket(kind)
    for option, value in [(zmq.LINGER, LINGER_MS), (zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS),
                          (zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS), (zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS),
                          (zmq.MAXMSGSIZE, int(max_message) if max_message else -1), *options]:
        sock.setsockopt(option, value)
    if secure is not None:
        secure(sock)
    try:
        getattr(sock, attach)(endpoint)
    except zmq.ZMQError as err:
        sock.close(0)
        raise error(err) from None
    return sock


def router(ctx, endpoint, secure=None, max_message=None):
    """The aggregator's socket, bound at `endpoint` (``tcp://HOST:PORT``). Sending to a peer that is gone raises
    (ROUTER_MANDATORY) instead of dropping the message silently."""
    return _socket(ctx, zmq.ROUTER, [(zmq.ROUTER_MANDATORY, 1)], 'bind', endpoint,
                   lambda err: OSError(f'cannot listen for workers at {endpoint}: {err}'), secure, max_message)


def dealer(ctx, endpoint, secure=None, max_message=None):
    """A worker's socket to the aggregator at `endpoint`; connects (and reconnects) in the background. Nothing is
    queued while it is not connected (IMMEDIATE): a hello is sent again instead."""
    return _socket(ctx, zmq.DEALER, [(zmq.IMMEDIATE, 1), (zmq.RECONNECT_IVL, 100), (zmq.RECONNECT_IVL_MAX, 2000)],
                   'connect', endpoint, lambda err: ValueError(f'bad aggregator address {endpoint!r}: {err}'),
                   secure, max_message)


def pull(ctx, endpoint, secure=None, max_message=None):
    """A layer-split stage's socket for the activations of the stage before it, bound at `endpoint`
    (``tcp://HOST:*`` takes a free port; the socket's LAST_ENDPOINT tells which)."""
    return _socket(ctx, zmq.PULL, [], 'bind', endpoint,
                   lambda err: OSError(f'cannot listen for the stage before at {endpoint}: {err}'), secure, max_message)


PUSH_WAIT_MS = 5000  # how long a stage's send waits for its connection to the next stage


def push(ctx, endpoint, secure=None):
    """A layer-split stage's socket to the next stage. A send waits (at most PUSH_WAIT_MS) for the connection,
    which may still be opening when the first request comes right after the welcome."""
    return _socket(ctx, zmq.PUSH, [(zmq.IMMEDIATE, 1), (zmq.SNDTIMEO, PUSH_WAIT_MS)], 'connect', endpoint,
                   lambda err: ValueError(f'bad address of the next stage {endpoint!r}: {err}'), secure)


# A CURVE handshake that failed: no key, a key the other side does not admit, or the wrong server key.
HANDSHAKE_FAILED = tuple(getattr(zmq, name) for name in ('EVENT_HANDSHAKE_FAILED_NO_DETAIL',
                                                         'EVENT_HANDSHAKE_FAILED_PROTOCOL',
                                                         'EVENT_HANDSHAKE_FAILED_AUTH') if hasattr(zmq, name))


def monitor(sock):
    """A PAIR socket receiving `sock`'s connection events (see `events`)."""
    mask = zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
    for event in HANDSHAKE_FAILED:
        mask |= event
    return sock.get_monitor_socket(mask)


def waiting(sock):
    """The messages (lists of frames) waiting on `sock`, which a poller said is readable: each received at once, the
    socket's EVENTS asked only after it (cheaper than a zmq.Again raised at the end)."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        yield frames
        if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return


def events(mon):
    """The (event, value) pairs waiting on a monitor socket; value is the connection's file descriptor."""
    from zmq.utils.monitor import recv_monitor_message

    out = []
    while True:
        try:
            msg = recv_monitor_message(mon, zmq.NOBLOCK)
        except zmq.Again:
            return out
        out.append((int(msg['event']), int(msg['value'])))


def source_fd(frame):
    """The file descriptor of the connection a ROUTER frame came from (None where libzmq does not tell)."""
    try:
        return int(frame.get(zmq.SRCFD))
    except (AttributeError, zmq.ZMQError, TypeError, ValueError):
        return None


def local_address(endpoint):
    """This host's address on the route to `endpoint` (tcp://HOST:PORT): what another host can reach it at.
    Not the hostname's address, which JetPack maps to 127.0.1.1."""
    host = endpoint.split('://', 1)[-1].rsplit(':', 1)[0].strip('[]')
    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((host, 9))  # UDP: no packet is sent, the kernel only picks the route
        return s.getsockname()[0]
    except OSError:
        return '127.0.0.1'
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------------------------
# The image on the wire

SMALL_IMAGE = 1 << 14  # pixels up to which a table lookup beats a cast, a multiply and an add


class ImageCodec:
    """'fp32' sends the normalised image; 'uint8' sends pixels (4x fewer bytes), normalised by the receiver.

    uint8 quantises the preprocessed (resized, cropped) image; for images that were uint8 at that size already
    (Fashion-MNIST and CIFAR at native size) the pixels arrive exactly and the worker's array equals the
    aggregator's up to float rounding.
    """

    def __init__(self, dtype, mean, std):
        if dtype not in INPUT_DTYPES:
            raise ValueError(f'input dtype must be uint8 or fp32, got {dtype!r}')
        self.dtype = dtype
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        self.scale, self.offset = 1 / (255 * self.std), -self.mean / self.std  # decode: one multiply, one add
        # one gray channel: a table of its 256 levels (the same float32 values); a small image is then one lookup
        self.table = (np.arange(256, dtype=np.float32) * self.scale.reshape(-1)[0] + self.offset.reshape(-1)[0]
                      if self.std.size == 1 and self.mean.size == 1 else None)

    def encode(self, x):
        """B×C×H×W normalised float32 -> what is sent."""
        x = np.asarray(x, dtype=np.float32)
        if self.dtype == 'fp32':
            return x
        return np.clip(np.round((x * self.std + self.mean) * 255), 0, 255).astype(np.uint8)

    def decode(self, a):
        """What was received -> B×C×H×W normalised float32."""
        if self.dtype == 'fp32':
            return np.asarray(a, dtype=np.float32)
        if self.table is not None and a.size <= SMALL_IMAGE:
            return self.table.take(a)
        x = a.astype(np.float32)
        x *= self.scale
        x += self.offset
        return x
