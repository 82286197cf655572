"""The link between a device and its aggregator, measured: ``python -m jetson.profile --link-server PORT`` on the
aggregator, ``--link tcp://HOST:PORT`` on the device (median round trip of 1-byte messages, median rate of a few
4 MB sends over one TCP connection).

Device-side module: Python 3.6+, the standard library only.
"""
import math
import socket
import socketserver
import statistics
import struct
import time

from collab.profiles import ProfileError

LINK_BYTES = 4 << 20


def parse_link(text):
    """'tcp://HOST:PORT' -> ('tcp', host, port); a number -> ('given', Mbit/s)."""
    if text.startswith('tcp://'):
        host, sep, port = text[len('tcp://'):].rpartition(':')
        if not sep or not host or not port.isdigit():
            raise ProfileError(f'--link {text}: expected tcp://HOST:PORT or a rate in Mbit/s')
        return ('tcp', host.strip('[]'), int(port))
    try:
        rate = float(text)
    except ValueError:
        raise ProfileError(f'--link {text}: expected tcp://HOST:PORT or a rate in Mbit/s') from None
    if not (rate > 0 and math.isfinite(rate)):
        raise ProfileError(f'--link {text}: a rate must be a positive number of Mbit/s')
    return ('given', rate)


def _recv_exact(sock, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if not k:
            raise ConnectionError('the link peer closed the connection')
        got += k
    return buf


class LinkHandler(socketserver.BaseRequestHandler):
    """b'p' -> echo b'p'; b'b' + 8-byte length + payload -> b'k' once all of it arrived; anything else ends."""

    def handle(self):
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                cmd = sock.recv(1)
                if cmd == b'p':
                    sock.sendall(b'p')
                elif cmd == b'b':
                    n = struct.unpack('!Q', _recv_exact(sock, 8))[0]
                    while n:
                        n -= len(_recv_exact(sock, min(n, 1 << 20)))
                    sock.sendall(b'k')
                else:
                    return
        except (ConnectionError, OSError):
            return


class LinkServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve_link(address):
    host, _, port = address.rpartition(':')
    if not port.isdigit():
        raise ProfileError(f'--link-server {address}: expected [HOST:]PORT')
    server = LinkServer((host or '0.0.0.0', int(port)), LinkHandler)
    print('link server on {}:{} (Ctrl-C to stop)'.format(*server.server_address[:2]), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def measure_link(host, port, pings=20, rounds=3, nbytes=LINK_BYTES, timeout=30.0):
    """{'mbps', 'rtt_ms', 'source'}: median round trip of 1-byte messages, median rate of ``rounds`` sends."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise ProfileError(f'--link tcp://{host}:{port}: cannot connect ({err.strerror or err}); start '
                           f'python -m jetson.profile --link-server {port} there first') from None
    payload = b'\0' * nbytes
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            sock.sendall(b'p')
            _recv_exact(sock, 1)
            rtts.append((time.perf_counter() - t0) * 1000.0)
        rtt = statistics.median(rtts)
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            sock.sendall(b'b' + struct.pack('!Q', nbytes))
            sock.sendall(payload)
            _recv_exact(sock, 1)
            seconds = max(time.perf_counter() - t0 - rtt / 1000.0, 1e-9)
            rates.append(nbytes * 8 / seconds / 1e6)
        sock.sendall(b'q')
    return {'mbps': round(statistics.median(rates), 1), 'rtt_ms': round(rtt, 4),
            'source': f'measured against tcp://{host}:{port} ({rounds} x {nbytes >> 20} MB, {pings} pings)'}
