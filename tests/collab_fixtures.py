"""What the runtime's and the exporter's tests share: tiny stage-3 checkpoints (random or briefly trained on real
Fashion-MNIST images), their ONNX export by export_onnx.py's own code, real test images as PNG files, and the
in-process reference predictions.
"""
import hashlib
import os
import shutil

import numpy as np
import torch

import export_onnx
import utils
from data_transforms import default_mean_std
from datasets import build_dataset
from models.ensemble_model import DeViTEnsemble, create_backbone, load_ensemble

STUDENT = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}


def save_stage3(path, ensemble, data_path=None, **args):
    """The stage-3 checkpoint format of engine.fit + ensemble.py: weights, EMA, config, args, stage."""
    utils.save_checkpoint({'model': ensemble.state_dict(), 'model_ema': None, 'ensemble_config': ensemble.config,
                           'stage': 3, 'num_classes': ensemble.num_classes, 'epoch': 0, 'best_acc1': 0.0,
                           'args': {'dataset': 'fashion_mnist', 'data_path': data_path, 'tiny_transforms': True,
                                    'input_size': 28, **args}}, path)
    return str(path)


def save_ensemble(path, num_devices, embed_dim=32, seed=0, depth=2):
    """A random tiny stage-3 checkpoint (`num_devices` dedeit students of width `embed_dim`, 10 classes)."""
    torch.manual_seed(seed)
    backbones = [create_backbone('dedeit', {**STUDENT, 'embed_dim': embed_dim, 'depth': depth})
                 for _ in range(num_devices)]
    return save_stage3(path, DeViTEnsemble(backbones, num_classes=10, embed_dim=48))


def train_briefly(ensemble, fmnist_root, steps=25, batch=64):
    """A few AdamW steps of `ensemble` (both heads, cross-entropy) on real training images; its accuracy on them."""
    ds = build_dataset('fashion_mnist', fmnist_root, 'train', input_size=28, in_chans=1, tiny=True)
    x = torch.stack([ds[i][0] for i in range(steps * batch // 4)])
    y = torch.tensor([ds[i][1] for i in range(len(x))])
    opt = torch.optim.AdamW(ensemble.parameters(), lr=3e-3)
    ensemble.train()
    for _step in range(steps):
        idx = torch.randint(len(x), (batch,))
        out = ensemble(x[idx])
        loss = torch.nn.functional.cross_entropy(out.logits, y[idx]) + \
            torch.nn.functional.cross_entropy(out.logits_dist, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ensemble.eval()
    with torch.inference_mode():
        return float((ensemble(x).argmax(1) == y).float().mean())


_EXPORTED = {}  # sha256 of a checkpoint (and the options) -> the folder its export was first written to


def export(checkpoint, folder, fp16=False, parity_images=4):
    """export_onnx.py (its main, in this process) of `checkpoint` into `folder`. A checkpoint with the same bytes
    exported before in this test session is copied from there (save_ensemble is deterministic), since a
    torch.export of each graph takes seconds."""
    with open(checkpoint, 'rb') as f:
        key = (hashlib.sha256(f.read()).hexdigest(), fp16, parity_images)
    folder = os.fspath(folder)
    if key in _EXPORTED and os.path.isdir(_EXPORTED[key]):
        shutil.copytree(_EXPORTED[key], folder)
        return folder
    export_onnx.main(['--model-path', os.fspath(checkpoint), '--output_dir', folder, '--parity-images',
                      str(parity_images), *(['--fp16'] if fp16 else [])])
    _EXPORTED[key] = folder
    return folder


def images(fmnist_root, k, start=0):
    """The first k Fashion-MNIST test images (tiny transforms, 1×28×28) and their labels."""
    ds = build_dataset('fashion_mnist', fmnist_root, 'val', input_size=28, in_chans=1, tiny=True)
    x, y = zip(*(ds[i] for i in range(start, start + k)))
    return torch.stack(x), torch.tensor(y)


def write_pngs(x, folder):
    """Normalised 1×28×28 images back to the PNG files a camera would send; their paths."""
    from PIL import Image

    mean, std = default_mean_std(1)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(x):
        pixels = np.clip(np.round((img[0].numpy() * std[0] + mean[0]) * 255), 0, 255).astype(np.uint8)
        paths.append(os.path.join(folder, f'img{i}.png'))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def reference(ckpt, x, present=None):
    """Predictions of the ensemble in this process (devices with present False zero-filled)."""
    ens = load_ensemble(ckpt).eval()
    with torch.inference_mode():
        tokens = [ens.device_tokens(i, x) for i in range(ens.num_devices)]
        return ens.head_forward(tokens, present).eval_logits().argmax(1).tolist()
