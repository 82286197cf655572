"""What the runtime's tests share: tiny stage-3 checkpoints, their ONNX export, real Fashion-MNIST images as PNG files,
the in-process reference predictions.

`export` is a minimal writer of the export folder the runtime reads (collab/backends.py documents its manifest):
torch.onnx.export (TorchScript exporter, opset 17) of each backbone and of the head. export_onnx.py is the product's
exporter; this fixture only has to produce the same contract.
"""
import json
import os
import warnings

import numpy as np
import torch
from torch import nn

import utils
from collab import torch_models
from datasets import build_dataset, default_mean_std
from models.ensemble_model import CONFIG_KEY, DeViTEnsemble, create_backbone, load_ensemble, read_ensemble_checkpoint

OPSET = 17
STUDENT = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}


def save_ensemble(path, num_devices, embed_dim=32, seed=0, depth=2):
    """A random tiny stage-3 checkpoint in the format ensemble.py writes."""
    torch.manual_seed(seed)
    backbones = [create_backbone('dedeit', {**STUDENT, 'embed_dim': embed_dim, 'depth': depth})
                 for _ in range(num_devices)]
    ens = DeViTEnsemble(backbones, num_classes=10, embed_dim=48)
    utils.save_checkpoint({'model': ens.state_dict(), 'model_ema': None, 'ensemble_config': ens.config,
                           'args': {'dataset': 'fashion_mnist', 'tiny_transforms': True, 'input_size': 28},
                           'epoch': 0, 'best_acc1': 0.0}, path)
    return str(path)


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


class _Head(nn.Module):
    def __init__(self, ensemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, *tokens):
        return self.ensemble.head_forward(list(tokens)).eval_logits()


def export(checkpoint, folder, token_width_override=None):
    """Write folder/device{i}.onnx, head.onnx and manifest.json for the stage-3 checkpoint. token_width_override
    {i: W} writes a manifest claiming another width for device i (to test the refusals)."""
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter('ignore')
        return _export(checkpoint, folder, token_width_override)


def _export(checkpoint, folder, token_width_override):
    os.makedirs(folder, exist_ok=True)
    ckpt = read_ensemble_checkpoint(checkpoint)
    ens = load_ensemble(ckpt).eval()
    size, chans = utils.input_spec(ens.backbones[0])
    mean, std = default_mean_std(chans)
    devices = []
    x = torch.zeros(2, chans, size, size)
    for i, spec in enumerate(ckpt[CONFIG_KEY]['backbones']):
        module = torch_models.load_backbone(ckpt, i, path=checkpoint)
        torch.onnx.export(module, (x,), os.path.join(folder, f'device{i}.onnx'), input_names=['image'],
                          output_names=['tokens'], dynamic_axes={'image': {0: 'batch'}, 'tokens': {0: 'batch'}},
                          opset_version=OPSET, dynamo=False)
        devices.append({'index': i, 'file': f'device{i}.onnx', 'fp16_file': None, 'model': spec['model'],
                        'model_kwargs': spec.get('kwargs') or {}, 'token_width': module.width, 'input': 'image',
                        'output': 'tokens'})
    widths = ens.token_widths()
    names = [f'tokens{i}' for i in range(len(widths))]
    torch.onnx.export(_Head(ens), tuple(torch.zeros(2, w) for w in widths), os.path.join(folder, 'head.onnx'),
                      input_names=names, output_names=['logits'],
                      dynamic_axes={**{n: {0: 'batch'} for n in names}, 'logits': {0: 'batch'}},
                      opset_version=OPSET, dynamo=False)
    for i, w in (token_width_override or {}).items():
        devices[i]['token_width'] = w
    manifest = {'format': 'devit-onnx', 'version': 1, 'opset': OPSET, 'source': os.fspath(checkpoint),
                'source_kind': 'ensemble', 'input': {'size': size, 'channels': chans, 'mean': list(mean),
                                                     'std': list(std)},
                'num_classes': ens.num_classes, 'class_names': None, 'distilled': ens.distilled, 'devices': devices,
                'head': {'file': 'head.onnx', 'fp16_file': None, 'inputs': names, 'output': 'logits'},
                'parity': {}}
    with open(os.path.join(folder, 'manifest.json'), 'w') as f:
        json.dump(manifest, f, indent=1)
    return folder
