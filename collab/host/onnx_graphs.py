"""One module or ensemble head to one ONNX graph that onnxruntime and TensorRT both take (used by export.py).

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
import inspect
import io
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

OPSETS = (17, 13)
# The oldest IR version of each opset (onnx 1.12 / 1.8): onnxruntime refuses a model with a newer IR version than
# its own (1.16, as on JetPack 5 boards, reads up to IR 9), and the graphs need nothing newer.
IR_VERSIONS = {17: 8, 13: 7}
EXPORTER_OPSET = 18  # what torch.onnx.export(dynamo=True) writes natively; converted down to the target opset
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
