"""Recipes as files (``-c/--config FILE.yaml``, timm's form: the file sets defaults, the command line wins) and the
argument groups each entry script composes (its --help lists only the flags it uses)."""
import glob
import os
import shlex
from types import SimpleNamespace

import pytest
import yaml
from helpers import ROOT
from test_pipeline import SEED_COMMANDS

import cli
import distill_sub
import engine
import ensemble
import shrinking as shrink
import train_subdata

STAGES = {1: train_subdata, 2: distill_sub, 3: ensemble}
SMALL = os.path.join(ROOT, 'configs', 'small.yaml')
# What demo.sh passed before configs/small.yaml held its recipe: the file must give the very same arguments.
DEMO_FLAGS = ['--tiny-transforms', '--mixup', '0', '--cutmix', '0', '--smoothing', '0', '--drop-path', '0',
              '--batch-size', '128', '--unscale-lr', '--warmup-epochs', '0.43', '--min-lr', '1e-5',
              '--weight-decay', '0.05']


def parsed(module, argv):
    return vars(cli.parse_args(module.get_parser(), argv))


@pytest.mark.parametrize('module', [train_subdata, distill_sub, ensemble, shrink], ids=lambda m: m.__name__)
def test_small_recipe_gives_the_demos_arguments(module):
    run = ['--dataset', 'fashion_mnist', '--eval-batch-size', '1000', '--lr', '2e-3']
    from_file = parsed(module, ['-c', SMALL, *run])
    from_flags = parsed(module, [*DEMO_FLAGS, *run])
    assert from_file.pop('config') == SMALL and from_flags.pop('config') is None
    assert from_file == from_flags


def test_command_line_wins_over_the_file():
    args = parsed(train_subdata, ['--mixup', '0.5', '-c', SMALL, '--batch-size', '8'])
    assert (args['mixup'], args['batch_size'], args['cutmix'], args['tiny_transforms']) == (0.5, 8, 0.0, True)
    assert parsed(train_subdata, ['--config', SMALL])['warmup_epochs'] == 0.43


@pytest.mark.parametrize('stage', [1, 2, 3])
@pytest.mark.parametrize('dataset', ['cifar100', 'imagenet'])
def test_paper_recipes_are_the_seeds_commands(stage, dataset):
    """configs/{cifar100,imagenet}/stageN.yaml hold the seed's stage-N command (paths aside; ImageNet: IMNET and
    250 classes per division)."""
    module = STAGES[stage]
    path = os.path.join(ROOT, 'configs', dataset, f'stage{stage}.yaml')
    recipe = yaml.safe_load(open(path))
    seed = parsed(module, shlex.split(SEED_COMMANDS[module]))
    from_file = parsed(module, ['-c', path])
    expected = dict(seed, dataset='IMNET') if dataset == 'imagenet' else seed
    if dataset == 'imagenet' and stage == 3:
        expected['sub_classes'] = [250] * 4
    for key in recipe:
        assert from_file[key] == expected[key], key
    assert set(recipe) >= {'model', 'lr', 'epochs', 'batch_size', 'model_ema', 'num_division', 'dataset'}


def test_every_config_parses_with_every_script_it_names():
    for path in glob.glob(os.path.join(ROOT, 'configs', '**', '*.yaml'), recursive=True):
        modules = [STAGES[int(os.path.basename(path)[5])]] if 'stage' in path else [train_subdata, distill_sub,
                                                                                    ensemble, shrink]
        for module in modules:
            cli.parse_args(module.get_parser(), ['-c', path])


@pytest.mark.parametrize('text,fragment', [
    ('mixupp: 0\n', 'mixupp is not a flag of'),
    ('gama: [0.2, 0.1, 0.3]\n', 'gama is not a flag of'),  # a stage-2 flag in a stage-1 recipe
    ('epochs: -1\n', 'epochs: must be a positive integer'),
    ('tiny_transforms: 3\n', 'tiny_transforms is a switch'),
    ('dataset: mnist\n', "dataset: 'mnist' is not one of"),
    ('model_kwargs: [img_size]\n', 'model_kwargs: expected KEY=VALUE'),
    ('- a list\n', 'must be a mapping'),
    ('a: [1\n', 'is not valid YAML'),
])
def test_bad_config_is_one_error_line(tmp_path, capsys, text, fragment):
    path = tmp_path / 'bad.yaml'
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(train_subdata.get_parser(), ['-c', str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if 'error:' in line]
    assert exit_info.value.code == 2 and len(lines) == 1 and fragment in lines[0] and str(path) in lines[0], err


def test_config_values_are_typed_as_on_the_command_line(tmp_path):
    path = tmp_path / 'recipe.yaml'
    path.write_text('lr: 1e-3\nmodel_kwargs: {img_size: 28, patch_size: 7}\nteacher-kwargs: [depth=2]\n'
                    'hflip: 0\nmean: [0.5]\n')
    args = parsed(distill_sub, ['-c', str(path)])
    assert args['lr'] == 1e-3 and isinstance(args['lr'], float)  # YAML reads '1e-3' as text; argparse's type runs
    assert args['model_kwargs'] == {'img_size': 28, 'patch_size': 7} and args['teacher_kwargs'] == {'depth': 2}
    assert args['hflip'] == 0.0 and args['mean'] == [0.5]


def help_flags(module):
    text = module.get_parser().format_help()
    return {word.rstrip(',') for word in text.split() if word.startswith('-')}


def test_each_script_lists_only_its_own_flags():
    stage1, stage2, stage3, pruning = (help_flags(m) for m in (train_subdata, distill_sub, ensemble, shrink))
    for flags in (stage1, stage2, stage3, pruning):
        assert {'-c', '--config', '--data-path', '--model', '--epochs', '--output_dir', '--hflip', '--mean'} <= flags
    teacher = {'--teacher-model', '--teacher-path', '--distillation-type'}
    assert not teacher & stage1 and teacher <= stage2 and teacher <= stage3
    assert '--gama' in stage2 and '--gama' not in stage3 and '--layer-map' not in stage3
    assert '--start-division' in stage1 and '--start-division' not in stage3 and '--sub_classes' in stage3
    assert '--load-shrink' in stage2 and '--head-ratio' in pruning and '--eval-missing' in stage3
    assert cli.get_args_parser().parse_args([]).gama == [0.2, 0.1, 0.3]  # every group at once, for other tools


def test_warm_up_longer_than_the_run_is_one_warning(capsys):
    engine.warn_recipe(SimpleNamespace(warmup_epochs=5, epochs=1))
    engine.warn_recipe(SimpleNamespace(warmup_epochs=0.43, epochs=1))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith('warning: the warm-up (5 epochs) is as long as the training')
