"""Board power on a Jetson (jtop, INA3221 sysfs, tegrastats) or a PC (RAPL), and energy per inference.

Sources, in the order ``--source auto`` tries them:
  jtop        jetson-stats' service: ``jetson.power['tot']['power']`` (v4+; 3.x gave a tuple), when it imports, its
              service answers and the board has a total rail; never with ``--rail`` (a chosen rail is read directly)
  sysfs       the INA3221 monitors read directly at the interval: JetPack 4 IIO driver (``rail_name_<n>``,
              ``in_power<n>_input`` mW) or JetPack 5+ hwmon (``in<N>_label``, ``in<N>_input`` mV, ``curr<N>_input`` mA)
  tegrastats  a ``tegrastats --interval MS`` process, one line per interval
  rapl        ``/sys/class/powercap/intel-rapl:N/energy_uj``: the CPU package of a PC, not a board; where readable
  none        latency only: energy is reported as unavailable, and the tools say so

On a Jetson the number is the board total, the DeViT paper's convention: ``POM_5V_IN`` on a Nano, ``VDD_IN`` on
Orin, TX2 and Xavier NX, never a sum of the sub-rails. Boards without a total rail (AGX Xavier, AGX Orin, whose
``VIN_SYS_5V0`` is an I/O rail) need ``--rail NAME`` or ``--rail sum``. Idle power is subtracted only when asked.

    python -m jetson.power --interval-ms 100 --csv power.csv --inferences 500 -- python collab_infer.py --limit 500
    python -m jetson.power --parse-file tegrastats.log --interval-ms 1000

Standard library only, down to Python 3.6 (JetPack 4's system python3), so it runs on a board without torch.

The sources themselves (parsing tegrastats, the INA3221 rails, RAPL): jetson/power_sources.py.
"""
import argparse
import bisect
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from jetson import split_command
from jetson.power_sources import SOURCES, SourceUnavailable, open_source, read_tegrastats_log

# ---------------------------------------------------------------------------------------------------------------------
# Energy

def _interp(ts, ps, t):
    if t <= ts[0]:
        return ps[0]
    if t >= ts[-1]:
        return ps[-1]
    i = bisect.bisect_right(ts, t)
    return ps[i - 1] + (ps[i] - ps[i - 1]) * (t - ts[i - 1]) / (ts[i] - ts[i - 1])


def energy_mj(samples, t0, t1):
    """∫ P dt over [t0, t1] in mJ, from samples ``[(t_s, mW)]``, by the trapezoid rule.

    Samples outside the window are clipped; the window's edges get values interpolated linearly between the samples
    around them (the first/last sample's value where the window reaches past the samples).
    """
    if t1 < t0:
        raise ValueError(f'window ends before it starts: [{t0}, {t1}]')
    if not samples:
        raise ValueError('no power samples')
    pts = sorted(samples)
    ts, ps = [t for t, _ in pts], [p for _, p in pts]
    inner = [(t, p) for t, p in pts if t0 < t < t1]
    xs = [(t0, _interp(ts, ps, t0)), *inner, (t1, _interp(ts, ps, t1))]
    return sum((xs[i + 1][0] - xs[i][0]) * (xs[i][1] + xs[i + 1][1]) / 2 for i in range(len(xs) - 1))


def energy_per_inference_mj(samples, t0, t1, n, idle_mw=None):
    """Energy of the window divided by the ``n`` inferences run in it; ``idle_mw`` x duration is taken off first
    only when given (the paper reports the total, idle included)."""
    e = energy_mj(samples, t0, t1)
    if idle_mw is not None:
        e -= idle_mw * (t1 - t0)
    return e / n


class PowerMonitor:
    """Samples power in a background thread at a fixed interval; times are ``time.perf_counter()`` seconds.

        with PowerMonitor(interval_ms=100, csv_path='power.csv') as pm:
            t0 = time.perf_counter(); run(n); t1 = time.perf_counter()
        print(pm.source_name, pm.energy_per_inference_mj(t0, t1, n))   # None when no source: latency only

    The CSV has ``t_s`` (from the monitor's start), ``power_mW``, ``source`` and ``unix_s`` (wall clock, to line
    the log up with another process's window: ``energy_mj(load_csv(path), unix_t0, unix_t1)``). A sample is taken
    on entry and one on exit so a window inside the block is covered at both ends.
    """

    def __init__(self, source='auto', interval_ms=100.0, csv_path=None, rail=None, sys_root='/sys',
                 tegrastats='tegrastats'):
        self.kind, self.interval_s, self.csv_path = source, interval_ms / 1000.0, csv_path
        self._open_kw = {'sys_root': sys_root, 'rail': rail, 'tegrastats': tegrastats}
        self.samples, self.skipped, self.error = [], [], None
        self._lock, self._stop, self._first = threading.Lock(), threading.Event(), threading.Event()
        self._thread = self._csv_file = None
        self._closed = False

    @property
    def available(self):
        return self._source.kind != 'none'

    @property
    def source_name(self):
        return self._source.name

    @property
    def note(self):
        """One line on where the numbers come from, for the reports."""
        if not self.available:
            return 'no power source (' + '; '.join(self.skipped or ['none asked']) + '): latency only'
        extra = ', CPU package only, not the whole machine' if self._source.kind == 'rapl' else ''
        return f'power from {self.source_name} every {self.interval_s * 1000:g} ms{extra}'

    def __enter__(self):
        self._source, self.skipped = open_source(self.kind, self.interval_s, **self._open_kw)
        self.t_start = time.perf_counter()
        self._unix_offset = time.time() - self.t_start
        if self.csv_path:
            self._csv_file = open(self.csv_path, 'w', newline='')
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow(['t_s', 'power_mW', 'source', 'unix_s'])
        if not self.available:
            return self
        if not self._source.paced:
            self._sample()
        self._thread = threading.Thread(target=self._run, name='PowerMonitor', daemon=True)
        self._thread.start()
        if self._source.paced:  # e.g. tegrastats: wait for its first line so the window's start is covered
            self._first.wait(timeout=max(2.0, 5 * self.interval_s))
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        """Stop sampling (taking one last sample) and close the source and the CSV; safe to call twice."""
        if self._thread is not None:
            self._stop.set()
            if self._source.paced:
                self._source.close()  # unblocks the thread's readline
            self._thread.join()
            self._thread = None
            if not self._source.paced and self.error is None:
                try:
                    self._sample()
                except (OSError, ValueError, KeyError) as e:
                    self.error = f'{type(e).__name__}: {e}'
        if getattr(self, '_source', None) is not None and not self._closed:
            self._closed = True
            self._source.close()
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None

    def _sample(self):
        s = self._source.read()
        if s is None:
            return
        with self._lock:
            self.samples.append(s)
            if self._csv_file is not None:
                self._csv.writerow([f'{s[0] - self.t_start:.6f}', f'{s[1]:.1f}', self._source.name,
                                    f'{s[0] + self._unix_offset:.6f}'])
                self._csv_file.flush()
        self._first.set()

    def _run(self):
        deadline = time.perf_counter()  # a polled source's first sample was taken in __enter__
        while True:
            if self._source.paced:
                if self._stop.is_set():
                    break
            else:
                deadline += self.interval_s
                delay = deadline - time.perf_counter()
                if delay < 0:  # fell behind (a loaded core): restart the grid rather than burst
                    deadline, delay = time.perf_counter(), 0.0
                if self._stop.wait(delay):
                    break
            try:
                self._sample()
            except (EOFError, OSError, ValueError, KeyError) as e:  # source gone or a rail vanished: keep what we have
                if not self._stop.is_set():
                    self.error = f'{type(e).__name__}: {e}'
                break

    def wait(self, seconds):
        """Sleep while sampling, e.g. to measure idle power before a run; returns the window (t0, t1)."""
        t0 = time.perf_counter()
        time.sleep(seconds)
        return t0, time.perf_counter()

    def energy_mj(self, t0, t1):
        if not self.available or not self.samples:
            return None
        with self._lock:
            return energy_mj(list(self.samples), t0, t1)

    def mean_power_mw(self, t0, t1):
        e = self.energy_mj(t0, t1)
        return None if e is None or t1 <= t0 else e / (t1 - t0)

    def energy_per_inference_mj(self, t0, t1, n, idle_mw=None):
        e = self.energy_mj(t0, t1)
        return None if e is None else (e - (idle_mw or 0.0) * (t1 - t0)) / n


def load_csv(path, clock='unix_s'):
    """Samples ``[(t, mW)]`` of a PowerMonitor CSV, on its ``unix_s`` (wall clock) or ``t_s`` column."""
    with open(path, newline='') as f:
        return [(float(row[clock]), float(row['power_mW'])) for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------------------------
# CLI

def get_args_parser():
    p = argparse.ArgumentParser('Board power while a command runs, and energy per inference', add_help=False)
    p.add_argument('-h', '--help', action='help')
    p.add_argument('--source', default='auto', choices=SOURCES)
    p.add_argument('--interval-ms', type=float, default=100.0, help='sampling interval (tegrastats: its --interval)')
    p.add_argument('--rail', default=None, help='rail to read instead of the board total (a name, or "sum")')
    p.add_argument('--csv', default=None, help='log of samples: t_s,power_mW,source')
    p.add_argument('--json', default=None, help='write the summary here')
    p.add_argument('--inferences', type=int, default=None, help='inferences CMD runs, for mJ per inference')
    p.add_argument('--subtract-idle', action='store_true',
                   help='measure idle for --idle-s before CMD and subtract it (default: total board energy)')
    p.add_argument('--idle-s', type=float, default=2.0)
    p.add_argument('--parse-file', default=None, help='summarise a tegrastats log instead of running a command')
    p.add_argument('--sys-root', default='/sys', help='root of sysfs (tests point it at a fake tree)')
    p.add_argument('--tegrastats', default='tegrastats', help='tegrastats executable')
    return p


def _summary_line(s):
    if s.get('energy_mJ') is None:
        return f'{s["note"]}; {s["duration_s"]:.3f} s'
    line = (f'energy {s["energy_mJ"]:.1f} mJ over {s["duration_s"]:.3f} s (mean {s["mean_power_mW"]:.0f} mW, '
            f'{s["samples"]} samples, {s["source"]})')
    if s.get('idle_mW') is not None:
        line += f'; idle {s["idle_mW"]:.0f} mW, {s["energy_above_idle_mJ"]:.1f} mJ above idle'
    if s.get('mJ_per_inference') is not None:
        line += f'; {s["mJ_per_inference"]:.2f} mJ per inference ({s["inferences"]})'
    return line


def _parse_file(args):
    samples, rail = read_tegrastats_log(args.parse_file, args.interval_ms, args.rail)
    if not samples:
        sys.exit(f'{args.parse_file}: no line with a board-total rail (use --rail NAME or --rail sum)')
    if args.csv:
        with open(args.csv, 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['t_s', 'power_mW', 'source'])
            w.writerows([f'{t:.6f}', f'{p:.1f}', f'tegrastats:{rail}'] for t, p in samples)
    t0, t1 = samples[0][0], samples[-1][0]
    powers = [p for _, p in samples]
    s = {'source': f'tegrastats:{rail}', 'samples': len(samples), 'duration_s': t1 - t0,
         'energy_mJ': energy_mj(samples, t0, t1), 'mean_power_mW': sum(powers) / len(powers),
         'min_power_mW': min(powers), 'max_power_mW': max(powers),
         'note': f'{args.parse_file}, {args.interval_ms:g} ms', 'energy_is': 'total board, idle included'}
    if args.inferences:
        s.update(inferences=args.inferences, mJ_per_inference=s['energy_mJ'] / args.inferences)
    return s, 0


def _run_command(args, cmd):
    with PowerMonitor(args.source, args.interval_ms, args.csv, args.rail, args.sys_root, args.tegrastats) as pm:
        idle = None
        if args.subtract_idle and pm.available:
            idle = pm.mean_power_mw(*pm.wait(args.idle_s))
        t0 = time.perf_counter()
        try:
            rc = subprocess.call(cmd)
        except FileNotFoundError:
            rc = 127
            print(f'command not found: {cmd[0]}', file=sys.stderr)
        t1 = time.perf_counter()
    e = pm.energy_mj(t0, t1)
    s = {'command': cmd, 'returncode': rc, 'source': pm.source_name, 'note': pm.note, 'samples': len(pm.samples),
         'interval_ms': args.interval_ms, 'duration_s': t1 - t0, 'energy_mJ': e,
         'mean_power_mW': None if e is None else e / (t1 - t0), 'energy_is': 'total board, idle included'}
    if pm.error:
        s['sampling_error'] = pm.error
    if idle is not None:
        s.update(idle_mW=idle, energy_above_idle_mJ=e - idle * (t1 - t0), energy_is='above idle')
    if args.inferences and e is not None:
        s.update(inferences=args.inferences, mJ_per_inference=(s.get('energy_above_idle_mJ', e)) / args.inferences)
    if e is not None and (t1 - t0) < 5 * args.interval_ms / 1000:
        print(f'warning: the command ran for only {(t1 - t0) * 1000:.0f} ms, under 5 sampling intervals',
              file=sys.stderr)
    return s, rc


def main(argv=None):
    argv, cmd = split_command(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    try:
        if args.parse_file:
            summary, rc = _parse_file(args)
        elif cmd:
            summary, rc = _run_command(args, cmd)
        else:
            get_args_parser().error('give a command after --, or --parse-file LOG')
    except SourceUnavailable as e:
        print(f'error: --source {args.source}: {e}', file=sys.stderr)
        return 2
    print(_summary_line(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + '\n')
    return rc


if __name__ == '__main__':
    sys.exit(main())
