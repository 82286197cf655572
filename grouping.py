"""Which classes go to which division: the authors' seeded shuffle, or groups chosen from a confusion matrix.

Pure functions of class counts, sizes and matrices (NumPy only); `splite_dataset.py` turns their groups into
sub-datasets. A group is a sorted list of global class ids; group i has `sizes[i]` classes.

- `authors_sizes(C, N)`: the authors' cut, group i = labels[i*C//N:(i+1)*C//N] (10 classes into 4: 2, 3, 2, 3).
- `random_groups(classes, sizes, seed)`: Python's `random.Random(seed).shuffle` of `classes`, cut at the cumulative
  sizes. With classes = range(C), seed 42 and the authors' sizes these are exactly the authors' groups.
- `confusion_groups(matrix, sizes, together)`: groups that keep confusable classes together or spread them apart
  (exact for up to EXACT_LIMIT partitions, e.g. any split of 10 classes; local search beyond).
- `confusion_from_json(obj, num_classes, ...)`: a checked C×C confusion matrix from a `confusion.json` object.
"""
import itertools
import math
import random

import numpy as np

AUTHORS_SEED = 42
STRATEGIES = ('random', 'confusion-together', 'confusion-spread')
CONFUSION_FORMAT = 'devit-confusion'


class GroupingError(ValueError):
    """Bad grouping input (sizes, matrix): the message is printed as one `error: ...` line."""


def authors_sizes(num_classes: int, num_division: int) -> list:
    """Group sizes of the authors' cut: (i+1)*C//N - i*C//N, so the larger groups come where the floors step up."""
    return [(i + 1) * num_classes // num_division - i * num_classes // num_division for i in range(num_division)]


def cut(labels, sizes) -> list:
    """`labels` cut into consecutive runs of `sizes`, each run sorted."""
    bounds = np.cumsum([0, *sizes]).tolist()
    return [sorted(labels[a:b]) for a, b in itertools.pairwise(bounds)]


def random_groups(classes, sizes, seed: int = AUTHORS_SEED) -> list:
    """A private random.Random(seed) shuffles `classes` (same sequence as random.seed + random.shuffle, global state
    untouched); the shuffled list is cut at the cumulative `sizes`."""
    labels = list(classes)
    random.Random(seed).shuffle(labels)
    return cut(labels, sizes)


def affinity(matrix) -> np.ndarray:
    """Symmetrised off-diagonal confusion C + Cᵀ (rows true class, columns predicted), diagonal zero, float64."""
    m = np.asarray(matrix, dtype=np.float64)
    s = m + m.T
    np.fill_diagonal(s, 0.0)
    return s


def within_confusion(matrix, groups) -> float:
    """Fraction of the off-diagonal confusion (C + Cᵀ) between classes of the same group; 0 when there is none."""
    s = affinity(matrix)
    total = s.sum()
    inside = sum(s[np.ix_(g, g)].sum() for g in groups)
    return float(inside / total) if total > 0 else 0.0


EXACT_LIMIT = 200_000  # partitions enumerated exhaustively up to this many (10 classes into 2,3,2,3: 25,200)
RESTARTS = 16


def partition_count(sizes) -> int:
    """Number of ways to fill groups of `sizes` (in that order) with sum(sizes) distinct classes."""
    count = math.factorial(sum(sizes))
    for k in sizes:
        count //= math.factorial(k)
    return count


def _all_labelings(n: int, sizes: list) -> np.ndarray:
    """Every assignment of n classes to groups of `sizes`: rows of group ids, in lexicographic order of choice."""
    out = np.empty((partition_count(sizes), n), dtype=np.int32)
    label = [0] * n
    row = 0

    def fill(g, free):
        nonlocal row
        if g == len(sizes) - 1:
            for c in free:
                label[c] = g
            out[row] = label
            row += 1
            return
        for chosen in itertools.combinations(free, sizes[g]):
            for c in chosen:
                label[c] = g
            fill(g + 1, [c for c in free if c not in chosen])

    fill(0, list(range(n)))
    return out


def _greedy(s: np.ndarray, sizes: list, sign: float, order) -> np.ndarray:
    """Classes in `order` each join the open group where sign·W gains most; ties: the emptiest, then the first."""
    to_group = np.zeros((len(s), len(sizes)))
    group = np.full(len(s), -1)
    fill = [0] * len(sizes)
    for c in order:
        g = max((g for g in range(len(sizes)) if fill[g] < sizes[g]),
                key=lambda g: (sign * to_group[c, g], sizes[g] - fill[g], -g))
        group[c] = g
        fill[g] += 1
        to_group[:, g] += s[:, c]
    return group


def _swap_search(s: np.ndarray, group: np.ndarray, num_groups: int, sign: float) -> np.ndarray:
    """Pairwise swaps between groups that raise sign·W (each class with its best partner), until none does."""
    n = len(s)
    group = group.copy()
    to_group = np.stack([s[:, group == g].sum(axis=1) for g in range(num_groups)], axis=1)
    rows = np.arange(n)
    tol = 1e-9 * max(1.0, float(s.sum()))
    improved = True
    while improved:  # sign·W rises by more than tol at every swap, so this ends
        improved = False
        for a in range(n):
            ga = group[a]
            gain = sign * (to_group[a, group] - 2 * s[a] + to_group[:, ga] - to_group[a, ga] - to_group[rows, group])
            gain[group == ga] = -math.inf
            b = int(np.argmax(gain))
            if gain[b] > tol:
                gb = group[b]
                to_group[:, ga] += s[:, b] - s[:, a]
                to_group[:, gb] += s[:, a] - s[:, b]
                group[a], group[b] = gb, ga
                improved = True
    return group


def _within(s: np.ndarray, group: np.ndarray) -> float:
    return float((s * (group[:, None] == group[None, :])).sum() / 2)


def confusion_groups(matrix, sizes, together: bool) -> list:
    """Partition the classes of a C×C confusion matrix into groups of `sizes`, deterministically.

    Objective W = confusion (C + Cᵀ, off-diagonal) between classes of the same group: together maximises W, spread
    minimises it. Exact (every partition, first best) up to EXACT_LIMIT partitions; beyond, the best of pairwise-swap
    local searches started from a greedy fill (classes by decreasing confusion) and from RESTARTS seeded shuffles.
    """
    s = affinity(matrix)
    n = s.shape[0]
    sizes = [int(k) for k in sizes]
    if sum(sizes) != n or min(sizes, default=0) < 1:
        raise GroupingError(f'group sizes {sizes} do not partition {n} classes')
    sign = 1.0 if together else -1.0
    if partition_count(sizes) <= EXACT_LIMIT:
        labels = _all_labelings(n, sizes)
        i, j = np.triu_indices(n, 1)
        scores = sign * ((labels[:, i] == labels[:, j]) @ s[i, j])
        best = labels[int(np.argmax(scores))]
    else:
        starts = [_greedy(s, sizes, sign, np.argsort(-s.sum(axis=1), kind='stable'))]
        starts += [np.repeat(np.arange(len(sizes)), sizes)[random_order(n, r)] for r in range(RESTARTS)]
        found = [_swap_search(s, g, len(sizes), sign) for g in starts]
        best = max(found, key=lambda g: sign * _within(s, g))  # max keeps the first of equals
    return [sorted(np.flatnonzero(best == g).tolist()) for g in range(len(sizes))]


def random_order(n: int, seed: int) -> np.ndarray:
    labels = list(range(n))
    random.Random(seed).shuffle(labels)
    return np.asarray(labels)


def confusion_from_json(obj, num_classes: int, source: str, dataset: str | None = None,
                        class_names: list | None = None) -> np.ndarray:
    """The C×C matrix of a confusion.json object, checked: square, C = num_classes, finite, non-negative numbers.

    When the object names its dataset or class names, they must be `dataset` / `class_names`.
    """
    if not isinstance(obj, dict) or 'matrix' not in obj:
        raise GroupingError(f'confusion matrix {source} is not a confusion.json object with a "matrix"')
    rows = obj['matrix']
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise GroupingError(f'confusion matrix {source}: "matrix" must be a list of rows')
    n = len(rows)
    for i, r in enumerate(rows):
        if len(r) != n:
            raise GroupingError(f'confusion matrix {source} is not square: row {i} has {len(r)} entries, '
                                f'expected {n}')
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r):
            raise GroupingError(f'confusion matrix {source}: row {i} has an entry that is not a number')
    if obj.get('classes') is not None and obj['classes'] != n:
        raise GroupingError(f'confusion matrix {source} says "classes": {obj["classes"]} but its matrix is {n}x{n}')
    if n != num_classes:
        raise GroupingError(f'confusion matrix {source} is {n}x{n} but the dataset has {num_classes} classes')
    m = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(m).all():
        i, j = np.argwhere(~np.isfinite(m))[0]
        raise GroupingError(f'confusion matrix {source} has a non-finite entry ({m[i, j]} at row {i}, column {j})')
    if (m < 0).any():
        i, j = np.argwhere(m < 0)[0]
        raise GroupingError(f'confusion matrix {source} has a negative entry ({m[i, j]:g} at row {i}, column {j})')
    if dataset is not None and obj.get('dataset') not in (None, dataset):
        raise GroupingError(f'confusion matrix {source} is of dataset {obj["dataset"]}, not {dataset}')
    if class_names is not None and obj.get('class_names') not in (None, list(class_names)):
        raise GroupingError(f'confusion matrix {source} names other classes than the dataset '
                            f'({obj["class_names"][:3]}... vs {list(class_names)[:3]}...)')
    return m
