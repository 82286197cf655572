"""Collaborative inference: the distributed runtime on loopback against the in-process ensemble, faults, baselines.

The distributed tests launch real processes (rank 0 the aggregator, ranks 1..N the devices) on tiny ensembles over
real Fashion-MNIST test images; each launch has a subprocess timeout so a hang fails instead of blocking CI.
"""
import csv
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from helpers import ROOT, env, launch_cmd

import collab_infer
import utils
from collab import modes, runtime
from datasets import build_dataset
from models.checkpoint import CheckpointError
from models.ensemble_model import DeViTEnsemble, create_backbone

STUDENT = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}
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


def save_ensemble(path, num_devices, embed_dim=32, seed=0):
    """A random tiny stage-3 checkpoint in the format ensemble.py writes."""
    torch.manual_seed(seed)
    backbones = [create_backbone('dedeit', {**STUDENT, 'embed_dim': embed_dim}) for _ in range(num_devices)]
    ens = DeViTEnsemble(backbones, num_classes=10, embed_dim=48)
    utils.save_checkpoint({'model': ens.state_dict(), 'model_ema': None, 'ensemble_config': ens.config,
                           'args': {'dataset': 'fashion_mnist', 'tiny_transforms': True, 'input_size': 28},
                           'epoch': 0, 'best_acc1': 0.0}, path)
    return str(path)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('collab')
    return {n: save_ensemble(d / f'ens{n}.pth', n) for n in (1, 2, 4)} | {
        'wide': save_ensemble(d / 'wide.pth', 1, embed_dim=48)}


def images(fmnist_root, k):
    ds = build_dataset('fashion_mnist', fmnist_root, 'val', input_size=28, in_chans=1, tiny=True)
    x, y = zip(*(ds[i] for i in range(k)))
    return torch.stack(x), torch.tensor(y)


def reference(ckpt, x, present=None):
    """Predictions of the ensemble in this process (devices with present False zero-filled)."""
    ens = runtime.load_ensemble(ckpt)
    with torch.inference_mode():
        tokens = [ens.device_tokens(i, x) for i in range(ens.num_devices)]
        return ens.head_forward(tokens, present).eval_logits().argmax(1).tolist()


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
                     nproc=nproc, launcher=launcher)
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
        'layer_split': (3, [*data, '--mode', 'layer-split', *TEACHER, '--limit', '4'], 'launch'),
        'dies': (2, [*data, '--model-path', ckpts[1], '--limit', '8', '--timeout', '20', '--fault', 'exit',
                     '--fault-rank', '1', '--fault-after', '3'], 'launch'),
        'stalls': (2, [*data, '--model-path', ckpts[1], '--limit', '8', '--timeout', str(STALL_TIMEOUT),
                       '--fault', 'stall', '--fault-rank', '1', '--fault-after', '2'], 'launch'),
        'dropout': (3, [*data, '--model-path', ckpts[2], '--limit', '6', '--timeout', '20', '--dropout-tolerant',
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
        runtime.load_ensemble(tmp_path / 'missing.pth')
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(open(ckpts[1], 'rb').read()[:1000])
    with pytest.raises(ValueError, match='truncated'):
        runtime.load_ensemble(truncated)
    student = tmp_path / 'student.pth'
    utils.save_checkpoint({'model': {}, 'args': {}}, student)
    with pytest.raises(ValueError, match='ensemble_config'):
        runtime.load_ensemble(student)


def test_worker_backbone_equals_ensemble_device(ckpts):
    ens = runtime.load_ensemble(ckpts[2])
    ckpt = runtime.read_ensemble_checkpoint(ckpts[2])
    x = torch.randn(3, 1, 28, 28)
    for i in range(2):
        backbone = runtime.load_backbone(ckpt, i)
        assert backbone.width == WIDTH
        torch.testing.assert_close(backbone(x), ens.device_tokens(i, x), rtol=0, atol=0)


@pytest.mark.parametrize('n', [1, 3, 4])
def test_layer_split_stages_chain_to_the_model(n):
    kwargs = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 48, 'depth': 4, 'num_heads': 2}
    teacher = runtime.build_teacher('deit_tiny_distilled_patch16_224', kwargs, num_classes=10)
    x = torch.randn(2, 1, 28, 28)
    out = x
    stages = runtime.split_stages(teacher, n)
    assert [s.end - s.start for s in stages] == [4 // n + (i < 4 % n) for i in range(n)]
    with torch.inference_mode():
        for s in stages:
            out = s(out)
        torch.testing.assert_close(out, teacher(x))
    assert runtime.activation_shape(teacher, 2) == (2, 16 + 2, 48)
    with pytest.raises(ValueError, match='cannot cut'):
        runtime.split_stages(teacher, 5)


def test_uint8_input_is_lossless_for_native_pixels(fmnist_root):
    x, _ = images(fmnist_root, 4)
    codec = runtime.InputCodec('uint8', in_chans=1)
    sent = codec.encode(x)
    assert sent.dtype == torch.uint8 and sent.shape == x.shape
    # Equal up to float rounding (a vectorised x/255 is x·(1/255)): pixels are recovered exactly.
    torch.testing.assert_close(codec.decode(sent), x, rtol=0, atol=1e-6)
    assert torch.equal(codec.encode(codec.decode(sent)), sent)


def test_worker_with_wrong_checkpoint_is_refused(ckpts):
    """What rank 0 checks in each worker's hello answer: [floats sent per image, image size, channels]. (The
    same check over a real launch costs a launch: `--worker-model-path` gives the workers another checkpoint.)"""
    ckpt = runtime.read_ensemble_checkpoint(ckpts['wide'])
    wide = runtime.load_backbone(ckpt, 0)
    widths = runtime.load_ensemble(ckpts[2]).token_widths()
    modes.check_workers({1: [WIDTH, 28, 1], 2: [WIDTH, 28, 1]}, widths, 28, 1)
    with pytest.raises(ValueError, match=r'worker rank 2 \(device 1\) sends 96 floats per image but the ensemble '
                                         r'head expects 64'):
        modes.check_workers({1: [WIDTH, 28, 1], 2: [wide.width, 28, 1]}, widths, 28, 1)
    with pytest.raises(ValueError, match=r'worker rank 1 \(device 0\) expects 1×32×32 images'):
        modes.check_workers({1: [WIDTH, 32, 1]}, None, 28, 1)


def test_world_size_must_be_devices_plus_one():
    with pytest.raises(ValueError, match=r'needs 5 processes \(--nproc_per_node=5\).*got world size 3'):
        modes._check_world(3, 4, 'collab', 0)


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
    hop = 18 * 48 * 4  # one B×T×D activation between the two stages, fp32
    assert report['bytes_by_kind_per_image']['activations'] == hop
    assert report['bytes_per_image'] == hop + 10 * 4  # plus the logits back to rank 0
    assert report['bytes_per_image'] > 2 * WIDTH * 4  # more than DeViT's two devices send
    assert report['input_bytes_per_image'] == PIXELS * 4 and report['random_weights']


def test_worker_that_dies_gives_clear_error(runs):
    run = runs['dies']
    t_fault, _ = run.first('fault injected')
    t_error, error = run.first('error: worker rank 1')
    assert run.rc not in (0, 'timeout') and t_fault is not None and error is not None, run.text()
    assert 'closed the connection' in error and 'at image 3' in error
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
    run = runs['dropout']
    assert run.rc == 0, run.text()
    report = run.report()
    assert [(d['rank'], d['at_image']) for d in report['dropped_ranks']] == [(1, 2)]
    assert report['num_images'] == 6 and report['accuracy'] is not None
    x, _ = images(fmnist_root, 6)
    expected = reference(ckpts[2], x[:2]) + reference(ckpts[2], x[2:], present=[False, True])
    assert run.preds() == expected
