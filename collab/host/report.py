"""Statistics of a run: the report JSON, the per-image CSV and the printed table.

Times are per request (a batch of --batch-size images; per image with the default batch of 1), in ms:
latency (end to end on rank 0) = send (image to the workers) + gather (until the last answer arrives: the
workers' compute, the transfers back and any waiting) + head (ensemble head on rank 0). compute is the slowest
worker's own forward time in that request (collab), the sum of the stages' (layer-split), or the whole forward
(monolithic). Bytes are tensor payload bytes on the wire per image: `bytes_per_image` is what the devices return
(tokens; for layer-split the activations between stages plus the logits), `input_bytes_per_image` the image
distribution, `control_bytes_per_image` the messages' JSON headers (ids, timings). `devices` (CSV) lists the devices
whose tokens answered each request.
"""
import csv
import io
import math
from collections.abc import Mapping

import numpy as np

import fileio

RESULT_KINDS = ('tokens', 'activations', 'output')
CSV_FIELDS = ('image', 'label', 'pred', 'correct', 'request', 'latency_ms', 'send_ms', 'compute_ms', 'gather_ms',
              'head_ms', 'worker_ms', 'bytes', 'input_bytes', 'devices')  # worker_ms: each device's forward, by rank


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {'p50': float(np.percentile(a, 50)), 'p95': float(np.percentile(a, 95)), 'mean': float(a.mean()),
            'min': float(a.min()), 'max': float(a.max()), 'std': float(a.std())}


def summarise(requests: list[Mapping], images: list[Mapping], meta: Mapping, seconds: float) -> dict:
    """requests: one dict per request (times under `<part>_ms`, `bytes` by kind, `worker_ms` by rank).
    images: one dict per image (label None in prediction mode). meta: fields copied into the report."""
    n = len(images)
    nbytes: dict[str, int] = {}
    for r in requests:
        for kind, b in r['bytes'].items():
            nbytes[kind] = nbytes.get(kind, 0) + b
    per_image = {k: v / n for k, v in sorted(nbytes.items())}
    worker: dict[int, list[float]] = {}
    for r in requests:
        for rank, ms in r['worker_ms'].items():
            worker.setdefault(rank, []).append(ms)
    worker_mean = {str(k): float(np.mean(v)) for k, v in sorted(worker.items())}
    labelled = [i for i in images if i['label'] is not None]
    latency = stats([r['latency_ms'] for r in requests])
    slowest = max(worker_mean.values()) if worker_mean else math.nan
    report = dict(meta)
    report.update({
        'num_images': n,
        'num_requests': len(requests),
        'accuracy': sum(i['correct'] for i in labelled) / len(labelled) if labelled else None,
        'latency_ms': latency,
        'breakdown_ms': {p: float(np.mean([r[f'{p}_ms'] for r in requests]))
                         for p in ('send', 'compute', 'gather', 'head')},
        'breakdown_p50_ms': {p: float(np.median([r[f'{p}_ms'] for r in requests]))
                             for p in ('send', 'compute', 'gather', 'head')},
        'worker_compute_ms': worker_mean,
        'slowest_worker_compute_ms': slowest,
        'latency_vs_slowest_compute': latency['mean'] / slowest if slowest > 0 else None,
        'bytes_per_image': sum(per_image.get(k, 0) for k in RESULT_KINDS),
        'input_bytes_per_image': per_image.get('input', 0),
        'control_bytes_per_image': per_image.get('control', 0),
        'bytes_by_kind_per_image': per_image,
        'images_per_s': n / seconds if seconds > 0 else None,
    })
    return report


def write_json(path: str, report: Mapping) -> None:
    fileio.write_json_atomic(path, report)


def write_logits(path: str, images: list[Mapping]) -> None:
    """The logits of every image, in image order: an N×K float32 .npy file, written atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.stack([np.asarray(i['logits'], dtype=np.float32) for i in images]))
    fileio.write_bytes_atomic(path, buffer.getvalue())


def write_csv(path: str, images: list[Mapping]) -> None:
    """One row per image (CSV_FIELDS), written atomically."""
    text = io.StringIO(newline='')
    w = csv.DictWriter(text, fieldnames=CSV_FIELDS, extrasaction='ignore')
    w.writeheader()
    w.writerows(images)
    fileio.write_text_atomic(path, text.getvalue())


def _f(v: float | None, digits: int = 2) -> str:
    return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.{digits}f}'


def format_table(r: Mapping) -> str:
    lat, br = r['latency_ms'], r['breakdown_ms']
    rows = [
        ('mode', (f"{r['mode']} ({r.get('model', 'ensemble')}), world size {r['world_size']}, "
                  f"{r['num_devices']} device(s), batch {r['batch_size']}")),
        ('images', f"{r['num_images']} ({_f(r['images_per_s'], 1)} images/s)"),
        ('accuracy', _f(r['accuracy'], 4)),
        ('latency ms', f"p50 {_f(lat['p50'])}  p95 {_f(lat['p95'])}  mean {_f(lat['mean'])}"),
        ('breakdown ms', '  '.join(f'{k} {_f(v)}' for k, v in br.items())),
        ('worker compute ms', '  '.join(f'rank {k}: {_f(v)}' for k, v in r['worker_compute_ms'].items()) or '-'),
        ('latency / slowest', _f(r['latency_vs_slowest_compute'])),
        ('bytes per image', (f"results {r['bytes_per_image']:.0f}  input {r['input_bytes_per_image']:.0f}  "
                             f"control {r['control_bytes_per_image']:.0f}")),
    ]
    if r.get('dropped_ranks'):
        rows.append(('missing', ', '.join(
            f"device {d['device']} from image {d['at_image']}"
            + (f" to {d['back_at_image']}" if 'back_at_image' in d else '') + f" ({d['reason']})"
            for d in r['dropped_ranks'])))
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)
