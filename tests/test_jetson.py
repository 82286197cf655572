"""jetson/: tegrastats parsing, INA3221/RAPL readers on fake sysfs trees, energy integration, and the scripts' CLIs.

Everything runs off a Jetson: sysfs roots point into tmp_path, tegrastats is a shell script printing recorded lines.
"""
import csv
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from jetson import power, power_sources

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / 'jetson' / 'setup.sh'
RUN_COLLAB = REPO / 'jetson' / 'run_collab.sh'

# Recorded tegrastats lines.
NANO = ('RAM 2403/3956MB (lfb 3x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) '
        'CPU [12%@1479,4%@1479,3%@1479,5%@1479] EMC_FREQ 5%@1600 GR3D_FREQ 0%@921 APE 25 PLL@27C CPU@29.5C '
        'PMIC@100C GPU@28.5C AO@35.5C thermal@28.75C POM_5V_IN 2132/2132 POM_5V_GPU 78/78 POM_5V_CPU 275/275')
ORIN = ('11-25-2024 17:05:00 RAM 2904/62841MB (lfb 14777x4MB) SWAP 0/31421MB (cached 0MB) '
        'CPU [1%@729,0%@729,2%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 '
        'cpu@45.5C soc2@42.1C tj@46.2C VDD_IN 17946mW/15710mW VDD_CPU_GPU_CV 8896mW/7585mW VDD_SOC 3923mW/3515mW')
TX2 = ('RAM 1789/7852MB (lfb 1237x4MB) SWAP 0/3926MB (cached 0MB) CPU [2%@345,off,off,1%@345,0%@345,1%@345] '
       'EMC_FREQ 0%@1866 GR3D_FREQ 0%@114 APE 150 PLL@38C MCPU@38C PMIC@100C Tboard@33C GPU@36C BCPU@38C '
       'thermal@37.1C Tdiode@35C VDD_SYS_GPU 152/152 VDD_SYS_SOC 457/457 VDD_4V0_WIFI 19/19 VDD_IN 5297/5297 '
       'VDD_SYS_CPU 152/152 VDD_SYS_DDR 249/249')
AGX_ORIN = ('RAM 3126/30536MB (lfb 6564x4MB) SWAP 0/15268MB (cached 0MB) CPU [0%@1190,0%@1190] '
            'VDD_GPU_SOC 2387mW/2387mW VDD_CPU_CV 397mW/397mW VIN_SYS_5V0 3230mW/3230mW NC 0mW/0mW '
            'VDDQ_VDD2_1V8AO 303mW/303mW NC 0mW/0mW')


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _run(cmd, **kw):
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=REPO, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# tegrastats

@pytest.mark.parametrize('line,name,cur,avg,rails', [
    (NANO, 'POM_5V_IN', 2132.0, 2132.0, {'POM_5V_IN', 'POM_5V_GPU', 'POM_5V_CPU'}),
    (ORIN, 'VDD_IN', 17946.0, 15710.0, {'VDD_IN', 'VDD_CPU_GPU_CV', 'VDD_SOC'}),
    (TX2, 'VDD_IN', 5297.0, 5297.0,
     {'VDD_SYS_GPU', 'VDD_SYS_SOC', 'VDD_4V0_WIFI', 'VDD_IN', 'VDD_SYS_CPU', 'VDD_SYS_DDR'}),
])
def test_tegrastats_board_total(line, name, cur, avg, rails):
    parsed = power_sources.parse_tegrastats_line(line)
    assert set(parsed) == rails  # RAM/SWAP/IRAM (MB, kB) and the %@MHz fields are not rails
    assert power_sources.board_total(parsed) == (name, (cur, avg))  # the total rail itself, sub-rails not added


def test_tegrastats_sub_rails_and_no_total():
    assert power_sources.parse_tegrastats_line(ORIN)['VDD_SOC'] == (3923.0, 3515.0)
    rails = power_sources.parse_tegrastats_line(AGX_ORIN)
    assert power_sources.board_total(rails) is None  # VIN_SYS_5V0 is an I/O rail, not the total
    assert power_sources.board_total(rails, 'VIN_SYS_5V0') == ('VIN_SYS_5V0', (3230.0, 3230.0))
    assert power_sources.board_total(rails, 'sum') == ('sum', (2387.0 + 397 + 3230 + 303,) * 2)
    assert power_sources.parse_tegrastats_line('RAM 2403/3956MB (lfb 3x4MB) CPU [off,off]') == {}


def test_tegrastats_log_file(tmp_path):
    log = tmp_path / 'tegrastats.log'
    lines = [NANO.replace('POM_5V_IN 2132/2132', f'POM_5V_IN {p}/2132') for p in (2000, 3000, 5000)]
    log.write_text('\n'.join(['garbage line', *lines]) + '\n')
    samples, rail = power_sources.read_tegrastats_log(log, interval_ms=500)
    assert rail == 'POM_5V_IN'
    assert samples == [(0.0, 2000.0), (0.5, 3000.0), (1.0, 5000.0)]
    out = _run([sys.executable, '-m', 'jetson.power', '--parse-file', str(log), '--interval-ms', '500',
                '--json', str(tmp_path / 's.json')])
    assert out.returncode == 0, out.stderr
    s = json.loads((tmp_path / 's.json').read_text())
    assert s['energy_mJ'] == pytest.approx(0.5 * 2500 + 0.5 * 4000)
    assert s['max_power_mW'] == 5000.0


# ---------------------------------------------------------------------------------------------------------------------
# energy

def test_energy_constant():
    samples = [(i * 0.1, 5000.0) for i in range(21)]  # 5 W for 2 s
    assert power.energy_mj(samples, 0.0, 2.0) == pytest.approx(10000.0, rel=1e-12)
    assert power.energy_mj(samples, 0.25, 0.75) == pytest.approx(2500.0, rel=1e-12)  # window between samples
    assert power.energy_mj(samples, -1.0, 0.5) == pytest.approx(7500.0, rel=1e-12)  # before the first: held
    assert power.energy_per_inference_mj(samples, 0.0, 2.0, 100) == pytest.approx(100.0, rel=1e-12)
    assert power.energy_per_inference_mj(samples, 0.0, 2.0, 100, idle_mw=2000.0) == pytest.approx(60.0, rel=1e-12)


def test_energy_linear_ramps():
    up = [(i * 0.1, 1000.0 * i * 0.1) for i in range(21)]  # P = 1000 t mW; trapezoids are exact on lines
    assert power.energy_mj(up, 0.25, 0.75) == pytest.approx(500 * (0.75 ** 2 - 0.25 ** 2), rel=1e-12)
    assert power.energy_mj(up, 0.0, 2.0) == pytest.approx(2000.0, rel=1e-12)
    assert power.energy_mj(up, 1.95, 3.0) == pytest.approx(500 * (2.0 ** 2 - 1.95 ** 2) + 2000.0 * 1.0, rel=1e-12)
    # up then down, samples out of order and sparse: a triangle of height 4000 mW over 2 s
    tri = [(2.0, 0.0), (0.0, 0.0), (1.0, 4000.0)]
    assert power.energy_mj(tri, 0.0, 2.0) == pytest.approx(4000.0, rel=1e-12)
    assert power.energy_mj(tri, 0.5, 1.5) == pytest.approx(3000.0, rel=1e-12)  # edges interpolated at 2000 mW
    assert power.energy_mj(tri, 1.0, 1.0) == 0.0
    with pytest.raises(ValueError):
        power.energy_mj(tri, 1.0, 0.5)
    with pytest.raises(ValueError):
        power.energy_mj([], 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# sysfs readers on fake trees

def fake_nano_iio(root):
    """JetPack 4 Nano: ina3221x at 6-0040 with an IIO device; channel 2 left unconnected for the test."""
    dev = root / 'bus/i2c/devices/6-0040'
    _write(dev / 'name', 'ina3221x\n')
    iio = dev / 'iio:device0'
    for n, (name, mw) in enumerate([('POM_5V_IN', 2132), ('POM_5V_GPU', 78), ('NC', 999)]):
        _write(iio / f'rail_name_{n}', name + '\n')
        _write(iio / f'in_power{n}_input', f'{mw}\n')
    (root / 'bus/i2c/drivers/ina3221x').mkdir(parents=True)
    (root / 'bus/i2c/drivers/ina3221x/6-0040').symlink_to(dev)  # the same device by its driver: found once
    return root


def fake_orin_hwmon(root, vdd_in_mv=5000, vdd_in_ma=3000):
    """JetPack 5+ Orin: ina3221 at 1-0040 with hwmon channels 1..3 and the channel-7 sum."""
    dev = root / 'bus/i2c/devices/1-0040'
    _write(dev / 'name', 'ina3221\n')
    hw = dev / 'hwmon/hwmon3'
    chans = {1: ('VDD_IN', vdd_in_mv, vdd_in_ma), 2: ('VDD_CPU_GPU_CV', 5000, 800), 3: ('NC', 5000, 100),
             7: ('sum of shunt voltages', 40, 9999)}
    for n, (label, mv, ma) in chans.items():
        _write(hw / f'in{n}_label', label + '\n')
        _write(hw / f'in{n}_input', f'{mv}\n')
        _write(hw / f'curr{n}_input', f'{ma}\n')
    _write(root / 'bus/i2c/devices/0-0050/name', 'eeprom\n')  # another i2c device, not a monitor
    return root


def test_ina3221_iio(tmp_path):
    root = fake_nano_iio(tmp_path)
    assert power_sources.read_ina3221(root) == {'POM_5V_IN': 2132.0, 'POM_5V_GPU': 78.0}  # NC skipped
    assert len(power_sources.find_ina3221(root)) == 1


def test_ina3221_hwmon(tmp_path):
    root = fake_orin_hwmon(tmp_path)
    # mV x mA / 1000; NC, ch 7 skipped
    assert power_sources.read_ina3221(root) == {'VDD_IN': 15000.0, 'VDD_CPU_GPU_CV': 4000.0}
    assert power_sources.board_total(power_sources.read_ina3221(root)) == ('VDD_IN', 15000.0)
    assert set(power_sources.ina3221_rails(tmp_path / 'nothing')) == set()


def test_sysfs_monitor(tmp_path):
    root = fake_orin_hwmon(tmp_path, vdd_in_mv=5000, vdd_in_ma=1200)  # 6 W
    csv_path = tmp_path / 'p.csv'
    with power.PowerMonitor('sysfs', interval_ms=10, csv_path=csv_path, sys_root=root) as pm:
        t0 = time.perf_counter()
        time.sleep(0.1)
        t1 = time.perf_counter()
    assert pm.source_name == 'sysfs:VDD_IN' and pm.available and pm.error is None
    assert pm.energy_mj(t0, t1) == pytest.approx(6000.0 * (t1 - t0), rel=1e-9)
    assert pm.energy_per_inference_mj(t0, t1, 10) == pytest.approx(600.0 * (t1 - t0), rel=1e-9)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) >= 3 and {r['source'] for r in rows} == {'sysfs:VDD_IN'}
    assert power.load_csv(csv_path)[0][1] == 6000.0


def test_no_total_rail_needs_choice(tmp_path):
    root = fake_orin_hwmon(tmp_path)
    (root / 'bus/i2c/devices/1-0040/hwmon/hwmon3/in1_label').write_text('VDD_GPU_SOC\n')
    with pytest.raises(power_sources.SourceUnavailable, match='no board total'):
        power.PowerMonitor('sysfs', sys_root=root).__enter__()
    with power.PowerMonitor('sysfs', interval_ms=10, sys_root=root, rail='sum') as pm:
        pass
    assert pm.samples[0][1] == pytest.approx(15000.0 + 4000.0)


def fake_rapl(root, e0, e1=None, max_range=262143328850):
    for zone, e in (('intel-rapl:0', e0), ('intel-rapl:1', e1)):
        if e is None:
            continue
        _write(root / 'class/powercap' / zone / 'name', f'package-{zone[-1]}\n')
        _write(root / 'class/powercap' / zone / 'energy_uj', f'{e}\n')
        _write(root / 'class/powercap' / zone / 'max_energy_range_uj', f'{max_range}\n')
    _write(root / 'class/powercap/intel-rapl:0:0/energy_uj', '123\n')  # a subzone (core): inside the package
    return root


def test_rapl_reader_and_wraparound(tmp_path):
    root = fake_rapl(tmp_path, 1000, 5000)
    assert power_sources.read_rapl(root) == {'intel-rapl:0:package-0': (1000, 262143328850),
                               'intel-rapl:1:package-1': (5000, 262143328850)}
    assert power_sources.rapl_delta_uj(100, 400, 1000) == 300
    assert power_sources.rapl_delta_uj(900, 100, 1000) == 200  # wrapped past max_energy_range_uj

    src = power_sources.RaplSource(root)
    src.open(0.1)
    zone = root / 'class/powercap/intel-rapl:0/energy_uj'
    assert src.read() is None  # a few microseconds after open: too short an interval to give power
    zone.write_text('262143328000\n')  # 262143327000 uJ in zone 0, zone 1 unchanged
    time.sleep(0.01)
    assert src.read()[1] > 0
    zone.write_text('150\n')  # wraps: 850 + 150 uJ
    t_prev = src._prev[1]
    time.sleep(0.01)
    t, mw = src.read()
    assert mw == pytest.approx(1000 / (src._prev[1] - t_prev) / 1000.0)
    assert t_prev < t < src._prev[1]


def test_auto_falls_back_to_latency_only(tmp_path):
    with power.PowerMonitor('auto', sys_root=tmp_path, tegrastats=str(tmp_path / 'no-tegrastats')) as pm:
        pass
    if pm.source_name == 'jtop:tot':  # a Jetson with jetson-stats running: nothing to check here
        return
    assert not pm.available and pm.energy_mj(0.0, 1.0) is None
    assert 'latency only' in pm.note and 'sysfs' in pm.note and 'rapl' in pm.note


def test_tegrastats_process(tmp_path):
    """A running tegrastats is read line by line; its interval is passed on."""
    exe = tmp_path / 'tegrastats'
    exe.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                   f'while true; do echo "{NANO}"; sleep 0.02; done\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    with power.PowerMonitor('tegrastats', interval_ms=20, tegrastats=str(exe)) as pm:
        time.sleep(0.1)
    assert (tmp_path / 'args').read_text().split() == ['--interval', '20']
    assert pm.source_name == 'tegrastats:POM_5V_IN' and len(pm.samples) >= 2
    assert {p for _, p in pm.samples} == {2132.0}


def fake_jtop(monkeypatch, rails, total):
    """jetson-stats 4 as its API looks: jtop(interval).start()/close(), .power = {'rail': {...}, 'tot': {...}}."""
    class FakeJtop:
        def __init__(self, interval=0.5):
            self.power = {'rail': {name: {'power': mw} for name, mw in rails.items()}, 'tot': {'power': total}}

        def start(self):
            pass

        def close(self):
            pass
    module = types.ModuleType('jtop')
    module.jtop = FakeJtop
    monkeypatch.setitem(sys.modules, 'jtop', module)


def test_jtop_total_and_chosen_rail(tmp_path, monkeypatch):
    fake_jtop(monkeypatch, {'VDD_IN': 15000, 'VDD_CPU_GPU_CV': 4000}, total=19000)
    with power.PowerMonitor('auto', interval_ms=10, sys_root=tmp_path) as pm:
        pass
    assert pm.source_name == 'jtop:tot' and pm.samples[0][1] == 19000.0
    # A chosen rail is read directly, never jtop's total: auto skips jtop, explicit jtop refuses.
    root = fake_orin_hwmon(tmp_path)
    with power.PowerMonitor('auto', interval_ms=10, sys_root=root, rail='VDD_CPU_GPU_CV') as pm:
        pass
    assert pm.source_name == 'sysfs:VDD_CPU_GPU_CV' and pm.samples[0][1] == 4000.0
    assert pm.skipped and pm.skipped[0].startswith('jtop:') and 'read directly' in pm.skipped[0]
    with pytest.raises(power_sources.SourceUnavailable, match='read directly'):
        power.PowerMonitor('jtop', rail='VDD_IN').__enter__()


def test_jtop_without_total_rail_is_not_a_total(tmp_path, monkeypatch):
    """AGX Orin: jetson-stats 4 reports the sum of every rail as 'tot'; auto does not take it for the board total."""
    fake_jtop(monkeypatch, {'VDD_GPU_SOC': 2387, 'VDD_CPU_CV': 397, 'VIN_SYS_5V0': 3230}, total=6014)
    with power.PowerMonitor('auto', sys_root=tmp_path, tegrastats=str(tmp_path / 'none')) as pm:
        pass
    assert pm.source_name != 'jtop:tot'
    assert any(s.startswith('jtop:') and 'sum of every rail' in s for s in pm.skipped)


def test_power_cli_jtop_with_rail_one_line(tmp_path):
    r = _run([sys.executable, '-m', 'jetson.power', '--source', 'jtop', '--rail', 'VDD_IN', '--', 'true'])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --source jtop: jtop gives the board total only; rail 'VDD_IN' is read directly (sysfs or tegrastats)"]


# ---------------------------------------------------------------------------------------------------------------------
# CLIs

def test_power_cli_runs_command(tmp_path):
    root = fake_nano_iio(tmp_path / 'sys')
    out_csv, out_json = tmp_path / 'out.csv', tmp_path / 'out.json'
    r = _run([sys.executable, '-m', 'jetson.power', '--source', 'sysfs', '--sys-root', str(root), '--interval-ms', '20',
              '--csv', str(out_csv), '--json', str(out_json), '--inferences', '4', '--', 'sleep', '0.2'])
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) >= 5 and rows[0].keys() >= {'t_s', 'power_mW', 'source'}
    assert {float(x['power_mW']) for x in rows} == {2132.0}
    s = json.loads(out_json.read_text())
    assert s['returncode'] == 0 and s['source'] == 'sysfs:POM_5V_IN' and s['duration_s'] >= 0.2
    assert s['energy_mJ'] == pytest.approx(2132.0 * s['duration_s'])
    assert s['mJ_per_inference'] == pytest.approx(s['energy_mJ'] / 4)
    assert 'energy' in r.stdout


def test_power_cli_latency_only_passes_exit_code(tmp_path):
    r = _run([sys.executable, '-m', 'jetson.power', '--source', 'none', '--csv', str(tmp_path / 'o.csv'),
              '--', sys.executable, '-c', 'raise SystemExit(3)'])
    assert r.returncode == 3
    assert 'latency only' in r.stdout
    assert (tmp_path / 'o.csv').read_text().startswith('t_s,power_mW,source')


def test_latency_cli(tmp_path):
    out = tmp_path / 'lat.json'
    r = _run([sys.executable, '-m', 'jetson.latency', '--model', 'vit_tiny_patch16_224',
              '--model-kwargs', 'img_size=32', 'patch_size=8', 'depth=1', 'num_classes=10', '--input-size', '32',
              '--device', 'cpu', '--warmup', '1', '--iters', '5', '--threads', '1', '--fp16', '--json', str(out)])
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    fp32 = res['results']['fp32']
    assert fp32['iters'] == 5
    assert 0 < fp32['min_ms'] <= fp32['p50_ms'] <= fp32['p90_ms'] <= fp32['p95_ms'] <= fp32['p99_ms'] <= fp32['max_ms']
    assert fp32['std_ms'] >= 0 and fp32['mean_ms'] > 0
    assert res['model'] == 'vit_tiny_patch16_224' and res['model_kwargs']['patch_size'] == 8
    assert res['input_size'] == [1, 3, 32, 32] and res['device'] == 'cpu' and res['torch'] and res['threads'] == 1
    assert 'fp16' in res['skipped'] and 'fp16' not in res['results']  # CPU: fp16 skipped, and said so


def test_latency_checkpoint_prefix(tmp_path):
    """One device's backbone out of an ensemble-style checkpoint: keys under backbones.{i}., no classifier."""
    torch = pytest.importorskip('torch')
    timm = pytest.importorskip('timm')
    from jetson.latency import load_checkpoint
    kw = {'img_size': 16, 'patch_size': 8, 'depth': 1, 'embed_dim': 32, 'num_heads': 2, 'num_classes': 0}
    src = timm.create_model('vit_tiny_patch16_224', **kw)
    ckpt = {'model': {f'backbones.1.{k}': v for k, v in src.state_dict().items()}, 'epoch': 3}
    torch.save(ckpt, tmp_path / 'ens.pth')
    dst = timm.create_model('vit_tiny_patch16_224', **kw)
    load_checkpoint(dst, tmp_path / 'ens.pth', prefix='backbones.1.')
    assert torch.equal(dst.pos_embed, src.pos_embed)
    with pytest.raises(SystemExit, match='missing'):
        load_checkpoint(dst, tmp_path / 'ens.pth', prefix='backbones.0.')


# ---------------------------------------------------------------------------------------------------------------------
# shell scripts

def _off_jetson_env(tmp_path, **extra):
    env = dict(os.environ, NV_TEGRA_RELEASE=str(tmp_path / 'no-release'), DT_MODEL=str(tmp_path / 'no-model'),
               NVPMODEL=str(tmp_path / 'no-nvpmodel'), JETSON_CLOCKS=str(tmp_path / 'no-jetson_clocks'))
    env.update(extra)
    return env


@pytest.mark.parametrize('script', [SETUP, RUN_COLLAB])
def test_shell_syntax(script):
    assert _run(['bash', '-n', str(script)]).returncode == 0
    if shutil.which('shellcheck'):
        r = _run(['shellcheck', str(script)])
        assert r.returncode == 0, r.stdout


def test_setup_off_jetson(tmp_path):
    r = _run(['bash', str(SETUP)], env=_off_jetson_env(tmp_path))
    assert r.returncode == 0 and 'not a Jetson' in r.stdout and 'nothing done' in r.stdout
    r = _run(['bash', str(SETUP), '--dry-run'], env=_off_jetson_env(tmp_path, SUDO='sudo'))
    assert r.returncode == 0 and 'not a Jetson' in r.stdout
    assert f'sudo {tmp_path}/no-nvpmodel -m 1' in r.stdout


NANO_CONF = '< POWER_MODEL ID=0 NAME=MAXN >\nCPU_ONLINE CORE_0 1\n< POWER_MODEL ID=1 NAME=5W >\nCPU_ONLINE CORE_0 1\n'
AGX_ORIN_CONF = ''.join(f'< POWER_MODEL ID={i} NAME={n} >\n' for i, n in enumerate(['MAXN', '15W', '30W', '50W']))


def _fake_board(tmp_path, model, conf, mode=0, mode_name='MAXN'):
    """nvpmodel and jetson_clocks as scripts that log their calls; nvpmodel -q prints mode `mode`."""
    bin_ = tmp_path / 'bin'
    _write(bin_ / 'nvpmodel', f'#!/bin/sh\necho "nvpmodel $*" >> "{tmp_path}/calls"\n'
                              f'[ "$1" = -q ] && printf "NVPM WARN: fan mode is not set!\\nNV Power Mode: {mode_name}'
                              f'\\n{mode}\\n"\nexit 0\n')
    _write(bin_ / 'jetson_clocks', f'#!/bin/sh\necho "jetson_clocks $*" >> "{tmp_path}/calls"\n'
                                   '[ "$1" = --store ] && echo saved > "$2"\nexit 0\n')
    for tool in ('nvpmodel', 'jetson_clocks'):
        (bin_ / tool).chmod(0o755)
    _write(tmp_path / 'model', model + '\0')
    _write(tmp_path / 'nvpmodel.conf', conf)
    return _off_jetson_env(tmp_path, DT_MODEL=str(tmp_path / 'model'), NVPMODEL=str(bin_ / 'nvpmodel'),
                           NVPMODEL_CONF=str(tmp_path / 'nvpmodel.conf'), JETSON_CLOCKS=str(bin_ / 'jetson_clocks'),
                           JETSON_CLOCKS_STORE=str(tmp_path / 'clocks.conf'), SUDO='')


def _calls(tmp_path):
    path = tmp_path / 'calls'
    calls = [c.strip() for c in path.read_text().splitlines()] if path.exists() else []
    path.unlink(missing_ok=True)
    return calls


def test_setup_on_fake_jetson(tmp_path):
    env = _fake_board(tmp_path, 'NVIDIA Jetson Nano Developer Kit', NANO_CONF)
    r = _run(['bash', str(SETUP), '--dry-run', '--mode', '0'], env=env)
    assert r.returncode == 0 and 'would run' in r.stdout and f'{tmp_path}/bin/nvpmodel -m 0' in r.stdout
    assert 'power mode now: MAXN (0); setting mode 0: MAXN' in r.stdout
    assert _calls(tmp_path) == ['nvpmodel -q']  # dry run: only the read-only query
    r = _run(['bash', str(SETUP), '--restore'], env=env)
    assert r.returncode == 1 and 'no saved clocks' in r.stderr
    _calls(tmp_path)

    # The first run saves clocks and the current mode (0) before changing the mode to the Nano's 5 W mode.
    r = _run(['bash', str(SETUP)], env=env)
    assert r.returncode == 0, r.stderr
    assert 'power mode now: MAXN (0); setting mode 1: 5W' in r.stdout
    assert _calls(tmp_path) == ['nvpmodel -q', f'jetson_clocks --store {tmp_path}/clocks.conf', 'nvpmodel -m 1',
                                'jetson_clocks', 'nvpmodel -q']
    assert (tmp_path / 'clocks.conf.nvpmodel').read_text().strip() == '0'
    # A second run keeps that first saved state.
    assert _run(['bash', str(SETUP)], env=env).returncode == 0
    assert _calls(tmp_path) == ['nvpmodel -q', 'nvpmodel -m 1', 'jetson_clocks', 'nvpmodel -q']
    r = _run(['bash', str(SETUP), '--restore'], env=env)
    assert r.returncode == 0, r.stderr
    assert _calls(tmp_path) == ['nvpmodel -q', 'nvpmodel -m 0', f'jetson_clocks --restore {tmp_path}/clocks.conf']

    r = _run(['bash', str(SETUP), '--mode', '7'], env=env)
    assert r.returncode == 2 and 'no power mode 7' in r.stderr and '0=MAXN 1=5W' in r.stderr
    assert _run(['bash', str(SETUP), '--mode', 'x'], env=env).returncode == 2
    assert 'nvpmodel -m' not in ' '.join(_calls(tmp_path))


def test_setup_other_board_needs_mode(tmp_path):
    """Mode 1 is the Nano's 5 W mode; on an AGX Orin it is 15 W: setup.sh does not pick it there."""
    env = _fake_board(tmp_path, 'NVIDIA Jetson AGX Orin Developer Kit', AGX_ORIN_CONF, mode=3, mode_name='50W')
    r = _run(['bash', str(SETUP)], env=env)
    assert r.returncode == 2 and '--mode is required' in r.stderr and '1=15W' in r.stderr
    assert 'nvpmodel -m' not in ' '.join(_calls(tmp_path))
    r = _run(['bash', str(SETUP), '--mode', '2', '--dry-run'], env=env)
    assert r.returncode == 0 and 'power mode now: 50W (3); setting mode 2: 30W' in r.stdout
    assert '(save power mode 3 to' in r.stdout


def test_run_collab_dry_run(tmp_path):
    env = dict(os.environ, MASTER_ADDR='192.168.1.10', NODE_RANK='3', CKPT='ens.pth')
    r = _run(['bash', str(RUN_COLLAB), '--dry-run', '--power', '--dataset', 'IMNET', '--limit', '10', '--backend',
              'onnxruntime', '--fp16-model', '--device', 'tensorrt'], env=env)
    assert r.returncode == 0, r.stderr
    # A board runs the worker alone, with the flags a worker takes (not the aggregator's --dataset / --limit).
    for part in ('-m jetson.power', '--csv power_node3.csv', '-m collab.worker --aggregator tcp://192.168.1.10:29501 '
                 '--device-index 2 --model-path ens.pth --backend onnxruntime --fp16-model --device tensorrt'):
        assert part in r.stdout
    assert 'torch.distributed' not in r.stdout and '--dataset' not in r.stdout
    r = _run(['bash', str(RUN_COLLAB), '--dry-run', '--keys', 'keys', '--dataset', 'IMNET'], env=env)
    assert r.returncode == 0 and '--device-index 2 --model-path ens.pth --keys keys' in r.stdout  # the board's keys
    r = _run(['bash', str(RUN_COLLAB), '--dry-run', '--dataset', 'IMNET', '--limit', '10'],
             env=dict(env, NODE_RANK='0'))
    assert r.returncode == 0 and 'collab_infer.py --collab-port 29501 --model-path ens.pth --dataset IMNET --limit 10' \
        in r.stdout
    r = _run(['bash', str(RUN_COLLAB), '--dry-run'], env=dict(env, MASTER_ADDR='127.0.0.1'))
    assert r.returncode == 2 and 'loopback' in r.stderr  # across hosts a board must dial the aggregator's address
    env.pop('NODE_RANK')
    r = _run(['bash', str(RUN_COLLAB), '--dry-run'], env=env)
    assert r.returncode == 2 and 'NODE_RANK' in r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# onnxruntime latency and TensorRT engines (no PyTorch on the device side)

HIDE_TORCH = ("import runpy, sys; sys.modules.update(torch=None, timm=None, torchvision=None); "
              "sys.argv = ['x'] + sys.argv[1:]; runpy.run_module(sys.argv.pop(1), run_name='__main__')")


def tiny_graph(path, chans=1, size=4, width=6):
    """An export-like graph without PyTorch: image B×C×S×S -> Flatten -> MatMul -> tokens B×W."""
    onnx = pytest.importorskip('onnx')
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((chans * size * size, width), dtype=np.float32), 'w')
    graph = helper.make_graph(
        [helper.make_node('Flatten', ['image'], ['flat']), helper.make_node('MatMul', ['flat', 'w'], ['tokens'])],
        'device0', [helper.make_tensor_value_info('image', TensorProto.FLOAT, ['batch', chans, size, size])],
        [helper.make_tensor_value_info('tokens', TensorProto.FLOAT, ['batch', width])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], ir_version=8), str(path))
    return path


def test_latency_onnxruntime_without_torch(tmp_path):
    pytest.importorskip('onnxruntime')
    model, out = tiny_graph(tmp_path / 'device0.onnx'), tmp_path / 'lat.json'
    r = _run([sys.executable, '-c', HIDE_TORCH, 'jetson.latency', '--backend', 'onnxruntime', '--model', str(model),
              '--provider', 'cpu', '--warmup', '1', '--iters', '5', '--threads', '1', '--fp16', '--json', str(out)])
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    fp32 = res['results']['fp32']
    assert fp32['iters'] == 5 and 0 < fp32['min_ms'] <= fp32['p50_ms'] <= fp32['max_ms']
    assert res['backend'] == 'onnxruntime' and res['provider'] == 'CPUExecutionProvider' and res['torch'] is None
    assert res['input_size'] == [1, 1, 4, 4] and res['params'] == 16 * 6 and res['threads'] == 1
    assert 'fp16' in res['skipped'] and 'fp16' not in res['results']
    r = _run([sys.executable, '-m', 'jetson.latency', '--backend', 'onnxruntime', '--model', str(model),
              '--provider', 'tensorrt', '--iters', '1'])
    assert r.returncode != 0 and 'no TensorrtExecutionProvider' in r.stderr and 'CPUExecutionProvider' in r.stderr


def fake_export(folder, opset=17):
    """The files build_engines reads: manifest.json and the graphs it names (their content is not read)."""
    folder.mkdir(parents=True)
    for f in ('device0.onnx', 'device1.onnx', 'head.onnx'):
        (folder / f).write_bytes(b'onnx')
    manifest = {'format': 'devit-onnx', 'version': 1, 'opset': opset, 'source': 'ens.pth', 'source_kind': 'ensemble',
                'input': {'size': 224, 'channels': 3, 'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]},
                'num_classes': 1000, 'class_names': None, 'distilled': True,
                'operators': ['Add', 'LayerNormalization', 'MatMul'] if opset == 17 else ['Add', 'MatMul'],
                'devices': [{'index': i, 'file': f'device{i}.onnx', 'fp16_file': None, 'model': 'dedeit',
                             'model_kwargs': {'embed_dim': w // 2}, 'input': 'image', 'output': 'tokens',
                             'token_width': w} for i, w in enumerate((384, 192))],
                'head': {'file': 'head.onnx', 'fp16_file': None, 'inputs': ['tokens0', 'tokens1'], 'output': 'logits'}}
    (folder / 'manifest.json').write_text(json.dumps(manifest))
    return folder


def test_build_engines_dry_run(tmp_path):
    export = fake_export(tmp_path / 'EXPORT')
    r = _run([sys.executable, '-c', HIDE_TORCH, 'jetson.build_engines', str(export), '--fp16', '--dry-run',
              '--max-batch', '4', '--trtexec', '/opt/trt/trtexec'])
    assert r.returncode == 0, r.stderr
    lines = [line.strip() for line in r.stdout.splitlines() if 'trtexec ' in line]
    assert lines[0] == (f'/opt/trt/trtexec --onnx={export}/device0.onnx --saveEngine={export}/device0.plan '
                        '--minShapes=image:1x3x224x224 --optShapes=image:1x3x224x224 --maxShapes=image:4x3x224x224 '
                        f'--fp16 > {export}/device0.trtexec.log 2>&1')
    assert f'--saveEngine={export}/device1.plan' in lines[1]
    assert ('--minShapes=tokens0:1x384,tokens1:1x192 --optShapes=tokens0:1x384,tokens1:1x192 '
            '--maxShapes=tokens0:4x384,tokens1:4x192 --fp16') in lines[2] and len(lines) == 3
    r = _run([sys.executable, '-m', 'jetson.build_engines', str(export), '--device', '1', '--dry-run',
              '--engine-dir', str(tmp_path / 'plans')])
    lines = [line for line in r.stdout.splitlines() if 'trtexec ' in line]
    assert r.returncode == 0 and len(lines) == 1 and f'--saveEngine={tmp_path}/plans/device1.plan' in lines[0]
    assert '--fp16' not in lines[0]
    r = _run([sys.executable, '-m', 'jetson.build_engines', str(tmp_path), '--dry-run'])
    assert r.returncode == 2 and r.stderr.strip() == (f'error: {tmp_path}/manifest.json not found: not an export '
                                                      'folder (export_onnx.py writes one)')
    (tmp_path / 'manifest.json').write_text(json.dumps({'format': 'devit-onnx', 'version': 1}))
    r = _run([sys.executable, '-m', 'jetson.build_engines', str(tmp_path), '--dry-run'])
    assert r.returncode == 2 and r.stderr.startswith(f'error: {tmp_path}/manifest.json is malformed: opset must be')
    r = _run([sys.executable, '-m', 'jetson.build_engines', str(export), '--device', '5', '--dry-run'])
    assert r.returncode == 2 and 'no device 5' in r.stderr


def test_build_engines_runs_trtexec(tmp_path):
    from jetson import build_engines
    export = fake_export(tmp_path / 'EXPORT')
    trtexec = tmp_path / 'trtexec'
    trtexec.write_text('#!/bin/sh\necho "trtexec $*"\nfor a in "$@"; do case "$a" in --saveEngine=*) '
                       'echo plan > "${a#--saveEngine=}";; --onnx=*head*) [ -n "$FAIL_HEAD" ] && exit 3;; esac; done\n'
                       'exit 0\n')
    trtexec.chmod(0o755)
    r = _run([sys.executable, '-m', 'jetson.build_engines', str(export), '--fp16', '--trtexec', str(trtexec)])
    assert r.returncode == 0, r.stderr
    record = json.loads((export / 'engines.json').read_text())
    assert record['precision'] == 'fp16' and [e['what'] for e in record['engines']] == ['device0', 'device1', 'head']
    assert all((export / f).read_text() == 'plan\n' for f in ('device0.plan', 'device1.plan', 'head.plan'))
    assert '--fp16' in (export / 'device0.trtexec.log').read_text()
    r = _run([sys.executable, '-m', 'jetson.build_engines', str(export), '--trtexec', str(trtexec)],
             env=dict(os.environ, FAIL_HEAD='1'))
    assert r.returncode == 2 and 'error: trtexec failed for head.onnx (exit 3)' in r.stderr
    # TensorRT before 8.6 cannot import opset-17 LayerNormalization: said before any build, with the fix.
    manifest = json.loads((export / 'manifest.json').read_text())
    assert '--opset 13' in build_engines.incompatibility((8, 2, 1), manifest)
    assert build_engines.incompatibility((8, 6, 2), manifest) is None
    assert build_engines.incompatibility((10, 3), manifest) is None
    assert build_engines.incompatibility((8, 5, 2), {**manifest, 'opset': 13, 'operators': ['MatMul']}) is None
    assert build_engines._version_tuple('8.2.1-1+cuda10.2') == (8, 2, 1)


# Stand-ins for trtexec of each TensorRT: the banner it prints and the build flags it lacks (refused as trtexec
# refuses an unknown option); 10.12 still takes --fp16 but deprecates it, so the stand-in refuses it too.
TRTEXEC_VERSIONS = {
    '8.2.1': ('[TensorRT v8201]', ('--memPoolSize', '--stronglyTyped', '--version')),  # JetPack 4.6 (Nano)
    '8.5.2': ('[TensorRT v8502]', ('--workspace', '--stronglyTyped', '--version')),  # JetPack 5.1
    '10.3.0': ('[TensorRT v100300]', ('--workspace',)),  # JetPack 6
    '10.12.0': ('[TensorRT v101200]', ('--workspace', '--fp16')),
}


def stand_in_trtexec(path, banner, lacks):
    refuse = ' | '.join(f'{flag}|{flag}=*' for flag in lacks)
    path.write_text('#!/bin/sh\n'
                    f'echo "&&&& RUNNING TensorRT.trtexec {banner} # trtexec $*"\n'
                    'for a in "$@"; do case "$a" in\n'
                    f'  {refuse}) echo "Unknown option: $a"; exit 1;;\n'
                    '  --saveEngine=*) echo plan > "${a#--saveEngine=}";;\n'
                    'esac; done\n'
                    '[ "$1" = --version ] || echo "&&&& PASSED"\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize('version', sorted(TRTEXEC_VERSIONS))
def test_build_engines_flags_follow_trtexecs_version(tmp_path, version):
    export = fake_export(tmp_path / 'EXPORT', opset=13 if version.startswith('8.') else 17)  # 8.2, 8.5: no LayerNorm
    manifest = json.loads((export / 'manifest.json').read_text())
    for entry in manifest['devices'] + [manifest['head']]:  # as export_onnx.py --fp16 writes them
        entry['fp16_file'] = entry['file'].replace('.onnx', '.fp16.onnx')
        (export / entry['fp16_file']).write_bytes(b'onnx')
    (export / 'manifest.json').write_text(json.dumps(manifest))
    trtexec = stand_in_trtexec(tmp_path / 'trtexec', *TRTEXEC_VERSIONS[version])
    r = _run([sys.executable, '-c', HIDE_TORCH, 'jetson.build_engines', str(export), '--fp16', '--workspace', '256',
              '--trtexec', str(trtexec)])
    assert r.returncode == 0, r.stdout + r.stderr
    record = json.loads((export / 'engines.json').read_text())
    assert record['tensorrt'] == version
    log = (export / 'device0.trtexec.log').read_text()
    assert 'PASSED' in log
    workspace = '--workspace=256' if version == '8.2.1' else '--memPoolSize=workspace:256'
    typed = version == '10.12.0'
    assert (workspace in log) and (('--stronglyTyped' in log) == typed) and (('--fp16 ' in log + ' ') != typed), log
    assert (f'--onnx={export}/device0.fp16.onnx' in log) == typed, log
    assert 'warning' not in r.stderr


def test_build_engines_on_10_12_without_fp16_graphs_warns(tmp_path):
    export = fake_export(tmp_path / 'EXPORT')
    banner, _ = TRTEXEC_VERSIONS['10.12.0']
    trtexec = stand_in_trtexec(tmp_path / 'trtexec', banner, ('--workspace',))
    r = _run([sys.executable, '-m', 'jetson.build_engines', str(export), '--fp16', '--trtexec', str(trtexec)])
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == ('warning: TensorRT 10.12.0 deprecates --fp16 (weak typing): export with '
                                'export_onnx.py --fp16 so that the fp16 graphs are built strongly typed')
    assert '--fp16' in (export / 'device0.trtexec.log').read_text()


def test_build_engines_banner_versions():
    from jetson import build_engines
    assert build_engines.banner_version('&&&& RUNNING TensorRT.trtexec [TensorRT v8201] # trtexec') == (8, 2, 1)
    assert build_engines.banner_version('[TensorRT v100300]') == (10, 3, 0)
    assert build_engines.banner_version('TensorRT version: 10.12.0') == (10, 12, 0)
    assert build_engines.banner_version('trtexec --version') is None
    assert build_engines.workspace_flag((8, 2, 1), 64) == '--workspace=64'
    assert build_engines.workspace_flag((8, 4, 1), 64) == '--memPoolSize=workspace:64'
