"""The one training loop and the one evaluation loop shared by all DeViT stages.

What differs between stages lives in a *task*: a small ``nn.Module`` whose ``forward(samples, targets)`` runs the
models and returns ``(loss, parts)``. Making the task the module that DDP wraps keeps gradient synchronisation
correct even though the student is run through ``forward_features`` rather than its ``forward``.

- ``SupervisedTask``: stage 1 (and a teacher trained from scratch): base loss on the model's output.
- ``DecomposeTask``:  stage 2: hard/soft KD on the distillation head + q/k/v relation terms to the sub-teacher.
- ``EnsembleTask``:   stage 3: KD of the ensemble against the full teacher + MSE on cls/dist tokens.

``fit`` owns everything around the loop: loaders, optimizer, scheduler, EMA, resume, checkpoints and ``log.txt``.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, accuracy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset
from tqdm import tqdm

import fileio
import utils
import workers
from fileio import UsageError
from losses import relation_terms, token_loss
from models import factory
from models.checkpoint import args_dict, restore_training_state, training_state
from models.features import forward_features

# ----------------------------------------------------------------------------------------------------------------
# Tasks: "forward + loss" of each stage
# ----------------------------------------------------------------------------------------------------------------

class SupervisedTask(nn.Module):
    """Stage 1: fine-tune one model on its (sub-)dataset with the base criterion."""

    def __init__(self, model, criterion):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, samples, targets):
        return self.criterion(self.model(samples), targets), {}


class _TeacherTask(nn.Module):
    """A task with a frozen ``teacher``: ``train()`` switches the student only, the teacher stays in eval mode."""

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()
        return self


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class DecomposeTask(_TeacherTask):
    """Stage 2: student i learns from sub-teacher i (KD on the dist head + γ-weighted q/k/v relations)."""

    def __init__(self, student, teacher, distill_loss, layer_pairs, gammas):
        super().__init__()
        self.model = student
        self.teacher = freeze(teacher)
        self.distill_loss = distill_loss
        self.layer_pairs = list(layer_pairs)
        self.gammas = list(gammas)
        self.use_relations = any(g > 0 for g in self.gammas)
        self.student_layers = [s for s, _ in self.layer_pairs] if self.use_relations else []
        self.teacher_layers = [t for _, t in self.layer_pairs] if self.use_relations else []
        self.student_depth = len(student.blocks)

    def forward(self, samples, targets):
        # no_grad rather than inference_mode: the teacher's relations are KL targets that autograd saves for the
        # backward pass, which inference tensors are not allowed to be.
        with torch.no_grad():
            teacher = forward_features(self.teacher, samples, self.teacher_layers)
        student = forward_features(self.model, samples, self.student_layers)
        outputs = student.logits if student.logits_dist is None else (student.logits, student.logits_dist)
        loss, parts = self.distill_loss(outputs, targets, teacher.eval_logits())
        if self.use_relations:
            rel, rel_parts = relation_terms(student.qkv, teacher.qkv, self.layer_pairs, self.gammas,
                                            self.student_depth)
            loss = loss + rel
            parts.update(rel_parts)
        return loss, parts


class EnsembleTask(_TeacherTask):
    """Stage 3: N backbones + ensemble head learn from the full teacher (KD + token MSE)."""

    def __init__(self, ensemble, teacher, distill_loss):
        super().__init__()
        self.model = ensemble
        self.teacher = freeze(teacher)
        self.distill_loss = distill_loss

    def forward(self, samples, targets):
        with torch.no_grad():
            teacher = forward_features(self.teacher, samples)
        out = self.model(samples)
        loss, parts = self.distill_loss(out, targets, teacher.eval_logits())
        tokens, token_parts = token_loss(out.feat_cls, teacher.cls, out.feat_dist, teacher.dist)
        parts.update(token_parts)
        return loss + tokens, parts


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

class ShardSampler(Sampler):
    """Evaluation sampler: rank r takes indices r, r+W, ... (no padding, so no sample is counted twice)."""

    def __init__(self, length, rank, world):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def limit(dataset, count):
    return dataset if count is None or count >= len(dataset) else Subset(dataset, range(count))


def build_loaders(args, train_set, val_set):
    """Train: a shuffling sampler whose order depends only on (seed, epoch), so a resumed run sees the same
    batches as an uninterrupted one (DistributedSampler with one replica when not distributed)."""
    world, rank = utils.world_size(), args.rank
    if args.repeated_aug and args.distributed:
        train_sampler = RepeatAugSampler(train_set, num_replicas=world, rank=rank, shuffle=True)
    else:
        train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, drop_last=True,
                              **loader_options(args))
    val_loader = build_eval_loader(args, val_set)
    if len(train_loader) == 0:
        raise UsageError(f'--batch-size {args.batch_size} is larger than the {len(train_set)} training images '
                         f'of one rank')
    return train_loader, val_loader


def loader_options(args):
    options = {'num_workers': args.num_workers, 'pin_memory': args.pin_mem, 'persistent_workers': args.num_workers > 0}
    if args.num_workers > 0:
        options['multiprocessing_context'] = workers.worker_context()
        options['worker_init_fn'] = workers.worker_init_fn()
    return options


def build_eval_loader(args, val_set):
    """Evaluation loader: this rank's shard of ``val_set``, in order, no padding."""
    sampler = ShardSampler(len(val_set), args.rank, utils.world_size())
    return DataLoader(val_set, batch_size=args.eval_batch_size, sampler=sampler, **loader_options(args))


def build_mixup(args, num_classes):
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=num_classes)
    return None


# ----------------------------------------------------------------------------------------------------------------
# The loops
# ----------------------------------------------------------------------------------------------------------------

def injected_fault(step):
    """Test hook, inert unless ``DEVIT_FAULT=KIND@STEP[:RANK]`` is set (tests/test_faults_*.py set it).

    At global optimizer step STEP (counted from the run's start, resumed steps included) on rank RANK (default:
    every rank): ``crash`` SIGKILLs the process (as an OOM kill would), ``hang`` blocks it forever, ``nan`` returns
    'nan' so that the caller turns the loss into NaN. A line ``fault injected: ...`` goes to stderr first.
    """
    spec = os.environ.get('DEVIT_FAULT')
    if not spec:
        return None
    kind, _, where = spec.partition('@')
    at, _, rank = where.partition(':')
    if int(at) != step or (rank and int(rank) != int(os.environ.get('RANK', '0'))):
        return None
    print(f'fault injected: {kind} at global step {step}', file=sys.stderr, flush=True)
    if kind == 'crash':
        os.kill(os.getpid(), signal.SIGKILL)
    while kind == 'hang':
        time.sleep(60)
    return kind


def train_one_epoch(task, loader, optimizer, epoch, *, params, device, lr_scheduler=None, mixup_fn=None,
                    model_ema=None, clip_grad=None, scaler=None, start_update=0, progress=True):
    """One pass over ``loader``; returns averaged loss parts and the number of optimizer updates done so far."""
    task.train()
    amp = torch.autocast('cuda', dtype=torch.float16) if scaler is not None else contextlib.nullcontext()
    totals, count, num_updates = {}, 0, start_update
    bar = tqdm(loader, desc=f'epoch {epoch}', disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for step, (samples, targets) in enumerate(bar):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with amp:
            loss, parts = task(samples, targets)
        if injected_fault(num_updates) == 'nan':
            loss = loss * float('nan')
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f'loss is {loss_value} at epoch {epoch} step {step} (global step {num_updates}); '
                                     f'stopping before any update is saved (the last good checkpoint is kept)')
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, optimizer, clip_grad=clip_grad, parameters=params)
        else:
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            optimizer.step()
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        if model_ema is not None:
            model_ema.update(unwrap(task).model, step=num_updates)
        batch = samples.shape[0]
        count += batch
        totals['loss'] = totals.get('loss', 0.0) + loss_value * batch
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + float(value) * batch
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f'{loss_value:.4f}', lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    sums = utils.all_reduce_sum([totals.get(k, 0.0) for k in sorted(totals)] + [count], device=device)
    count = sums[-1]
    stats = {k: v / max(count, 1) for k, v in zip(sorted(totals), sums[:-1])}
    stats['lr'] = optimizer.param_groups[0]['lr']
    return stats, num_updates


@torch.no_grad()
def evaluate(model, loader, device, progress=False):
    """Top-1/top-5 accuracy (percent, as DeiT) and CE loss of ``model(x)`` over every rank's shard."""
    was_training = model.training
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    correct1 = correct5 = loss_sum = 0.0
    count = 0
    for samples, targets in tqdm(loader, desc='eval', disable=not progress, leave=False, mininterval=1.0):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        output = model(samples)
        loss_sum += criterion(output, targets).item()
        top5 = min(5, output.shape[1])
        acc1, acc5 = accuracy(output, targets, topk=(1, top5))
        correct1 += acc1.item() * samples.shape[0] / 100
        correct5 += acc5.item() * samples.shape[0] / 100
        count += samples.shape[0]
    model.train(was_training)
    correct1, correct5, loss_sum, count = utils.all_reduce_sum([correct1, correct5, loss_sum, count], device=device)
    count = max(count, 1)
    return {'acc1': 100.0 * correct1 / count, 'acc5': 100.0 * correct5 / count, 'loss': loss_sum / count,
            'count': int(count)}


def unwrap(module):
    return module.module if isinstance(module, DistributedDataParallel) else module


# ----------------------------------------------------------------------------------------------------------------
# The driver around the loops
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_BEST = 'checkpoint.pth'
CHECKPOINT_LAST = 'checkpoint_last.pth'


# torch's Adam/AdamW take their per-tensor loop on CPU (the multi-tensor and fused paths are CUDA-only defaults):
# about ten small ops per parameter tensor, each waking the OpenMP team, which on two busy cores costs more than the
# ops. The fused kernel does one pass per tensor on CPU and CUDA alike: 7x faster optimizer steps at one thread and
# 13x at two on the demo's teacher (bench/profile_bench.py).
FUSED_OPTIMIZERS = ('adam', 'adamw')


def optimizer_impl(opt):
    """Extra create_optimizer_v2 kwargs for optimizer ``opt``: the fused implementation where torch has one."""
    return {'fused': True} if opt.lower() in FUSED_OPTIMIZERS else {}


def scaled_lr(args):
    if args.unscale_lr:
        return args.lr
    return args.lr * args.batch_size * utils.world_size() / 512.0


def resume_path(args, output_dir):
    if args.resume:
        return args.resume
    last = os.path.join(output_dir, CHECKPOINT_LAST)
    if args.auto_resume and os.path.isfile(last):
        return last
    return None


def check_output_dir(args, output_dir):
    """Refuse to start over a finished or running run by accident: nothing existing is overwritten silently."""
    fileio.check_writable_dir(output_dir)
    if resume_path(args, output_dir) or args.overwrite or args.eval:
        return
    existing = [n for n in (CHECKPOINT_BEST, CHECKPOINT_LAST) if os.path.exists(os.path.join(output_dir, n))]
    if existing:
        raise UsageError(f'{output_dir} already holds {", ".join(existing)}; pass --auto-resume to continue '
                         f'it or --overwrite to start over')


def warn_recipe(args):
    """One warning line for a schedule that cannot work as meant: a warm-up as long as the whole run."""
    if args.warmup_epochs >= args.epochs and utils.is_main_process():
        print(f'warning: the warm-up ({args.warmup_epochs:g} epochs) is as long as the training ({args.epochs} '
              f'epochs), so the learning rate never reaches --lr; give --warmup-epochs below --epochs (the small-data '
              f'recipe, -c configs/small.yaml, warms up for under half an epoch)', flush=True)


def warn_chance(best_acc1, num_classes):
    """One warning line when a finished run's best test top-1 is no better than guessing."""
    if not num_classes or best_acc1 is None or not utils.is_main_process():
        return
    chance = 100.0 / num_classes
    if best_acc1 <= chance:
        print(f'warning: best test top-1 {best_acc1:.2f}% is at or below chance ({chance:.2f}% for {num_classes} '
              f'classes): fine for a smoke run, not for a finished one (too few epochs or images, a warm-up longer '
              f'than the run, or a recipe for another data size)', flush=True)


def fit(args, task, train_set, val_set, output_dir, *, extra_checkpoint=None, num_classes=None):
    """Train ``task.model`` for ``args.epochs`` epochs; return a summary dict (best and final accuracy).

    Checkpoints (models.checkpoint.training_state, plus ``extra_checkpoint``): ``checkpoint_last.pth`` every epoch
    (for resume) and ``checkpoint.pth``, the best so far: written after the first epoch whatever its accuracy, then
    whenever test top-1 reaches the best again (ties included), so every finished epoch leaves both files.
    """
    device = torch.device(args.device)
    main = utils.is_main_process()
    progress = main and not args.no_progress
    check_labels(train_set, val_set, num_classes)
    full_sets = (train_set, val_set)
    train_set = limit(train_set, args.limit_train)
    val_set = limit(val_set, args.limit_val)
    train_loader, val_loader = build_loaders(args, train_set, val_set)

    task.to(device)
    model = task.model
    trainable = [p for p in task.parameters() if p.requires_grad]
    ddp_task = DistributedDataParallel(task) if args.distributed else task
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=scaled_lr(args), weight_decay=args.weight_decay,
                                    eps=args.opt_eps, momentum=args.momentum, **optimizer_impl(args.opt))
    lr_scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                          warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                          min_lr=args.min_lr, step_on_epochs=False,
                                          updates_per_epoch=len(train_loader))
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    scaler = NativeScaler() if device.type == 'cuda' else None
    mixup_fn = build_mixup(args, num_classes) if num_classes else None

    start_epoch, best_acc1, num_updates = 0, None, 0  # best_acc1 None: no epoch finished yet
    path = resume_path(args, output_dir)
    if path:
        start_epoch, best_acc1, num_updates = restore_training_state(
            path, model, optimizer, lr_scheduler, model_ema.module if model_ema is not None else None, scaler,
            expect=extra_checkpoint)
        if main:
            print(f'resumed from {path}: epoch {start_epoch}, best acc1 {best_acc1 or 0.0:.2f}', flush=True)

    if args.eval:
        return {'test': evaluate(model, val_loader, device, progress)}

    writer = tensorboard_writer(args, output_dir) if main else None
    if main:
        os.makedirs(output_dir, exist_ok=True)
        for stale in utils.remove_stale_temp_files(output_dir, (CHECKPOINT_BEST, CHECKPOINT_LAST)):
            print(f'removed {stale}, an unfinished checkpoint write of a killed run', flush=True)
        fileio.write_json_atomic(os.path.join(output_dir, 'args.json'), args_dict(args))
    warn_recipe(args)
    test_stats = ema_stats = {}
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        # Seeding per epoch (not once) makes a resumed run draw the same augmentations as an uninterrupted one.
        utils.seed_everything(args.seed + 1000 * epoch + args.rank)
        train_stats, num_updates = train_one_epoch(
            ddp_task, train_loader, optimizer, epoch, params=trainable, device=device, lr_scheduler=lr_scheduler,
            mixup_fn=mixup_fn, model_ema=model_ema, clip_grad=args.clip_grad, scaler=scaler,
            start_update=num_updates, progress=progress)
        test_stats = evaluate(model, val_loader, device)
        ema_stats = evaluate(model_ema.module, val_loader, device) if model_ema is not None else {}
        # Ties count as a new best and the first epoch always does: checkpoint.pth exists after every finished
        # epoch, even in a run whose accuracy stays at 0 (a smoke run in its warm-up), and the next stage can start.
        is_best = best_acc1 is None or test_stats['acc1'] >= best_acc1
        best_acc1 = test_stats['acc1'] if is_best else best_acc1
        record = {'epoch': epoch, **{f'train_{k}': v for k, v in train_stats.items()},
                  **{f'test_{k}': v for k, v in test_stats.items()},
                  **{f'test_ema_{k}': v for k, v in ema_stats.items()},
                  'best_acc1': best_acc1, 'num_updates': num_updates, 'epoch_seconds': time.time() - started}
        if args.skip_bad_images:
            record['skipped_images'] = len(skipped_images(full_sets))
        check_finite(model, model_ema, epoch)  # never overwrite the last good checkpoints with NaN weights
        if main:
            state = training_state(model, args=args, model_ema=model_ema.module if model_ema is not None else None,
                                   optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler, epoch=epoch,
                                   num_updates=num_updates, best_acc1=best_acc1, test_acc1=test_stats['acc1'],
                                   **(extra_checkpoint or {}))
            # Best first: a kill between the two saves then resumes from the previous epoch and redoes this one,
            # where last-first would resume past a best epoch whose checkpoint.pth was never written.
            if is_best:
                utils.save_checkpoint(state, os.path.join(output_dir, CHECKPOINT_BEST))
            utils.save_checkpoint(state, os.path.join(output_dir, CHECKPOINT_LAST))
            fileio.append_log(os.path.join(output_dir, 'log.txt'), record)
            if writer is not None:
                for key, value in record.items():
                    writer.add_scalar(key, value, epoch)
            rounded = {k: float(f'{v:.5g}') if isinstance(v, float) else v for k, v in record.items()}
            print(json.dumps(rounded), flush=True)
        utils.barrier()
    if writer is not None:
        writer.close()
    warn_chance(best_acc1, num_classes)
    summary = {'best_acc1': best_acc1, 'test': test_stats, 'test_ema': ema_stats}
    if args.skip_bad_images:
        summary['skipped_images'] = skipped = skipped_images(full_sets)
        if main and skipped:
            print(f'skipped {len(skipped)} unreadable image file(s): {", ".join(skipped[:5])}'
                  f'{" ..." if len(skipped) > 5 else ""}', flush=True)
    return summary


def check_labels(train_set, val_set, num_classes):
    """Labels outside 0..num_classes-1 would fail deep inside the loss, or train a wrong head silently."""
    for what, dataset in (('training', train_set), ('test', val_set)):
        targets = getattr(dataset, 'targets', None)
        if num_classes is None or targets is None or len(targets) == 0:
            continue
        targets = np.asarray(targets)
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise UsageError(f'{what} labels range over {low}..{high} but the model has {num_classes} classes '
                             f'(0..{num_classes - 1}): the data does not match the split manifest')


def check_finite(model, model_ema, epoch):
    """Stop, without saving, when an update made any weight NaN/Inf although every loss was finite."""
    for what, module in (('model', model), ('EMA model', model_ema.module if model_ema is not None else None)):
        bad = [] if module is None else [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(f'{what} weights became non-finite in epoch {epoch} ({", ".join(bad[:3])}); '
                                     f'not saving them (the checkpoints of the last good epoch are kept)')


def skipped_images(datasets):
    """Unreadable files skipped so far by ``--skip-bad-images`` datasets, on every rank (a collective call)."""
    local = sorted({f for d in datasets for f in getattr(d, 'skipped_files', list)()})
    return sorted(set().union(*utils.all_gather_object(local)))


def tensorboard_writer(args, output_dir):
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError('--tensorboard needs the tensorboard package: pip install tensorboard') from None
    return SummaryWriter(os.path.join(output_dir, 'tensorboard'))


def set_normalization(args, in_chans):
    """Fix ``args.mean``/``args.std`` to the values the data is normalised with (``--mean``/``--std``, those the
    input checkpoints recorded (utils.inherit_normalization), else ImageNet's), so that args.json and every
    checkpoint record them for the next stages and for deployment."""
    import data_transforms

    args.mean, args.std = (list(v) for v in data_transforms.resolve_mean_std(args.mean, args.std, in_chans))


def run_divisions(args, make_task, stage):
    """Stages 1 and 2: for each division to run, build its task and data and ``fit`` into ``sub-dataset{i}/``.

    ``make_task(division, num_classes)`` returns the stage's task; everything around it is shared here.
    """
    import datasets  # local: keeps ``engine`` importable by tools that never load data

    manifest = datasets.read_manifest(args.data_path, required=True)
    divisions = utils.divisions_to_run(args, manifest)
    for division in divisions:  # fail before any training, not after the first division
        check_output_dir(args, utils.division_dir(args.output_dir, division))
    if utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        utils.copy_manifest(manifest, args.output_dir)
    results = {}
    for division in divisions:
        info = manifest['divisions'][division]
        num_classes = len(info['classes'])
        utils.seed_everything(args.seed)  # same initial weights on every rank and in every rerun
        task = make_task(division, num_classes)
        size, chans = factory.input_spec(task.model)
        set_normalization(args, chans)
        data = {split: datasets.build_dataset(args.dataset, args.data_path, split, division=division, input_size=size,
                                              in_chans=chans, tiny=args.tiny_transforms, args=args)
                for split in ('train', 'val')}
        if utils.is_main_process():
            print(f'division {division}: {num_classes} classes, {len(data["train"])} train / {len(data["val"])} val '
                  f'images at {size}x{size}x{chans}', flush=True)
        extra = {'stage': stage, 'division': division, 'classes': info['classes'], 'num_classes': num_classes}
        results[division] = fit(args, task, data['train'], data['val'], utils.division_dir(args.output_dir, division),
                                extra_checkpoint=extra, num_classes=num_classes)
        if utils.is_main_process():
            print(f'division {division}: best test acc1 {results[division]["best_acc1"] or 0.0:.2f}%', flush=True)
    return results
