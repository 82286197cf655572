"""What every benchmark shares: the verdict of a result against its target, the printed table, how a benchmark
script run alone ends (`finish`), and the transport benchmarks' message sizes and device model (PAYLOADS, NullModel).
A result is {"ratio", "target", "what", "direction"} (see bench/run.py)."""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def verdict(r):
    if r.get('direction') is None or r.get('target') is None:
        return '-'
    ok = r['ratio'] <= r['target'] if r['direction'] == 'max' else r['ratio'] >= r['target']
    return 'pass' if ok else 'FAIL'


def target_text(r):
    if r.get('target') is None:
        return '-'
    return f'{"<=" if r.get("direction") == "max" else ">="} {r["target"]:g}'


def short(text, width):
    return text if len(text) <= width else text[:width - 3] + '...'


def print_table(results):
    print(f'\n{"benchmark":<32} {"ratio":>9} {"target":>9}  {"":4}  what')
    for key, r in results.items():
        print(f'{key:<32} {r["ratio"]:>9.3f} {target_text(r):>9}  {verdict(r):<4}  {short(r["what"], 100)}')


def finish(results, json_path=None):
    """How a benchmark script run alone ends: its table, and its results written to `json_path` (atomically)."""
    print_table(results)
    if json_path:
        sys.path.insert(0, ROOT)
        import fileio  # the repository's (a benchmark script runs with bench/ first on its path)

        fileio.write_json_atomic(json_path, results)
    return results


# The transport benchmarks (transport_bench.py, wire_bench.py): message sizes and a device that computes nothing

PAYLOADS = {'demo': ((1, 1, 28, 28), 128), 'paper': ((1, 3, 224, 224), 384)}  # image shape, token floats


class NullModel:
    """A device model that computes nothing: the transport alone."""
    backend, source = 'none', 'none'

    def __init__(self, width, image_shape):
        self.token_width = width
        self.input = {'size': image_shape[-1], 'channels': image_shape[1], 'mean': [0.5], 'std': [0.5]}
        self.spec = {'model': 'none', 'kwargs': {}}

    def run(self, x):
        return np.zeros((x.shape[0], self.token_width), dtype=np.float32)

    def describe(self):
        return {'backend': 'none', 'source': 'none', 'model': self.spec, 'token_width': self.token_width,
                'input': self.input}
