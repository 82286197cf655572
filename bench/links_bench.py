"""Simulated links: DeViT's collaborative inference vs a layer-split pipeline when the network is the bottleneck.

    sudo python bench/links_bench.py [--quick] [--json bench/links.json]

Each link profile gets a network namespace of its own (`ip netns add`) whose loopback is shaped by a token-bucket
filter (`tc qdisc ... tbf rate R`); the aggregator and the N=4 workers of `collab_infer.py` run inside it, so every
message between them crosses that link. All processes share the one shaped loopback, as devices share a Wi-Fi
channel; for batch-1 latency this is also what a switch gives, since a request's messages leave the aggregator's one
port (the image to each device) or follow each other (the pipeline's hops).

Paper scale, random weights (only bytes and time matter): four `dedeit` students at 224x224 vs
`deit_base_distilled_patch16_224` cut into 4 consecutive stages (`--mode layer-split`), uint8 input for both. Per
profile: p50 latency of each and their ratio, bytes per image. Needs root and the `tbf` qdisc (without them it
says why and exits 0). Only rates are shaped: propagation delay would need `netem`, which this machine's kernel
lacks; a delay adds the same per message to both designs, DeViT's two per request and the pipeline's N+1.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fileio  # noqa: E402
from bench.collab_bench import N, Runner, collab_argv, scales, teacher_argv, write_ensemble  # noqa: E402

# (name, rate for tc): no shaping, the paper's 1 Gbit/s switch, Wi-Fi-like links.
PROFILES = [('loopback (no shaping)', None), ('1 Gbit/s (the paper\'s switch)', '1gbit'), ('100 Mbit/s', '100mbit'),
            ('20 Mbit/s (Wi-Fi-like)', '20mbit')]
RATE_BITS = {'gbit': 1e9, 'mbit': 1e6, 'kbit': 1e3}


def rate_bits(rate):
    for unit, scale in RATE_BITS.items():
        if rate.endswith(unit):
            return float(rate[:-len(unit)]) * scale
    raise ValueError(f'unknown rate {rate}')


def sh(*cmd):
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f'{" ".join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}')
    return proc.stdout


class Namespace:
    """A network namespace with its loopback up and, given a `rate`, shaped to it (tbf)."""

    def __init__(self, name, rate=None):
        self.name, self.rate = name, rate

    def __enter__(self):
        subprocess.run(['ip', 'netns', 'del', self.name], capture_output=True)  # a leftover of a killed run
        sh('ip', 'netns', 'add', self.name)
        try:
            # Ethernet's MTU rather than loopback's 64 KiB: the frames a real link carries, and no frame larger
            # than the token bucket (tbf drops those, and TCP then retransmits forever).
            sh('ip', '-n', self.name, 'link', 'set', 'lo', 'mtu', '1500', 'up')
            if self.rate is not None:
                # The bucket holds at least 4 ms of traffic at the rate (the kernel's timer granularity).
                burst = max(int(rate_bits(self.rate) / 8 * 0.004), 32 * 1024)
                sh('tc', '-n', self.name, 'qdisc', 'add', 'dev', 'lo', 'root', 'tbf', 'rate', self.rate,
                   'burst', str(burst), 'latency', '1s')
        except Exception:
            self.__exit__()
            raise
        return ['ip', 'netns', 'exec', self.name]

    def __exit__(self, *exc):
        subprocess.run(['ip', 'netns', 'del', self.name], capture_output=True)


def check_tools():
    """None when namespaces and tbf work here, else the reason why not."""
    if shutil.which('ip') is None or shutil.which('tc') is None:
        return 'the ip and tc commands (iproute2) are not installed'
    if os.geteuid() != 0:
        return 'network namespaces and tc need root'
    try:
        with Namespace(f'devit-check-{os.getpid()}', rate='1gbit'):
            pass
    except RuntimeError as err:
        return f'cannot shape a namespace\'s loopback here: {err}'
    return None


def bench(quick, workdir, verbose=True):
    paper = scales()['paper']
    ckpt = write_ensemble(os.path.join(workdir, 'paper-n4.pth'), [paper.student] * N, paper.teacher,
                          paper.num_classes)
    images = {'collab': 4 if quick else 20, 'split': 2 if quick else 5}
    profiles = PROFILES[::3] if quick else PROFILES
    rows = []
    for i, (name, rate) in enumerate(profiles):
        if verbose:
            print(f'{name}:', flush=True)
        with Namespace(f'devit-link-{os.getpid()}-{i}', rate) as prefix:
            run = Runner(workdir, verbose, prefix=prefix)
            collab = run(N + 1, collab_argv(ckpt, images['collab']), 1, f'link{i}-collab')
            split = run(N + 1, teacher_argv(paper, 'layer-split', images['split'], input_dtype='uint8', warmup=1),
                        1, f'link{i}-layer-split')
        rows.append({'link': name, 'rate': rate,
                     'collab_p50_ms': collab['latency_ms']['p50'], 'layer_split_p50_ms': split['latency_ms']['p50'],
                     'ratio': split['latency_ms']['p50'] / collab['latency_ms']['p50'],
                     'collab_bytes': collab['bytes_per_image'] + collab['input_bytes_per_image'],
                     'layer_split_bytes': split['bytes_per_image'] + split['input_bytes_per_image']})
    return {'rows': rows, 'images': images,
            'what': f'paper scale, N={N} dedeit students at 224x224 vs {paper.teacher.name} in {N} stages, uint8 '
                    'input, random weights, 1 thread per process; all processes in one network namespace whose '
                    'loopback is shaped by tc tbf'}


def table(result):
    lines = ['| link | DeViT p50 ms | layer-split p50 ms | layer-split / DeViT | bytes per image: DeViT / '
             'layer-split |', '|---|---:|---:|---:|---|']
    for r in result['rows']:
        lines.append(f'| {r["link"]} | {r["collab_p50_ms"]:.1f} | {r["layer_split_p50_ms"]:.1f} | {r["ratio"]:.2f} | '
                     f'{r["collab_bytes"]:,.0f} / {r["layer_split_bytes"]:,.0f} |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='two profiles, a few images (a smoke run)')
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    reason = check_tools()
    if reason:
        print(f'links benchmark skipped: {reason}')
        return None
    workdir = tempfile.mkdtemp(prefix='devit-links-')
    try:
        result = bench(args.quick, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(result))
    if args.json:
        fileio.write_json_atomic(args.json, result)
    return result


if __name__ == '__main__':
    main()
