"""The dispatcher's policies with workers in threads of this process (real ZeroMQ sockets on loopback, models that
compute nothing): ids and late replies, deadlines and cancels, strict and dropout-tolerant answers, refusals,
replacement. The same code with real processes: tests/test_collab.py and tests/test_service.py."""
import asyncio
import threading
import time

import numpy as np
import pytest
from helpers import free_port

from collab import dispatch, wire, worker

WIDTH = 8
INPUT = {'size': 4, 'channels': 1, 'mean': [0.5], 'std': [0.25]}
SETTINGS = {'input_dtype': 'fp32', 'wire_dtype': 'fp32', 'mean': [0.5], 'std': [0.25], 'num_classes': 3}


class Model:
    """A device that answers its index (so the test can tell who answered), optionally after `delay` seconds."""
    backend, source = 'test', 'test-model'

    def __init__(self, index, width=WIDTH, delay=0.0):
        self.index, self.token_width, self.delay = index, width, delay
        self.input, self.spec = dict(INPUT), {'model': 'm', 'kwargs': {}}
        self.calls = 0

    def run(self, x):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return np.full((x.shape[0], self.token_width), self.index, dtype=np.float32)

    def describe(self):
        return {'backend': self.backend, 'source': self.source, 'model': self.spec, 'token_width': self.token_width,
                'input': self.input}


class Fleet:
    """A dispatcher and worker threads; everything stopped at the end. attached: the dispatcher's socket handed to
    an asyncio loop running in a thread of its own (as the HTTP service has it), this test's calls reaching it from
    another thread."""

    def __init__(self, n, attached=False, **kw):
        self.port = free_port()
        self.lines = []
        self.d = dispatch.Dispatcher(n, lambda i: {'input': INPUT, 'token_width': WIDTH, 'model': {'model': 'm'}},
                                     SETTINGS, f'tcp://127.0.0.1:{self.port}', log=self.lines.append, **kw)
        self.threads, self.codes = [], []
        self.loop = None
        if attached:
            self.loop = asyncio.new_event_loop()
            self.loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self.loop_thread.start()
            self.on_loop(self.d.attach, self.loop)

    def on_loop(self, fn, *args):
        async def call():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def add(self, model, index=None):
        w = worker.Worker(model, f'tcp://127.0.0.1:{self.port}', model.index if index is None else index,
                          exit_on_loss=True)
        w.say = lambda text: None
        t = threading.Thread(target=lambda: self.codes.append(w.run()), daemon=True)
        t.start()
        self.threads.append(t)
        return w

    def up(self, *models):
        """Start a worker for each model and wait until all are up; returns the models."""
        for m in models:
            self.add(m)
        self.d.wait_ready(30)
        return models

    def until(self, condition, timeout=10):
        """Wait for `condition()`, the dispatcher's news read meanwhile (health() turns a caller-driven loop)."""
        deadline = time.time() + timeout
        while not condition() and time.time() < deadline:
            self.d.health()
            time.sleep(0.05)
        assert condition()

    def ask(self, k=0):
        return self.d.submit(np.zeros((1, 1, 4, 4), dtype=np.float32), k).wait(30)

    def close(self):
        if self.loop is not None and self.loop.is_running():
            self.on_loop(self.d.detach)  # (the workers' goodbyes go to the I/O thread again)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.loop_thread.join(10)
        self.d.stop_workers()
        for t in self.threads:
            t.join(10)
        self.d.close()


@pytest.fixture(params=['threaded', 'caller-driven', 'attached'])
def fleet(request):
    """Each policy three times: on the dispatcher's own I/O thread (the gRPC service), caller-driven (the batch run)
    and attached to an asyncio loop (the HTTP service)."""
    made = []

    def make(n, **kw):
        made.append(Fleet(n, threaded=request.param != 'caller-driven', attached=request.param == 'attached', **kw))
        return made[-1]
    yield make
    for f in made:
        f.close()


def test_answers_come_from_every_device_with_bytes_counted(fleet):
    f = fleet(3)
    f.up(*(Model(i) for i in range(3)))
    req = f.ask()
    assert sorted(req.results) == [0, 1, 2] and not req.missing
    assert [int(req.results[i][0][0, 0]) for i in range(3)] == [0, 1, 2]
    assert req.nbytes['tokens'] == 3 * WIDTH * 4 and req.nbytes['input'] == 3 * 16 * 4
    assert [h['state'] for h in f.d.health()] == ['up'] * 3
    f.close()
    assert f.codes == [0, 0, 0]  # told to stop, they leave cleanly


def test_deadline_answers_without_the_slow_device_cancels_and_discards_its_late_reply(fleet):
    f = fleet(2, deadline_ms=200)
    _, slow = f.up(Model(0), Model(1, delay=0.6))
    t0 = time.perf_counter()
    req = f.ask(1)
    assert time.perf_counter() - t0 < 0.55  # at the deadline, not when the slow device answers
    assert sorted(req.results) == [0] and req.missing == {1: 'missed the 200 ms deadline'}
    assert f.d.health()[1]['state'] == 'late'
    for k in range(2, 5):  # queued at the slow worker, cancelled as each deadline passes
        assert sorted(f.ask(k).results) == [0]
    f.until(lambda: f.d.health()[1]['late_replies'] >= 1 and f.d.health()[1]['state'] == 'up')
    h = f.d.health()[1]
    assert h['late_replies'] >= 1 and h['state'] == 'up'  # its late answer was dropped by id; it is back
    assert slow.calls < 5, 'cancelled requests were skipped'
    slow.delay = 0
    assert sorted(f.ask(9).results) == [0, 1]


def test_strict_and_dropout_tolerant_timeouts(fleet):
    f = fleet(2, timeout=0.3)
    _, stalled = f.up(Model(0), Model(1, delay=1.0))
    with pytest.raises(dispatch.CollabError, match=r'device 1 did not answer within 0.3 s \(stalled\?\)'):
        f.ask()
    g = fleet(2, timeout=0.3, dropout_tolerant=True)
    g.add(Model(0))
    g.add(Model(1, delay=1.0))
    g.d.wait_ready(30)
    req = g.ask()
    assert sorted(req.results) == [0] and 'did not answer' in req.missing[1]
    # Without a deadline a late device gets nothing until its late reply shows it is back.
    assert sorted(g.ask().results) == [0] and g.ask().missing[1].startswith('late')
    g.until(lambda: g.d.health()[1]['state'] == 'up')


def test_refused_hellos_and_a_replaced_worker(fleet):
    f = fleet(2)
    f.add(Model(0))
    f.add(Model(1, width=WIDTH + 1))
    with pytest.raises(dispatch.CollabError, match=r'device 1 was refused: sends 9 floats per image but the '
                                                   r'ensemble head expects 8 from device 1: test-model'):
        f.d.wait_ready(30)
    f.threads[1].join(10)
    assert f.codes == [2]  # the refused worker exits 2
    ghost = f.add(Model(5), index=5)
    f.until(lambda: len(f.d.refusals) >= 2)
    assert 'there is no device 5' in f.d.refusals[1][2]
    first = f.add(Model(1))
    f.d.wait_ready(30, strict=False)  # the refusals above do not stop this one
    assert f.d.slots[1].session == first.session
    second = f.add(Model(1))  # a board that rebooted before its old connection timed out
    f.until(lambda: f.d.slots[1].session == second.session)
    assert f.d.slots[1].session == second.session and f.d.health()[1]['joins'] == 2
    assert any('replaces' in line for line in f.lines)
    assert sorted(f.ask().results) == [0, 1]
    del ghost


def test_protocol_mismatch_is_refused(fleet):
    import zmq

    f = fleet(1)
    ctx = zmq.Context()
    sock = wire.dealer(ctx, f'tcp://127.0.0.1:{f.port}')
    try:
        time.sleep(0.3)
        sock.send_multipart(wire.pack({'type': 'hello', 'v': 99, 'role': 'device', 'index': 0}))
        f.until(lambda: sock.poll(50))
        header, _ = wire.unpack(sock.recv_multipart())
        assert header['type'] == 'refused' and 'protocol 99' in header['reason']
    finally:
        sock.close(0)
        ctx.term()


def test_coroutines_on_the_attached_loop_turn_the_dispatcher_themselves():
    """Attached to an asyncio loop: a coroutine's request is sent from the loop's own thread and answered by its
    reader callbacks (no I/O thread exists meanwhile); a deadline comes from the loop's timer; requests from another
    thread go through the loop; after detach an I/O thread serves again."""
    from collab.host.modes import LoopEvent

    f = Fleet(2, attached=True, deadline_ms=300)
    try:
        f.up(Model(0), Model(1))
        assert f.d.thread is None

        async def ask(k):
            done = LoopEvent()
            req = f.d.submit(np.zeros((1, 1, 4, 4), dtype=np.float32), k, done)
            assert await done.wait_async(10)
            return req

        async def many():
            return await asyncio.gather(*(ask(k) for k in range(8)))
        reqs = asyncio.run_coroutine_threadsafe(many(), f.loop).result(30)
        assert all(sorted(r.results) == [0, 1] and not r.missing for r in reqs)
        assert sorted(f.ask(9).results) == [0, 1]  # from this thread, through the loop
        f.add(Model(1, delay=0.8))  # replaces device 1 with a slow worker
        f.until(lambda: f.d.slots[1].joins == 2)
        t0 = time.perf_counter()
        slow = asyncio.run_coroutine_threadsafe(ask(10), f.loop).result(30)
        assert slow.missing == {1: 'missed the 300 ms deadline'} and time.perf_counter() - t0 < 0.75
        f.on_loop(f.d.detach)
        assert f.d.thread is not None and f.d.thread.is_alive()
        assert sorted(f.ask(11).results) == [0]  # (device 1 is late until its late reply comes)
    finally:
        f.close()
