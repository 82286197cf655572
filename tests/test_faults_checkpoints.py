"""Bad checkpoints: truncated, another architecture, another class count or division, or the wrong stage (a stage-2
student where a stage-1 sub-teacher belongs, stage-1 sub-teachers as the ensemble's students, ...). Each is one
``error:`` line and exit code 2, before anything trains; nothing already on disk is touched."""
import json
import shutil

import pytest
import torch
from faults import digest, error_lines, launch, make_split, no_project_traceback, one_thread, run_inprocess
from helpers import STUDENT_KW, TEACHER, TEACHER_KW, TINY, run

import distill_sub
import ensemble
import train_subdata

SMALL = [*TINY, '--limit-train', '64', '--limit-val', '50', '--epochs', '1']


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory, fmnist_root):
    """Real checkpoints, trained in this process: stage 1 for division 0 and the next division with as many classes
    (`twin`), stage 2 for division 0."""
    root = tmp_path_factory.mktemp('ckpts')
    split = make_split(root / 'split4', fmnist_root)
    with one_thread():
        for division in ('0', str(twin(root))):
            train_subdata.main([*SMALL, '--model', TEACHER, '--model-kwargs', *TEACHER_KW, '--data-path', str(split),
                                '--start-division', division, '--output_dir', str(root / 'stage1')])
        distill_sub.main([*SMALL, '--model', 'dedeit', '--model-kwargs', *STUDENT_KW, '--teacher-model', TEACHER,
                          '--teacher-kwargs', *TEACHER_KW, '--teacher-path', str(root / 'stage1'), '--data-path',
                          str(split), '--distillation-type', 'hard', '--output_dir', str(root / 'stage2')])
    return root


def classes(ckpts):
    """The global class ids of each division of the split."""
    return [d['classes'] for d in json.loads((ckpts / 'split4' / 'split.json').read_text())['divisions']]


def twin(ckpts):
    """The first division after 0 with as many classes as division 0 (its sub-teacher would load in its place)."""
    groups = classes(ckpts)
    return next(i for i in range(1, len(groups)) if len(groups[i]) == len(groups[0]))


def stage1(ckpts, out, *extra):
    return [*SMALL, '--model', TEACHER, '--model-kwargs', *TEACHER_KW, '--data-path', str(ckpts / 'split4'),
            '--output_dir', str(out), *extra]


def stage2(ckpts, out, teacher, *extra, teacher_model=(TEACHER, *TEACHER_KW)):
    return [*SMALL, '--model', 'dedeit', '--model-kwargs', *STUDENT_KW, '--teacher-model', teacher_model[0],
            '--teacher-kwargs', *teacher_model[1:], '--teacher-path', str(teacher), '--data-path',
            str(ckpts / 'split4'), '--distillation-type', 'hard', '--output_dir', str(out), *extra]


def expect_error(main, argv, capsys, *fragments):
    code, err = run_inprocess(main, argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith('error: '), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def truncated_copy(path, dst):
    data = path.read_bytes()
    dst.write_bytes(data[:len(data) // 2])
    return dst


def test_truncated_checkpoint_as_initial_weights(ckpts, tmp_path, capsys):
    bad = truncated_copy(ckpts / 'stage1' / 'sub-dataset0' / 'checkpoint.pth', tmp_path / 'half.pth')
    expect_error(train_subdata.main, stage1(ckpts, tmp_path / 'out', '--model-path', str(bad)), capsys,
                 f'cannot read checkpoint {bad}', 'truncated')


def test_truncated_checkpoint_to_resume_as_a_process(ckpts, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(ckpts / 'stage1' / 'sub-dataset0', out / 'sub-dataset0')
    last = out / 'sub-dataset0' / 'checkpoint_last.pth'
    truncated_copy(last, last)
    best = digest(out / 'sub-dataset0' / 'checkpoint.pth')
    proc = run(launch(['train_subdata.py', *stage1(ckpts, out, '--epochs', '2', '--resume', str(last))],
                      launcher='python'), check=False)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and f'cannot read checkpoint {last}' in lines[0], proc.stderr
    assert no_project_traceback(proc.stderr), proc.stderr
    assert digest(out / 'sub-dataset0' / 'checkpoint.pth') == best


def test_checkpoint_of_another_architecture(ckpts, tmp_path, capsys):
    student = ckpts / 'stage2' / 'sub-dataset0' / 'checkpoint.pth'  # dedeit of width 16 into a width-32 model
    expect_error(train_subdata.main, stage1(ckpts, tmp_path / 'out', '--model-path', str(student)), capsys,
                 f'cannot load model from {student}', 'shape mismatch', 'different architecture?',
                 'checkpoint width 16, model 32')


def test_outside_teacher_of_another_class_count(ckpts, tmp_path, capsys):
    full = torch.load(ckpts / 'stage1' / 'sub-dataset0' / 'checkpoint.pth', weights_only=False)['model']
    k = len(classes(ckpts)[0])
    full = {n: (v[:k - 1] if n.startswith('head') else v) for n, v in full.items()}  # one class fewer, no metadata
    torch.save(full, tmp_path / 'teacher.pth')
    expect_error(distill_sub.main, stage2(ckpts, tmp_path / 'out', tmp_path / 'teacher.pth'), capsys,
                 f'head.weight: checkpoint ({k - 1}, 32) vs model ({k}, 32)')


def test_sub_teacher_of_another_division(ckpts, tmp_path, capsys):
    i, groups = twin(ckpts), classes(ckpts)
    other = ckpts / 'stage1' / f'sub-dataset{i}' / 'checkpoint.pth'  # as many classes: loading it would succeed
    expect_error(distill_sub.main, stage2(ckpts, tmp_path / 'out', other), capsys,
                 f'has a head for classes {groups[i]} ({len(groups[i])}), but division 0 has classes {groups[0]}')


def test_stage2_student_given_as_teacher(ckpts, tmp_path, capsys):
    student = ckpts / 'stage2' / 'sub-dataset0' / 'checkpoint.pth'  # same architecture: it would load silently
    expect_error(distill_sub.main, stage2(ckpts, tmp_path / 'out', student, teacher_model=('dedeit', *STUDENT_KW)),
                 capsys, f'teacher {student} is a stage-2 checkpoint', 'stage-1 sub-teacher')


def test_stage1_sub_teachers_given_as_students(ckpts, tmp_path, capsys, fmnist_root):
    expect_error(ensemble.main, [*SMALL, '--model-path', str(ckpts / 'stage1'), '--teacher-path',
                                 str(ckpts / 'stage1' / 'sub-dataset0' / 'checkpoint.pth'), '--data-path', fmnist_root,
                                 '--output_dir', str(tmp_path / 'out')], capsys,
                 'is a stage-1 checkpoint; --model-path must be the output folder of distill_sub.py')


def test_stage2_student_given_as_full_teacher(ckpts, tmp_path, capsys, fmnist_root):
    student = ckpts / 'stage2' / 'sub-dataset0' / 'checkpoint.pth'
    expect_error(ensemble.main, [*SMALL, '--model-path', str(ckpts / 'stage2'), '--teacher-path', str(student),
                                 '--data-path', fmnist_root, '--output_dir', str(tmp_path / 'out')], capsys,
                 f'teacher {student} is a stage-2 checkpoint, not a full teacher')


def test_resume_from_another_stage_or_division(ckpts, tmp_path, capsys):
    i = twin(ckpts)
    last1 = ckpts / 'stage1' / f'sub-dataset{i}' / 'checkpoint_last.pth'
    expect_error(train_subdata.main, stage1(ckpts, tmp_path / 'a', '--resume', str(last1)), capsys,
                 f'written with division {i}, this run has division 0')
    last0 = ckpts / 'stage1' / 'sub-dataset0' / 'checkpoint_last.pth'
    expect_error(distill_sub.main, stage2(ckpts, tmp_path / 'b', ckpts / 'stage1', '--resume', str(last0)), capsys,
                 'written with stage 1, this run has stage 2')
    assert not list(tmp_path.rglob('*.pth'))
