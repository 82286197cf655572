"""Collaborative inference: the runtime on loopback against the in-process ensemble, faults, baselines, backends.

The distributed tests launch real processes (rank 0 the aggregator, ranks 1..N the devices, talking over ZeroMQ) on
tiny ensembles over real Fashion-MNIST test images; each launch has a subprocess timeout so a hang fails instead of
blocking CI. The service (--serve, leave and rejoin, deadlines) is tests/test_service.py; the device side without
PyTorch is tests/test_device_side.py.
"""
import csv
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from collab_fixtures import export, images, reference, save_ensemble
from helpers import ROOT, env, free_port, launch_cmd

import collab_infer
import utils
from collab import dispatch, wire
from collab.host import modes, torch_models
from data_transforms import default_mean_std
from models.checkpoint import CheckpointError
from models.ensemble_model import load_ensemble, read_ensemble_checkpoint

WIDTH = 2 * 32  # floats per image and device: cls + dist tokens of width 32
PIXELS = 28 * 28
TEACHER = ['--teacher-model', 'deit_tiny_distilled_patch16_224', '--teacher-kwargs', 'img_size=28', 'patch_size=7',
           'in_chans=1', 'embed_dim=48', 'depth=4', 'num_heads=2']
LAUNCH_TIMEOUT = 240
STALL_TIMEOUT = 3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('collab')
    out = {n: save_ensemble(d / f'ens{n}.pth', n) for n in (1, 2, 4)} | {
        'wide': save_ensemble(d / 'wide.pth', 1, embed_dim=48)}
    out['export2'] = export(out[2], str(d / 'export2'))
    return out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


class Launch(NamedTuple):
    rc: int
    lines: list  # (time.monotonic() when read, line) for stdout and stderr merged
    end: float  # time.monotonic() when the launcher exited
    out: Path  # folder holding r.json / r.csv

    def report(self):
        return json.loads((self.out / 'r.json').read_text())

    def preds(self):
        return [int(r['pred']) for r in read_csv(self.out / 'r.csv')]

    def first(self, text):
        return next(((t, line) for t, line in self.lines if text in line), (None, None))

    def text(self):
        return '\n'.join(line for _, line in self.lines)


def launch(nproc, args, out, launcher='launch'):
    """Run collab_infer.py under the launcher, timestamping each output line as it arrives, so a test can time the
    fault -> error interval itself (process start-up on a loaded machine says nothing about the runtime)."""
    cmd = launch_cmd('collab_infer.py', *args, '--report', str(out / 'r.json'), '--csv', str(out / 'r.csv'),
                     '--collab-port', str(free_port()), nproc=nproc, launcher=launcher)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip()))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        rc = 'timeout'
    finally:
        proc.kill()
    end = time.monotonic()
    reader.join(5)
    return Launch(rc, lines, end, out)


@pytest.fixture(scope='module')
def runs(request, ckpts, fmnist_root, tmp_path_factory):
    """The distributed runs of the selected tests, three at a time: each costs seconds of process start-up (torch,
    timm) and little else, so overlapping them halves this module's wall time."""
    data = ['--data-path', fmnist_root]
    specs = {
        'two_workers': (3, [*data, '--model-path', ckpts[2], '--limit', '10', '--timeout', '30'], 'launch'),
        'four_workers': (5, [*data, '--model-path', ckpts[4], '--limit', '7', '--batch-size', '3',
                             '--input-dtype', 'uint8'], 'torchrun'),
        'layer_split': (3, [*data, '--mode', 'layer-split', *TEACHER, '--limit', '4', '--fp16-tokens'], 'launch'),
        'dies': (2, [*data, '--model-path', ckpts[1], '--limit', '8', '--timeout', '20', '--fault', 'exit',
                     '--fault-rank', '1', '--fault-after', '3'], 'launch'),
        'stalls': (2, [*data, '--model-path', ckpts[1], '--limit', '8', '--timeout', str(STALL_TIMEOUT),
                       '--fault', 'stall', '--fault-rank', '1', '--fault-after', '2'], 'launch'),
        # The onnxruntime backend (workers and head), on the export of the checkpoint the reference runs.
        'dropout': (3, [*data, '--backend', 'onnxruntime', '--model-path', ckpts['export2'], '--dataset',
                        'fashion_mnist', '--tiny-transforms', '--limit', '6', '--timeout', '20', '--dropout-tolerant',
                        '--fault', 'exit', '--fault-rank', '1', '--fault-after', '2'], 'launch'),
    }
    selected = {item.name for item in request.session.items}
    wanted = {k: v for k, v in specs.items() if any(k in name for name in selected)}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(launch, n, args, tmp_path_factory.mktemp(k), launcher)
                   for k, (n, args, launcher) in wanted.items()}
        return {k: f.result() for k, f in futures.items()}


# ---------------------------------------------------------------------------------------------------------------
# In-process pieces

def test_load_ensemble_errors(tmp_path, ckpts):
    with pytest.raises(CheckpointError, match='not found'):
        load_ensemble(tmp_path / 'missing.pth')
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(open(ckpts[1], 'rb').read()[:1000])
    with pytest.raises(ValueError, match='truncated'):
        load_ensemble(truncated)
    student = tmp_path / 'student.pth'
    utils.save_checkpoint({'model': {}, 'args': {}}, student)
    with pytest.raises(ValueError, match='ensemble_config'):
        torch_models.load_device(student, 0)


def test_worker_backbone_equals_ensemble_device(ckpts):
    ens = load_ensemble(ckpts[2]).eval()
    ckpt = read_ensemble_checkpoint(ckpts[2])
    x = torch.randn(3, 1, 28, 28)
    for i in range(2):
        backbone = torch_models.load_backbone(ckpt, i)
        assert backbone.width == WIDTH
        torch.testing.assert_close(backbone(x), ens.device_tokens(i, x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match='holds 2 backbones; there is no device 2'):
        torch_models.load_backbone(ckpt, 2)


@pytest.mark.parametrize('n', [1, 3, 4])
def test_layer_split_stages_chain_to_the_model(n):
    kwargs = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 48, 'depth': 4, 'num_heads': 2}
    teacher = torch_models.build_teacher('deit_tiny_distilled_patch16_224', kwargs, num_classes=10)
    x = torch.randn(2, 1, 28, 28)
    out = x
    stages = torch_models.split_stages(teacher, n)
    assert [s.end - s.start for s in stages] == [4 // n + (i < 4 % n) for i in range(n)]
    with torch.inference_mode():
        for s in stages:
            out = s(out)
        torch.testing.assert_close(out, teacher(x))
    assert torch_models.activation_shape(teacher, 2) == (2, 16 + 2, 48)
    assert torch_models.teacher_shape('deit_tiny_distilled_patch16_224', kwargs) == (28, 1, 18, 48)
    with pytest.raises(ValueError, match='cannot cut'):
        torch_models.split_stages(teacher, 5)


def test_uint8_input_is_lossless_for_native_pixels(fmnist_root):
    x, _ = images(fmnist_root, 4)
    mean, std = default_mean_std(1)
    codec = wire.ImageCodec('uint8', mean, std)
    sent = codec.encode(x.numpy())
    assert sent.dtype == np.uint8 and sent.shape == tuple(x.shape)
    # Equal up to float rounding: the pixels are recovered exactly.
    np.testing.assert_allclose(codec.decode(sent), x.numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(codec.encode(codec.decode(sent)), sent)


def test_wire_messages_round_trip_and_malformed_ones_are_refused():
    tokens = np.arange(6, dtype=np.float16).reshape(2, 3)
    image = np.zeros((1, 1, 4, 4), dtype=np.uint8)
    header, arrays = wire.unpack(wire.pack({'type': 'result', 'id': 7}, [tokens, image]))
    assert header['type'] == 'result' and header['id'] == 7
    assert arrays[0].dtype == np.float16 and np.array_equal(arrays[0], tokens) and arrays[1].shape == (1, 1, 4, 4)
    frames = wire.pack({'type': 'run'}, [tokens])
    with pytest.raises(wire.ProtocolError, match='not JSON'):
        wire.unpack([b'\x80not json', frames[1]])
    with pytest.raises(wire.ProtocolError, match='describes 1 arrays but 0 buffers'):
        wire.unpack(frames[:1])
    with pytest.raises(wire.ProtocolError, match='does not have shape'):
        wire.unpack([frames[0], b'123'])
    with pytest.raises(wire.ProtocolError, match='unsupported dtype'):
        wire.unpack([b'{"type": "run", "arrays": [["|O", [1]]]}', b'12345678'])


@pytest.mark.parametrize('dtype', ['<f2', '<f4'])
def test_wire_check_refuses_every_non_finite_value(dtype):
    """check's finiteness test (a dot product with zeros) against numpy's isfinite: finite values as large as the
    dtype holds pass; a NaN or an infinity anywhere is refused."""
    big = float(np.finfo(dtype).max)
    for n in (1, 2, 7, 16, 33, 128, 385):
        a = (np.random.default_rng(n).uniform(-1, 1, (1, n)) * big).astype(dtype)
        a[0, -1] = big
        header = {'type': 'result'}
        wire.check(header, {}, [a], dtype, (1, n))
        for pos in sorted({0, n // 2, n - 1}):
            for bad in (np.nan, np.inf, -np.inf):
                b = a.copy()
                b[0, pos] = bad
                with pytest.raises(wire.ProtocolError, match='NaN or infinite'):
                    wire.check(header, {}, [b], dtype, (1, n))


def test_wire_headers_parse_as_json_does():
    """Compact headers take the scanner's fast path; whitespace, trailing bytes or an 'arrays' key in the header
    given to pack behave as json.loads and pack always did."""
    image = np.arange(4, dtype=np.uint8).reshape(1, 1, 2, 2)
    frames = wire.pack({'type': 'run', 'arrays': 'ignored', 'id': 1}, [image])
    header, arrays = wire.unpack(frames)
    assert header == {'type': 'run', 'id': 1, 'arrays': [['|u1', [1, 1, 2, 2]]]} and np.array_equal(arrays[0], image)
    assert wire.unpack([b' {"type": "bye"}\n'])[0] == {'type': 'bye'}
    for bad in (b'{"type":"bye"}x', b'{"type":"bye"', b'', b'[1]'):
        with pytest.raises(wire.ProtocolError):
            wire.unpack([bad])


@pytest.mark.parametrize('mean,std,shape', [([0.5], [0.5], (2, 1, 28, 28)), ([0.449], [0.226], (1, 3, 96, 96)),
                                            ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], (1, 3, 8, 8))])
def test_image_decode_is_the_normalisation(mean, std, shape):
    """decode (a table lookup for a small gray image, arithmetic otherwise) gives the float32 values of
    (pixel / 255 - mean) / std computed as the cast, multiply and add."""
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    m, s = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (mean, std))
    expected = pixels.astype(np.float32) * (1 / (255 * s)) + (-m / s)
    out = wire.ImageCodec('uint8', mean, std).decode(pixels)
    assert out.dtype == np.float32 and np.array_equal(out, expected)


def test_worker_with_wrong_model_is_refused(ckpts):
    """What the aggregator checks in each worker's hello (the same check over real processes:
    tests/test_service.py::test_refused_join_says_why_on_both_sides)."""
    wide = torch_models.load_device(ckpts['wide'], 0)
    ok = torch_models.load_device(ckpts[2], 1)
    head = load_ensemble(ckpts[2])
    expected = {'input': ok[1], 'token_width': head.token_widths()[1], 'model': ok[2]}
    hello = {'index': 1, 'token_width': ok[0].width, 'input': ok[1], 'model': ok[2], 'source': 'ens2.pth'}
    assert dispatch.mismatch(expected, hello) is None
    bad = dict(hello, token_width=wide[0].width, source='wide.pth')
    assert dispatch.mismatch(expected, bad).startswith('sends 96 floats per image but the ensemble head expects 64 '
                                                       'from device 1: wide.pth does not match')
    small = dict(hello, input=dict(ok[1], size=32))
    assert dispatch.mismatch(expected, small).startswith('expects 1×32×32 images, the aggregator 1×28×28')
    other = dict(hello, model={'model': 'devit', 'kwargs': ok[2]['kwargs']})
    assert "runs 'devit' but the head was trained with 'dedeit'" in dispatch.mismatch(expected, other)
    kwargs = dict(hello, model={'model': 'dedeit', 'kwargs': dict(ok[2]['kwargs'], depth=3)})
    assert 'depth: 3 here, 2 there' in dispatch.mismatch(expected, kwargs)


def test_world_size_must_be_devices_plus_one(monkeypatch):
    monkeypatch.setenv('LOCAL_RANK', '0')
    with pytest.raises(ValueError, match=r'needs 5 processes \(--nproc_per_node=5\).*got world size 3'):
        modes._check_world(3, 4, 'collab')


def test_monolithic_modes_in_one_process(tmp_path, ckpts, fmnist_root, capsys):
    """The ensemble in one process gives the reference predictions; the teacher runs too; files get classes."""
    x, y = images(fmnist_root, 6)
    expected = reference(ckpts[2], x)
    out, rows = tmp_path / 'mono.json', tmp_path / 'mono.csv'
    collab_infer.main(['--mode', 'monolithic', '--model-path', ckpts[2], '--data-path', fmnist_root, '--limit', '6',
                       '--report', str(out), '--csv', str(rows), '--warmup', '0'])
    report = json.loads(out.read_text())
    assert [int(r['pred']) for r in read_csv(rows)] == expected
    assert report['accuracy'] == pytest.approx(sum(p == t for p, t in zip(expected, y.tolist())) / 6)
    assert report['bytes_per_image'] == 0 and report['world_size'] == 1 and report['model'] == 'ensemble'

    collab_infer.main(['--mode', 'monolithic', *TEACHER, '--data-path', fmnist_root, '--limit', '4',
                       '--report', str(out)])
    report = json.loads(out.read_text())
    assert report['model'] == 'deit_tiny_distilled_patch16_224' and report['random_weights']
    assert report['num_images'] == 4 and report['latency_ms']['p95'] >= report['latency_ms']['p50'] > 0

    from PIL import Image
    files = []
    for i in range(3):
        files.append(str(tmp_path / f'img{i}.png'))
        Image.fromarray(((x[i, 0] * 0.226 + 0.449) * 255).round().clamp(0, 255).byte().numpy()).save(files[-1])
    capsys.readouterr()
    collab_infer.main(['--mode', 'monolithic', '--model-path', ckpts[2], '--data-path', fmnist_root,
                       '--images', *files, '--report', str(out)])
    printed = [line.split('\t') for line in capsys.readouterr().out.splitlines() if '\t' in line]
    assert [(f, int(c)) for f, c, _ in printed] == list(zip(files, expected[:3]))
    report = json.loads(out.read_text())
    assert report['accuracy'] is None and [p['class'] for p in report['predictions']] == expected[:3]


# ---------------------------------------------------------------------------------------------------------------
# Distributed runs on loopback

def test_collab_two_workers_match_in_process_ensemble(runs, ckpts, fmnist_root):
    run = runs['two_workers']
    assert run.rc == 0, run.text()
    report = run.report()
    x, y = images(fmnist_root, 10)
    expected = reference(ckpts[2], x)
    assert run.preds() == expected
    assert report['accuracy'] == pytest.approx(sum(p == t for p, t in zip(expected, y.tolist())) / 10)
    assert report['world_size'] == 3 and report['num_devices'] == 2 and report['num_images'] == 10
    assert set(report['latency_ms']) >= {'p50', 'p95', 'mean'}
    assert set(report['breakdown_ms']) == {'send', 'compute', 'gather', 'head'}
    assert report['bytes_per_image'] == 2 * WIDTH * 4  # fp32 tokens of both devices
    assert report['input_bytes_per_image'] == 2 * PIXELS * 4  # the fp32 image, once per device
    assert set(report['worker_compute_ms']) == {'1', '2'}
    assert 'latency ms' in run.text()  # the printed table


def test_collab_four_workers_torchrun_uint8_batches(runs, ckpts, fmnist_root):
    run = runs['four_workers']
    assert run.rc == 0, run.text()
    report = run.report()
    x, _ = images(fmnist_root, 7)
    assert run.preds() == reference(ckpts[4], x)
    assert report['num_requests'] == 3 and report['world_size'] == 5
    assert report['bytes_per_image'] == 4 * WIDTH * 4
    assert report['input_bytes_per_image'] == 4 * PIXELS  # uint8 pixels


def test_layer_split_ships_activations(runs):
    run = runs['layer_split']
    assert run.rc == 0, run.text()
    report = run.report()
    hop = 18 * 48 * 2  # one B×T×D activation between the two stages, fp16 (--fp16-tokens)
    assert report['bytes_by_kind_per_image']['activations'] == hop
    assert report['bytes_per_image'] == hop + 10 * 4  # plus the logits back to rank 0
    assert report['bytes_per_image'] > 2 * WIDTH * 2  # more than DeViT's two devices send
    assert report['input_bytes_per_image'] == PIXELS * 4 and report['random_weights']


def test_worker_that_dies_gives_clear_error(runs):
    run = runs['dies']
    t_fault, _ = run.first('fault injected')
    t_error, error = run.first('error: worker rank 1')
    assert run.rc not in (0, 'timeout') and t_fault is not None and error is not None, run.text()
    assert 'closed the connection' in error and 'at image 3' in error, error
    assert t_error - t_fault < 10  # a closed link is noticed at once, long before the 20 s timeout
    assert run.end - t_error < 20  # and the launcher tears down the rest


def test_worker_that_stalls_times_out(runs):
    run = runs['stalls']
    t_fault, _ = run.first('fault injected')
    t_error, error = run.first('error: worker rank 1')
    assert run.rc not in (0, 'timeout') and t_fault is not None and error is not None, run.text()
    assert f'did not answer within {STALL_TIMEOUT} s' in error
    assert STALL_TIMEOUT - 2 < t_error - t_fault < STALL_TIMEOUT + 10
    assert run.end - t_fault < STALL_TIMEOUT + 20


def test_dropout_tolerant_answers_from_devices_still_up(runs, ckpts, fmnist_root):
    """--backend onnxruntime: device0.onnx, device1.onnx and head.onnx (device 0 zero-filled once it is gone) give
    the PyTorch ensemble's predictions."""
    run = runs['dropout']
    assert run.rc == 0, run.text()
    report = run.report()
    assert [(d['rank'], d['at_image']) for d in report['dropped_ranks']] == [(1, 2)]
    assert report['num_images'] == 6 and report['accuracy'] is not None
    x, _ = images(fmnist_root, 6)
    expected = reference(ckpts[2], x[:2]) + reference(ckpts[2], x[2:], present=[False, True])
    assert run.preds() == expected
    assert report['backend'] == 'onnxruntime' and {w['backend'] for w in report['workers']} == {'onnxruntime'}
    assert report['bytes_per_image'] == (2 * 2 + 4) * WIDTH * 4 / 6  # both devices for 2 images, then one
    rows = read_csv(run.out / 'r.csv')
    assert [r['devices'] for r in rows] == ['0 1'] * 2 + ['1'] * 4
    assert [len(r['worker_ms'].split()) for r in rows] == [2] * 2 + [1] * 4  # each answering device's own forward
    assert all(float(ms) > 0 for r in rows for ms in r['worker_ms'].split())
