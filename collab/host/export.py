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

The graphs themselves (exporter, opsets, the operator set TensorRT imports, fp16 copies): onnx_graphs.py.
"""
import argparse
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

import cli
import data_transforms
import datasets
from collab import manifest as export_manifest
from collab.manifest import FORMAT, VERSION
from collab.sessions import session
from models.checkpoint import args_dict, read_checkpoint
from models.ensemble_model import CONFIG_KEY, DeViTEnsemble, load_ensemble, load_students, student_checkpoint_paths
from models.features import DeviceTokens

from .onnx_graphs import (
    OPSETS,
    ExportError,
    export_graph,
    op_types,
    to_fp16,
)

FP32_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| on tokens and logits, fp32 graphs
# fp16 graphs: max |onnxruntime fp16 - PyTorch fp32| <= FP16_RELATIVE_TOLERANCE x max(1, max |PyTorch fp32|), per
# output (half precision keeps 11 significant bits, 4.9e-4 relative per rounding, and a dozen blocks add up)
FP16_RELATIVE_TOLERANCE = 2e-2


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
    from datasets import read_manifest  # the split's reader; datasets is light to import
    from fileio import DatasetError

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
           fp16: bool = False, opset: int = 17, tolerance: float = FP32_TOLERANCE, log=print,
           progress: bool = False) -> dict[str, Any]:
    """Write the export folder of `source` to `output_dir` and return its manifest.

    Everything is built in a hidden temp folder beside `output_dir`: the graphs, their fp16 copies, parity on
    `images` (normalised, N×C×S×S; described by `inputs_note`, `real_images` False for random ones), then the
    manifest; only then does the folder replace `output_dir`. Any failure (export, operator check, parity beyond
    `tolerance` for fp32, FP16_RELATIVE_TOLERANCE for fp16) raises ExportError and leaves `output_dir` as it was.
    `progress`: a bar of these steps (cli.progress).
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
        steps = (len(source.backbones) + (source.head is not None) + 1) * (2 if fp16 else 1)
        bar = cli.progress(total=steps, enabled=progress, desc='export', unit='step')
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
            bar.update()
        head = None
        if source.head is not None:
            names = [f'tokens{i}' for i in range(len(devices))]
            export_graph(source.head, sample_tokens, names, 'logits', os.path.join(tmp, 'head.onnx'), opset,
                         doc=f'DeViT ensemble head: tokens of {len(devices)} devices -> logits ({FORMAT} v{VERSION})')
            head = {'file': 'head.onnx', 'fp16_file': None, 'inputs': names, 'output': 'logits',
                    'params': sum(p.numel() for n, p in source.head.ensemble.named_parameters()
                                  if not n.startswith('backbones.'))}
            log(f'head.onnx: {len(devices)} x tokens -> {source.num_classes} logits')
            bar.update()

        report = {'inputs': inputs_note, 'images': int(images.shape[0]), 'real_images': real_images,
                  'tolerance': tolerance, **parity(source, tmp, images, tolerance=tolerance)}
        bar.update()
        if fp16:
            for d in devices:
                d['fp16_file'] = d['file'].replace('.onnx', '.fp16.onnx')
                to_fp16(os.path.join(tmp, d['file']), os.path.join(tmp, d['fp16_file']))
                bar.update()
            if head is not None:
                head['fp16_file'] = 'head.fp16.onnx'
                to_fp16(os.path.join(tmp, head['file']), os.path.join(tmp, head['fp16_file']))
                bar.update()
            report['fp16'] = {'relative_tolerance': FP16_RELATIVE_TOLERANCE,
                              'tolerance_is': 'max abs difference to PyTorch fp32 <= relative_tolerance x max(1, '
                                              'max |PyTorch value|), per output',
                              **parity(source, tmp, images, '.fp16', FP16_RELATIVE_TOLERANCE, relative=True)}
            bar.update()
        bar.close()
        ops = sorted(set().union(*({t for _, t in op_types(os.path.join(tmp, f))} for f in os.listdir(tmp))))
        for entry in devices + ([head] if head is not None else []):  # a worker refuses a file that differs
            entry['sha256'] = export_manifest.sha256(os.path.join(tmp, entry['file']))
            if entry.get('fp16_file'):
                entry['fp16_sha256'] = export_manifest.sha256(os.path.join(tmp, entry['fp16_file']))
        manifest = {
            'format': FORMAT, 'version': VERSION, 'opset': opset, 'source': source.path, 'source_kind': source.kind,
            'input': {'size': size, 'channels': chans, 'mean': [float(m) for m in mean],
                      'std': [float(s) for s in std], 'layout': 'NCHW', 'dtype': 'float32', 'normalised': True},
            'num_classes': int(source.num_classes),
            'class_names': list(class_names) if class_names is not None else None,
            'distilled': bool(source.distilled), 'batch': 'dynamic', 'fp16_io': 'float32' if fp16 else None,
            'devices': devices, 'head': head, 'parity': report, 'operators': ops,
            'data': {k: source.args.get(k) for k in ('dataset', 'data_path', 'tiny_transforms', 'input_size')},
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


# ----------------------------------------------------------------------------------------------------------------
# The command line (export_onnx.py)
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_PARITY_IMAGES = 32


def get_parser():
    p = argparse.ArgumentParser('DeViT: export to ONNX (device graphs, head, manifest) with parity checks')
    p.add_argument('--model-path', '--model_path', dest='model_path', required=True,
                   help='stage-3 checkpoint (or its output folder), stage-2 output folder, or one stage-2 checkpoint')
    p.add_argument('--output_dir', '--output-dir', dest='output_dir', required=True,
                   help='export folder; replaced whole if it holds a previous export')
    p.add_argument('--fp16', action='store_true', help='also write half-precision copies (*.fp16.onnx)')
    p.add_argument('--ema', action='store_true', help="export the checkpoint's EMA weights")
    p.add_argument('--opset', type=int, default=17, choices=OPSETS,
                   help='17: TensorRT 8.6-10, onnxruntime (LayerNormalization fused); 13: TensorRT 8.2/8.5 '
                        '(JetPack 4.6 and 5.1), LayerNormalization written out in primitive ops')
    p.add_argument('--parity-images', type=cli.positive_int, default=DEFAULT_PARITY_IMAGES,
                   help='test images the graphs are checked on')
    p.add_argument('--dataset', default=None, help="dataset of the parity images (default: the checkpoint's)")
    p.add_argument('--data-path', '--data_path', dest='data_path', default=None,
                   help="where that dataset is (default: the checkpoint's --data-path)")
    cli.add_progress_flag(p)
    return p


def parity_images(dataset, data_path, size, chans, count):
    """(images N×C×S×S normalised as the models were trained, what they are, real?, the dataset's class names or
    None).

    Real test images (evenly spaced over the split, tiny transforms) when the dataset reads; else seeded random
    normal inputs, with the reason."""
    reason = 'no dataset path in the checkpoint (pass --data-path)'
    if data_path:
        try:
            ds = datasets.build_dataset(dataset, data_path, 'val', input_size=size, in_chans=chans, tiny=True)
        except (ValueError, OSError) as err:
            reason = f'{dataset} at {data_path} not readable ({err})'
        else:
            picks = torch.linspace(0, len(ds) - 1, min(count, len(ds))).round().long().unique().tolist()
            x = torch.stack([ds[i][0] for i in picks])
            return x, f'{len(picks)} {dataset} test images from {data_path}', True, list(ds.class_names)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(count, chans, size, size, generator=g)
    return x, f'{count} random normal images: {reason}', False, None


def class_names_of(source, dataset_names):
    if dataset_names is not None and len(dataset_names) == source.num_classes:
        return dataset_names
    split = source.split
    if split and split.get('divisions'):
        names = {int(c): n for d in split['divisions'] for c, n in zip(d['classes'], d.get('class_names') or [])}
        if len(names) == source.num_classes:
            return [names[k] for k in range(source.num_classes)]
    return None


def main(argv=None):
    args = get_parser().parse_args(argv)
    source = load_source(args.model_path, use_ema=args.ema)
    size, chans = input_spec(source.backbones)
    train = source.args
    dataset = args.dataset or train.get('dataset') or (source.split or {}).get('dataset')
    data_path = args.data_path or train.get('data_path')
    mean, std = data_transforms.recorded_mean_std(train, chans)  # as the models were trained (--mean/--std)
    images, note, real, names = parity_images(dataset, data_path, size, chans, args.parity_images)
    print(f'{source.kind} of {len(source.backbones)} from {source.path}; input {chans}x{size}x{size}; parity on {note}',
          flush=True)
    manifest = export(source, args.output_dir, images, inputs_note=note, real_images=real, mean=mean, std=std,
                      class_names=class_names_of(source, names), fp16=args.fp16, opset=args.opset,
                      log=lambda line: print(line, flush=True), progress=not args.no_progress)
    p = manifest['parity']
    line = f'parity ({p["images"]} {"test" if real else "RANDOM"} images): tokens max |diff| ' + \
        ', '.join(f'{d:.2g}' for d in p['tokens_max_abs_diff'])
    if p['logits_max_abs_diff'] is not None:
        line += f'; logits {p["logits_max_abs_diff"]:.2g}, same class on {round(p["argmax_agreement"] * p["images"])}' \
                f'/{p["images"]}'
    if p.get('fp16'):
        f = p['fp16']
        line += '; fp16 tokens ' + ', '.join(f'{d:.2g}' for d in f['tokens_max_abs_diff'])
        if f['logits_max_abs_diff'] is not None:
            line += f', logits {f["logits_max_abs_diff"]:.2g}, same class {100 * f["argmax_agreement"]:.1f}%'
    print(line)
    print(f'wrote {args.output_dir}: {", ".join(d["file"] for d in manifest["devices"])}'
          f'{", head.onnx" if manifest["head"] else ""}, manifest.json (opset {manifest["opset"]}; operators: '
          f'{" ".join(manifest["operators"])})')
    if not real:
        print(f'warning: parity was checked on random inputs, not on data ({note})')
    return manifest
