"""Emulated slow devices: limit a process to a fraction of one CPU core with the kernel's CFS bandwidth quota.

    limit = limit_cpu(0.25)   # this process (all its threads) now gets at most 25% of one core
    ...
    limit.remove()            # back to the group it came from; its own group is deleted (also done at exit)

    with limit_cpu(0.25):     # or for a block only
        ...

    limit_cpu(0.25, reserve=True)   # also a claim on that much CPU while other jobs compete for it

A quota caps a process; it does not give it anything on a busy machine. ``reserve=True`` also sets the group's CFS
weight (v1 ``cpu.shares``, v2 ``cpu.weight``) to RESERVE_TASKS default processes' worth per core of quota, so the
emulated device gets its fraction while up to about that many other busy processes per core compete, and never more
than its quota: emulated devices whose quotas sum to the machine's cores can take all of it while they run.

A child cgroup ``devit-<pid>`` is made under the ``cpu`` controller: cgroup v1 (``/sys/fs/cgroup/cpu``,
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) or cgroup v2 (``/sys/fs/cgroup``, ``cpu.max``; ``cpu`` is added to the
root's ``cgroup.subtree_control`` when it is missing there). The period is 10 ms, short next to a forward pass, so a
throttled model runs slowly and evenly instead of at full speed for 25 ms and then not at all for 75. Below 0.1 of a
core the period grows instead (the kernel's smallest quota is 1 ms), up to 1 s: 0.01 is 1 ms every 100 ms. Writing there
needs root (or a delegated cgroup); where it is not possible, ``QuotaError`` says why in one line.

Device-side module: Python 3.6+, standard library only.
"""
import atexit
import math
import os

PERIOD_US = 10000
MIN_QUOTA_US = 1000  # the kernel's lower bound for cfs_quota_us
MAX_PERIOD_US = 1000000  # and its upper bound for cfs_period_us
RESERVE_TASKS = 64  # reserve=True: weight of this many default processes per core of quota
DEFAULT_WEIGHT = {'v1': 1024, 'v2': 100}  # cpu.shares / cpu.weight of a default process or group
MAX_WEIGHT = {'v1': 262144, 'v2': 10000}
V1_ROOT = '/sys/fs/cgroup/cpu'
V2_ROOT = '/sys/fs/cgroup'
PREFIX = 'devit-'


class QuotaError(RuntimeError):
    """CPU quotas cannot be set here (no writable cpu controller) or the fraction is out of range."""


def _read(path):
    with open(path) as f:
        return f.read().strip()


def _write(path, text):
    with open(path, 'w') as f:
        f.write(text)


def controller():
    """('v1' or 'v2', root folder) of a writable cpu controller; QuotaError naming what is missing otherwise."""
    if os.path.isfile(os.path.join(V1_ROOT, 'cpu.cfs_quota_us')):
        root, version = V1_ROOT, 'v1'
    elif os.path.isfile(os.path.join(V2_ROOT, 'cgroup.controllers')):
        root, version = V2_ROOT, 'v2'
        if 'cpu' not in _read(os.path.join(V2_ROOT, 'cgroup.controllers')).split():
            raise QuotaError(f'cgroup v2 at {V2_ROOT} has no cpu controller')
    else:
        raise QuotaError(f'no cgroup cpu controller is mounted ({V1_ROOT} or {V2_ROOT} with cpu)')
    if not os.access(root, os.W_OK):
        raise QuotaError(f'the cgroup cpu controller at {root} is not writable (run as root or delegate a cgroup)'
                         )
    if version == 'v2':
        _enable_v2_cpu(root)
    return version, root


def _enable_v2_cpu(root):
    """Child groups of a v2 root get the cpu controller only once the root lists it in its subtree_control."""
    control = os.path.join(root, 'cgroup.subtree_control')
    try:
        if 'cpu' not in _read(control).split():
            _write(control, '+cpu')
    except OSError as err:
        raise QuotaError(f'cannot enable the cpu controller for child groups in {control}: '
                         f'{err.strerror or err}') from None


def unavailable_reason():
    """None where quotas work, else the one-line reason (tests skip with it)."""
    try:
        controller()
    except QuotaError as err:
        return str(err)
    return None


def quota_us(fraction, period_us=PERIOD_US):
    """(CFS quota, period) in µs for `fraction` of one core (may exceed 1 for several cores); below
    MIN_QUOTA_US / period_us of a core the period is lengthened so that the quota stays at the kernel's minimum."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise QuotaError(f'a CPU quota must be a number (fraction of one core), got {fraction!r}') from None
    fraction = value
    if not math.isfinite(fraction):
        raise QuotaError(f'a CPU quota must be a finite number (fraction of one core), got {fraction}')
    if not fraction > 0:
        raise QuotaError(f'a CPU quota must be > 0 (fraction of one core), got {fraction}')
    if fraction * period_us < MIN_QUOTA_US:
        period_us = int(round(MIN_QUOTA_US / fraction))
        if period_us > MAX_PERIOD_US:
            raise QuotaError(f'a CPU quota of {fraction} is below the kernel minimum of '
                             f'{MIN_QUOTA_US / MAX_PERIOD_US:g} of a core')
    return max(int(round(fraction * period_us)), MIN_QUOTA_US), period_us


def _group_of(pid, version, root):
    """The cpu cgroup folder `pid` is in now (from /proc/PID/cgroup), so that `remove` can put it back there."""
    try:
        lines = _read(f'/proc/{pid}/cgroup').splitlines()
    except OSError:
        return root
    for line in lines:
        _, controllers, path = line.split(':', 2)
        if (version == 'v2' and controllers == '') or (version == 'v1' and 'cpu' in controllers.split(',')):
            folder = os.path.join(root, path.lstrip('/'))
            return folder if os.path.isdir(folder) else root
    return root


def _members(group):
    try:
        return _read(os.path.join(group, 'cgroup.procs')).split()
    except OSError:
        return []


def remove_stale(root=None):
    """Delete empty devit-* groups that killed processes left behind. Returns the removed paths."""
    if root is None:
        root = controller()[1]
    removed = []
    for name in os.listdir(root):
        group = os.path.join(root, name)
        if name.startswith(PREFIX) and os.path.isdir(group) and not _members(group):
            try:
                os.rmdir(group)
                removed.append(group)
            except OSError:
                pass
    return removed


class CpuLimit:
    """A process held in its own cgroup at `fraction` of a core. `remove()` undoes it (registered at exit); as a
    context manager it is removed at the end of the block."""

    def __init__(self, fraction, pid=None, reserve=False):
        quota, period = quota_us(fraction)
        self.reserve = bool(reserve)
        self.fraction = float(fraction)
        self.pid = os.getpid() if pid is None else int(pid)
        self.version, self.root = controller()
        remove_stale(self.root)
        self.origin = _group_of(self.pid, self.version, self.root)
        self.path = os.path.join(self.root, f'{PREFIX}{self.pid}')
        try:
            os.makedirs(self.path, exist_ok=True)
            if self.version == 'v1':
                # The quota first: the kernel refuses a period under which the current quota would not fit.
                _write(os.path.join(self.path, 'cpu.cfs_quota_us'), '-1')
                _write(os.path.join(self.path, 'cpu.cfs_period_us'), str(period))
                _write(os.path.join(self.path, 'cpu.cfs_quota_us'), str(quota))
            else:
                _write(os.path.join(self.path, 'cpu.max'), f'{quota} {period}')
            if self.reserve:
                _write(os.path.join(self.path, 'cpu.shares' if self.version == 'v1' else 'cpu.weight'),
                       str(reserve_weight(self.fraction, self.version)))
            _write(os.path.join(self.path, 'cgroup.procs'), str(self.pid))  # every thread of the process
        except OSError as err:
            self._rmdir()
            raise QuotaError(f'cannot limit pid {self.pid} to {fraction} of a core in {self.path}: '
                             f'{err.strerror or err}') from None
        if self.pid == os.getpid():
            atexit.register(self.remove)

    def remove(self):
        """Move the process back to the group it came from and delete its own group (best effort: a process that
        has exited has left the group already, and the group may be gone)."""
        if os.path.isdir(self.path):
            for group in (self.origin, self.root):
                try:
                    _write(os.path.join(group, 'cgroup.procs'), str(self.pid))
                    break
                except OSError:
                    continue
            self._rmdir()

    def stat(self):
        """The group's cpu.stat as a dict of ints (nr_periods, nr_throttled, throttled_time or throttled_usec)."""
        try:
            text = _read(os.path.join(self.path, 'cpu.stat'))
        except OSError:
            return {}
        return {k: int(v) for k, v in (line.split() for line in text.splitlines() if len(line.split()) == 2)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def _rmdir(self):
        try:
            os.rmdir(self.path)
        except OSError:
            pass

    def __repr__(self):
        return f'CpuLimit(pid={self.pid}, fraction={self.fraction}, {self.path})'


def reserve_weight(fraction, version):
    """CFS weight of a group reserving `fraction` of a core (see the module docstring)."""
    weight = int(round(fraction * RESERVE_TASKS * DEFAULT_WEIGHT[version]))
    return max(2 if version == 'v1' else 1, min(weight, MAX_WEIGHT[version]))


def limit_cpu(fraction, pid=None, reserve=False):
    """Hold process `pid` (default: this one) to `fraction` of one core (and, with `reserve`, claim that much);
    returns the CpuLimit."""
    return CpuLimit(fraction, pid, reserve)
