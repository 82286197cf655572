"""A short, seeded fuzz of the command lines: the seed's commands with bad values mixed in must end in argparse's
exit 2 with a usage line and an ``error:`` line, never in another exception; values only a script can judge (an
unknown model) give the script's own one-line error when run as a process."""
import random

import pytest
from faults import error_lines, launch, run_inprocess
from helpers import run
from test_pipeline import SEED_COMMANDS

import cli
import distill_sub
import ensemble
import splite_dataset
import train_subdata

# (flags, why it is wrong): every one is refused while parsing, by every stage script (shared parent parser)
BAD = [
    (['--epochs', '-1'], 'negative epochs'), (['--epochs', '0'], 'zero epochs'), (['--epochs', '2.5'], 'fraction'),
    (['--batch-size', '0'], 'zero batch'), (['--eval-batch-size', '-8'], 'negative batch'),
    (['--lr', 'abc'], 'non-numeric'), (['--lr', 'inf'], 'infinite'), (['--lr', 'nan'], 'NaN'), (['--lr', '0'], 'zero'),
    (['--gama', '0.2', '0.1'], 'gamma of length 2'), (['--gama', '0.2', '-0.1', '0.3'], 'negative gamma'),
    (['--gama', '0.2', 'x', '0.3'], 'non-numeric gamma'), (['--num_division', '0'], 'zero divisions'),
    (['--start-division', '4'], 'start == num_division'), (['--start-division', '9'], 'start > num_division'),
    (['--start-division', '-1'], 'negative start'), (['--sub_classes', '25', 'x'], 'non-numeric sub_classes'),
    (['--sub_classes', '25', '25'], 'sub_classes of wrong length'), (['--model-ema-decay', '1.5'], 'decay > 1'),
    (['--dataset', 'mnist'], 'unknown dataset'), (['--distillation-type', 'medium'], 'unknown KD type'),
    (['--model-kwargs', 'img_size'], 'kwarg without ='), (['--teacher-kwargs', '=3'], 'kwarg without key'),
    (['--seed', 'one'], 'non-numeric seed'), (['--input-size', '0'], 'zero input size'),
    (['--dist-timeout', '0'], 'zero timeout'), (['--reprob', '2'], 'probability > 1'),
    (['--warmup-epochs', '-1'], 'negative warm-up'), (['--num_workers', '-2'], 'negative workers'),
    (['--mixup-mode', 'row'], 'unknown mixup mode'), (['--smoothing', '-0.1'], 'negative smoothing'),
    (['--limit-train', '0'], 'zero limit'), (['--clip-grad', '0'], 'zero clip'), (['--weight-decay', 'inf'], 'inf'),
    (['--layer-map', 'some'], 'unknown layer map'), (['--epochs'], 'missing value'), (['--no-such-flag'], 'unknown'),
]
CHECKED_AFTER_PARSING = {'start == num_division', 'start > num_division', 'sub_classes of wrong length'}
SCRIPTS = [train_subdata, distill_sub, ensemble]
SPLIT_BAD = [(['--num_division', 'four'], 'non-numeric'), (['--sub_classes', '25', 'x'], 'non-numeric'),
             (['--seed', '1.5'], 'fraction'), (['--num_division'], 'missing value'), (['--bogus'], 'unknown flag')]
SPLIT_SEED = ['--dataset', 'cifar100', '--data_path', './your_datasets', '--num_division', '4', '--output_path',
              './sub_datasets']


def cases(count=40, seed=0):
    """``count`` seeded (script, argv) pairs: a seed command with 1-3 bad flags spliced in at random places."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 8 == 7:  # every eighth case: the split script
            argv, bad = list(SPLIT_SEED), SPLIT_BAD
            script = splite_dataset
        else:
            script = rng.choice(SCRIPTS)
            argv, bad = SEED_COMMANDS[script].split(), BAD
        for flags, why in rng.sample(bad, rng.randint(1, 3)):
            at = rng.choice([j for j, a in enumerate(argv) if a.startswith('--')] + [len(argv)])
            if why in CHECKED_AFTER_PARSING:  # judged on the final values: the seed's own flag must not override it
                at = len(argv)
            argv[at:at] = flags
        out.append((script, argv))
    return out


@pytest.mark.parametrize('script,argv', cases(), ids=lambda v: v.__name__ if hasattr(v, '__name__') else None)
def test_bad_values_exit_2_with_usage(script, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:  # anything but SystemExit fails the test with its traceback
        if script is splite_dataset:
            splite_dataset.get_args_parser().parse_args(argv)
        else:
            cli.parse_args(script.get_parser(), argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert 'error:' in err, err
    if script is not splite_dataset:  # the split script prints one line without the usage, by design
        assert err.startswith('usage:'), err


@pytest.mark.parametrize('flags,why', BAD, ids=[why for _, why in BAD])
def test_each_bad_value_alone_is_refused(flags, why, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(train_subdata.get_parser(), SEED_COMMANDS[train_subdata].split() + flags)
    assert exit_info.value.code == 2 and 'error:' in capsys.readouterr().err


def test_split_values_judged_after_parsing_give_one_line(tmp_path, capsys):
    """Values the split script's parser accepts but the split refuses: one line, exit 2, nothing written."""
    root = tmp_path / 'tree'
    for split in ('train', 'val'):
        for name in ('a', 'b', 'c'):
            (root / split / name).mkdir(parents=True)
            (root / split / name / '0.png').write_bytes(b'\x89PNG\r\n\x1a\n')  # a header is all the split reads
    for extra in (['--num_division', '0'], ['--num_division', '-2'], ['--num_division', '5'],
                  ['--num_division', '2', '--sub_classes', '2', '2'], ['--num_division', '2', '--seed', '-1']):
        argv = ['--dataset', 'folder', '--data_path', str(root), '--output_path', str(tmp_path / 'out'), *extra]
        capsys.readouterr()
        assert splite_dataset.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error: '), (extra, err)
        assert not (tmp_path / 'out').exists()


def test_unknown_model_is_the_scripts_error_line(tmp_path, capsys, fmnist_root):
    """``--model`` is free text to argparse; factory.create_model refuses an unregistered name with one line."""
    split = tmp_path / 'split'
    assert splite_dataset.main(['--dataset', 'fashion_mnist', '--data_path', fmnist_root, '--num_division', '1',
                                '--output_path', str(split)]) == 0
    argv = ['--model', 'deit_nonexistent_patch16', '--dataset', 'fashion_mnist', '--data-path', str(split),
            '--num_division', '1', '--tiny-transforms', '--output_dir', str(tmp_path / 'out')]
    proc = run(launch(['train_subdata.py', *argv], launcher='python'), check=False)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["error: unknown model 'deit_nonexistent_patch16' (not registered in timm)"]
    code, err = run_inprocess(train_subdata.main, [*argv, '--model', 'dedeit', '--model-kwargs', 'depth=x'], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith('error: '), err  # a bad model kwarg value, too
