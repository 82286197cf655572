"""The service under faults and load: the fault drill, and throughput with concurrent clients.

    python bench/serve_bench.py [--quick] [--model-path STAGE3_CKPT] [--json bench/serve.json]

Real processes on loopback: `collab_infer.py --serve --deadline-ms D` and four standalone workers (`python -m
collab.worker`, the command a board runs), on real Fashion-MNIST test images sent as PNG files over HTTP.

- serve_fault_drill: a client sends 400 requests at a fixed rate (one thread per request, so a slow answer does not
  delay the schedule); worker 2 is SIGKILLed after request 100 and the same command is started again after request
  200. Every request must be answered exactly once; between the kill and the rejoin the answers use 3 devices,
  after the rejoin all 4. Reported per phase: requests, devices used, p50/p99 latency, accuracy; and the rejoin
  time (restart -> the worker is up, and -> the first answer with 4 devices). ratio = requests answered exactly
  once / requests sent (target 1).
- serve_rejoin_s: seconds from starting the killed worker's command again to its joining (target <= 10).
- serve_throughput: requests per second with 4 concurrent clients / with 1 client, at the demo's scale, each client
  on a kept-alive connection (target >= 1.5: compute is small, so images sent together pay).

Workers and head run the onnxruntime backend by default, as a board would (a board's worker also starts in a second
or two, where a PyTorch one spends seconds importing torch): the checkpoint is exported with export_onnx.py.
`--backend torch` serves the checkpoint itself.

The model: `--model-path` (a stage-3 checkpoint trained with `ensemble.py --device-dropout 0.2`, so that answers
without a device stay accurate); by default the demo's students with the head bench/dropout_bench.py trained with
device dropout 0.2 (output/demo/dropout/p0.2/checkpoint.pth), where it exists; else a demo-shaped ensemble
(demo.sh's students) trained here for a few hundred steps with device dropout 0.2 on the Fashion-MNIST training set,
from scratch (its accuracy is below the demo's: the drill measures what losing a device costs, not the model). This
machine is shared: absolute latencies say little, the phases compare with each other.
"""
import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from collab import client  # noqa: E402

DATA = '/usr/share/datasets/fashion-mnist'
# The demo's students with a head trained with --device-dropout 0.2 (bench/dropout_bench.py), when it exists.
DEMO_DROPOUT_HEAD = os.path.join(ROOT, 'output', 'demo', 'dropout', 'p0.2', 'checkpoint.pth')
N = 4
KILLED = 2


def train_dropout_ensemble(path, data, steps, seed=0):
    """demo.sh's students (4 of them) and the ensemble head trained together with device dropout 0.2."""
    import torch

    import utils
    from bench.collab_bench import demo_shapes
    from datasets import build_dataset
    from models.ensemble_model import DeViTEnsemble, create_backbone

    student, teacher = demo_shapes()
    torch.manual_seed(seed)
    ens = DeViTEnsemble([create_backbone(student.name, student.kwargs) for _ in range(N)], num_classes=10,
                        embed_dim=teacher.kwargs.get('embed_dim', 128), device_dropout=0.2)
    ds = build_dataset('fashion_mnist', data, 'train', input_size=28, in_chans=1, tiny=True)
    batch = 128
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(min(steps * batch, len(ds)))),
                                         batch_size=batch, shuffle=True)
    opt = torch.optim.AdamW(ens.parameters(), lr=2e-3, weight_decay=0.05)
    ens.train()
    done = 0
    while done < steps:
        for x, y in loader:
            out = ens(x)
            loss = sum(torch.nn.functional.cross_entropy(o, y) for o in (out.logits, out.logits_dist) if o is not None)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    ens.eval()
    utils.save_checkpoint({'model': ens.state_dict(), 'model_ema': None, 'ensemble_config': ens.config,
                           'args': {'dataset': 'fashion_mnist', 'tiny_transforms': True, 'data_path': data},
                           'epoch': 0, 'best_acc1': 0.0}, path)
    return path


class Service:
    """The aggregator and N standalone workers, each in a session of its own, output to files in `folder`."""

    def __init__(self, folder, model_path, deadline_ms, threads=1, backend='torch', max_batch=8):
        from tests.helpers import env, free_port

        self.folder, self.model_path, self.env = folder, model_path, dict(env(), OMP_NUM_THREADS=str(threads))
        self.http, self.port = free_port(), free_port()
        self.url = f'http://127.0.0.1:{self.http}'
        self.procs = {}
        self.backend = backend
        self.start('aggregator', [sys.executable, os.path.join(ROOT, 'collab_infer.py'), '--serve', '--port',
                                  str(self.http), '--host', '127.0.0.1', '--collab-port', str(self.port),
                                  '--model-path', model_path, '--backend', backend, '--deadline-ms',
                                  str(deadline_ms), '--threads', str(threads), '--dataset', 'fashion_mnist',
                                  '--tiny-transforms', '--max-batch', str(max_batch)])
        for i in range(N):
            self.start_worker(i)

    def worker_cmd(self, i):
        return [sys.executable, '-m', 'collab.worker', '--aggregator', f'tcp://127.0.0.1:{self.port}',
                '--device-index', str(i), '--model-path', self.model_path, '--backend', self.backend, '--threads', '1']

    def start(self, name, cmd):
        log = open(os.path.join(self.folder, f'{name}.log'), 'a')
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start_worker(self, i):
        self.start(f'worker{i}', self.worker_cmd(i))

    def states(self):
        try:
            return [d['state'] for d in client.health(self.url)['devices']]
        except client.ServiceError:
            return None

    def wait(self, check, what, timeout=300):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if check():
                return time.monotonic()
            time.sleep(0.02)
        raise RuntimeError(f'{what} not within {timeout} s; logs in {self.folder}')

    def stop(self):
        agg = self.procs.get('aggregator')
        if agg and agg.poll() is None:
            agg.send_signal(signal.SIGTERM)
            try:
                agg.wait(30)
            except subprocess.TimeoutExpired:
                pass
        from tests.helpers import kill_group

        for p in self.procs.values():
            if p.poll() is None:
                kill_group(p)


def png(pixels):
    """H×W (grey) or H×W×3 uint8 pixels -> the bytes of a PNG file."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format='PNG')
    return buf.getvalue()


def test_images(data, k):
    """k real test images as PNG bytes, and their labels."""
    from datasets import read_samples

    samples = read_samples('fashion_mnist', data, 'val')
    return [png(samples.images[i, 0].numpy()) for i in range(k)], [int(t) for t in samples.targets[:k]]


def _stats(rows, labels):
    lat = [r['ms'] for r in rows]
    devices = sorted({tuple(r['devices']) for r in rows})
    return {'requests': len(rows), 'devices_used': [list(d) for d in devices],
            'p50_ms': statistics.median(lat) if lat else None,
            'p99_ms': float(np.percentile(lat, 99)) if lat else None,
            'accuracy': sum(r['pred'] == labels[r['i']] for r in rows) / len(rows) if rows else None}


def drill(folder, model_path, data, requests=400, rate=20.0, kill_after=100, restart_after=200, deadline_ms=1000,
          backend='onnxruntime', verbose=True):
    bodies, labels = test_images(data, requests)
    svc = Service(folder, model_path, deadline_ms, backend=backend)
    try:
        svc.wait(lambda: svc.states() == ['up'] * N, 'the four workers up')
        for k in range(10):  # warm-up, unmeasured
            client.predict(svc.url, bodies[k])
        rows, lost, threads = [None] * requests, [], []
        events = {}
        t0 = time.monotonic()

        def one(i):
            sent = time.monotonic()
            try:
                answer = client.predict(svc.url, bodies[i])  # a connection of its own, as an open-loop sender
            except client.ServiceError as err:
                lost.append((i, str(err)))
                return
            rows[i] = {'i': i, 'sent': sent - t0, 'ms': (time.monotonic() - sent) * 1e3, 'id': answer['request'],
                       'devices': answer['devices'], 'pred': answer['top'][0]['class']}
        for i in range(requests):
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            if i == kill_after:
                os.kill(svc.procs[f'worker{KILLED}'].pid, signal.SIGKILL)
                events['killed'] = time.monotonic() - t0
            if i == restart_after:
                svc.start_worker(KILLED)
                events['restarted'] = time.monotonic() - t0

                def watch():
                    svc.wait(lambda: (svc.states() or [''] * N)[KILLED] == 'up', 'the restarted worker up', 60)
                    events['rejoined'] = time.monotonic() - t0
                threads.append(threading.Thread(target=watch, daemon=True))
                threads[-1].start()
            t = threading.Thread(target=one, args=(i,), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(120)
    finally:
        svc.stop()
    answered = [r for r in rows if r is not None]
    ids = [r['id'] for r in answered]
    first4 = next((r for r in sorted(answered, key=lambda r: r['sent'])
                   if r['sent'] > events['restarted'] and len(r['devices']) == N), None)
    rejoined = events.get('rejoined')
    phases = {
        'before kill (4 devices)': [r for r in answered if r['i'] < kill_after],
        'killed, before restart': [r for r in answered if kill_after <= r['i'] < restart_after],
        'restarted, rejoining': [r for r in answered if r['i'] >= restart_after and
                                 (rejoined is None or r['sent'] < rejoined)],
        'after rejoin': [r for r in answered if rejoined is not None and r['sent'] >= rejoined],
    }
    table = {name: _stats(rows_, labels) for name, rows_ in phases.items()}
    down = [r for r in answered if events['killed'] + 0.0 <= r['sent'] and (rejoined is None or r['sent'] < rejoined)
            and r['i'] >= kill_after]
    result = {
        'requests': requests, 'rate_per_s': rate, 'deadline_ms': deadline_ms, 'answered': len(answered),
        'answered_once': len(set(ids)) == len(ids) == requests, 'lost': lost, 'events_s': events,
        'rejoin_s': None if rejoined is None else rejoined - events['restarted'],
        'first_answer_with_4_after_restart_s': None if first4 is None else first4['sent'] - events['restarted'],
        'down_answers_use_3_devices': all(len(r['devices']) == N - 1 and KILLED not in r['devices']
                                          for r in down if r['sent'] > events['killed'] + 0.001),
        'after_rejoin_answers_use_4_devices': all(len(r['devices']) == N for r in phases['after rejoin']),
        'phases': table,
    }
    if verbose:
        print(drill_table(result), flush=True)
    return result


def drill_table(r):
    lines = ['| phase | requests | devices used | p50 ms | p99 ms | accuracy |', '|---|---:|---|---:|---:|---:|']
    for name, s in r['phases'].items():
        lines.append(f'| {name} | {s["requests"]} | {" / ".join(",".join(map(str, d)) for d in s["devices_used"])} | '
                     + ' | '.join('-' if s[k] is None else f'{s[k]:.{2 if k == "accuracy" else 1}f}'.rstrip()
                                  for k in ('p50_ms', 'p99_ms')) + ' | '
                     + ('-' if s['accuracy'] is None else f'{s["accuracy"]:.3f}') + ' |')
    rj = r['rejoin_s']
    lines.append(f'\n{r["answered"]}/{r["requests"]} answered (exactly once: {r["answered_once"]}), rejoin '
                 f'{"-" if rj is None else f"{rj:.1f}"} s after the restart, first 4-device answer '
                 f'{r["first_answer_with_4_after_restart_s"] or float("nan"):.1f} s after it')
    return '\n'.join(lines)


def throughput(folder, model_path, data, clients=(1, 4), seconds=8.0, deadline_ms=1000, rounds=2,
               backend='onnxruntime', verbose=True):
    """Requests per second with each number of closed-loop clients, on the service as it starts by default
    (--max-batch 8) and, with the most clients, on one that sends every image alone (--max-batch 1); all runs
    alternated over `rounds`, both services up throughout."""
    bodies, _ = test_images(data, 64)
    services = {}
    try:
        for name, max_batch in (('batched', 8), ('unbatched', 1)):
            os.makedirs(os.path.join(folder, name), exist_ok=True)
            services[name] = Service(os.path.join(folder, name), model_path, deadline_ms, backend=backend,
                                     max_batch=max_batch)
        for svc in services.values():
            svc.wait(lambda svc=svc: svc.states() == ['up'] * N, 'the four workers up')
            for k in range(10):
                client.predict(svc.url, bodies[k])
        runs = [('batched', c) for c in clients] + [('unbatched', max(clients))]
        rates = {run: [] for run in runs}
        for _ in range(rounds):
            for name, c in runs:
                rates[(name, c)].append(closed_loop(services[name].url, bodies, c, seconds))
    finally:
        for svc in services.values():
            svc.stop()
    med = {c: statistics.median(rates[('batched', c)]) for c in clients}
    unbatched = statistics.median(rates[('unbatched', max(clients))])
    if verbose:
        print('  throughput: ' + ', '.join(f'{c} client(s) {r:.1f} req/s' for c, r in med.items())
              + f'; {max(clients)} without batching {unbatched:.1f} req/s', flush=True)
    return {'requests_per_s': med, 'unbatched_requests_per_s': unbatched, 'seconds_each': seconds,
            'runs': {f'{name} {c}': v for (name, c), v in rates.items()}}


def closed_loop(url, bodies, clients, seconds):
    """Requests per second answered to `clients` threads that each send the next image when answered, each over a
    kept-alive connection of its own (collab.client.Client)."""
    counts, stop = [0] * clients, threading.Event()

    def loop(j):
        k = j
        with client.Client(url) as c:
            while not stop.is_set():
                try:
                    c.predict(bodies[k % len(bodies)])
                    counts[j] += 1
                except client.ServiceError:
                    pass
                k += clients
    threads = [threading.Thread(target=loop, args=(j,), daemon=True) for j in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    return sum(counts) / (time.monotonic() - start)


def overhead(folder, model_path, data, backend='onnxruntime', requests=200, deadline_ms=1000, verbose=True,
             scale='demo'):
    """p50 latency of one image three ways, alternated over the same workers: a tritonclient binary infer over the
    HTTP stack (uvicorn, FastAPI, the Open Inference Protocol, the batcher), the same image sent straight through the
    dispatcher in this process (CollabClient: the workers and the head, no HTTP), and POST /predict of its PNG. The
    HTTP stack runs in this process on a thread of its own, around the same Service, built as collab_infer.py --serve
    builds it; the HTTP calls come from a client process of their own (`http_caller`), as an application's do (a client
    thread in the server's process would share its interpreter lock, and its waits would count as the server's).
    scale 'demo': real Fashion-MNIST test images; 'paper': random 224x224 RGB pixels (and their PNGs)."""
    from PIL import Image

    from collab.host import infer as flags
    from collab.host import oip
    from collab.host.http_api import build_app
    from collab.host.metrics import Metrics
    from collab.host.server import http_server, listen
    from collab.host.service import Service as Core
    from tests.helpers import free_port, kill_group

    port = free_port()
    args = flags.parse_args(['--serve', '--collab-port', str(port), '--backend', backend, '--model-path', model_path,
                             '--deadline-ms', str(deadline_ms), '--threads', '1', '--dataset', 'fashion_mnist',
                             '--tiny-transforms'])
    core = Core(args)
    metrics = Metrics(core)
    core.on_reply = metrics.observe_reply
    sock = listen('127.0.0.1', 0, args.backlog)
    server = http_server(args, build_app(core, oip.Model(core), metrics, args))  # as collab_infer.py --serve has it
    thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, daemon=True)
    thread.start()
    workers = []
    env = dict(os.environ, OMP_NUM_THREADS='1')
    try:
        for i in range(N):
            log = open(os.path.join(folder, f'overhead-worker{i}.log'), 'w')
            workers.append(subprocess.Popen(
                [sys.executable, '-m', 'collab.worker', '--aggregator', f'tcp://127.0.0.1:{port}', '--device-index',
                 str(i), '--model-path', model_path, '--backend', backend, '--threads', '1'], cwd=ROOT, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        end = time.monotonic() + 300
        while not (core.ready() and all(d['state'] == 'up' for d in core.dispatcher.health())):
            if time.monotonic() > end:
                raise RuntimeError(f'the workers did not join within 300 s; logs in {folder}')
            time.sleep(0.05)
        import io

        if scale == 'demo':
            bodies, _ = test_images(data, 16)
            pixels = [np.asarray(Image.open(io.BytesIO(b)))[None, None].astype(np.uint8) for b in bodies]
        else:
            rng = np.random.default_rng(0)
            pixels = [rng.integers(0, 256, (1, core.chans, core.size, core.size), dtype=np.uint8) for _ in range(4)]
            bodies = [png(px[0].transpose(1, 2, 0)) for px in pixels]
        images = os.path.join(folder, f'overhead-{scale}-images')
        os.makedirs(images, exist_ok=True)
        for i, (px, body) in enumerate(zip(pixels, bodies)):
            np.save(os.path.join(images, f'{i}.npy'), px)
            with open(os.path.join(images, f'{i}.png'), 'wb') as f:
                f.write(body)
        caller = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--client',
                                   f'127.0.0.1:{sock.getsockname()[1]}', '--images', images], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def ask(what, k):
            caller.stdin.write(f'{what} {k}\n')
            caller.stdin.flush()
            line = caller.stdout.readline()
            if not line:
                raise RuntimeError(f'the HTTP client process ended (exit code {caller.wait()})')
            return float(line)
        times = {'oip_binary': [], 'dispatcher': [], 'predict': []}
        try:
            for k in range(requests + 10):
                oip_ms = ask('oip', k)
                t0 = time.perf_counter()
                core.client(core.normalise(pixels[k % len(pixels)]), k)
                dispatcher_ms = (time.perf_counter() - t0) * 1e3
                predict_ms = ask('predict', k)
                if k >= 10:
                    for key, ms in (('oip_binary', oip_ms), ('dispatcher', dispatcher_ms), ('predict', predict_ms)):
                        times[key].append(ms)
        finally:
            caller.stdin.close()
            caller.wait(30)
    finally:
        server.should_exit = True
        thread.join(30)
        core.close()
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                kill_group(w)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    if verbose:
        print('  one image, p50: ' + ', '.join(f'{k} {v:.2f} ms' for k, v in p50.items()), flush=True)
    return {'p50_ms': p50, 'requests': requests, 'workers': N, 'backend': backend, 'scale': scale}


def http_caller(url, images):
    """The HTTP side of `overhead`: reads `oip K` or `predict K` lines, sends image K % n of the folder `images`
    (K.npy pixels, K.png the same image as a PNG file) as a tritonclient binary infer or a POST /predict, and writes
    the milliseconds the call took."""
    import tritonclient.http as httpclient

    n = len([name for name in os.listdir(images) if name.endswith('.npy')])
    pixels = [np.load(os.path.join(images, f'{i}.npy')) for i in range(n)]
    bodies = []
    for i in range(n):
        with open(os.path.join(images, f'{i}.png'), 'rb') as f:
            bodies.append(f.read())
    tc = httpclient.InferenceServerClient(url)
    out = [httpclient.InferRequestedOutput('logits', binary_data=True)]
    with client.Client(f'http://{url}') as c:
        for line in sys.stdin:
            what, k = line.split()
            i = int(k) % n
            t0 = time.perf_counter()
            if what == 'oip':
                inp = httpclient.InferInput('image', list(pixels[i].shape), 'UINT8')
                inp.set_data_from_numpy(pixels[i], binary_data=True)
                tc.infer('devit', [inp], outputs=out)
            else:
                c.predict(bodies[i])
            print((time.perf_counter() - t0) * 1e3, flush=True)
    tc.close()
    return 0


def paper_model(workdir, backend):
    """A random-weight ensemble at the paper's scale (four DeiT-Tiny-shaped students at 224x224, a 1000-class head):
    its export, or the checkpoint itself for --backend torch."""
    from bench import collab_bench as collab

    sc = collab.scales()['paper']
    ckpt = collab.write_ensemble(os.path.join(workdir, 'paper.pth'), [sc.student] * N, sc.teacher, sc.num_classes)
    if backend != 'onnxruntime':
        return ckpt
    from bench.onnx_bench import export

    return export(ckpt, os.path.join(workdir, 'paper-export'))


def overhead_results(o, scale):
    p = o['p50_ms']
    return {
        f'serve_http_overhead{"_demo" if scale == "demo" else ""}': {
            'ratio': p['oip_binary'] / p['dispatcher'], 'target': 1.5 if scale == 'demo' else 1.05,
            'direction': 'max',
            'what': f'{scale} scale, one image, p50: a tritonclient binary infer through the HTTP stack '
                    f'{p["oip_binary"]:.2f} ms / the same image through the dispatcher in-process {p["dispatcher"]:.2f}'
                    f' ms ({o["workers"]} {o["backend"]} workers, alternated, {o["requests"]} each)', **o},
        f'oip_binary_vs_predict{"_demo" if scale == "demo" else ""}': {
            'ratio': p['oip_binary'] / p['predict'], 'target': 1.1, 'direction': 'max',
            'what': f'{scale} scale, one image, p50: a tritonclient binary infer {p["oip_binary"]:.2f} ms / POST '
                    f'/predict of its PNG {p["predict"]:.2f} ms (kept-alive connections)'}}


def serving_text(results):
    """docs/deployment.md's `serving` block: the serving stack's figures from results.json."""
    rows = ['| measure | ratio | target | what |', '|---|---|---|---|']
    for key in sorted(results):
        if key.startswith(('serve_http_overhead', 'oip_binary_vs_predict', 'serve_throughput')):
            r = results[key]
            sign = '<=' if r.get('direction') == 'max' else '>='
            rows.append(f'| {key} | {r["ratio"]:.2f} | {sign} {r["target"]:g} | {r["what"]} |')
    return '`python bench/run.py --only serve`, on this machine:\n\n' + '\n'.join(rows)


def bench(quick, model_path=None, data=DATA, backend='onnxruntime', verbose=True):
    workdir = tempfile.mkdtemp(prefix='devit-serve-')
    try:
        if model_path is None and os.path.isfile(DEMO_DROPOUT_HEAD):
            model_path = DEMO_DROPOUT_HEAD
        trained = model_path
        if not trained:
            steps = 200 if quick else 1200
            if verbose:
                print(f'training a demo-shaped ensemble with device dropout 0.2 ({steps} steps)', flush=True)
            trained = train_dropout_ensemble(os.path.join(workdir, 'dropout.pth'), data, steps)
        if backend == 'onnxruntime':
            from bench.onnx_bench import export

            served = export(trained, os.path.join(workdir, 'export'))
        else:
            served = trained
        d = drill(workdir, served, data, requests=400, backend=backend, verbose=verbose)
        t = throughput(workdir, served, data, seconds=4.0 if quick else 10.0, rounds=1 if quick else 3,
                       backend=backend, verbose=verbose)
        o = overhead(workdir, served, data, backend, requests=50 if quick else 200, verbose=verbose)
        o_paper = overhead(workdir, paper_model(workdir, backend), data, backend, requests=20 if quick else 60,
                           deadline_ms=10000, verbose=verbose, scale='paper')
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    source = os.path.relpath(model_path, ROOT) if model_path else 'a demo-shaped ensemble trained here with device ' \
                                                                  'dropout 0.2'
    ratio = t['requests_per_s'][4] / t['requests_per_s'][1]
    return {
        **overhead_results(o, 'demo'),
        **overhead_results(o_paper, 'paper'),
        'serve_fault_drill': {
            'ratio': d['answered'] / d['requests'] if d['answered_once'] else 0.0, 'target': 1.0, 'direction': 'min',
            'what': f'400 requests at {d["rate_per_s"]:g}/s to the service (4 {backend} workers, deadline '
                    f'{d["deadline_ms"]} ms, {source}); worker {KILLED} SIGKILLed after request 100, restarted '
                    'after 200: requests answered exactly once / sent; 3 devices while it was down: '
                    f'{d["down_answers_use_3_devices"]}, 4 after its rejoin: {d["after_rejoin_answers_use_4_devices"]}',
            **d, 'table': drill_table(d)},
        'serve_rejoin_s': {
            'ratio': d['rejoin_s'] if d['rejoin_s'] is not None else float('inf'), 'target': 10.0, 'direction': 'max',
            'what': 'seconds from starting the killed worker\'s command again to its joining the running service '
                    '(process start, imports and model load included)'},
        'serve_throughput': {
            'ratio': ratio, 'target': 1.5, 'direction': 'min',
            'what': f'demo scale, requests/s with 4 concurrent HTTP clients / with 1 ({t["requests_per_s"][4]:.1f} / '
                    f'{t["requests_per_s"][1]:.1f}), closed loop, kept-alive connections, images waiting sent '
                    f'together (--max-batch 8; each alone: {t["unbatched_requests_per_s"]:.1f} with 4 clients); '
                    'clients, the 4 workers and the '
                    f'aggregator on this machine\'s {os.cpu_count()} cores', **t},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='a shorter training and throughput run (the drill is whole)')
    p.add_argument('--model-path', default=None, help='a stage-3 checkpoint trained with --device-dropout')
    p.add_argument('--data-path', default=DATA)
    p.add_argument('--backend', default='onnxruntime', choices=['onnxruntime', 'torch'],
                   help="the workers' (and the head's) backend: onnxruntime, as on a board (default), or torch")
    p.add_argument('--json', default=None)
    p.add_argument('--client', metavar='HOST:PORT', help=argparse.SUPPRESS)  # (overhead's client process)
    p.add_argument('--images', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return http_caller(args.client, args.images)
    results = bench(args.quick, args.model_path, args.data_path, args.backend)
    from bench.common import finish

    return finish(results, args.json)


if __name__ == '__main__':
    main()
