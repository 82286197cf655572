"""The service's Prometheus metrics (GET /metrics), in a registry of its own.

Counted as requests go: requests by endpoint and status code, request latency, batch sizes, in-flight requests,
unauthorised requests (401), bytes on the wire by kind, per-device latency. Read from the dispatcher at each scrape:
each device's state, the joins, rejoins, refused and unauthenticated peers, malformed messages, deadline misses,
timeouts, and the images waiting for a device.
"""
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

STATES = ('up', 'late', 'gone', 'waiting')
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
DISPATCHER_COUNTS = (('joins', 'devices that joined'), ('rejoins', 'devices that joined again'),
                     ('refused', 'hellos refused (a model that does not fit, a duplicate device)'),
                     ('malformed', 'messages dropped: unreadable, or not what the sender declared at join'),
                     ('deadline_misses', 'device answers that missed --deadline-ms'),
                     ('timeouts', 'device answers that missed --timeout'))


class Metrics:
    def __init__(self, service):
        self.service = service
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter('devit_requests', 'requests answered, by endpoint and status code',
                                ['endpoint', 'code'], registry=r)
        self.latency = Histogram('devit_request_latency_seconds', 'time from request to answer, by endpoint',
                                 ['endpoint'], buckets=LATENCY_BUCKETS, registry=r)
        self.device_latency = Histogram('devit_device_latency_seconds', 'a device\'s compute time for one batch',
                                        ['device'], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram('devit_batch_size', 'images in one dispatcher request',
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.inflight = Gauge('devit_inflight_requests', 'requests being answered now', registry=r)
        self.unauthorised = Counter('devit_unauthorised_requests', 'requests refused for a missing or wrong token',
                                    ['protocol'], registry=r)
        self.wire = Counter('devit_wire_bytes', 'bytes exchanged with the devices, by kind', ['kind'], registry=r)
        self._seen = set()
        self._lock = threading.Lock()
        r.register(_DispatcherCollector(service))

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_reply(self, reply, batch: int) -> None:
        """One dispatcher reply (counted once, however many requests shared its batch)."""
        with self._lock:
            if id(reply) in self._seen:
                return
            self._seen.add(id(reply))
            if len(self._seen) > 1024:
                self._seen.clear()
        self.batch.observe(batch)
        for kind, n in reply.nbytes.items():
            self.wire.labels(kind).inc(n)
        for rank, ms in reply.worker_ms.items():
            self.device_latency.labels(str(rank - 1)).observe(ms / 1e3)

    def text(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _DispatcherCollector:
    """The dispatcher's own counts and states, read at scrape time."""

    def __init__(self, service):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        d = self.service.dispatcher
        stats = dict(d.stats)
        for key, what in DISPATCHER_COUNTS:
            c = CounterMetricFamily(f'devit_dispatcher_{key}', what)
            c.add_metric([], stats.get(key, 0))
            yield c
        c = CounterMetricFamily('devit_dispatcher_unauthenticated_peers',
                                'connections that failed the CURVE handshake (no key, or one not of this fleet)')
        c.add_metric([], stats.get('unauthenticated', 0))
        yield c
        late = CounterMetricFamily('devit_late_replies_discarded', 'device replies that came after their answer')
        late.add_metric([], d.late_discarded)
        yield late
        state = GaugeMetricFamily('devit_device_state', '1 for the state each device is in', labels=['device', 'state'])
        for dev in d.health():
            for s in STATES:
                state.add_metric([str(dev['index']), s], 1.0 if dev['state'] == s else 0.0)
        yield state
        queued = GaugeMetricFamily('devit_queue_depth', 'requests waiting for a batch lane')
        queued.add_metric([], len(self.service.batcher.waiting))
        yield queued
