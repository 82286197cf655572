"""The export folder's manifest (`EXPORT/manifest.json`): its schema, the one reader, and the one check of it.

export_onnx.py writes it (collab/host/export.py validates what it is about to write with `validate`); the runtime's
onnxruntime backend (collab/backends.py) and jetson/build_engines.py read it with `read`. Version 1:

    {"format": "devit-onnx", "version": 1, "opset": 17 | 13, "source": CHECKPOINT,
     "source_kind": "ensemble" | "students",
     "input": {"size": S, "channels": C, "mean": [C floats], "std": [C floats], ...},
     "num_classes": K, "class_names": [K names] | null, "distilled": bool,
     "devices": [{"index": i, "file": "device{i}.onnx", "fp16_file": "device{i}.fp16.onnx" | null,
                  "model": NAME, "model_kwargs": {...}, "token_width": W_i, "input": "image", "output": "tokens",
                  ...}, ...],
     "head": {"file": "head.onnx", "fp16_file": "head.fp16.onnx" | null, "inputs": ["tokens0", ...],
              "output": "logits", ...} | null,
     "parity": {...}, "operators": [...], ...}

- devices[i] is device i (index i, in order); its `model` and `model_kwargs` are the checkpoint's
  `ensemble_config["backbones"][i]` (what `timm.create_model` was given), so a worker on the export and an
  aggregator on the checkpoint agree on what device i runs.
- device{i}.onnx: `input` float32 [B,C,S,S], already normalised with mean/std -> `output` float32 [B,W_i];
  head.onnx: `inputs[i]` float32 [B,W_i] (a missing device zero-filled) -> `output` float32 [B,K]. The fp16 copies
  take and give float32 too. File names are relative to the folder.
- "head" is null for an export of stage-2 students (devices only); an ensemble export always has one.
- Each file entry carries `sha256` (and `fp16_sha256`): a model file whose hash differs (half-copied, altered) is
  refused, naming it. File names stay inside the folder: absolute paths, `..` and symlinks that leave it are refused.
- "data": {dataset, data_path, tiny_transforms, input_size} the models were trained with (the aggregator's defaults).
Keys beyond these (source, params, parity figures, exporter versions) are informational: nothing is loaded from
`source`.

Device-side module: Python 3.6+, standard library only.
"""
import hashlib
import json
import os

FORMAT = 'devit-onnx'
VERSION = 1
FILE = 'manifest.json'
SOURCE_KINDS = ('ensemble', 'students')


class ModelError(ValueError):
    """A model file that cannot be used: missing, unreadable, or not matching its manifest or the head."""


def first_line(err):
    """The first line of an exception's message (onnxruntime's run to pages), or its type's name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _is_int(v, low=0):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_name(v):
    return isinstance(v, str) and bool(v)


def _is_file(v):
    return _is_name(v) and not os.path.isabs(v) and '..' not in v.replace('\\', '/').split('/')


def _problems(m):
    """What is wrong with manifest dict `m`, one short phrase each (empty: valid)."""
    if not isinstance(m, dict):
        return ['it is not a JSON object']
    if m.get('format') != FORMAT:
        return [f'format {m.get("format")!r} (expected {FORMAT!r})']
    if m.get('version') != VERSION:
        return [f'version {m.get("version")!r} (this reader reads version {VERSION})']
    bad = []
    if not _is_int(m.get('opset'), 1):
        bad.append('opset must be a positive integer')
    if m.get('source_kind') not in SOURCE_KINDS:
        bad.append(f'source_kind must be one of {", ".join(SOURCE_KINDS)}')
    inp = m.get('input')
    if not isinstance(inp, dict) or not _is_int(inp.get('size'), 1) or not _is_int(inp.get('channels'), 1):
        bad.append('input must hold a positive size and channels')
    else:
        for key in ('mean', 'std'):
            v = inp.get(key)
            if not isinstance(v, list) or len(v) != inp['channels'] or not all(map(_is_number, v)) or \
                    (key == 'std' and min(v) <= 0):
                bad.append(f'input.{key} must be {inp["channels"]} numbers (one per channel){", > 0" * (key == "std")}')
    if not _is_int(m.get('num_classes'), 1):
        bad.append('num_classes must be a positive integer')
    names = m.get('class_names')
    if names is not None and (not isinstance(names, list) or len(names) != m.get('num_classes')
                              or not all(isinstance(n, str) for n in names)):
        bad.append('class_names must be null or num_classes strings')
    if not isinstance(m.get('distilled'), bool):
        bad.append('distilled must be true or false')
    devices = m.get('devices')
    if not isinstance(devices, list) or not devices:
        return bad + ['devices must be a non-empty list']
    for i, d in enumerate(devices):
        where = f'devices[{i}]'
        if not isinstance(d, dict):
            bad.append(where + ' is not an object')
            continue
        if d.get('index') != i or not _is_int(d.get('index')):
            bad.append(f'{where}.index is {d.get("index")!r}, expected {i}')
        if not _is_file(d.get('file')):
            bad.append(where + '.file must be a file name inside the folder')
        if d.get('fp16_file') is not None and not _is_file(d.get('fp16_file')):
            bad.append(where + '.fp16_file must be null or a file name inside the folder')
        if not _is_name(d.get('model')) or not isinstance(d.get('model_kwargs'), dict):
            bad.append(where + ' must name its model and model_kwargs (an object)')
        if not _is_int(d.get('token_width'), 1):
            bad.append(where + '.token_width must be a positive integer')
        if not _is_name(d.get('input')) or not _is_name(d.get('output')):
            bad.append(where + ' must name its graph input and output')
    head = m.get('head')
    if head is None:
        if m.get('source_kind') == 'ensemble':
            bad.append('an ensemble export needs a head')
    elif not isinstance(head, dict):
        bad.append('head must be null or an object')
    else:
        if not _is_file(head.get('file')):
            bad.append('head.file must be a file name inside the folder')
        if head.get('fp16_file') is not None and not _is_file(head.get('fp16_file')):
            bad.append('head.fp16_file must be null or a file name inside the folder')
        inputs = head.get('inputs')
        if not isinstance(inputs, list) or len(inputs) != len(devices) or not all(map(_is_name, inputs)) \
                or len(set(inputs)) != len(inputs):
            bad.append(f'head.inputs must be {len(devices)} distinct names, one per device')
        if not _is_name(head.get('output')):
            bad.append('head.output must name the logits')
    return bad


def validate(m, path=FILE):
    """`m` if it is a valid manifest; else ModelError naming `path` and everything that is wrong."""
    bad = _problems(m)
    if bad:
        if bad[0].startswith(('format', 'it is not')):
            raise ModelError(f'{path} is not a DeViT ONNX manifest: {bad[0]}')
        if bad[0].startswith('version'):
            raise ModelError(f'{path} has {bad[0]}: export again with this export_onnx.py')
        raise ModelError(f'{path} is malformed: {"; ".join(bad)}')
    return m


def path_of(folder):
    return os.path.join(folder, FILE)


def read(folder):
    """The manifest of export folder `folder`, validated; ModelError naming the file otherwise."""
    path = path_of(folder)
    if not os.path.isdir(folder):
        raise ModelError(f'{folder} is not a folder: give the folder export_onnx.py wrote')
    if not os.path.isfile(path):
        raise ModelError(f'{path} not found: not an export folder (export_onnx.py writes one)')
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as err:
        raise ModelError(f'cannot read {path}: {first_line(err)}') from None
    return validate(m, path)


def is_export(folder):
    """Whether `folder` holds a manifest of this format (any version): a previous export, replaceable whole."""
    try:
        with open(path_of(folder)) as f:
            return json.load(f).get('format') == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def device(m, index, folder):
    """devices[index] of manifest `m` (read from `folder`); ModelError when there is no such device."""
    if not 0 <= index < len(m['devices']):
        n = len(m['devices'])
        raise ModelError(f'{path_of(folder)} has {n} devices (0..{n - 1}); there is no device {index}')
    return m['devices'][index]


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def graph(entry, folder, what, fp16=False):
    """The path of `entry`'s graph (a device or the head), its fp16 copy with `fp16`, checked: inside `folder`
    (no symlink out of it) and with the sha256 the manifest records. ModelError naming the file otherwise."""
    if fp16 and not entry.get('fp16_file'):
        raise ModelError(f'{path_of(folder)} has no fp16 copy of {what} (export with export_onnx.py --fp16)')
    name, digest = (entry['fp16_file'], entry.get('fp16_sha256')) if fp16 else (entry['file'], entry.get('sha256'))
    path = os.path.join(folder, name)
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise ModelError(f'{path} is a link to {real}, outside the export folder: refused')
    if digest is not None and os.path.isfile(path) and sha256(path) != digest:
        raise ModelError(f'{path} is not the file the export wrote (its sha256 differs from {path_of(folder)}\'s): '
                         'copy the export folder again')
    return path
