"""The aggregator's view of its workers: a slot per device (or stage), and whether a worker's hello fits it.

Device-side module: Python 3.6+, standard library only (the dispatcher that uses it needs pyzmq).
"""
import json
import time

HELLO_FIELDS = {'v': int, 'role': str, 'index': int, 'session': str, 'input': dict, 'model': (dict, type(None)),
                'token_width': (int, type(None)), 'activation': (list, type(None))}
HELLO_REQUIRED = ('v', 'role', 'index', 'session')


def _normal(obj):
    """JSON round trip: tuples and lists, int and float keys compare as they would after travelling."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def mismatch(expected, hello):
    """Why a worker's hello does not fit what the aggregator expects of its slot (None when it fits).

    expected: {'input': {size, channels, mean, std}, 'token_width' (devices) or 'activation' (stages),
    'model': {model, kwargs}}; missing keys are not checked.
    """
    src = hello.get('source') or 'its model'
    e, h = expected.get('input') or {}, hello.get('input') or {}
    if e and (h.get('size'), h.get('channels')) != (e.get('size'), e.get('channels')):
        return (f'expects {h.get("channels")}×{h.get("size")}×{h.get("size")} images, the aggregator '
                f'{e.get("channels")}×{e.get("size")}×{e.get("size")}: {src} does not match the aggregator\'s model')
    for key in ('mean', 'std'):
        if e.get(key) is not None and h.get(key) is not None and \
                any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(e[key], h[key])):
            return f'normalises with {key} {h[key]}, the aggregator with {e[key]}'
    if 'token_width' in expected and hello.get('token_width') != expected['token_width']:
        return (f'sends {hello.get("token_width")} floats per image but the ensemble head expects '
                f'{expected["token_width"]} from device {hello.get("index")}: {src} does not match the '
                "aggregator's --model-path")
    if 'activation' in expected and hello.get('activation') != expected['activation']:
        return f'passes activations of {hello.get("activation")}, the aggregator expects {expected["activation"]}'
    em, hm = expected.get('model') or {}, hello.get('model') or {}
    if em.get('model') and hm.get('model') and em['model'] != hm['model']:
        return f'runs {hm["model"]!r} but the head was trained with {em["model"]!r} on device {hello.get("index")}'
    if em.get('kwargs') is not None and hm.get('kwargs') is not None:
        a, b = _normal(em['kwargs']), _normal(hm['kwargs'])
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            return (f'runs {hm.get("model")} with other kwargs than the head was trained with (' + ', '.join(
                f'{k}: {b.get(k)!r} here, {a.get(k)!r} there' for k in keys) + ')')
    return None


class Slot:
    """Device (or stage) i as the aggregator sees it."""

    def __init__(self, index, name):
        self.index, self.name = index, name
        self.state, self.reason, self.since = 'waiting', 'not joined yet', time.time()
        self.peer = self.session = self.fd = None
        self.info = {}
        self.joins = self.answered = self.missed = self.late_replies = 0
        self.last_latency_ms = self.last_compute_ms = None

    def set(self, state, reason=None):
        if state != self.state:
            self.since = time.time()
        self.state, self.reason = state, reason

    def health(self):
        i = self.info
        return {'index': self.index, 'state': self.state, 'reason': self.reason, 'since': self.since,
                'last_latency_ms': self.last_latency_ms, 'last_compute_ms': self.last_compute_ms,
                'model': (i.get('model') or {}).get('model'), 'model_kwargs': (i.get('model') or {}).get('kwargs'),
                'backend': i.get('backend'), 'precision': i.get('precision'), 'source': i.get('source'),
                'host': i.get('host'), 'pid': i.get('pid'), 'cpu_quota': i.get('cpu_quota'), 'joins': self.joins,
                'answered': self.answered, 'missed': self.missed, 'late_replies': self.late_replies}
