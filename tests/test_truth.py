"""The figures the pipeline reports are true: recomputed here by plain PyTorch code that shares nothing with the
project's evaluation path (not engine.evaluate, not datasets.build_dataset, not the ensemble's forward).

- Independent evaluation: the test top-1 a stage logs (log.txt, the checkpoint's ``test_acc1``) equals this file's
  own evaluation of the saved checkpoint; ``ensemble.py --eval-missing`` figures equal an evaluation with that
  device's tokens zeroed here.
- Runtime truth: the collaborative runtime's per-image predictions and logits (``collab_infer.py --csv --logits``,
  N+1 processes under the launcher) on the trained ensemble equal this file's evaluation of the checkpoint; a device
  that drops out changes predictions, to exactly what the ensemble gives with that device zeroed; layer-split
  predictions and logits equal the trained teacher's own.

Here the images come from the idx files read with gzip/numpy, normalised as the project documents it (ImageNet's
mean and std averaged over RGB for one grey channel), the models are built with ``timm.create_model`` from each
checkpoint's own args and loaded with ``load_state_dict``, and the ensemble head is applied from its weights.
"""
import csv
import gzip
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import CHAIN_TEACHER, CHAIN_TEACHER_KW
from helpers import launch_cmd, read_log, run

import models  # noqa: F401  (registers dedeit in timm)

MEAN = (0.485 + 0.456 + 0.406) / 3  # ImageNet's RGB mean and std, averaged for one grey channel
STD = (0.229 + 0.224 + 0.225) / 3
LOGITS_TOL = 1e-4  # the runtime's logits against the test's own (float rounding of batch 1 vs batched matmuls)
TIE = 1e-4  # logits closer than this to the runner-up: float rounding (batching, fused ops) may swap the argmax
COLLAB_IMAGES = 200
DROP_AFTER = 20  # the device that drops out leaves at image 20


# ---------------------------------------------------------------------------------------------------------------
# The reference: data, models and predictions computed here

def read_idx(path):
    with gzip.open(path, 'rb') as f:
        raw = f.read()
    magic, = struct.unpack('>I', raw[:4])
    ndim = magic & 0xFF
    shape = struct.unpack(f'>{ndim}I', raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@lru_cache(maxsize=1)
def fashion_mnist_test(root):
    """The 10,000 test images (N×1×28×28 float, normalised) and their labels, in file order."""
    images = read_idx(os.path.join(root, 't10k-images-idx3-ubyte.gz'))
    labels = read_idx(os.path.join(root, 't10k-labels-idx1-ubyte.gz')).astype(np.int64)
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - MEAN) / STD
    return x.unsqueeze(1), torch.from_numpy(labels)


def select_rows(root, classes=None, limit=None):
    """The first ``limit`` test images of ``classes`` (all classes when None), labels mapped to 0..k-1 in the order
    of ``classes`` (a division's local labels, as split.json lists them)."""
    x, y = fashion_mnist_test(root)
    if classes is None:
        return x[:limit], y[:limit]
    rows = torch.from_numpy(np.flatnonzero(np.isin(y.numpy(), classes)))[:limit]
    local = {int(g): k for k, g in enumerate(classes)}
    return x[rows], torch.tensor([local[int(g)] for g in y[rows]])


def load_checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def build_vit(ckpt):
    """A stage-1/2 checkpoint as a timm model: name and kwargs from its training args, its 'model' weights."""
    args = ckpt['args']
    model = timm.create_model(args['model'], num_classes=ckpt['num_classes'], **args['model_kwargs'])
    model.load_state_dict(ckpt['model'])
    return model.eval()


@torch.no_grad()
def vit_logits(model, x):
    """A distilled ViT's eval logits: the mean of the cls head on token 0 and the dist head on token 1."""
    tokens = model.forward_features(x)
    return (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2


class Ensemble:
    """A stage-3 checkpoint taken apart: one timm backbone per device (``backbones.i.*`` weights) and the head's
    four Linear layers applied from their weights."""

    def __init__(self, ckpt):
        state, config = ckpt['model'], ckpt['ensemble_config']
        self.backbones = []
        for i, spec in enumerate(config['backbones']):
            backbone = timm.create_model(spec['model'], num_classes=0, **spec['kwargs'])
            prefix = f'backbones.{i}.'
            backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            self.backbones.append(backbone.eval())
        self.head = {k: v for k, v in state.items() if not k.startswith('backbones.')}

    @torch.no_grad()
    def tokens(self, x):
        """Per device: (final cls token, final dist token), each B×d."""
        out = []
        for backbone in self.backbones:
            t = backbone.forward_features(x)
            out.append((t[:, 0], t[:, 1]))
        return out

    def logits(self, tokens, missing=None):
        """Head on the devices' tokens, device ``missing`` (if any) zero-filled."""
        tokens = [(torch.zeros_like(c), torch.zeros_like(d)) if i == missing else (c, d)
                  for i, (c, d) in enumerate(tokens)]
        h = self.head
        cls = F.linear(torch.cat([c for c, _ in tokens], 1), h['proj_cls.weight'], h['proj_cls.bias'])
        dist = F.linear(torch.cat([d for _, d in tokens], 1), h['proj_dist.weight'], h['proj_dist.bias'])
        return (F.linear(cls, h['head.weight'], h['head.bias'])
                + F.linear(dist, h['head_dist.weight'], h['head_dist.bias'])) / 2


def ties(logits):
    """Images whose two best logits are within TIE: their argmax is decided by float rounding."""
    top2 = logits.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) < TIE


def assert_top1(logits, labels, logged, what):
    """The logged top-1 (percent over ``len(labels)`` images) is the count of argmax hits computed here (near-ties
    may count either way; there must be hardly any)."""
    hits = logits.argmax(1) == labels
    tie = ties(logits)
    assert int(tie.sum()) <= 1, f'{what}: {int(tie.sum())} near-tied images'
    low, high = int((hits & ~tie).sum()), int((hits | tie).sum())
    logged_hits = logged * len(labels) / 100  # the logged percentage is a float32: 72.9000015 for 729 of 1000
    assert low - 1e-3 <= logged_hits <= high + 1e-3, \
        f'{what}: logged {logged:.4f}% = {logged_hits:.2f} of {len(labels)}, evaluated here {low}..{high}'


def assert_same_predictions(preds, logits, what, first=0):
    """Runtime predictions of images ``first``, ``first`` + 1, ... equal the argmax of ``logits`` on >= 99.9% of
    them (at most one image, a near-tie, may differ)."""
    preds = torch.as_tensor(preds)
    assert preds.shape == (logits.shape[0],), f'{what}: {preds.shape[0]} predictions for {logits.shape[0]} images'
    differ = preds != logits.argmax(1)
    unexplained = torch.nonzero(differ & ~ties(logits)).flatten().tolist()[:10]
    assert not unexplained, f'{what}: images {[first + i for i in unexplained]} predicted ' \
                            f'{preds[unexplained].tolist()}, expected {logits.argmax(1)[unexplained].tolist()}'
    assert float(differ.float().mean()) <= 0.001 or int(differ.sum()) <= 1


# ---------------------------------------------------------------------------------------------------------------
# Independent evaluation of every checkpoint the chain saved

def best_epoch(log):
    """The epoch checkpoint.pth holds: the last with the best test top-1 (engine.fit saves ties too)."""
    return max(log, key=lambda r: (r['test_acc1'], r['epoch']))


def stage_folders(chain):
    return [('teacher', chain.teacher / 'sub-dataset0', chain.split1, 0)] + [
        (f'{stage} division {i}', getattr(chain, stage) / f'sub-dataset{i}', chain.split4, i)
        for stage in ('stage1', 'stage2') for i in range(4)]


def test_logged_accuracy_equals_independent_evaluation_of_each_checkpoint(trained_chain):
    for what, folder, split, division in stage_folders(trained_chain):
        ckpt = load_checkpoint(folder / 'checkpoint.pth')
        record = best_epoch(read_log(folder))
        assert ckpt['epoch'] == record['epoch'] and ckpt['test_acc1'] == record['test_acc1'], what
        manifest = json.loads((split / 'split.json').read_text())
        classes = manifest['divisions'][division]['classes']
        assert ckpt['classes'] == classes, what
        x, y = select_rows(trained_chain.fmnist, classes, ckpt['args']['limit_val'])
        assert record['test_count'] == len(y), what
        assert_top1(vit_logits(build_vit(ckpt), x), y, record['test_acc1'], what)


@pytest.fixture(scope='module')
def ensemble(trained_chain):
    """The trained ensemble taken apart, its tokens and logits on the first 1,000 test images (its --limit-val)."""
    ckpt = load_checkpoint(trained_chain.stage3 / 'checkpoint.pth')
    ens = Ensemble(ckpt)
    x, y = select_rows(trained_chain.fmnist, None, ckpt['args']['limit_val'])
    tokens = ens.tokens(x)
    logits = [ens.logits(tokens)] + [ens.logits(tokens, missing=i) for i in range(len(ens.backbones))]
    return {'ckpt': ckpt, 'labels': y, 'logits': logits}


def test_ensemble_logged_accuracy_equals_independent_evaluation(trained_chain, ensemble):
    record = best_epoch(read_log(trained_chain.stage3))
    assert ensemble['ckpt']['epoch'] == record['epoch'] and ensemble['ckpt']['test_acc1'] == record['test_acc1']
    assert record['test_count'] == len(ensemble['labels']) == 1000
    assert_top1(ensemble['logits'][0], ensemble['labels'], record['test_acc1'], 'ensemble')


def test_eval_missing_equals_evaluation_with_that_device_zeroed(trained_chain, ensemble):
    report = json.loads((trained_chain.stage3 / 'missing_devices.json').read_text())
    assert len(report['missing']) == 4
    assert_top1(ensemble['logits'][0], ensemble['labels'], report['all'], 'all devices')
    for i, acc in enumerate(report['missing']):
        assert_top1(ensemble['logits'][i + 1], ensemble['labels'], acc, f'device {i} missing')
    # the zeroed device really was left out: each one changes some predictions
    full = ensemble['logits'][0].argmax(1)
    assert all(int((logits.argmax(1) != full).sum()) >= 10 for logits in ensemble['logits'][1:])


# ---------------------------------------------------------------------------------------------------------------
# Runtime truth: the distributed runtime on the trained models

def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def runtime_runs(trained_chain, tmp_path_factory):
    """The three runtime runs, launched side by side (each costs seconds of process start-up and little else):
    collab with all devices, collab with device 1 (rank 2) dropping out at image DROP_AFTER, layer-split."""
    data = ['--dataset', 'fashion_mnist', '--data-path', trained_chain.fmnist, '--limit', str(COLLAB_IMAGES),
            '--timeout', '30']
    ensemble_ckpt = str(trained_chain.stage3 / 'checkpoint.pth')
    specs = {
        'collab': (5, ['--model-path', ensemble_ckpt, *data]),
        # exit, not kill: a SIGKILLed rank makes torch's launcher tear down every rank of its host, the aggregator
        # too; a process that vanishes with code 0 is to the others what a device lost on another host is
        'dropout': (5, ['--model-path', ensemble_ckpt, *data, '--dropout-tolerant', '--fault', 'exit',
                        '--fault-rank', '2', '--fault-after', str(DROP_AFTER)]),
        # the teacher has 2 blocks: 2 stages
        'layer_split': (3, ['--mode', 'layer-split', '--teacher-model', CHAIN_TEACHER, '--teacher-kwargs',
                            *CHAIN_TEACHER_KW, '--teacher-path', str(trained_chain.teacher_ckpt), *data]),
    }

    def launch(name, nproc, args):
        out = tmp_path_factory.mktemp(name)
        run(launch_cmd('collab_infer.py', *args, '--report', str(out / 'r.json'), '--csv', str(out / 'r.csv'),
                       '--logits', str(out / 'logits.npy'), nproc=nproc), timeout=300)
        return (json.loads((out / 'r.json').read_text()), read_csv(out / 'r.csv'),
                torch.from_numpy(np.load(out / 'logits.npy')))

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(launch, name, nproc, args) for name, (nproc, args) in specs.items()}
    return futures  # each test takes its run's .result(): a failed run fails its own test only


@pytest.fixture(scope='module')
def collab_reference(trained_chain, ensemble):
    """The ensemble's logits on the runtime's images, all devices and device 1 zeroed, computed here."""
    ens = Ensemble(ensemble['ckpt'])
    x, y = select_rows(trained_chain.fmnist, None, COLLAB_IMAGES)
    tokens = ens.tokens(x)
    return {'labels': y, 'all': ens.logits(tokens), 'missing1': ens.logits(tokens, missing=1)}


def assert_logits_close(logits, reference, what):
    """The aggregator's logits (collab_infer.py --logits) equal the test's own, up to float rounding."""
    assert logits.shape == reference.shape, what
    diff = float((logits - reference).abs().max())
    assert diff <= LOGITS_TOL, f'{what}: logits differ by up to {diff:.2e}'


def test_collab_predictions_equal_independent_ensemble_evaluation(runtime_runs, collab_reference):
    report, rows, logits = runtime_runs['collab'].result()
    assert_logits_close(logits, collab_reference['all'], 'collab')
    assert report['world_size'] == 5 and report['num_images'] == COLLAB_IMAGES
    assert [int(r['image']) for r in rows] == list(range(COLLAB_IMAGES))
    assert [int(r['label']) for r in rows] == collab_reference['labels'].tolist()
    assert_same_predictions([int(r['pred']) for r in rows], collab_reference['all'], 'collab')
    hits = sum(int(r['correct']) for r in rows)
    assert report['accuracy'] == pytest.approx(hits / COLLAB_IMAGES)
    assert report['accuracy'] >= 0.65  # a trained model: measured 0.775 (chance 0.1)


def test_device_dropping_out_changes_predictions_to_the_zeroed_evaluation(runtime_runs, collab_reference):
    (_, full_rows, _), (report, rows, logits) = runtime_runs['collab'].result(), runtime_runs['dropout'].result()
    assert report['num_images'] == COLLAB_IMAGES
    assert_logits_close(logits[:DROP_AFTER], collab_reference['all'][:DROP_AFTER], 'before the drop')
    assert_logits_close(logits[DROP_AFTER:], collab_reference['missing1'][DROP_AFTER:], 'after the drop')
    preds = [int(r['pred']) for r in rows]
    # before the drop every device answers; from the drop on, device 1's tokens are zero-filled
    assert_same_predictions(preds[:DROP_AFTER], collab_reference['all'][:DROP_AFTER], 'before the drop')
    assert_same_predictions(preds[DROP_AFTER:], collab_reference['missing1'][DROP_AFTER:], 'after the drop',
                            first=DROP_AFTER)
    changed = [i for i, (a, b) in enumerate(zip(preds, (int(r['pred']) for r in full_rows))) if a != b]
    assert len(changed) >= 3 and min(changed) >= DROP_AFTER, changed  # measured: 11 of the 180 images


def test_layer_split_predictions_equal_the_teachers(runtime_runs, trained_chain):
    report, rows, logits = runtime_runs['layer_split'].result()
    assert report['world_size'] == 3 and report['num_images'] == COLLAB_IMAGES
    teacher = build_vit(load_checkpoint(trained_chain.teacher_ckpt))
    x, y = select_rows(trained_chain.fmnist, None, COLLAB_IMAGES)
    assert [int(r['label']) for r in rows] == y.tolist()
    reference = vit_logits(teacher, x)
    assert_logits_close(logits, reference, 'layer-split')
    assert_same_predictions([int(r['pred']) for r in rows], reference, 'layer-split')
