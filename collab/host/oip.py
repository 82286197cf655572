"""The DeViT ensemble as an Open Inference Protocol model (KServe v2 / Triton), for the REST and gRPC front ends.

One model, `--model-name` (default 'devit'), version '1':
    input   'image'          UINT8 [-1, C, S, S]  pixels 0..255 (normalised here as the dataset's transform does)
                             FP32  [-1, C, S, S]  already normalised (mean/std of the export)
    outputs 'logits'         FP32  [-1, num_classes]
            'probabilities'  FP32  [-1, num_classes]  (softmax of the logits)
An output asked for with the parameter `classification: K` is answered as Triton's classification extension: BYTES
[-1, K] strings "score:index:label" (":label" only when the class names are known), best first.

Errors carry the protocol's status: 400 (wrong input name, datatype, shape or byte count), 404 (another model or
version), 503 (the ensemble cannot answer).
"""
import json
import struct

import numpy as np

from .service import INLINE_BYTES, Refused, Service, softmax

VERSION = '1'
INPUT = 'image'
OUTPUTS = ('logits', 'probabilities')
DTYPES = {'UINT8': np.uint8, 'FP32': np.float32}
EXTENSIONS = ['classification', 'binary_tensor_data', 'model_repository(read-only)']
MAX_IMAGES = 256  # images in one request


class Model:
    """The protocol's view of a Service."""

    def __init__(self, service: Service, name: str = 'devit'):
        self.service, self.name = service, name

    # -- metadata -------------------------------------------------------------------------------------------------

    def check(self, name: str, version: str | None = None) -> None:
        if name != self.name:
            raise Refused(404, f'no model {name!r}: this server serves {self.name!r}')
        if version not in (None, '', VERSION):
            raise Refused(404, f'model {name!r} has no version {version!r}: its version is {VERSION!r}')

    def server_metadata(self) -> dict:
        return {'name': 'devit-collab', 'version': '1', 'extensions': list(EXTENSIONS)}

    def metadata(self) -> dict:
        s = self.service
        shape = [-1, s.chans, s.size, s.size]
        return {'name': self.name, 'versions': [VERSION], 'platform': 'devit_collab',
                'inputs': [{'name': INPUT, 'datatype': 'UINT8', 'shape': shape}],
                'outputs': [{'name': o, 'datatype': 'FP32', 'shape': [-1, s.num_classes]} for o in OUTPUTS],
                'parameters': {'input_datatypes': list(DTYPES), 'classes': s.class_names or []}}

    # -- one request ----------------------------------------------------------------------------------------------

    def images(self, datatype: str, shape, raw: bytes | None = None, data=None) -> np.ndarray:
        """The input tensor (raw little-endian bytes, or the JSON `data` list) -> B×C×S×S normalised float32."""
        s = self.service
        if datatype not in DTYPES:
            raise Refused(400, f"input {INPUT!r} must be UINT8 or FP32, got {datatype!r}")
        try:
            shape = [int(d) for d in shape]
        except (TypeError, ValueError):
            raise Refused(400, f'the shape of {INPUT!r} must be a list of integers, got {shape!r}') from None
        want = [s.chans, s.size, s.size]
        if len(shape) != 4 or shape[1:] != want or not 1 <= shape[0] <= MAX_IMAGES:
            raise Refused(400, f'the shape of {INPUT!r} must be [B, {", ".join(map(str, want))}] with 1 <= B <= '
                               f'{MAX_IMAGES}, got {shape}')
        dtype = np.dtype(DTYPES[datatype]).newbyteorder('<')
        count = int(np.prod(shape))
        if raw is not None:
            if len(raw) != count * dtype.itemsize:
                raise Refused(400, f'{INPUT!r} {datatype} {shape} needs {count * dtype.itemsize} bytes, got '
                                   f'{len(raw)}')
            x = np.frombuffer(raw, dtype=dtype).reshape(shape)
        else:
            try:
                x = np.asarray(data, dtype=np.float64)
            except (TypeError, ValueError, OverflowError):
                raise Refused(400, f'the data of {INPUT!r} must be a list of numbers') from None
            if x.size != count:
                raise Refused(400, f'{INPUT!r} {datatype} {shape} needs {count} values, got {x.size}')
            x = x.reshape(shape)
            if not np.isfinite(x).all():
                raise Refused(400, f'the data of {INPUT!r} holds a number that is not finite')
            if datatype == 'UINT8':
                if ((x < 0) | (x > 255) | (x != np.round(x))).any():
                    raise Refused(400, f'UINT8 data of {INPUT!r} must be integers 0..255')
                x = x.astype(np.uint8)
        if datatype == 'UINT8':
            return s.normalise(x)
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise Refused(400, f'the data of {INPUT!r} holds a number that is not finite')
        return x

    def run(self, x: np.ndarray, outputs: list) -> tuple[list, dict]:
        """Infer B images; `outputs` [(name, classification K or 0)] (empty: both, as tensors). Returns
        ([(name, datatype, shape, numpy array)], the devices' part of the answer)."""
        self.check_outputs(outputs)
        return self.tensors(outputs, *self.service.infer(x))

    async def run_async(self, x: np.ndarray, outputs: list) -> tuple[list, dict]:
        """The same, awaited on the running event loop."""
        self.check_outputs(outputs)
        return self.tensors(outputs, *await self.service.infer_async(x))

    @staticmethod
    def check_outputs(outputs: list) -> None:
        for name, k in outputs:
            if name not in OUTPUTS:
                raise Refused(400, f'no output {name!r}: the outputs are {", ".join(OUTPUTS)}')
            if k < 0:
                raise Refused(400, f'classification must be a positive count, got {k}')

    def tensors(self, outputs: list, logits: np.ndarray, reply, batch: int) -> tuple[list, dict]:
        probs = softmax(logits.astype(np.float64)).astype(np.float32)
        tensors = []
        for name, k in outputs or [(o, 0) for o in OUTPUTS]:
            values = logits if name == 'logits' else probs
            if k:
                tensors.append((name, 'BYTES', [len(values), min(k, values.shape[1])], self.classify(values, k)))
            else:
                tensors.append((name, 'FP32', list(values.shape), values))
        return tensors, {'devices': list(reply.used), 'missing': {str(i): w for i, w in sorted(reply.missing.items())},
                         'batch': batch}

    def classify(self, values: np.ndarray, k: int) -> np.ndarray:
        """Triton's classification strings: B×K "score:index[:label]", best first."""
        names = self.service.class_names
        k = min(k, values.shape[1])
        out = np.empty((len(values), k), dtype=object)
        for b, row in enumerate(values):
            for j, c in enumerate(np.argsort(-row, kind='stable')[:k]):
                label = f':{names[c]}' if names and c < len(names) else ''
                out[b, j] = f'{float(row[c]):f}:{int(c)}{label}'.encode()
        return out


# -- Triton's binary tensor extension (HTTP) ----------------------------------------------------------------------

def bytes_tensor(values: np.ndarray) -> bytes:
    """BYTES elements serialised as Triton does: each a 4-byte little-endian length and its bytes."""
    return b''.join(struct.pack('<I', len(v)) + v for v in values.reshape(-1))


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(the JSON header, the binary tail) of an infer request body (Inference-Header-Content-Length splits them)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise Refused(400, f'Inference-Header-Content-Length must be an integer, got {header_length!r}') from None
        if not 0 <= n <= len(body):
            raise Refused(400, f'Inference-Header-Content-Length {n} is not within the body of {len(body)} bytes')
        head, tail = body[:n], body[n:]
    else:
        head, tail = body, b''
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, 'the infer request is not JSON') from None
    if not isinstance(request, dict):
        raise Refused(400, 'the infer request must be a JSON object')
    return request, tail


def _params(obj) -> dict:
    p = obj.get('parameters') if isinstance(obj, dict) else None
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise Refused(400, 'parameters must be a JSON object')
    return p


async def infer_json(model: Model, request: dict, tail: bytes, offload) -> tuple[dict, bytes]:
    """One REST infer: the answer's JSON header and its binary tail (empty when every output is JSON). A binary
    input of at most INLINE_BYTES is read (checked, normalised) on the event loop; a bigger one, or one in JSON
    `data` (a long list takes a while), by `await offload(fn, *args)` (a thread pool's)."""
    inline = 0 < len(tail) <= INLINE_BYTES
    x, asked, binary = (infer_inputs(model, request, tail) if inline
                        else await offload(infer_inputs, model, request, tail))
    tensors, extra = await model.run_async(x, asked)
    answer = {'model_name': model.name, 'model_version': VERSION, 'outputs': [], 'parameters': extra}
    if 'id' in request and isinstance(request['id'], str):
        answer['id'] = request['id']
    blobs = []
    for name, dtype, shape, values in tensors:
        out = {'name': name, 'datatype': dtype, 'shape': shape}
        if binary(name):
            blob = bytes_tensor(values) if dtype == 'BYTES' else np.ascontiguousarray(values, '<f4').tobytes()
            out['parameters'] = {'binary_data_size': len(blob)}
            blobs.append(blob)
        else:
            out['data'] = [v.decode() for v in values.reshape(-1)] if dtype == 'BYTES' else \
                [float(v) for v in values.reshape(-1)]
        answer['outputs'].append(out)
    return answer, b''.join(blobs)


def infer_inputs(model: Model, request: dict, tail: bytes):
    """A REST infer request read: (the images, the outputs asked [(name, classification K)], whether an output is
    answered binary: a function of its name)."""
    inputs = request.get('inputs')
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Refused(400, f'the request must hold one input, {INPUT!r}')
    inp = inputs[0]
    if inp.get('name') != INPUT:
        raise Refused(400, f'no input {inp.get("name")!r}: the input is {INPUT!r}')
    size = _params(inp).get('binary_data_size')
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(tail):
            raise Refused(400, f'binary_data_size {size!r} does not match the {len(tail)} bytes after the header')
        x = model.images(inp.get('datatype'), inp.get('shape'), raw=tail)
    else:
        if tail:
            raise Refused(400, 'binary data after the header, but the input has no binary_data_size')
        if 'data' not in inp:
            raise Refused(400, f'input {INPUT!r} has no data')
        x = model.images(inp.get('datatype'), inp.get('shape'), data=inp.get('data'))
    binary_all = bool(_params(request).get('binary_data_output', False))
    asked, binary = [], {}
    outs = request.get('outputs')
    if outs is not None:
        if not isinstance(outs, list) or not all(isinstance(o, dict) for o in outs):
            raise Refused(400, 'outputs must be a list of objects')
        for o in outs:
            p = _params(o)
            k = p.get('classification', 0)
            if not isinstance(k, int) or isinstance(k, bool):
                raise Refused(400, f'classification must be an integer, got {k!r}')
            asked.append((o.get('name'), k))
            binary[o.get('name')] = bool(p.get('binary_data', binary_all))
    return x, asked, lambda name: binary.get(name, binary_all)
