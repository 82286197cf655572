"""Emulated slow devices: limit a process to a fraction of one CPU core with the kernel's CFS bandwidth quota.

    limit = limit_cpu(0.25)   # this process (all its threads) now gets at most 25% of one core
    ...
    limit.remove()            # back to the parent group; the group is deleted (also done at exit)

A child cgroup ``devit-<pid>`` is made under the ``cpu`` controller: cgroup v1 (``/sys/fs/cgroup/cpu``,
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) or cgroup v2 (``/sys/fs/cgroup`` with ``cpu`` in
``cgroup.subtree_control``, ``cpu.max``). The period is 10 ms, short next to a forward pass, so a throttled model
runs slowly and evenly instead of at full speed for 25 ms and then not at all for 75. Below 0.1 of a core the
period grows instead (the kernel's smallest quota is 1 ms), up to 1 s: 0.01 is 1 ms every 100 ms. Writing there
needs root (or a delegated cgroup); where it is not possible, ``QuotaError`` says why in one line.

Device-side module: Python 3.6+, standard library only.
"""
import atexit
import errno
import os

PERIOD_US = 10000
MIN_QUOTA_US = 1000  # the kernel's lower bound for cfs_quota_us
MAX_PERIOD_US = 1000000  # and its upper bound for cfs_period_us
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
        raise QuotaError(f'the cgroup cpu controller at {root} is not writable (run as root or delegate a cgroup)')
    return version, root


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
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise QuotaError(f'a CPU quota must be a number (fraction of one core), got {fraction!r}') from None
    if not fraction > 0:
        raise QuotaError(f'a CPU quota must be > 0 (fraction of one core), got {fraction}')
    if fraction * period_us < MIN_QUOTA_US:
        period_us = int(round(MIN_QUOTA_US / fraction))
        if period_us > MAX_PERIOD_US:
            raise QuotaError(f'a CPU quota of {fraction} is below the kernel minimum of '
                             f'{MIN_QUOTA_US / MAX_PERIOD_US:g} of a core')
    return max(int(round(fraction * period_us)), MIN_QUOTA_US), period_us


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
    """A process held in its own cgroup at `fraction` of a core. `remove()` undoes it (registered at exit)."""

    def __init__(self, fraction, pid=None):
        self.fraction = float(fraction)
        self.pid = os.getpid() if pid is None else int(pid)
        self.version, self.root = controller()
        quota, period = quota_us(fraction)
        remove_stale(self.root)
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
            _write(os.path.join(self.path, 'cgroup.procs'), str(self.pid))  # every thread of the process
        except OSError as err:
            self._rmdir()
            raise QuotaError(f'cannot limit pid {self.pid} to {fraction} of a core in {self.path}: '
                             f'{err.strerror or err}') from None
        if self.pid == os.getpid():
            atexit.register(self.remove)

    def remove(self):
        """Move the process back to the root group and delete its group (best effort: it may be gone already)."""
        if os.path.isdir(self.path):
            try:
                _write(os.path.join(self.root, 'cgroup.procs'), str(self.pid))
            except OSError as err:
                if err.errno != errno.ESRCH:  # a process that has exited has left the group already
                    pass
            self._rmdir()

    def _rmdir(self):
        try:
            os.rmdir(self.path)
        except OSError:
            pass

    def __repr__(self):
        return f'CpuLimit(pid={self.pid}, fraction={self.fraction}, {self.path})'


def limit_cpu(fraction, pid=None):
    """Hold process `pid` (default: this one) to `fraction` of one core; returns the CpuLimit."""
    return CpuLimit(fraction, pid)
