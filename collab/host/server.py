"""collab_infer.py --serve: the service on uvicorn (HTTP, collab/host/http_api.py) and grpcio (--grpc-port,
collab/host/grpc_api.py), up until SIGINT / SIGTERM.

    python collab_infer.py --serve --port 8080 [--grpc-port 8081] --model-path ENSEMBLE_OR_EXPORT [--token-file F]

On SIGTERM (or SIGINT) the listening sockets close, requests in flight are answered (for at most --drain-s), the
workers are told to stop, and the process exits 0 with "stopped after N requests".
"""
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
    sock = socket.socket(family, socket.SOCK_STREAM)
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


def quick_ack_protocol():
    """uvicorn's httptools protocol, acknowledging every segment at once (TCP_QUICKACK, which Linux clears after
    each ACK, so it is set again on each read). A client that writes its headers and a small body in two writes with
    Nagle's algorithm on (tritonclient.http does) otherwise waits for the server's delayed ACK, 40 ms, on every
    request."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class QuickAckProtocol(HttpToolsProtocol):
        def data_received(self, data):
            sock = self.transport.get_extra_info('socket')
            if sock is not None and hasattr(socket, 'TCP_QUICKACK'):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                except OSError:
                    pass
            super().data_received(data)
    return QuickAckProtocol


def serve(args) -> int:
    """Run the service until SIGINT / SIGTERM; then drain, stop the workers and return 0."""
    import uvicorn

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
    config = uvicorn.Config(app, http=quick_ack_protocol(), lifespan='on', log_level='warning', access_log=False,
                            limit_concurrency=args.max_connections, backlog=args.backlog,
                            timeout_keep_alive=args.header_timeout_s, timeout_graceful_shutdown=args.drain_s)
    server = uvicorn.Server(config)
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
