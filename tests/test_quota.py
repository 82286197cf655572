"""collab/quota.py (CFS quota per process) and jetson/profile.py (device profiles, also under a quota), as real
processes. The quota tests skip, saying why, where no writable cgroup cpu controller exists."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import ROOT, env, error_lines, free_port, run

from collab import quota
from collab.profiles import read_profile

NO_QUOTA = quota.unavailable_reason()
needs_quota = pytest.mark.skipif(NO_QUOTA is not None, reason=f'CPU quotas unavailable: {NO_QUOTA}')

# A child that limits itself, then reports as JSON; QUOTA is loaded from its file so the child stays light.
CHILD = textwrap.dedent('''
    import importlib.util, json, os, sys, time
    spec = importlib.util.spec_from_file_location('q', os.path.join({root!r}, 'collab', 'quota.py'))
    quota = importlib.util.module_from_spec(spec); spec.loader.exec_module(quota)

    def busy(seconds):
        """Work units done in `seconds` of wall time, and the CPU seconds they took."""
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            for _ in range(2000):
                n += 1
        return n, time.perf_counter() - t0, time.process_time() - c0
''')


def child(body, timeout=60):
    code = CHILD.format(root=ROOT) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=timeout, env=env())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_quota
def test_quota_throttles_a_busy_loop():
    # Speed unthrottled = work per CPU second (what the loop does when it has a core, however loaded this machine is);
    # speed throttled = work per wall second under the quota.
    out = child('''
        n, wall, cpu = busy(1.0)
        free = n / cpu
        limit = quota.limit_cpu(0.25)
        n, wall, cpu = busy(2.0)
        print(json.dumps({'free': free, 'throttled': n / wall, 'cpu_share': cpu / wall, 'stat': limit.stat(),
                          'group': limit.path}))
    ''')
    assert out['throttled'] <= 0.35 * out['free'], out
    assert out['cpu_share'] <= 0.3, out
    assert out['stat']['nr_throttled'] > 0, out  # the kernel did hold it back
    assert not os.path.exists(out['group'])  # removed at exit


@pytest.mark.parametrize('fraction', [0, -0.5, 'abc', None, float('nan'), float('inf'), 0.0001])
def test_bad_fractions_are_refused(fraction):
    with pytest.raises(quota.QuotaError, match='quota'):
        quota.limit_cpu(fraction)
    if NO_QUOTA is None:
        assert not os.path.exists(os.path.join(quota.controller()[1], f'{quota.PREFIX}{os.getpid()}'))


@needs_quota
def test_group_is_removed_by_remove_at_exit_and_after_a_kill():
    out = child('''
        limit = quota.limit_cpu(0.5)
        inside = os.path.isdir(limit.path) and str(os.getpid()) in open(os.path.join(limit.path, 'cgroup.procs')).read()
        limit.remove()
        with quota.limit_cpu(0.5, reserve=True) as again:
            in_block = os.path.isdir(again.path)
            weight = open(os.path.join(again.path, 'cpu.shares' if again.version == 'v1' else 'cpu.weight')).read()
        print(json.dumps({'inside': inside, 'after': os.path.exists(limit.path), 'in_block': in_block,
                          'after_block': os.path.exists(again.path),
                          'back': 'devit-' not in open('/proc/self/cgroup').read(),
                          'weight': int(weight) == quota.reserve_weight(0.5, again.version)}))
    ''')
    assert out == {'inside': True, 'after': False, 'in_block': True, 'after_block': False, 'back': True,
                   'weight': True}

    at_exit = child('''
        limit = quota.limit_cpu(0.5)
        print(json.dumps({'group': limit.path, 'made': os.path.isdir(limit.path)}))
    ''')
    assert at_exit['made'] and not os.path.exists(at_exit['group'])

    # SIGKILL skips atexit: the empty group stays until the next limit (or remove_stale) clears it
    code = CHILD.format(root=ROOT) + 'quota.limit_cpu(0.5); print("ready", flush=True); time.sleep(60)\n'
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout.readline().strip() == 'ready'
    group = os.path.join(quota.controller()[1], f'{quota.PREFIX}{proc.pid}')
    assert os.path.isdir(group)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while quota._members(group) and time.time() < deadline:  # the kernel empties the group as the process goes
        time.sleep(0.05)
    assert group in quota.remove_stale()
    assert not os.path.exists(group)


@needs_quota
def test_worker_cpu_reserve_claims_its_quota(tmp_path):
    """``python -m collab.worker --cpu-quota 0.5 --cpu-reserve``: the worker's own group has the quota and the reserve
    weight (collab_infer.py --cpu-reserve hands the same flag to its ranks)."""
    from collab_fixtures import save_ensemble

    ckpt = save_ensemble(tmp_path / 'ensemble.pth', 1)
    cmd = [sys.executable, '-m', 'collab.worker', '--aggregator', f'tcp://127.0.0.1:{free_port()}', '--device-index',
           '0', '--model-path', ckpt, '--device', 'cpu', '--cpu-quota', '0.5', '--cpu-reserve', '--startup-timeout',
           '60']
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    version, root = quota.controller()
    group = os.path.join(root, f'{quota.PREFIX}{proc.pid}')
    try:
        deadline = time.time() + 30
        while str(proc.pid) not in quota._members(group) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        weight = int(quota._read(os.path.join(group, 'cpu.shares' if version == 'v1' else 'cpu.weight')))
        if version == 'v1':
            limit = (int(quota._read(os.path.join(group, 'cpu.cfs_quota_us')))
                     / int(quota._read(os.path.join(group, 'cpu.cfs_period_us'))))
        else:
            q, period = quota._read(os.path.join(group, 'cpu.max')).split()
            limit = int(q) / int(period)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert weight == quota.reserve_weight(0.5, version) and limit == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------------
# jetson.profile

def profile_cmd(out, *extra):
    return [sys.executable, '-m', 'jetson.profile', '--output', str(out), '--threads', '1', '--warmup', '2',
            '--iters', '8', *extra]


TINY_GRID = ['--input-size', '32', '--widths', '32', '64', '--depths', '1', '2', '--head-dim', '32',
             '--model-kwargs', 'patch_size=8']
# one candidate of about 15 ms of CPU: long next to the 10 ms CFS period, so a quota slows every forward evenly
BUSY_GRID = ['--input-size', '112', '--widths', '192', '--depths', '4', '--head-dim', '32', '--model-kwargs',
             'patch_size=8', '--backend', 'torch']


def test_profile_of_a_tiny_grid_is_valid(tmp_path):
    out = tmp_path / 'dev.json'
    proc = run(profile_cmd(out, *TINY_GRID, '--link', '1000', '--rounds', '3'), timeout=240)
    assert 'wrote' in proc.stdout
    prof = read_profile(str(out))
    assert [(c['width'], c['depth']) for c in prof['candidates']] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    assert [c['num_heads'] for c in prof['candidates']] == [1, 1, 2, 2]
    assert prof['model'] == 'dedeit' and prof['model_kwargs'] == {'patch_size': 8, 'img_size': 32, 'in_chans': 3}
    assert prof['family_default'] == {'width': 192, 'depth': 12} and prof['link']['mbps'] == 1000
    assert prof['memory']['total_mb'] >= prof['memory']['available_mb'] > 0
    for c in prof['candidates']:
        assert set(c['latency_ms']) == {'torch', 'onnxruntime'}  # both backends are installed here
        assert all(t['iters'] == 8 for t in c['latency_ms'].values())  # 3 + 3 + 2 over the rounds
        assert c['token_floats'] == 2 * c['width']  # dedeit sends cls + dist
    params = {(c['width'], c['depth']): c['params'] for c in prof['candidates']}
    assert params[(32, 1)] < params[(32, 2)] < params[(64, 2)] and params[(64, 1)] < params[(64, 2)]


def test_profile_bad_input_is_one_error_line(tmp_path):
    out = tmp_path / 'dev.json'
    for extra, fragment in ((['--widths', '100', '--head-dim', '32'], 'divisible'),
                            (['--model-kwargs', 'depth=3'], '--model-kwargs'),
                            (['--cpu-quota', '0'], 'quota'),
                            (['--link', 'tcp://127.0.0.1:1'], 'link-server')):
        proc = run(profile_cmd(out, *TINY_GRID[:2], *extra), check=False, timeout=240)
        assert proc.returncode == 2, proc.stderr
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and fragment in lines[0], proc.stderr
        assert 'Traceback' not in proc.stderr
        assert not out.exists()


@needs_quota
def test_profile_under_a_quota_measures_the_throttled_device(tmp_path):
    free, slow = tmp_path / 'free.json', tmp_path / 'slow.json'
    run(profile_cmd(free, *BUSY_GRID), timeout=240)
    run(profile_cmd(slow, *BUSY_GRID, '--cpu-quota', '0.25'), timeout=240)
    a, b = read_profile(str(free)), read_profile(str(slow))
    assert a['cpu_quota'] is None and b['cpu_quota'] == 0.25 and b['throttled_periods'] > 0
    fa, fb = a['candidates'][0]['latency_ms']['torch'], b['candidates'][0]['latency_ms']['torch']
    # a quarter of a core: a forward takes at least 2.5x the CPU time it needs, however loaded the machine is
    assert fb['median'] >= 2.5 * fa['cpu_median'], (fa, fb)
    if fa['median'] < 2 * fa['cpu_median']:  # the unthrottled run had at least half a core (not so on a busy machine)
        assert fb['median'] > 1.5 * fa['median'], (fa, fb)


def test_device_side_modules_run_on_python_36():
    """A Jetson Nano's JetPack 4 has Python 3.6: the profiler and the quota must not need more."""
    pytest.importorskip('vermin')
    files = [os.path.join(ROOT, 'jetson', 'profile.py'), os.path.join(ROOT, 'collab', 'quota.py')]
    proc = run([sys.executable, '-c', 'import sys, vermin; sys.exit(vermin.main())', '--target=3.6-',
                '--eval-annotations', '--no-tips', '--violations', *files], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
