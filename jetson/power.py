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
"""
import argparse
import bisect
import csv
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from jetson import split_command

# Rails that are the whole board's input power, most specific first.
BOARD_TOTAL_RAILS = ('POM_5V_IN', 'VDD_IN')
SOURCES = ('auto', 'jtop', 'sysfs', 'tegrastats', 'rapl', 'none')

# `NAME cur/avg`, each number with an optional mW suffix. The look-ahead keeps `RAM 2403/3956MB` and
# `IRAM 0/252kB(...)` out: a rail's second number ends the token.
_RAIL_RE = re.compile(r'(?<![\w@])([A-Z][A-Z0-9_]*) (\d+(?:\.\d+)?)(?:mW)?/(\d+(?:\.\d+)?)(?:mW)?(?=\s|$)')


class SourceUnavailable(RuntimeError):
    """A power source that is absent or unreadable here; the message says why."""


# ---------------------------------------------------------------------------------------------------------------------
# tegrastats

def parse_tegrastats_line(line):
    """Power rails of one tegrastats line: ``{name: (cur_mW, avg_mW)}``, names as printed (``POM_5V_IN``, ``VDD_IN``).

    Nano (JetPack 4) ``POM_5V_IN 2132/2132``, Orin ``VDD_IN 17946mW/15710mW``, TX2 ``VDD_IN 5297/5297``.
    """
    return {m.group(1): (float(m.group(2)), float(m.group(3))) for m in _RAIL_RE.finditer(line)}


def board_total(rails, rail=None):
    """``(name, value)`` of the board-total rail in ``rails`` (``{name: mW}`` or ``{name: (cur, avg)}``), or None.

    ``rail`` overrides the choice: a rail name, or ``'sum'`` for the sum of every rail but ``NC`` (boards with no
    total rail; this misses the module's own losses, so it is a lower bound). Sub-rails are never added otherwise.
    """
    if rail == 'sum':
        vals = [v for k, v in rails.items() if k != 'NC']
        if not vals:
            return None
        if isinstance(vals[0], tuple):
            return 'sum', tuple(sum(v[i] for v in vals) for i in range(2))
        return 'sum', sum(vals)
    for name in ((rail,) if rail else BOARD_TOTAL_RAILS):
        if name in rails:
            return name, rails[name]
    return None


def read_tegrastats_log(path, interval_ms=1000.0, rail=None):
    """Samples ``[(t_s, mW)]`` of a tegrastats log, the i-th parsed line at ``i * interval_ms``; plus the rail name.

    tegrastats' own timestamps (JetPack 5+) have a one-second resolution, so the interval is taken as given.
    """
    samples, name = [], None
    for line in Path(path).read_text().splitlines():
        total = board_total(parse_tegrastats_line(line), rail)
        if total is None:
            continue
        name = total[0]
        samples.append((len(samples) * interval_ms / 1000.0, total[1][0]))
    return samples, name


# ---------------------------------------------------------------------------------------------------------------------
# INA3221 in sysfs

class Ina3221Rail:
    """One INA3221 channel: power from ``power_file`` (mW, IIO) or ``voltage_file`` (mV) x ``current_file`` (mA)."""

    def __init__(self, name, power_file=None, voltage_file=None, current_file=None):
        self.name, self.power_file, self.voltage_file, self.current_file = name, power_file, voltage_file, current_file

    def __repr__(self):
        return f'Ina3221Rail({self.name!r})'

    def read_mw(self):
        if self.power_file is not None:
            return float(_read(self.power_file))
        return float(_read(self.voltage_file)) * float(_read(self.current_file)) / 1000.0


def _read(path):
    return Path(path).read_text().strip()


def find_ina3221(sys_root='/sys'):
    """Device folders of the INA3221 monitors: ``bus/i2c/devices/*/name`` saying ``ina3221`` (``ina3221x`` on
    JetPack 4), plus whatever the ``ina3221x``/``ina3221`` drivers are bound to."""
    i2c = Path(sys_root) / 'bus' / 'i2c'
    found = {}
    for name_file in sorted(i2c.glob('devices/*/name')):
        try:
            if _read(name_file).startswith('ina3221'):
                found.setdefault(name_file.parent.resolve(), name_file.parent)
        except OSError:
            continue
    for driver in ('ina3221x', 'ina3221'):
        for dev in sorted((i2c / 'drivers' / driver).glob('*-*')):  # i2c device names look like 6-0040
            if dev.is_dir():
                found.setdefault(dev.resolve(), dev)
    return list(found.values())


def ina3221_iio_rails(device):
    """Rails of a JetPack 4 IIO device folder (``.../6-0040``): ``iio:device*/rail_name_<n>`` with
    ``in_power<n>_input`` (mW); ``NC`` rails skipped."""
    rails = {}
    for iio in sorted(Path(device).glob('iio:device*')):
        for label in sorted(iio.glob('rail_name_*')):
            n = label.name.rsplit('_', 1)[1]
            name = _read(label)
            if not n.isdigit() or name in ('', 'NC'):
                continue
            power = iio / f'in_power{n}_input'
            if power.exists():
                rails.setdefault(name, Ina3221Rail(name, power_file=power))
            elif (iio / f'in_voltage{n}_input').exists() and (iio / f'in_current{n}_input').exists():
                rails.setdefault(name, Ina3221Rail(name, voltage_file=iio / f'in_voltage{n}_input',
                                                   current_file=iio / f'in_current{n}_input'))
    return rails


def ina3221_hwmon_rails(device):
    """Rails of a JetPack 5+ device folder: ``hwmon/hwmon*/in<N>_label`` with ``in<N>_input`` (mV) and
    ``curr<N>_input`` (mA). Channel 7 (sum of shunt voltages) and rails labelled ``NC`` are skipped."""
    rails = {}
    for hwmon in sorted(Path(device).glob('hwmon/hwmon*')):
        for label in sorted(hwmon.glob('in*_label')):
            m = re.fullmatch(r'in(\d+)_label', label.name)
            if m is None or m.group(1) == '7':
                continue
            n, name = m.group(1), _read(label)
            volt, curr = hwmon / f'in{n}_input', hwmon / f'curr{n}_input'
            if name in ('', 'NC') or name.lower().startswith('sum') or not (volt.exists() and curr.exists()):
                continue
            rails.setdefault(name, Ina3221Rail(name, voltage_file=volt, current_file=curr))
    return rails


def ina3221_rails(sys_root='/sys'):
    """Every named INA3221 rail under ``sys_root``, JetPack 4 and 5+ layouts alike: ``{name: Ina3221Rail}``."""
    rails = {}
    for dev in find_ina3221(sys_root):
        for name, r in {**ina3221_iio_rails(dev), **ina3221_hwmon_rails(dev)}.items():
            rails.setdefault(name, r)
    return rails


def read_ina3221(sys_root='/sys'):
    """One reading of every INA3221 rail: ``{name: mW}``."""
    return {name: r.read_mw() for name, r in ina3221_rails(sys_root).items()}


# ---------------------------------------------------------------------------------------------------------------------
# RAPL (a PC off the Jetson)

def rapl_zones(sys_root='/sys'):
    """Top-level RAPL zones (``intel-rapl:0``, ``intel-rapl:1``; their subzones ``intel-rapl:0:0`` are inside them
    and would be counted twice)."""
    root = Path(sys_root) / 'class' / 'powercap'
    return [z for z in sorted(root.glob('intel-rapl:*')) if re.fullmatch(r'intel-rapl:\d+', z.name)]


def read_rapl(sys_root='/sys'):
    """``{zone: (energy_uj, max_energy_range_uj)}`` of the top-level zones; raises PermissionError where the
    counters are root-only (Linux 5.10+, CVE-2020-8694)."""
    out = {}
    for z in rapl_zones(sys_root):
        name = _read(z / 'name') if (z / 'name').exists() else z.name
        out[f'{z.name}:{name}'] = (int(_read(z / 'energy_uj')), int(_read(z / 'max_energy_range_uj')))
    return out


def rapl_delta_uj(prev, cur, max_range):
    """Energy between two readings of one counter, which wraps to 0 after ``max_range``."""
    return cur - prev if cur >= prev else cur + max_range - prev


# ---------------------------------------------------------------------------------------------------------------------
# Sources: open(interval_s), read() -> (t, mW) or None, close(). A paced source blocks in read() until its next value.

class _Source:
    kind, label, paced = 'none', '', False

    def open(self, interval_s):
        pass

    def read(self):
        return None

    def close(self):
        pass

    @property
    def name(self):
        return f'{self.kind}:{self.label}' if self.label else self.kind


class SysfsSource(_Source):
    kind = 'sysfs'

    def __init__(self, sys_root='/sys', rail=None):
        self.sys_root, self.rail = sys_root, rail

    def open(self, interval_s):
        rails = ina3221_rails(self.sys_root)
        if not rails:
            raise SourceUnavailable(f'no INA3221 monitor under {self.sys_root}/bus/i2c')
        total = ('sum', None) if self.rail == 'sum' else board_total(rails, self.rail)
        if total is None:
            raise SourceUnavailable(f'INA3221 rails {sorted(rails)} have no '
                                    f'{self.rail or "board total (" + "/".join(BOARD_TOTAL_RAILS) + ")"}; '
                                    'pass rail=NAME or rail=sum')
        self.label = total[0]
        self._rails = list(rails.values()) if total[1] is None else [total[1]]
        self._rails[0].read_mw()  # fail here, not in the sampling thread, if unreadable

    def read(self):
        t = time.perf_counter()
        mw = sum(r.read_mw() for r in self._rails)
        return (t + time.perf_counter()) / 2, mw


class TegrastatsSource(_Source):
    kind, paced = 'tegrastats', True

    def __init__(self, exe='tegrastats', rail=None):
        self.exe, self.rail, self._proc = exe, rail, None

    def open(self, interval_s):
        path = shutil.which(self.exe)
        if path is None:
            raise SourceUnavailable(f'{self.exe} not found')
        self._proc = subprocess.Popen([path, '--interval', str(max(1, round(interval_s * 1000)))], bufsize=1,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)

    def read(self):
        line = self._proc.stdout.readline()
        t = time.perf_counter()
        if not line:
            raise EOFError('tegrastats stopped')
        total = board_total(parse_tegrastats_line(line), self.rail)
        if total is None:
            return None
        self.label = total[0]
        return t, total[1][0]

    def close(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class JtopSource(_Source):
    """jetson-stats' board total. Only the total: a chosen rail is read directly (sysfs, tegrastats), and a board
    whose rails include no total (AGX Xavier, AGX Orin) is refused, since jetson-stats 4 then reports the sum of
    every rail it sees, I/O rails included, as 'tot'."""
    kind, label = 'jtop', 'tot'

    def __init__(self, rail=None):
        self.rail, self._jetson = rail, None

    def open(self, interval_s):
        if self.rail:
            raise SourceUnavailable(f'jtop gives the board total only; rail {self.rail!r} is read directly '
                                    '(sysfs or tegrastats)')
        try:
            from jtop import jtop
        except ImportError as e:
            raise SourceUnavailable('jetson-stats (jtop) not installed') from e
        try:
            self._jetson = jtop(interval=max(interval_s, 0.1))
            self._jetson.start()
            self.read()
            power = self._jetson.power
            rails = power.get('rail') if isinstance(power, dict) else None
            if rails is not None and not any(r in rails for r in BOARD_TOTAL_RAILS):
                raise SourceUnavailable(f'jtop\'s total here is the sum of every rail ({", ".join(sorted(rails))}): '
                                        'no board-total rail; choose one with rail=NAME or rail=sum')
        except SourceUnavailable:
            self.close()
            raise
        except Exception as e:  # JtopException when the service is down; KeyError on a board with no total
            self.close()
            raise SourceUnavailable(f'jtop gave no total power: {type(e).__name__}: {e}') from e

    def read(self):
        power = self._jetson.power
        if isinstance(power, tuple):  # jetson-stats 3.x: (total, rails), total = {'cur': mW, 'avg': mW}
            return time.perf_counter(), float(power[0]['cur'])
        return time.perf_counter(), float(power['tot']['power'])

    def close(self):
        if self._jetson is not None:
            self._jetson.close()
            self._jetson = None


class RaplSource(_Source):
    kind = 'rapl'

    def __init__(self, sys_root='/sys'):
        self.sys_root = sys_root

    def open(self, interval_s):
        if not rapl_zones(self.sys_root):
            raise SourceUnavailable(f'no RAPL zones under {self.sys_root}/class/powercap')
        try:
            self._prev = read_rapl(self.sys_root), time.perf_counter()
        except PermissionError as e:
            raise SourceUnavailable('RAPL energy_uj is not readable (root only since Linux 5.10)') from e
        self.label = '+'.join(self._prev[0])

    def read(self):
        (prev, t0), cur, t1 = self._prev, read_rapl(self.sys_root), time.perf_counter()
        if t1 - t0 < 0.005:  # the counters tick about once a millisecond: too short to be a power reading
            return None
        self._prev = cur, t1
        uj = sum(rapl_delta_uj(prev[z][0], cur[z][0], cur[z][1]) for z in cur if z in prev)
        return (t0 + t1) / 2, uj / (t1 - t0) / 1000.0  # the mean over the interval, placed at its middle


def open_source(kind='auto', interval_s=0.1, sys_root='/sys', rail=None, tegrastats='tegrastats'):
    """An opened source and the reasons the ones tried before it were skipped. ``auto`` ends at ``none``."""
    makers = {'jtop': lambda: JtopSource(rail), 'sysfs': lambda: SysfsSource(sys_root, rail),
              'tegrastats': lambda: TegrastatsSource(tegrastats, rail), 'rapl': lambda: RaplSource(sys_root),
              'none': _Source}
    order = ('jtop', 'sysfs', 'tegrastats', 'rapl', 'none') if kind == 'auto' else (kind,)
    skipped = []
    for k in order:
        src = makers[k]()
        try:
            src.open(interval_s)
            return src, skipped
        except SourceUnavailable as e:
            if kind != 'auto':
                raise
            skipped.append(f'{k}: {e}')
    raise AssertionError('unreachable')


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


def jetson_model(sys_root='/'):
    """The board's name from the device tree (``NVIDIA Jetson Nano Developer Kit``), or None off a Jetson."""
    for path in ('proc/device-tree/model', 'sys/firmware/devicetree/base/model'):
        try:
            model = (Path(sys_root) / path).read_text().strip('\x00\n ')
        except OSError:
            continue
        if 'jetson' in model.lower() or (Path(sys_root) / 'etc/nv_tegra_release').exists():
            return model
    return None


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
