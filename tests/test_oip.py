"""The service as an Open Inference Protocol server (collab_infer.py --serve): the real tritonclient over REST (JSON
and binary tensors) and gRPC, POST /predict and collab_infer.py --logits give the same logits; the protocol's
errors; the token on every endpoint but the probes; Prometheus metrics moving with traffic and a device kill; the
limits (body, pixels, slow and lying clients, in-flight requests); a schemathesis run (slow).

One live service per module: the aggregator and N standalone workers (`python -m collab.worker`, onnxruntime) on a
tiny random ensemble, real Fashion-MNIST test images.
"""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from collab_fixtures import export, images, save_ensemble, write_pngs
from helpers import ROOT, env, free_port, launch_cmd
from prometheus_client.parser import text_string_to_metric_families
from test_service import Procs, wait_for, worker_cmd
from tritonclient.utils import InferenceServerException

from collab import client
from collab.keys import write_token
from data_transforms import default_mean_std

N = 2
K = 6  # test images
BODY_TIMEOUT_S = 3
MAX_INFLIGHT = 6


@pytest.fixture(scope='module')
def live(tmp_path_factory, fmnist_root):
    d = tmp_path_factory.mktemp('oip')
    ckpt = save_ensemble(d / 'ens.pth', N)
    folder = export(ckpt, str(d / 'export'))
    x, _ = images(fmnist_root, K)
    pngs = write_pngs(x, str(d / 'png'))
    token_file = str(d / 'token')
    token = write_token(token_file)
    http, grpc_port, port = free_port(), free_port(), free_port()
    procs = Procs(str(d))
    procs.start('aggregator', [
        sys.executable, os.path.join(ROOT, 'collab_infer.py'), '--serve', '--port', str(http), '--host', '127.0.0.1',
        '--grpc-port', str(grpc_port), '--collab-port', str(port), '--backend', 'onnxruntime', '--model-path',
        folder, '--dataset', 'fashion_mnist', '--tiny-transforms', '--deadline-ms', '2000', '--token-file',
        token_file, '--body-timeout-s', str(BODY_TIMEOUT_S), '--max-inflight', str(MAX_INFLIGHT),
        '--max-body-mb', '1'])
    for i in range(N):
        procs.start(f'worker{i}', worker_cmd(folder, port, i))
    url = f'http://127.0.0.1:{http}'
    auth = {'Authorization': f'Bearer {token}'}
    wait_for('every worker up', lambda: [d['state'] for d in client.health(url, token=token)['devices']]
             == ['up'] * N, procs)
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(p))[None] for p in pngs]).astype(np.uint8)  # K×1×28×28
    yield {'url': url, 'http': f'127.0.0.1:{http}', 'grpc': f'127.0.0.1:{grpc_port}', 'auth': auth,
           'token': token, 'token_file': token_file, 'pngs': pngs, 'pixels': pixels, 'procs': procs,
           'export': folder, 'port': port, 'dir': d}
    procs.kill_all()


def get(url, path, headers=None, method='GET', body=None):
    """(status, JSON answer, headers) of one request (errors included)."""
    req = urllib.request.Request(url + path, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw, status, h = r.read(), r.status, r.headers
    except urllib.error.HTTPError as err:
        raw, status, h = err.read(), err.code, err.headers
    try:
        return status, json.loads(raw) if raw else None, h
    except ValueError:
        return status, raw, h


def triton_http(live):
    return httpclient.InferenceServerClient(live['http'])


def infer_http(live, pixels, binary, outputs=None):
    c = triton_http(live)
    inp = httpclient.InferInput('image', list(pixels.shape), 'UINT8')
    inp.set_data_from_numpy(pixels, binary_data=binary)
    outs = outputs or [httpclient.InferRequestedOutput('logits', binary_data=binary),
                       httpclient.InferRequestedOutput('probabilities', binary_data=binary)]
    return c.infer('devit', [inp], outputs=outs, headers=dict(live['auth']))


def grpc_auth(live):
    return {'authorization': live['auth']['Authorization']}  # gRPC metadata keys are lower case


def infer_grpc(live, pixels, outputs=None):
    c = grpcclient.InferenceServerClient(live['grpc'])
    inp = grpcclient.InferInput('image', list(pixels.shape), 'UINT8')
    inp.set_data_from_numpy(pixels)
    return c.infer('devit', [inp], outputs=outputs, headers=grpc_auth(live))


def test_same_logits_over_rest_json_binary_grpc_predict_and_the_batch_run(live):
    px = live['pixels']
    binary = infer_http(live, px, True).as_numpy('logits')
    as_json = infer_http(live, px, False)
    grpc_logits = infer_grpc(live, px).as_numpy('logits')
    predicted = np.array([_predict(live, p)['logits'] for p in live['pngs']])
    out = os.path.join(live['dir'], 'batch.npy')
    run = subprocess.run(launch_cmd('collab_infer.py', '--backend', 'onnxruntime', '--model-path', live['export'],
                                    '--images', *live['pngs'], '--logits', out, '--collab-port', str(free_port()),
                                    '--dataset', 'fashion_mnist', '--tiny-transforms', nproc=N + 1),
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    batch = np.load(out)
    assert binary.shape == (K, 10) and binary.dtype == np.float32
    for other in (as_json.as_numpy('logits'), grpc_logits, predicted, batch):
        assert np.abs(other - binary).max() <= 1e-5
    assert (binary.argmax(1) == batch.argmax(1)).all()
    probs = as_json.as_numpy('probabilities')
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs.argmax(1) == binary.argmax(1)).all()
    # FP32 normalised input is accepted as well: the same logits
    c = triton_http(live)
    (mean,), (std,) = default_mean_std(1)
    norm = ((px.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)).astype(np.float32)
    meta = c.get_model_metadata('devit', headers=dict(live['auth']))
    assert meta['inputs'][0] == {'name': 'image', 'datatype': 'UINT8', 'shape': [-1, 1, 28, 28]}
    assert [o['name'] for o in meta['outputs']] == ['logits', 'probabilities']
    inp = httpclient.InferInput('image', list(norm.shape), 'FP32')
    inp.set_data_from_numpy(norm)
    fp = c.infer('devit', [inp], headers=dict(live['auth'])).as_numpy('logits')
    assert np.abs(fp - binary).max() <= 1e-4


def _predict(live, path):
    with client.Client(live['url'], token=live['token']) as c:
        return c.predict(path)


def test_probes_metadata_classification_and_errors(live):
    c = triton_http(live)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready('devit', headers=dict(live['auth']))
    g = grpcclient.InferenceServerClient(live['grpc'])
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready('devit', headers=grpc_auth(live))
    assert 'classification' in c.get_server_metadata(headers=dict(live['auth']))['extensions']
    assert g.get_model_metadata('devit', headers=grpc_auth(live)).inputs[0].datatype == 'UINT8'
    px = live['pixels'][:2]
    logits = infer_http(live, px, True).as_numpy('logits')
    for binary in (True, False):
        r = infer_http(live, px, binary, [httpclient.InferRequestedOutput('logits', binary, class_count=3)])
        cls = r.as_numpy('logits')
        assert cls.shape == (2, 3)
        top = [[(s.decode() if isinstance(s, bytes) else s).split(':') for s in row] for row in cls]
        assert [int(t[0][1]) for t in top] == logits.argmax(1).tolist()
        assert all(abs(float(t[0][0]) - logits[b].max()) < 1e-4 for b, t in enumerate(top))
        assert top[0][0][2] in ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                                'Bag', 'Ankle boot')
    gcls = infer_grpc(live, px, [grpcclient.InferRequestedOutput('logits', class_count=3)]).as_numpy('logits')
    assert [[s.decode() for s in row] for row in gcls] == [[':'.join(t) for t in row] for row in top]

    def status(fn):
        with pytest.raises(InferenceServerException) as err:
            fn()
        return err.value.status()
    assert status(lambda: c.get_model_metadata('nope', headers=dict(live['auth']))) == '404'
    bad = httpclient.InferInput('image', [1, 3, 28, 28], 'UINT8')
    bad.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.uint8))
    assert status(lambda: c.infer('devit', [bad], headers=dict(live['auth']))) == '400'
    wrong = httpclient.InferInput('pixels', [1, 1, 28, 28], 'UINT8')
    wrong.set_data_from_numpy(live['pixels'][:1])
    assert status(lambda: c.infer('devit', [wrong], headers=dict(live['auth']))) == '400'
    gbad = grpcclient.InferInput('image', [1, 3, 28, 28], 'UINT8')
    gbad.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.uint8))
    assert status(lambda: g.infer('devit', [gbad], headers=grpc_auth(live))) == 'StatusCode.INVALID_ARGUMENT'
    assert status(lambda: g.get_model_metadata('nope', headers=grpc_auth(live))) == 'StatusCode.NOT_FOUND'
    code, answer, _ = get(live['url'], '/v2/models/devit/infer', dict(live['auth'], **{
        'Content-Type': 'application/json'}), 'POST', json.dumps({'inputs': [{'name': 'image', 'datatype': 'INT8',
                                                                             'shape': [1, 1, 28, 28],
                                                                             'data': [0] * 784}]}).encode())
    assert code == 400 and 'UINT8 or FP32' in answer['error']
    code, answer, _ = get(live['url'], '/v2/models/devit/infer', live['auth'], 'POST', json.dumps({'inputs': [{
        'name': 'image', 'datatype': 'UINT8', 'shape': [1, 1, 28, 28], 'data': [0] * 783}]}).encode())
    assert code == 400 and '784 values' in answer['error']


def test_token_on_every_endpoint_but_the_probes(live):
    url = live['url']
    for path in ('/v2', '/v2/models/devit', '/v2/models/devit/ready', '/metrics', '/openapi.json', '/docs'):
        code, answer, h = get(url, path)
        assert code == 401 and 'token' in answer['error'], path
        assert get(url, path, {'Authorization': 'Bearer ' + 'x' * 40})[0] == 401
        assert get(url, path, live['auth'])[0] == 200, path
    for path in ('/predict', '/v2/models/devit/infer'):
        assert get(url, path, method='POST', body=b'{}')[0] == 401
    for path in ('/health', '/v2/health/live', '/v2/health/ready'):
        assert get(url, path)[0] == 200, path
    public = get(url, '/health')[1]
    assert 'pid' not in public['devices'][0] and 'model_path' not in public
    assert get(url, '/health', live['auth'])[1]['devices'][0]['pid'] > 0
    g = grpcclient.InferenceServerClient(live['grpc'])
    assert g.is_server_ready()
    for call in (g.get_server_metadata, lambda: g.is_model_ready('devit')):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == 'StatusCode.UNAUTHENTICATED'
    c = triton_http(live)
    with pytest.raises(InferenceServerException) as err:
        c.get_server_metadata()
    assert err.value.status() == '401'


def metric(text, name, **labels):
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_predict_multipart_topk_methods_and_request_ids(live):
    url = live['url']
    with open(live['pngs'][0], 'rb') as f:
        png = f.read()
    boundary = 'devitboundary'
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f'Content-Type: image/png\r\n\r\n').encode() + png + f'\r\n--{boundary}--\r\n'.encode()
    code, answer, h = get(url, '/predict', dict(live['auth'], **{
        'Content-Type': f'multipart/form-data; boundary={boundary}', 'X-Request-Id': 'abc-1'}), 'POST', form)
    assert code == 200 and h['X-Request-Id'] == 'abc-1'
    assert answer['top'][0]['class'] == _predict(live, live['pngs'][0])['top'][0]['class']
    assert get(url, '/predict', live['auth'], 'POST', png)[2]['X-Request-Id']
    code, answer, _ = get(url, '/predict?topk=0', live['auth'], 'POST', png)
    assert code == 400 and 'topk' in answer['error']
    assert len(get(url, '/predict?topk=2', live['auth'], 'POST', png)[1]['top']) == 2
    code, answer, _ = get(url, '/predict', live['auth'], 'POST', b'GIF89a not an image')
    assert code == 400 and 'not an image' in answer['error']
    for method in ('HEAD', 'OPTIONS', 'PUT'):
        code, answer, h = get(url, '/predict', live['auth'], method)
        assert code == 405 and h['Content-Type'] == 'application/json', method
        if method != 'HEAD':
            assert 'not allowed' in answer['error']
    code, answer, h = get(url, '/nowhere', live['auth'])
    assert code == 404 and 'no such endpoint' in answer['error']


def test_limits_pixels_body_slow_clients_and_inflight(live):
    url, auth = live['url'], live['auth']
    from PIL import Image

    big = io.BytesIO()
    Image.new('L', (12000, 12000)).save(big, 'PNG')
    t0 = time.monotonic()
    code, answer, _ = get(url, '/predict', auth, 'POST', big.getvalue())
    assert code == 413 and 'pixels' in answer['error'] and time.monotonic() - t0 < 2, answer
    host, port = live['http'].split(':')

    def raw(head):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(head)
        return s
    # A body over --max-body-mb: 413 from its Content-Length, before any of it is read (a client that sent it all
    # at once may see the connection closed under its write instead).
    over = raw(f'POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live["token"]}\r\n'
               f'Content-Length: {1024 * 1024 + 1}\r\n\r\n'.encode())
    assert over.recv(65536).startswith(b'HTTP/1.1 413')
    over.close()
    # A Content-Length lie: 408 after --body-timeout-s, the connection closed.
    lie = raw(f'POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live["token"]}\r\n'
              'Content-Length: 1000000\r\n\r\nabc'.encode())
    # 50 slow connections (half a request line each) do not delay a fresh request.
    slow = [raw(b'GET /v2/health/re') for _ in range(50)]
    t0 = time.monotonic()
    assert _predict(live, live['pngs'][1])['devices'] == list(range(N))
    assert time.monotonic() - t0 < 2
    # --max-inflight: requests whose bodies have not arrived are in flight; one more gets 503 and Retry-After.
    held = [raw(f'POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live["token"]}\r\n'
                'Content-Length: 10\r\n\r\n'.encode()) for _ in range(MAX_INFLIGHT)]
    time.sleep(0.5)
    code, answer, h = get(url, '/predict', auth, 'POST', b'x')
    assert code == 503 and h['Retry-After'] == '1' and 'max-inflight' in answer['error']
    reply = b''
    while True:  # the answer, then the end of the connection (a lying client's connection is closed)
        chunk = lie.recv(65536)
        if not chunk:
            break
        reply += chunk
    assert reply.startswith(b'HTTP/1.1 408') and b'body-timeout-s' in reply, reply
    for s in slow + held + [lie]:
        s.close()
    time.sleep(BODY_TIMEOUT_S)
    assert _predict(live, live['pngs'][2])['devices'] == list(range(N))


def test_metrics_move_with_traffic_and_a_device_kill(live):
    before = get(live['url'], '/metrics', live['auth'])[1].decode()
    n0 = metric(before, 'devit_requests_total', endpoint='/predict', code='200') or 0
    for p in live['pngs'][:3]:
        _predict(live, p)
    get(live['url'], '/v2', {'Authorization': 'Bearer ' + 'y' * 30})
    text = get(live['url'], '/metrics', live['auth'])[1].decode()
    assert metric(text, 'devit_requests_total', endpoint='/predict', code='200') == n0 + 3
    assert metric(text, 'devit_unauthorised_requests_total', protocol='http') >= 1
    assert metric(text, 'devit_request_latency_seconds_count', endpoint='/predict') >= 3
    assert metric(text, 'devit_batch_size_count') >= 3
    assert metric(text, 'devit_wire_bytes_total', kind='input') > 0
    assert metric(text, 'devit_device_latency_seconds_count', device='0') >= 3
    assert metric(text, 'devit_dispatcher_joins_total') == N
    assert metric(text, 'devit_device_state', device='1', state='up') == 1
    assert metric(text, 'devit_inflight_requests') == 0 and metric(text, 'devit_queue_depth') == 0
    # a device killed: its state moves to gone, answers go on without it; it joins again (a rejoin counted)
    procs = live['procs']
    os.kill(procs.procs[f'worker{N - 1}'].pid, signal.SIGKILL)
    wait_for('the killed device gone', lambda: (_predict(live, live['pngs'][0]) and metric(
        get(live['url'], '/metrics', live['auth'])[1].decode(), 'devit_device_state', device=str(N - 1),
        state='gone') == 1), procs, timeout=30)
    text = get(live['url'], '/metrics', live['auth'])[1].decode()
    assert metric(text, 'devit_dispatcher_deadline_misses_total') + metric(
        text, 'devit_dispatcher_timeouts_total') >= 0
    procs.start('worker-again', worker_cmd(live['export'], live['port'], N - 1))
    wait_for('the device back', lambda: metric(get(live['url'], '/metrics', live['auth'])[1].decode(),
                                               'devit_device_state', device=str(N - 1), state='up') == 1, procs)
    text = get(live['url'], '/metrics', live['auth'])[1].decode()
    assert metric(text, 'devit_dispatcher_rejoins_total') == 1
    assert _predict(live, live['pngs'][0])['devices'] == list(range(N))


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(live):
    """≥ 1000 generated requests against the service's own /openapi.json: no 5xx but a limit's 503; the service
    answers correctly afterwards."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(live['url'] + '/openapi.json', headers=live['auth'])
    cases, bad = 0, []
    for result in schema.get_all_operations():
        @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=result.ok().as_strategy())
        def one(case):
            nonlocal cases
            cases += 1
            r = case.call(headers=live['auth'], timeout=30)
            if r.status_code >= 500 and not (r.status_code == 503 and 'Retry-After' in r.headers):
                bad.append((case.method, case.formatted_path, r.status_code, r.text[:200]))
        one()
    assert cases >= 1000 and not bad, (cases, bad[:5])
    assert _predict(live, live['pngs'][0])['devices'] == list(range(N))


def test_not_ready_when_every_device_is_gone_then_sigterm(live):
    """Last in the module: every worker killed, the probes answer 503 (gRPC: not ready), an infer 503 with its
    error; SIGTERM then stops the service with exit 0 and its count of requests."""
    procs = live['procs']
    infer_http(live, live['pixels'][:1], True)  # an infer answered (its log line is checked below)
    for name, p in procs.procs.items():
        if name != 'aggregator' and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    wait_for('every device gone', lambda: get(live['url'], '/health')[0] == 503, procs, timeout=30)
    code, answer, _ = get(live['url'], '/health')
    assert answer['ready'] is False and answer['status'] == 'down'
    assert get(live['url'], '/v2/health/ready')[0] == 503
    assert not grpcclient.InferenceServerClient(live['grpc']).is_server_ready()
    assert not triton_http(live).is_server_ready()
    with open(live['pngs'][0], 'rb') as f:
        code, answer, _ = get(live['url'], '/predict', live['auth'], 'POST', f.read())
    assert code == 503 and answer['error']
    code, answer, _ = get(live['url'], '/v2/models/devit/infer', live['auth'], 'POST', json.dumps({'inputs': [{
        'name': 'image', 'datatype': 'UINT8', 'shape': [1, 1, 28, 28], 'data': [0] * 784}]}).encode())
    assert code == 503 and 'cannot answer' in answer['error']
    agg = procs.procs['aggregator']
    agg.send_signal(signal.SIGTERM)
    assert agg.wait(60) == 0, procs.log('aggregator')[-3000:]
    log = procs.log('aggregator')
    assert 'stopped after' in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
    assert any(r['path'] == '/predict' and r['status'] == 503 and r['request_id'] for r in lines)
    assert any(r['path'] == '/v2/models/devit/infer' and r['status'] == 200 and r['devices'] for r in lines)
    assert not any(r['path'] in ('/health', '/v2/health/ready', '/metrics') for r in lines), 'probes are quiet'
