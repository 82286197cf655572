"""What a device computes, with PyTorch or with onnxruntime, behind one small interface; and the ensemble head.

A device model has ``index``, ``token_width``, ``input`` ({size, channels, mean, std}), ``spec`` ({model, kwargs}),
``backend``, ``source`` (the file it came from) and ``run(x)``: x float32 B×C×S×S already normalised -> float32
B×W, the tokens it sends (cls | dist). ``describe()`` is what goes into its hello.

- ``--backend torch``: backbone i of a stage-3 checkpoint, built alone (`collab.host.torch_models.TorchDevice`, with
  the same interface); the worker imports it only then, so the onnxruntime path runs where there is no PyTorch.
- ``--backend onnxruntime``: ``device{i}.onnx`` of an export folder (`OnnxDevice`), as its ``manifest.json``
  describes it (collab/manifest.py: the schema and its one reader); with ``fp16`` the export's half-precision copy
  (``devices[i].fp16_file``, ``head.fp16_file``: export_onnx.py --fp16), or, on the TensorRT execution provider,
  the fp32 graph with TensorRT's fp16 kernels. Sessions come from collab/sessions.py, with the process's thread
  count (``--threads``, else OMP_NUM_THREADS) as their intra-op threads.

A file that is missing, unreadable or does not match its manifest (token width, input, head inputs) is a
`ModelError`, one line naming the file.

Device-side module: Python 3.6+, numpy (+ onnxruntime, imported when a session is opened).
"""

import numpy as np

from . import manifest as export_manifest
from .manifest import ModelError
from .sessions import provider_names, session

BACKENDS = ('torch', 'onnxruntime')


# ---------------------------------------------------------------------------------------------------------------
# ONNX exports

def onnx_graph(folder, entry, what, threads, device, fp16):
    """(session, path, precision) of `entry`'s graph: its fp16 copy with `fp16`, except on TensorRT, where the fp32
    graph runs with TensorRT's fp16 kernels (the way TensorRT takes half precision)."""
    tensorrt = provider_names(device)[0] == 'TensorrtExecutionProvider'
    path = export_manifest.graph(entry, folder, what, fp16 and not tensorrt)
    return session(path, threads, device, fp16=fp16), path, 'fp16' if fp16 else 'fp32'


def _names(items):
    return [i.name for i in items]


class OnnxDevice:
    """Device `index` of an export folder: device{index}.onnx (or its fp16 copy) in an onnxruntime session."""

    backend = 'onnxruntime'

    def __init__(self, folder, index, threads=None, device='cpu', fp16=False):
        self.manifest = export_manifest.read(folder)
        entry = export_manifest.device(self.manifest, index, folder)
        self.index = index
        self.session, self.source, self.precision = onnx_graph(folder, entry, f'device {index}', threads, device,
                                                               fp16)
        self.input_name, self.output_name = entry['input'], entry['output']
        if self.input_name not in _names(self.session.get_inputs()):
            raise ModelError(f'{self.source} has no input {self.input_name!r} (it has '
                             f'{", ".join(_names(self.session.get_inputs()))})')
        if self.output_name not in _names(self.session.get_outputs()):
            raise ModelError(f'{self.source} has no output {self.output_name!r} (it has '
                             f'{", ".join(_names(self.session.get_outputs()))})')
        self.input = input_of(self.manifest)
        self.spec = {'model': entry['model'], 'kwargs': entry['model_kwargs']}
        # The width this graph really gives, from one forward: a file swapped for another export's is caught here.
        size, chans = self.input['size'], self.input['channels']
        try:
            probe = self.run(np.zeros((1, chans, size, size), dtype=np.float32))
        except Exception as err:
            raise ModelError(f'{self.source} does not run on a {chans}×{size}×{size} image: '
                             f'{export_manifest.first_line(err)}') from None
        self.token_width = int(probe.shape[-1])
        if probe.ndim != 2 or self.token_width != entry['token_width']:
            raise ModelError(f'{self.source} gives tokens of shape {list(probe.shape)} but '
                             f'{export_manifest.path_of(folder)} says {entry["token_width"]} floats per image')

    def run(self, x):
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)

    def describe(self):
        return describe(self)


def input_of(m):
    """The manifest's input as the runtime passes it around: {size, channels, mean, std}."""
    inp = m['input']
    return {'size': inp['size'], 'channels': inp['channels'], 'mean': [float(v) for v in inp['mean']],
            'std': [float(v) for v in inp['std']]}


def describe(model):
    """The model part of a worker's hello."""
    return {'backend': model.backend, 'source': model.source, 'model': model.spec, 'token_width': model.token_width,
            'input': model.input, 'precision': getattr(model, 'precision', 'fp32')}


class OnnxHead:
    """head.onnx of an export folder (or its fp16 copy): every device's tokens -> logits, a missing device
    zero-filled."""

    backend = 'onnxruntime'

    def __init__(self, folder, threads=None, device='cpu', fp16=False):
        self.manifest = m = export_manifest.read(folder)
        if m['head'] is None:
            raise ModelError(f'{export_manifest.path_of(folder)} has no head (an export of students only): the '
                             'aggregator needs an ensemble export')
        self.session, self.source, self.precision = onnx_graph(folder, m['head'], 'the head', threads, device, fp16)
        self.inputs, self.output = list(m['head']['inputs']), m['head']['output']
        have = _names(self.session.get_inputs())
        if sorted(have) != sorted(self.inputs):
            raise ModelError(f'{self.source} has inputs {", ".join(have)}; the manifest says {", ".join(self.inputs)}')
        if self.output not in _names(self.session.get_outputs()):
            raise ModelError(f'{self.source} has no output {self.output!r} (it has '
                             f'{", ".join(_names(self.session.get_outputs()))})')
        self.widths = [d['token_width'] for d in m['devices']]
        declared = {a.name: a.shape for a in self.session.get_inputs()}
        for i, (name, width) in enumerate(zip(self.inputs, self.widths)):
            last = declared[name][-1] if declared[name] else None
            if isinstance(last, int) and last != width:
                raise ModelError(f'{self.source} takes {last} floats per image as {name} but '
                                 f'{export_manifest.path_of(folder)} says device {i} sends {width}')
        self.num_classes = m['num_classes']
        self.class_names = m['class_names']
        self.input = input_of(m)
        self.specs = [{'model': d['model'], 'kwargs': d['model_kwargs']} for d in m['devices']]

    def run(self, tokens):
        """tokens: one B×W_i array (or None: missing) per device -> B×K float32 logits."""
        batch = next(t.shape[0] for t in tokens if t is not None)
        feed = {name: (np.zeros((batch, w), dtype=np.float32) if t is None else np.asarray(t, dtype=np.float32))
                for name, w, t in zip(self.inputs, self.widths, tokens)}
        return np.asarray(self.session.run([self.output], feed)[0], dtype=np.float32)
