"""Build one TensorRT engine per device (and one for the head) from an export of export_onnx.py, on the board.

    python3 -m jetson.build_engines EXPORT --fp16              # all: EXPORT/device{i}.plan and EXPORT/head.plan
    python3 -m jetson.build_engines EXPORT --fp16 --device 2   # on board 2: its own engine only
    python3 -m jetson.build_engines EXPORT --fp16 --dry-run    # print the exact trtexec commands, run nothing
    python3 -m jetson.build_engines EXPORT --fp16 --workspace 1024   # TensorRT's workspace limit, in MiB
    python3 -m jetson.build_engines EXPORT --max-batch 8 -- --verbose   # extra trtexec flags, passed as they are

Each engine is `trtexec --onnx=EXPORT/device{i}.onnx --saveEngine=DIR/device{i}.plan [--fp16]` with the graph's
dynamic batch dimension given a range (`--minShapes/--optShapes/--maxShapes`, batch 1 to --max-batch, tuned for
--opt-batch). TensorRT engines are specific to the GPU and the TensorRT version that built them, so build them on
the board that will run them (boards of one model with one JetPack can share). With `--fp16` TensorRT picks fp16
kernels from the fp32 graph (the *.fp16.onnx copies are for onnxruntime). Each trtexec log goes to
DIR/device{i}.trtexec.log; DIR/engines.json records the commands, the TensorRT version and the board.

The flags follow the TensorRT that trtexec reports (`trtexec --version`, or the `[TensorRT v8201]` banner every run
prints; else the Python bindings or the libnvinfer package): --workspace MiB is `--workspace=MiB` before 8.4 and
`--memPoolSize=workspace:MiB` from 8.4 on (10.0 removed `--workspace`). --fp16 is trtexec's `--fp16` (weak typing)
before 10.12; from 10.12, which deprecates weak typing, an export with fp16 graphs (export_onnx.py --fp16) is built
from its *.fp16.onnx with `--stronglyTyped`, and one without them keeps `--fp16` with a warning (TensorRT 11 removed
it: there the fp16 graphs are needed).

TensorRT before 8.6 (JetPack 4.6 has 8.2, JetPack 5.1 has 8.5) cannot import LayerNormalization, which an opset-17
export contains: this tool says so before building; export with `export_onnx.py --opset 13` for those boards.
Standard library only (the manifest is read by collab/manifest.py, the runtime's reader), Python 3.6 and later.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from collab import manifest as export_manifest
from jetson import split_command
from jetson.power_sources import jetson_model

TRTEXEC_PATHS = ('/usr/src/tensorrt/bin/trtexec',)  # where JetPack installs it (not on PATH by default)


class BuildError(Exception):
    """A bad export folder, a missing trtexec, a TensorRT that cannot import the graphs, or a failed build."""


def get_args_parser():
    p = argparse.ArgumentParser('TensorRT engines of a DeViT ONNX export', add_help=False)
    p.add_argument('-h', '--help', action='help')
    p.add_argument('export', help='folder written by export_onnx.py (manifest.json, device{i}.onnx, head.onnx)')
    p.add_argument('--fp16', action='store_true', help='let TensorRT use fp16 kernels (trtexec --fp16)')
    p.add_argument('--device', type=int, nargs='+', default=None, metavar='I',
                   help='build these devices only (default: all); the head is built only with --head then')
    p.add_argument('--head', action='store_true', help='build head.plan too when --device is given')
    p.add_argument('--no-head', action='store_true', help='never build head.plan')
    p.add_argument('--engine-dir', default=None, help='where the .plan files go (default: the export folder)')
    p.add_argument('--max-batch', type=int, default=1, help='largest batch the engines accept (default 1)')
    p.add_argument('--opt-batch', type=int, default=1, help='batch TensorRT tunes for (default 1)')
    p.add_argument('--workspace', type=int, default=None, metavar='MIB',
                   help="TensorRT's workspace limit in MiB, in the flag of its version (default: TensorRT's)")
    p.add_argument('--trtexec', default=None, help='trtexec executable (default: PATH, then ' +
                   ', '.join(TRTEXEC_PATHS) + ')')
    p.add_argument('--dry-run', '-n', action='store_true', help='print the commands instead of running them')
    return p


def read_manifest(folder):
    """The export's manifest, checked by the runtime's own reader (collab/manifest.py)."""
    try:
        return export_manifest.read(folder)
    except export_manifest.ModelError as e:
        raise BuildError(str(e)) from None


def find_trtexec(explicit=None):
    if explicit:
        return explicit if shutil.which(explicit) or os.access(explicit, os.X_OK) else None
    found = shutil.which('trtexec')
    if found:
        return found
    for path in TRTEXEC_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


def _version_tuple(text):
    m = re.search(r'(\d+)\.(\d+)(?:\.(\d+))?', text or '')
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def banner_version(text):
    """TensorRT's version in trtexec's output: its banner (`[TensorRT v8201]`: 8.2.1, `v101200`: 10.12.0) or a
    `TensorRT version: 10.12.0` line; None."""
    m = re.search(r'TensorRT[^\n]*?\bv(\d{4,6})\b', text or '')
    if m:
        n = int(m.group(1))
        return (n // 10000, n // 100 % 100, n % 100) if n >= 100000 else (n // 1000, n // 100 % 10, n % 100)
    m = re.search(r'TensorRT(?: version)?:? v?(\d+\.\d+(?:\.\d+)?)', text or '')
    return _version_tuple(m.group(1)) if m else None


def trtexec_version(trtexec):
    """The TensorRT of `trtexec` (None if it cannot say): `trtexec --version`, whose banner also comes with the
    'unknown option' answer of versions without that flag."""
    try:
        proc = subprocess.run([trtexec, '--version'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=60)  # noqa: UP021 (3.6)
    except (OSError, subprocess.SubprocessError):
        return None
    return banner_version(proc.stdout)


def tensorrt_version():
    """TensorRT's version on this machine, as a tuple: the Python bindings, else the libnvinfer package; None."""
    try:
        import tensorrt
        return _version_tuple(tensorrt.__version__)
    except ImportError:
        pass
    if shutil.which('dpkg-query'):
        for package in ('libnvinfer10', 'libnvinfer8', 'libnvinfer7', 'tensorrt'):
            proc = subprocess.run(['dpkg-query', '-W', '-f=${Version}', package], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, universal_newlines=True)  # noqa: UP021 (3.6)
            if proc.returncode == 0 and proc.stdout.strip():
                return _version_tuple(proc.stdout)
    return None


def incompatibility(version, manifest):
    """Why this TensorRT cannot import the export's graphs, or None."""
    if version is None or tuple(version) >= (8, 6):
        return None
    if 'LayerNormalization' in (manifest.get('operators') or []) or manifest.get('opset', 0) >= 17:
        return (f'TensorRT {".".join(map(str, version))} has no LayerNormalization importer (it arrived in 8.6) '
                'and this export has opset-17 LayerNormalization nodes: re-export with export_onnx.py --opset 13')
    return None


def _dims(shape):
    return 'x'.join(str(d) for d in shape)


def _shapes(inputs, batch):
    return ','.join(f'{name}:{_dims([batch] + list(shape))}' for name, shape in inputs)


def workspace_flag(version, mib):
    """trtexec's workspace limit for this TensorRT (None: unknown, taken as 8.4 or later)."""
    if version is not None and tuple(version) < (8, 4):
        return f'--workspace={mib}'
    return f'--memPoolSize=workspace:{mib}'


def strongly_typed(version):
    """True from TensorRT 10.12 on, which deprecates weak typing (trtexec --fp16) for strongly typed graphs."""
    return version is not None and tuple(version) >= (10, 12)


def plan_builds(manifest, folder, engine_dir, devices=None, head=None, fp16=False, max_batch=1, opt_batch=1,
                trtexec='trtexec', extra=(), version=None, workspace=None):
    """The builds to run: [(what, onnx path, plan path, log path, command)], with the flags of TensorRT `version`."""
    if not 1 <= opt_batch <= max_batch:
        raise BuildError(f'--opt-batch {opt_batch} must be between 1 and --max-batch {max_batch}')
    entries = {d['index']: d for d in manifest['devices']}
    wanted = sorted(entries) if devices is None else list(devices)
    unknown = [i for i in wanted if i not in entries]
    if unknown:
        raise BuildError(f'no device {unknown[0]} in the export (devices {sorted(entries)})')
    size, chans = manifest['input']['size'], manifest['input']['channels']
    jobs = []
    for i in wanted:
        d = entries[i]
        jobs.append((f'device{i}', d['file'], d.get('fp16_file'), [(d.get('input', 'image'), [chans, size, size])]))
    if head is None:
        head = devices is None
    if head and manifest.get('head'):
        widths = {d['index']: d['token_width'] for d in manifest['devices']}
        inputs = [(name, [widths[k]]) for k, name in enumerate(manifest['head']['inputs'])]
        jobs.append(('head', manifest['head']['file'], manifest['head'].get('fp16_file'), inputs))
    builds = []
    for what, file, fp16_file, inputs in jobs:
        typed = fp16 and strongly_typed(version) and bool(fp16_file)
        if fp16 and not typed and version is not None and tuple(version) >= (11,):
            raise BuildError(f'TensorRT {".".join(map(str, version))} has no --fp16 (weak typing): export with '
                             'export_onnx.py --fp16, whose fp16 graphs it builds strongly typed')
        onnx_path = Path(folder) / (fp16_file if typed else file)
        if not onnx_path.is_file():
            raise BuildError(f'{onnx_path} is missing: the export is incomplete, export again')
        plan = Path(engine_dir) / (Path(file).stem + '.plan')
        cmd = [trtexec, f'--onnx={onnx_path}', f'--saveEngine={plan}', f'--minShapes={_shapes(inputs, 1)}',
               f'--optShapes={_shapes(inputs, opt_batch)}', f'--maxShapes={_shapes(inputs, max_batch)}']
        if typed:
            cmd.append('--stronglyTyped')
        elif fp16:
            cmd.append('--fp16')
        if workspace is not None:
            cmd.append(workspace_flag(version, workspace))
        cmd += list(extra)
        builds.append((what, onnx_path, plan, Path(engine_dir) / (Path(file).stem + '.trtexec.log'), cmd))
    return builds


def write_json_atomic(path, obj):
    fd, tmp = tempfile.mkstemp(prefix='.' + Path(path).name + '.', suffix='.tmp', dir=str(Path(path).parent))
    with os.fdopen(fd, 'w') as f:
        f.write(json.dumps(obj, indent=2) + '\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, str(path))


def _tail(path, lines=15):
    try:
        return '\n'.join(Path(path).read_text(errors='replace').splitlines()[-lines:])
    except OSError:
        return ''


def main(argv=None):
    argv, extra = split_command(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    try:
        return build(args, extra)
    except BuildError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


def build(args, extra):
    manifest = read_manifest(args.export)
    engine_dir = Path(args.engine_dir or args.export)
    trtexec = find_trtexec(args.trtexec)
    board = jetson_model()
    head = False if args.no_head else (True if args.head else None)
    version = (trtexec_version(trtexec) if trtexec else None) or tensorrt_version()
    builds = plan_builds(manifest, args.export, engine_dir, args.device, head, args.fp16, args.max_batch,
                         args.opt_batch, trtexec or args.trtexec or TRTEXEC_PATHS[0], extra, version, args.workspace)
    problem = incompatibility(version, manifest)
    if args.fp16 and strongly_typed(version) and any('--fp16' in cmd for *_, cmd in builds):
        print(f'warning: TensorRT {".".join(map(str, version))} deprecates --fp16 (weak typing): export with '
              'export_onnx.py --fp16 so that the fp16 graphs are built strongly typed', file=sys.stderr)
    if args.dry_run:
        where = board or 'not a Jetson: engines are built on the board that runs them'
        print(f'dry run ({where}; TensorRT {".".join(map(str, version)) if version else "not found here"}), '
              'would run:')
        for _, _, _, log, cmd in builds:
            print('  ' + ' '.join(shlex.quote(c) for c in cmd) + ' > ' + shlex.quote(str(log)) + ' 2>&1')
        if problem:
            print(f'warning: {problem}')
        return 0
    if trtexec is None:
        raise BuildError(f'trtexec not found (PATH, {", ".join(TRTEXEC_PATHS)}): on a Jetson it comes with JetPack '
                         '(nvidia-tensorrt); pass --trtexec PATH, or --dry-run to see the commands')
    if problem:
        raise BuildError(problem)
    if board is None:
        print('note: not a Jetson; these engines are for this machine\'s GPU only')
    engine_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for what, onnx_path, plan, log, cmd in builds:
        print('+ ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
        with open(str(log), 'w') as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        if rc != 0 or not plan.is_file():
            raise BuildError(f'trtexec failed for {onnx_path.name} (exit {rc}); end of {log}:\n{_tail(log)}')
        done.append({'what': what, 'onnx': str(onnx_path), 'plan': str(plan), 'log': str(log), 'command': cmd})
        print(f'{plan} ({plan.stat().st_size / 1e6:.1f} MB)', flush=True)
    record = {'export': str(Path(args.export).resolve()), 'precision': 'fp16' if args.fp16 else 'fp32',
              'max_batch': args.max_batch, 'opt_batch': args.opt_batch, 'board': board,
              'tensorrt': '.'.join(map(str, version)) if version else None, 'engines': done}
    write_json_atomic(engine_dir / 'engines.json', record)
    print(f'wrote {len(done)} engines and {engine_dir / "engines.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
