"""The three stage scripts as real processes under the seed's launcher, chained stage to stage, plus resume,
the seed's commands parsed verbatim, bad input, and the demo's quick mode."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest
import torch
from helpers import ROOT, STUDENT_KW, TEACHER, TEACHER_KW, TINY, digest, env, error_lines, launch_cmd, read_log, run

import distill_sub
import ensemble as ensemble_script
import splite_dataset
import train_subdata
from models.ensemble_model import load_ensemble

SEED_COMMANDS = {
    train_subdata: '--batch-size 256 --eval-batch-size 512 --epochs 100 --model deit_base_distilled_patch16_224 '
                   '--model-path ./ckpt.pth --model-ema --lr 1e-4 --data-path ./sub_datasets --dataset cifar100 '
                   '--num_division 4 --start-division 0 --output_dir ./output',
    distill_sub: '--batch-size 256 --eval-batch-size 512 --epochs 100 --model dedeit --model-path ./ckpt.pth '
                 '--model-ema --lr 8e-5 --data-path ./sub_datasets --dataset cifar100 '
                 '--teacher-model deit_base_distilled_patch16_224 --teacher-path ./teacher_ckpt.pth '
                 '--distillation-type hard --gama 0.2 0.1 0.3 --num_division 4 --start-division 0 '
                 '--output_dir ./output',
    ensemble_script: '--batch-size 128 --eval-batch-size 256 --epochs 50 --model dedeit --model-path ./model_path '
                     '--model-ema --lr 3e-4 --data-path ./datasets --dataset cifar100 --num_division 4 '
                     '--output_dir ./output --teacher-model deit_base_distilled_patch16_224 '
                     '--teacher-path ./teacher_ckpt.pth --sub_classes 25 25 25 25',
}


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory, fmnist_root):
    """split -> teacher -> stage 1 -> stage 2 -> stage 3, every training stage under launch --nproc_per_node=2."""
    out = tmp_path_factory.mktemp('pipeline')
    for n in (1, 4):
        splite_dataset.main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', str(n),
                             '--output_path', str(out / f'split{n}')])
    teacher_args = ['--model', TEACHER, '--model-kwargs', *TEACHER_KW]
    run(launch_cmd('train_subdata.py', *TINY, *teacher_args, '--lr', '2e-3', '--epochs', '1', '--data-path',
                   str(out / 'split1'), '--num_division', '1', '--output_dir', str(out / 'teacher')))
    teacher_ckpt = out / 'teacher' / 'sub-dataset0' / 'checkpoint.pth'
    run(launch_cmd('train_subdata.py', *TINY, *teacher_args, '--model-path', str(teacher_ckpt), '--epochs', '1',
                   '--data-path', str(out / 'split4'), '--all-divisions', '--output_dir', str(out / 'stage1')))
    run(launch_cmd('distill_sub.py', *TINY, '--model', 'dedeit', '--model-kwargs', *STUDENT_KW, '--epochs', '1',
                   '--teacher-model', TEACHER, '--teacher-kwargs', *TEACHER_KW, '--teacher-path', str(out / 'stage1'),
                   '--distillation-type', 'hard', '--gama', '0.2', '0.1', '0.3', '--model-ema',
                   '--data-path', str(out / 'split4'), '--all-divisions', '--output_dir', str(out / 'stage2')))
    run(launch_cmd('ensemble.py', *TINY, '--model', 'dedeit', '--model-path', str(out / 'stage2'), '--epochs', '1',
                   '--teacher-model', TEACHER, '--teacher-kwargs', *TEACHER_KW, '--teacher-path', str(teacher_ckpt),
                   '--data-path', fmnist_root, '--num_division', '4', '--sub_classes', '2', '3', '2', '3',
                   '--output_dir', str(out / 'stage3'), '--eval-missing'))
    return out


@pytest.mark.parametrize('module', list(SEED_COMMANDS), ids=lambda m: m.__name__)
def test_seed_command_parses_verbatim(module):
    import cli
    args = cli.parse_args(module.get_parser(), shlex.split(SEED_COMMANDS[module]))
    assert args.dataset == 'cifar100' and args.num_division == 4 and args.model_ema
    if module is distill_sub:
        assert args.gama == [0.2, 0.1, 0.3] and args.distillation_type == 'hard'
    if module is ensemble_script:
        assert args.sub_classes == [25, 25, 25, 25]


def test_each_stage_writes_what_the_next_reads(pipeline):
    folders = [pipeline / 'teacher' / 'sub-dataset0'] + [pipeline / stage / f'sub-dataset{i}'
                                                         for stage in ('stage1', 'stage2') for i in range(4)]
    for folder in folders + [pipeline / 'stage3']:
        for name in ('checkpoint.pth', 'checkpoint_last.pth', 'log.txt'):
            assert (folder / name).is_file(), folder / name
        record = read_log(folder)[-1]
        assert {'epoch', 'train_loss', 'test_acc1'} <= set(record)
        assert 0.0 <= record['test_acc1'] <= 100.0
    # stage 1 and 2 carry the split manifest, so stage 3 can check --sub_classes against it
    assert json.loads((pipeline / 'stage2' / 'split.json').read_text())['num_division'] == 4
    student = torch.load(pipeline / 'stage2' / 'sub-dataset0' / 'checkpoint.pth', weights_only=False)
    assert student['stage'] == 2 and student['model_ema'] is not None
    assert student['num_classes'] == len(student['classes'])


def test_ensemble_checkpoint_rebuilds_and_predicts(pipeline):
    model = load_ensemble(str(pipeline / 'stage3' / 'checkpoint.pth')).eval()
    assert model.num_devices == 4 and model.num_classes == 10
    logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_eval_missing_scores_the_best_checkpoint_without_each_device(pipeline):
    report = json.loads((pipeline / 'stage3' / 'missing_devices.json').read_text())
    best = torch.load(pipeline / 'stage3' / 'checkpoint.pth', weights_only=False)
    assert report['all'] == pytest.approx(best['test_acc1'], abs=1e-6)  # the same checkpoint, the same shards
    assert len(report['missing']) == 4 and all(0.0 <= a <= 100.0 for a in report['missing'])


def test_without_device_zero_fills_exactly_that_device():
    from models.ensemble_model import DeViTEnsemble, create_backbone
    torch.manual_seed(0)
    kwargs = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    backbones = [create_backbone('dedeit', kwargs) for _ in range(3)]
    model = DeViTEnsemble(backbones, num_classes=10, embed_dim=32).eval()
    x = torch.randn(5, 1, 28, 28)
    tokens = [model.device_tokens(i, x) for i in range(3)]
    expected = model.head_forward([tokens[0], torch.zeros_like(tokens[1]), tokens[2]]).eval_logits()
    with torch.no_grad():
        assert torch.allclose(ensemble_script.WithoutDevice(model, 1)(x), expected, atol=1e-6)
        assert not torch.allclose(ensemble_script.WithoutDevice(model, 0)(x), expected, atol=1e-6)


@pytest.mark.parametrize('launcher', ['torchrun', 'python'])
def test_other_launcher_forms(pipeline, tmp_path, launcher):
    # torchrun also runs the switches no other test turns on: the repeated-augmentation sampler and pinned memory
    switches = ['--repeated-aug', '--pin-mem'] if launcher == 'torchrun' else []
    run(launch_cmd('train_subdata.py', *TINY, '--model', TEACHER, '--model-kwargs', *TEACHER_KW, '--epochs', '1',
                   '--data-path', str(pipeline / 'split4'), '--start-division', '2', '--output_dir', str(tmp_path),
                   *switches, launcher=launcher))
    log = read_log(tmp_path / 'sub-dataset2')
    assert [r['epoch'] for r in log] == [0]
    if switches:  # timm's RepeatAugSampler: 256 images in rounds of 256, 128 per rank -> 4 steps of 32
        assert log[0]['num_updates'] == 4
    assert not (tmp_path / 'sub-dataset0').exists()  # --start-division alone trains that division only


def _stage1(pipeline, out, epochs, *extra):
    return launch_cmd('train_subdata.py', *TINY, '--limit-train', '2048', '--model', TEACHER, '--model-kwargs',
                      *TEACHER_KW, '--epochs', str(epochs), '--model-ema', '--data-path', str(pipeline / 'split4'),
                      '--start-division', '0', '--output_dir', str(out), *extra, launcher='python')


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(pipeline, tmp_path):
    run(_stage1(pipeline, tmp_path / 'full', 2))
    killed = tmp_path / 'killed'
    proc = subprocess.Popen(_stage1(pipeline, killed, 2), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log = killed / 'sub-dataset0' / 'log.txt'
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().count('\n') >= 1) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(read_log(killed / 'sub-dataset0')) == 1, 'the run was not stopped mid-way'
    run(_stage1(pipeline, killed, 2, '--auto-resume'))

    full, resumed = read_log(tmp_path / 'full' / 'sub-dataset0'), read_log(killed / 'sub-dataset0')
    assert [r['epoch'] for r in resumed] == [r['epoch'] for r in full] == [0, 1]
    assert resumed[-1]['num_updates'] == full[-1]['num_updates']
    a = torch.load(tmp_path / 'full' / 'sub-dataset0' / 'checkpoint_last.pth', weights_only=False)
    b = torch.load(killed / 'sub-dataset0' / 'checkpoint_last.pth', weights_only=False)
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for key in a['optimizer']['state']:
        assert a['optimizer']['state'][key]['step'] == b['optimizer']['state'][key]['step']
    for name, tensor in a['model'].items():
        torch.testing.assert_close(tensor, b['model'][name], msg=name)
    assert resumed[-1]['test_acc1'] == pytest.approx(full[-1]['test_acc1'])


def _expect_error(cmd, *fragments):
    proc = run(cmd, check=False)
    assert proc.returncode != 0, proc.stdout
    lines = error_lines(proc.stderr)
    assert lines, proc.stderr
    # torch's launcher prints its own ChildFailedError traceback; none may come from this project's code
    assert f'File "{ROOT}' not in proc.stderr.replace(os.path.join(ROOT, '.venv'), ''), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_bad_input_gives_one_clear_line_and_keeps_checkpoints(pipeline, tmp_path, fmnist_root):
    teacher_ckpt = str(pipeline / 'teacher' / 'sub-dataset0' / 'checkpoint.pth')
    stage3_ckpt = pipeline / 'stage3' / 'checkpoint.pth'
    before = digest(stage3_ckpt)
    stage3 = ['ensemble.py', *TINY, '--model-path', str(pipeline / 'stage2'), '--teacher-model', TEACHER,
              '--teacher-kwargs', *TEACHER_KW, '--teacher-path', teacher_ckpt, '--data-path', fmnist_root,
              '--output_dir', str(pipeline / 'stage3'), '--overwrite', '--epochs', '1']
    _expect_error(launch_cmd(*stage3, '--sub_classes', '4', '2', '2', '2'), '--sub_classes', 'manifest')
    assert digest(stage3_ckpt) == before

    # a stage-1 folder that lacks one division
    partial = tmp_path / 'stage1_partial'
    shutil.copytree(pipeline / 'stage1', partial)
    shutil.rmtree(partial / 'sub-dataset3')
    stage2 = ['distill_sub.py', *TINY, '--model', 'dedeit', '--model-kwargs', *STUDENT_KW, '--teacher-model', TEACHER,
              '--teacher-kwargs', *TEACHER_KW, '--data-path', str(pipeline / 'split4'), '--epochs', '1',
              '--distillation-type', 'hard']
    out = tmp_path / 'out'
    _expect_error(launch_cmd(*stage2, '--teacher-path', str(partial), '--all-divisions', '--output_dir', str(out),
                             launcher='python'), 'division 3')
    assert not out.exists() or not any(out.rglob('*.pth'))
    # a teacher checkpoint of another class count (the 10-class teacher for a 3-class division)
    _expect_error(launch_cmd(*stage2, '--teacher-path', teacher_ckpt, '--output_dir', str(out), launcher='python'),
                  'head')
    # student and teacher that see different token counts (patch 4 vs patch 7)
    bad_student = [kw if not kw.startswith('patch_size') else 'patch_size=4' for kw in STUDENT_KW]
    stage2[stage2.index('--model-kwargs') + 1:stage2.index('--model-kwargs') + 1 + len(STUDENT_KW)] = bad_student
    _expect_error(launch_cmd(*stage2, '--teacher-path', str(pipeline / 'stage1'), '--output_dir', str(out),
                             launcher='python'), 'token')
    assert not out.exists() or not any(out.rglob('*.pth'))


def test_existing_run_is_not_overwritten_without_flag(pipeline):
    folder = pipeline / 'stage1' / 'sub-dataset1'
    before = digest(folder / 'checkpoint.pth')
    _expect_error(launch_cmd('train_subdata.py', *TINY, '--model', TEACHER, '--model-kwargs', *TEACHER_KW,
                             '--epochs', '1', '--data-path', str(pipeline / 'split4'), '--start-division', '1',
                             '--output_dir', str(pipeline / 'stage1'), launcher='python'), '--auto-resume')
    assert digest(folder / 'checkpoint.pth') == before


@pytest.mark.slow
def test_demo_quick_mode_runs_end_to_end(tmp_path, fmnist_root):
    out = tmp_path / 'demo'
    proc = subprocess.run(['bash', os.path.join(ROOT, 'demo.sh'), '--quick'], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=dict(env(), OUT=str(out), PYTHON=shlex.quote(os.sys.executable),
                                                PORT=str(__import__('helpers').free_port())))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / 'results.json').read_text())
    for key in ('teacher_acc', 'ensemble_acc', 'baseline_acc'):
        assert 0.0 <= results[key] <= 1.0
    assert len(results['sub_teacher_acc']) == len(results['student_acc']) == len(results['ensemble_missing_acc']) == 4
    assert results['seconds'] > 0 and os.path.isfile(results['ensemble_checkpoint'])
    assert (out / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'  # the figure beside results.json
    stages = [line for line in proc.stdout.splitlines() if line.startswith('=== ')]
    assert [s.split()[1].rstrip(':') for s in stages] == ['teacher', '0.', '1.', '2.', '3.', 'baseline', 'results'], \
        stages  # one stage numbering: 0 split (after the teacher, whose confusions it may use), 1-3 the stages
    assert load_ensemble(results['ensemble_checkpoint']).num_devices == 4
