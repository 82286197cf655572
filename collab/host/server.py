"""collab_infer.py --serve: the service on uvicorn (HTTP, collab/host/http_api.py) and grpcio (--grpc-port,
collab/host/grpc_api.py), up until SIGINT / SIGTERM.

    python collab_infer.py --serve --port 8080 [--grpc-port 8081] --model-path ENSEMBLE_OR_EXPORT [--token-file F]

On SIGTERM (or SIGINT) the listening sockets close, requests in flight are answered (for at most --drain-s), the
workers are told to stop, and the process exits 0 with "stopped after N requests".
"""
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading

import torch

from collab.keys import KeyFileError, check_bind, read_tokens

from . import oip
from .metrics import Metrics
from .service import Service


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """The HTTP socket, bound and listening with --backlog (so that a burst of connections waits, not resets)."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections of a socket that says it is TCP (proto 0 is
    # not), and without it an answer written in two parts waits for the client's delayed ACK, 40 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f'cannot serve HTTP on {host}:{port}: {err.strerror or err}') from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def http_protocol(args):
    """uvicorn's httptools protocol with the service's connection limits:

    - --header-timeout-s: a connection whose request line and headers have not all arrived within that many seconds
      of its opening (or of its previous answer) is closed, with a JSON 408 when part of a request came; bytes
      dribbled in do not extend it (uvicorn's own keep-alive timer restarts on every read);
    - --max-connections: a request on a connection beyond that many open ones, or while that many requests run,
      gets a JSON 503 with Retry-After (uvicorn's limit_concurrency answers text without Retry-After), after its
      body is read (closing on an unread body would reset the connection before the client reads the answer).
    """
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    header_timeout = args.header_timeout_s
    max_connections = args.max_connections
    max_body = int(args.max_body_mb * 1024 * 1024)
    busy = json.dumps({'error': f'the service is at {max_connections} open connections or running requests '
                                '(--max-connections): try again shortly'}).encode()
    late = json.dumps({'error': f'the request headers did not arrive within {header_timeout:g} s '
                                '(--header-timeout-s)'}).encode()

    async def over_limit(scope, receive, send):
        read = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.body_timeout_s):
                while read <= max_body:
                    message = await receive()
                    read += len(message.get('body', b''))
                    if message['type'] != 'http.request' or not message.get('more_body'):
                        break
        await send({'type': 'http.response.start', 'status': 503, 'headers': [
            (b'content-type', b'application/json'), (b'content-length', str(len(busy)).encode()),
            (b'retry-after', b'1'), (b'connection', b'close')]})
        await send({'type': 'http.response.body', 'body': busy})

    class ServiceProtocol(HttpToolsProtocol):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.limit_concurrency = None  # checked in on_headers_complete instead, with the JSON 503
            self.header_timer = None
            self.header_begun = False  # part of a request line or of headers has arrived

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc):
            self._cancel_header_timer()
            super().connection_lost(exc)

        def on_message_begin(self):
            self.header_begun = True
            super().on_message_begin()

        def on_headers_complete(self):
            self._cancel_header_timer()
            self.header_begun = False
            if len(self.connections) > max_connections or len(self.tasks) >= max_connections:
                self.logger.warning('503: over --max-connections')
                app, self.app = self.app, over_limit
                try:
                    super().on_headers_complete()
                finally:
                    self.app = app
            else:
                super().on_headers_complete()

        def on_response_complete(self):
            pipelined = bool(self.pipeline)  # the next request's headers are in already
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self._arm_header_timer()

        def _arm_header_timer(self):
            self._cancel_header_timer()
            self.header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _cancel_header_timer(self):
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _header_timeout(self):
            self.header_timer = None
            if self.transport.is_closing():
                return
            if self.header_begun:
                head = [STATUS_LINE[408]]
                for name, value in self.server_state.default_headers:
                    head += [name, b': ', value, b'\r\n']
                head += [b'content-type: application/json\r\ncontent-length: ', str(len(late)).encode(),
                         b'\r\nconnection: close\r\n\r\n', late]
                self.transport.write(b''.join(head))
            self.transport.close()
    return ServiceProtocol


def http_server(args, app):
    """The uvicorn server of `app` with the service's protocol (http_protocol) and limits; run it with
    `server.run(sockets=[listen(...)])`."""
    import uvicorn

    # loop 'auto': uvloop where installed (requirements.txt has it; less per request than asyncio's loop)
    return uvicorn.Server(uvicorn.Config(app, http=http_protocol(args), loop='auto', lifespan='on',
                                         log_level='warning', access_log=False, limit_concurrency=args.max_connections,
                                         backlog=args.backlog, timeout_keep_alive=args.header_timeout_s,
                                         timeout_graceful_shutdown=args.drain_s))


def serve(args) -> int:
    """Run the service until SIGINT / SIGTERM; then drain, stop the workers and return 0."""
    from .http_api import build_app

    try:
        said = check_bind(args.host, args.keys or args.token_file, args.insecure, 'the service')
        tokens = read_tokens(args.token_file) if args.token_file else None
    except KeyFileError as err:
        _say(f'error: {err}')
        return 2
    if said:
        _say(said)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stderr)
    sock = listen(args.host, args.port, args.backlog)
    service = Service(args)
    metrics = Metrics(service)
    service.on_reply = metrics.observe_reply
    model = oip.Model(service, args.model_name)
    app = build_app(service, model, metrics, args, tokens)
    server = http_server(args, app)
    grpc_server = None
    if args.grpc_port:
        from .grpc_api import start_grpc

        try:
            grpc_server = start_grpc(model, metrics, args, tokens)
        except RuntimeError as err:
            sock.close()
            service.close()
            _say(f'error: {err}')
            return 2
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, name='http', daemon=True)
    thread.start()
    host = args.host if args.host not in ('', '0.0.0.0', '::') else 'localhost'
    grpc = f', gRPC on {host}:{args.grpc_port}' if grpc_server else ''
    _say(f'serving on http://{host}:{sock.getsockname()[1]} (OIP at /v2, POST /predict, GET /health, /metrics, '
         f'/docs){grpc}; model {args.model_name!r}; workers join at {service.dispatcher.endpoint}; '
         f'{len(service.dispatcher.slots)} devices expected')
    while not stop.wait(0.5):
        if not thread.is_alive():
            break
    _say(f'stopping: draining requests in flight (at most {args.drain_s:g} s), then the workers are told to stop')
    server.should_exit = True
    if grpc_server is not None:
        grpc_server.stop(args.drain_s).wait(args.drain_s + 1)
    thread.join(args.drain_s + 5)
    service.close()
    _say(f'stopped after {service.count} requests')
    return 0
