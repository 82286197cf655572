"""What every benchmark shares: the verdict of a result against its target, the printed table, and how a benchmark
script run alone ends (`finish`). A result is {"ratio", "target", "what", "direction"} (see bench/run.py)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def verdict(r):
    if r.get('direction') is None or r.get('target') is None:
        return '-'
    ok = r['ratio'] <= r['target'] if r['direction'] == 'max' else r['ratio'] >= r['target']
    return 'pass' if ok else 'FAIL'


def target_text(r):
    if r.get('target') is None:
        return '-'
    return f'{"<=" if r.get("direction") == "max" else ">="} {r["target"]:g}'


def short(text, width):
    return text if len(text) <= width else text[:width - 3] + '...'


def print_table(results):
    print(f'\n{"benchmark":<32} {"ratio":>9} {"target":>9}  {"":4}  what')
    for key, r in results.items():
        print(f'{key:<32} {r["ratio"]:>9.3f} {target_text(r):>9}  {verdict(r):<4}  {short(r["what"], 100)}')


def finish(results, json_path=None):
    """How a benchmark script run alone ends: its table, and its results written to `json_path` (atomically)."""
    print_table(results)
    if json_path:
        sys.path.insert(0, ROOT)
        import fileio  # the repository's (a benchmark script runs with bench/ first on its path)

        fileio.write_json_atomic(json_path, results)
    return results
