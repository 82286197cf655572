"""The secure fleet (docs/security.md): CURVE keys bound to device indices, strangers refused while the real devices
answer unchanged, bad frames from an authenticated peer dropped without harm, binds closed by default, secret files
that others can read refused. Real worker processes on loopback with a tiny ensemble and real Fashion-MNIST images;
the aggregator is this process's dispatcher."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
import zmq.auth
from collab_fixtures import images, save_ensemble
from helpers import ROOT, env, free_port

from collab import dispatch, keys, wire, worker
from data_transforms import default_mean_std

MEAN, STD = default_mean_std(1)
SETTINGS = {'input_dtype': 'uint8', 'wire_dtype': 'fp32', 'mean': list(MEAN), 'std': list(STD), 'num_classes': 10}
WIDTH = 32  # save_ensemble's students


@pytest.fixture(scope='module')
def fleet_files(tmp_path_factory, fmnist_root):
    root = tmp_path_factory.mktemp('secure')
    ckpt = save_ensemble(root / 'ensemble.pth', 2)
    keys.init(str(root / 'keys'), 2)
    x, _ = images(fmnist_root, 3)
    return {'root': root, 'ckpt': ckpt, 'keys': str(root / 'keys'),
            'x': wire.ImageCodec('uint8', MEAN, STD).encode(x.numpy())}


class Fleet:
    """This process's dispatcher and two real worker processes (torch backend), with or without keys."""

    def __init__(self, files, with_keys=True, **kw):
        self.port, self.lines = free_port(), []
        self.keys, self.ckpt = (files['keys'] if with_keys else None), files['ckpt']
        self.d = dispatch.Dispatcher(2, lambda i: {}, SETTINGS, f'tcp://127.0.0.1:{self.port}', timeout=kw.pop(
            'timeout', 30), log=self.lines.append, keys=self.keys, **kw)
        self.procs = []

    def start_worker(self, index):
        cmd = [sys.executable, '-m', 'collab.worker', '--aggregator', f'tcp://127.0.0.1:{self.port}',
               '--device-index', str(index), '--model-path', self.ckpt, '--threads', '1',
               '--exit-on-loss', *(['--keys', self.keys] if self.keys else [])]
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True))

    def ask(self, x):
        return [self.d.submit(x[k:k + 1], k).wait(30) for k in range(len(x))]

    def close(self):
        self.d.stop_workers()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.d.close()


@pytest.fixture
def fleet(fleet_files):
    made = []

    def make(with_keys=True, workers=(0, 1), **kw):
        f = Fleet(fleet_files, with_keys, **kw)
        made.append(f)
        for i in workers:
            f.start_worker(i)
        return f
    yield make
    for f in made:
        f.close()


def tokens(requests):
    return [{i: r.results[i][0].tobytes() for i in sorted(r.results)} for r in requests]


class Model:
    """A worker's model that computes nothing (the rogues' and the scripted peer's)."""
    backend, source = 'test', 'rogue'

    def __init__(self):
        self.token_width, self.input, self.spec = WIDTH, {'size': 28, 'channels': 1}, {'model': 'm', 'kwargs': {}}

    def run(self, x):
        return np.full((x.shape[0], WIDTH), 7, dtype=np.float32)

    def describe(self):
        return {'backend': self.backend, 'source': self.source, 'model': self.spec, 'token_width': WIDTH,
                'input': self.input}


def rogue(endpoint, index, keys_dir=None, pair=None):
    """A worker (in a thread of this process) with `pair` instead of its own keys: its exit code."""
    w = worker.Worker(Model(), endpoint, index, exit_on_loss=True, startup_timeout=4, keys=keys_dir)
    if pair is not None:
        w.pair = pair
    w.say = lambda text: None
    return w.run()


def test_strangers_are_refused_and_the_devices_answer_byte_identically(fleet, fleet_files, tmp_path):
    x = fleet_files['x']
    plain = fleet(with_keys=False)
    plain.d.wait_ready(120)
    without_keys = tokens(plain.ask(x))
    plain.close()

    f = fleet()
    f.d.wait_ready(120)
    assert tokens(f.ask(x)) == without_keys  # CURVE on and off: the same bytes
    endpoint = f'tcp://127.0.0.1:{f.port}'
    assert rogue(endpoint, 0) == 1  # no keys at all: the handshake fails, nobody answers it
    zmq.auth.create_certificates(str(tmp_path), 'stranger')
    stranger = zmq.auth.load_certificate(str(tmp_path / 'stranger.key_secret'))
    assert rogue(endpoint, 0, f.keys, stranger) == 1  # a key of no device in DIR
    assert rogue(endpoint, 0, f.keys, keys.device_pair(f.keys, 1)) == 2  # device 1's key, claiming device 0
    assert f.d.stats['unauthenticated'] >= 2 and f.d.auth.refused >= 1 and f.d.stats['refused'] == 1
    assert any('holds the key of device 1 but says it is device 0' in line for line in f.lines)
    assert sum('its key is not one of this fleet' in line for line in f.lines) == 1  # once a minute per address
    assert tokens(f.ask(x)) == without_keys
    assert [(h['state'], h['joins']) for h in f.d.health()] == [('up', 1), ('up', 1)]
    assert all('session' not in h for h in f.d.health())


class Scripted:
    """Device 1 played by the test: an authenticated DEALER sending what the test says."""

    def __init__(self, endpoint, keys_dir):
        self.ctx = zmq.Context()
        public, secret = keys.device_pair(keys_dir, 1)
        self.sock = wire.dealer(self.ctx, endpoint, lambda s: keys.client(s, public, secret,
                                                                            keys.aggregator_public(keys_dir)))
        hello = dict(Model().describe(), type='hello', v=wire.PROTOCOL, role='device', index=1, session='scripted',
                     pid=os.getpid(), host='test')
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                self.sock.send_multipart(wire.pack(hello), zmq.NOBLOCK)
            except zmq.Again:
                pass
            if self.sock.poll(500):
                header, _ = wire.unpack(self.sock.recv_multipart())
                assert header['type'] == 'welcome', header
                self.agg = header['agg']
                return
        raise AssertionError('the scripted device was not welcomed')

    def next_run(self):
        while True:  # (cancels of the requests answered without it come too)
            assert self.sock.poll(20000), 'no run request reached the scripted device'
            header, arrays = wire.unpack(self.sock.recv_multipart())
            if header['type'] == 'run':
                return header, arrays
            assert header['type'] in ('cancel', 'refused'), header  # refused: the malformed hello

    def send(self, frames):
        self.sock.send_multipart(frames)

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def bad_frames(rid, agg, batch):
    """What the issue measured crashing, stalling or bloating an aggregator, as device 1's answer to request rid."""
    good = {'type': 'result', 'id': rid, 'agg': agg, 'compute_ms': 1.0}
    tokens_ = np.ones((batch, WIDTH), np.float32)
    return {
        'arrays is a number': [json.dumps(dict(good, arrays=5)).encode(), tokens_.tobytes()],
        'a 2**64-element shape, empty buffer': [json.dumps(dict(good, arrays=[['<f4', [2 ** 32, 2 ** 32]]])).encode(),
                                                b''],
        'a result without its buffer': [json.dumps(good).encode()],
        'the wrong token width': wire.pack(good, [np.ones((batch, WIDTH - 1), np.float32)]),
        'NaN tokens': wire.pack(good, [np.full((batch, WIDTH), np.nan, np.float32)]),
        'fp64 tokens': wire.pack(good, [np.ones((batch, WIDTH), np.float64)]),
        'an id that is a list': wire.pack(dict(good, id=[rid]), [tokens_]),
        'a header that is not JSON': [b'\xff{not json', tokens_.tobytes()],
        'an unknown message type': wire.pack(dict(good, type='surprise'), [tokens_]),
        'a hello whose input is a string': wire.pack({'type': 'hello', 'v': wire.PROTOCOL, 'role': 'device',
                                                      'index': 1, 'session': 'x', 'input': 'big'}),
        'a dtype that is not one': [json.dumps(dict(good, arrays=[['object', [batch, WIDTH]]])).encode(),
                                    tokens_.tobytes()],
    }


def test_bad_frames_from_an_authenticated_device_leave_the_service_answering(fleet, fleet_files):
    """Each bad answer is dropped (counted, logged once a minute), device 1 counts as missing for that request,
    and the next request gets device 1's good answer; the dispatcher never stops. Oversized frames: MAXMSGSIZE."""
    x = fleet_files['x']
    f = fleet(workers=(0,), deadline_ms=1500, max_message=wire.HEADER_BYTES + 8 * WIDTH * 8)
    peer = Scripted(f'tcp://127.0.0.1:{f.port}', f.keys)
    try:
        f.d.wait_ready(120)
        reference = None
        for name in bad_frames(0, '', 1):
            req = f.d.submit(x[:1], 0)
            header, arrays = peer.next_run()
            assert arrays[0].shape == (1, 1, 28, 28) and arrays[0].dtype == np.uint8
            peer.send(bad_frames(header['id'], peer.agg, 1)[name])
            req.wait(30)
            assert 1 not in req.results and 0 in req.results, name
            reference = reference or req.results[0][0].tobytes()
            assert req.results[0][0].tobytes() == reference, name
            good = f.d.submit(x[:1], 0)
            header, _ = peer.next_run()
            peer.send(wire.pack({'type': 'result', 'id': header['id'], 'agg': peer.agg, 'compute_ms': 1.0},
                                [np.full((1, WIDTH), 0.5, np.float32)]))
            good.wait(30)
            assert sorted(good.results) == [0, 1], name
            assert float(good.results[1][0][0, 0]) == 0.5
        assert f.d.thread.is_alive() and not f.d.broken
        assert f.d.stats['malformed'] >= 8
        assert sum('dropped a malformed message from device 1' in line for line in f.lines) == 1
        # A frame over the cap never reaches the dispatcher: libzmq closes that connection (device 1 is gone).
        req = f.d.submit(x[:1], 0)
        header, _ = peer.next_run()
        peer.send(wire.pack({'type': 'result', 'id': header['id'], 'agg': peer.agg},
                            [np.zeros((1, 1 << 20), np.float32)]))
        req.wait(30)
        assert 1 not in req.results and f.d.thread.is_alive()
    finally:
        peer.close()


def test_a_worker_refuses_bad_run_requests_without_dying():
    """The worker's own checks: a run of the wrong dtype, shape or batch gets `failed`, the next good one an answer."""
    ctx = zmq.Context()
    port = free_port()
    sock = wire.router(ctx, f'tcp://127.0.0.1:{port}')
    w = worker.Worker(Model(), f'tcp://127.0.0.1:{port}', 0, exit_on_loss=True)
    w.say = lambda text: None
    codes = []
    thread = threading.Thread(target=lambda: codes.append(w.run()), daemon=True)
    thread.start()
    try:
        assert sock.poll(20000)
        peer, hello = sock.recv_multipart()
        sock.send_multipart([peer] + wire.pack(dict(SETTINGS, type='welcome', agg='A', index=0)))
        runs = [({'batch': 1}, np.zeros((1, 1, 28, 28), np.float32)),  # fp32 where uint8 was agreed
                ({'batch': 1}, np.zeros((1, 1, 27, 28), np.uint8)),
                ({'batch': 2}, np.zeros((1, 1, 28, 28), np.uint8)),
                ({'batch': 10 ** 6}, np.zeros((1, 1, 28, 28), np.uint8)),
                ({'batch': 1}, np.zeros((1, 1, 28, 28), np.uint8))]
        for rid, (extra, a) in enumerate(runs):
            sock.send_multipart([peer] + wire.pack(dict({'type': 'run', 'id': rid, 'agg': 'A', 'index': rid}, **extra),
                                                   [a]))
            assert sock.poll(20000)
            header, arrays = wire.unpack(sock.recv_multipart()[1:])
            assert header['id'] == rid
            assert header['type'] == ('result' if rid == len(runs) - 1 else 'failed'), header
        assert arrays[0].shape == (1, WIDTH)
        sock.send_multipart([peer] + wire.pack({'type': 'stop', 'reason': 'test'}))
        thread.join(10)
        assert codes == [0]
    finally:
        sock.close(0)
        ctx.term()


def test_binding_beyond_loopback_needs_keys_or_insecure(fleet_files):
    cmd = [sys.executable, 'collab_infer.py', '--model-path', fleet_files['ckpt'], '--collab-host', '0.0.0.0',
           '--collab-port', str(free_port()), '--startup-timeout', '1']
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'without keys' in lines[0] and '--insecure' in lines[0], proc.stderr
    proc = subprocess.run(cmd + ['--insecure'], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert 'warning: the aggregator listens on 0.0.0.0 with no authentication' in proc.stderr
    assert 'no worker joined' in proc.stderr  # it did listen, and waited for workers


def test_a_secret_key_others_can_read_is_refused_in_one_line(fleet_files, tmp_path):
    keys.init(str(tmp_path / 'k'), 1)
    os.chmod(tmp_path / 'k' / 'device0.key_secret', 0o644)
    proc = subprocess.run([sys.executable, '-m', 'collab.worker', '--aggregator', 'tcp://127.0.0.1:9',
                           '--device-index', '0', '--model-path', fleet_files['ckpt'], '--keys',
                           str(tmp_path / 'k')], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'readable by others (mode 644): chmod 600' in lines[0], proc.stderr


def test_the_keys_command(tmp_path):
    run = [sys.executable, '-m', 'collab.keys']
    out = subprocess.run(run + ['init', str(tmp_path / 'k'), '--devices', '2'], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert 'device1.key_secret' in out
    for name in ('aggregator', 'device0', 'device1'):
        assert os.stat(tmp_path / 'k' / f'{name}.key_secret').st_mode & 0o777 == 0o600
    again = subprocess.run(run + ['init', str(tmp_path / 'k'), '--devices', '2'], cwd=ROOT, capture_output=True,
                           text=True)
    assert again.returncode == 2 and 'already holds an aggregator key' in again.stderr
    before = keys.device_publics(str(tmp_path / 'k'))
    subprocess.run(run + ['add', str(tmp_path / 'k'), '--device', '1'], cwd=ROOT, check=True, capture_output=True)
    after = keys.device_publics(str(tmp_path / 'k'))
    assert sorted(after.values()) == [0, 1] and set(after) != set(before)
    os.remove(tmp_path / 'k' / 'device1.key')  # revoked
    assert sorted(keys.device_publics(str(tmp_path / 'k')).values()) == [0]
    subprocess.run(run + ['token', str(tmp_path / 'token')], cwd=ROOT, check=True, capture_output=True)
    assert len(keys.read_tokens(str(tmp_path / 'token'))[0]) >= 32
    assert keys.token_ok(keys.read_tokens(str(tmp_path / 'token'))[0], keys.read_tokens(str(tmp_path / 'token')))
    assert not keys.token_ok(b'x' * 43, keys.read_tokens(str(tmp_path / 'token')))


class _RunsCode:
    """A pickled object whose loading would run a command (what a hostile .pth or CIFAR file holds)."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f'touch {self.flag}',))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    import argparse

    import torch

    from models.checkpoint import CheckpointError, checkpoint_info, read_checkpoint

    flag = tmp_path / 'ran'
    torch.save({'model': {'w': torch.zeros(2)}, 'args': argparse.Namespace(lr=1.0), 'x': _RunsCode(flag)},
               tmp_path / 'evil.pth')
    for read in (read_checkpoint, checkpoint_info):
        with pytest.raises(CheckpointError, match=r'evil.pth is refused: reading it would run code \(.*system'):
            read(tmp_path / 'evil.pth')
    assert not flag.exists()
    torch.save({'model': {'w': torch.zeros(2)}, 'args': argparse.Namespace(lr=1.0), 'epoch': 3}, tmp_path / 'ok.pth')
    assert read_checkpoint(tmp_path / 'ok.pth')['args'].lr == 1.0  # the seed's own format still loads


def test_a_cifar_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    import pickle

    from datasets import read_cifar100
    from fileio import DatasetError

    flag = tmp_path / 'ran'
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    for name in ('train', 'test', 'meta'):
        (folder / name).write_bytes(pickle.dumps({b'data': _RunsCode(flag)}))
    with pytest.raises(DatasetError, match=r'cannot read CIFAR pickle .*train: it holds a posix.system'):
        read_cifar100(str(tmp_path), 'train')
    assert not flag.exists()
