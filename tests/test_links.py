"""bench/links_bench.py's shaped network namespaces: the shaping is real and the namespace is removed afterwards.

Skipped where namespaces or the tbf qdisc are unavailable (not root, no iproute2)."""
import subprocess
import sys

import pytest

from bench import links_bench as links

REASON = links.check_tools()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f'links: {REASON}')

# Sends N bytes over TCP on the namespace's loopback and prints the seconds the receiver took to get them all.
TRANSFER = '''
import socket, sys, threading, time
n = int(sys.argv[1])
server = socket.create_server(('127.0.0.1', 0))
def send():
    with socket.create_connection(server.getsockname()) as c:
        c.sendall(b'x' * n)
threading.Thread(target=send).start()
conn, _ = server.accept()
start, got = time.perf_counter(), 0
while got < n:
    got += len(conn.recv(1 << 16))
print(time.perf_counter() - start)
'''


def transfer_seconds(prefix, nbytes):
    out = subprocess.run([*prefix, sys.executable, '-c', TRANSFER, str(nbytes)], capture_output=True, text=True,
                         check=True, timeout=60)
    return float(out.stdout)


def namespaces():
    return subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True, check=True).stdout


def test_rate_limit_applies_inside_the_namespace_and_is_removed_after():
    name = 'devit-test-shaped'
    with links.Namespace(name, rate='20mbit') as prefix:
        assert name in namespaces()
        # 2 MB at 20 Mbit/s takes 0.8 s; the shaper cannot let it through in under half that.
        assert transfer_seconds(prefix, 2_000_000) > 0.4
    assert name not in namespaces()


def test_unshaped_namespace_has_a_working_loopback():
    with links.Namespace('devit-test-plain') as prefix:
        assert transfer_seconds(prefix, 100_000) < 30


def test_rate_parsing():
    assert links.rate_bits('1gbit') == 1e9 and links.rate_bits('20mbit') == 2e7
    with pytest.raises(ValueError):
        links.rate_bits('20mbps')
