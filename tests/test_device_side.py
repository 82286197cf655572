"""The device side of the runtime: what a board runs needs no PyTorch and runs on Python 3.6 (JetPack 4.6, the
Nano's last); the onnxruntime backend gives the PyTorch backend's predictions; a bad export is refused with one
line naming the file."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from collab_fixtures import export, images, save_ensemble
from helpers import ROOT, env, free_port

from collab import backends, dispatch, quota, wire
from datasets import build_dataset, default_mean_std
from models.ensemble_model import DeViTEnsemble, create_backbone

# What a board runs: the worker and everything it imports, the client, and jetson/ (kept 3.6-compatible by its
# owners; listed by glob so that new files are checked too).
DEVICE_SIDE = ['collab/__init__.py', 'collab/wire.py', 'collab/worker.py', 'collab/backends.py', 'collab/quota.py',
               'collab/launcher.py', 'collab/client.py', 'collab/dispatch.py']
JETSON = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'jetson', '*.py')))
HIDDEN = ('torch', 'timm', 'torchvision')
# Run a module as __main__ in an interpreter where torch, timm and torchvision cannot be imported.
WITHOUT_TORCH = '''
import runpy, sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {hidden!r}:
            raise ImportError(name + ' is hidden: device-side code must not need it')
sys.meta_path.insert(0, Hide())
sys.argv = [{module!r}] + sys.argv[1:]
runpy.run_module({module!r}, run_name='__main__', alter_sys=True)
'''


def without_torch(module, *args, timeout=120):
    code = WITHOUT_TORCH.format(hidden=HIDDEN, module=module)
    return subprocess.run([sys.executable, '-c', code, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp('device-side')
    ckpt = save_ensemble(d / 'ens.pth', 2)
    return {'ckpt': ckpt, 'export': export(ckpt, str(d / 'export')),
            'wide': export(save_ensemble(d / 'wide.pth', 2, embed_dim=48), str(d / 'wide'))}


def test_device_side_is_python_3_6_compatible():
    assert 'jetson/power.py' in JETSON
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'vermin'), '--target=3.6-',
                           '--eval-annotations', '--no-tips', '--violations', *DEVICE_SIDE, *JETSON], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_device_side_imports_nothing_of_torch():
    modules = [p[:-3].replace('/', '.').replace('.__init__', '') for p in DEVICE_SIDE]
    code = (f'import sys\nimport {", ".join(modules)}\n'
            f'print(sorted(m for m in sys.modules if m.split(".")[0] in {HIDDEN!r}))')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == '[]', proc.stdout + proc.stderr


def test_worker_without_torch_serves_the_onnx_export(exported, fmnist_root):
    """A worker where torch cannot be imported, against an aggregator (this process: the dispatcher and the ONNX
    head, themselves torch-free) predicting real images: the PyTorch ensemble's predictions."""
    port = free_port()
    head = backends.OnnxHead(exported['export'], threads=1)
    mean, std = default_mean_std(1)
    d = dispatch.Dispatcher(2, lambda i: {'input': head.input, 'token_width': head.widths[i], 'model': head.specs[i]},
                            {'input_dtype': 'uint8', 'wire_dtype': 'fp32', 'mean': mean, 'std': std,
                             'num_classes': 10}, f'tcp://127.0.0.1:{port}', timeout=30, log=lambda line: None)
    procs = [subprocess.Popen([sys.executable, '-c', WITHOUT_TORCH.format(hidden=HIDDEN, module='collab.worker'),
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
        from collab_fixtures import reference
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


def test_bad_exports_are_refused_naming_the_file(exported, tmp_path):
    src = exported['export']
    with pytest.raises(backends.ModelError, match=r'manifest.json not found: not an export folder'):
        backends.OnnxDevice(str(tmp_path), 0)
    # A device file from another export: its tokens do not have the manifest's (and the head's) width.
    swapped = shutil.copytree(src, tmp_path / 'swapped')
    shutil.copy(os.path.join(exported['wide'], 'device0.onnx'), swapped / 'device0.onnx')
    with pytest.raises(backends.ModelError, match=r'swapped/device0.onnx gives tokens of shape \[1, 96\] but '
                                                  r'.*manifest.json says 64 floats per image'):
        backends.OnnxDevice(str(swapped), 0)
    # A manifest whose widths do not fit head.onnx.
    lying = shutil.copytree(src, tmp_path / 'lying')
    m = json.loads((lying / 'manifest.json').read_text())
    m['devices'][1]['token_width'] = 96
    (lying / 'manifest.json').write_text(json.dumps(m))
    with pytest.raises(backends.ModelError, match=r'lying/head.onnx takes 64 floats per image as tokens1 but '
                                                  r'.*manifest.json says device 1 sends 96'):
        backends.OnnxHead(str(lying))
    corrupt = shutil.copytree(src, tmp_path / 'corrupt')
    (corrupt / 'device1.onnx').write_bytes(b'not a protobuf')
    with pytest.raises(backends.ModelError, match=r'cannot load .*corrupt/device1.onnx'):
        backends.OnnxDevice(str(corrupt), 1)
    (corrupt / 'manifest.json').write_text('{"format": "devit-onnx", "version": 1}')
    with pytest.raises(backends.ModelError, match=r'corrupt/manifest.json is incomplete or malformed'):
        backends.OnnxDevice(str(corrupt), 0)
    # What a board's worker says: one line naming the file, exit 2, before it ever connects.
    proc = without_torch('collab.worker', '--aggregator', 'tcp://127.0.0.1:9', '--device-index', '0', '--backend',
                         'onnxruntime', '--model-path', str(swapped))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith('[device 0] error: ') and 'swapped/device0.onnx gives tokens' in lines[0]


def test_quota_fractions_below_a_tenth_lengthen_the_period():
    assert quota.quota_us(0.25) == (2500, 10000)
    assert quota.quota_us(0.01) == (1000, 100000)
    assert quota.quota_us(3) == (30000, 10000)
    with pytest.raises(quota.QuotaError, match='below the kernel minimum'):
        quota.quota_us(0.0001)
    with pytest.raises(quota.QuotaError, match='must be > 0'):
        quota.quota_us(0)


def _train_tiny(fmnist_root, steps=150):
    """Two tiny students and the head, trained together for `steps` Adam steps (a minute's worth of DeViT)."""
    torch.manual_seed(0)
    kw = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}
    ens = DeViTEnsemble([create_backbone('dedeit', kw) for _ in range(2)], num_classes=10, embed_dim=48)
    ds = build_dataset('fashion_mnist', fmnist_root, 'train', input_size=28, in_chans=1, tiny=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(steps * 64)), batch_size=64, shuffle=True)
    opt = torch.optim.Adam(ens.parameters(), lr=3e-3)
    ens.train()
    for x, y in loader:
        out = ens(x)
        loss = torch.nn.functional.cross_entropy(out.logits, y) + torch.nn.functional.cross_entropy(out.logits_dist, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ens.eval()


def test_onnxruntime_predictions_equal_torch_on_a_trained_ensemble(tmp_path, fmnist_root, capsys):
    import utils

    ens = _train_tiny(fmnist_root)
    ckpt = str(tmp_path / 'trained.pth')
    utils.save_checkpoint({'model': ens.state_dict(), 'ensemble_config': ens.config,
                           'args': {'dataset': 'fashion_mnist', 'tiny_transforms': True}}, ckpt)
    folder = export(ckpt, str(tmp_path / 'export'))
    devices = [backends.OnnxDevice(folder, i, threads=1) for i in range(2)]
    head = backends.OnnxHead(folder, threads=1)
    ds = build_dataset('fashion_mnist', fmnist_root, 'val', input_size=28, in_chans=1, tiny=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(2000)), batch_size=250)
    same = total = correct = 0
    for x, y in loader:
        with torch.inference_mode():
            ref = ens(x).argmax(1).numpy()
        got = head.run([d.run(x.numpy()) for d in devices]).argmax(1)
        same += int((got == ref).sum())
        correct += int((ref == y.numpy()).sum())
        total += len(y)
    with capsys.disabled():
        print(f'\nonnxruntime vs torch: same prediction on {same}/{total} test images ({100 * same / total:.2f}%); '
              f'torch accuracy {correct / total:.3f}')
    assert correct / total > 0.5, 'the tiny ensemble did not train'
    assert same / total >= 0.999
    np.testing.assert_allclose(devices[0].run(x.numpy()),
                               ens.device_tokens(0, x).detach().numpy(), atol=1e-4)
