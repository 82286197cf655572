"""Files written whole or not at all, and JSON files read with one clear error: the standard library only (Python
3.6+), so that the device side (jetson/, collab/) and the training side share them.

A write goes to a temp file ``.NAME.*.tmp`` in the same folder, is flushed to disk, then renamed over ``path``: a
reader sees the old file or the new one, never half of one, and a failed write leaves the old file as it was.
"""
import json
import os
import tempfile


def write_bytes_atomic(path, data):
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename: never half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text):
    write_bytes_atomic(path, text.encode())


def _json_default(value):
    # numpy scalars and 0-d tensors as their Python number, anything else (paths, dtypes) as its text
    try:
        return value.item()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return str(value)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + '\n')


def read_json(path, what, error=ValueError):
    """The JSON object in ``path``; ``error('WHAT PATH: ...')`` when it cannot be read or is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as err:
        raise error(f'{what} {path}: cannot read it: {err.strerror or err}') from None
    except ValueError as err:
        raise error(f'{what} {path}: not valid JSON: {err}') from None
