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
import cli
from collab.host.export import main

if __name__ == '__main__':
    cli.run_main(main)
