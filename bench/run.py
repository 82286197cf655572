"""Run every benchmark, print one table, write bench/results.json and the results into docs/benchmarks.md.

    python bench/run.py [--quick] [--only training split collab profile]
    python bench/run.py --docs-only     # docs/benchmarks.md (and docs/links.png) again from the results files

Suites, each in its own process and one after another, so that none disturbs another's timings:
- training: bench/training_bench.py -- engine_overhead, distill_overhead (+ _paper), data_loading;
- split:    bench/split_bench.py    -- split_link_vs_copy (hard links vs copies) and split_scaling (1k..100k files);
- collab:   bench/collab_bench.py   -- collab_vs_slowest (+ _n2, _demo), collab_speedup_vs_teacher (+ _demo),
                                 bytes_vs_layer_split (+ _demo), fp16_tokens, collab_scaling;
- profile:  bench/profile_bench.py -- demo_profile_optimizer, demo_profile_stage (where the demo's time goes and
                                 what the fused optimizer changes);
- onnx:     bench/onnx_bench.py    -- onnx_vs_torch_student (+ _demo): onnxruntime / PyTorch eager, one student;
                                 collab_onnx_vs_torch (+ _demo): the collaborative runtime's p50 with onnxruntime
                                 workers and head / with PyTorch ones, on an export_onnx.py export.
- serve:    bench/serve_bench.py, bench/transport_bench.py -- serve_fault_drill, serve_rejoin_s, serve_throughput,
                                 serve_http_overhead (+ _demo), oip_binary_vs_predict (+ _demo),
                                 transport_zmq_vs_gloo (+ _demo): the service under faults and load, and the
                                 runtime's transport against gloo.
- hetero:   bench/hetero_bench.py  -- hetero_plan_vs_uniform, plan_prediction_error (a planned fleet of unlike,
                                 CPU-quota-throttled devices against the uniform plan; needs writable cgroups).
`--quick` (about 5 minutes on 2 cores) runs fewer images, rounds and sizes; the full run takes 15-20 minutes.
Every key of results.json holds {"ratio", "target", "what"} plus "direction" ("max": pass when ratio <= target,
"min": when ratio >= target, null: informational) and the details. Ratios only compare things measured in the same
run, alternated or repeated, medians; the load average around each suite is recorded, since this machine is shared.
`--only` merges its suites into an existing results.json. A full run (or `--only`) then rewrites the generated
blocks of docs/benchmarks.md from the merged results (see write_docs below); `--quick` writes results.quick.json and
RESULTS.quick.md instead, so the recorded full results and the docs stay as they are.
"""
import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)  # the repository's modules and the bench package, from any working folder

from bench.common import print_table, target_text, verdict  # noqa: E402

SUITES = ('training', 'split', 'collab', 'profile', 'onnx', 'serve', 'hetero')


# ----------------------------------------------------------------------------------------------------------------
# Suites (each runs in a child process: `run.py --suite NAME --out FILE`)

def suite_training(quick):
    import torch

    from bench import training_bench as training

    torch.set_num_threads(1)  # least sensitive to other load; the ratios compare like with like
    torch.manual_seed(0)
    images, repeats = (512, 9) if quick else (2048, 11)
    data = training.loader(images, batch_size=128)
    engine = training.bench_engine(data, repeats)
    distill = training.bench_distill(training.loader(images // 2, batch_size=128), repeats)
    loading = training.bench_loading(data, repeats, engine['bare_images_per_s'])
    control = noise_floor(training, data, repeats)
    results = {'engine_overhead': {**engine, 'direction': 'max', 'control': control},
               'distill_overhead': {**distill, 'direction': 'max', 'control': control}}
    if not quick:  # DeiT-B forwards at 224x224 take seconds each on one thread: full run only
        paper = training.bench_distill_paper(batches=2, batch_size=8, repeats=3)
        results['distill_overhead_paper'] = {**paper, 'direction': 'max'}
    results['data_loading'] = {**loading, 'direction': 'min'}
    return results


def noise_floor(training, data, repeats):
    """A/A control for the training ratios: the same bare loop twice on one model and optimizer, timed as
    training.bench_engine times its two sides; how far from 1.0 this lands is the measurement's own error. Also the
    per-step cost of what the engine adds to the bare loop (EMA update, scheduler), measured directly."""
    import statistics

    import torch
    import torch.nn as nn
    from timm import create_model
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    import engine

    name, kwargs = training.TEACHER
    model = create_model(name, num_classes=10, **kwargs)
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05, **engine.optimizer_impl('adamw'))
    criterion = nn.CrossEntropyLoss()

    def loop():
        training.bare_loop(model, opt, criterion, data)
    a, b = training.alternate([loop, loop], repeats)
    ema = ModelEmaV3(model, decay=0.999)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=1000, step_on_epochs=False, updates_per_epoch=10)

    def per_call_ms(fn, n=100):
        return 1e3 * statistics.median(training.timed(fn, n))
    return {'aa_ratio': b / a, 'what': 'the same bare loop twice on one model and optimizer, second / first',
            'step_ms': 1e3 * a / len(data), 'ema_update_ms': per_call_ms(lambda: ema.update(model, step=100)),
            'scheduler_ms': per_call_ms(lambda: sched.step_update(num_updates=5)),
            'threads': torch.get_num_threads()}


def suite_split(quick):
    from bench import split_bench as split

    # 10,000 files of 110 KB (1.1 GB) in the full run: the ratio is per file, and writing, syncing and deleting the
    # trees (not timed) is most of the suite's time.
    files, counts = (2000, (1000, 5000)) if quick else (10000, (1000, 10000, 100000))
    with tempfile.TemporaryDirectory(prefix='devit-bench-split-') as workdir:
        r = split.compare(workdir, files, 110.0, 100, 4, 3)
        scaling = [split.compare(workdir, n, 2.0, 100, 4, 2) for n in counts]
    rows = [{k: s[k] for k in ('files', 'link_seconds', 'copy_seconds', 'link_us_per_file', 'copy_us_per_file',
                               'ratio')} for s in scaling]
    growth = {mode: rows[-1][f'{mode}_us_per_file'] / rows[0][f'{mode}_us_per_file'] for mode in ('link', 'copy')}
    return {
        'split_link_vs_copy': {
            'ratio': r['ratio'], 'target': split.TARGET, 'direction': 'min',
            'what': f'splite_dataset.py on an ImageFolder of {r["files"]} files x 110 KB (ImageNet\'s mean JPEG), '
                    f'copy / hard-link seconds for the whole split; hard links copy {r["link_bytes_copied"]} bytes',
            'details': r},
        'split_scaling': {
            'ratio': max(growth.values()), 'target': 1.5, 'direction': 'max',
            'what': f'split time per file at {rows[-1]["files"]} files / at {rows[0]["files"]} files (2 KB files; '
                    f'1.0 = exactly linear): hard link {growth["link"]:.2f}, copy {growth["copy"]:.2f}',
            'rows': rows}}


def suite_collab(quick):
    from bench import collab_bench as collab

    with tempfile.TemporaryDirectory(prefix='devit-bench-collab-') as workdir:
        return collab.bench(quick, workdir)


def suite_serve(quick):
    from bench import serve_bench, transport_bench, wire_bench

    results = serve_bench.bench(quick)
    results.update(wire_results(wire_bench.bench(quick)))
    t = transport_bench.bench(quick)
    for key, name in (('transport_zmq_vs_gloo', 'paper'), ('transport_zmq_vs_gloo_demo', 'demo')):
        r = t[name]
        p = r['p50_us']
        results[key] = {
            'ratio': r['ratio_zmq_vs_gloo'], 'target': 1.25, 'direction': 'max',
            'what': f'{name} payload ({r["image_bytes"]} B uint8 image to each of {r["workers"]} workers, '
                    f'{r["token_bytes"]} B of tokens back), no compute: p50 round trip of the runtime\'s ZeroMQ wire '
                    f'{p["zmq"]:.0f} us / torch.distributed gloo isend/irecv {p["gloo"]:.0f} us, alternated in the '
                    f'same processes; through the whole dispatcher (its I/O thread, the worker loop) '
                    f'{p["dispatcher"]:.0f} us',
            **r}
    return results


def wire_results(w):
    """The keys of bench/wire_bench.py: CURVE's cost, and the runtime's per-message cost against raw pyzmq."""
    out = {}
    for scale, suffix in (('paper', ''), ('demo', '_demo')):
        r = w[scale]
        p = r['p50_us']
        sizes = f'{r["image_bytes"]} B uint8 image out, {r["token_bytes"]} B of tokens back, one worker process'
        out['secure_overhead' + suffix] = {
            'ratio': p['dispatcher_curve'] / p['dispatcher'], 'target': 1.10 if not suffix else None,
            'direction': 'max' if not suffix else None,
            'what': f'{scale} sizes ({sizes}), no compute: p50 round trip through the dispatcher with CURVE '
                    f'(--keys) {p["dispatcher_curve"]:.0f} us / without {p["dispatcher"]:.0f} us; raw pyzmq '
                    f'{p["raw_curve"]:.0f} / {p["raw"]:.0f} us', **r}
    r = w['demo']
    p = r['p50_us']
    out['wire_vs_raw'] = {
        'ratio': p['wire'] / p['raw'], 'target': 1.3, 'direction': 'max',
        'what': f'demo sizes, one worker process, no compute: p50 round trip of the aggregator on collab.wire '
                f'pack/unpack with every check, against collab.worker.Worker, {p["wire"]:.0f} us / raw pyzmq '
                f'multipart (JSON header literal + buffer, an echo loop) {p["raw"]:.0f} us', **r}
    out['dispatcher_vs_raw'] = {
        'ratio': p['dispatcher'] / p['raw'], 'target': 2.0, 'direction': 'max',
        'what': f'demo sizes, the same run: through the caller-driven dispatcher (the batch evaluation\'s) '
                f'{p["dispatcher"]:.0f} us / raw pyzmq {p["raw"]:.0f} us', **r}
    out['dispatcher_threaded_vs_raw'] = {
        'ratio': p['threaded'] / p['raw'], 'target': None, 'direction': None,
        'what': f'demo sizes, the same run: through the threaded dispatcher (the service\'s: a hop to its I/O '
                f'thread and back) {p["threaded"]:.0f} us / raw pyzmq {p["raw"]:.0f} us', **r}
    return out


def suite_profile(quick):
    from bench import profile_bench as profile_demo

    return profile_demo.bench(quick)


def suite_onnx(quick):
    from bench import onnx_bench

    return onnx_bench.bench(quick)


def suite_hetero(quick):
    from bench import hetero_bench

    with tempfile.TemporaryDirectory(prefix='devit-bench-hetero-') as workdir:
        return hetero_bench.bench(quick, workdir)


def run_suite(name, quick, out):
    load = os.getloadavg()[0]
    started = time.perf_counter()
    results = globals()[f'suite_{name}'](quick)
    meta = {'suite': name, 'seconds': time.perf_counter() - started, 'load_before': load,
            'load_after': os.getloadavg()[0]}
    for value in results.values():
        value['suite'] = meta
    with open(out, 'w') as f:
        json.dump(results, f, indent=1, default=float)


def fmt(v, digits=2):
    return '-' if v is None else f'{v:,.{digits}f}'


def markdown(results, meta):
    lines = [
        '# Benchmark results',
        '',
        f'`{meta["command"]}`{" on " + meta["date"] if meta.get("date") else ""}, {meta["machine"]}; '
        f'{meta["seconds"] / 60:.1f} min. Every ratio '
        'compares two things measured in the same run (alternated or repeated, medians). The machine is shared with '
        f'other work: load average {meta["load"]} (per suite in results.json), so absolute times are noisy and only '
        'the ratios mean something. Definitions: docs/benchmarks.md.',
        '',
        '| benchmark | ratio | target | result | what |',
        '|---|---:|---:|---|---|',
    ]
    for key, r in results.items():
        lines.append(f'| `{key}` | {r["ratio"]:.3f} | {target_text(r)} | {verdict(r)} | '
                     f'{r["what"].replace("|", "/")} |')
    lines += training_sections(results) + collab_sections(results) + profile_sections(results) \
        + split_sections(results)
    return '\n'.join(lines) + '\n'


def training_sections(results):
    c = results.get('engine_overhead', {}).get('control')
    if not c:
        return []
    return ['', '## Training loop', '',
            f'A/A control, timed like `engine_overhead`: the same bare loop twice on one model and optimizer gives '
            f'{c["aa_ratio"]:.3f}, the error of these ratios on this machine. What the engine adds per step, timed '
            f'directly: EMA update {c["ema_update_ms"]:.2f} ms, scheduler {c["scheduler_ms"]:.3f} ms, against a '
            f'{c["step_ms"]:.0f} ms step ({100 * (c["ema_update_ms"] + c["scheduler_ms"]) / c["step_ms"]:.1f}%).']


def collab_sections(results):
    out = []
    rows = [(k, label) for k, label in (('collab_vs_slowest', 'paper scale, N=4, 1 thread each'),
                                        ('collab_vs_slowest_n2', 'paper-size total, N=2, 1 thread each'),
                                        ('collab_vs_slowest_demo', 'demo scale, N=4, 1 thread each'))
            if k in results]
    if rows:
        out += ['', '## Collaborative inference (loopback)', '',
                '| run | latency p50 ms | slowest worker p50 ms | overhead p50 ms | latency / slowest (median) | '
                'p90 | runs x images |', '|---|---:|---:|---:|---:|---:|---:|']
        for k, label in rows:
            r = results[k]
            out.append(f'| {label} | {fmt(r["latency_p50_ms"])} | {fmt(r["slowest_compute_p50_ms"])} | '
                       f'{fmt(r["overhead_p50_ms"])} | {r["ratio"]:.3f} | {r["ratio_p90"]:.3f} | '
                       f'{r["runs"]} x {r["images"] // r["runs"]} |')
        n2 = results.get('collab_vs_slowest_demo', {}).get('n2')
        if n2:
            out.append(f'| demo scale, N=2, 1 thread each | {fmt(n2["latency_p50_ms"])} | '
                       f'{fmt(n2["slowest_compute_p50_ms"])} | {fmt(n2["overhead_p50_ms"])} | {n2["ratio"]:.3f} | '
                       f'{n2["ratio_p90"]:.3f} | {n2["runs"]} x {n2["images"]} |')
    for k in ('collab_speedup_vs_teacher', 'collab_speedup_vs_teacher_demo'):
        if k in results:
            r = results[k]
            teacher = ', '.join(f'{t} thread(s) {fmt(ms)} ms' for t, ms in r['teacher_p50_ms_by_threads'].items())
            n2 = f'; N=2: {fmt(r["collab_n2_p50_ms"])} ms, x{r["speedup_n2"]:.2f}' if 'speedup_n2' in r else ''
            out.append(f'\n`{k}`: teacher {teacher}; collaborative N=4 {fmt(r["collab_p50_ms"])} ms: '
                       f'x{r["ratio"]:.2f}{n2}.')
    byte_rows = [k for k in ('bytes_vs_layer_split', 'bytes_vs_layer_split_demo') if k in results]
    if byte_rows:
        out += ['', '## Traffic per image (bytes)', '',
                '| scale | collab tokens fp32 / fp16 | layer-split fp32 / fp16 | ratio | collab input uint8 / fp32 | '
                'layer-split input uint8 / fp32 | measured = shapes |', '|---|---:|---:|---:|---:|---:|---|']
        for k in byte_rows:
            r = results[k]
            a, checked = r['analytic'], len(r['measured']) + len(r['measured_input'])
            scale = 'paper (224)' if k == 'bytes_vs_layer_split' else 'demo (28)'
            out.append(f'| {scale} | {a["collab_tokens_fp32"]:,} / {a["collab_tokens_fp16"]:,} | '
                       f'{a["layer_split_total_fp32"]:,} / {a["layer_split_total_fp16"]:,} | {r["ratio"]:.1f} '
                       f'| {a["collab_input_uint8"]:,} / {a["collab_input_fp32"]:,} | {a["layer_split_input_uint8"]:,}'
                       f' / {a["layer_split_input_fp32"]:,} | {"yes" if r["analytic_matches_measured"] else "NO"} '
                       f'({checked} measured) |')
        out.append('\nLayer-split bytes include the logits the last stage returns (fp32). With the input counted as '
                   'well, the ratio is ' + ', '.join(
                       f'{"paper" if k == "bytes_vs_layer_split" else "demo"}: '
                       f'{results[k]["ratio_with_input_uint8"]:.2f} (uint8) / {results[k]["ratio_with_input_fp32"]:.2f}'
                       ' (fp32)' for k in byte_rows) + ': the collaborative design sends the image to every device.')
    if 'fp16_tokens' in results:
        r = results['fp16_tokens']
        t = r.get('trained')
        acc = (f'trained demo ensemble ({t["images"]} test images): accuracy {t["accuracy_fp32"]:.4f} (fp32) -> '
               f'{t["accuracy_fp16"]:.4f} (fp16), change {t["accuracy_change"]:+.4f}, predictions agree on '
               f'{100 * t["prediction_agreement"]:.2f}%' if t else
               'accuracy change not measured: no trained demo ensemble (run `bash demo.sh` first)')
        out.append(f'\n`fp16_tokens`: bytes x{r["ratio"]:.3f} fewer; {acc}; random-weight demo ensemble: predictions '
                   f'agree on {100 * r["prediction_agreement_random_weights"]:.1f}%.')
    if 'collab_scaling' in results:
        out += ['', '## Scaling in N (same total size, 224x224, 1 thread per process)', '',
                '| N | student width / heads | params (all students) | latency p50 ms | slowest worker p50 ms | '
                'latency / slowest | speed-up vs N=1 | bytes / image | input uint8 / image |',
                '|---:|---|---:|---:|---:|---:|---:|---:|---:|']
        for row in results['collab_scaling']['rows']:
            out.append(f'| {row["n"]} | {row["student"]["embed_dim"]} / {row["student"]["num_heads"]} | '
                       f'{row["student_params_total"] / 1e6:.1f}M | {fmt(row["latency_p50_ms"])} | '
                       f'{fmt(row["slowest_compute_p50_ms"])} | {row["overhead_ratio"]:.3f} | '
                       f'{row["speedup_vs_n1"]:.2f} | {row["bytes_per_image"]:,.0f} | '
                       f'{row["input_bytes_per_image_uint8"]:,.0f} |')
    return out


def profile_sections(results):
    if 'demo_profile_stage' not in results:
        return []
    r = results['demo_profile_stage']
    costs = r['costs']
    out = ['', '## Where the demo\'s training time goes', '',
           f'Estimated from measured step and evaluation costs (1 thread, batch {r["demo"]["batch"]}) times the steps '
           f'of the full demo (epochs {r["demo"]["epochs"]}): {costs["estimated_total_s"] / 60:.0f} min at these '
           'rates.', '', '| stage | task | steps | train s | eval s | share |', '|---|---|---:|---:|---:|---:|']
    for name, s in costs['stages'].items():
        out.append(f'| {name} | {s["task"]} | {s["steps"]} | {s["train_s"]:.0f} | {s["eval_s"]:.0f} | '
                   f'{100 * s["share"]:.1f}% |')
    before, after = r['profile_before'], r['profile_after']
    fams = list(dict.fromkeys([*before['share'], *after['share']]))
    out += ['', f'Self CPU time of a step of the slowest stage ({costs["slowest"]}), torch.profiler:', '',
            '| op family | before (torch AdamW default) | after (fused AdamW) |', '|---|---:|---:|']
    for f in fams:
        out.append(f'| {f} | {100 * before["share"].get(f, 0):.1f}% | {100 * after["share"].get(f, 0):.1f}% |')
    out.append(f'| ms per step (profiled) | {before["self_ms_per_step"]:.0f} | {after["self_ms_per_step"]:.0f} |')
    fix = results.get('demo_profile_optimizer', {}).get('fix', {})
    if fix:
        out += ['', '| threads | optimizer step ms before -> after | x | optimizer share of a step before | '
                'epoch s before -> after | x measured | x implied by the parts |',
                '|---|---:|---:|---:|---:|---:|---:|']
        for t, x in fix.items():
            out.append(f'| {t.replace("_", " ")} | {x["optimizer_step_ms"]["old"]:.2f} -> '
                       f'{x["optimizer_step_ms"]["new"]:.2f} | {x["optimizer_step_ratio"]:.2f} | '
                       f'{100 * x["optimizer_share_of_step_before"]:.1f}% | {x["epoch_s"]["old"]:.2f} -> '
                       f'{x["epoch_s"]["new"]:.2f} | {x["epoch_ratio"]:.3f} | {x["epoch_ratio_implied"]:.3f} |')
    return out


def split_sections(results):
    if 'split_scaling' not in results:
        return []
    out = ['', '## Split time vs file count (2 KB files, 4 divisions)', '',
           '| files | hard link s | us / file | copy s | us / file | copy / link |', '|---:|---:|---:|---:|---:|---:|']
    for row in results['split_scaling']['rows']:
        out.append(f'| {row["files"]:,} | {row["link_seconds"]:.2f} | {row["link_us_per_file"]:.0f} | '
                   f'{row["copy_seconds"]:.2f} | {row["copy_us_per_file"]:.0f} | {row["ratio"]:.1f} |')
    return out


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='the short version (about 5 minutes)')
    p.add_argument('--only', nargs='+', choices=SUITES, default=None, help='run these suites only')
    p.add_argument('--json', default=None,
                   help='default bench/results.json (bench/results.quick.json with --quick)')
    p.add_argument('--markdown', default=None,
                   help='also write the results page to this file (default with --quick: bench/RESULTS.quick.md)')
    p.add_argument('--docs-only', action='store_true',
                   help='run nothing: rewrite docs/benchmarks.md (and docs/links.png) from --json and bench/links.json')
    p.add_argument('--suite', choices=SUITES, help=argparse.SUPPRESS)  # child process: run one suite
    p.add_argument('--out', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # A quick run never overwrites the recorded full results the docs quote.
    suffix = '.quick' if args.quick else ''
    args.json = args.json or os.path.join(BENCH, f'results{suffix}.json')
    if args.quick and not args.markdown:
        args.markdown = os.path.join(BENCH, 'RESULTS.quick.md')
    if args.suite:
        return run_suite(args.suite, args.quick, args.out)
    if args.docs_only:
        return write_docs(args.json)

    started = time.perf_counter()
    failed = []
    by_suite = {}  # suite name -> its results; a rerun suite replaces its old keys
    if args.only and os.path.isfile(args.json):
        with open(args.json) as f:
            for key, value in json.load(f).items():
                by_suite.setdefault(value.get('suite', {}).get('suite'), {})[key] = value
    with tempfile.TemporaryDirectory(prefix='devit-bench-') as tmp:
        for name in args.only or SUITES:
            print(f'=== {name} ({datetime.datetime.now():%H:%M:%S}, load {os.getloadavg()[0]:.1f})', flush=True)
            out = os.path.join(tmp, f'{name}.json')
            cmd = [sys.executable, __file__, '--suite', name, '--out', out, *(['--quick'] if args.quick else [])]
            proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
            if proc.returncode != 0 or not os.path.isfile(out):
                failed.append(name)
                print(f'error: suite {name} failed (exit {proc.returncode})', file=sys.stderr, flush=True)
                continue
            with open(out) as f:
                by_suite[name] = json.load(f)
    results = {k: v for name in (*SUITES, None) for k, v in by_suite.get(name, {}).items()}

    loads = sorted({round(v['suite'][k], 1) for v in results.values() if 'suite' in v
                    for k in ('load_before', 'load_after')})
    meta = {'command': 'python bench/run.py' + (' --quick' if args.quick else '')
            + (f' --only {" ".join(args.only)}' if args.only else ''),
            'date': f'{datetime.datetime.now():%Y-%m-%d %H:%M}',
            'machine': f'{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})',
            'seconds': time.perf_counter() - started,
            'load': f'{loads[0]}-{loads[-1]}' if loads else '?'}
    print_table(results)
    from fileio import write_json_atomic, write_text_atomic  # an interrupted write leaves the old results whole

    write_json_atomic(args.json, results)
    if args.markdown:
        write_text_atomic(args.markdown, markdown(results, meta))
    print(f'\nwrote {os.path.relpath(args.json, ROOT)} ({meta["seconds"] / 60:.1f} min)')
    if not args.quick:  # a file merged from several runs (--only) is described by its suites, not by this run
        write_docs(args.json, None if args.only else meta)
    if failed:
        sys.exit(f'failed suites: {", ".join(failed)}')


# ----------------------------------------------------------------------------------------------------------------
# The docs: generated blocks of docs/benchmarks.md (fileio.replace_block) and the links figure

DOCS = os.path.join(ROOT, 'docs', 'benchmarks.md')
README = os.path.join(ROOT, 'README.md')  # its `drill` block: the service's fault drill
LINKS_JSON = os.path.join(BENCH, 'links.json')  # sudo python bench/links_bench.py --json bench/links.json


def links_table(result):
    """The links results (bench/links_bench.py's JSON) as markdown: its table, and the figure beside the page."""
    from bench import links_bench

    return (f'`sudo python bench/links_bench.py --json bench/links.json`: {result["what"]}; p50 of '
            f'{result["images"]["collab"]} (DeViT) and {result["images"]["split"]} (layer-split) images per link.\n\n'
            f'{links_bench.table(result)}\n\n![DeViT vs layer-split latency per link speed](links.png)')


def links_figure(result):
    """PNG bytes: p50 latency of DeViT and of the layer-split pipeline for each link profile (grouped bars)."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    from matplotlib import pyplot as plt

    rows = result['rows']
    if not rows:
        raise ValueError('the links results have no rows')
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for offset, key, label, colour in ((-0.2, 'collab_p50_ms', 'DeViT (4 students side by side)', 'tab:blue'),
                                       (0.2, 'layer_split_p50_ms', 'layer-split (teacher in 4 stages)', 'tab:orange')):
        bars = ax.bar([i + offset for i in x], [r[key] for r in rows], width=0.4, label=label, color=colour)
        ax.bar_label(bars, fmt='%.0f', fontsize=8)
    ax.set_xticks(list(x), [r['link'] for r in rows], fontsize=8)
    ax.set_ylabel('p50 latency per image (ms)')
    ax.set_title('Collaborative inference vs layer-split, per link speed', fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def drill_text(r):
    """The fault drill's table (README's `drill` block), from results.json's serve_fault_drill."""
    from fileio import wrap_markdown

    return wrap_markdown(f'`python bench/run.py --only serve`: {r["what"]}.') + f'\n\n{r["table"]}'


def write_docs(json_path, meta=None, docs=DOCS, links_json=LINKS_JSON, readme=README):
    """Rewrite the `benchmarks` block of docs/benchmarks.md from the results in ``json_path``, the `drill` block of
    README.md where the results have the fault drill, and, where bench/links.json exists, the `links` block and
    docs/links.png. ``meta``: the run's (else read off the files)."""
    from fileio import UsageError, replace_blocks, write_bytes_atomic

    with open(json_path) as f:
        results = json.load(f)
    if meta is None:
        loads = sorted({round(v['suite'][k], 1) for v in results.values() if 'suite' in v
                        for k in ('load_before', 'load_after')})
        meta = {'command': 'python bench/run.py',
                'machine': f'{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})',
                'seconds': sum({v['suite']['suite']: v['suite']['seconds'] for v in results.values()
                                if 'suite' in v}.values()),
                'load': f'{loads[0]}-{loads[-1]}' if loads else '?'}
    page = markdown(results, {k: v for k, v in meta.items() if k != 'date'})  # the docs state commands, not dates
    body = page.split('\n', 2)[2] if page.startswith('# ') else page  # the page's title is the docs page's own
    blocks, links = {'benchmarks': body}, None
    if os.path.isfile(links_json):
        with open(links_json) as f:
            links = json.load(f)
        blocks['links'] = links_table(links)
    edits = {docs: blocks}
    if 'serve_fault_drill' in results and readme:
        edits[readme] = {'drill': drill_text(results['serve_fault_drill'])}
    deployment = os.path.join(os.path.dirname(docs), 'deployment.md')
    if 'serve_http_overhead_demo' in results and os.path.isfile(deployment):
        from bench.serve_bench import serving_text

        edits[deployment] = {'serving': serving_text(results)}
    try:
        replace_blocks(edits)
    except UsageError as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
    if links is not None:
        write_bytes_atomic(os.path.join(os.path.dirname(docs), 'links.png'), links_figure(links))
    print(f'wrote the generated blocks of {os.path.relpath(docs, ROOT)}')


if __name__ == '__main__':
    main()
