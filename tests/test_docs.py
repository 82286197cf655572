"""The docs say what the repository holds: links resolve, named files exist, generated tables are well formed and
match what their commands make from the committed inputs.

Which markdown: every *.md of the repository that git does not ignore (README.md, docs/, collab/, jetson/, bench/).

What is checked, outside fenced code blocks:
- links: every ``[text](target)`` and ``![alt](target)`` without a scheme names a file or folder that exists,
  relative to the page; ``#anchor`` (alone or after a .md target) names a heading of that page (GitHub's slugs).
- paths in backticks: an inline code span of one token with no placeholder characters (``{}<>*$[]|=~``, ``...``),
  not starting with ``.``, ``/`` or ``-``, after dropping a pytest node id (``::name``) is a path claim when
  (a) it contains ``/`` and its first segment is an entry of the repository root or of the page's folder, or
  (b) it has no ``/`` and ends in .py, .sh, .md or .yaml (a bare source file: at the root, in the page's folder, or
  a test module in tests/). A claim must exist, unless git ignores it (run outputs such as output/ and the quick
  benchmark files) or it is one of WRITTEN_BY_COMMANDS. A node id names a function of that test file (``::name``
  right after another span refers to the last file named on the line).
- README.md: at most 150 lines of at most 120 characters.
- generated blocks (fileio.generated_blocks): each begin has its end, names are unique per page, and the command of
  each names a script or module that exists.
"""
import io
import os
import re
import shlex
import shutil
import struct
import subprocess

import pytest
from helpers import ROOT

import fileio
from fileio import UsageError

# Result files a documented command writes, named in the docs before a run has made them.
WRITTEN_BY_COMMANDS = {
    'bench/links.json': 'sudo python bench/links_bench.py --json bench/links.json',
}
SOURCE_EXTENSIONS = ('.py', '.sh', '.md', '.yaml')
PLACEHOLDER = re.compile(r'[{}<>*$\[\]|=~]|\.\.\.')
LINK = re.compile(r'!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
CODE_SPAN = re.compile(r'(`+)(.+?)\1')


def markdown_files():
    out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z', '--', '*.md'],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0:
        files = [f for f in out.stdout.split('\0') if f]
    else:  # not a git checkout: every *.md outside the usual ignored folders
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, names in os.walk(ROOT)
                 for f in names if f.endswith('.md')
                 if not (set(os.path.relpath(d, ROOT).split(os.sep)) & {'.venv', 'output', '.git', '.pytest_cache'})]
    return sorted(f for f in files if os.path.isfile(os.path.join(ROOT, f)))


def ignored(paths):
    """The subset of repository-relative ``paths`` that git ignores."""
    if not paths:
        return set()
    out = subprocess.run(['git', 'check-ignore', '--no-index', '--stdin'], cwd=ROOT, input='\n'.join(paths),
                         capture_output=True, text=True)
    return set(out.stdout.split()) if out.returncode in (0, 1) else set()


def prose_lines(text):
    """(line number, line) of the lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(('```', '~~~')):
            fence = stripped[:3]
        elif fence is not None and stripped.startswith(fence):
            fence = None
        elif fence is None:
            yield number, line


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to -."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(path):
    with open(path, encoding='utf-8') as f:
        return {slug(line.lstrip('#')) for _, line in prose_lines(f.read()) if re.match(r'#{1,6} ', line)}


PAGES = markdown_files()


def test_the_docs_are_found():
    assert 'README.md' in PAGES and 'docs/results.md' in PAGES and 'docs/benchmarks.md' in PAGES


@pytest.mark.parametrize('page', PAGES)
def test_relative_links_resolve(page):
    folder = os.path.dirname(os.path.join(ROOT, page))
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        text = f.read()
    bad = []
    for number, line in prose_lines(text):
        for target in LINK.findall(CODE_SPAN.sub('', line)):
            if re.match(r'[a-z][a-z0-9+.-]*:', target):  # https:, mailto:, ...
                continue
            file, _, anchor = target.partition('#')
            path = os.path.normpath(os.path.join(folder, file)) if file else os.path.join(ROOT, page)
            if not os.path.exists(path):
                bad.append(f'{page}:{number}: {target} (no {os.path.relpath(path, ROOT)})')
            elif anchor and path.endswith('.md') and anchor not in anchors(path):
                bad.append(f'{page}:{number}: {target} (no heading #{anchor} in {os.path.relpath(path, ROOT)})')
    assert not bad, '\n'.join(bad)


def path_claims(page, text):
    """(line number, repository-relative path or None, node name or None, the span) of every path claim of a page."""
    folder = os.path.dirname(page)
    root_entries, page_entries = set(os.listdir(ROOT)), set(os.listdir(os.path.join(ROOT, folder) or ROOT))
    for number, line in prose_lines(text):
        last = None
        for _, span in CODE_SPAN.findall(line):
            token, _, node = span.partition('::')
            if token == '' and node and last:  # `::test_name` after `tests/test_x.py::other`
                yield number, last, node, span
                continue
            if (not token or re.search(r'\s', span) or PLACEHOLDER.search(token)
                    or token.startswith(('.', '/', '-'))):
                continue
            first = token.split('/')[0]
            if '/' in token:
                if first in root_entries:
                    claim = token
                elif first in page_entries:
                    claim = os.path.join(folder, token)
                else:
                    continue
            elif token.endswith(SOURCE_EXTENSIONS):
                here = [c for c in (token, os.path.join(folder, token), os.path.join('tests', token))
                        if os.path.exists(os.path.join(ROOT, c))]
                claim = here[0] if here else token
            else:
                continue
            last = claim.rstrip('/') if node or claim.endswith('.py') else last
            yield number, claim.rstrip('/'), node or None, span


@pytest.mark.parametrize('page', PAGES)
def test_files_named_in_backticks_exist(page):
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        claims = list(path_claims(page, f.read()))
    skip = ignored([c for _, c, _, _ in claims]) | set(WRITTEN_BY_COMMANDS)
    bad = []
    for number, claim, node, span in claims:
        full = os.path.join(ROOT, claim)
        if claim in skip:
            continue
        if not os.path.exists(full):
            bad.append(f'{page}:{number}: `{span}`: no {claim}')
        elif node:
            with open(full, encoding='utf-8') as f:
                if not re.search(rf'^\s*def {re.escape(node.split("[")[0])}\(', f.read(), re.M):
                    bad.append(f'{page}:{number}: `{span}`: {claim} has no test {node}')
    assert not bad, '\n'.join(bad)


def test_readme_is_short_and_narrow():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        lines = f.read().splitlines()
    assert len(lines) <= 150, f'README.md has {len(lines)} lines (at most 150)'
    wide = [f'README.md:{i}: {len(line)} characters' for i, line in enumerate(lines, 1) if len(line) > 120]
    assert not wide, '\n'.join(wide)


def command_script(command):
    """The repository file a block's command runs: `[ENV=V ...] [sudo] python[3] SCRIPT | -m MODULE | bash SCRIPT`,
    or the script itself."""
    words = [w for w in shlex.split(command) if not re.match(r'\w+=', w) and w != 'sudo']
    if words and words[0] in ('python', 'python3', 'bash', 'sh'):
        words = words[1:]
    if words[:1] == ['-m']:
        base = os.path.join(*words[1].split('.'))
        return next((p for p in (f'{base}.py', os.path.join(base, '__main__.py'))
                     if os.path.isfile(os.path.join(ROOT, p))), f'{base}.py')
    return words[0] if words else ''


@pytest.mark.parametrize('page', PAGES)
def test_generated_blocks_are_well_formed(page):
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        blocks = fileio.generated_blocks(f.read(), page)
    for name, (command, _, _, _) in blocks.items():
        script = command_script(command)
        assert os.path.isfile(os.path.join(ROOT, script)), f'{page}: block {name!r}: {command!r} runs no {script}'


def test_the_generated_blocks_the_scripts_write_exist():
    """Each script's replace_block targets: a block missing from its page would stop that script at its end."""
    expected = {'README.md': {'demo'}, 'docs/results.md': {'demo', 'demo-decct', 'strategies'},
                'docs/benchmarks.md': {'benchmarks', 'links'}, 'docs/shrinking.md': {'shrink', 'shrink-demo'},
                'docs/families.md': {'paper-table'}}
    for page, names in expected.items():
        with open(os.path.join(ROOT, page), encoding='utf-8') as f:
            assert names <= set(fileio.generated_blocks(f.read(), page)), page


# ----------------------------------------------------------------------------------------------------------------
# Generated content that the committed inputs determine: it must match what the command makes now.

def block_body(page, name):
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        return '\n'.join(fileio.generated_blocks(f.read(), page)[name][1])


def test_paper_table_matches_models_stats():
    from models.stats import paper_table

    assert block_body('docs/families.md', 'paper-table') == paper_table().rstrip('\n')


def test_benchmark_rows_match_results_json():
    import json

    from bench import run as bench_run

    with open(os.path.join(ROOT, 'bench', 'results.json')) as f:
        results = json.load(f)
    page = bench_run.markdown(results, {'command': 'c', 'machine': 'm', 'seconds': 0.0, 'load': '?'})
    rows = [line for line in page.splitlines() if line.startswith('| `')]
    body = block_body('docs/benchmarks.md', 'benchmarks').splitlines()
    assert rows and all(row in body for row in rows), 'docs/benchmarks.md: run python bench/run.py --docs-only'


def test_plan_example_in_fleets_matches_plan_py(tmp_path, capsys):
    """docs/fleets.md shows plan.py's output for the estimated Orin and Nano profiles: it must be what plan.py says."""
    from collab.host import plan

    with open(os.path.join(ROOT, 'docs', 'fleets.md'), encoding='utf-8') as f:
        text = f.read()
    command = re.search(r'```bash\n(python plan\.py --devices profiles/.*?)\n```', text, re.S).group(1)
    shown = re.search(r'```text\n(plan: .*?)\n```', text, re.S).group(1)
    argv = shlex.split(command.replace('\\\n', ' '))[2:]
    argv[argv.index('--output') + 1] = str(tmp_path / 'plan.json')
    old = os.getcwd()
    os.chdir(ROOT)  # the profiles' paths as the docs give them
    try:
        plan.main(argv)
    finally:
        os.chdir(old)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith('wrote ') and '\n'.join(printed[:-1]) == shown


def test_testing_page_lists_every_default_of_the_helpers_audit():
    """docs/testing.md shows the audit kept in tests/helpers.py's docstring: every flag of it has its row."""
    import helpers

    entries = [line[2:] for line in helpers.__doc__.splitlines() if line.startswith('- ')]
    flags = {flag for entry in entries for flag in re.findall(r'--[a-z][a-z0-9_-]*', entry.split(':')[0])}
    with open(os.path.join(ROOT, 'docs', 'testing.md'), encoding='utf-8') as f:
        rows = [line for line in f if line.startswith('| ')]
    assert len(flags) >= 10
    missing = sorted(f for f in flags if not any(f'`{f}' in row.split(' | ')[0] for row in rows))
    assert not missing, f'docs/testing.md has no row for {missing} (tests/helpers.py lists them)'


# ----------------------------------------------------------------------------------------------------------------
# fileio.replace_block, and the links figure bench/run.py writes

PAGE = """# Title

Intro text.

<!-- generated one: python demo_report.py --out output/demo --docs -->
old one
<!-- end generated one -->

Between.

<!-- generated two: python bench/run.py -->
old two
line 2
<!-- end generated two -->
Tail without newline"""


def test_replace_block_replaces_only_its_block(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text(PAGE)
    fileio.replace_block(str(page), 'two', '| a | b |\n|---|---|\n| 1 | 2 |\n\n')
    text = page.read_text()
    assert text == PAGE.replace('old two\nline 2\n', '| a | b |\n|---|---|\n| 1 | 2 |\n')
    fileio.replace_block(str(page), 'one', '')
    assert page.read_text() == text.replace('old one\n', '')
    assert sorted(os.listdir(tmp_path)) == ['page.md']  # no temp file left


def test_replace_block_refuses_a_missing_block_and_leaves_the_file(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text(PAGE)
    with pytest.raises(UsageError) as err:
        fileio.replace_block(str(page), 'three', 'new')
    message = str(err.value)
    assert str(page) in message and "'three'" in message and '<!-- generated three: COMMAND -->' in message
    assert '\n' not in message and page.read_text() == PAGE


def test_replace_blocks_changes_every_page_or_none(tmp_path):
    first, second = tmp_path / 'a.md', tmp_path / 'b.md'
    first.write_text(PAGE)
    second.write_text(PAGE.replace('generated two', 'generated other'))
    with pytest.raises(UsageError, match="has no generated block 'two'"):
        fileio.replace_blocks({str(first): {'one': 'new 1', 'two': 'new 2'}, str(second): {'two': 'new'}})
    assert first.read_text() == PAGE  # the first page was fine, but the second's missing block stopped both
    fileio.replace_blocks({str(first): {'one': 'new 1', 'two': 'new 2'}, str(second): {'other': 'new'}})
    assert first.read_text() == PAGE.replace('old one', 'new 1').replace('old two\nline 2', 'new 2')
    assert 'generated other: python bench/run.py -->\nnew\n<!-- end' in second.read_text()


@pytest.mark.parametrize('broken, why', [
    (PAGE.replace('<!-- end generated two -->\n', ''), "'two' has no"),
    (PAGE.replace('old one\n', 'old one\n<!-- generated three: python bench/run.py -->\n'), 'begins inside block'),
    (PAGE.replace('<!-- end generated one -->', '<!-- end generated two -->'), 'closes no open block'),
    (PAGE.replace('generated two:', 'generated one:'), 'a second generated block'),
    (PAGE.replace('<!-- generated two: python bench/run.py -->', '<!-- generated two -->'), 'malformed'),
])
def test_malformed_blocks_are_refused(tmp_path, broken, why):
    page = tmp_path / 'page.md'
    page.write_text(broken)
    with pytest.raises(UsageError, match=why):
        fileio.replace_block(str(page), 'one', 'new')
    assert page.read_text() == broken


def test_replace_block_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way (here: the rename) leaves the page as it was and no temp file."""
    page = tmp_path / 'page.md'
    page.write_text(PAGE)

    def fail(*_):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'replace', fail)
    with pytest.raises(OSError):
        fileio.replace_block(str(page), 'one', 'new body')
    assert page.read_text() == PAGE and sorted(os.listdir(tmp_path)) == ['page.md']


def png_size(data):
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    return struct.unpack('>II', data[16:24])


LINKS = {'what': 'fixture', 'images': {'collab': 4, 'split': 2},
         'rows': [{'link': 'loopback', 'rate': None, 'collab_p50_ms': 88.0, 'layer_split_p50_ms': 500.0, 'ratio': 5.68,
                   'collab_bytes': 608256, 'layer_split_bytes': 1979296},
                  {'link': '20 Mbit/s', 'rate': '20mbit', 'collab_p50_ms': 298.0, 'layer_split_p50_ms': 1250.0,
                   'ratio': 4.19, 'collab_bytes': 608256, 'layer_split_bytes': 1979296}]}


def test_links_figure_and_block(tmp_path):
    import json

    from bench import run as bench_run

    png = bench_run.links_figure(LINKS)
    width, height = png_size(png)
    assert width > 400 and height > 200
    from PIL import Image

    colours = {c for _, c in Image.open(io.BytesIO(png)).convert('RGB').getcolors(maxcolors=1 << 24)}
    assert {(31, 119, 180), (255, 127, 14)} <= colours  # both series drawn (matplotlib's tab:blue and tab:orange)
    with pytest.raises(ValueError, match='no rows'):
        bench_run.links_figure({**LINKS, 'rows': []})

    docs = tmp_path / 'benchmarks.md'
    docs.write_text('# B\n\n<!-- generated links: python bench/run.py --docs-only -->\nold\n'
                    '<!-- end generated links -->\n<!-- generated benchmarks: python bench/run.py -->\n'
                    '<!-- end generated benchmarks -->\n')
    links = tmp_path / 'links.json'
    links.write_text(json.dumps(LINKS))
    readme = tmp_path / 'README.md'
    readme.write_text('<!-- generated drill: python bench/run.py --only serve -->\n<!-- end generated drill -->\n')
    results = tmp_path / 'results.json'
    with open(os.path.join(ROOT, 'bench', 'results.json')) as f:
        recorded = json.load(f)
    drill = {'ratio': 1.0, 'target': 1.0, 'direction': 'min', 'what': 'a drill',
             'table': '| phase | requests |\n|---|---:|\n| before kill | 100 |'}
    results.write_text(json.dumps({**recorded, 'serve_fault_drill': drill}))
    bench_run.write_docs(str(results), docs=str(docs), links_json=str(links), readme=str(readme))
    assert '| before kill | 100 |' in readme.read_text()
    text = docs.read_text()
    assert '| 20 Mbit/s | 298.0 | 1250.0 | 4.19 |' in text and '](links.png)' in text and '\nold\n' not in text
    assert '| `engine_overhead` |' in text
    assert png_size((tmp_path / 'links.png').read_bytes()) == (width, height)


def test_demo_report_writes_its_blocks_and_figure(tmp_path):
    """demo_report.py --docs on a demo folder (the files it reads besides the checkpoints, which build_report has
    already turned into the report): README's five rows, docs/results.md's table, docs/demo.png."""
    import json

    from bench import demo_report

    out = tmp_path / 'output' / 'demo'
    args = {'teacher': {'model': 'deit_tiny_distilled_patch16_224', 'model_kwargs': {'img_size': 28}, 'epochs': 8},
            'stage1': {'model': 'deit_tiny_distilled_patch16_224', 'epochs': 1},
            'stage2': {'model': 'dedeit', 'model_kwargs': {'embed_dim': 64}, 'epochs': 4},
            'stage3': {'model': 'dedeit', 'epochs': 4}, 'baseline': {'model': 'dedeit', 'epochs': 8}}
    for stage, a in args.items():
        folder = out / stage if stage == 'stage3' else out / stage / 'sub-dataset0'
        folder.mkdir(parents=True)
        (folder / 'args.json').write_text(json.dumps(a))
    divisions = [{'index': i, 'classes': c, 'class_names': n, 'val_count': 1000 * len(c)}
                 for i, (c, n) in enumerate([([0, 1], ['T-shirt', 'Trouser']), ([2, 3], ['Pullover', 'Dress'])])]
    (out / 'stage2' / 'split.json').write_text(json.dumps({'dataset': 'fashion_mnist', 'source_path': '/x',
                                                           'num_division': 2, 'divisions': divisions}))
    (out / 'results.png').write_bytes(b'\x89PNG\r\n\x1a\nfigure')
    report = {'teacher_acc': 0.8838, 'ensemble_acc': 0.8728, 'baseline_acc': 0.8639, 'num_division': 2,
              'sub_teacher_acc': [0.95, 0.9], 'student_acc': [0.94, 0.85], 'ensemble_missing_acc': [0.7, 0.8],
              'seconds': 737.0, 'params': {'teacher': 541716, 'sub_teacher': 539910, 'student': 71942,
                                           'ensemble': 354580, 'baseline': 72852},
              'flops': {'teacher': 9870000, 'sub_teacher': 9860000, 'student': 1310000, 'ensemble': 5320000,
                        'baseline': 1310000}}
    root = tmp_path / 'repo'
    (root / 'docs').mkdir(parents=True)
    for page in ('README.md', 'docs/results.md'):
        (root / page).write_text(f'# {page}\n\n<!-- generated demo: python demo_report.py --out output/demo --docs -->'
                                 '\nstale\n<!-- end generated demo -->\nafter\n')
    demo_report.write_docs(report, str(out), root=str(root))
    readme, results = (root / 'README.md').read_text(), (root / 'docs' / 'results.md').read_text()
    assert '`bash demo.sh` (737 s): top-1 on 4,000 fashion_mnist test images' in readme
    assert '| teacher | 88.38 | 541,716 | 9.87M |' in readme
    assert '| students 0 / 1 (own classes) | 94.00 / 85.00 | 71,942 each | 1.31M each |' in readme
    assert '| ensemble with device 0 / 1 missing | 70.00 / 80.00 | | |' in readme
    table = [line for line in readme.splitlines() if line.startswith('|')]
    assert len(table) == 2 + 5 and max(map(len, readme.splitlines())) <= 120  # header, rule, five rows; narrow
    assert '| sub-teacher / student, division 1 (Pullover, Dress) | 90.00 / 85.00 |' in results
    assert 'students `dedeit` embed_dim=64, 4 epochs' in ' '.join(results.split())  # the paragraph is wrapped
    assert 'stale' not in results + readme
    assert readme.endswith('<!-- end generated demo -->\nafter\n')
    assert (root / 'docs' / 'demo.png').read_bytes() == b'\x89PNG\r\n\x1a\nfigure'
    assert '](demo.png)' in results and '](docs/demo.png)' not in readme  # README shows the figure at its top
    # another demo folder: its own block of docs/results.md, README untouched; a missing block is one clear error
    out2 = tmp_path / 'output' / 'demo-decct'
    shutil.copytree(out, out2)
    with pytest.raises(UsageError, match="no generated block 'demo-decct'"):
        demo_report.write_docs(report, str(out2), root=str(root))
    assert (root / 'README.md').read_text() == readme and not (root / 'docs' / 'demo-decct.png').exists()


def test_dropout_table_names_the_worst_device_and_each_heads_cost():
    """bench/dropout_bench.py's block: the summary line is computed from the rows (not fixed text)."""
    from bench import dropout_bench

    rows = [dropout_bench.row('plain', {'all': 86.0, 'missing': [85.0, 80.5, 85.5, 84.0]}),
            dropout_bench.row('`--device-dropout 0.2`', {'all': 85.75, 'missing': [85.0, 84.0, 85.5, 84.5]})]
    report = {'demo': 'output/demo', 'quick': False, 'rows': rows, 'groups': [['a'], ['b', 'c'], ['d'], ['e']],
              'test_images': 10000}
    text = dropout_bench.markdown(report)
    assert 'loses 5.50 points when device 1 (b, c) is missing' in text
    assert '`--device-dropout 0.2`: -0.25 points with every device up, at most 1.75 points lost' in text
    assert '| plain | 86.00 | 85.00 | 80.50 | 85.50 | 84.00 | 83.75 | 80.50 |' in text
