"""Shrinking stage-2 students (`python shrink.py`, whose docstring says how): score heads and MLP neurons, prune
them (models/pruning.py), evaluate, and distil the pruned students again (distill_sub.distill)."""
import argparse
import json
import os

import torch

import cli
import datasets
import distill_sub
import engine
import fileio
import utils
from fileio import UsageError
from models import factory
from models.checkpoint import args_dict, extract_state_dict, load_state_dict_checked, read_checkpoint, training_state
from models.ensemble_model import student_spec
from models.pruning import (
    POLICY_FILE,
    PRUNED_FILE,
    checkpoint_shape,
    importance,
    make_policy,
    model_shape,
    prune_,
    reshape_,
)
from models.stats import count_macs, count_params


def fraction(text):
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be a fraction kept in (0, 1], got {text}')
    return value


def get_parser():
    # every group: pruning reads data and students, and --redistill-epochs trains as distill_sub.py does
    parser = argparse.ArgumentParser('DeViT shrinking: prune heads and MLP neurons of the stage-2 students',
                                     parents=cli.training_parents(distillation='relations'))
    group = parser.add_argument_group('shrink')
    group.add_argument('--head-ratio', type=fraction, default=0.67,
                       help='fraction of attention heads KEPT in every layer (at least one)')
    group.add_argument('--neuron-ratio', type=fraction, default=0.5,
                       help='fraction of MLP hidden neurons KEPT in every layer (at least one)')
    group.add_argument('--importance-batches', type=cli.positive_int, default=20,
                       help='training batches (of --batch-size, per process) the importance is averaged over')
    group.add_argument('--redistill-epochs', type=cli.non_negative_int, default=0,
                       help='then distil the pruned students again for this many epochs (distill_sub.py)')
    group.add_argument('--shrink-ema', action='store_true', help='prune the checkpoint\'s EMA weights')
    return parser


def student_file(model_path, division):
    if not model_path:
        raise UsageError('--model-path is required: the stage-2 output folder or a student checkpoint')
    if os.path.isdir(model_path):
        path = os.path.join(utils.division_dir(model_path, division), engine.CHECKPOINT_BEST)
        if not os.path.isfile(path):
            raise UsageError(f'--model-path {model_path} has no student for division {division} ({path})')
        return path
    if not os.path.isfile(model_path):
        raise UsageError(f'--model-path {model_path} does not exist')
    return model_path


def load_student(path, classes, *, model_kwargs=None, model='dedeit', use_ema=False, device='cpu'):
    """The stage-2 student of `path` as it was trained (pruned already if it was shrunk before), in eval mode.

    The checkpoint's args give the model and its kwargs (`model` / `model_kwargs` are fallbacks); its pruned shape
    is its `shrink_policy` or read off its weights. Returns (checkpoint, model, spec = {'model', 'kwargs'} of the
    unpruned student).
    """
    ckpt = read_checkpoint(path)
    if ckpt.get('classes') is not None and list(ckpt['classes']) != list(classes):
        raise UsageError(f'{path} was trained on classes {ckpt["classes"]}, not on this division\'s {classes}')
    name, kwargs = student_spec(ckpt.get('args'), None, model_kwargs)
    kwargs.pop('shrink', None)  # the pruned shape comes from the checkpoint itself
    name = name or model
    student = factory.create_model(name, len(classes), kwargs)
    state_dict = extract_state_dict(ckpt, use_ema=use_ema, source=path)
    shape = checkpoint_shape(ckpt, student, state_dict)
    if shape is not None:
        reshape_(student, shape)
    load_state_dict_checked(student, state_dict, reset_head=False, what='student', source=path)
    return ckpt, student.to(device).eval(), {'model': name, 'kwargs': kwargs}


def all_reduce(tensors, device):
    """Sum a list of CPU tensors over ranks (identity without DDP); `device` is where the backend reduces."""
    flat = utils.all_reduce_sum(torch.cat([t.flatten() for t in tensors]).tolist(), device=device)
    out, start = [], 0
    for t in tensors:
        out.append(torch.tensor(flat[start:start + t.numel()], dtype=t.dtype).view_as(t))
        start += t.numel()
    return out


def size_of(model):
    size, chans = factory.input_spec(model)
    x = torch.zeros(1, chans, size, size, device=next(model.parameters()).device)
    return count_params(model), count_macs(model, x)


def loaders(args, division, model):
    """(train, val) loaders of one division at the model's input size; train shuffled by --seed, sharded by rank."""
    size, chans = factory.input_spec(model)
    engine.set_normalization(args, chans)
    data = {split: datasets.build_dataset(args.dataset, args.data_path, split, division=division, input_size=size,
                                          in_chans=chans, tiny=args.tiny_transforms, args=args)
            for split in ('train', 'val')}
    train_loader, val_loader = engine.build_loaders(args, engine.limit(data['train'], args.limit_train),
                                                    engine.limit(data['val'], args.limit_val))
    train_loader.sampler.set_epoch(0)
    return train_loader, val_loader


def shrink_division(args, division, manifest):
    """Score, prune and evaluate the student of one division; write pruned.pth (rank 0) and return the record that
    becomes its shrink.json."""
    info = manifest['divisions'][division]
    path = student_file(args.model_path, division)
    ckpt, model, spec = load_student(path, info['classes'], model_kwargs=args.model_kwargs, model=args.model,
                                     use_ema=args.shrink_ema, device=args.device)
    train_loader, val_loader = loaders(args, division, model)
    device = torch.device(args.device)

    before = engine.evaluate(model, val_loader, device)
    params_before, macs_before = size_of(model)
    heads, neurons, count = importance(model, train_loader, device, args.importance_batches)
    *scores, count = all_reduce(heads + neurons + [torch.tensor([float(count)], dtype=torch.float64)], device)
    count = int(count.item())
    heads, neurons = [s / count for s in scores[:len(heads)]], [s / count for s in scores[len(heads):]]
    policy = make_policy(heads, neurons, args.head_ratio, args.neuron_ratio, importance_images=count,
                         importance='mean |dCE/dgate| per image, gates at 1, eval mode')
    parent = model_shape(model)
    prune_(model, policy['kept_heads'], policy['kept_neurons'])
    pruned = engine.evaluate(model, val_loader, device)
    params_after, macs_after = size_of(model)
    record = {**policy, 'division': division, 'source': path, 'student': spec,
              'steps': ['before', 'pruned', 'redistilled'],
              'acc1': [before['acc1'], pruned['acc1'], None], 'acc5': [before['acc5'], pruned['acc5'], None],
              'params': [params_before, params_after], 'macs': [macs_before, macs_after]}
    if utils.is_main_process():
        out = utils.division_dir(args.output_dir, division)
        state = training_state(model, args=ckpt.get('args'), epoch=ckpt.get('epoch'), best_acc1=pruned['acc1'],
                               test_acc1=pruned['acc1'], stage=2, division=division, classes=info['classes'],
                               num_classes=len(info['classes']), shrink_policy=policy, shrink_args=args_dict(args))
        utils.save_checkpoint(state, os.path.join(out, PRUNED_FILE))
        if not args.redistill_epochs:
            utils.save_checkpoint(state, os.path.join(out, engine.CHECKPOINT_BEST))
        print(f'division {division}: heads {parent["heads"]} -> {policy["heads"]}, MLP {parent["hidden"]} -> '
              f'{policy["hidden"]}; params {params_before} -> {params_after}, MACs {macs_before} -> {macs_after}; '
              f'acc1 {before["acc1"]:.2f} -> {pruned["acc1"]:.2f}', flush=True)
    return record


def evaluate_redistilled(args, division, manifest):
    """Test accuracy of the re-distilled student distill_sub.distill kept (OUTPUT/sub-dataset{i}/checkpoint.pth)."""
    path = os.path.join(utils.division_dir(args.output_dir, division), engine.CHECKPOINT_BEST)
    _, model, _ = load_student(path, manifest['divisions'][division]['classes'], device=args.device)
    return engine.evaluate(model, loaders(args, division, model)[1], torch.device(args.device))


def redistill_args(args, division, student):
    """distill_sub's arguments for re-distilling division i's pruned student (OUTPUT/sub-dataset{i}/pruned.pth)
    into OUTPUT: this command's flags (teacher, data, recipe), the student's model, --redistill-epochs epochs.
    Flags only distill_sub.py has keep their defaults."""
    defaults = vars(distill_sub.get_parser().parse_args([]))
    return argparse.Namespace(**{**defaults, **vars(args), 'model': student['model'],
                                 'model_kwargs': dict(student['kwargs']), 'model_path': None,
                                 'start_division': division, 'all_divisions': False, 'epochs': args.redistill_epochs,
                                 'load_shrink': args.output_dir})


def main(argv=None):
    args = cli.parse_args(get_parser(), argv)
    utils.init_distributed(args)
    manifest = datasets.read_manifest(args.data_path, required=True)
    divisions = utils.divisions_to_run(args, manifest)
    if len(divisions) > 1 and not os.path.isdir(args.model_path or ''):
        raise UsageError('--all-divisions needs --model-path to be the stage-2 output folder')
    for division in divisions:  # every input exists and no output is overwritten, before any work
        student_file(args.model_path, division)
        if args.redistill_epochs:
            distill_sub.teacher_file(args.teacher_path, division)
        out = utils.division_dir(args.output_dir, division)
        existing = [n for n in (PRUNED_FILE, engine.CHECKPOINT_BEST) if os.path.exists(os.path.join(out, n))]
        if existing and not args.overwrite:
            raise UsageError(f'{out} already holds {", ".join(existing)}; pass --overwrite to replace it')
    fileio.check_writable_dir(args.output_dir)
    utils.inherit_normalization(args, [student_file(args.model_path, divisions[0])])
    utils.seed_everything(args.seed)
    utils.copy_manifest(manifest, args.output_dir)
    records = {division: shrink_division(args, division, manifest) for division in divisions}
    utils.barrier()

    for division, record in records.items():
        if args.redistill_epochs:
            distill_sub.distill(redistill_args(args, division, record['student']))
            stats = evaluate_redistilled(args, division, manifest)
            record['acc1'][2], record['acc5'][2] = stats['acc1'], stats['acc5']
        if utils.is_main_process():
            fileio.write_json_atomic(os.path.join(utils.division_dir(args.output_dir, division), POLICY_FILE), record)
    if utils.is_main_process():
        summary = {d: dict(zip(r['steps'], r['acc1'], strict=True)) for d, r in records.items()}
        print(json.dumps({'shrink_acc1': summary}), flush=True)
    return records

