"""ONNX export of DeViT models for edge runtimes (onnxruntime, TensorRT), with parity checked before anything is kept.

An export folder holds one graph per device and one for the aggregator, plus `manifest.json`:
- `device{i}.onnx`: input `image` float32 B×C×S×S, already normalised -> output `tokens` float32 B×W_i, what device
  i sends (`models.features.prefix_tokens(backbone, image, dist=distilled)`: its cls token, then its dist token);
- `head.onnx`: inputs `tokens0` ... `tokens{N-1}` (B×W_i each; a missing device is fed zeros) -> output `logits`
  float32 B×K (`DeViTEnsemble.head_forward(tokens).eval_logits()`);
- with `fp16`, `*.fp16.onnx` copies whose weights and arithmetic are half precision and whose inputs and outputs
  stay float32 (Cast nodes at the edges), so they take the same feeds.
The batch dimension is dynamic (`batch`) everywhere. The manifest follows collab/manifest.py (the runtime's schema
and reader), which checks it before it is written; graphs are run for parity in sessions of collab/sessions.py, as
the runtime's workers open them.

The graphs come from `torch.onnx.export(dynamo=True)` (torch.export, then onnxscript's translation and optimiser):
it gives plain default-domain graphs with no Identity/Constant clutter, where the TorchScript exporter (deprecated
and slated for removal) leaves Where/Equal/ConstantOfShape patterns around dynamic shapes. The exporter writes
opset 18; `onnx.version_converter` takes it to 17, Shape(start, end) and Reshape(allowzero) are rewritten into the
forms every TensorRT parser reads (`_plain_shapes`), and the IR version is set to the oldest of the opset:
- 17 (default): TensorRT 8.6 to 10 (JetPack 6, TensorRT 8.6/10 on PCs) and onnxruntime >= 1.12 import it, and 17
  is the first opset with LayerNormalization, which TensorRT maps to one fused layer;
- 13: for TensorRT 8.2 (JetPack 4.6, the Nano's last) and 8.5 (JetPack 5.1), whose ONNX parsers have no
  LayerNormalization importer: each LayerNormalization is written out in ReduceMean/Sub/Mul/Add/Sqrt/Div, then
  the graph, whose other operators mean the same at 13, is declared opset 13 (`_relabel_opset13`).
Attention is exported from PyTorch's scaled_dot_product_attention as MatMul/Softmax (never Einsum, never the
`com.microsoft` attention ops that TensorRT has no importer for); `check_ops` refuses any graph with an operator
outside `TENSORRT_OPS` or the default domain, so a model that would fail the engine build on a board fails here.
"""
import contextlib
import ctypes
import inspect
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from collab import manifest as export_manifest
from collab.manifest import FORMAT, VERSION
from collab.sessions import session
from models.checkpoint import args_dict, read_checkpoint
from models.ensemble_model import CONFIG_KEY, DeViTEnsemble, load_ensemble, load_students, student_checkpoint_paths
from models.features import DeviceTokens

OPSETS = (17, 13)
# The oldest IR version of each opset (onnx 1.12 / 1.8): onnxruntime refuses a model with a newer IR version than
# its own (1.16, as on JetPack 5 boards, reads up to IR 9), and the graphs need nothing newer.
IR_VERSIONS = {17: 8, 13: 7}
EXPORTER_OPSET = 18  # what torch.onnx.export(dynamo=True) writes natively; converted down to the target opset
FP32_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| on tokens and logits, fp32 graphs
# fp16 graphs: max |onnxruntime fp16 - PyTorch fp32| <= FP16_RELATIVE_TOLERANCE x max(1, max |PyTorch fp32|), per
# output (half precision keeps 11 significant bits, 4.9e-4 relative per rounding, and a dozen blocks add up)
FP16_RELATIVE_TOLERANCE = 2e-2

# Default-domain operators the exported graphs may contain: each has a native importer in TensorRT's ONNX parser
# (8.2 to 10; LayerNormalization from 8.6, opset 17) and an onnxruntime CPU/CUDA kernel. docs/deployment.md lists
# the ones that appear.
TENSORRT_OPS = frozenset({
    'Add', 'Cast', 'Concat', 'Constant', 'Conv', 'Div', 'Erf', 'Expand', 'Flatten', 'Gather', 'Gemm',
    'LayerNormalization', 'MatMul', 'MaxPool', 'Mul', 'ReduceMean', 'Relu', 'Reshape', 'Shape', 'Slice', 'Softmax',
    'Split', 'Sqrt', 'Squeeze', 'Sub', 'Transpose', 'Unsqueeze',
})


class ExportError(ValueError):
    """A source that cannot be exported, a graph TensorRT could not import, or failed parity; one clear line."""


# ----------------------------------------------------------------------------------------------------------------
# What is exported
# ----------------------------------------------------------------------------------------------------------------

class HeadGraph(nn.Module):
    """The aggregator's graph: N devices' tokens -> eval logits B×K (zeros stand for a missing device)."""

    def __init__(self, ensemble: DeViTEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, *tokens: torch.Tensor) -> torch.Tensor:
        return self.ensemble.head_forward(list(tokens)).eval_logits()


class Source(NamedTuple):
    """What a checkpoint (or stage-2 folder) gives to export.

    kind: 'ensemble' (stage 3: backbones + head) or 'students' (stage 2: backbones only, head None).
    backbones: eval-mode students without classifier, in device order; distilled: whether each sends cls + dist.
    args: the training arguments recorded in the (first) checkpoint; devices: per-device facts for the manifest
    (the checkpoint it came from, and for students their division and global classes).
    split: the split manifest found beside stage-2 checkpoints, or None.
    """
    kind: str
    path: str
    backbones: list[nn.Module]
    distilled: bool
    head: HeadGraph | None
    num_classes: int
    args: dict[str, Any]
    devices: list[dict[str, Any]]
    split: dict[str, Any] | None


def _args_dict(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    return args_dict(ckpt.get('args')) or {}


def _split_manifest(*folders: str | None) -> dict[str, Any] | None:
    from datasets import DatasetError, read_manifest  # the split's reader; datasets is light to import

    for folder in folders:
        if folder and os.path.isdir(folder):
            try:
                manifest = read_manifest(folder)
            except DatasetError:
                continue
            if manifest is not None:
                return manifest
    return None


def _students(path: str, paths: list[str], use_ema: bool) -> Source:
    ckpts = []
    for p in paths:
        ckpt = read_checkpoint(p)
        stage = ckpt.get('stage')
        if stage not in (None, 2) or (stage is None and not _args_dict(ckpt).get('model')):
            raise ExportError(f'{p} is {_describe(ckpt)}; a students export takes stage-2 checkpoints '
                              '(distill_sub.py or shrink.py)')
        ckpts.append(ckpt)
    args = _args_dict(ckpts[0])
    split = _split_manifest(path if os.path.isdir(path) else os.path.dirname(os.path.dirname(path)),
                            args.get('data_path'))
    classes = [list(c.get('classes') or []) for c in ckpts]
    num_classes = int(split['num_classes']) if split and split.get('num_classes') else sum(map(len, classes))
    # The head is not exported: a one-unit placeholder is what load_students needs to build the ensemble.
    ens = load_students(paths, num_classes=max(num_classes, 1), embed_dim=1, use_ema=use_ema).eval()
    devices = [{'checkpoint': p, 'division': c.get('division'), 'classes': cl or None}
               for p, c, cl in zip(paths, ckpts, classes, strict=True)]
    return Source('students', path, list(ens.backbones), ens.distilled, None, num_classes, args, devices, split)


def _describe(ckpt: Mapping[str, Any]) -> str:
    stage = ckpt.get('stage')
    if stage == 1:
        return 'a stage-1 checkpoint (a sub-teacher)'
    if stage is not None:
        return f'a stage-{stage} checkpoint'
    return f'not a DeViT stage checkpoint (no "stage", no "{CONFIG_KEY}", no args["model"])'


def load_source(path: str | os.PathLike, use_ema: bool = False) -> Source:
    """The models of `path`: a stage-3 checkpoint (or its output folder holding checkpoint.pth), a stage-2 output
    folder (sub-dataset{i}/checkpoint.pth) or one stage-2 student checkpoint. Anything else: ExportError."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, 'sub-dataset0')):
            return _students(path, student_checkpoint_paths(path), use_ema)
        if os.path.isfile(os.path.join(path, 'checkpoint.pth')):
            path = os.path.join(path, 'checkpoint.pth')
        else:
            raise ExportError(f'{path} holds neither checkpoint.pth (stage 3) nor sub-dataset0/checkpoint.pth '
                              '(stage 2)')
    elif not os.path.exists(path):
        raise ExportError(f'--model-path {path} does not exist')
    ckpt = read_checkpoint(path)
    if CONFIG_KEY not in ckpt:
        if ckpt.get('stage') == 2 or (ckpt.get('stage') is None and _args_dict(ckpt).get('model')):
            return _students(path, [path], use_ema)
        raise ExportError(f'{path} is {_describe(ckpt)}; give a stage-3 ensemble checkpoint (ensemble.py), a '
                          'stage-2 output folder or a stage-2 student checkpoint')
    args = _args_dict(ckpt)
    del ckpt  # load_ensemble reads the file again, so that its errors name it
    ens = load_ensemble(path, use_ema=use_ema).eval()
    devices = [{'checkpoint': path} for _ in range(ens.num_devices)]
    return Source('ensemble', path, list(ens.backbones), ens.distilled, HeadGraph(ens).eval(), ens.num_classes,
                  args, devices, None)


def input_spec(backbones: Sequence[nn.Module]) -> tuple[int, int]:
    """(image size, channels) every backbone takes; ExportError when they differ."""
    specs = [(int(b.patch_embed.img_size[0]), int(b.patch_embed.proj.in_channels)) for b in backbones]
    if len(set(specs)) != 1:
        raise ExportError(f'the backbones take different inputs (size, channels): {specs}')
    return specs[0]


def backbone_spec(backbone: nn.Module) -> tuple[str, dict[str, Any]]:
    spec = getattr(backbone, 'devit_spec', None) or {}
    return spec.get('model') or type(backbone).__name__, dict(spec.get('kwargs') or {})


# ----------------------------------------------------------------------------------------------------------------
# Graphs
# ----------------------------------------------------------------------------------------------------------------

def _decompose_layer_norm(model) -> int:
    """Rewrite every LayerNormalization (last axis) into opset-13 primitives, in place; returns how many."""
    import onnx
    from onnx import helper

    nodes, count = [], 0
    for node in model.graph.node:
        if node.op_type != 'LayerNormalization' or node.domain not in ('', 'ai.onnx'):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get('axis', -1) != -1 or attrs.get('stash_type', 1) != 1 or len(node.output) > 1:
            raise ExportError(f'LayerNormalization {node.name} over axis {attrs.get("axis")} cannot be rewritten '
                              'for opset 13')
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        p = f'{node.name or "ln"}_{count}'
        eps = f'{p}_eps'
        model.graph.initializer.append(onnx.numpy_helper.from_array(
            np.array(attrs.get('epsilon', 1e-5), dtype=np.float32), eps))
        nodes += [helper.make_node('ReduceMean', [x], [f'{p}_mean'], axes=[-1], keepdims=1),
                  helper.make_node('Sub', [x, f'{p}_mean'], [f'{p}_d']),
                  helper.make_node('Mul', [f'{p}_d', f'{p}_d'], [f'{p}_d2']),
                  helper.make_node('ReduceMean', [f'{p}_d2'], [f'{p}_var'], axes=[-1], keepdims=1),
                  helper.make_node('Add', [f'{p}_var', eps], [f'{p}_var_eps']),
                  helper.make_node('Sqrt', [f'{p}_var_eps'], [f'{p}_sd']),
                  helper.make_node('Div', [f'{p}_d', f'{p}_sd'], [f'{p}_norm']),
                  helper.make_node('Mul', [f'{p}_norm', scale], [node.output[0] if bias is None else f'{p}_scaled'])]
        if bias is not None:
            nodes.append(helper.make_node('Add', [f'{p}_scaled', bias], [node.output[0]]))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def _plain_shapes(model) -> None:
    """Rewrite the exporter's opset-14/15 shape forms into ones every TensorRT parser (8.2 on) reads, in place:
    Shape with start/end -> Shape + Slice; Reshape's allowzero dropped where it is 0 (the default) or where the
    target shape is a constant without zeros (there it changes nothing)."""
    import onnx
    from onnx import helper, numpy_helper

    consts = {i.name: i for i in model.graph.initializer}
    nodes = []
    for k, node in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == 'Reshape' and 'allowzero' in attrs and (not attrs['allowzero'] or (
                node.input[1] in consts and not (numpy_helper.to_array(consts[node.input[1]]) == 0).any())):
            del node.attribute[:]  # allowzero is Reshape's only attribute
        if node.op_type == 'Shape' and ({'start', 'end'} & attrs.keys()):
            full, p = f'{node.output[0]}_full', f'{node.name or "shape"}_{k}'
            bounds = {'starts': attrs.get('start', 0), 'ends': attrs.get('end', np.iinfo(np.int64).max), 'axes': 0}
            for key, value in bounds.items():
                model.graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64),
                                                                       f'{p}_{key}'))
            nodes += [helper.make_node('Shape', [node.input[0]], [full], name=node.name),
                      helper.make_node('Slice', [full, f'{p}_starts', f'{p}_ends', f'{p}_axes'], list(node.output),
                                       name=f'{p}_slice')]
            continue
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)


# Operators whose opset-17 and opset-13 forms are the same (the versions between only widened their types or added
# attributes checked by _relabel_opset13); onnx's version converter has no 15 -> 14 adapter for Shape.
_SAME_AT_13 = TENSORRT_OPS - {'LayerNormalization'}


def _relabel_opset13(model) -> None:
    """Declare an opset-17 graph as opset 13, after checking each node means the same there (onnx.checker then
    validates every node against its opset-13 schema)."""
    from onnx import helper

    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type not in _SAME_AT_13 or (node.op_type == 'Shape' and ({'start', 'end'} & attrs.keys())) \
                or (node.op_type == 'Reshape' and attrs.get('allowzero', 0)):
            raise ExportError(f'{node.op_type} node {node.name} has no opset-13 equivalent')
    for entry in model.opset_import:
        if entry.domain in ('', 'ai.onnx'):
            entry.version = 13


def _summary(err: BaseException) -> str:
    """One line for an exporter error: its 'Exception summary' line when it has one (torch.onnx wraps the real
    error in pages of advice), else its first line; terminal colour codes removed."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(err)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class '")), None)
    if summary is not None:
        return re.sub(r"^<class '([\w.]+)'>:\s*", lambda m: m.group(1).rsplit('.', 1)[-1] + ': ', summary)
    return f'{type(err).__name__}: {lines[0] if lines else ""}'


def export_graph(module: nn.Module, inputs: Sequence[torch.Tensor], input_names: Sequence[str], output_name: str,
                 path: str, opset: int = 17, doc: str = '') -> None:
    """torch.onnx.export(dynamo=True) of `module(*inputs)` with a dynamic batch dimension, converted to `opset`,
    checked (onnx.checker, TENSORRT_OPS) and saved to `path`."""
    import onnx

    if opset not in OPSETS:
        raise ExportError(f'opset {opset} is not supported; choose one of {", ".join(map(str, OPSETS))}')
    batch = torch.export.Dim('batch')
    dynamic = ({0: batch},) * len(inputs)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):  # HeadGraph(*tokens): one varargs entry
        dynamic = (dynamic,)
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter('ignore')
            program = torch.onnx.export(module, tuple(inputs), None, input_names=list(input_names),
                                        output_names=[output_name], opset_version=EXPORTER_OPSET, dynamo=True,
                                        dynamic_shapes=dynamic, verbose=False, optimize=True)
    except Exception as e:  # torch.export / translation errors come as many types; all mean "not exportable"
        raise ExportError(f'torch.onnx.export failed for {os.path.basename(path)}: {_summary(e)}') from e
    model = program.model_proto
    try:
        model = onnx.version_converter.convert_version(model, 17)
        _plain_shapes(model)
        if opset == 13:
            _decompose_layer_norm(model)
            _relabel_opset13(model)
        if len(model.functions):
            raise ExportError(f'the exporter left {len(model.functions)} local functions in the graph')
        model.ir_version = IR_VERSIONS[opset]
        onnx.checker.check_model(model, full_check=True)
    except ExportError:
        raise
    except Exception as e:  # onnx raises its own ValidationError / ConvertError / RuntimeError
        raise ExportError(f'{os.path.basename(path)}: conversion to opset {opset} failed: {type(e).__name__}: '
                          f'{str(e).strip().splitlines()[0] if str(e).strip() else ""}') from e
    model.doc_string = doc
    check_ops(model, os.path.basename(path))
    onnx.save(model, path)


def op_types(model) -> Counter:
    """Counter of (domain, op_type) over the graph's nodes ('' is the default domain), subgraphs included."""
    import onnx

    if isinstance(model, str | os.PathLike):
        model = onnx.load(os.fspath(model), load_external_data=False)
    counts: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            counts[(node.domain or '', node.op_type)] += 1
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField('g') else []) + list(attr.graphs):
                    walk(g)
    walk(model.graph)
    return counts


def check_ops(model, name: str) -> list[str]:
    """The graph's operator types; ExportError naming any outside the default domain or TENSORRT_OPS."""
    ops = op_types(model)
    foreign = sorted(f'{d}.{t}' for d, t in ops if d not in ('', 'ai.onnx'))
    unknown = sorted(t for d, t in ops if d in ('', 'ai.onnx') and t not in TENSORRT_OPS)
    if foreign or unknown:
        raise ExportError(f'{name} has operators TensorRT cannot import: {", ".join(foreign + unknown)}')
    return sorted({t for _, t in ops})


def sort_nodes(graph) -> None:
    """Order the nodes of `graph` so each comes after the producers of its inputs (ONNX requires it; TensorRT's
    parser reads nodes in order), keeping the original order where it already is one."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {''}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            names = ', '.join(n.name or n.op_type for n in pending[:4])
            raise ExportError(f'graph {graph.name!r} has a cycle or an undefined input at {names}')
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        for n in ready:
            ordered.append(n)
            known.update(n.output)
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def to_fp16(src: str, dst: str) -> None:
    """Half-precision copy of `src` (weights and arithmetic fp16; float32 inputs and outputs kept)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "value out of fp16 range, clipped": parity reports what it costs
            model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
        sort_nodes(model.graph)  # the converter appends its input Casts after their consumers
        onnx.checker.check_model(model, full_check=True)
    except ExportError:
        raise
    except Exception as e:  # onnx's ValidationError and the converter's errors are not ValueErrors
        raise ExportError(f'fp16 conversion of {os.path.basename(src)} failed: {type(e).__name__}: '
                          f'{(str(e).strip().splitlines() or [""])[0]}') from e
    check_ops(model, os.path.basename(dst))
    onnx.save(model, dst)


# ----------------------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------------------

def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _run_chunks(sess, feeds: dict[str, np.ndarray], chunks: Sequence[slice]) -> np.ndarray:
    """Run `sess` on consecutive slices of the batch (batch 1 first: the dynamic batch dimension is exercised)."""
    return np.concatenate([sess.run(None, {k: v[c] for k, v in feeds.items()})[0] for c in chunks])


def parity(source: Source, folder: str, images: torch.Tensor, suffix: str = '', tolerance: float = FP32_TOLERANCE,
           relative: bool = False) -> dict[str, Any]:
    """Run the graphs `device{i}{suffix}.onnx` (and `head{suffix}.onnx`) of `folder` with onnxruntime on `images`
    and compare with PyTorch: tokens of each device, logits of the chain device graphs -> head graph, logits with
    each device missing (zeros), argmax per image. Returns the figures; ExportError when a difference exceeds
    `tolerance` (times max(1, max |PyTorch value|) when `relative`) or, for fp32, an argmax differs."""
    x = images.float().contiguous()
    n = x.shape[0]
    threads = torch.get_num_threads()
    chunks = [slice(0, 1), slice(1, n)] if n > 1 else [slice(0, 1)]
    feed = x.numpy()
    with torch.inference_mode():
        ref_tokens = [DeviceTokens(b, source.distilled).eval()(x).numpy() for b in source.backbones]
    tokens, token_diffs = [], []

    def check(what: str, file: str, diff: float, ref: np.ndarray) -> None:
        limit = tolerance * max(1.0, float(np.max(np.abs(ref)))) if relative else tolerance
        if not diff <= limit:  # NaN fails too
            raise ExportError(f'parity check failed: {file} gives {what} {diff:.3g} away from PyTorch (max abs '
                              f'difference; limit {limit:.3g}) on {n} images; nothing written')

    for i, ref in enumerate(ref_tokens):
        file = f'device{i}{suffix}.onnx'
        out = _run_chunks(session(os.path.join(folder, file), threads), {'image': feed}, chunks)
        if out.shape != ref.shape:
            raise ExportError(f'parity check failed: {file} gives tokens of shape {out.shape}, PyTorch {ref.shape}')
        diff = _max_abs(out, ref)
        check('tokens', file, diff, ref)
        tokens.append(out)
        token_diffs.append(diff)
    result = {'tokens_max_abs_diff': token_diffs, 'logits_max_abs_diff': None,
              'logits_missing_device_max_abs_diff': None, 'argmax_agreement': None}
    if source.head is None:
        return result

    file = f'head{suffix}.onnx'
    head = session(os.path.join(folder, file), threads)
    names = [f'tokens{i}' for i in range(len(tokens))]
    with torch.inference_mode():
        ref_logits = source.head(*map(torch.from_numpy, ref_tokens)).numpy()
    logits = _run_chunks(head, dict(zip(names, tokens, strict=True)), chunks)
    diff = _max_abs(logits, ref_logits)
    check('logits', file, diff, ref_logits)
    agree = float(np.mean(logits.argmax(1) == ref_logits.argmax(1)))
    if not relative and agree < 1.0:
        raise ExportError(f'parity check failed: {file} predicts another class than PyTorch on '
                          f'{round((1 - agree) * n)} of {n} images; nothing written')
    missing = []
    if len(tokens) > 1:  # the runtime's dropout mode: a silent device's tokens are zeros
        for i in range(len(tokens)):
            fed = [np.zeros_like(t) if j == i else t for j, t in enumerate(tokens)]
            ref_fed = [None if j == i else torch.from_numpy(t) for j, t in enumerate(ref_tokens)]
            with torch.inference_mode():
                ref = source.head.ensemble.head_forward(ref_fed).eval_logits().numpy()
            d = _max_abs(head.run(None, dict(zip(names, fed, strict=True)))[0], ref)
            check(f'logits with device {i} missing', file, d, ref)
            missing.append(d)
    result.update(logits_max_abs_diff=diff, logits_missing_device_max_abs_diff=max(missing) if missing else None,
                  argmax_agreement=agree)
    return result


# ----------------------------------------------------------------------------------------------------------------
# The export folder
# ----------------------------------------------------------------------------------------------------------------

def check_destination(output_dir: str) -> None:
    """EXPORT may be absent, an empty folder or a previous export (it is replaced whole), nothing else."""
    if not os.path.lexists(output_dir):
        return
    if not os.path.isdir(output_dir) or os.path.islink(output_dir):
        raise ExportError(f'--output_dir {output_dir} exists and is not a folder')
    if not os.listdir(output_dir):
        return
    if export_manifest.is_export(output_dir):
        return
    raise ExportError(f'--output_dir {output_dir} is a non-empty folder that is not an ONNX export (no '
                      f'{export_manifest.FILE} '
                      f'of format {FORMAT!r}); it would be replaced whole: choose another folder')


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_tree(folder: str) -> None:
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), 'rb') as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(new: str, dst: str) -> None:
    """Put folder `new` at `dst`, replacing a folder there whole: an atomic exchange where the kernel has one, else
    two renames (the old folder is moved back if the second fails)."""
    if not os.path.lexists(dst):
        os.rename(new, dst)
        return
    if _exchange(new, dst):
        shutil.rmtree(new)  # now the old folder
        return
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.', suffix='.old', dir=os.path.dirname(dst))
    os.rmdir(old)
    os.rename(dst, old)
    try:
        os.rename(new, dst)
    except OSError:
        os.rename(old, dst)
        raise
    shutil.rmtree(old)


def export(source: Source, output_dir: str, images: torch.Tensor, *, inputs_note: str, real_images: bool,
           mean: Sequence[float], std: Sequence[float], class_names: Sequence[str] | None = None,
           fp16: bool = False, opset: int = 17, tolerance: float = FP32_TOLERANCE, log=print) -> dict[str, Any]:
    """Write the export folder of `source` to `output_dir` and return its manifest.

    Everything is built in a hidden temp folder beside `output_dir`: the graphs, their fp16 copies, parity on
    `images` (normalised, N×C×S×S; described by `inputs_note`, `real_images` False for random ones), then the
    manifest; only then does the folder replace `output_dir`. Any failure (export, operator check, parity beyond
    `tolerance` for fp32, FP16_RELATIVE_TOLERANCE for fp16) raises ExportError and leaves `output_dir` as it was.
    """
    import onnx
    import onnxruntime

    output_dir = os.path.abspath(output_dir)
    check_destination(output_dir)
    size, chans = input_spec(source.backbones)
    if tuple(images.shape[1:]) != (chans, size, size):
        raise ExportError(f'parity images have shape {tuple(images.shape[1:])}, the models take {(chans, size, size)}')
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(output_dir)}.', suffix='.tmp', dir=parent)
    try:
        sample = images[:2] if images.shape[0] >= 2 else images.expand(2, -1, -1, -1)
        devices, sample_tokens = [], []
        for i, backbone in enumerate(source.backbones):
            graph = DeviceTokens(backbone, source.distilled).eval()
            file = f'device{i}.onnx'
            with torch.inference_mode():
                tokens = graph(sample)
            export_graph(graph, [sample], ['image'], 'tokens', os.path.join(tmp, file), opset,
                         doc=f'DeViT device {i}: image -> tokens ({FORMAT} v{VERSION})')
            sample_tokens.append(tokens.clone())
            name, kwargs = backbone_spec(backbone)
            devices.append({'index': i, 'file': file, 'fp16_file': None, 'model': name, 'model_kwargs': kwargs,
                            'token_width': int(tokens.shape[1]), 'input': 'image', 'output': 'tokens',
                            'params': sum(p.numel() for p in backbone.parameters()), **source.devices[i]})
            log(f'{file}: {name}, {tokens.shape[1]} floats per image')
        head = None
        if source.head is not None:
            names = [f'tokens{i}' for i in range(len(devices))]
            export_graph(source.head, sample_tokens, names, 'logits', os.path.join(tmp, 'head.onnx'), opset,
                         doc=f'DeViT ensemble head: tokens of {len(devices)} devices -> logits ({FORMAT} v{VERSION})')
            head = {'file': 'head.onnx', 'fp16_file': None, 'inputs': names, 'output': 'logits',
                    'params': sum(p.numel() for n, p in source.head.ensemble.named_parameters()
                                  if not n.startswith('backbones.'))}
            log(f'head.onnx: {len(devices)} x tokens -> {source.num_classes} logits')

        report = {'inputs': inputs_note, 'images': int(images.shape[0]), 'real_images': real_images,
                  'tolerance': tolerance, **parity(source, tmp, images, tolerance=tolerance)}
        if fp16:
            for d in devices:
                d['fp16_file'] = d['file'].replace('.onnx', '.fp16.onnx')
                to_fp16(os.path.join(tmp, d['file']), os.path.join(tmp, d['fp16_file']))
            if head is not None:
                head['fp16_file'] = 'head.fp16.onnx'
                to_fp16(os.path.join(tmp, head['file']), os.path.join(tmp, head['fp16_file']))
            report['fp16'] = {'relative_tolerance': FP16_RELATIVE_TOLERANCE,
                              'tolerance_is': 'max abs difference to PyTorch fp32 <= relative_tolerance x max(1, '
                                              'max |PyTorch value|), per output',
                              **parity(source, tmp, images, '.fp16', FP16_RELATIVE_TOLERANCE, relative=True)}
        ops = sorted(set().union(*({t for _, t in op_types(os.path.join(tmp, f))} for f in os.listdir(tmp))))
        manifest = {
            'format': FORMAT, 'version': VERSION, 'opset': opset, 'source': source.path, 'source_kind': source.kind,
            'input': {'size': size, 'channels': chans, 'mean': [float(m) for m in mean],
                      'std': [float(s) for s in std], 'layout': 'NCHW', 'dtype': 'float32', 'normalised': True},
            'num_classes': int(source.num_classes),
            'class_names': list(class_names) if class_names is not None else None,
            'distilled': bool(source.distilled), 'batch': 'dynamic', 'fp16_io': 'float32' if fp16 else None,
            'devices': devices, 'head': head, 'parity': report, 'operators': ops,
            'exporter': {'how': 'torch.onnx.export(dynamo=True), onnx.version_converter', 'torch': torch.__version__,
                         'onnx': onnx.__version__, 'onnxruntime': onnxruntime.__version__},
        }
        try:  # what the runtime's reader will take, checked before it is written
            export_manifest.validate(json.loads(json.dumps(manifest, default=str)))
        except export_manifest.ModelError as err:
            raise ExportError(f'the manifest to write does not follow collab/manifest.py: {err}') from None
        with open(export_manifest.path_of(tmp), 'w') as f:
            json.dump(manifest, f, indent=2, default=str)
            f.write('\n')
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
        _fsync_tree(tmp)
        replace_folder(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


__all__ = ['ExportError', 'FP16_RELATIVE_TOLERANCE', 'FP32_TOLERANCE', 'HeadGraph', 'OPSETS', 'Source',
           'TENSORRT_OPS', 'check_destination', 'check_ops', 'export', 'export_graph', 'input_spec', 'load_source',
           'op_types', 'parity', 'replace_folder', 'to_fp16']
