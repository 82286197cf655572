"""A minimal writer of the ONNX export folder the runtime reads (collab/backends.py documents its manifest), for the
tests: torch.onnx.export (TorchScript exporter, opset 17) of each backbone and of the head of a stage-3 checkpoint.
export_onnx.py is the product's exporter; this fixture only has to produce the same contract."""
import json
import os
import warnings

import torch
from torch import nn

import utils
from collab import torch_models
from datasets import default_mean_std
from models.ensemble_model import CONFIG_KEY, load_ensemble, read_ensemble_checkpoint

OPSET = 17


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
