"""Training-side benchmarks, each a ratio of two things timed in the same run on the same model and data.

    python bench/training_bench.py [--quick] [--json bench/training.json]

- engine_overhead:  engine.train_one_epoch (stage-1 task, EMA on, scheduler, no mixup) vs a bare
                    ``for x, y in loader: loss.backward(); opt.step()`` loop.                      target <= 1.05
- distill_overhead: one stage-2 step (student + teacher forward + KD + q/k/v relation losses) vs a student train
                    step plus a teacher no-grad forward, measured separately.                        target <= 1.10
- data_loading:     images/s of the Fashion-MNIST loader alone vs images/s of stage-1 training.     target >= 3

The two sides of a ratio are run alternately several times and the median of each is taken, so a burst of load
from another process hits both. Run with nothing else busy for clean numbers.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timm import create_model  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

import datasets  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402,F401  (registers dedeit)
from losses import DistillationLoss, build_base_criterion, relation_terms  # noqa: E402
from models.adapter import layer_pairs  # noqa: E402
from models.features import forward_features  # noqa: E402

# The demo's models (see demo.sh).
TEACHER = ('deit_tiny_distilled_patch16_224',
           dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2))
STUDENT = ('dedeit', dict(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2))


def loader(num_images, batch_size):
    data = datasets.build_dataset('fashion_mnist', None, 'train', input_size=28, in_chans=1, tiny=True)
    return DataLoader(Subset(data, range(num_images)), batch_size=batch_size, shuffle=True, drop_last=True)


def timed(fn, repeats):
    """Median seconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def alternate(fns, repeats):
    """Run the callables in turn ``repeats`` times; median seconds of each."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bare_loop(model, optimizer, criterion, data):
    """The reference the engine is measured against: ``for x, y in loader: loss.backward(); opt.step()``."""
    model.train()
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()


def bench_engine(data, repeats):
    """Both loops train the same model instance with the same optimizer, so the ratio holds only what the engine
    adds per step (task call, loss checks, scheduler, EMA, bookkeeping), not a difference between two copies."""
    name, kwargs = TEACHER
    model = create_model(name, num_classes=10, **kwargs)
    criterion = nn.CrossEntropyLoss()
    task = engine.SupervisedTask(model, criterion)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05, **engine.optimizer_impl('adamw'))
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=1000, step_on_epochs=False,
                                       updates_per_epoch=len(data))
    ema = ModelEmaV3(model, decay=0.999)
    params = [p for p in model.parameters() if p.requires_grad]

    def engine_epoch():
        engine.train_one_epoch(task, data, optimizer, 0, params=params, device=torch.device('cpu'),
                               lr_scheduler=scheduler, model_ema=ema, progress=False)

    def bare_epoch():
        bare_loop(model, optimizer, criterion, data)

    t_engine, t_bare = alternate([engine_epoch, bare_epoch], repeats)
    images = len(data) * data.batch_size
    return {'ratio': t_engine / t_bare, 'target': 1.05,
            'what': f'engine.train_one_epoch (EMA, scheduler, stage-1 task) / bare loop on the same model and '
                    f'optimizer, {images} images per epoch, {name} {kwargs}',
            'engine_images_per_s': images / t_engine, 'bare_images_per_s': images / t_bare}


def bench_distill(data, repeats, teacher_spec=TEACHER, student_spec=STUDENT, scale='demo models'):
    """All three sides run on the same student (with its one optimizer) and the same teacher instance, so the ratio
    holds only what distillation adds (q/k/v capture, KD and relation losses), not a difference between copies."""
    (t_name, t_kwargs), (s_name, s_kwargs) = teacher_spec, student_spec
    teacher = create_model(t_name, num_classes=10, **t_kwargs).eval()
    student = create_model(s_name, num_classes=10, **s_kwargs)
    student.set_distilled_training(True)
    pairs = layer_pairs(len(student.blocks), len(teacher.blocks))
    loss = DistillationLoss(build_base_criterion(False), 'hard', 0.5, 1.0)
    task = engine.DecomposeTask(student, teacher, loss, pairs, [0.2, 0.1, 0.3]).train()
    opt = create_optimizer_v2(student, opt='adamw', lr=1e-3, **engine.optimizer_impl('adamw'))
    criterion = nn.CrossEntropyLoss()
    batches = list(data)

    def distill_steps():
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            task(x, y)[0].backward()
            opt.step()

    def student_steps():
        student.train()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            logits, logits_dist = student(x)
            (criterion(logits, y) * 0.5 + criterion(logits_dist, y) * 0.5).backward()
            opt.step()

    def teacher_forwards():
        with torch.no_grad():
            for x, _ in batches:
                teacher(x)

    # The relation losses' own arithmetic (three N×N Gram matrices per layer pair and side, softmax, KL, backward),
    # timed on q/k/v captured once per batch: what the method costs, as opposed to what capturing q/k/v costs.
    captured = []
    with torch.no_grad():
        for x, _ in batches:
            s_qkv = forward_features(student, x, task.student_layers).qkv
            t_qkv = forward_features(teacher, x, task.teacher_layers).qkv
            captured.append(({i: tuple(t.clone().requires_grad_() for t in v) for i, v in s_qkv.items()}, t_qkv))

    def relation_math():
        for s_qkv, t_qkv in captured:
            relation_terms(s_qkv, t_qkv, task.layer_pairs, task.gammas, task.student_depth)[0].backward()

    t_distill, t_student, t_teacher, t_relation = alternate(
        [distill_steps, student_steps, teacher_forwards, relation_math], repeats)
    t_sides = t_student + t_teacher
    return {'ratio': t_distill / t_sides, 'target': 1.10,
            'what': f'stage-2 step (student + teacher + KD + q/k/v relations) / (student step + teacher no-grad '
                    f'forward), {scale}, one student and one teacher instance on both sides; the relation '
                    f'losses\' own arithmetic is {t_relation / t_sides:.3f} of the denominator, what remains '
                    f'(q/k/v capture, KD, plumbing) {(t_distill - t_relation) / t_sides:.3f}',
            'seconds': {'distill': t_distill, 'student': t_student, 'teacher': t_teacher,
                        'relation_math': t_relation},
            'without_relation_math': (t_distill - t_relation) / t_sides}


# The paper's DeDeiTs stage 2: a DeiT-Tiny-shaped student distilled from DeiT-B at 224x224 (random weights and
# images: the costs do not depend on them).
PAPER_TEACHER = ('deit_base_distilled_patch16_224', {})
PAPER_STUDENT = ('dedeit', {})


def bench_distill_paper(batches, batch_size, repeats):
    data = [(torch.randn(batch_size, 3, 224, 224), torch.randint(0, 10, (batch_size,))) for _ in range(batches)]
    return bench_distill(data, repeats, PAPER_TEACHER, PAPER_STUDENT,
                         scale=f'paper scale (dedeit from deit_base_distilled_patch16_224, 224x224, '
                               f'{batches} batches of {batch_size})')


def bench_loading(data, repeats, train_images_per_s):
    def load_only():
        for _ in data:
            pass

    (t_load,) = alternate([load_only], repeats)
    images = len(data) * data.batch_size
    loader_rate = images / t_load
    return {'ratio': loader_rate / train_images_per_s, 'target': 3.0,
            'what': 'Fashion-MNIST loader images/s (decoded once, tiny transforms) / stage-1 training images/s',
            'loader_images_per_s': loader_rate}


def main(argv=None):
    parser = argparse.ArgumentParser('training benchmarks')
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1: least sensitive to other load)')
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, repeats = (1024, 3) if args.quick else (4096, 5)
    data = loader(images, batch_size=128)
    results = {'engine_overhead': bench_engine(data, repeats)}
    results['distill_overhead'] = bench_distill(loader(images // 2, batch_size=128), repeats)
    results['data_loading'] = bench_loading(data, repeats, results['engine_overhead']['bare_images_per_s'])
    from bench.common import finish

    return finish(results, args.json)


if __name__ == '__main__':
    main()
