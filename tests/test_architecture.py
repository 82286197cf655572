"""The repository's layers (docs/architecture.md): import-linter's contracts (.importlinter) hold, a violation breaks
them, the top-level modules' own imports (which import-linter cannot take as roots: it builds its graph from
packages) point down the same layers, no module passes 600 lines, and the project's own entry points stay thin."""
import ast
import configparser
import glob
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

CONFIG = os.path.join(ROOT, '.importlinter')
LINT = os.path.join(os.path.dirname(sys.executable), 'lint-imports')
# The project's own entry points: argument parsing and one call into a package (python -m forms need no file here).
ENTRY_POINTS = ('collab_infer.py', 'export_onnx.py', 'plan.py', 'shrink.py', 'demo_report.py')
MAX_LINES = 600
MAX_ENTRY_LINES = 60


def lint(cwd):
    return subprocess.run([LINT, '--no-cache', '--config', os.path.join(cwd, '.importlinter')], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def layers():
    """[{module names}] of the layers contract, top layer first (parentheses: optional layers, as import-linter)."""
    cfg = configparser.ConfigParser()
    cfg.read(CONFIG)
    rows = [r for r in cfg['importlinter:contract:layers']['layers'].splitlines() if r.strip()]
    return [{name.strip().strip('()') for name in row.replace('|', ':').split(':')} for row in rows]


def top_level_modules():
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, '*.py')))


def imported_roots(path):
    """The first component of every module `path` imports (at any depth of the file, as import-linter counts)."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split('.')[0]


def test_import_contracts_hold():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'Contracts: 4 kept, 0 broken.' in proc.stdout, proc.stdout


@pytest.mark.parametrize('violation', [
    ('models/stats.py', 'import collab.host.modes  # noqa\n', 'models/ imports neither training nor deployment'),
    ('collab/wire.py', 'import torch  # noqa\n', 'The board side'),
    ('collab/dispatch.py', 'import collab.host.service  # noqa\n', 'No import circles'),
    ('models/features.py', 'import datasets, utils  # noqa\n', 'Layers only point down'),
])
def test_an_upward_import_breaks_a_contract(tmp_path, violation):
    """Each contract can fail: one upward import added to a copy of the packages breaks the contract named."""
    path, line, contract = violation
    for package in ('bench', 'collab', 'jetson', 'models'):
        shutil.copytree(os.path.join(ROOT, package), tmp_path / package,
                        ignore=shutil.ignore_patterns('__pycache__', '*.json', '*.md'))
    shutil.copy(CONFIG, tmp_path / '.importlinter')
    with open(tmp_path / path, 'a') as f:
        f.write(line)
    proc = lint(str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Broken contracts' in proc.stdout and contract in proc.stdout.split('Broken contracts')[1], proc.stdout


def test_every_top_level_module_has_a_layer():
    placed = set().union(*layers()) | {m[:-3] for m in ENTRY_POINTS}
    assert set(top_level_modules()) <= placed, sorted(set(top_level_modules()) - placed)


def test_top_level_modules_import_only_down():
    """The layers contract applied to the top-level modules: none imports a module of a layer above its own (an
    entry point sits above every layer)."""
    table = layers()
    rank = {name: i for i, row in enumerate(table) for name in row}
    wrong = []
    for module in top_level_modules():
        own = -1 if f'{module}.py' in ENTRY_POINTS else rank[module]
        for root in set(imported_roots(os.path.join(ROOT, f'{module}.py'))):
            if root in rank and rank[root] < own:
                wrong.append(f'{module} (layer {own}) imports {root} (layer {rank[root]})')
    assert not wrong, wrong


def test_no_module_passes_600_lines():
    files = [p for p in glob.glob(os.path.join(ROOT, '**', '*.py'), recursive=True)
             if not os.path.relpath(p, ROOT).startswith(('tests', '.venv', 'output'))]
    assert len(files) > 50
    long = {os.path.relpath(p, ROOT): n for p in files if (n := sum(1 for _ in open(p, encoding='utf-8'))) > MAX_LINES}
    assert not long, long


def test_entry_points_are_thin():
    for name in ENTRY_POINTS:
        with open(os.path.join(ROOT, name), encoding='utf-8') as f:
            lines = f.read().splitlines()
        assert len(lines) <= MAX_ENTRY_LINES, (name, len(lines))
        code = [r for r in lines[lines.index('"""', 1) + 1:] if r.strip()] if '"""' in lines[1:] else lines
        calls = [r for r in code if not r.startswith(('import ', 'from ', 'if __name__'))]
        assert len(calls) <= 2, (name, calls)  # the one call under `if __name__ == '__main__':`
