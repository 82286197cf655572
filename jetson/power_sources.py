"""Where a board's (or a PC's) power is read: tegrastats lines, the INA3221 rails in sysfs, jtop, RAPL; each source
opened at an interval and read one (t, mW) sample at a time (``open_source``). Which source to use and what
each reads: jetson/power.py.

Standard library only, down to Python 3.6 (JetPack 4's system python3).
"""
import re
import shutil
import subprocess
import time
from pathlib import Path

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
