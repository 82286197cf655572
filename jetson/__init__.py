"""Edge-device tools for DeViT: board setup (setup.sh), TensorRT engines of an ONNX export (build_engines.py),
batch-1 latency in PyTorch or onnxruntime (latency.py), board power and energy per inference (power.py) and the
multi-board launcher of the collaborative runtime (run_collab.sh). See README.md."""


def split_command(argv):
    """(this tool's arguments, the command or the pass-through flags after ``--``)."""
    argv = list(argv)
    if '--' not in argv:
        return argv, []
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
