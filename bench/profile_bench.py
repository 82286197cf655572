"""Where the demo's training time goes, and what the fused optimizer (engine.optimizer_impl) changes.

    python bench/profile_bench.py [--quick] [--json FILE]

1. Stage costs. One training step of each stage's task (engine.SupervisedTask for the teacher and stage 1,
   DecomposeTask for stage 2 and the baseline, EnsembleTask for stage 3) with demo.sh's models and batch size, run
   through engine.train_one_epoch on Fashion-MNIST, and the per-image cost of evaluating each model; the tasks are
   measured in turn, several rounds, medians. Multiplied by the steps and test images each stage of the full demo
   runs (epochs, batch and shapes are read from demo.sh), this ranks the stages.
2. torch.profiler over a few steps of the slowest stage: self CPU time by op family (matmuls, attention, copies,
   element-wise and norms, the optimizer step, the rest).
3. AdamW's fused kernel (engine.optimizer_impl, what engine.fit uses) against torch's CPU default, a per-tensor
   loop of ~10 small ops per parameter tensor. Measured on the slowest stage's model: the optimizer step alone and a
   whole train_one_epoch, the two alternating, at one thread (what each of demo.sh's two processes per stage uses)
   and at all cores (one process per stage).
"""
import argparse
import copy
import os
import re
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from timm import create_model  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import datasets  # noqa: E402
import engine  # noqa: E402
import fileio  # noqa: E402
import grouping  # noqa: E402
import models  # noqa: E402,F401  (registers dedeit)
from losses import DistillationLoss, build_base_criterion  # noqa: E402
from models.adapter import layer_pairs  # noqa: E402
from models.ensemble_model import DeViTEnsemble, create_backbone  # noqa: E402

FASHION = {'classes': 10, 'train_per_class': 6000, 'test_per_class': 1000}
CPU = torch.device('cpu')


# ----------------------------------------------------------------------------------------------------------------
# The demo, as demo.sh runs it

def demo_config(path=os.path.join(ROOT, 'demo.sh')):
    """Models, epochs and batch sizes of the full demo (not --quick), read from demo.sh."""
    text = open(path).read()

    def one(pattern, what):
        m = re.search(pattern, text, re.M)
        if not m:
            raise ValueError(f'{what} not found in {path}')
        return m.group(1)

    def kwargs(var):
        return {k: int(v) if v.isdigit() else float(v)
                for k, v in (w.split('=', 1) for w in one(rf'^{var}=\(([^)]*)\)', var).split())}

    return {'teacher': one(r'^TEACHER=(\S+)$', 'TEACHER'), 'teacher_kw': kwargs('TEACHER_KW'),
            'student': one(r'^STUDENT=(\S+)$', 'STUDENT'), 'student_kw': kwargs('STUDENT_KW'),
            'epochs': {e: int(one(rf'{e}=\${{{e}:-(\d+)}}', e)) for e in ('E0', 'E1', 'E2', 'E3')},
            # the global batch: demo.sh gives each of its NPROC processes `--batch-size $((256 / NPROC))`
            'batch': int(one(r'--batch-size (?:\$\(\()?(\d+)', '--batch-size')),
            'eval_batch': int(one(r'--eval-batch-size (\d+)', '--eval-batch-size')),
            'divisions': int(one(r'^N=(\d+)$', 'N='))}


def stage_workload(cfg):
    """{stage: (task kind, optimizer steps, test images evaluated, model evaluated)} of the full demo."""
    k, n, b = FASHION['classes'], cfg['divisions'], cfg['batch']
    sizes = grouping.authors_sizes(k, n)  # classes per division, as splite_dataset.py cuts them
    full_steps = k * FASHION['train_per_class'] // b
    div_steps = sum(c * FASHION['train_per_class'] // b for c in sizes)
    test = k * FASHION['test_per_class']
    e = cfg['epochs']
    return {
        'teacher from scratch': ('supervised', e['E0'] * full_steps, e['E0'] * test, 'teacher'),
        'stage 1 sub-teachers': ('supervised', e['E1'] * div_steps, e['E1'] * test, 'teacher'),
        'stage 2 students': ('decompose', e['E2'] * div_steps, e['E2'] * test, 'student'),
        'stage 3 ensemble': ('ensemble', e['E3'] * full_steps, e['E3'] * test, 'ensemble'),
        'baseline': ('decompose', (e['E2'] + e['E3']) * full_steps, (e['E2'] + e['E3']) * test, 'student'),
    }


class Demo:
    """The demo's models and tasks (random weights: costs do not depend on the weights)."""

    def __init__(self, cfg):
        self.cfg = cfg
        torch.manual_seed(0)

    def teacher(self):
        return create_model(self.cfg['teacher'], num_classes=10, **self.cfg['teacher_kw'])

    def student(self):
        s = create_model(self.cfg['student'], num_classes=10, **self.cfg['student_kw'])
        if hasattr(s, 'set_distilled_training'):
            s.set_distilled_training(True)
        return s

    def task(self, kind):
        hard = DistillationLoss(build_base_criterion(False), 'hard', 0.5, 1.0)
        if kind == 'supervised':
            return engine.SupervisedTask(self.teacher(), nn.CrossEntropyLoss())
        if kind == 'decompose':
            s, t = self.student(), self.teacher()
            return engine.DecomposeTask(s, t, hard, layer_pairs(len(s.blocks), len(t.blocks)), [0.2, 0.1, 0.3])
        backbones = [create_backbone(self.cfg['student'], self.cfg['student_kw']) for _ in range(self.cfg['divisions'])]
        teacher = self.teacher()
        return engine.EnsembleTask(DeViTEnsemble(backbones, 10, teacher.num_features), teacher, hard)

    def eval_model(self, which):
        if which == 'ensemble':
            return self.task('ensemble').model.eval()
        return (self.teacher() if which == 'teacher' else self.student()).eval()


def loaders(cfg, train_images, test_images):
    size, chans = cfg['teacher_kw'].get('img_size', 28), cfg['teacher_kw'].get('in_chans', 1)
    train = datasets.build_dataset('fashion_mnist', None, 'train', input_size=size, in_chans=chans, tiny=True)
    val = datasets.build_dataset('fashion_mnist', None, 'val', input_size=size, in_chans=chans, tiny=True)
    return (DataLoader(Subset(train, range(train_images)), batch_size=cfg['batch'], shuffle=True, drop_last=True),
            DataLoader(Subset(val, range(test_images)), batch_size=cfg['eval_batch']))


def epoch_fn(task, data, fused=True):
    """A closure running engine.train_one_epoch of `task` over `data` with AdamW (fused or torch's CPU default)."""
    opt = create_optimizer_v2(task.model, opt='adamw', lr=1e-3, weight_decay=0.05,
                              **(engine.optimizer_impl('adamw') if fused else {}))
    params = [p for p in task.parameters() if p.requires_grad]
    return lambda: engine.train_one_epoch(task, data, opt, 0, params=params, device=CPU, progress=False)


def interleave(fns, rounds):
    """Run the callables in turn for `rounds` rounds after one warm-up each: per-callable lists of seconds."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return times


def paired_ratio(times, a, b):
    """Median over rounds of times[a] / times[b] (each round's pair ran back to back)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


# ----------------------------------------------------------------------------------------------------------------
# 1. stage costs

def stage_costs(demo, train, val, rounds):
    kinds = ('supervised', 'decompose', 'ensemble')
    tasks = {k: demo.task(k) for k in kinds}
    times = interleave({k: epoch_fn(tasks[k], train) for k in kinds}, rounds)
    step_s = {k: statistics.median(v) / len(train) for k, v in times.items()}
    evals = {w: demo.eval_model(w) for w in ('teacher', 'student', 'ensemble')}
    n_val = len(val.dataset)
    etimes = interleave({w: (lambda m=m: engine.evaluate(m, val, CPU)) for w, m in evals.items()}, rounds)
    image_s = {w: statistics.median(v) / n_val for w, v in etimes.items()}
    stages = {}
    for name, (kind, steps, images, model) in stage_workload(demo.cfg).items():
        train_s, eval_s = steps * step_s[kind], images * image_s[model]
        stages[name] = {'task': kind, 'steps': steps, 'train_s': train_s, 'test_images': images, 'eval_s': eval_s,
                        'total_s': train_s + eval_s}
    total = sum(s['total_s'] for s in stages.values())
    for s in stages.values():
        s['share'] = s['total_s'] / total
    slowest = max(stages, key=lambda k: stages[k]['total_s'])
    return {'step_seconds': step_s, 'eval_seconds_per_image': image_s, 'stages': stages,
            'estimated_total_s': total, 'slowest': slowest}


# ----------------------------------------------------------------------------------------------------------------
# 2. profile

FAMILIES = (
    ('matmul (linear fwd/bwd)', ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm')),
    ('attention (SDPA)', ('scaled_dot_product', 'flash_attention')),
    ('copies and cat', ('aten::copy_', 'aten::cat', 'aten::clone', 'aten::contiguous')),
    ('element-wise, norms, GELU, softmax', ('gelu', 'layer_norm', 'aten::add', 'aten::mul', 'aten::sum',
                                            'aten::div', 'softmax', 'aten::fill_', 'aten::where', 'aten::sub',
                                            'nll_loss', 'aten::zero_', 'aten::neg', 'aten::exp', 'aten::log',
                                            'aten::sqrt', 'aten::lerp', 'aten::addc')),
)


def profile_stage(task, data, steps, fused):
    """Self CPU time of `steps` training steps by op family; ops inside the optimizer step count as 'optimizer'."""
    from torch.profiler import ProfilerActivity, profile

    run = epoch_fn(task, data, fused)
    run()  # warm-up (and optimizer state)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.events()
    inside_opt = set()
    for e in events:
        if e.name.startswith('Optimizer.step'):
            stack = list(e.cpu_children)
            while stack:
                c = stack.pop()
                inside_opt.add(id(c))
                stack.extend(c.cpu_children)
    totals = {}
    for e in events:
        if id(e) in inside_opt or e.name.startswith('Optimizer.step'):
            family = 'optimizer step'
        else:
            family = next((f for f, keys in FAMILIES if any(k in e.name for k in keys)), 'other')
        totals[family] = totals.get(family, 0.0) + e.self_cpu_time_total
    whole = sum(totals.values())
    top = [{'op': a.key, 'self_ms': a.self_cpu_time_total / 1e3 / steps, 'calls_per_step': a.count / steps}
           for a in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:10]]
    return {'steps': steps, 'fused_optimizer': fused,
            'share': {k: v / whole for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            'self_ms_per_step': whole / 1e3 / steps, 'top_ops': top}


# ----------------------------------------------------------------------------------------------------------------
# 3. torch's default AdamW against the fused one

def optimizer_fix(task, data, rounds, threads_list):
    """Old (torch's CPU AdamW default) vs new (fused) on `task`'s model: the optimizer step alone, and whole epochs.

    A whole epoch moves by the optimizer's share of a step only (about 1% at one thread), less than this machine's
    run-to-run noise; so next to the measured epoch ratio stands the one the measured parts imply:
    (epoch_new + steps * (step_old - step_new)) / epoch_new.
    """
    out = {}
    base = torch.get_num_threads()
    for threads in threads_list:
        torch.set_num_threads(threads)
        opts = {}
        for k in ('old', 'new'):
            m = copy.deepcopy(task.model)
            for p in m.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            opts[k] = create_optimizer_v2(m, opt='adamw', lr=1e-3, weight_decay=0.05,
                                          **(engine.optimizer_impl('adamw') if k == 'new' else {}))
        step_times = interleave({k: o.step for k, o in opts.items()}, 50)
        ep = interleave({'old': epoch_fn(copy.deepcopy(task), data, fused=False),
                         'new': epoch_fn(copy.deepcopy(task), data, fused=True)}, rounds)
        step_ms = {k: 1e3 * statistics.median(v) for k, v in step_times.items()}
        epoch_s = {k: statistics.median(v) for k, v in ep.items()}
        implied = (epoch_s['new'] + len(data) * (step_ms['old'] - step_ms['new']) / 1e3) / epoch_s['new']
        out[f'{threads}_thread' + ('s' if threads > 1 else '')] = {
            'optimizer_step_ms': step_ms, 'optimizer_step_ratio': paired_ratio(step_times, 'old', 'new'),
            'epoch_s': epoch_s, 'epoch_ratio': paired_ratio(ep, 'old', 'new'), 'epoch_ratio_implied': implied,
            'optimizer_share_of_step_before': len(data) * step_ms['old'] / 1e3 / epoch_s['old'],
            'steps_per_epoch': len(data)}
    torch.set_num_threads(base)
    return out


def bench(quick):
    cfg = demo_config()
    torch.set_num_threads(1)
    demo = Demo(cfg)
    rounds = 3 if quick else 5
    steps = 2 if quick else 4
    train, val = loaders(cfg, cfg['batch'] * steps, 1000 if quick else 2000)
    costs = stage_costs(demo, train, val, rounds)
    slowest = costs['slowest']
    kind = costs['stages'][slowest]['task']
    task = demo.task(kind)
    prof_old = profile_stage(copy.deepcopy(task), train, steps, fused=False)
    prof_new = profile_stage(copy.deepcopy(task), train, steps, fused=True)
    cores = os.cpu_count() or 1
    fix = optimizer_fix(task, train, rounds, sorted({1, cores}))
    one, default = fix['1_thread'], fix[f'{cores}_thread' + ('s' if cores > 1 else '')]
    return {
        'demo_profile_optimizer': {
            'ratio': one['optimizer_step_ratio'], 'target': 2.0, 'direction': 'min',
            'what': f'AdamW step on the slowest demo stage\'s model ({slowest}), torch\'s CPU default (per-tensor '
                    f'loop) / fused kernel (engine.optimizer_impl), 1 thread, alternating, median of pairs; at '
                    f'{cores} threads: {default["optimizer_step_ratio"]:.2f}',
            'fix': fix},
        'demo_profile_stage': {
            'ratio': one['epoch_ratio_implied'], 'target': None, 'direction': None,
            'what': f'train_one_epoch of the slowest demo stage ({slowest}, {cfg["batch"]}-image steps), torch\'s '
                    'default AdamW / the fused one, as its measured parts imply at 1 thread (the optimizer was '
                    f'{100 * one["optimizer_share_of_step_before"]:.1f}% of a step); measured directly: '
                    f'{one["epoch_ratio"]:.3f} at 1 thread, {default["epoch_ratio"]:.3f} at {cores}, within noise',
            'demo': cfg, 'costs': costs, 'profile_before': prof_old, 'profile_after': prof_new},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true')
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    results = bench(args.quick)
    costs = results['demo_profile_stage']['costs']
    print(f'estimated full-demo training time at these rates: {costs["estimated_total_s"] / 60:.1f} min')
    for name, s in costs['stages'].items():
        print(f'  stage {name:<24} {s["steps"]:5d} steps {s["train_s"]:7.0f} s + eval {s["eval_s"]:5.0f} s '
              f'= {100 * s["share"]:4.1f}%')
    for label in ('profile_before', 'profile_after'):
        prof = results['demo_profile_stage'][label]
        print(f'{label} ({costs["slowest"]}, {prof["self_ms_per_step"]:.0f} ms/step): '
              + ', '.join(f'{k} {100 * v:.1f}%' for k, v in prof['share'].items()))
    for threads, r in results['demo_profile_optimizer']['fix'].items():
        print(f'fix at {threads}: optimizer step {r["optimizer_step_ms"]["old"]:.2f} -> '
              f'{r["optimizer_step_ms"]["new"]:.2f} ms (x{r["optimizer_step_ratio"]:.2f}), epoch '
              f'{r["epoch_s"]["old"]:.2f} -> {r["epoch_s"]["new"]:.2f} s (x{r["epoch_ratio"]:.3f} measured, '
              f'x{r["epoch_ratio_implied"]:.3f} implied)')
    if args.json:
        fileio.write_json_atomic(args.json, results)
    return results


if __name__ == '__main__':
    main()
