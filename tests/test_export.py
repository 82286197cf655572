"""export_onnx.py: ONNX graphs of trained, shrunk, mixed-family ensembles and of stage-2 students, parity with
PyTorch, the operator set TensorRT imports, fp16 copies, and refusals that leave an existing export untouched.

A tiny ensemble is trained for a few steps on real Fashion-MNIST images and saved in the stage-3 checkpoint format
(what ensemble.py writes through engine.fit), so the parity check compares real predictions on real test images.
"""
import argparse
import csv
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import torch
from collab_fixtures import STUDENT, save_stage3, train_briefly
from helpers import free_port, launch_cmd, run

import cli
import collab_infer
import export_onnx
import utils
from collab import backends, dispatch, manifest
from collab.host import export as onnx_export
from collab.host import infer, modes, onnx_graphs, torch_models
from collab.sessions import session
from datasets import build_dataset
from models.ensemble_model import DeViTEnsemble, create_backbone, read_ensemble_checkpoint
from models.features import prefix_tokens

SHRUNK = {**STUDENT, 'embed_dim': 48, 'shrink': {'heads': [1, 2], 'hidden': [40, 96]}}
CCT = {'img_size': 28, 'in_chans': 1, 'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'n_conv_layers': 1,
       'kernel_size': 3}
MANIFEST_KEYS = {'format', 'version', 'opset', 'source', 'source_kind', 'input', 'num_classes', 'class_names',
                 'distilled', 'devices', 'head', 'parity'}
DEVICE_KEYS = {'index', 'file', 'fp16_file', 'model', 'model_kwargs', 'token_width', 'input', 'output'}
FORBIDDEN = {'Einsum', 'Attention', 'MultiHeadAttention'}


@pytest.fixture(scope='module')
def trained(tmp_path_factory, fmnist_root):
    """A trained 2-device ensemble of heterogeneous widths, exported by the CLI as a real process with --fp16."""
    d = tmp_path_factory.mktemp('export')
    torch.manual_seed(0)
    ens = DeViTEnsemble([create_backbone('dedeit', STUDENT), create_backbone('dedeit', {**STUDENT, 'embed_dim': 48})],
                        num_classes=10, embed_dim=48)
    acc = train_briefly(ens, fmnist_root)
    ckpt = save_stage3(d / 'checkpoint.pth', ens, fmnist_root)
    out = d / 'EXPORT'
    proc = run(launch_cmd('export_onnx.py', '--model-path', ckpt, '--output_dir', str(out), '--fp16',
                          '--parity-images', '24', nproc=0), timeout=300)
    return {'ckpt': ckpt, 'out': out, 'ens': ens.eval(), 'train_acc': acc, 'stdout': proc.stdout,
            'manifest': json.loads((out / 'manifest.json').read_text())}


def exported_graphs(folder):
    m = json.loads((folder / 'manifest.json').read_text())
    files = [f for d in m['devices'] for f in (d['file'], d['fp16_file']) if f]
    if m['head']:
        files += [f for f in (m['head']['file'], m['head']['fp16_file']) if f]
    return m, files


def test_trained_ensemble_export(trained, fmnist_root):
    m, out, ens = trained['manifest'], trained['out'], trained['ens']
    assert trained['train_acc'] > 0.25  # trained (chance is 0.1): the argmax check compares real predictions
    assert MANIFEST_KEYS <= m.keys()
    assert (m['format'], m['version'], m['opset'], m['source_kind']) == ('devit-onnx', 1, 17, 'ensemble')
    assert m['source'] == trained['ckpt'] and m['num_classes'] == 10 and m['distilled'] is True
    assert m['input'] == {**m['input'], 'size': 28, 'channels': 1, 'mean': [pytest.approx(0.449)],
                          'std': [pytest.approx(0.226)]}
    assert m['class_names'][0] == 'T-shirt/top' and len(m['class_names']) == 10
    assert [d['token_width'] for d in m['devices']] == [64, 96] == ens.token_widths()
    for i, d in enumerate(m['devices']):
        assert DEVICE_KEYS <= d.keys()
        assert (d['index'], d['file'], d['fp16_file'], d['model']) == (i, f'device{i}.onnx', f'device{i}.fp16.onnx',
                                                                       'dedeit')
        assert (d['input'], d['output'], d['model_kwargs']['embed_dim']) == ('image', 'tokens', [32, 48][i])
    assert m['head'] == {**m['head'], 'file': 'head.onnx', 'fp16_file': 'head.fp16.onnx',
                         'inputs': ['tokens0', 'tokens1'], 'output': 'logits'}
    p = m['parity']
    assert p['real_images'] is True and p['images'] == 24 and 'fashion_mnist' in p['inputs']
    assert max(p['tokens_max_abs_diff']) <= 1e-4 and p['logits_max_abs_diff'] <= 1e-4
    assert p['logits_missing_device_max_abs_diff'] <= 1e-4 and p['argmax_agreement'] == 1.0
    assert p['fp16']['relative_tolerance'] == onnx_export.FP16_RELATIVE_TOLERANCE
    assert 'same class on 24/24' in trained['stdout']
    assert sorted(os.listdir(out)) == sorted(exported_graphs(out)[1] + ['manifest.json'])
    assert not [f for f in os.listdir(out.parent) if f.startswith('.EXPORT')]  # no temp folder left

    # The graphs in onnxruntime, here, on other test images and another batch size, against PyTorch.
    ds = build_dataset('fashion_mnist', fmnist_root, 'val', input_size=28, in_chans=1, tiny=True)
    x = torch.stack([ds[i][0] for i in range(100, 105)])
    with torch.inference_mode():
        ref_tokens = [prefix_tokens(b, x, dist=True) for b in ens.backbones]
        ref = ens(x)
    tokens = [session(str(out / d['file'])).run(None, {'image': x.numpy()})[0] for d in m['devices']]
    for t, r in zip(tokens, ref_tokens, strict=True):
        assert t.shape == tuple(r.shape) and np.abs(t - r.numpy()).max() <= 1e-4
    logits = session(str(out / 'head.onnx')).run(None, {'tokens0': tokens[0], 'tokens1': tokens[1]})[0]
    assert np.abs(logits - ref.numpy()).max() <= 1e-4 and (logits.argmax(1) == ref.argmax(1).numpy()).all()


def test_fp16_copies_load_and_match(trained):
    out, m = trained['out'], trained['manifest']
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    for d in m['devices']:
        fp32 = session(str(out / d['file'])).run(None, {'image': x})[0]
        s = session(str(out / d['fp16_file']))
        assert s.get_inputs()[0].type == 'tensor(float)'  # same feeds as the fp32 graph
        fp16 = s.run(None, {'image': x})[0]
        assert fp16.dtype == np.float32 and fp16.shape == (3, d['token_width'])
        assert np.abs(fp16 - fp32).max() <= onnx_export.FP16_RELATIVE_TOLERANCE * max(1.0, np.abs(fp32).max())
    weights = list(onnx.load(str(out / 'head.fp16.onnx')).graph.initializer)
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights if len(t.dims) == 2)


def test_manifest_is_the_checkpoints_contract(trained):
    """What the runtime reads off the export (collab/manifest.py, the onnxruntime backend) is what it reads off the
    checkpoint (the torch backend), field by field, so workers of either backend fit an aggregator of either."""
    m, out, ckpt = trained['manifest'], str(trained['out']), trained['ckpt']
    assert manifest.read(out) == m  # the runtime's reader takes the file as export_onnx.py wrote it
    config = read_ensemble_checkpoint(ckpt)['ensemble_config']
    assert [{'model': d['model'], 'kwargs': d['model_kwargs']} for d in m['devices']] == config['backbones']
    torch_head = modes.load_head(argparse.Namespace(backend='torch', model_path=ckpt, ema=False))
    onnx_head = modes.load_head(argparse.Namespace(backend='onnxruntime', model_path=out, threads=1, fp16_model=False))
    for field in ('widths', 'input', 'specs', 'num_classes', 'train_args'):
        assert getattr(onnx_head, field) == getattr(torch_head, field), field
    assert onnx_head.widths == [d['token_width'] for d in m['devices']] == [64, 96]
    assert onnx_head.input == {'size': 28, 'channels': 1, 'mean': m['input']['mean'], 'std': m['input']['std']}
    assert [i.name for i in onnx_head.head.session.get_inputs()] == m['head']['inputs'] == ['tokens0', 'tokens1']
    assert [o.name for o in onnx_head.head.session.get_outputs()] == [m['head']['output']] == ['logits']
    for i, entry in enumerate(m['devices']):
        onnx_dev = backends.OnnxDevice(out, i, threads=1)
        torch_dev = torch_models.TorchDevice(ckpt, i, device='cpu', threads=1)
        assert [a.name for a in onnx_dev.session.get_inputs()] == [entry['input']] == ['image']
        assert [a.name for a in onnx_dev.session.get_outputs()] == [entry['output']] == ['tokens']
        hello_onnx, hello_torch = onnx_dev.describe(), torch_dev.describe()
        for field in ('model', 'token_width', 'input', 'precision'):
            assert hello_onnx[field] == hello_torch[field], (i, field)
        for head in (torch_head, onnx_head):  # each worker fits each aggregator
            expected = {'input': head.input, 'token_width': head.widths[i], 'model': head.specs[i]}
            for hello in (hello_onnx, hello_torch):
                assert dispatch.mismatch(expected, dict(hello, index=i)) is None
        half = backends.OnnxDevice(out, i, threads=1, fp16=True)
        assert half.describe()['precision'] == 'fp16' and half.source == os.path.join(out, entry['fp16_file'])
    # What the exporter writes is checked by the same schema: a manifest the runtime would refuse is never written.
    with pytest.raises(manifest.ModelError, match=r'devices\[1\]\.token_width must be a positive integer'):
        manifest.validate({**m, 'devices': [m['devices'][0], {**m['devices'][1], 'token_width': 0}]})


# ---------------------------------------------------------------------------------------------------------------
# The export served by the collaborative runtime, against the checkpoint served by it

LIMIT, BATCH, DROP_AT = 2000, 250, 1000  # test images, images per request, image at which device 0 leaves
DROPOUT = ['--dropout-tolerant', '--fp16-tokens', '--fault', 'exit', '--fault-rank', '1', '--fault-after',
           str(DROP_AT)]


def _serve(nproc, argv, out):
    """collab_infer.py under torch.distributed.launch: its per-image predictions and its report."""
    proc = run(launch_cmd('collab_infer.py', *argv, '--report', str(out / 'r.json'), '--csv', str(out / 'r.csv'),
                          '--collab-port', str(free_port()), nproc=nproc), timeout=300)
    with open(out / 'r.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    return {'preds': [int(r['pred']) for r in rows], 'devices': [r['devices'] for r in rows],
            'report': json.loads((out / 'r.json').read_text()), 'stderr': proc.stderr}


@pytest.fixture(scope='module')
def served(trained, fmnist_root, tmp_path_factory):
    """The trained ensemble served on loopback (rank 0 the aggregator, ranks 1 and 2 the devices) over LIMIT test
    images: from its checkpoint (--backend torch) and from the export of the `trained` fixture (--backend
    onnxruntime), each plain and with --dropout-tolerant --fp16-tokens and device 0 leaving at image DROP_AT; and
    the export's fp16 graphs (--fp16-model). Three launches at a time."""
    common = ['--data-path', fmnist_root, '--limit', str(LIMIT), '--batch-size', str(BATCH), '--timeout', '120',
              '--warmup', '1']
    sources = {'torch': ['--backend', 'torch', '--model-path', trained['ckpt']],
               'onnxruntime': ['--backend', 'onnxruntime', '--model-path', str(trained['out'])]}
    specs = {**{k: [*v, *common] for k, v in sources.items()},
             **{f'{k}_dropout': [*v, *common, *DROPOUT] for k, v in sources.items()},
             'onnxruntime_fp16': [*sources['onnxruntime'], *common, '--fp16-model']}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {k: pool.submit(_serve, 3, argv, tmp_path_factory.mktemp(k)) for k, argv in specs.items()}
        return {k: f.result() for k, f in futures.items()}


def _agreement(a, b):
    assert len(a['preds']) == len(b['preds']) == LIMIT
    return sum(p == q for p, q in zip(a['preds'], b['preds'], strict=True)) / LIMIT


@pytest.mark.slow  # five served runs of 2,000 images: with the slow cases, which CI runs beside the rest
def test_runtime_on_the_export_predicts_as_on_the_checkpoint(served, capsys):
    """collab_infer.py --backend onnxruntime --model-path EXPORT gives --backend torch's predictions on >= 99.9% of
    the test images: plain, and with --dropout-tolerant --fp16-tokens while device 0 leaves half-way."""
    same = _agreement(served['onnxruntime'], served['torch'])
    same_dropout = _agreement(served['onnxruntime_dropout'], served['torch_dropout'])
    with capsys.disabled():
        print(f'\nruntime, onnxruntime vs torch backend: same prediction on {100 * same:.2f}% of {LIMIT} test images; '
              f'with --dropout-tolerant --fp16-tokens, device 0 gone from image {DROP_AT}: {100 * same_dropout:.2f}%')
    assert same >= 0.999 and same_dropout >= 0.999
    for k in ('torch', 'onnxruntime'):
        plain, dropout = served[k], served[f'{k}_dropout']
        assert plain['report']['backend'] == k and {w['backend'] for w in plain['report']['workers']} == {k}
        assert plain['report']['accuracy'] > 0.25  # a trained model: the agreement compares real predictions
        assert plain['devices'] == ['0 1'] * LIMIT and plain['report']['wire_dtype'] == 'fp32'
        assert dropout['devices'] == ['0 1'] * DROP_AT + ['1'] * (LIMIT - DROP_AT), k
        assert [(d['rank'], d['at_image']) for d in dropout['report']['dropped_ranks']] == [(1, DROP_AT)]
        assert dropout['report']['wire_dtype'] == 'fp16'
        assert dropout['report']['bytes_per_image'] == ((64 + 96) * DROP_AT + 96 * (LIMIT - DROP_AT)) * 2 / LIMIT
    # The half that ran without device 0 is not the plain run's answer: the comparison above covers the dropout path.
    assert served['torch_dropout']['preds'][DROP_AT:] != served['torch']['preds'][DROP_AT:]


@pytest.mark.slow  # five served runs of 2,000 images: with the slow cases, which CI runs beside the rest
def test_runtime_runs_the_fp16_graphs(served, trained, capsys):
    """--fp16-model: the workers and the head run device{i}.fp16.onnx and head.fp16.onnx."""
    half = served['onnxruntime_fp16']
    same = _agreement(half, served['torch'])
    with capsys.disabled():
        print(f'\nruntime, --fp16-model (onnxruntime) vs torch fp32: same prediction on {100 * same:.2f}% of {LIMIT} '
              'test images')
    assert same >= 0.99
    report = half['report']
    assert report['model_precision'] == 'fp16' and {w['precision'] for w in report['workers']} == {'fp16'}
    assert sorted(os.path.basename(w['source']) for w in report['workers']) == ['device0.fp16.onnx',
                                                                                 'device1.fp16.onnx']


def test_fp16_model_is_refused_where_it_cannot_run(trained, tmp_path, capsys):
    """--fp16-model on the torch backend, or on an export without fp16 copies: one line, naming the file."""
    with pytest.raises(SystemExit) as exc:
        infer.parse_args(['--backend', 'torch', '--model-path', trained['ckpt'], '--fp16-model'])
    assert exc.value.code == 2 and 'needs --backend onnxruntime' in capsys.readouterr().err
    plain = tmp_path / 'plain'
    shutil.copytree(trained['out'], plain)
    m = json.loads((plain / 'manifest.json').read_text())
    m['head']['fp16_file'] = None
    (plain / 'manifest.json').write_text(json.dumps(m))
    with pytest.raises(SystemExit) as exc:
        cli.run_main(collab_infer.main, ['--backend', 'onnxruntime', '--model-path', str(plain), '--fp16-model',
                                           '--collab-port', str(free_port())])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == [f'error: {plain}/manifest.json has no fp16 copy of the head (export with '
                                           'export_onnx.py --fp16)']


def _ops(path):
    return onnx_graphs.op_types(onnx.load(str(path)))


def test_operators_tensorrt_imports(trained, tmp_path):
    """Every graph: default domain only, no Einsum or attention contrib ops, within the documented operator set."""
    out, m = trained['out'], trained['manifest']
    seen = set()
    for f in exported_graphs(out)[1]:
        model = onnx.load(str(out / f))
        assert {(o.domain or '', o.version) for o in model.opset_import} == {('', 17)}, f
        assert model.ir_version == 8, f  # the oldest IR of opset 17: older onnxruntime builds load it
        ops = _ops(out / f)
        assert {d for d, _ in ops} == {''}, f
        types = {t for _, t in ops}
        assert not types & FORBIDDEN and types <= onnx_graphs.TENSORRT_OPS, (f, sorted(types))
        seen |= types
        shape = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert shape[0] == 'batch', (f, shape)  # dynamic batch
    assert {'LayerNormalization', 'MatMul', 'Softmax', 'Erf', 'Gemm', 'Conv'} <= seen
    assert set(m['operators']) == seen
    # A graph with an operator TensorRT has no importer for is refused, with its name.
    bad = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node('Einsum', ['a', 'b'], ['c'], equation='ij,jk->ik')], 'g',
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 2]) for n in 'ab'],
        [onnx.helper.make_tensor_value_info('c', onnx.TensorProto.FLOAT, [2, 2])]))
    with pytest.raises(onnx_graphs.ExportError, match='Einsum'):
        onnx_graphs.check_ops(bad, 'bad.onnx')


def test_shrunk_mixed_family_export_opset13(tmp_path, capsys):
    """A shrunk dedeit next to a decct (no dist token, so cls tokens only), widths 48 and 32; the data path is gone,
    so parity runs on random inputs and says so. Opset 13 writes LayerNormalization out in primitive ops."""
    torch.manual_seed(1)
    ens = DeViTEnsemble([create_backbone('dedeit', SHRUNK), create_backbone('decct', CCT)], num_classes=10,
                        embed_dim=48).eval()
    assert ens.distilled is False
    ckpt = save_stage3(tmp_path / 'ens.pth', ens, str(tmp_path / 'no-data'))
    out = tmp_path / 'E13'
    m = export_onnx.main(['--model-path', ckpt, '--output_dir', str(out), '--opset', '13'])
    assert 'random' in capsys.readouterr().out
    assert m['opset'] == 13 and m['parity']['real_images'] is False and 'random' in m['parity']['inputs']
    assert [d['model'] for d in m['devices']] == ['dedeit', 'decct'] and m['class_names'] is None
    assert [d['token_width'] for d in m['devices']] == [48, 32]
    assert m['devices'][0]['model_kwargs']['shrink'] == SHRUNK['shrink']
    assert max(m['parity']['tokens_max_abs_diff']) <= 1e-4 and m['parity']['argmax_agreement'] == 1.0
    for f in exported_graphs(out)[1]:
        model = onnx.load(str(out / f))
        assert [o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')] == [13]
        assert model.ir_version == 7
        types = {t for _, t in _ops(out / f)}
        assert 'LayerNormalization' not in types and types <= onnx_graphs.TENSORRT_OPS, (f, sorted(types))
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        ref = ens(x).numpy()
    toks = [session(str(out / d['file'])).run(None, {'image': x.numpy()})[0] for d in m['devices']]
    logits = session(str(out / 'head.onnx')).run(None, {'tokens0': toks[0], 'tokens1': toks[1]})[0]
    assert np.abs(logits - ref).max() <= 1e-4


def save_student(path, kwargs, division, classes, fmnist_root):
    model = create_backbone('dedeit', {**kwargs, 'num_classes': len(classes)})
    model_kwargs = {k: v for k, v in kwargs.items() if k != 'shrink'}
    utils.save_checkpoint({'model': model.state_dict(), 'model_ema': None, 'stage': 2, 'division': division,
                           'classes': classes, 'num_classes': len(classes), 'epoch': 0,
                           'args': {'model': 'dedeit', 'model_kwargs': model_kwargs, 'dataset': 'fashion_mnist',
                                    'data_path': fmnist_root, 'tiny_transforms': True}}, path)
    return model.eval()


def test_stage2_folder_exports_devices_only_and_replaces_whole(tmp_path, fmnist_root):
    stage2 = tmp_path / 'stage2'
    students = [save_student(stage2 / f'sub-dataset{i}' / 'checkpoint.pth', kw, i, list(range(5 * i, 5 * i + 5)),
                             fmnist_root) for i, kw in enumerate([STUDENT, SHRUNK])]
    out = tmp_path / 'E'
    m = export_onnx.main(['--model-path', str(stage2), '--output_dir', str(out), '--parity-images', '8'])
    assert m['source_kind'] == 'students' and m['head'] is None and not (out / 'head.onnx').exists()
    assert [d['file'] for d in m['devices']] == ['device0.onnx', 'device1.onnx']
    assert [d['classes'] for d in m['devices']] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [d['token_width'] for d in m['devices']] == [64, 96] and m['num_classes'] == 10
    assert m['parity']['real_images'] and m['parity']['logits_max_abs_diff'] is None
    assert m['devices'][1]['model_kwargs']['shrink'] == SHRUNK['shrink']  # read off the pruned weights
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        ref = prefix_tokens(students[1], x).numpy()
    assert np.abs(session(str(out / 'device1.onnx')).run(None, {'image': x.numpy()})[0] - ref).max() \
        <= 1e-4

    # Failing parity (a zero tolerance here) writes nothing: the previous export stays as it was.
    (out / 'notes.txt').write_text('kept until a successful re-export\n')
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    source = onnx_export.load_source(stage2 / 'sub-dataset0' / 'checkpoint.pth')
    assert source.kind == 'students' and len(source.backbones) == 1
    with pytest.raises(onnx_export.ExportError, match='parity check failed: device0.onnx gives tokens'):
        onnx_export.export(source, str(out), torch.randn(4, 1, 28, 28), inputs_note='random', real_images=False,
                           mean=[0.5], std=[0.5], tolerance=0.0)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ['E', 'stage2']  # no temp folder left beside it
    # One student checkpoint exports alone (device0.onnx), and the re-export replaces the folder whole.
    m = export_onnx.main(['--model-path', str(stage2 / 'sub-dataset1' / 'checkpoint.pth'), '--output_dir', str(out),
                          '--parity-images', '4'])
    assert sorted(os.listdir(out)) == ['device0.onnx', 'manifest.json']
    assert m['devices'][0]['division'] == 1 and m['devices'][0]['token_width'] == 96


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.run_main(export_onnx.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def test_refusals_are_one_line(tmp_path, capsys):
    out = tmp_path / 'E'
    good = tmp_path / 'good.pth'
    torch.manual_seed(0)
    save_stage3(good, DeViTEnsemble([create_backbone('dedeit', STUDENT)], num_classes=10, embed_dim=32),
                str(tmp_path / 'no-data'))
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(good.read_bytes()[:5000])
    line = one_line_error(['--model-path', str(corrupt), '--output_dir', str(out)], capsys)
    assert str(corrupt) in line and 'truncated' in line
    stage1 = tmp_path / 'stage1.pth'
    torch.save({'model': create_backbone('dedeit', STUDENT).state_dict(), 'stage': 1, 'args': {'model': 'dedeit'}},
               stage1)
    assert 'stage-1 checkpoint' in one_line_error(['--model-path', str(stage1), '--output_dir', str(out)], capsys)
    tensors = tmp_path / 'weights.pth'
    torch.save({'weight': torch.zeros(2)}, tensors)
    assert 'not a DeViT stage checkpoint' in one_line_error(['--model-path', str(tensors), '--output_dir', str(out)],
                                                            capsys)
    assert 'does not exist' in one_line_error(['--model-path', str(tmp_path / 'nope.pth'), '--output_dir', str(out)],
                                              capsys)
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert 'neither checkpoint.pth' in one_line_error(['--model-path', str(empty), '--output_dir', str(out)], capsys)
    # An output folder that is not an export would be replaced whole: refused, untouched.
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'thesis.tex').write_text('x')
    line = one_line_error(['--model-path', str(good), '--output_dir', str(tmp_path / 'mine')], capsys)
    assert 'not an ONNX export' in line and (tmp_path / 'mine' / 'thesis.tex').read_text() == 'x'
    assert not out.exists()
    # The same one-device ensemble exports (its head has a single input).
    m = export_onnx.main(['--model-path', str(good), '--output_dir', str(out), '--parity-images', '4'])
    assert m['head']['inputs'] == ['tokens0'] and m['parity']['argmax_agreement'] == 1.0



def test_recorded_normalisation_reaches_the_export_and_the_runtime(tmp_path):
    """A model trained with --mean/--std is fed that way after deployment: the export's manifest and the torch
    worker's input both take the checkpoint's recorded values, not ImageNet's."""
    from collab_fixtures import export

    torch.manual_seed(0)
    ens = DeViTEnsemble([create_backbone('dedeit', STUDENT) for _ in range(2)], num_classes=10, embed_dim=48)
    path = save_stage3(tmp_path / 'ckpt.pth', ens, mean=[0.5], std=[0.25])
    _, inp, _ = torch_models.load_device(path, 0)
    assert (inp['mean'], inp['std']) == ([0.5], [0.25])
    export(path, tmp_path / 'export')
    written = json.loads((tmp_path / 'export' / 'manifest.json').read_text())
    assert (written['input']['mean'], written['input']['std']) == ([0.5], [0.25])
