"""onnxruntime sessions, opened one way everywhere: the runtime's workers and head (collab/backends.py), the
exporter's parity check (collab/host/export.py), jetson/latency.py and bench/onnx_bench.py.

    session(path, threads=1, device='cpu')                      # a worker on a CPU board
    session(path, device='tensorrt', fp16=True)                 # TensorRT fp16 kernels, engine cached beside the graph

- device: 'cpu', 'cuda', 'tensorrt' or 'auto' (the first of TensorRT, CUDA, CPU that this onnxruntime build has).
  Each is followed by the ones after it in that order as fallbacks for operators it does not take; asking for one
  the build lacks is a ValueError naming what it has (onnxruntime-gpu, on a Jetson the wheel for its JetPack, has
  CUDA and TensorRT).
- threads: intra-op threads; None takes OMP_NUM_THREADS, else onnxruntime's default (one per core). Inter-op
  threads are 1, execution sequential (`parallel=True` for the parallel executor).
- level: graph optimisation, 'all' (default), 'extended', 'basic' or 'disabled'.
- TensorRT: `fp16` lets it pick fp16 kernels from the fp32 graph; engines are built on first use (minutes on a
  Jetson) and cached in `trt_cache` (default: trt_cache/ beside the graph; one sub-folder per precision), so a
  restarted worker starts at once.
A graph that is missing or that onnxruntime cannot load is a ModelError naming the file.

Device-side module: Python 3.6+, onnxruntime imported when a session is opened.
"""
import os

from .manifest import ModelError, first_line

DEVICES = ('cpu', 'cuda', 'tensorrt', 'auto')
PROVIDERS = (('tensorrt', 'TensorrtExecutionProvider'), ('cuda', 'CUDAExecutionProvider'),
             ('cpu', 'CPUExecutionProvider'))  # 'auto' tries them in this order
LEVELS = ('all', 'extended', 'basic', 'disabled')


def default_threads(threads=None):
    """Intra-op threads: `threads`, else OMP_NUM_THREADS, else None (the library's default)."""
    if threads:
        return int(threads)
    env = os.environ.get('OMP_NUM_THREADS', '')
    return int(env) if env.isdigit() and int(env) > 0 else None


def provider_names(device='cpu', available=None):
    """onnxruntime's provider names for `device`, the wanted one first, then its fallbacks; ValueError when this
    build lacks the wanted one."""
    import onnxruntime as ort

    kind = (device or 'cpu').split(':')[0]
    if kind not in DEVICES:
        raise ValueError(f'device {device!r}: onnxruntime takes {", ".join(DEVICES)}')
    have = list(ort.get_available_providers() if available is None else available)
    names = [name for _, name in PROVIDERS]
    if kind == 'auto':
        chosen = [n for n in names if n in have]
        if not chosen:
            raise ValueError(f'onnxruntime offers none of {", ".join(names)} (it has {", ".join(have)})')
        return chosen
    wanted = dict(PROVIDERS)[kind]
    if wanted not in have:
        raise ValueError(f'device {kind}: this onnxruntime has no {wanted} (it has {", ".join(have)}; on a Jetson '
                         'install the onnxruntime-gpu wheel for its JetPack)')
    return [n for n in names[names.index(wanted):] if n in have]


def session_options(threads=None, level='all', parallel=False):
    import onnxruntime as ort

    if level not in LEVELS:
        raise ValueError(f'optimisation level {level!r}: choose one of {", ".join(LEVELS)}')
    options = ort.SessionOptions()
    threads = default_threads(threads)
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 'extended': ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        'disabled': ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    options.log_severity_level = 3  # errors only: a board's log is not the place for onnxruntime's notes
    return options


def session(path, threads=None, device='cpu', level='all', parallel=False, fp16=False, trt_cache=None):
    """An onnxruntime InferenceSession of `path` (see the module's docstring); ModelError naming the file."""
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f'{path} not found')
    options = session_options(threads, level, parallel)
    providers = []
    for name in provider_names(device):
        if name == 'TensorrtExecutionProvider':
            root = trt_cache or os.path.join(os.path.dirname(os.path.abspath(path)), 'trt_cache')
            cache = os.path.join(root, 'fp16' if fp16 else 'fp32')  # an engine is built for one precision
            os.makedirs(cache, exist_ok=True)
            name = (name, {'trt_fp16_enable': bool(fp16), 'trt_engine_cache_enable': True,
                           'trt_engine_cache_path': cache})
        providers.append(name)
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
        raise ModelError(f'cannot load {path}: {first_line(err)}') from None

