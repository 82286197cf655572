"""plan.py on hand-written profiles (uniform fleets, a slow device, impossible fleets), the profile and plan schemas,
the example board profiles, and distill_sub.py --plan on tiny models through the real stage scripts."""
import copy
import json
import math
import os
import sys

import pytest
import torch
from helpers import ROOT, TEACHER, TEACHER_KW, TINY, error_lines, launch_cmd, run

import splite_dataset
from collab.host import plan
from collab.profiles import ProfileError, read_profile, validate_profile
from models.ensemble_model import create_backbone, load_students
from models.features import token_width

PAPER_WIDTHS, PAPER_DEPTHS = (64, 128, 192, 256, 320, 384), (4, 6, 8, 12)


def profile(name, speed=1.0, *, widths=PAPER_WIDTHS, depths=PAPER_DEPTHS, size=224, default=(192, 12), head_dim=64,
            available_mb=4000.0, link=None, model_kwargs=None, params=None, noise=None):
    """A hand-written profile: ViT-like sizes (12 d w^2 parameters, 197 tokens) and a device whose forward costs
    (1 + 0.2 depth + MACs / 2e8) ms / speed. ``params(w, d)`` overrides the sizes; ``noise(w, d)`` scales the
    latency (measurement noise)."""
    candidates = []
    for w in widths:
        for d in depths:
            p = params(w, d) if params else 12 * d * w * w + 200 * w
            ms = (1.0 + 0.2 * d + p * 197 / 2e8) / speed * (noise(w, d) if noise else 1.0)
            candidates.append({'width': w, 'depth': d, 'num_heads': max(1, w // head_dim), 'params': p,
                               'macs': p * 197,
                               'token_floats': 2 * w, 'memory_mb': p * 4 / 2 ** 20 + 5,
                               'latency_ms': {'torch': {'median': ms, 'p95': 1.1 * ms, 'iters': 20}}})
    chans = (model_kwargs or {}).get('in_chans', 3)
    return {'format': 'devit-profile', 'version': 1, 'name': name, 'source': 'hand-written for the tests',
            'family': 'dedeits', 'model': 'dedeit', 'input_size': size, 'in_chans': chans,
            'model_kwargs': dict(model_kwargs or {}, img_size=size, in_chans=chans),
            'family_default': {'width': default[0], 'depth': default[1]},
            'memory': {'total_mb': 8000.0, 'available_mb': available_mb}, 'link': link, 'cpu_quota': None,
            'threads': 1, 'device': 'cpu', 'candidates': candidates}


def write(tmp_path, profiles):
    paths = []
    for i, p in enumerate(profiles):
        path = tmp_path / f'd{i}.json'
        path.write_text(json.dumps(p))
        paths.append(str(path))
    return paths


def make(tmp_path, profiles, classes, **kw):
    paths = write(tmp_path, profiles)
    return plan.make_plan(plan.load_fleet(paths), paths, classes, **kw)


def shape(device):
    return device['width'], device['depth']


# ---------------------------------------------------------------------------------------------------------------------
# The planner

@pytest.mark.parametrize('classes', [10, 100, 1000])
def test_a_uniform_fleet_gets_the_uniform_plan(tmp_path, classes):
    p = make(tmp_path, [profile('same')] * 4, classes)
    assert [d['num_classes'] for d in p['devices']] == plan.even_split(classes, 4) == p['uniform']['num_classes']
    assert all(shape(d) == (192, 12) for d in p['devices'])
    assert p['predicted_ms'] == p['uniform']['predicted_ms']
    assert p['chosen'] == 'uniform'


def test_alike_devices_with_measurement_noise_get_the_uniform_plan(tmp_path):
    jitter = [lambda w, d, k=k: 1 + 0.02 * math.sin(7 * w + 3 * d + k) for k in range(4)]  # +-2%
    p = make(tmp_path, [profile(f'same{k}', noise=jitter[k]) for k in range(4)], 100)
    assert p['chosen'] == 'uniform' and all(shape(d) == (192, 12) for d in p['devices'])
    assert [d['num_classes'] for d in p['devices']] == [25, 25, 25, 25]


def test_one_slow_device_gets_fewer_classes_and_a_smaller_student(tmp_path):
    p = make(tmp_path, [profile('fast')] * 3 + [profile('slow', speed=0.25)], 100)
    fast, slow = p['devices'][:3], p['devices'][3]
    assert p['chosen'] == 'planned'
    assert all(slow['num_classes'] < d['num_classes'] for d in fast)
    assert all(slow['params'] < d['params'] for d in fast)
    assert sum(d['num_classes'] for d in p['devices']) == 100
    assert p['predicted_ms'] == max(d['predicted_ms']['total'] for d in p['devices'])
    assert p['predicted_ms'] < 0.6 * p['uniform']['predicted_ms']  # the uniform plan waits for the slow device
    assert p['uniform']['predicted_ms'] == p['uniform']['devices_ms'][3]
    # the capacity rule: no student holds more classes per parameter than the uniform plan's students
    kappa = p['capacity_per_class']
    assert kappa == pytest.approx(p['uniform']['params'] / 25)
    for d in p['devices']:
        assert d['params'] / d['num_classes'] >= kappa
    assert sum(d['params'] for d in p['devices']) >= 4 * p['uniform']['params']
    # planned shapes carry into the kwargs the stages will use
    assert p['devices'][3]['model_kwargs'] == {'img_size': 224, 'in_chans': 3, 'embed_dim': slow['width'],
                                              'depth': slow['depth'], 'num_heads': slow['num_heads']}


def test_the_capacity_rule_is_what_limits_the_slow_device(tmp_path):
    """Without a rule the slow device would take one class on the smallest student; with it, its classes are
    bounded by its student's parameters / kappa, and a larger kappa (a larger uniform student) gives it fewer."""
    fleet = [profile('fast')] * 3 + [profile('slow', speed=0.25)]
    small = make(tmp_path, fleet, 1000, uniform_shape=(128, 12))
    large = make(tmp_path, fleet, 1000, uniform_shape=(256, 12))
    for p in (small, large):
        for d in p['devices']:
            assert d['num_classes'] <= math.floor(d['params'] / p['capacity_per_class'] + 1e-9)
    assert large['capacity_per_class'] > small['capacity_per_class']
    assert large['devices'][3]['params'] / large['devices'][3]['num_classes'] >= large['capacity_per_class']


def test_no_device_gets_a_single_class_where_there_are_two_per_device(tmp_path):
    fleet = [profile('fast')] * 3 + [profile('slow', speed=0.05)]
    p = make(tmp_path, fleet, 10)
    assert p['min_classes'] == 2 and min(d['num_classes'] for d in p['devices']) == 2
    assert p['devices'][3]['params'] < p['uniform']['params']  # a smaller student for its two classes
    tight = make(tmp_path, fleet, 5)  # fewer than two classes per device: one is the floor
    assert tight['min_classes'] == 1 and sum(d['num_classes'] for d in tight['devices']) == 5
    one = make(tmp_path, fleet, 10, min_classes=1)
    assert one['devices'][3]['num_classes'] == 1 and one['devices'][3]['params'] < p['devices'][3]['params']


def test_transfer_counts_in_the_prediction(tmp_path):
    link = {'mbps': 100.0, 'rtt_ms': 1.0, 'source': 'given'}
    p = make(tmp_path, [profile('a', link=link)] * 2, 10, input_dtype='uint8', fp16_tokens=True)
    d = p['devices'][0]
    image, tokens = 3 * 224 * 224, 2 * 2 * d['width']  # uint8 pixels; fp16 cls + dist tokens
    assert d['predicted_ms']['transfer'] == pytest.approx(1.0 + 8 * (image + tokens) / 100e3)
    assert d['predicted_ms']['total'] == pytest.approx(d['predicted_ms']['compute'] + d['predicted_ms']['transfer'])


def test_example_board_profiles_plan_a_nano_and_orin_fleet():
    paths = [os.path.join(ROOT, 'profiles', f) for f in ('nano.json', 'nano.json', 'orin.json', 'orin.json')]
    profiles = plan.load_fleet(paths)
    for prof in profiles:
        assert prof['source'].startswith('estimate from public figures, not a measurement')
    p = plan.make_plan(profiles, paths, 1000)
    nanos, orins = p['devices'][:2], p['devices'][2:]
    assert all(o['num_classes'] > n['num_classes'] and o['params'] > n['params'] for o in orins for n in nanos)
    assert p['predicted_ms'] < p['uniform']['predicted_ms']
    alike = plan.make_plan(plan.load_fleet(paths[:2]), paths[:2], 1000)
    assert alike['chosen'] == 'uniform' and all(shape(d) == (192, 12) for d in alike['devices'])


# ---------------------------------------------------------------------------------------------------------------------
# Impossible fleets and bad input: one clear error

def test_a_device_too_small_for_any_candidate_is_one_error(tmp_path):
    with pytest.raises(plan.PlanError, match=r'device 2 \(.*d2\.json\) is too small for any candidate'):
        make(tmp_path, [profile('a'), profile('b'), profile('tiny', available_mb=1.0), profile('d')], 100)
    # memory left for small students only, and those hold less than one class each
    only_small = profile('small', available_mb=6.0)
    with pytest.raises(plan.PlanError, match='device 1 .* holds fewer than 2 classes'):
        make(tmp_path, [profile('a'), only_small], 10)


def test_fewer_classes_than_devices_is_one_error(tmp_path):
    with pytest.raises(plan.PlanError, match='4 devices but only 3 classes'):
        make(tmp_path, [profile('a')] * 4, 3)


def test_profiles_of_other_inputs_are_refused(tmp_path):
    with pytest.raises(plan.PlanError, match='profiles disagree on input_size'):
        make(tmp_path, [profile('a'), profile('b', size=112)], 10)
    without = profile('a', widths=(64, 128))
    with pytest.raises(plan.PlanError, match=r"uniform plan's student dedeit 192x12"):
        make(tmp_path, [without, without], 10)


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    paths = write(tmp_path, [profile('a'), profile('b')])
    out = tmp_path / 'plan.json'
    proc = run([sys.executable, os.path.join(ROOT, 'plan.py'), '--devices', *paths, '--output', str(out),
                '--classes', '1'], check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and 'only 1 classes' in lines[0], proc.stderr
    assert 'Traceback' not in proc.stderr and not out.exists()
    for extra, error, fragment in ((['--classes', '10', '--family', 'decct'], plan.PlanError, '--family decct'),
                                   ([], plan.PlanError, '--classes'),
                                   (['--classes', '10', '--devices', str(tmp_path / 'gone.json')], ProfileError,
                                    'gone.json: cannot read')):
        with pytest.raises(error, match=fragment):
            plan.main(['--devices', *paths, '--output', str(out), *extra])
        assert not out.exists()


def _drop(key):
    def edit(p):
        del p[key]
    return edit


def _set(path, value):
    def edit(p):
        obj = p
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return edit


@pytest.mark.parametrize('edit,fragment', [
    (_drop('candidates'), 'missing field candidates'),
    (_set(['format'], 'something'), 'field format'),
    (_set(['version'], 2), 'field version'),
    (_set(['candidates'], []), 'candidates is empty'),
    (_set(['candidates', 3, 'latency_ms', 'torch', 'median'], -1.0), 'candidates[3].latency_ms.torch.median'),
    (_set(['candidates', 0, 'latency_ms', 'torch', 'median'], 'fast'), 'candidates[0].latency_ms.torch.median'),
    (_set(['candidates', 0, 'latency_ms'], {'tensorrt': {'median': 1, 'p95': 1}}), 'unknown backend'),
    (_set(['candidates', 1, 'num_heads'], 5), 'not divisible'),
    (_set(['candidates', 1, 'params'], True), 'candidates[1].params'),
    (_set(['memory', 'available_mb'], 0), 'memory.available_mb'),
    (_set(['link'], {'rtt_ms': 1}), 'link.mbps'),
    (_set(['model_kwargs', 'depth'], 3), 'model_kwargs must not set depth'),
    (_drop('family_default'), 'family_default'),
])
def test_a_profile_is_checked_when_read(tmp_path, edit, fragment):
    good = profile('a')
    validate_profile(copy.deepcopy(good))
    bad = copy.deepcopy(good)
    edit(bad)
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(bad))
    with pytest.raises(ProfileError) as err:
        read_profile(str(path))
    assert str(err.value).startswith(f'profile {path}: ') and fragment in str(err.value)


def test_unreadable_profiles_name_the_file(tmp_path):
    path = tmp_path / 'broken.json'
    path.write_text('{"format": "devit-profile", ')
    with pytest.raises(ProfileError, match=r'broken\.json: not valid JSON'):
        read_profile(str(path))
    with pytest.raises(ProfileError, match=r'nowhere\.json: cannot read'):
        read_profile(str(tmp_path / 'nowhere.json'))


def test_plan_file_round_trip_and_checks(tmp_path, capsys):
    paths = write(tmp_path, [profile('fast'), profile('slow', speed=0.25)])
    out = tmp_path / 'plan.json'
    p = plan.main(['--devices', *paths, '--output', str(out), '--classes', '100', '--dataset', 'cifar100'])
    printed = capsys.readouterr().out
    assert plan.read_plan(str(out)) == json.loads(out.read_text()) == p
    assert p['format'] == 'devit-plan' and p['dataset'] == 'cifar100' and p['num_classes'] == 100
    assert [d['profile'] for d in p['devices']] == paths and all(d['classes'] is None for d in p['devices'])
    for d in p['devices']:  # one table row per device
        assert any(line.split()[:2] == [str(d['index']), d['name']] for line in printed.splitlines())
    assert 'uniform plan' in printed
    bad = json.loads(out.read_text())
    bad['devices'][0]['num_classes'] += 1
    with pytest.raises(plan.PlanError, match='sum to 101'):
        plan.read_plan(bad)
    bad = json.loads(out.read_text())
    bad['devices'][0]['classes'] = list(range(bad['devices'][0]['num_classes']))
    bad['devices'][1]['classes'] = list(range(bad['devices'][1]['num_classes']))
    with pytest.raises(plan.PlanError, match='repeats classes'):
        plan.read_plan(bad)


def test_fashion_mnist_class_count_from_the_dataset(tmp_path, fmnist_root):
    paths = write(tmp_path, [profile('a'), profile('b')])
    p = plan.main(['--devices', *paths, '--output', str(tmp_path / 'p.json'), '--dataset', 'fashion_mnist',
                   '--data_path', fmnist_root])
    assert p['num_classes'] == 10 and [d['num_classes'] for d in p['devices']] == [5, 5]


def test_student_for_lets_explicit_kwargs_win_key_by_key(tmp_path):
    p = make(tmp_path, [profile('fast'), profile('slow', speed=0.25)], 100)
    model, kwargs = plan.student_for(p, 1, {'depth': 3, 'mlp_ratio': 2})
    assert model == 'dedeit'
    assert kwargs == dict(p['devices'][1]['model_kwargs'], depth=3, mlp_ratio=2)
    with pytest.raises(plan.PlanError, match='no division 2'):
        plan.student_for(p, 2)
    manifest = {'num_division': 2, 'divisions': [{'classes': list(range(d['num_classes']))} for d in p['devices']]}
    assert plan.students_for(p, manifest) == [plan.student_for(p, i) for i in range(2)]
    with pytest.raises(plan.PlanError, match='--model devit contradicts'):
        plan.students_for(p, manifest, model='devit')
    manifest['divisions'].reverse()
    with pytest.raises(plan.PlanError, match='split with splite_dataset.py --plan'):
        plan.students_for(p, manifest)


# ---------------------------------------------------------------------------------------------------------------------
# distill_sub.py --plan on tiny models (28x28 Fashion-MNIST, patch 7: 16 patches + cls + dist, as the teacher)

TINY_KW = {'patch_size': 7, 'in_chans': 1}


def tiny_params(width, depth):
    kwargs = dict(TINY_KW, img_size=28, embed_dim=width, depth=depth, num_heads=width // 16)
    return sum(p.numel() for p in create_backbone('dedeit', kwargs).parameters())


def tiny_profile(name, speed):
    return profile(name, speed, widths=(16, 32, 48), depths=(1, 2), size=28, default=(32, 2), head_dim=16,
                   model_kwargs=TINY_KW, params=tiny_params)


@pytest.mark.slow
def test_distill_follows_the_plan_and_the_ensemble_takes_unlike_students(tmp_path, fmnist_root):
    paths = write(tmp_path, [tiny_profile('fast', 1.0), tiny_profile('slow', 0.25)])
    plan_path = tmp_path / 'plan.json'
    p = plan.main(['--devices', *paths, '--output', str(plan_path), '--classes', '10'])
    counts = [d['num_classes'] for d in p['devices']]
    assert p['chosen'] == 'planned' and counts[0] > counts[1] and p['devices'][0]['params'] > p['devices'][1]['params']

    split = tmp_path / 'split'
    splite_dataset.main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '2',
                         '--sub_classes', *map(str, counts), '--output_path', str(split)])
    run(launch_cmd('train_subdata.py', *TINY, '--model', TEACHER, '--model-kwargs', *TEACHER_KW, '--epochs', '1',
                   '--limit-train', '128', '--limit-val', '50', '--data-path', str(split), '--num_division', '2',
                   '--all-divisions', '--output_dir', str(tmp_path / 'stage1'), launcher='python'))
    stage2 = ['distill_sub.py', *TINY, '--model', 'dedeit', '--epochs', '1', '--limit-train', '128',
              '--limit-val', '50', '--teacher-model', TEACHER, '--teacher-kwargs', *TEACHER_KW,
              '--teacher-path', str(tmp_path / 'stage1'), '--distillation-type', 'hard', '--data-path', str(split),
              '--num_division', '2', '--all-divisions', '--plan', str(plan_path)]
    run(launch_cmd(*stage2, '--model-kwargs', 'mlp_ratio=2', '--output_dir', str(tmp_path / 'stage2'),
                   launcher='python'))
    for d in p['devices']:
        ckpt = torch.load(tmp_path / 'stage2' / f'sub-dataset{d["index"]}' / 'checkpoint.pth', weights_only=False)
        assert ckpt['args']['model_kwargs'] == dict(d['model_kwargs'], mlp_ratio=2)
        assert ckpt['model']['pos_embed'].shape[-1] == d['width']
        assert sum(k.startswith('blocks.') and k.endswith('.attn.qkv.weight') for k in ckpt['model']) == d['depth']
        assert ckpt['model']['blocks.0.mlp.fc1.weight'].shape == (2 * d['width'], d['width'])  # mlp_ratio=2 won
        assert ckpt['num_classes'] == d['num_classes']
    ens = load_students(str(tmp_path / 'stage2'), 2, num_classes=10, embed_dim=32)
    assert ens.widths == [d['width'] for d in p['devices']]
    assert ens.token_widths() == [token_width(b) for b in ens.backbones]

    # a split the plan does not fit: one error line before any training
    uniform = tmp_path / 'split_even'
    splite_dataset.main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '2',
                         '--output_path', str(uniform)])
    stage2[stage2.index('--data-path') + 1] = str(uniform)
    proc = run(launch_cmd(*stage2, '--output_dir', str(tmp_path / 'bad'), launcher='python'), check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and 'split with splite_dataset.py --plan' in lines[0]
    assert not (tmp_path / 'bad').exists() or not any((tmp_path / 'bad').rglob('*.pth'))


# ---------------------------------------------------------------------------------------------------------------------
# demo.sh --devices: checked before anything runs, and wired plan -> split --plan -> stages 1-3 (commands recorded)

DEMO_FLEET = [os.path.join(ROOT, 'profiles', 'demo', name) for name in ('slow.json', 'fast.json', 'slow.json',
                                                                         'fast.json')]
# PYTHON for demo.sh: runs plan.py for real (cheap), records every other command instead of running it.
RECORDER = '''#!{python}
import json, os, sys
if sys.argv[1:2] == ['plan.py']:
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
with open(os.environ['DEVIT_RECORD'], 'a') as f:
    f.write(json.dumps(sys.argv[1:]) + '\\n')
'''


def run_demo(tmp_path, *args, record=False):
    import subprocess

    from helpers import env, free_port

    python = sys.executable
    if record:
        python = str(tmp_path / 'python')
        (tmp_path / 'python').write_text(RECORDER.format(python=sys.executable))
        os.chmod(python, 0o755)
    e = dict(env(), OUT=str(tmp_path / 'out'), PYTHON=python, PORT=str(free_port()),
             DEVIT_RECORD=str(tmp_path / 'commands.jsonl'))
    return subprocess.run(['bash', os.path.join(ROOT, 'demo.sh'), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize('args, fragment', [
    (['--devices'], '--devices needs profile files'),
    (['--devices', 'MISSING'], 'cannot read it'),
    (['--devices', 'BAD'], 'missing field version'),
    (['--family', 'decct', '--devices', *DEMO_FLEET], 'profiles are of family dedeits'),
    (['--strategy', 'best'], '--strategy must be random, confusion-together or confusion-spread'),
    (['--split-seed', 'x'], '--split-seed must be a non-negative integer')])
def test_demo_bad_options_are_one_error_line_before_anything_runs(tmp_path, args, fragment):
    (tmp_path / 'bad.json').write_text('{"format": "devit-profile"}')
    args = [{'MISSING': str(tmp_path / 'missing.json'), 'BAD': str(tmp_path / 'bad.json')}.get(a, a) for a in args]
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'earlier.txt').write_text('an earlier run')
    proc = run_demo(tmp_path, *args)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr
    assert 'Traceback' not in proc.stderr
    assert (tmp_path / 'out' / 'earlier.txt').exists()  # nothing deleted, nothing trained


def test_demo_devices_wiring(tmp_path):
    proc = run_demo(tmp_path, '--devices', *DEMO_FLEET, '--strategy', 'confusion-spread', '--split-seed', '3',
                    record=True)
    assert proc.returncode == 0, proc.stderr
    out, planned = str(tmp_path / 'out'), str(tmp_path / 'out' / 'planned')
    p = plan.read_plan(os.path.join(planned, 'plan.json'))
    # the demo fleet in this order: the uniform split's class counts, one-block students on the slow devices
    assert p['chosen'] == 'planned' and [d['num_classes'] for d in p['devices']] == [2, 3, 2, 3]
    assert [(d['width'], d['depth']) for d in p['devices']] == [(96, 1), (64, 2), (96, 1), (64, 2)]
    assert p['uniform']['model_kwargs']['embed_dim'] == 64 and p['uniform']['model_kwargs']['depth'] == 2
    assert (splite_dataset.class_groups(10, plan=splite_dataset.read_plan(p, 10))
            == splite_dataset.class_groups(10, 4))  # the same groups as the uniform split
    with open(tmp_path / 'commands.jsonl') as f:
        commands = [json.loads(line) for line in f]

    def script(argv):
        return next(a for a in argv if a.endswith('.py'))

    def value(argv, flag):
        return argv[argv.index(flag) + 1]

    names = [script(c) for c in commands]
    teacher = next(i for i, c in enumerate(commands) if script(c) == 'train_subdata.py')
    confusion = next(i for i, c in enumerate(commands) if '--write-confusion' in c)
    splits = [c for c in commands if script(c) == 'splite_dataset.py' and '--output_path' in c]
    assert teacher < confusion and value(commands[confusion], '--confusion-split') == 'train'
    assert [value(s, '--output_path') for s in splits] == [f'{out}/split1', f'{out}/split4', f'{planned}/split']
    for s in splits[1:]:  # the uniform and the planned split: the same flags choose the classes
        assert s[s.index('--strategy'):][:8] == ['--strategy', 'confusion-spread', '--seed', '3', '--confusion',
                                                   f'{out}/confusion.json', '--confusion-split', 'train'], s
    assert value(splits[2], '--plan') == f'{planned}/plan.json'
    stages = {value(c, '--output_dir'): c for c in commands if '--output_dir' in c}
    s1, s2, s3 = (stages[f'{planned}/stage{i}'] for i in (1, 2, 3))
    assert value(s1, '--data-path') == f'{planned}/split' and value(s1, '--model-path') == value(
        stages[f'{out}/stage1'], '--model-path')  # the same teacher
    assert value(s2, '--plan') == f'{planned}/plan.json' and '--model-kwargs' not in s2
    assert value(s2, '--teacher-path') == f'{planned}/stage1' and value(s2, '--data-path') == f'{planned}/split'
    assert value(s3, '--model-path') == f'{planned}/stage2' and '--eval-missing' in s3
    assert names[-1] == 'demo_report.py'
