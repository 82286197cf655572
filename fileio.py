"""Files written whole or not at all, JSON files read with one clear error, and the generated blocks of the docs: the
standard library only (Python 3.6+), so that the device side (jetson/, collab/) and the training side share them.

A write goes to a temp file ``.NAME.*.tmp`` in the same folder, is flushed to disk, then renamed over ``path``: a
reader sees the old file or the new one, never half of one, and a failed write leaves the old file as it was.
"""
import json
import os
import re
import tempfile
import textwrap


class UsageError(ValueError):
    """Bad input the user can fix that argparse alone cannot detect: a path, a file's content, a combination of
    flags (every script reports it as one ``error:`` line, exit code 2)."""


class DatasetError(UsageError):
    """A dataset path, file or argument is wrong; the message names what and where."""


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


# Generated blocks of the docs: a table a script makes from its result files sits in a markdown page between
#     <!-- generated NAME: COMMAND -->
#     <!-- end generated NAME -->
# (each marker on a line of its own); COMMAND is what regenerates it, NAME tells a page's blocks apart.
BLOCK_BEGIN = re.compile(r'^<!-- generated (?P<name>[A-Za-z0-9_.-]+): (?P<command>\S.*?) -->$')
BLOCK_END = re.compile(r'^<!-- end generated (?P<name>[A-Za-z0-9_.-]+) -->$')


def wrap_markdown(text, width=120):
    """Lines of at most ``width`` characters, never breaking inside a `code span`."""
    words = text.replace('\n', ' ').split(' ')
    glued, span = [], None  # words of one code span joined by NUL, so textwrap keeps them on one line
    for word in words:
        span = word if span is None else span + '\0' + word
        if span.count('`') % 2 == 0:
            glued.append(span)
            span = None
    glued += [span] if span is not None else []
    return textwrap.fill(' '.join(glued), width, break_long_words=False, break_on_hyphens=False).replace('\0', ' ')


def generated_blocks(text, where='the text'):
    """{name: (command, body lines, begin line index, end line index)} of the generated blocks of markdown ``text``;
    a marker without its partner, a block inside another or a name used twice is a ``UsageError``."""
    blocks, open_name, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        begin, end = BLOCK_BEGIN.match(line), BLOCK_END.match(line)
        if begin:
            if open_name is not None:
                raise UsageError(f'{where}, line {i + 1}: block {begin["name"]!r} begins inside block {open_name!r}')
            if begin['name'] in blocks:
                raise UsageError(f'{where}, line {i + 1}: a second generated block named {begin["name"]!r}')
            open_name, command, start = begin['name'], begin['command'], i
        elif end:
            if end['name'] != open_name:
                raise UsageError(f'{where}, line {i + 1}: "end generated {end["name"]}" closes no open block of '
                                 f'that name')
            blocks[open_name] = (command, lines[start + 1:i], start, i)
            open_name = None
        elif line.startswith('<!-- generated') or line.startswith('<!-- end generated'):
            raise UsageError(f'{where}, line {i + 1}: malformed block marker {line!r}')
    if open_name is not None:
        raise UsageError(f'{where}: block {open_name!r} has no "<!-- end generated {open_name} -->" line')
    return blocks


def replace_blocks(edits):
    """``edits``: {path: {block name: markdown body}}. Every page is read and every block found first, so a missing
    block (``UsageError``, naming page and block) changes no page; then each page is rewritten atomically with only
    those blocks' bodies replaced, the rest kept byte for byte."""
    pages = {}
    for path, bodies in edits.items():
        with open(path, encoding='utf-8') as f:
            text = f.read()
        blocks = generated_blocks(text, path)
        for name in bodies:
            if name not in blocks:
                raise UsageError(f'{path} has no generated block {name!r}: add the lines '
                                 f'"<!-- generated {name}: COMMAND -->" and "<!-- end generated {name} -->" where it '
                                 f'belongs')
        lines = text.splitlines(keepends=True)
        for name in sorted(bodies, key=lambda n: -blocks[n][2]):  # from the last block up: earlier indices hold
            _, _, begin, end = blocks[name]
            body = bodies[name].rstrip('\n')
            lines[begin + 1:end] = [line + '\n' for line in body.split('\n')] if body.strip() else []
        pages[path] = ''.join(lines)
    for path, text in pages.items():
        mode = os.stat(path).st_mode & 0o777
        write_text_atomic(path, text)
        os.chmod(path, mode)  # the page keeps its permissions (the temp file had the owner's only)


def replace_block(path, name, body):
    """Put ``body`` (markdown) between the markers of the generated block ``name`` of the file ``path``, atomically
    (``replace_blocks`` for one block)."""
    replace_blocks({path: {name: body}})


def append_log(path, record):
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def check_writable_dir(path):
    """Fail before training when the output folder cannot be written (read-only disk, permissions)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-probe-', dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f'output folder {path} is not writable: {err.strerror}') from None
