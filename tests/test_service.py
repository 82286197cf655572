"""The collaborative runtime as a service (collab_infer.py --serve): HTTP answers, deadlines, leave and rejoin, a
refused join, SIGTERM.

Real processes on loopback: the aggregator (`collab_infer.py --serve`) and standalone workers (`python -m
collab.worker`, the command a board runs, with the onnxruntime backend), on a tiny random ensemble and real
Fashion-MNIST test images sent as PNG files. Every process is started in a session of its own and killed at the
end whatever happens.
"""
import collections
import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from collab_fixtures import export, images, reference, save_ensemble, write_pngs
from helpers import ROOT, descendants, env, free_port, kill_group, launch_cmd

from collab import client, quota
from datasets import build_dataset

N = 3
DEADLINE_MS = 2000  # long next to a tiny forward on a loaded machine: only a dead or stalled worker misses it
JOIN_S = 10  # a restarted worker must be back within this


@pytest.fixture(scope='module')
def model(tmp_path_factory, fmnist_root):
    d = tmp_path_factory.mktemp('service')
    ckpt = save_ensemble(d / 'ens.pth', N)
    x, _ = images(fmnist_root, 8)
    one = save_ensemble(d / 'ens1.pth', 1)
    return {'ckpt': ckpt, 'export': export(ckpt, str(d / 'export')), 'ckpt1': one,
            'export1': export(one, str(d / 'export1')), 'expected1': reference(one, x),
            'wide': export(save_ensemble(d / 'wide.pth', 1, embed_dim=48), str(d / 'wide')),
            'pngs': write_pngs(x, str(d / 'png')), 'expected': reference(ckpt, x),
            'names': build_dataset('fashion_mnist', fmnist_root, 'val', input_size=28, in_chans=1,
                                   tiny=True).class_names}


class Procs:
    """Processes of one test, each in its own session with its output in a file; all killed at the end."""

    def __init__(self, folder):
        self.folder, self.procs = folder, {}

    def start(self, name, cmd, **extra_env):
        log = open(os.path.join(self.folder, f'{name}.log'), 'w')
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=dict(env(), **extra_env), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self.procs[name]

    def log(self, name):
        with open(os.path.join(self.folder, f'{name}.log'), errors='replace') as f:
            return f.read()

    def logs(self):
        return '\n'.join(f'--- {n}\n{self.log(n)[-3000:]}' for n in self.procs)

    def kill_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                kill_group(p)


@pytest.fixture
def procs(tmp_path):
    p = Procs(str(tmp_path))
    yield p
    p.kill_all()


def aggregator_cmd(model, http, port, *extra):
    return [sys.executable, os.path.join(ROOT, 'collab_infer.py'), '--serve', '--port', str(http), '--host',
            '127.0.0.1', '--collab-port', str(port), '--backend', 'onnxruntime', '--model-path', model['export'],
            '--dataset', 'fashion_mnist', '--tiny-transforms', *extra]


def worker_cmd(export_dir, port, index, *extra):
    return [sys.executable, '-m', 'collab.worker', '--aggregator', f'tcp://127.0.0.1:{port}', '--device-index',
            str(index), '--backend', 'onnxruntime', '--model-path', export_dir, *extra]


def wait_for(what, check, procs, timeout=120):
    """Poll `check()` (exceptions count as not yet) until it returns something true; fail with the logs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = check()
            if value:
                return value
        except (client.ServiceError, KeyError, IndexError):
            pass
        time.sleep(0.05)
    raise AssertionError(f'{what} not within {timeout} s\n{procs.logs()}')


def states(url):
    return [d['state'] for d in client.health(url)['devices']]


def start_service(procs, model, *extra, workers=None):
    http, port = free_port(), free_port()
    url = f'http://127.0.0.1:{http}'
    procs.start('aggregator', aggregator_cmd(model, http, port, *extra))
    for i in range(N):
        procs.start(f'worker{i}', worker_cmd(model['export'], port, i, *(workers or {}).get(i, [])))
    wait_for('every worker up', lambda: states(url) == ['up'] * N, procs)
    return url, port


def test_service_answers_refuses_bad_input_and_survives_kill_and_rejoin(procs, model):
    url, port = start_service(procs, model, '--deadline-ms', str(DEADLINE_MS))

    # One image: the ensemble's prediction, the class names, every device used.
    answer = client.predict(url, model['pngs'][0], topk=3)
    assert answer['devices'] == [0, 1, 2] and answer['missing'] == {}
    assert answer['top'][0]['class'] == model['expected'][0]
    assert [t['name'] for t in answer['top']] == [model['names'][t['class']] for t in answer['top']]
    probs = [t['probability'] for t in answer['top']]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert answer['latency_ms']['total'] > 0
    health = client.health(url)
    assert health['status'] == 'ok' and {d['model'] for d in health['devices']} == {'dedeit'}
    assert all(d['backend'] == 'onnxruntime' and d['last_latency_ms'] > 0 for d in health['devices'])

    # A body that is no image: 400 with one line, and the service goes on.
    with pytest.raises(client.ServiceError) as bad:
        client.predict(url, b'this is not a PNG')
    assert bad.value.status == 400 and 'not an image file' in str(bad.value) and '\n' not in str(bad.value)
    assert client.predict(url, model['pngs'][1])['top'][0]['class'] == model['expected'][1]

    # One kept-alive connection for many requests.
    with client.Client(url) as c:
        first = c.predict(model['pngs'][2])
        sock = c.conn.sock
        again = [c.predict(model['pngs'][k]) for k in (3, 4, 5)]
        assert c.conn is not None and c.conn.sock is sock, 'the connection was not kept alive'
    assert [a['top'][0]['class'] for a in [first, *again]] == [model['expected'][k] for k in (2, 3, 4, 5)]

    # Several clients at once.
    results, errors = {}, []

    def one_client(c):
        try:
            for k in range(4):
                i = (c + k) % len(model['pngs'])
                results[(c, k)] = (i, client.predict(url, model['pngs'][i]))
        except Exception as err:  # noqa: BLE001 (collected, asserted below)
            errors.append(err)
    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 16
    assert all(a['top'][0]['class'] == model['expected'][i] and a['devices'] == [0, 1, 2]
               for i, a in results.values())

    # Kill worker 1 while a client sends requests; start the same command again.
    answers, failures, stop = [], [], threading.Event()

    def sender():
        k = 0
        while not stop.is_set():
            sent = time.monotonic()
            try:
                a = client.predict(url, model['pngs'][k % 8])
                answers.append((sent, time.monotonic(), k, a))
            except client.ServiceError as err:
                failures.append((k, err))
            k += 1
            time.sleep(0.02)
    thread = threading.Thread(target=sender)
    thread.start()
    try:
        wait_for('answers before the kill', lambda: len(answers) >= 5, procs)
        os.kill(procs.procs['worker1'].pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for('device 1 gone', lambda: states(url)[1] == 'gone', procs, timeout=DEADLINE_MS / 1e3 + 10)
        gone = time.monotonic()
        n_gone = len(answers)
        wait_for('answers without device 1', lambda: len(answers) >= n_gone + 5, procs)
        restarted = time.monotonic()
        procs.start('worker1-again', worker_cmd(model['export'], port, 1))
        wait_for('device 1 back', lambda: states(url)[1] == 'up', procs, timeout=60)
        back = time.monotonic()
        n_back = len(answers)
        wait_for('answers after the rejoin', lambda: len(answers) >= n_back + 5, procs)
    finally:
        stop.set()
        thread.join(60)
    assert not failures, failures
    ks = [k for _, _, k, _ in answers]
    assert ks == list(range(len(ks)))  # every request answered, once, in order
    assert answers[-1][3]['request'] - answers[0][3]['request'] == len(answers) - 1
    assert gone - killed < DEADLINE_MS / 1e3 + 5, 'a killed worker is marked gone within the deadline'
    assert back - restarted < JOIN_S, f'the restarted worker took {back - restarted:.1f} s to join'
    between = [a for sent, done, _, a in answers if sent >= gone and done <= restarted]
    after = [a for sent, _, _, a in answers if sent > back]
    assert between and all(a['devices'] == [0, 2] and '1' in a['missing'] for a in between)
    assert after and all(a['devices'] == [0, 1, 2] for a in after), [a['devices'] for a in after]
    assert all(a['top'][0]['class'] == model['expected'][k % 8] for _, _, k, a in answers if a['devices'] == [0, 1, 2])
    health = client.health(url)
    assert health['devices'][1]['joins'] == 2 and health['status'] == 'ok'

    # A worker whose model does not fit the head is refused, with one line on each side; device 0 stays up.
    refused = procs.start('refused', worker_cmd(model['wide'], port, 0))
    assert refused.wait(60) == 2
    lines = [line for line in procs.log('refused').splitlines() if 'error:' in line]
    assert len(lines) == 1 and 'refused this worker' in lines[0], procs.log('refused')
    assert 'sends 96 floats per image but the ensemble head expects 64 from device 0' in lines[0]
    said = [line for line in procs.log('aggregator').splitlines() if line.startswith('refused')]
    assert len(said) == 1 and 'sends 96 floats per image' in said[0], procs.log('aggregator')
    assert states(url) == ['up'] * N

    # SIGTERM: the aggregator stops the workers and exits 0; nothing is left.
    agg = procs.procs['aggregator']
    workers = [procs.procs[n] for n in ('worker0', 'worker1-again', 'worker2')]
    agg.send_signal(signal.SIGTERM)
    assert agg.wait(30) == 0, procs.log('aggregator')
    assert [w.wait(30) for w in workers] == [0, 0, 0], procs.logs()
    assert 'stopped after' in procs.log('aggregator')


def test_deadline_answers_without_a_stalled_worker_and_keeps_it(procs, model):
    """Worker 2 stalls for 3 s at request 4: those requests are answered by devices 0 and 1 at the deadline, worker 2
    is 'late' (not gone), its late replies are discarded, and it answers again once the stall is over."""
    deadline = 400
    url, _ = start_service(procs, model, '--deadline-ms', str(deadline),
                           workers={2: ['--fault', 'stall', '--fault-after', '4', '--fault-seconds', '3']})
    seen_late = False
    answers = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        answers.append(client.predict(url, model['pngs'][len(answers) % 8]))
        seen_late = seen_late or client.health(url)['devices'][2]['state'] == 'late'
        if len(answers) > 8 and answers[-1]['devices'] == [0, 1, 2] and any(a['devices'] == [0, 1]
                                                                              for a in answers):
            break
    without = [a for a in answers if a['devices'] == [0, 1]]
    assert without, [a['devices'] for a in answers]
    assert all(a['missing'] == {'2': f'missed the {deadline} ms deadline'} for a in without)
    assert all(a['latency_ms']['total'] < 3000 for a in without), 'answers did not wait for the stalled worker'
    assert answers[-1]['devices'] == [0, 1, 2], 'the late worker is used again after its stall'
    assert seen_late
    d = client.health(url)['devices'][2]
    assert d['state'] == 'up' and d['joins'] == 1 and d['missed'] >= 1


def test_requests_waiting_for_busy_devices_go_out_as_one_batch(procs, model):
    """Worker 0 stalls 2 s at the first request: the requests sent meanwhile wait, then go out together (at most
    --max-batch), and each client gets its own image's answer out of the batch."""
    url, _ = start_service(procs, model, '--max-batch', '4',
                           workers={0: ['--fault', 'stall', '--fault-after', '0', '--fault-seconds', '2']})
    answers, errors = {}, []

    def send(k):
        try:
            answers[k] = client.predict(url, model['pngs'][k % 8])
        except Exception as err:  # noqa: BLE001 (collected, asserted below)
            errors.append(err)
    first = threading.Thread(target=send, args=(0,))
    first.start()
    time.sleep(0.5)  # request 0 is at the stalled worker
    threads = [threading.Thread(target=send, args=(k,)) for k in range(1, 11)]
    for t in threads:
        t.start()
    for t in [first, *threads]:
        t.join(120)
    assert not errors and sorted(answers) == list(range(11)), errors
    assert all(a['top'][0]['class'] == model['expected'][k % 8] and a['devices'] == [0, 1, 2]
               for k, a in answers.items())
    sizes = [a['batch'] for a in answers.values()]
    assert max(sizes) > 1 and max(sizes) <= 4, sizes
    assert answers[0]['batch'] == 1


@pytest.mark.skipif(quota.unavailable_reason() is not None, reason=f'CPU quotas: {quota.unavailable_reason()}')
def test_deadline_with_a_throttled_worker(procs, model):
    """Worker 1 runs under its own CPU quota (--cpu-quota); throttled to 0.002 of a core it misses most deadlines and
    those answers come from the others; given its core back it is used again, never having left. (1 ms of CPU per
    0.5 s period is more than one tiny forward needs: when a period starts during a request, the throttled worker can
    still make that deadline, so not every answer lacks it.)"""
    deadline = 150
    url, _ = start_service(procs, model, '--deadline-ms', str(deadline), workers={1: ['--cpu-quota', '0.5']})
    pid = procs.procs['worker1'].pid
    with open(f'/proc/{pid}/cgroup') as f:
        assert f'devit-{pid}' in f.read(), 'the worker is in a cgroup of its own'
    assert client.health(url)['devices'][1]['cpu_quota'] == 0.5
    quota.limit_cpu(0.002, pid)  # the same group, a tighter quota: 1 ms of CPU every 0.5 s
    answers = [client.predict(url, model['pngs'][k % 8]) for k in range(10)]
    measured, used = answers[2:], [a['devices'] for a in answers]
    without = [a for a in measured if a['devices'] == [0, 2]]
    assert all(a['devices'] in ([0, 2], [0, 1, 2]) for a in measured) and len(without) >= 5, used
    assert all(a['missing'] == {'1': f'missed the {deadline} ms deadline'} for a in without), used
    d = client.health(url)['devices'][1]
    assert d['state'] in ('late', 'up') and d['joins'] == 1 and d['missed'] >= 5
    quota.limit_cpu(4, pid)
    a = wait_for('device 1 used again', lambda: (lambda r: r if r['devices'] == [0, 1, 2] else None)(
        client.predict(url, model['pngs'][0])), procs, timeout=60)
    assert a['top'][0]['class'] == model['expected'][0]


def test_sigterm_to_the_launcher_stops_everything(procs, model):
    """The service under torch.distributed.launch (rank 0 the aggregator, rank 1 a worker; onnxruntime backend):
    SIGTERM to the launcher stops every process; none is left."""
    http, port = free_port(), free_port()
    url = f'http://127.0.0.1:{http}'
    cmd = launch_cmd('collab_infer.py', '--serve', '--port', str(http), '--host', '127.0.0.1', '--collab-port',
                     str(port), '--backend', 'onnxruntime', '--model-path', model['export1'], '--dataset',
                     'fashion_mnist', '--tiny-transforms', '--deadline-ms', str(DEADLINE_MS), nproc=2)
    launcher = procs.start('launcher', cmd)
    wait_for('the worker up', lambda: states(url) == ['up'], procs)
    assert client.predict(url, model['pngs'][0])['top'][0]['class'] == model['expected1'][0]
    assert client.health(url)['devices'][0]['backend'] == 'onnxruntime'
    tree = descendants(launcher.pid)
    assert len(tree) >= 2
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(60)
    end = time.monotonic() + 30
    while time.monotonic() < end and any(os.path.exists(f'/proc/{p}') for p in tree):
        time.sleep(0.1)
    left = [p for p in tree if os.path.exists(f'/proc/{p}')]
    assert not left, f'processes left after SIGTERM: {left}\n{procs.logs()}'
    assert 'stopped after 1 requests' in procs.log('launcher'), procs.log('launcher')


def test_runtime_follows_a_killed_launcher(procs, model, fmnist_root):
    """SIGKILL the launcher of a batch run while it serves: the aggregator and the worker notice and exit."""
    cmd = launch_cmd('collab_infer.py', '--model-path', model['ckpt1'], '--data-path', fmnist_root, '--limit',
                     '10000', '--collab-port', str(free_port()), nproc=2)
    launcher = procs.start('launcher', cmd)
    wait_for('the worker joined', lambda: 'joined the aggregator' in procs.log('launcher'), procs)
    tree = descendants(launcher.pid)
    assert len(tree) >= 2
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    end = time.monotonic() + 20
    while time.monotonic() < end and any(os.path.exists(f'/proc/{p}') for p in tree):
        time.sleep(0.1)
    assert not [p for p in tree if os.path.exists(f'/proc/{p}')], procs.log('launcher')
    assert procs.log('launcher').count('the launcher (pid') >= 1


def test_client_opens_a_new_connection_when_the_kept_one_was_closed():
    """A server that closes every connection after its answer (as one closing idle connections does): the kept
    connection is found closed at the next request, and the client opens a new one, once, unseen by the caller."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Closing(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args):
            pass

        def do_POST(self):
            seen.append(self.rfile.read(int(self.headers['Content-Length'])))
            body = json.dumps({'request': len(seen)}).encode()
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()  # no "Connection: close": the client learns of the close at its next request
            self.wfile.write(body)
            self.close_connection = True

    server = ThreadingHTTPServer(('127.0.0.1', 0), Closing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with client.Client(f'http://127.0.0.1:{server.server_address[1]}') as c:
            assert [c.predict(b'a')['request'], c.predict(b'b')['request'], c.predict(b'c')['request']] == [1, 2, 3]
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [b'a', b'b', b'c']
    with pytest.raises(client.ServiceError) as err:
        client.predict(f'http://127.0.0.1:{free_port()}', b'a')
    assert err.value.status is None and 'cannot reach' in str(err.value)


def _read_to_end(s, timeout):
    """Everything `s` receives until the peer closes it, and when that was (time.monotonic()). A reset counts as the
    close: a byte written just after the peer closed is answered with one."""
    s.settimeout(timeout)
    data = b''
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    return data, time.monotonic()


def test_slow_headers_are_cut_off_after_the_header_timeout(procs, model):
    """50 connections that send part of a request and then dribble a byte every 0.2 s (slowloris): a fresh request
    is answered at once; each slow one gets a JSON 408 and is closed --header-timeout-s after it opened. A request
    whose headers came in time is not cut off by it however long its body takes (--body-timeout-s's business); an
    idle kept-alive connection is closed after it, without a 408."""
    timeout = 1.0
    url, _ = start_service(procs, model, '--header-timeout-s', str(timeout))
    addr = ('127.0.0.1', int(url.rsplit(':', 1)[1]))
    slow = [socket.create_connection(addr, timeout=10) for _ in range(50)]
    opened = time.monotonic()
    for s in slow:
        s.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ')
    stop = threading.Event()

    def dribble():
        live = list(slow)
        while live and not stop.wait(0.2):
            readable = set(select.select(live, [], [], 0)[0])  # the answer came: stop writing to it
            live = [s for s in live if s not in readable]
            for s in live:
                s.send(b'a')
    dribbler = threading.Thread(target=dribble)
    dribbler.start()
    try:
        t0 = time.monotonic()
        assert client.predict(url, model['pngs'][0])['devices'] == [0, 1, 2]
        fresh = time.monotonic() - t0
        assert fresh < 2, f'a fresh request took {fresh:.2f} s beside 50 slow connections'
        # headers in time, the body 1.5 s later: answered (400, not an image), not cut off at 1 s
        held = socket.create_connection(addr, timeout=10)
        held.sendall(b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n')
        ended = [_read_to_end(s, 10) for s in slow]
        time.sleep(max(0.0, 1.5 - (time.monotonic() - t0)))
        held.sendall(b'junk')
        reply, _ = _read_to_end(held, 10)
        assert reply.startswith(b'HTTP/1.1 400') and b'not an image' in reply, reply
    finally:
        stop.set()
        dribbler.join(10)
    for reply, at in ended:
        head, _, body = reply.partition(b'\r\n\r\n')
        assert head.startswith(b'HTTP/1.1 408') and b'connection: close' in head.lower(), reply
        assert 'header-timeout-s' in json.loads(body)['error']
        assert timeout - 0.1 <= at - opened <= timeout + 3, at - opened
    for s in slow + [held]:
        s.close()
    # kept alive: the next request's headers are due --header-timeout-s after the answer; idle, closed quietly
    kept = socket.create_connection(addr, timeout=10)
    kept.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n\r\n')
    first = b''
    while b'\r\n\r\n' not in first:
        first += kept.recv(65536)
    head, _, body = first.partition(b'\r\n\r\n')
    length = int(next(v for k, _, v in (line.partition(b':') for line in head.split(b'\r\n'))
                      if k.strip().lower() == b'content-length'))
    while len(body) < length:
        body += kept.recv(65536)
    answered = time.monotonic()
    assert head.startswith(b'HTTP/1.1 200') and json.loads(body)['status'] == 'ok', first
    rest, at = _read_to_end(kept, 10)
    kept.close()
    assert rest == b'' and timeout - 0.1 <= at - answered <= timeout + 3, (rest, at - answered)


def test_a_burst_over_max_connections_gets_200_or_503_with_retry_after(procs, model):
    """80 requests at once, each on a connection of its own, against --max-connections 8: every one is answered,
    200 or a JSON 503 with Retry-After (as over --max-inflight); none is reset or refused. The service answers
    after the burst."""
    url, _ = start_service(procs, model, '--max-connections', '8')
    host, port = '127.0.0.1', int(url.rsplit(':', 1)[1])
    with open(model['pngs'][0], 'rb') as f:
        png = f.read()
    n = 80
    start = threading.Barrier(n)
    results = [None] * n

    def one(i):
        start.wait(30)
        c = http.client.HTTPConnection(host, port, timeout=60)
        try:
            c.request('POST', '/predict', png, {'Content-Type': 'application/octet-stream'})
            r = c.getresponse()
            results[i] = (r.status, r.getheader('Retry-After'), r.getheader('Content-Type'), r.read())
        except OSError as err:
            results[i] = err
        finally:
            c.close()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    failed = [r for r in results if not isinstance(r, tuple)]
    assert not failed, failed[:5]
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503} and 503 in codes, codes
    for code, retry, kind, body in results:
        if code == 503:
            assert retry == '1' and kind == 'application/json', (retry, kind)
            assert 'max-connections' in json.loads(body)['error']
        else:
            assert json.loads(body)['top'][0]['class'] == model['expected'][0]
    print(f'{codes.count(200)} answered 200, {codes.count(503)} 503')
    assert client.predict(url, model['pngs'][1])['top'][0]['class'] == model['expected'][1]


def test_the_http_socket_hands_asyncio_connections_it_sets_tcp_nodelay_on():
    """An answer is written in parts (its headers, then its body); with Nagle's algorithm on the second part waits
    for the client's delayed ACK, 40 ms on every request. asyncio turns Nagle off only on connections of a socket
    made as IPPROTO_TCP, which collab.host.server.listen must therefore be."""
    import asyncio

    from collab.host.server import listen

    async def accept_one():
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info('socket')
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()
        server = await asyncio.get_running_loop().create_server(Probe, sock=listen('127.0.0.1', 0, 8))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection('127.0.0.1', port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()
    assert asyncio.run(accept_one()) != 0


def test_the_batcher_answers_every_caller_with_its_own_rows_and_keeps_to_its_lanes():
    """16 threads and 16 coroutines of one event loop, 40 jobs each of 1-3 images, against a client that takes a
    little while (its answer to a coroutine set from another thread, as the dispatcher's thread does): each caller
    gets its own images back (the rows of its job in the batch), batches hold at most max_batch images unless a
    job is bigger, at most LANES batches run at once, and some batches do hold several jobs."""
    import asyncio
    import random

    import numpy as np

    from collab.host.modes import LoopEvent
    from collab.host.service import Batcher

    running, most, sizes, lock = [0], [0], [], threading.Lock()

    class Reply:
        def __init__(self, x):
            self.logits = x

    class Client:
        def __call__(self, x, index):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
                sizes.append(len(x))
            time.sleep(random.uniform(0, 0.003))
            with lock:
                running[0] -= 1
            if index == -7:
                raise RuntimeError('this batch failed')
            return Reply(x.copy())

        async def acall(self, x, index):
            done, out = LoopEvent(), {}

            def work():
                try:
                    out['reply'] = self(x, index)
                except RuntimeError as err:
                    out['error'] = err
                done.set()
            threading.Thread(target=work).start()
            assert await done.wait_async(30)
            if 'error' in out:
                raise out['error']
            return out['reply']

    batcher = Batcher(Client(), max_batch=4)
    errors, answered = [], collections.Counter()

    def check(t, k, x, reply, row, size):
        answered[t] += 1
        got = reply.logits[row:row + len(x)]
        if not (got == x).all() or size != len(reply.logits):
            errors.append((t, k, got.ravel().tolist(), x.ravel().tolist()))

    def job(t, k, rng):
        return np.full((rng.randint(1, 3), 1), t * 1000 + k, np.float32)

    def caller(t):
        rng = random.Random(t)
        for k in range(40):
            x = job(t, k, rng)
            check(t, k, x, *batcher(x, t))

    async def coroutine(t):
        rng = random.Random(t)
        for k in range(40):
            x = job(t, k, rng)
            check(t, k, x, *await batcher.run(x, t))

    async def coroutines():
        await asyncio.wait_for(asyncio.gather(*(coroutine(t) for t in range(16, 32))), 120)
    threads = [threading.Thread(target=caller, args=(t,)) for t in range(16)]
    threads.append(threading.Thread(target=asyncio.run, args=(coroutines(),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), 'a caller never got its answer'
    assert not errors, errors[:3]
    assert most[0] <= Batcher.LANES
    assert max(sizes) <= 4 and sum(sizes) > 0 and len(sizes) < 32 * 40  # some batches held several jobs
    assert answered == dict.fromkeys(range(32), 40) and not batcher.waiting and batcher.running == 0
    with pytest.raises(RuntimeError, match='this batch failed'):
        asyncio.run(batcher.run(np.zeros((1, 1), np.float32), -7))
    with pytest.raises(RuntimeError, match='this batch failed'):
        batcher(np.zeros((1, 1), np.float32), -7)
    reply, row, size = batcher(np.ones((6, 1), np.float32), 0)  # bigger than max_batch: alone
    assert size == 6 and row == 0
