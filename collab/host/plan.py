"""Plan a DeViT decomposition for a fleet of unlike devices: how many classes each device learns, and its student.

    python plan.py --devices d0.json d1.json d2.json d3.json --dataset cifar100 --data_path ./data \\
        --family dedeits --output plan.json [--classes 100] [--backend torch]

The devices are profiles from ``python -m jetson.profile`` (or written by hand: profiles/nano.json, profiles/orin.json),
one per device, in device order: division i goes to device i, which is worker rank i+1 of ``collab_infer.py``. The
plan then drives the pipeline: ``splite_dataset.py --plan plan.json`` cuts the classes as planned and
``distill_sub.py --plan plan.json`` gives division i its planned student (``student_for``); ``ensemble.py`` and
``collab_infer.py`` build the unlike students from their checkpoints as they are.

Predicted latency. Device i with student s costs T_i(s) = compute + transfer: compute is the profile's median
batch-1 latency of s (``--backend``); transfer is one round trip on the device's link plus the image to it and its
tokens back at the link's rate (image: in_chans x size^2 bytes with ``--input-dtype uint8``, 4x that as fp32;
tokens: the candidate's floats, 4 bytes each or 2 with ``--fp16-tokens``); 0 where a profile has no link. The
collaborative latency is max_i T_i (every device works on the same image at once; the aggregator's head is a few
matrix products and is left out).

Capacity rule. The uniform plan is the paper's: the family's own student (``--uniform-width/--uniform-depth``,
default the profiles' ``family_default``, e.g. dedeit 192x12) on every device, the classes cut evenly. Its students
have P_u parameters for at most ceil(C/N) classes each: capacity per class kappa = P_u / ceil(C/N). A planned
student of P parameters may take at most floor(P / kappa) classes, so no student is asked to hold more classes per
parameter than the paper's students do, and a smaller student gets proportionally fewer classes; summed over the
fleet the plan has at least the uniform plan's parameters. Why parameters: all candidates see the same image with
the same patch size, hence the same tokens (as the relation loss against the teacher requires), so MACs are
parameters times tokens plus attention and rank candidates alike; parameters are what a student distils a
sub-teacher's classes into, the quantity the paper's decomposition divides by N. The accuracy the paper reports
was measured at kappa, and a student with at least that much per class has at least as much to learn each of its
classes with; a plan that keeps kappa is therefore expected to keep the uniform plan's accuracy (the demo's
``--devices`` run checks it: within one point of top-1).

Search. Each device may use any profiled candidate that fits its memory (candidate memory_mb <= the profile's
available_mb) and holds at least m = ``--min-classes`` classes (default 2, at most C // N): a division of a single
class gives its sub-teacher nothing to tell apart, and its student only the relation loss to learn from. For a bound
T, device i can take up to cap_i(T) classes: the largest floor(P/kappa) among its candidates with T_i <= T. The
planned latency is the least T (among the predicted latencies) with every cap_i(T) >= m and sum_i cap_i(T) >= C. The
classes are then shared in proportion to cap_i(T) (largest remainders, lowest device first on ties, each device
m..cap_i), so a uniform fleet gets the even split of splite_dataset.py; each device takes the family's own student
where it is within T and holds its classes, else its fastest candidate that holds them. Where the result is not at
least ``--min-gain`` (default 5%) faster than the uniform plan, the uniform plan is kept: a departure from the
paper's plan must buy a predicted gain beyond the noise of the measurements, so a fleet of alike devices always gets
the uniform plan.

Plan schema (``plan.json``, checked by ``read_plan``):

    format "devit-plan", version 1, family, dataset (name or null), num_classes (C), input_size, in_chans,
    backend, input_dtype, fp16_tokens, min_gain, capacity_per_class (kappa, parameters per class), min_classes,
    chosen ("planned", or "uniform" when the plan did not gain ``min_gain``),
    devices: [{index, profile (path), name, num_classes, classes (null: the split chooses which; or a list of
               class ids), model, model_kwargs, width, depth, num_heads, params,
               predicted_ms: {compute, transfer, total}}, ...]   (in device order),
    uniform: {model, model_kwargs, num_classes (list), params, predicted_ms (max over devices),
              devices_ms (each device's total), fits (each device: does its memory hold the student)},
    predicted_ms: the plan's collaborative latency (max over devices).
"""
import argparse
import math

import cli
import fileio
from collab.profiles import BACKENDS, ProfileError, check_field, check_list, read_profile
from fileio import read_json

FORMAT = 'devit-plan'
VERSION = 1
CONSISTENT = ('family', 'model', 'input_size', 'in_chans', 'model_kwargs', 'family_default')
MIN_CLASSES = 2  # per device, where the classes allow (--min-classes)


class PlanError(ValueError):
    """A fleet that cannot be planned, or a plan file that is invalid: printed as one ``error: ...`` line."""


# ---------------------------------------------------------------------------------------------------------------------
# Fleet and options

def load_fleet(paths):
    """The profiles at ``paths``, checked, and checked to describe the same candidates (family, input, kwargs)."""
    if not paths:
        raise PlanError('--devices needs at least one profile')
    profiles = [read_profile(p) for p in paths]
    ref = profiles[0]
    for path, prof in zip(paths[1:], profiles[1:]):
        for key in CONSISTENT:
            if prof[key] != ref[key]:
                raise PlanError(f'profiles disagree on {key}: {paths[0]} has {ref[key]!r}, {path} has {prof[key]!r} '
                                '(profile every device with the same --family, --input-size, --in-chans and '
                                '--model-kwargs)')
    return profiles


def _option(prof, cand, backend, image_bytes, token_bytes):
    """One candidate on one device: its predicted cost and whether it fits the device's memory."""
    link = prof['link']
    transfer = 0.0
    if link is not None:
        bits = 8.0 * (image_bytes + cand['token_floats'] * token_bytes)
        transfer = (link.get('rtt_ms') or 0.0) + bits / (link['mbps'] * 1e3)
    compute = cand['latency_ms'][backend]['median']
    available, need = prof['memory'].get('available_mb'), cand.get('memory_mb')
    return {'width': cand['width'], 'depth': cand['depth'], 'num_heads': cand['num_heads'],
            'params': cand['params'], 'compute': compute, 'transfer': transfer, 'total': compute + transfer,
            'fits': available is None or need is None or need <= available, 'memory_mb': need}


def device_options(prof, backend, image_bytes, token_bytes):
    return [_option(prof, c, backend, image_bytes, token_bytes) for c in prof['candidates']
            if backend in c['latency_ms']]


def share(total, caps, low=1):
    """``total`` classes over devices in proportion to ``caps``, each device low..cap (largest remainders, lowest
    index first on ties)."""
    ideal = [total * c / sum(caps) for c in caps]
    counts = [max(low, min(c, math.floor(x))) for x, c in zip(ideal, caps)]
    while sum(counts) < total:
        i = max((i for i in range(len(caps)) if counts[i] < caps[i]), key=lambda i: (ideal[i] - counts[i], -i))
        counts[i] += 1
    while sum(counts) > total:
        i = min((i for i in range(len(caps)) if counts[i] > low), key=lambda i: (ideal[i] - counts[i], i))
        counts[i] -= 1
    return counts


def even_split(total, n):
    """splite_dataset.py's even class counts."""
    base, extra = divmod(total, n)
    return [base + (i < extra) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# The plan

def make_plan(profiles, paths, num_classes, *, backend='torch', uniform_shape=None, input_dtype='fp32',
              fp16_tokens=False, min_gain=0.05, min_classes=MIN_CLASSES, dataset=None):
    """The plan dict (schema in the module docstring) for ``profiles`` (read from ``paths``) and C classes."""
    n = len(profiles)
    if num_classes < n:
        raise PlanError(f'{n} devices but only {num_classes} classes: every device needs at least one class '
                        '(use fewer devices)')
    if backend not in BACKENDS:
        raise PlanError(f'--backend {backend}: choose from {", ".join(BACKENDS)}')
    ref = profiles[0]
    width_u, depth_u = uniform_shape or (ref['family_default']['width'], ref['family_default']['depth'])
    image_bytes = ref['in_chans'] * ref['input_size'] ** 2 * (1 if input_dtype == 'uint8' else 4)
    token_bytes = 2 if fp16_tokens else 4
    options = [device_options(p, backend, image_bytes, token_bytes) for p in profiles]

    uniform = []
    for path, opts in zip(paths, options):
        match = [o for o in opts if (o.get('width'), o.get('depth')) == (width_u, depth_u)]
        if not match:
            raise PlanError(f'profile {path} has no {backend} timing of the uniform plan\'s student '
                            f'{ref["model"]} {width_u}x{depth_u}: profile that shape too, or choose another with '
                            '--uniform-width/--uniform-depth')
        uniform.append(match[0])
    params_u = {o['params'] for o in uniform}
    if len(params_u) > 1:
        raise PlanError(f'profiles disagree on the parameters of {width_u}x{depth_u}: {sorted(params_u)}')
    per_class = uniform[0]['params'] / math.ceil(num_classes / n)
    low = max(1, min(min_classes, num_classes // n))

    def cap(o):
        return math.floor(o['params'] / per_class + 1e-9)

    usable = []
    for i, (path, prof, opts) in enumerate(zip(paths, profiles, options)):
        ok = [o for o in opts if o['fits'] and cap(o) >= low]
        if not ok:
            raise PlanError(_too_small(i, path, prof, opts, cap, backend, per_class, low))
        usable.append(ok)

    bound, caps = None, None
    for t in sorted({o['total'] for ok in usable for o in ok}):
        caps = [max((cap(o) for o in ok if o['total'] <= t), default=0) for ok in usable]
        if min(caps) >= low and sum(caps) >= num_classes:
            bound = t
            break
    if bound is None:
        raise PlanError(f'the fleet cannot hold {num_classes} classes at the uniform plan\'s capacity of '
                        f'{per_class:,.0f} parameters per class: its largest fitting students hold '
                        f'{sum(caps)} (profile larger candidates, or add devices)')
    counts = share(num_classes, caps, low)
    chosen = []
    for i, ok in enumerate(usable):
        eligible = [o for o in ok if o['total'] <= bound and cap(o) >= counts[i]]
        own = [o for o in eligible if (o['width'], o['depth']) == (width_u, depth_u)]
        chosen.append(own[0] if own else min(eligible, key=lambda o: (o['total'], o['params'])))
    planned_ms = max(o['total'] for o in chosen)

    uniform_counts = even_split(num_classes, n)
    uniform_ms = max(o['total'] for o in uniform)
    uniform_fits = [bool(o['fits']) for o in uniform]
    kept_uniform = all(uniform_fits) and planned_ms > (1.0 - min_gain) * uniform_ms
    if kept_uniform:
        chosen, counts, planned_ms = uniform, uniform_counts, uniform_ms

    def kwargs_of(o):
        return dict(ref['model_kwargs'], embed_dim=o['width'], depth=o['depth'], num_heads=o['num_heads'])

    devices = [{
        'index': i, 'profile': path, 'name': prof['name'], 'num_classes': counts[i], 'classes': None,
        'model': ref['model'], 'model_kwargs': kwargs_of(o), 'width': o['width'], 'depth': o['depth'],
        'num_heads': o['num_heads'], 'params': o['params'],
        'predicted_ms': {'compute': o['compute'], 'transfer': o['transfer'], 'total': o['total']},
    } for i, (path, prof, o) in enumerate(zip(paths, profiles, chosen))]
    return {
        'format': FORMAT, 'version': VERSION, 'family': ref['family'], 'dataset': dataset,
        'num_classes': num_classes, 'input_size': ref['input_size'], 'in_chans': ref['in_chans'],
        'backend': backend, 'input_dtype': input_dtype, 'fp16_tokens': fp16_tokens, 'min_gain': min_gain,
        'capacity_per_class': per_class, 'min_classes': low, 'chosen': 'uniform' if kept_uniform else 'planned',
        'devices': devices,
        'uniform': {'model': ref['model'], 'model_kwargs': kwargs_of(uniform[0]), 'num_classes': uniform_counts,
                    'params': uniform[0]['params'], 'predicted_ms': uniform_ms,
                    'devices_ms': [o['total'] for o in uniform], 'fits': uniform_fits},
        'predicted_ms': planned_ms,
    }


def _too_small(i, path, prof, opts, cap, backend, per_class, low):
    if not opts:
        return f'device {i} ({path}) has no candidate timed with {backend}'
    fitting = [o for o in opts if o['fits']]
    if not fitting:
        smallest = min(opts, key=lambda o: o['memory_mb'] or 0)
        return (f'device {i} ({path}) is too small for any candidate: the smallest needs '
                f'{smallest["memory_mb"]} MB, {prof["memory"]["available_mb"]} MB are available')
    largest = max(fitting, key=lambda o: o['params'])
    return (f'device {i} ({path}) is too small for any candidate: its largest fitting student '
            f'({largest["width"]}x{largest["depth"]}, {largest["params"]:,} parameters) holds fewer than {low} '
            f'class{"es" if low > 1 else ""} at the uniform plan\'s {per_class:,.0f} parameters per class')


# ---------------------------------------------------------------------------------------------------------------------
# Reading a plan, and what the stages take from it

def validate_plan(obj):
    """Check a plan dict (schema in the module docstring); PlanError naming the first bad field."""
    try:
        if not isinstance(obj, dict) or obj.get('format') != FORMAT:
            raise PlanError(f'field format must be {FORMAT!r} (a plan written by plan.py)')
        if check_field(obj, 'version', '', 'int') != VERSION:
            raise PlanError(f'field version must be {VERSION}, got {obj["version"]!r}')
        total = check_field(obj, 'num_classes', '', 'int', positive=True)
        seen = set()
        for i, (where, d) in enumerate(check_list(obj, 'devices')):
            if check_field(d, 'index', where, 'int') != i:
                raise PlanError(f'field {where}.index must be {i} (devices are listed in order)')
            count = check_field(d, 'num_classes', where, 'int', positive=True)
            check_field(d, 'model', where, 'str')
            check_field(d, 'model_kwargs', where, 'dict')
            classes = check_field(d, 'classes', where, 'list', nullable=True, optional=True)
            if classes is not None:
                if len(classes) != count or len(set(classes)) != count:
                    raise PlanError(f'field {where}.classes must list {count} distinct class ids')
                bad = [c for c in classes if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < total]
                if bad:
                    raise PlanError(f'field {where}.classes has ids outside 0..{total - 1}: {bad[:5]}')
                if seen & set(classes):
                    raise PlanError(f'field {where}.classes repeats classes of an earlier device: '
                                    f'{sorted(seen & set(classes))[:5]}')
                seen |= set(classes)
        counts = [d['num_classes'] for d in obj['devices']]
        if sum(counts) != total:
            raise PlanError(f'the devices\' num_classes ({" ".join(map(str, counts))}) sum to {sum(counts)}, '
                            f'not num_classes {total}')
    except ProfileError as err:
        raise PlanError(str(err)) from None
    return obj


def read_plan(plan):
    """A plan dict, checked: ``plan`` is a path to plan.json or a dict already read. PlanError ('plan PATH: ...')."""
    if isinstance(plan, dict):
        return validate_plan(plan)
    obj = read_json(plan, 'plan', PlanError)
    try:
        return validate_plan(obj)
    except PlanError as err:
        raise PlanError(f'plan {plan}: {err}') from None


def student_for(plan, division, model_kwargs=None):
    """(model, model kwargs) of division ``division``'s student: the plan's, with ``model_kwargs`` (explicit
    ``--model-kwargs``) winning key by key."""
    plan = read_plan(plan)
    devices = plan['devices']
    if not 0 <= division < len(devices):
        raise PlanError(f'the plan has {len(devices)} devices; there is no division {division}')
    device = devices[division]
    return device['model'], dict(device['model_kwargs'], **dict(model_kwargs or {}))


def students_for(plan, manifest, model=None, model_kwargs=None):
    """Every division's (model, kwargs), after checking the plan against the split manifest (division count, class
    counts, and the classes where the plan names them) and against ``--model`` (a plan is for one model)."""
    path = plan if isinstance(plan, str) else '<plan>'
    plan = read_plan(plan)
    devices = plan['devices']
    if len(devices) != manifest['num_division']:
        raise PlanError(f'plan {path} has {len(devices)} devices but the split has {manifest["num_division"]} '
                        'divisions (split with splite_dataset.py --plan)')
    for d, div in zip(devices, manifest['divisions']):
        if d['num_classes'] != len(div['classes']):
            raise PlanError(f'plan {path} gives device {d["index"]} {d["num_classes"]} classes but division '
                            f'{d["index"]} of the split has {len(div["classes"])} (split with splite_dataset.py '
                            '--plan)')
        if d.get('classes') is not None and sorted(d['classes']) != sorted(div['classes']):
            raise PlanError(f'plan {path} gives device {d["index"]} classes {sorted(d["classes"])[:8]}, division '
                            f'{d["index"]} of the split has {sorted(div["classes"])[:8]}')
        if model is not None and d['model'] != model:
            raise PlanError(f'--model {model} contradicts plan {path}, whose students are {d["model"]}: pass '
                            f'--model {d["model"]}')
    return [student_for(plan, i, model_kwargs) for i in range(len(devices))]


# ---------------------------------------------------------------------------------------------------------------------
# Table and CLI

def format_table(plan):
    u = plan['uniform']
    lines = [f'plan: {len(plan["devices"])} devices, {plan["num_classes"]} classes, {plan["family"]} at '
             f'{plan["input_size"]}x{plan["input_size"]}x{plan["in_chans"]}, {plan["backend"]} latencies; at least '
             f'{plan["capacity_per_class"]:,.0f} parameters per class (the uniform plan\'s)',
             f'{"dev":>3}  {"name":<18} {"classes":>7}  {"student":<22} {"params":>8}  {"compute":>9} '
             f'{"transfer":>9} {"total ms":>9}  {"uniform ms":>10}']
    for d, u_ms in zip(plan['devices'], u['devices_ms']):
        p = d['predicted_ms']
        student = f'{d["model"]} {d["width"]}x{d["depth"]}/{d["num_heads"]}h'
        lines.append(f'{d["index"]:>3}  {d["name"][:18]:<18} {d["num_classes"]:>7}  {student:<22} '
                     f'{d["params"] / 1e6:>7.2f}M  {p["compute"]:>9.2f} {p["transfer"]:>9.2f} {p["total"]:>9.2f}  '
                     f'{u_ms:>10.2f}')
    uniform = (f'{u["model"]} {u["model_kwargs"]["embed_dim"]}x{u["model_kwargs"]["depth"]} on every device, '
               f'{"/".join(map(str, u["num_classes"]))} classes')
    lines.append(f'predicted collaborative latency: {plan["predicted_ms"]:.2f} ms; uniform plan ({uniform}): '
                 f'{u["predicted_ms"]:.2f} ms; ratio {plan["predicted_ms"] / u["predicted_ms"]:.3f}')
    if plan['chosen'] == 'uniform':
        lines.append(f'kept the uniform plan: no plan is {100 * plan["min_gain"]:.0f}% faster')
    if not all(u['fits']):
        lines.append('the uniform plan\'s student does not fit the memory of device(s) '
                     + ', '.join(str(i) for i, f in enumerate(u['fits']) if not f))
    return '\n'.join(lines)


def count_classes(dataset, data_path):
    import datasets

    return len(datasets.read_samples(dataset, data_path, 'val').class_names)


def get_parser():
    p = argparse.ArgumentParser('DeViT planner for unlike devices', description=__doc__.split('\n\n')[0])
    p.add_argument('--devices', nargs='+', required=True, metavar='PROFILE.json',
                   help='one profile per device, in device order (python -m jetson.profile)')
    p.add_argument('--output', required=True, metavar='PLAN.json')
    p.add_argument('--dataset', default=None, help='the dataset, for its class count (or give --classes)')
    p.add_argument('--data_path', '--data-path', dest='data_path', default=None)
    p.add_argument('--classes', type=cli.positive_int, default=None, help='class count (no data is read)')
    p.add_argument('--family', default=None, help='must match the profiles (default: theirs)')
    p.add_argument('--backend', default='torch', choices=BACKENDS, help='the runtime backend whose latencies count')
    p.add_argument('--uniform-width', type=cli.positive_int, default=None,
                   help="the uniform plan's student width (default: the family's own)")
    p.add_argument('--uniform-depth', type=cli.positive_int, default=None)
    p.add_argument('--input-dtype', default='fp32', choices=['uint8', 'fp32'],
                   help='how the runtime sends the image (collab_infer.py --input-dtype)')
    p.add_argument('--fp16-tokens', action='store_true', help='the runtime sends fp16 tokens')
    p.add_argument('--min-classes', type=cli.positive_int, default=MIN_CLASSES,
                   help='classes each device takes at least (at most classes / devices)')
    p.add_argument('--min-gain', type=cli.non_negative_float, default=0.05,
                   help='keep the uniform plan unless the plan is predicted this much faster (fraction)')
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    profiles = load_fleet(args.devices)
    family = profiles[0]['family']
    if args.family is not None and args.family != family:
        raise PlanError(f'--family {args.family} but the profiles are of family {family}')
    if args.classes is None and args.dataset is None:
        raise PlanError('give --dataset (and --data_path) or --classes: the planner needs the class count')
    num_classes = args.classes if args.classes is not None else count_classes(args.dataset, args.data_path)
    uniform = None
    if args.uniform_width or args.uniform_depth:
        default = profiles[0]['family_default']
        uniform = (args.uniform_width or default['width'], args.uniform_depth or default['depth'])
    plan = make_plan(profiles, args.devices, num_classes, backend=args.backend, uniform_shape=uniform,
                     input_dtype=args.input_dtype, fp16_tokens=args.fp16_tokens, min_gain=args.min_gain,
                     min_classes=args.min_classes, dataset=args.dataset)
    fileio.write_json_atomic(args.output, validate_plan(plan))
    print(format_table(plan))
    print(f'wrote {args.output}')
    return plan

