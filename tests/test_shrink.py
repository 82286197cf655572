"""Shrinking: gates, importance, physical pruning, checkpoints of pruned students, shrink.py and
distill_sub.py --load-shrink, and shrunk students inside an ensemble."""
import copy
import json

import pytest
import timm
import torch
from helpers import TINY, launch_cmd, run
from torch.utils.data import DataLoader, TensorDataset

import distill_sub
import shrink as shrink_script
import splite_dataset
from models import build_ensemble, capture_qkv, create_backbone, load_students
from models.pruning import (
    gated,
    importance,
    infer_shape,
    keep_count,
    load_shrunk,
    make_policy,
    model_shape,
    prune_,
    reshape_,
    select,
)
from models.stats import count_macs, count_params

KW = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 24, 'depth': 2, 'num_heads': 3, 'mlp_ratio': 2}
STUDENT_KW = [f'{k}={v}' for k, v in KW.items()]
TEACHER = 'deit_tiny_distilled_patch16_224'
TEACHER_KW = {'img_size': 28, 'patch_size': 7, 'in_chans': 1, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}



def tiny(name='dedeit', num_classes=3, **kw):
    return timm.create_model(name, num_classes=num_classes, **{**KW, **kw}).eval()


def out(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('name,kw', [
    ('dedeit', KW),
    ('devit', KW),
    ('decct', {'img_size': 28, 'in_chans': 1, 'kernel_size': 3, 'n_conv_layers': 2, 'embed_dim': 24, 'depth': 2,
               'num_heads': 3, 'mlp_ratio': 2}),
])
def test_pruning_equals_weights_zeroed_by_hand(name, kw):
    """Physical pruning (rows and columns removed) gives the outputs of the unpruned model whose pruned heads and
    neurons were zeroed by hand in its weights: an independent reference, not the module's own gates."""
    def zero_by_hand(model, dropped_heads, dropped_neurons):
        """A copy of `model` whose dropped heads and MLP neurons contribute nothing, by its weights alone: for a head h
        of layer l, its rows of the fused qkv Linear (timm lays the output out as 3 × H × head_dim: q, k, v, each head's
        head_dim slots side by side) and its columns of proj; for a neuron, its fc1 row and bias and its fc2 column."""
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for block, heads, neurons in zip(ref.blocks, dropped_heads, dropped_neurons, strict=True):
                qkv, proj, H = block.attn.qkv, block.attn.proj, block.attn.num_heads
                d = qkv.out_features // (3 * H)
                for h in heads:
                    for part in range(3):  # q, k, v
                        rows = slice(part * H * d + h * d, part * H * d + (h + 1) * d)
                        qkv.weight[rows] = 0
                        if qkv.bias is not None:
                            qkv.bias[rows] = 0
                    proj.weight[:, h * d:(h + 1) * d] = 0
                fc1, fc2 = block.mlp.fc1, block.mlp.fc2
                for n in neurons:
                    fc1.weight[n] = 0
                    fc1.bias[n] = 0
                    fc2.weight[:, n] = 0
        return ref

    model = timm.create_model(name, num_classes=3, **kw).eval()
    x = torch.randn(3, 1, 28, 28)
    kept_heads, kept_neurons = [[0, 2], [1]], [[i for i in range(48) if i % 3], list(range(5, 48))]
    dropped_heads = [[1], [0, 2]]
    dropped_neurons = [[i for i in range(48) if i % 3 == 0], list(range(5))]
    pruned = prune_(copy.deepcopy(model), kept_heads, kept_neurons)
    assert model_shape(pruned) == {'heads': [2, 1], 'hidden': [32, 43]}
    reference = out(zero_by_hand(model, dropped_heads, dropped_neurons), x)
    assert (reference - out(model, x)).abs().max() > 1e-3  # the dropped heads and neurons did matter
    torch.testing.assert_close(out(pruned, x), reference, atol=1e-6, rtol=0)
    # heads alone and neurons alone too
    torch.testing.assert_close(out(prune_(copy.deepcopy(model), kept_heads, [None, None]), x),
                               out(zero_by_hand(model, dropped_heads, [[], []]), x), atol=1e-6, rtol=0)
    torch.testing.assert_close(out(prune_(copy.deepcopy(model), [None, None], kept_neurons), x),
                               out(zero_by_hand(model, [[], []], dropped_neurons), x), atol=1e-6, rtol=0)
    # the pruned model is smaller and cheaper
    assert count_params(pruned) < count_params(model)
    assert count_macs(pruned, x[:1]) < count_macs(model, x[:1])
    # q/k/v capture (the relation loss) sees the kept heads
    with capture_qkv(pruned, [0, 1]) as qkv:
        pruned(x)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    assert qkv[0][0].shape == (3, 2, tokens, 8) and qkv[1][2].shape == (3, 1, tokens, 8)


def test_pruned_model_round_trips_through_checkpoint(tmp_path):
    model = tiny()
    pruned = prune_(model, [[1], [0, 2]], [list(range(0, 48, 2)), list(range(40))])
    shape = model_shape(pruned)
    path = tmp_path / 'pruned.pth'
    torch.save({'model': pruned.state_dict(), 'shrink_policy': shape}, path)
    x = torch.randn(2, 1, 28, 28)

    rebuilt = reshape_(tiny(), json.loads(json.dumps(shape)))  # the spec alone recreates the shapes
    rebuilt.load_state_dict(torch.load(path)['model'])
    torch.testing.assert_close(out(rebuilt.eval(), x), out(pruned, x), atol=0, rtol=0)
    # the state dict alone says which shape it has
    assert infer_shape(tiny(), pruned.state_dict()) == shape
    assert infer_shape(tiny(), tiny().state_dict()) is None
    assert infer_shape(tiny(embed_dim=48), pruned.state_dict()) is None  # another architecture: not a pruning
    # load_shrunk (distill_sub.py --load-shrink with a checkpoint)
    fresh = load_shrunk(tiny(), path).eval()
    torch.testing.assert_close(out(fresh, x), out(pruned, x), atol=0, rtol=0)
    with pytest.raises(ValueError, match='layers'):
        reshape_(tiny(), {'heads': [1], 'hidden': [4]})
    with pytest.raises(ValueError, match='out of range'):
        reshape_(tiny(), {'heads': [4, 1], 'hidden': [4, 4]})


def test_importance_ranks_a_useless_head_and_neuron_last():
    model = tiny()
    d = model.blocks[1].attn.head_dim
    with torch.no_grad():
        model.blocks[1].attn.proj.weight[:, 2 * d:3 * d] = 0  # head 2 of layer 1 cannot reach the output
        model.blocks[0].mlp.fc2.weight[:, 7] = 0  # nor neuron 7 of layer 0
    data = TensorDataset(torch.randn(24, 1, 28, 28), torch.randint(0, 3, (24,)))
    heads, neurons, count = importance(model, DataLoader(data, batch_size=8), max_batches=2)
    assert count == 16 and [len(h) for h in heads] == [3, 3] and [len(n) for n in neurons] == [48, 48]
    assert heads[1][2] == 0 and (heads[1][:2] > 0).all() and (heads[0] > 0).all()
    assert neurons[0][7] == 0 and int(neurons[0].argmin()) == 7
    policy = make_policy(heads, neurons, head_ratio=0.67, neuron_ratio=0.5)
    assert policy['kept_heads'][1] == [0, 1] and 7 not in policy['kept_neurons'][0]
    assert policy['heads'] == [2, 2] and policy['hidden'] == [24, 24]
    assert select([torch.tensor([0.5, 0.1, 0.2])], 0.01) == [[0]]  # at least one head per layer
    assert keep_count(3, 0.5) == 2 and keep_count(192, 1 / 3) == 64 and keep_count(3, 1.0) == 3


def test_ensemble_of_shrunk_students_rebuilds_from_config(tmp_path):
    students = [prune_(tiny(), [[0], [1, 2]], [list(range(10)), list(range(30))]), tiny()]
    paths = []
    for i, student in enumerate(students):
        paths.append(tmp_path / f'student{i}.pth')  # stage-2 style: no shrink_policy, shapes read off the weights
        torch.save({'model': student.state_dict(), 'args': {'model': 'dedeit', 'model_kwargs': KW}}, paths[-1])
    ens = load_students(paths, num_classes=10, embed_dim=32).eval()
    config = json.loads(json.dumps(ens.config))
    assert config['backbones'][0]['kwargs']['shrink'] == {'heads': [1, 2], 'hidden': [10, 30]}
    assert 'shrink' not in config['backbones'][1]['kwargs']
    rebuilt = build_ensemble(config)
    rebuilt.load_state_dict(ens.state_dict())
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(out(rebuilt.eval(), x), out(ens, x), atol=0, rtol=0)
    students[0].reset_classifier(0)
    torch.testing.assert_close(out(ens.backbones[0], x), out(students[0], x), atol=0, rtol=0)
    # a backbone spec with a shrink shape builds the pruned model directly (collab workers, models.stats)
    backbone = create_backbone('dedeit', config['backbones'][0]['kwargs'])
    assert model_shape(backbone) == {'heads': [1, 2], 'hidden': [10, 30]}
    assert backbone.devit_spec == config['backbones'][0]


@pytest.fixture(scope='module')
def stage2(tmp_path_factory, fmnist_root):
    """A 4-division split, a random 'sub-teacher' and a random stage-2 student for division 0, as files."""
    root = tmp_path_factory.mktemp('shrink')
    splite_dataset.main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '4',
                         '--output_path', str(root / 'split')])
    manifest = json.loads((root / 'split' / 'split.json').read_text())
    classes = manifest['divisions'][0]['classes']
    torch.manual_seed(0)
    teacher = timm.create_model(TEACHER, num_classes=len(classes), **TEACHER_KW)
    (root / 'stage1' / 'sub-dataset0').mkdir(parents=True)
    torch.save({'model': teacher.state_dict()}, root / 'stage1' / 'sub-dataset0' / 'checkpoint.pth')
    student = tiny(num_classes=len(classes))
    (root / 'stage2' / 'sub-dataset0').mkdir(parents=True)
    torch.save({'model': student.state_dict(), 'model_ema': None, 'classes': classes, 'num_classes': len(classes),
                'stage': 2, 'args': {'model': 'dedeit', 'model_kwargs': KW}},
               root / 'stage2' / 'sub-dataset0' / 'checkpoint.pth')
    return root


TEACHER_ARGS = ['--teacher-model', TEACHER, '--teacher-kwargs', *[f'{k}={v}' for k, v in TEACHER_KW.items()],
                '--distillation-type', 'hard']


def test_shrink_script_prunes_a_stage2_student(stage2):
    out_dir = stage2 / 'shrunk'
    records = shrink_script.main([*TINY, '--model-path', str(stage2 / 'stage2'), '--data-path', str(stage2 / 'split'),
                                  '--head-ratio', '0.34', '--neuron-ratio', '0.5', '--importance-batches', '2',
                                  '--output_dir', str(out_dir)])
    policy = json.loads((out_dir / 'sub-dataset0' / 'shrink.json').read_text())
    assert policy == json.loads(json.dumps(records[0]))
    assert policy['heads'] == [1, 1] and policy['hidden'] == [24, 24] and len(policy['kept_neurons'][1]) == 24
    assert policy['steps'] == ['before', 'pruned', 'redistilled'] and policy['acc1'][2] is None
    assert policy['params'][1] < policy['params'][0] and policy['macs'][1] < policy['macs'][0]
    ckpt = torch.load(out_dir / 'sub-dataset0' / 'checkpoint.pth', weights_only=False)
    assert ckpt['shrink_policy']['kept_heads'] == policy['kept_heads']
    # the pruned student is an ordinary stage-2 checkpoint for ensemble.py: the folder carries the manifest
    assert (out_dir / 'split.json').is_file()
    ens = load_students([out_dir / 'sub-dataset0' / 'checkpoint.pth'], num_classes=10, embed_dim=32)
    assert model_shape(ens.backbones[0]) == {'heads': [1, 1], 'hidden': [24, 24]}
    # nothing is overwritten by accident, and a re-distillation without a teacher fails before any work
    with pytest.raises(ValueError, match='--overwrite'):
        shrink_script.main([*TINY, '--model-path', str(stage2 / 'stage2'), '--data-path', str(stage2 / 'split'),
                            '--output_dir', str(out_dir)])
    with pytest.raises(ValueError, match='--teacher-path'):
        shrink_script.main([*TINY, '--model-path', str(stage2 / 'stage2'), '--data-path', str(stage2 / 'split'),
                            '--redistill-epochs', '1', '--output_dir', str(stage2 / 'no_teacher')])
    assert not (stage2 / 'no_teacher' / 'sub-dataset0').exists()
    # a policy file re-applied to the unpruned weights (distill_sub.py --load-shrink shrink.json) gives the same model
    unpruned = torch.load(stage2 / 'stage2' / 'sub-dataset0' / 'checkpoint.pth')
    student = tiny(num_classes=unpruned['num_classes'])
    student.load_state_dict(unpruned['model'])
    load_shrunk(student, out_dir / 'sub-dataset0' / 'shrink.json')
    for key, value in ckpt['model'].items():
        torch.testing.assert_close(student.state_dict()[key], value, atol=0, rtol=0)


def test_redistill_through_distill_sub(stage2):
    """shrink.py --redistill-epochs 1 as a process: distill_sub.py --load-shrink trains the pruned student."""
    out_dir = stage2 / 'redistilled'
    run(launch_cmd('shrink.py', *TINY, '--limit-train', '64', '--model-path', str(stage2 / 'stage2'),
                   '--data-path', str(stage2 / 'split'), '--head-ratio', '0.67', '--neuron-ratio', '0.25',
                   '--importance-batches', '1', '--redistill-epochs', '1', *TEACHER_ARGS,
                   '--teacher-path', str(stage2 / 'stage1'), '--output_dir', str(out_dir), launcher='python'))
    folder = out_dir / 'sub-dataset0'
    policy = json.loads((folder / 'shrink.json').read_text())
    assert policy['heads'] == [2, 2] and policy['hidden'] == [12, 12]
    assert all(0 <= a <= 100 for a in policy['acc1'])
    log = [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0]
    ckpt = torch.load(folder / 'checkpoint.pth', weights_only=False)
    assert ckpt['args']['load_shrink'] == str(out_dir)
    student = tiny()
    assert infer_shape(student, ckpt['model']) == {'heads': [2, 2], 'hidden': [12, 12]}
    # the re-distilled weights moved away from the pruned ones
    pruned = torch.load(folder / 'pruned.pth', weights_only=False)['model']
    assert not torch.equal(pruned['blocks.0.attn.qkv.weight'], ckpt['model']['blocks.0.attn.qkv.weight'])
    # distill_sub.py --load-shrink in process, from a policy file on top of --model-path
    out2 = stage2 / 'from_policy'
    distill_sub.main([*TINY, '--limit-train', '64', '--model', 'dedeit', '--model-kwargs', *STUDENT_KW,
                      '--model-path', str(stage2 / 'stage2' / 'sub-dataset0' / 'checkpoint.pth'),
                      '--load-shrink', str(folder / 'shrink.json'), *TEACHER_ARGS,
                      '--teacher-path', str(stage2 / 'stage1'), '--data-path', str(stage2 / 'split'),
                      '--epochs', '1', '--output_dir', str(out2)])
    ckpt2 = torch.load(out2 / 'sub-dataset0' / 'checkpoint_last.pth', weights_only=False)
    assert infer_shape(tiny(), ckpt2['model']) == {'heads': [2, 2], 'hidden': [12, 12]}


def test_decct_backbone_shrinks_too():
    """The compact convolutional transformer's blocks are timm Blocks: gates, pruning and the spec work the same."""
    kw = {'img_size': 28, 'in_chans': 1, 'embed_dim': 32, 'depth': 2, 'num_heads': 4, 'mlp_ratio': 2}
    model, x = create_backbone('decct', kw).eval(), torch.randn(2, 1, 28, 28)
    kept_heads, kept_neurons = [[0, 2, 3], [1]], [list(range(0, 64, 2)), None]
    neuron_gates = [(torch.arange(64) % 2 == 0).float(), None]
    with gated(model, [torch.tensor([1., 0., 1., 1.]), torch.tensor([0., 1., 0., 0.])], neuron_gates):
        reference = out(model, x)
    pruned = prune_(model, kept_heads, kept_neurons)
    torch.testing.assert_close(out(pruned, x), reference, atol=1e-6, rtol=0)
    rebuilt = create_backbone('decct', {**kw, 'shrink': model_shape(pruned)})
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(out(rebuilt.eval(), x), reference, atol=1e-6, rtol=0)


def test_shrink_script_under_the_launcher(stage2):
    """Two processes: importance summed over the ranks' shards, evaluation sharded, rank 0 writes."""
    out_dir = stage2 / 'ddp'
    run(launch_cmd('shrink.py', *TINY, '--model-path', str(stage2 / 'stage2'), '--data-path', str(stage2 / 'split'),
                   '--importance-batches', '2', '--output_dir', str(out_dir), nproc=2))
    policy = json.loads((out_dir / 'sub-dataset0' / 'shrink.json').read_text())
    assert policy['importance_images'] == 2 * 2 * 32 and policy['heads'] == [2, 2]
    assert load_students([out_dir / 'sub-dataset0' / 'checkpoint.pth'], num_classes=10, embed_dim=32).num_devices == 1
