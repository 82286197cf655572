"""What a device computes, with PyTorch or with onnxruntime, behind one small interface; and the ensemble head.

A device model has ``index``, ``token_width``, ``input`` ({size, channels, mean, std}), ``spec`` ({model, kwargs}),
``backend``, ``source`` (the file it came from) and ``run(x)``: x float32 B×C×S×S already normalised -> float32
B×W, the tokens it sends (cls | dist). ``describe()`` is what goes into its hello.

- ``--backend torch``: backbone i of a stage-3 checkpoint, built alone (`TorchDevice`); PyTorch is imported only
  then, so the onnxruntime path runs where there is none.
- ``--backend onnxruntime``: ``device{i}.onnx`` of an export folder (`OnnxDevice`), described by its
  ``manifest.json``:

      {"format": "devit-onnx", "version": 1, "opset": 17, "source": CHECKPOINT, "source_kind": "ensemble"|"students",
       "input": {"size": S, "channels": C, "mean": [...], "std": [...]}, "num_classes": K,
       "class_names": [...]|null, "distilled": bool,
       "devices": [{"index": i, "file": "device{i}.onnx", "fp16_file": ...|null, "model": NAME, "model_kwargs": {...},
                    "token_width": W_i, "input": "image", "output": "tokens"}, ...],
       "head": {"file": "head.onnx", "fp16_file": ...|null, "inputs": ["tokens0", ...], "output": "logits"}|null,
       "parity": {...}}

  device{i}.onnx: "image" float32 [B,C,S,S] -> "tokens" float32 [B,W_i]; head.onnx: "tokens{i}" [B,W_i] (a missing
  device zero-filled) -> "logits" [B,K]. Each session gets the process's thread count (``--threads``, else
  OMP_NUM_THREADS) as its intra-op threads.

A file that is missing, unreadable or does not match its manifest (token width, input) is a `ModelError`, one line
naming the file.

Device-side module: Python 3.6+, numpy (+ onnxruntime or torch, imported when used).
"""
import json
import os

import numpy as np

MANIFEST = 'manifest.json'
FORMAT = 'devit-onnx'
BACKENDS = ('torch', 'onnxruntime')


class ModelError(ValueError):
    """A model file that cannot be used: missing, unreadable, or not matching its manifest or the head."""


def default_threads(threads=None):
    """Intra-op threads: `threads`, else OMP_NUM_THREADS, else None (the library's default)."""
    if threads:
        return int(threads)
    env = os.environ.get('OMP_NUM_THREADS', '')
    return int(env) if env.isdigit() and int(env) > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# ONNX exports

def read_manifest(folder):
    """The manifest of an export folder, checked; ModelError naming the file otherwise."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise ModelError(f'{folder} is not a folder: --backend onnxruntime takes the folder export_onnx.py wrote')
    if not os.path.isfile(path):
        raise ModelError(f'{path} not found: not an export folder (write one with export_onnx.py)')
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as err:
        raise ModelError(f'cannot read {path}: {err}') from None
    if not isinstance(m, dict) or m.get('format') != FORMAT:
        raise ModelError(f'{path} is not a DeViT ONNX manifest (format {FORMAT!r} expected)')
    if m.get('version') != 1:
        raise ModelError(f'{path} has version {m.get("version")!r}; this runtime reads version 1')
    try:
        inp = m['input']
        int(inp['size']), int(inp['channels']), list(inp['mean']), list(inp['std'])
        devices = m['devices']
        for d in devices:
            int(d['index']), str(d['file']), int(d['token_width'])
        if sorted(int(d['index']) for d in devices) != list(range(len(devices))) or not devices:
            raise ValueError('device indices must be 0..N-1')
        int(m['num_classes'])
        head = m.get('head')
        if head is not None:
            str(head['file'])
            if len(head['inputs']) != len(devices):
                raise ValueError(f'the head has {len(head["inputs"])} inputs for {len(devices)} devices')
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f'{path} is incomplete or malformed: {err}') from None
    return m


def device_entry(manifest, index, folder):
    for d in manifest['devices']:
        if int(d['index']) == index:
            return d
    raise ModelError(f'{os.path.join(folder, MANIFEST)} has {len(manifest["devices"])} devices; there is no '
                     f'device {index}')


def providers_for(device):
    """onnxruntime execution providers for --device (cpu, cuda, tensorrt), those this onnxruntime has."""
    import onnxruntime as ort

    wanted = {'cpu': ['CPUExecutionProvider'],
              'cuda': ['CUDAExecutionProvider', 'CPUExecutionProvider'],
              'tensorrt': ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider']}
    if (device or 'cpu').split(':')[0] not in wanted:
        raise ValueError(f'--device for onnxruntime must be cpu, cuda or tensorrt, got {device!r}')
    have = set(ort.get_available_providers())
    chosen = [p for p in wanted[(device or 'cpu').split(':')[0]] if p in have]
    if chosen[0] != wanted[(device or 'cpu').split(':')[0]][0]:
        raise ValueError(f'--device {device}: this onnxruntime has only {", ".join(sorted(have))}')
    return chosen


def onnx_session(path, threads=None, device='cpu'):
    """An onnxruntime session of `path` with `threads` intra-op threads; ModelError naming the file if unusable."""
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise ModelError(f'{path} not found (listed in {MANIFEST})')
    options = ort.SessionOptions()
    threads = default_threads(threads)
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: a board's log is not the place for onnxruntime's notes
    try:
        return ort.InferenceSession(path, options, providers=providers_for(device))
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f'cannot load {path}: {first}') from None


def _names(items):
    return [i.name for i in items]


class OnnxDevice:
    """Device `index` of an export folder: device{index}.onnx in an onnxruntime session."""

    backend = 'onnxruntime'

    def __init__(self, folder, index, threads=None, device='cpu'):
        self.manifest = read_manifest(folder)
        entry = device_entry(self.manifest, index, folder)
        self.index = index
        self.source = os.path.join(folder, entry['file'])
        self.session = onnx_session(self.source, threads, device)
        self.input_name, self.output_name = entry.get('input', 'image'), entry.get('output', 'tokens')
        if self.input_name not in _names(self.session.get_inputs()):
            raise ModelError(f'{self.source} has no input {self.input_name!r} (it has '
                             f'{", ".join(_names(self.session.get_inputs()))})')
        if self.output_name not in _names(self.session.get_outputs()):
            raise ModelError(f'{self.source} has no output {self.output_name!r} (it has '
                             f'{", ".join(_names(self.session.get_outputs()))})')
        inp = self.manifest['input']
        self.input = {'size': int(inp['size']), 'channels': int(inp['channels']),
                      'mean': [float(v) for v in inp['mean']], 'std': [float(v) for v in inp['std']]}
        self.spec = {'model': entry.get('model'), 'kwargs': entry.get('model_kwargs') or {}}
        # The width this graph really gives, from one forward: a file swapped for another export's is caught here.
        try:
            probe = self.run(np.zeros((1, self.input['channels'], self.input['size'], self.input['size']),
                                      dtype=np.float32))
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelError(f'{self.source} does not run on a {self.input["channels"]}×{self.input["size"]}×'
                             f'{self.input["size"]} image: {first}') from None
        self.token_width = int(probe.shape[-1])
        if probe.ndim != 2 or self.token_width != int(entry['token_width']):
            raise ModelError(f'{self.source} gives tokens of shape {list(probe.shape)} but '
                             f'{os.path.join(folder, MANIFEST)} says {entry["token_width"]} floats per image')

    def run(self, x):
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)

    def describe(self):
        return describe(self)


def describe(model):
    """The model part of a worker's hello."""
    return {'backend': model.backend, 'source': model.source, 'model': model.spec, 'token_width': model.token_width,
            'input': model.input}


class OnnxHead:
    """head.onnx of an export folder: every device's tokens -> logits, a missing device zero-filled."""

    backend = 'onnxruntime'

    def __init__(self, folder, threads=None, device='cpu'):
        self.manifest = m = read_manifest(folder)
        if m.get('head') is None:
            raise ModelError(f'{os.path.join(folder, MANIFEST)} has no head (an export of students only): the '
                             'aggregator needs an ensemble export')
        self.source = os.path.join(folder, m['head']['file'])
        self.session = onnx_session(self.source, threads, device)
        self.inputs, self.output = list(m['head']['inputs']), m['head'].get('output', 'logits')
        have = _names(self.session.get_inputs())
        if sorted(have) != sorted(self.inputs):
            raise ModelError(f'{self.source} has inputs {", ".join(have)}; the manifest says {", ".join(self.inputs)}')
        devices = sorted(m['devices'], key=lambda d: int(d['index']))
        self.widths = [int(d['token_width']) for d in devices]
        declared = {a.name: a.shape for a in self.session.get_inputs()}
        for i, (name, width) in enumerate(zip(self.inputs, self.widths)):
            last = declared[name][-1] if declared[name] else None
            if isinstance(last, int) and last != width:
                raise ModelError(f'{self.source} takes {last} floats per image as {name} but '
                                 f'{os.path.join(folder, MANIFEST)} says device {i} sends {width}')
        self.num_classes = int(m['num_classes'])
        self.class_names = m.get('class_names')
        inp = m['input']
        self.input = {'size': int(inp['size']), 'channels': int(inp['channels']),
                      'mean': [float(v) for v in inp['mean']], 'std': [float(v) for v in inp['std']]}
        self.specs = [{'model': d.get('model'), 'kwargs': d.get('model_kwargs') or {}} for d in devices]

    def run(self, tokens):
        """tokens: one B×W_i array (or None: missing) per device -> B×K float32 logits."""
        batch = next(t.shape[0] for t in tokens if t is not None)
        feed = {name: (np.zeros((batch, w), dtype=np.float32) if t is None else np.asarray(t, dtype=np.float32))
                for name, w, t in zip(self.inputs, self.widths, tokens)}
        return np.asarray(self.session.run([self.output], feed)[0], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch

class TorchDevice:
    """Device `index` of a stage-3 checkpoint: that backbone alone, built and loaded by key name."""

    backend = 'torch'

    def __init__(self, checkpoint, index, ema=False, device=None, local_rank=0, threads=None):
        import torch

        from . import torch_models

        if default_threads(threads):
            torch.set_num_threads(default_threads(threads))
        self.torch = torch
        self.device = torch_models.compute_device(device, local_rank)
        self.module, self.input, self.spec = torch_models.load_device(checkpoint, index, ema)
        self.module.to(self.device)
        self.index, self.source, self.token_width = index, os.fspath(checkpoint), self.module.width

    def run(self, x):
        torch = self.torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
            return out.float().cpu().numpy()

    def describe(self):
        return describe(self)


class TorchHead:
    """The head of a stage-3 ensemble (its backbones are not used here)."""

    backend = 'torch'

    def __init__(self, ensemble):
        import torch

        self.torch, self.ensemble = torch, ensemble
        self.widths = ensemble.token_widths()
        self.num_classes = ensemble.num_classes
        self.specs = [dict(s) for s in ensemble.config['backbones']]

    def run(self, tokens):
        torch = self.torch
        with torch.inference_mode():
            t = [None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in tokens]
            return self.ensemble.head_forward(t).eval_logits().numpy()


class TorchStage:
    """Layer-split baseline: blocks of stage `index` of `num_stages` of a timm teacher (random weights unless a
    checkpoint is given). The teacher is built at `prepare`, once the aggregator has said how many classes."""

    backend = 'torch'

    def __init__(self, name, kwargs, path, seed, index, num_stages, device=None, local_rank=0, threads=None):
        import torch

        from . import torch_models

        if default_threads(threads):
            torch.set_num_threads(default_threads(threads))
        self.torch, self.tm = torch, torch_models
        self.name, self.kwargs, self.path, self.seed = name, dict(kwargs), path, seed
        self.index, self.num_stages = index, num_stages
        self.device = torch_models.compute_device(device, local_rank)
        size, chans, tokens, dim = torch_models.teacher_shape(name, kwargs)
        self.input = {'size': size, 'channels': chans}
        self.activation = [tokens, dim]
        self.spec = {'model': name, 'kwargs': self.kwargs}
        self.source = path or f'(random weights, seed {seed})'
        self.stage = None

    def prepare(self, num_classes):
        teacher = self.tm.build_teacher(self.name, self.kwargs, num_classes, self.path, self.seed)
        self.stage = self.tm.split_stages(teacher, self.num_stages)[self.index].to(self.device)

    def run(self, x):
        torch = self.torch
        with torch.inference_mode():
            return self.stage(torch.from_numpy(np.ascontiguousarray(x)).to(self.device)).float().cpu().numpy()

    def describe(self):
        return {'backend': self.backend, 'source': self.source, 'model': self.spec, 'activation': self.activation,
                'input': self.input}
