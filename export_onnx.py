"""Export a DeViT ensemble to ONNX for edge devices: one graph per device, one for the aggregator, a manifest.

    python export_onnx.py --model-path OUT/checkpoint.pth --output_dir EXPORT            # stage-3 ensemble
    python export_onnx.py --model-path OUT/checkpoint.pth --output_dir EXPORT --fp16     # + half-precision copies
    python export_onnx.py --model-path STAGE2_OUT --output_dir EXPORT                    # stage-2 students only
    python export_onnx.py --model-path STAGE2_OUT/sub-dataset1/checkpoint.pth --output_dir EXPORT1   # one student
    python export_onnx.py --model-path OUT/checkpoint.pth --output_dir EXPORT13 --opset 13   # TensorRT 8.2 / 8.5

Writes EXPORT/device{i}.onnx (normalised image -> the tokens device i sends), EXPORT/head.onnx (every device's
tokens -> logits; not for students) and EXPORT/manifest.json (input size, channels, mean/std, token widths, class
names, opset, source, parity figures). Before anything is kept, every graph runs in onnxruntime on real test images of
the checkpoint's dataset (its training args name it; `--data-path` overrides; random images when it cannot be read,
and the manifest says so) and must match PyTorch: max abs difference of tokens and logits <= 1e-4, the same class on
every image, and the same with each device missing (zeros). fp16 copies are held to a relative 2e-2. EXPORT is built
beside itself and replaces the old one whole; on any error it is left as it was. See docs/deployment.md.
"""
import argparse

import torch

import datasets
import utils
from collab.host.export import OPSETS, export, input_spec, load_source

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
    p.add_argument('--parity-images', type=utils.positive_int, default=DEFAULT_PARITY_IMAGES,
                   help='test images the graphs are checked on')
    p.add_argument('--dataset', default=None, help="dataset of the parity images (default: the checkpoint's)")
    p.add_argument('--data-path', '--data_path', dest='data_path', default=None,
                   help="where that dataset is (default: the checkpoint's --data-path)")
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
    mean, std = datasets.recorded_mean_std(train, chans)  # as the models were trained (--mean/--std)
    images, note, real, names = parity_images(dataset, data_path, size, chans, args.parity_images)
    print(f'{source.kind} of {len(source.backbones)} from {source.path}; input {chans}x{size}x{size}; parity on {note}',
          flush=True)
    manifest = export(source, args.output_dir, images, inputs_note=note, real_images=real, mean=mean, std=std,
                      class_names=class_names_of(source, names), fp16=args.fp16, opset=args.opset,
                      log=lambda line: print(line, flush=True))
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


if __name__ == '__main__':
    utils.run_main(main)
