"""Device profiles: the JSON a device's measurements are kept in (``python -m jetson.profile`` writes one, the
planner reads them), its schema and its one reader.

Profile schema (JSON, version 1; human-editable, so a profile can be written by hand for a board one cannot
reach; ``read_profile`` checks it and names the file and the field of any error). Unknown keys are ignored.

    format          "devit-profile"
    version         1
    name            str        the device, in tables and plans
    source          str        how the numbers were obtained: "measured by python -m jetson.profile on HOST ..." or,
                               for a hand-written profile, "estimate from public figures, not a measurement: ..."
    family          str        dedeits | devits | decct (models.stats.FAMILIES)
    model           str        the timm name of the family's student
    model_kwargs    object     kwargs every candidate shares, with img_size and in_chans (embed_dim, depth and
                               num_heads come from each candidate)
    input_size      int        image side the candidates were timed at
    in_chans        int        input channels
    family_default  {"width": int, "depth": int}   the family's own student shape (the uniform plan's default)
    memory          {"total_mb": number|null, "available_mb": number|null}   null: unknown (not checked)
    link            null | {"mbps": number > 0, "rtt_ms": number >= 0 | null, "source": str}   to the aggregator
    cpu_quota       number|null   fraction of a core the timing ran under (null: not throttled)
    cpu_reserve     bool          whether that fraction was also reserved (optional)
    threads         int|null      intra-op threads used
    device          str           cpu, cuda, ...
    candidates      non-empty list of
        width, depth, num_heads   int > 0 (width divisible by num_heads)
        params                    int > 0   parameters of the backbone (no classifier)
        macs                      int > 0 | null   multiply-accumulates per image
        token_floats              int > 0   floats the device sends per image
        memory_mb                 number > 0 | null   what the candidate needs (estimate)
        latency_ms                {BACKEND: {"median": number > 0, "p95": number > 0, "iters": int > 0,
                                  "cpu_median": number >= 0}}: wall-clock ms of a batch-1 forward (iters and
                                  cpu_median, the process's CPU ms per forward, are optional); BACKEND in torch,
                                  onnxruntime; at least one backend
        errors                    optional {BACKEND: str}: why a backend has no timing for this candidate
    system          object (optional): host, platform, versions

Board side: Python 3.6+, the standard library only.
"""
import math

from fileio import read_json

FORMAT = 'devit-profile'
VERSION = 1
BACKENDS = ('torch', 'onnxruntime')
SHAPE_KWARGS = ('embed_dim', 'depth', 'num_heads')


class ProfileError(ValueError):
    """Bad profile input (a flag, a file, a field): the message is printed as one ``error: ...`` line."""



def check_field(obj, key, where, kind, positive=False, nullable=False, optional=False):
    """``obj[key]`` checked to be of ``kind`` ('int', 'number', 'str', 'dict', 'list'); ProfileError naming
    ``where.key`` otherwise. Returns the value (None when nullable/optional and null/absent)."""
    path = f'{where}.{key}' if where else key
    if key not in obj:
        if optional:
            return None
        raise ProfileError(f'missing field {path}')
    value = obj[key]
    if value is None and (nullable or optional):
        return None
    types = {'int': (int,), 'number': (int, float), 'str': (str,), 'dict': (dict,), 'list': (list,)}[kind]
    ok = isinstance(value, types) and not isinstance(value, bool)
    if ok and kind == 'number':
        ok = math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if not ok:
        noun = {'int': 'an integer', 'number': 'a number', 'str': 'a string', 'dict': 'an object',
                'list': 'a list'}[kind]
        raise ProfileError('field {} must be {}{}{}, got {!r}'.format(
            path, noun, ' > 0' if positive else '', ' or null' if nullable else '', value))
    return value


def check_list(obj, key, where=''):
    """(location, item) of every object in the non-empty list ``obj[key]``; ProfileError naming the field when the
    list is missing or empty or an item is not an object."""
    items = check_field(obj, key, where, 'list')
    if not items:
        raise ProfileError(f'field {key} is empty')
    for i, item in enumerate(items):
        location = f'{key}[{i}]'
        if not isinstance(item, dict):
            raise ProfileError(f'field {location} must be an object')
        yield location, item


def validate_profile(obj):
    """Check a profile dict against the schema (module docstring); ProfileError naming the first bad field."""
    if not isinstance(obj, dict):
        raise ProfileError('a profile must be a JSON object')
    if obj.get('format') != FORMAT:
        raise ProfileError('field format must be {!r}, got {!r}'.format(FORMAT, obj.get('format')))
    if check_field(obj, 'version', '', 'int') != VERSION:
        raise ProfileError('field version must be {}, got {!r} (written by a newer jetson.profile?)'.format(
            VERSION, obj['version']))
    for key in ('name', 'source', 'family', 'model'):
        check_field(obj, key, '', 'str')
    check_field(obj, 'model_kwargs', '', 'dict')
    for key in SHAPE_KWARGS:
        if key in obj['model_kwargs']:
            raise ProfileError(f'field model_kwargs must not set {key} (each candidate sets it)')
    check_field(obj, 'input_size', '', 'int', positive=True)
    check_field(obj, 'in_chans', '', 'int', positive=True)
    default = check_field(obj, 'family_default', '', 'dict')
    check_field(default, 'width', 'family_default', 'int', positive=True)
    check_field(default, 'depth', 'family_default', 'int', positive=True)
    memory = check_field(obj, 'memory', '', 'dict')
    check_field(memory, 'total_mb', 'memory', 'number', positive=True, nullable=True)
    check_field(memory, 'available_mb', 'memory', 'number', positive=True, nullable=True)
    link = check_field(obj, 'link', '', 'dict', nullable=True)
    if link is not None:
        check_field(link, 'mbps', 'link', 'number', positive=True)
        rtt = check_field(link, 'rtt_ms', 'link', 'number', nullable=True, optional=True)
        if rtt is not None and rtt < 0:
            raise ProfileError(f'field link.rtt_ms must be >= 0, got {rtt}')
    check_field(obj, 'cpu_quota', '', 'number', positive=True, nullable=True, optional=True)
    check_field(obj, 'threads', '', 'int', positive=True, nullable=True, optional=True)
    seen = set()
    for where, c in check_list(obj, 'candidates'):
        width = check_field(c, 'width', where, 'int', positive=True)
        depth = check_field(c, 'depth', where, 'int', positive=True)
        heads = check_field(c, 'num_heads', where, 'int', positive=True)
        if width % heads:
            raise ProfileError(f'field {where}: width {width} is not divisible by num_heads {heads}')
        if (width, depth) in seen:
            raise ProfileError(f'field {where}: a second candidate of width {width} and depth {depth}')
        seen.add((width, depth))
        check_field(c, 'params', where, 'int', positive=True)
        check_field(c, 'macs', where, 'int', positive=True, nullable=True, optional=True)
        check_field(c, 'token_floats', where, 'int', positive=True)
        check_field(c, 'memory_mb', where, 'number', positive=True, nullable=True, optional=True)
        latency = check_field(c, 'latency_ms', where, 'dict')
        unknown = sorted(set(latency) - set(BACKENDS))
        if unknown:
            raise ProfileError('field {}.latency_ms has unknown backend(s) {} (known: {})'.format(
                where, ', '.join(unknown), ', '.join(BACKENDS)))
        if not latency:
            raise ProfileError(f'field {where}.latency_ms is empty: time at least one backend')
        for backend in latency:
            entry = check_field(latency, backend, where + '.latency_ms', 'dict')
            for key in ('median', 'p95'):
                check_field(entry, key, f'{where}.latency_ms.{backend}', 'number', positive=True)
            check_field(entry, 'iters', f'{where}.latency_ms.{backend}', 'int', positive=True,
                        optional=True)
    return obj


def read_profile(path):
    """The profile at ``path``, checked; ProfileError ('profile PATH: ...') if unreadable or invalid."""
    obj = read_json(path, 'profile', ProfileError)
    try:
        return validate_profile(obj)
    except ProfileError as err:
        raise ProfileError(f'profile {path}: {err}') from None
