"""Collaborative inference: the distributed runtime on loopback against the in-process ensemble, faults, baselines.

The distributed tests launch real processes (rank 0 the aggregator, ranks 1..N the devices) on tiny ensembles over
real Fashion-MNIST test images; each launch has a subprocess timeout so a hang fails instead of blocking CI.
"""
import csv
import json
import os
import subprocess
import threading
import time

import pytest
import torch

import collab_infer
import models  # noqa: F401
import utils
from collab import modes, runtime
from datasets import build_dataset
from helpers import ROOT, env, launch_cmd, run
from models.checkpoint import CheckpointError
from models.ensemble import DeViTEnsemble, create_backbone

STUDENT = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}
WIDTH = 2 * 32  # floats per image and device: cls + dist tokens of width 32
PIXELS = 28 * 28
TEACHER = ['--teacher-model', 'deit_tiny_distilled_patch16_224', '--teacher-kwargs', 'img_size=28', 'patch_size=7',
           'in_chans=1', 'embed_dim=48', 'depth=4', 'num_heads=2']
LAUNCH_TIMEOUT = 240


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


def launch(nproc, *args, launcher='launch', check=True):
    return run(launch_cmd('collab_infer.py', *args, nproc=nproc, launcher=launcher), timeout=LAUNCH_TIMEOUT,
               check=check)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def launch_timed(nproc, *args):
    """Launch and timestamp each output line, so a test can time the fault -> error interval itself
    (process start-up on a loaded machine says nothing about the runtime)."""
    proc = subprocess.Popen(launch_cmd('collab_infer.py', *args, nproc=nproc), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip()))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=LAUNCH_TIMEOUT)
    finally:
        proc.kill()
    reader.join(5)
    return rc, lines, time.monotonic()


def first(lines, text):
    return next(((t, line) for t, line in lines if text in line), (None, None))


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
    teacher = runtime.build_teacher('deit_tiny_distilled_patch16_224', dict(
        img_size=28, patch_size=7, in_chans=1, embed_dim=48, depth=4, num_heads=2), num_classes=10)
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

def test_collab_two_workers_match_in_process_ensemble(tmp_path, ckpts, fmnist_root):
    out, rows = tmp_path / 'r.json', tmp_path / 'r.csv'
    launch(3, '--model-path', ckpts[2], '--data-path', fmnist_root, '--limit', '10', '--timeout', '30',
           '--report', str(out), '--csv', str(rows))
    report = json.loads(out.read_text())
    x, y = images(fmnist_root, 10)
    expected = reference(ckpts[2], x)
    assert [int(r['pred']) for r in read_csv(rows)] == expected
    assert report['accuracy'] == pytest.approx(sum(p == t for p, t in zip(expected, y.tolist())) / 10)
    assert report['world_size'] == 3 and report['num_devices'] == 2 and report['num_images'] == 10
    assert set(report['latency_ms']) >= {'p50', 'p95', 'mean'}
    assert set(report['breakdown_ms']) == {'send', 'compute', 'gather', 'head'}
    assert report['bytes_per_image'] == 2 * WIDTH * 4  # fp32 tokens of both devices
    assert report['input_bytes_per_image'] == 2 * PIXELS * 4  # the fp32 image, once per device
    assert set(report['worker_compute_ms']) == {'1', '2'}


def test_collab_four_workers_torchrun_uint8_batches(tmp_path, ckpts, fmnist_root):
    out, rows = tmp_path / 'r.json', tmp_path / 'r.csv'
    launch(5, '--model-path', ckpts[4], '--data-path', fmnist_root, '--limit', '7', '--batch-size', '3',
           '--input-dtype', 'uint8', '--report', str(out), '--csv', str(rows), launcher='torchrun')
    report = json.loads(out.read_text())
    x, _ = images(fmnist_root, 7)
    assert [int(r['pred']) for r in read_csv(rows)] == reference(ckpts[4], x)
    assert report['num_requests'] == 3 and report['world_size'] == 5
    assert report['bytes_per_image'] == 4 * WIDTH * 4
    assert report['input_bytes_per_image'] == 4 * PIXELS  # uint8 pixels


def test_layer_split_ships_activations(tmp_path, fmnist_root):
    out = tmp_path / 'r.json'
    launch(3, '--mode', 'layer-split', *TEACHER, '--data-path', fmnist_root, '--limit', '4', '--report', str(out))
    report = json.loads(out.read_text())
    hop = 18 * 48 * 4  # one B×T×D activation between the two stages, fp32
    assert report['bytes_by_kind_per_image']['activations'] == hop
    assert report['bytes_per_image'] == hop + 10 * 4  # plus the logits back to rank 0
    assert report['bytes_per_image'] > 2 * WIDTH * 4  # more than DeViT's two devices send
    assert report['input_bytes_per_image'] == PIXELS * 4 and report['random_weights']


def test_worker_that_dies_gives_clear_error(ckpts, fmnist_root):
    rc, lines, end = launch_timed(2, '--model-path', ckpts[1], '--data-path', fmnist_root, '--limit', '8',
                                  '--timeout', '20', '--fault', 'exit', '--fault-rank', '1', '--fault-after', '3')
    t_fault, _ = first(lines, 'fault injected')
    t_error, error = first(lines, 'error: worker rank 1')
    assert rc != 0 and t_fault is not None, '\n'.join(line for _, line in lines)
    assert error is not None and 'closed the connection' in error and 'at image 3' in error
    assert t_error - t_fault < 10  # a closed link is noticed at once, long before the timeout
    assert end - t_error < 20  # and the launcher tears down the rest


def test_worker_that_stalls_times_out(ckpts, fmnist_root):
    timeout = 3
    rc, lines, end = launch_timed(2, '--model-path', ckpts[1], '--data-path', fmnist_root, '--limit', '8',
                                  '--timeout', str(timeout), '--fault', 'stall', '--fault-rank', '1',
                                  '--fault-after', '2')
    t_fault, _ = first(lines, 'fault injected')
    t_error, error = first(lines, 'error: worker rank 1')
    assert rc != 0 and t_fault is not None, '\n'.join(line for _, line in lines)
    assert error is not None and f'did not answer within {timeout} s' in error
    assert timeout - 1 < t_error - t_fault < timeout + 10
    assert end - t_fault < timeout + 20


def test_dropout_tolerant_answers_from_devices_still_up(tmp_path, ckpts, fmnist_root):
    out, rows = tmp_path / 'r.json', tmp_path / 'r.csv'
    launch(3, '--model-path', ckpts[2], '--data-path', fmnist_root, '--limit', '6', '--timeout', '20',
           '--dropout-tolerant', '--fault', 'exit', '--fault-rank', '1', '--fault-after', '2',
           '--report', str(out), '--csv', str(rows))
    report = json.loads(out.read_text())
    assert [(d['rank'], d['at_image']) for d in report['dropped_ranks']] == [(1, 2)]
    assert report['num_images'] == 6 and report['accuracy'] is not None
    x, _ = images(fmnist_root, 6)
    expected = reference(ckpts[2], x[:2]) + reference(ckpts[2], x[2:], present=[False, True])
    assert [int(r['pred']) for r in read_csv(rows)] == expected


def test_worker_with_wrong_checkpoint_is_refused(ckpts, fmnist_root):
    proc = launch(2, '--model-path', ckpts[1], '--worker-model-path', ckpts['wide'], '--data-path', fmnist_root,
                  '--limit', '2', check=False)
    assert proc.returncode != 0
    assert 'error: worker rank 1 (device 0) sends 96 floats per image but the ensemble head expects 64' in proc.stderr
