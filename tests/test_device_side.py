"""The device side of the runtime: what a board runs needs no PyTorch and runs on Python 3.6 (JetPack 4.6, the
Nano's last); an onnxruntime worker serves a torch-free aggregator; a bad export is refused with one line naming the
file, by the library, the worker and the aggregator alike. (That the runtime on an export predicts as on its
checkpoint is tests/test_export.py's end-to-end test.)"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from collab_fixtures import export, images, reference, save_ensemble
from helpers import ROOT, env, free_port

import cli
import collab_infer
from collab import backends, dispatch, manifest, quota, sessions, wire
from data_transforms import default_mean_std

# What a board runs: the worker and everything it imports (fileio.py too), the client, and jetson/ (kept
# 3.6-compatible by its owners; listed by glob so that new files are checked too). Every module of collab/ is in
# one of the two lists.
DEVICE_SIDE = ['collab/__init__.py', 'collab/wire.py', 'collab/worker.py', 'collab/backends.py', 'collab/manifest.py',
               'collab/sessions.py', 'collab/quota.py', 'collab/launcher.py', 'collab/client.py', 'collab/dispatch.py',
               'collab/profiles.py', 'collab/keys.py', 'collab/slots.py', 'collab/logs.py', 'collab/owner.py']
AGGREGATOR_SIDE = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'collab', 'host', '*.py')))
JETSON = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'jetson', '*.py'))) + ['fileio.py']
HIDDEN = ('torch', 'timm', 'torchvision')
HIDE = f"""
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {HIDDEN!r}:
            raise ImportError(name + ' is hidden: device-side code must not need it')
sys.meta_path.insert(0, Hide())
"""
# Run a module as __main__ in an interpreter where torch, timm and torchvision cannot be imported.
WITHOUT_TORCH = HIDE + '''
import runpy
sys.argv = [{module!r}] + sys.argv[1:]
runpy.run_module({module!r}, run_name='__main__', alter_sys=True)
'''


def without_torch(module, *args, timeout=120):
    code = WITHOUT_TORCH.format(module=module)
    return subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def modules(paths):
    return [p[:-3].replace('/', '.').replace('.__init__', '') for p in paths]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp('device-side')
    ckpt = save_ensemble(d / 'ens.pth', 2)
    return {'ckpt': ckpt, 'export': export(ckpt, d / 'export'),
            'wide': export(save_ensemble(d / 'wide.pth', 1, embed_dim=48), d / 'wide')}


def test_every_collab_module_is_placed():
    found = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'collab', '**', '*.py'),
                                                               recursive=True))
    assert found == sorted(DEVICE_SIDE + AGGREGATOR_SIDE)
    assert {'collab/host/modes.py', 'collab/host/service.py', 'collab/host/export.py'} <= set(AGGREGATOR_SIDE)


def test_device_side_is_python_3_6_compatible():
    assert {'jetson/power.py', 'jetson/latency.py', 'jetson/build_engines.py'} <= set(JETSON)
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'vermin'), '--target=3.6-',
                           '--eval-annotations', '--no-tips', '--violations', *DEVICE_SIDE, *JETSON], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_device_side_imports_with_torch_hidden():
    """Every device-side module imports where torch, timm and torchvision cannot be imported at all."""
    code = HIDE + f'import {", ".join(modules(DEVICE_SIDE + JETSON))}\nprint("imported")'
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == 'imported', proc.stdout + proc.stderr


def test_worker_without_torch_serves_the_onnx_export(exported, fmnist_root):
    """A worker where torch cannot be imported, against an aggregator (this process: the dispatcher and the ONNX
    head, themselves torch-free) predicting real images: the PyTorch ensemble's predictions."""
    port = free_port()
    head = backends.OnnxHead(exported['export'], threads=1)
    mean, std = default_mean_std(1)
    d = dispatch.Dispatcher(2, lambda i: {'input': head.input, 'token_width': head.widths[i], 'model': head.specs[i]},
                            {'input_dtype': 'uint8', 'wire_dtype': 'fp32', 'mean': mean, 'std': std,
                             'num_classes': 10}, f'tcp://127.0.0.1:{port}', timeout=30, log=lambda line: None)
    procs = [subprocess.Popen([sys.executable, '-c', WITHOUT_TORCH.format(module='collab.worker'),
                               '--aggregator', f'tcp://127.0.0.1:{port}', '--device-index', str(i), '--backend',
                               'onnxruntime', '--model-path', exported['export'], '--threads', '1'],
                              cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        d.wait_ready(60)
        x, _ = images(fmnist_root, 6)
        codec = wire.ImageCodec('uint8', mean, std)
        got = []
        for k in range(len(x)):
            req = d.submit(codec.encode(x[k:k + 1].numpy()), k).wait(30)
            got.append(int(head.run([req.results[i][0] for i in range(2)]).argmax()))
        assert got == reference(exported['ckpt'], x)
        assert [h['backend'] for h in d.health()] == ['onnxruntime'] * 2
        d.stop_workers()
        assert [p.wait(30) for p in procs] == [0, 0]
        assert all('stopped' in p.stderr.read() for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        d.close()


def _copy(src, dst, **changes):
    """A copy of export `src` at `dst`, with manifest fields replaced by `changes` (dotted: 'devices.1.token_width')."""
    shutil.copytree(src, dst)
    m = json.loads((dst / 'manifest.json').read_text())
    for key, value in changes.items():
        *path, last = key.split('.')
        node = m
        for k in path:
            node = node[int(k) if k.isdigit() else k]
        node[last] = value
    (dst / 'manifest.json').write_text(json.dumps(m))
    return dst


def test_bad_exports_are_refused_naming_the_file(exported, tmp_path):
    src = exported['export']
    with pytest.raises(backends.ModelError, match=r'manifest.json not found: not an export folder'):
        backends.OnnxDevice(str(tmp_path), 0)
    # A device file from another export: its hash is not the manifest's.
    altered = _copy(src, tmp_path / 'altered')
    shutil.copy(os.path.join(exported['wide'], 'device0.onnx'), altered / 'device0.onnx')
    with pytest.raises(backends.ModelError, match=r'altered/device0.onnx is not the file the export wrote \(its '
                                                  r'sha256 differs'):
        backends.OnnxDevice(str(altered), 0)
    # A symlink that leaves the folder is not followed.
    escaping = _copy(src, tmp_path / 'escaping')
    (escaping / 'device0.onnx').unlink()
    (escaping / 'device0.onnx').symlink_to(os.path.join(exported['export'], 'device0.onnx'))
    with pytest.raises(backends.ModelError, match=r'escaping/device0.onnx is a link to .*, outside the export '
                                                  r'folder: refused'):
        backends.OnnxDevice(str(escaping), 0)
    # Without hashes in the manifest, a file from another export: its tokens do not have the manifest's width.
    swapped = _copy(src, tmp_path / 'swapped', **{'devices.0.sha256': None})
    shutil.copy(os.path.join(exported['wide'], 'device0.onnx'), swapped / 'device0.onnx')
    with pytest.raises(backends.ModelError, match=r'swapped/device0.onnx gives tokens of shape \[1, 96\] but '
                                                  r'.*manifest.json says 64 floats per image'):
        backends.OnnxDevice(str(swapped), 0)
    # A manifest whose widths do not fit head.onnx.
    lying = _copy(src, tmp_path / 'lying', **{'devices.1.token_width': 96})
    with pytest.raises(backends.ModelError, match=r'lying/head.onnx takes 64 floats per image as tokens1 but '
                                                  r'.*manifest.json says device 1 sends 96'):
        backends.OnnxHead(str(lying))
    corrupt = _copy(src, tmp_path / 'corrupt', **{'devices.1.sha256': None})
    (corrupt / 'device1.onnx').write_bytes(b'not a protobuf')
    with pytest.raises(backends.ModelError, match=r'cannot load .*corrupt/device1.onnx'):
        backends.OnnxDevice(str(corrupt), 1)
    no_fp16 = _copy(src, tmp_path / 'no-fp16')
    with pytest.raises(backends.ModelError, match=r'no-fp16/manifest.json has no fp16 copy of device 1 \(export '
                                                  r'with export_onnx.py --fp16\)'):
        backends.OnnxDevice(str(no_fp16), 1, fp16=True)
    (_copy(src, tmp_path / 'partial') / 'manifest.json').write_text('{"format": "devit-onnx", "version": 1}')
    with pytest.raises(backends.ModelError, match=r'partial/manifest.json is malformed: opset must be'):
        backends.OnnxDevice(str(tmp_path / 'partial'), 0)
    with pytest.raises(backends.ModelError, match=r'there is no device 2'):
        backends.OnnxDevice(src, 2)

    # What a board's worker says: one line naming the file, exit 2, before it ever connects.
    for folder, index, extra, says in ((swapped, 0, [], 'swapped/device0.onnx gives tokens'),
                                       (altered, 0, [], 'altered/device0.onnx is not the file the export wrote'),
                                       (corrupt, 1, [], f'cannot load {corrupt}/device1.onnx: '),
                                       (no_fp16, 0, ['--fp16-model'], 'no-fp16/manifest.json has no fp16 copy')):
        proc = without_torch('collab.worker', '--aggregator', 'tcp://127.0.0.1:9', '--device-index', str(index),
                             '--backend', 'onnxruntime', '--model-path', str(folder), *extra)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f'[device {index}] error: ') and says in lines[0], lines[0]


@pytest.mark.parametrize('case', ['missing manifest', 'head width', 'not onnx', 'wrong format'])
def test_aggregator_refuses_a_bad_export_in_one_line(case, exported, tmp_path, capsys):
    """collab_infer.py --backend onnxruntime: the head's export checked before anything listens."""
    src = exported['export']
    if case == 'missing manifest':
        folder, says = tmp_path, f'error: {tmp_path}/manifest.json not found: not an export folder'
    elif case == 'head width':
        folder = _copy(src, tmp_path / 'lying', **{'devices.0.token_width': 96})
        says = f'error: {folder}/head.onnx takes 64 floats per image as tokens0 but {folder}/manifest.json says'
    elif case == 'not onnx':
        folder = _copy(src, tmp_path / 'corrupt', **{'head.sha256': None})
        (folder / 'head.onnx').write_text('tokens -> logits\n')
        says = f'error: cannot load {folder}/head.onnx: '
    else:
        folder = _copy(src, tmp_path / 'other', format='other-tool')
        says = f"error: {folder}/manifest.json is not a DeViT ONNX manifest: format 'other-tool'"
    with pytest.raises(SystemExit) as exc:
        cli.run_main(collab_infer.main, ['--backend', 'onnxruntime', '--model-path', str(folder), '--collab-port',
                                         str(free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(says), err


def test_manifest_schema_names_what_is_wrong(exported):
    m = manifest.read(exported['export'])
    assert manifest.validate(m) is m
    cases = {'input.mean must be 1 numbers': {'input': dict(m['input'], mean=[0.5, 0.5])},
             'input.std must be 1 numbers (one per channel), > 0': {'input': dict(m['input'], std=[0.0])},
             'devices[1].index is 0, expected 1': {'devices': [m['devices'][0], m['devices'][0]]},
             'devices[0].file must be a file name inside the folder': {
                 'devices': [dict(m['devices'][0], file='/etc/passwd'), m['devices'][1]]},
             'head.inputs must be 2 distinct names': {'head': dict(m['head'], inputs=['tokens0'])},
             'an ensemble export needs a head': {'head': None},
             'class_names must be null or num_classes strings': {'class_names': ['a']},
             'version 2 (this reader reads version 1)': {'version': 2}}
    for says, change in cases.items():
        with pytest.raises(manifest.ModelError, match=re.escape(says)):
            manifest.validate({**m, **change}, 'EXPORT/manifest.json')


def test_sessions_choose_providers_and_threads(exported, monkeypatch):
    """collab/sessions.py: the execution providers for each --device (with fallbacks), the threads from
    OMP_NUM_THREADS, and the session every part of the project opens."""
    trt, cuda, cpu = 'TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider'
    jetson = [trt, cuda, cpu]
    assert sessions.provider_names('tensorrt', jetson) == [trt, cuda, cpu]
    assert sessions.provider_names('cuda', jetson) == [cuda, cpu]
    assert sessions.provider_names('auto', jetson) == [trt, cuda, cpu]
    assert sessions.provider_names('auto', [cpu]) == sessions.provider_names('cpu', [cpu]) == [cpu]
    with pytest.raises(ValueError, match=r'device cuda: this onnxruntime has no CUDAExecutionProvider \(it has '
                                         r'CPUExecutionProvider'):
        sessions.provider_names('cuda', [cpu])
    with pytest.raises(ValueError, match="device 'npu'"):
        sessions.provider_names('npu', jetson)
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert sessions.default_threads() == 3 and sessions.default_threads(2) == 2
    assert sessions.session_options().intra_op_num_threads == 3
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert sessions.default_threads() is None
    sess = sessions.session(os.path.join(exported['export'], 'device0.onnx'), threads=1, level='basic')
    assert sess.get_providers() == [cpu] and sess.get_session_options().intra_op_num_threads == 1
    with pytest.raises(manifest.ModelError, match=r'nope.onnx not found'):
        sessions.session(os.path.join(exported['export'], 'nope.onnx'))


def test_quota_fractions_below_a_tenth_lengthen_the_period():
    assert quota.quota_us(0.25) == (2500, 10000)
    assert quota.quota_us(0.01) == (1000, 100000)
    assert quota.quota_us(3) == (30000, 10000)
    with pytest.raises(quota.QuotaError, match='below the kernel minimum'):
        quota.quota_us(0.0001)
    with pytest.raises(quota.QuotaError, match='must be > 0'):
        quota.quota_us(0)
