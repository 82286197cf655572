"""Datasets for every DeViT stage, read from local files only (nothing here downloads).

`build_dataset(name, path, split, ...)` returns a map-style Dataset yielding (C×H×W float tensor, int label) with
`num_classes`, `class_names`, `local_to_global` and `targets`. Sources:

- `folder` (and any name): an ImageFolder tree `path/train/<class>/...`, `path/val/<class>/...` (`test/` accepted for
  `val/`). Classes in natural order ("2" < "10").
- `IMNET`/`imagenet`: an ImageFolder tree.
- `cifar100`: torchvision's python pickles (`cifar-100-python/{train,test,meta}`) or an ImageFolder tree.
- `flowers`: torchvision's Flowers102 files (`flowers-102/jpg/`, `imagelabels.mat`, `setid.mat`) or a tree.
  train = trnid + valid (2,040 images), val = tstid (6,149), the transfer-learning convention DeiT follows.
- `cars`: torchvision's StanfordCars files (`stanford_cars/devkit/...`, `cars_train/`, `cars_test/`) or a tree.
- `fashion_mnist`: the idx files (`*-ubyte` or `*-ubyte.gz`; Debian's `dataset-fashion-mnist` is the default path).

If `path` holds a `split.json` written by `splite_dataset.py`, `division=i` selects that class-disjoint
sub-dataset: labels are 0..k-1 in manifest order and `local_to_global[k]` is the global class id.

The torchvision classes for CIFAR-100 and Flowers102 refuse any file whose md5 differs from the published one, so
small fixtures in the same format would not load; the readers here parse the same formats without that check.
"""
import gzip
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data_transforms import TinyTransform, build_transform, one_thread
from fileio import DatasetError

DATASET_NAMES = ('cifar100', 'IMNET', 'imagenet', 'flowers', 'cars', 'fashion_mnist', 'folder')
_CANONICAL = {'cifar100': 'cifar100', 'imnet': 'imagenet', 'imagenet': 'imagenet', 'flowers': 'flowers',
              'cars': 'cars', 'fashion_mnist': 'fashion_mnist', 'folder': 'folder'}
DATASET_DEFAULT_PATHS = {'fashion_mnist': '/usr/share/datasets/fashion-mnist'}
NATIVE_SIZE = {'fashion_mnist': 28, 'cifar100': 32}  # everything else: 224
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
MANIFEST = 'split.json'
SPLITS = ('train', 'val')

FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot']
# DeiT's defaults for the options read from `args` when a training script does not set them.


def canonical_name(name: str) -> str:
    """'IMNET' and 'imagenet' are one dataset; names are case-insensitive."""
    try:
        return _CANONICAL[str(name).lower()]
    except KeyError:
        raise DatasetError(f'unknown dataset {name!r}; choose one of {", ".join(DATASET_NAMES)}') from None


def natural_key(s: str):
    """Sort key that orders embedded numbers by value: '2' < '10', 'class9' < 'class10'."""
    parts = re.split(r'(\d+)', s)
    return [int(p) if i % 2 else p.lower() for i, p in enumerate(parts)], s


# ---------------------------------------------------------------------------------------------------------------
# Image files: one function opens an image, one checks a header (used by the split before it writes anything).

def load_image(path: str) -> Image.Image:
    """Open an image as RGB; an unreadable or corrupt file raises DatasetError naming it."""
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            return img.convert('RGB')
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f'cannot read image {path}: {e}') from e


_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'GIF87a', b'GIF89a', b'BM', b'II*\x00', b'MM\x00*')


def check_image_file(path: str) -> None:
    """Cheap readability check (open + header): raises DatasetError naming the file.

    A known magic number is enough; anything else goes through PIL's header parser. A file whose header is fine
    but whose data is truncated is only caught when it is decoded (`load_image`).
    """
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
    except OSError as e:
        raise DatasetError(f'cannot read image {path}: {e.strerror or e}') from e
    if head.startswith(_MAGIC) or (head[:4] == b'RIFF' and head[8:12] == b'WEBP'):
        return
    if head[:1] == b'P' and head[1:2] in b'123456':  # PBM/PGM/PPM
        return
    try:
        with Image.open(path):
            pass
    except (OSError, SyntaxError, ValueError) as e:
        reason = 'empty file' if not head else f'not an image ({e})'
        raise DatasetError(f'cannot read image {path}: {reason}') from e


# ---------------------------------------------------------------------------------------------------------------
# Samples: what a reader returns. Either in-memory uint8 images or a list of image files, plus labels.

@dataclass
class Samples:
    """One split of a dataset before transforms.

    images: uint8 N×C×H×W tensor (array formats) or None; files: N image paths or None.
    folder_root: the split's ImageFolder root when `files` came from a tree (the split hard-links those).
    """
    targets: np.ndarray
    class_names: list
    images: torch.Tensor | None = None
    files: list | None = None
    folder_root: str | None = None

    def __len__(self):
        return len(self.targets)

    def select(self, indices, label_map=None) -> 'Samples':
        """Rows `indices`; labels mapped through `label_map` (global id -> local id) when given."""
        indices = np.asarray(indices, dtype=np.int64)
        targets = self.targets[indices]
        if label_map is not None:
            lut = np.full(len(self.class_names), -1, dtype=np.int64)
            for g, k in label_map.items():
                lut[g] = k
            targets = lut[targets]
        return replace(self, targets=targets,
                       images=None if self.images is None else self.images[torch.from_numpy(indices)],
                       files=None if self.files is None else [self.files[i] for i in indices])

    @property
    def storage(self) -> str:
        """How splite_dataset.py materialises a division: 'files' (hard links of a tree) or 'indices'."""
        return 'files' if self.folder_root is not None else 'indices'


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise DatasetError(f'{what} {path} does not exist or is not a directory')
    return path


def _scan_class_dir(class_dir: str) -> list:
    out = []
    for root, dirs, names in os.walk(class_dir, followlinks=True):
        dirs.sort(key=natural_key)
        out.extend(os.path.join(root, n) for n in sorted(names, key=natural_key)
                   if n.lower().endswith(IMG_EXTENSIONS))
    return out


def find_split_dir(path: str, split: str) -> str | None:
    """`path/train`, or `path/val` (`path/test` when there is no val/) for split 'val'; None when absent."""
    names = ['train'] if split == 'train' else ['val', 'test']
    for n in names:
        d = os.path.join(path, n)
        if os.path.isdir(d):
            return d
    return None


def is_image_folder(path: str) -> bool:
    return find_split_dir(path, 'train') is not None and find_split_dir(path, 'val') is not None


def read_image_folder(path: str, split: str, class_names: list | None = None) -> Samples:
    """ImageFolder tree. Classes: `class_names` in that order (a division), else the train/ folders, natural order.

    Files with an image extension are listed; a class with no training image is an error.
    """
    split_dir = find_split_dir(path, split)
    if split_dir is None:
        want = 'train/' if split == 'train' else 'val/ (or test/)'
        raise DatasetError(f'{path} has no {want} folder; an ImageFolder dataset needs train/<class>/ and val/<class>/')
    if class_names is None:
        train_dir = find_split_dir(path, 'train')
        class_names = sorted((e.name for e in os.scandir(train_dir) if e.is_dir()), key=natural_key)
        if not class_names:
            raise DatasetError(f'{train_dir} has no class folders')
        extra = sorted({e.name for e in os.scandir(split_dir) if e.is_dir()} - set(class_names))
        if extra:
            raise DatasetError(f'{split_dir} has class folders missing from {train_dir}: {", ".join(extra[:5])}')
    files, targets = [], []
    for k, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        found = _scan_class_dir(class_dir) if os.path.isdir(class_dir) else []
        if split == 'train' and not found:
            raise DatasetError(f'class folder {class_dir} has no images ({", ".join(IMG_EXTENSIONS)})')
        files.extend(found)
        targets.extend([k] * len(found))
    return Samples(np.asarray(targets, dtype=np.int64), list(class_names), files=files, folder_root=split_dir)


# --- CIFAR-100 python pickles ---------------------------------------------------------------------------------

class _ArraysOnly(pickle.Unpickler):
    """Unpickles containers, strings, numbers and numpy arrays only: a CIFAR file cannot run code when read."""

    ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
               ('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
               ('numpy._core.multiarray', 'scalar'), ('_codecs', 'encode')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'it holds a {module}.{name}, not only arrays and plain values (refused: '
                                         'reading it would run code)')
        return super().find_class(module, name)


def _unpickle(path: str) -> dict:
    try:
        with open(path, 'rb') as f:
            d = _ArraysOnly(f, encoding='latin1').load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f'cannot read CIFAR pickle {path}: {e}') from e
    if not isinstance(d, dict):
        raise DatasetError(f'cannot read CIFAR pickle {path}: it holds a {type(d).__name__}, not a dict')
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_dir(path: str) -> str | None:
    for d in (os.path.join(path, 'cifar-100-python'), path):
        if all(os.path.isfile(os.path.join(d, f)) for f in ('train', 'test', 'meta')):
            return d
    return None


def read_cifar100(path: str, split: str) -> Samples:
    d = _cifar_dir(path)
    if d is None:
        raise DatasetError(f'{path} holds neither cifar-100-python/{{train,test,meta}} nor an ImageFolder tree')
    batch = _unpickle(os.path.join(d, 'train' if split == 'train' else 'test'))
    meta = _unpickle(os.path.join(d, 'meta'))
    try:
        data = np.asarray(batch['data'], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch['fine_labels'], dtype=np.int64)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta['fine_label_names']]
    except (KeyError, ValueError) as e:
        raise DatasetError(f'{d} is not in CIFAR-100 format ({e!r})') from e
    if len(labels) != len(data):
        raise DatasetError(f'{d}: {len(data)} images but {len(labels)} labels')
    return Samples(labels, names, images=torch.from_numpy(data.copy()))


# --- Flowers102 and StanfordCars (.mat annotations + image files) ----------------------------------------------

def _loadmat(path: str) -> dict:
    from scipy.io import loadmat
    try:
        return loadmat(path, squeeze_me=True)
    except (OSError, ValueError, TypeError) as e:
        raise DatasetError(f'cannot read {path}: {e}') from e


def _find_base(path: str, sub: str, marker: str) -> str | None:
    for d in (os.path.join(path, sub), path):
        if os.path.exists(os.path.join(d, marker)):
            return d
    return None


def read_flowers(path: str, split: str) -> Samples:
    from torchvision.datasets import Flowers102
    base = _find_base(path, 'flowers-102', 'setid.mat')
    if base is None:
        raise DatasetError(f'{path} holds neither flowers-102/{{jpg/,imagelabels.mat,setid.mat}} '
                           'nor an ImageFolder tree')
    setid = _loadmat(os.path.join(base, 'setid.mat'))
    labels = np.atleast_1d(_loadmat(os.path.join(base, 'imagelabels.mat'))['labels']).astype(np.int64) - 1
    keys = ('trnid', 'valid') if split == 'train' else ('tstid',)
    ids = np.concatenate([np.atleast_1d(setid[k]).astype(np.int64) for k in keys])
    jpg = _require_dir(os.path.join(base, 'jpg'), 'Flowers102 image folder')
    n = int(labels.max()) + 1
    names = Flowers102.classes[:n] if n <= len(Flowers102.classes) else [str(i + 1) for i in range(n)]
    return Samples(labels[ids - 1], list(names), files=[os.path.join(jpg, f'image_{i:05d}.jpg') for i in ids])


def read_cars(path: str, split: str) -> Samples:
    base = _find_base(path, 'stanford_cars', 'devkit')
    if base is None:
        raise DatasetError(f'{path} holds neither stanford_cars/devkit/ (torchvision layout) nor an ImageFolder tree')
    if split == 'train':
        annos, images = os.path.join(base, 'devkit', 'cars_train_annos.mat'), os.path.join(base, 'cars_train')
    else:
        annos, images = os.path.join(base, 'cars_test_annos_withlabels.mat'), os.path.join(base, 'cars_test')
    _require_dir(images, 'StanfordCars image folder')
    names = [str(n) for n in np.atleast_1d(_loadmat(os.path.join(base, 'devkit', 'cars_meta.mat'))['class_names'])]
    records = np.atleast_1d(_loadmat(annos)['annotations'])
    try:
        files = [os.path.join(images, str(r['fname'])) for r in records]
        labels = np.asarray([int(r['class']) - 1 for r in records], dtype=np.int64)
    except (KeyError, ValueError, IndexError) as e:
        raise DatasetError(f'{annos} is not a StanfordCars annotation file ({e!r})') from e
    return Samples(labels, names, files=files)


# --- Fashion-MNIST idx files -------------------------------------------------------------------------------------

def cache_dir() -> str:
    return os.environ.get('DEVIT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'devit')


def _find_idx(path: str, stem: str, required: bool = True) -> str | None:
    """`stem` or `stem.gz` in path, path/raw or path/FashionMNIST/raw (torchvision's layout)."""
    for d in (path, os.path.join(path, 'raw'), os.path.join(path, 'FashionMNIST', 'raw')):
        for f in (stem, stem + '.gz'):
            if os.path.isfile(os.path.join(d, f)):
                return os.path.join(d, f)
    if required:
        raise DatasetError(f'{path} has no {stem}(.gz); expected the Fashion-MNIST idx files')
    return None


def _gunzip_cached(src: str) -> str | None:
    """Decompress `src` once into the cache (atomically) and return the cached file; `src` is never written.

    None when the cache cannot be written (the caller then decompresses in memory).
    """
    st = os.stat(src)
    tag = hashlib.sha1(f'{os.path.abspath(src)}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:12]
    dst = os.path.join(cache_dir(), 'idx', f'{os.path.basename(src)[:-3]}-{tag}')
    if os.path.isfile(dst):
        return dst
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix='.tmp-')
    except OSError:
        return None
    try:
        with gzip.open(src, 'rb') as fin, os.fdopen(fd, 'wb') as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        os.replace(tmp, dst)
    except (OSError, EOFError) as e:
        os.unlink(tmp)
        raise DatasetError(f'cannot decompress {src}: {e}') from e
    return dst


def _read_idx(src: str, magic: int, ndim: int) -> np.ndarray:
    path = _gunzip_cached(src) if src.endswith('.gz') else src
    if path is None:
        with gzip.open(src, 'rb') as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8)
    else:
        raw = np.fromfile(path, dtype=np.uint8)
    head = raw[:4 + 4 * ndim].view('>u4') if raw.size >= 4 + 4 * ndim else None
    if head is None or head[0] != magic:
        raise DatasetError(f'{src} is not an idx file (magic {magic} expected)')
    shape = tuple(int(s) for s in head[1:])
    body = raw[4 + 4 * ndim:]
    if body.size != int(np.prod(shape)):
        raise DatasetError(f'{src} is truncated: {body.size} bytes for shape {shape}')
    return body.reshape(shape)


@lru_cache(maxsize=8)
def _fashion_mnist_arrays(path: str, split: str):
    prefix = 'train' if split == 'train' else 't10k'
    images = _read_idx(_find_idx(path, f'{prefix}-images-idx3-ubyte'), 2051, 3)
    labels = _read_idx(_find_idx(path, f'{prefix}-labels-idx1-ubyte'), 2049, 1)
    if len(images) != len(labels):
        raise DatasetError(f'{path}: {len(images)} {prefix} images but {len(labels)} labels')
    return torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64)


def read_fashion_mnist(path: str, split: str) -> Samples:
    _require_dir(path, 'Fashion-MNIST folder')
    images, labels = _fashion_mnist_arrays(os.path.abspath(path), split)
    return Samples(labels, list(FASHION_MNIST_CLASSES), images=images)


_READERS = {'cifar100': read_cifar100, 'flowers': read_flowers, 'cars': read_cars,
            'fashion_mnist': read_fashion_mnist}
# Whether the torchvision-format files of a dataset are at `path` (else an ImageFolder tree there is read).
_HAS_NATIVE = {'cifar100': lambda p: _cifar_dir(p) is not None,
               'flowers': lambda p: _find_base(p, 'flowers-102', 'setid.mat') is not None,
               'cars': lambda p: _find_base(p, 'stanford_cars', 'devkit') is not None,
               'fashion_mnist': lambda p: _find_idx(p, 'train-images-idx3-ubyte', required=False) is not None}


def _resolve(name: str, path: str | None, split: str):
    """Canonical name, data path (the default one when empty) and split ('test' means 'val'), checked."""
    name = canonical_name(name)
    path = path or DATASET_DEFAULT_PATHS.get(name)
    if not path:
        raise DatasetError(f'no data path given for dataset {name}')
    split = 'val' if split == 'test' else split
    if split not in SPLITS:
        raise DatasetError(f'unknown split {split!r}; use train or val')
    _require_dir(path, 'data path')
    return name, path, split


def read_samples(name: str, path: str | None, split: str) -> Samples:
    """The full split of a dataset (global labels). An ImageFolder tree is accepted for every name."""
    name, path, split = _resolve(name, path, split)
    if name in _READERS and (_HAS_NATIVE[name](path) or not is_image_folder(path)):
        return _READERS[name](path, split)
    return read_image_folder(path, split)


# ---------------------------------------------------------------------------------------------------------------
# Split manifests (written by splite_dataset.py)

def read_manifest(path: str, required: bool = False) -> dict | None:
    """The split.json in `path` (a split, or a stage output that carries a copy); None when there is none, or a
    DatasetError when `required`."""
    f = os.path.join(path, MANIFEST)
    if not os.path.isfile(f):
        if required:
            raise DatasetError(f'{path} has no {MANIFEST}: give the output folder of splite_dataset.py')
        return None
    try:
        with open(f) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as e:
        raise DatasetError(f'cannot read split manifest {f}: {e}') from e
    if not isinstance(manifest, dict) or not {'dataset', 'source_path', 'divisions'} <= manifest.keys():
        raise DatasetError(f'{f} is not a split manifest written by splite_dataset.py')
    return manifest


def read_division(manifest: dict, path: str, division: int, split: str) -> Samples:
    """Division `division` of the split in `path`: labels 0..k-1 in manifest order, checked against the manifest."""
    n = len(manifest['divisions'])
    if not 0 <= division < n:
        raise DatasetError(f'division {division} is out of range: {path}/{MANIFEST} has {n} divisions (0..{n - 1})')
    div = manifest['divisions'][division]
    sub = os.path.join(path, div.get('path', f'sub-dataset{division}'))
    indices_file = os.path.join(sub, 'indices.json')
    if os.path.isfile(indices_file):
        source = manifest['source_path']
        if not os.path.isdir(source):
            raise DatasetError(f'{path}/{MANIFEST} indexes {source}, which no longer exists; split again')
        try:
            with open(indices_file) as fh:
                indices = np.asarray(json.load(fh)[split], dtype=np.int64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f'cannot read {indices_file} ({e!r}); split again') from e
        full = read_samples(manifest['dataset'], source, split)
        bad = [g for g in div['classes'] if not 0 <= int(g) < len(full.class_names)]
        if bad:
            raise DatasetError(f'{path}/{MANIFEST}: division {division} lists class ids {bad[:5]}, but {source} has '
                               f'{len(full.class_names)} classes; split again')
        if len(indices) and not (0 <= indices.min() and indices.max() < len(full)):
            raise DatasetError(f'{indices_file} holds {split} row numbers outside 0..{len(full) - 1} of {source}; '
                               f'split again')
        label_map = {int(g): k for k, g in enumerate(div['classes'])}
        samples = replace(full.select(indices, label_map), class_names=list(div['class_names']))
    else:
        _require_dir(sub, f'division {division} of split')
        samples = read_image_folder(sub, split, class_names=div['class_names'])
    expected = div.get(f'{split}_count')
    if expected is not None and len(samples) != expected:
        raise DatasetError(f'{sub} has {len(samples)} {split} images but {path}/{MANIFEST} lists {expected}: the '
                           f'split was changed after it was written; split again')
    k = len(div['classes'])
    if len(samples) and not (0 <= samples.targets.min() and samples.targets.max() < k):
        raise DatasetError(f'{sub}: {split} labels fall outside 0..{k - 1} (rows of classes that are not in division '
                           f'{division}); split again')
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Dataset objects

class _Base(Dataset):
    def __init__(self, samples: Samples, local_to_global: list):
        self.targets = samples.targets
        self.class_names = list(samples.class_names)
        self.num_classes = len(self.class_names)
        self.local_to_global = list(local_to_global)

    def __len__(self):
        return len(self.targets)


class ArrayDataset(_Base):
    """Images held in memory as a uint8 N×C×H×W tensor (CIFAR-100, Fashion-MNIST).

    With a TinyTransform, items are pure tensor ops and `__getitems__` (used by DataLoader for a whole batch)
    transforms the batch in one call; otherwise each image goes through PIL and the DeiT transform.
    """

    def __init__(self, samples: Samples, transform: Callable, local_to_global: list):
        super().__init__(samples, local_to_global)
        self.images = samples.images
        self.transform = transform
        self.tensor_transform = transform.transforms[-1] if _is_tiny(transform) else None

    def _pil(self, i):
        a = self.images[i].permute(1, 2, 0).numpy()
        return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert('RGB')

    def __getitem__(self, i):
        if self.tensor_transform is not None:
            return self.tensor_transform(self.images[i]), int(self.targets[i])
        return self.transform(self._pil(i)), int(self.targets[i])

    def __getitems__(self, indices):
        if self.tensor_transform is None:
            return [self[i] for i in indices]
        with one_thread():
            x = self.tensor_transform(self.images[torch.as_tensor(indices, dtype=torch.long)])
        return list(zip(x.unbind(0), self.targets[indices].tolist()))


class FileDataset(_Base):
    """Images read from files (ImageFolder trees, Flowers102, StanfordCars). `self.loader` opens one image.

    skip_bad: an unreadable file is logged once and replaced by the next readable one (so batches keep their size
    and DDP ranks their step count) instead of raising; `skipped_files()` lists them. The flags live in shared
    memory, so DataLoader worker processes report to the main process.
    """

    def __init__(self, samples: Samples, transform: Callable, local_to_global: list, loader: Callable = load_image,
                 skip_bad: bool = False):
        super().__init__(samples, local_to_global)
        self.files = samples.files
        self.transform = transform
        self.loader = loader
        self.bad = multiprocessing.RawArray('b', len(self.files)) if skip_bad else None

    def __getitem__(self, i):
        if self.bad is None:
            return self.transform(self.loader(self.files[i])), int(self.targets[i])
        n = len(self.files)
        for j in (k % n for k in range(i, i + n)):
            if self.bad[j]:
                continue
            try:
                image = self.loader(self.files[j])
            except DatasetError as e:
                self.bad[j] = 1
                print(f'warning: skipping an unreadable image (--skip-bad-images): {e}', file=sys.stderr, flush=True)
                continue
            return self.transform(image), int(self.targets[j])
        raise DatasetError(f'none of the {n} images of this dataset is readable')

    def skipped_files(self) -> list:
        if self.bad is None:
            return []
        return [self.files[j] for j in np.flatnonzero(np.frombuffer(self.bad, dtype=np.int8))]


def _is_tiny(t) -> bool:
    return isinstance(getattr(t, 'transforms', [None])[-1], TinyTransform)


def build_dataset(name: str, path: str | None, split: str, *, division: int | None = None,
                  input_size: int | None = None, in_chans: int = 3, tiny: bool = False, args=None) -> Dataset:
    """Dataset `name` at `path` ('train' or 'val'), or division `division` of a split made by splite_dataset.py.

    Returns a Dataset of (in_chans×S×S float tensor, int label), S = input_size or the native size (28 for
    fashion_mnist, 32 for cifar100, else 224). `args` supplies DeiT's augmentation options (aa, color_jitter,
    train_interpolation, reprob, remode, recount, eval_crop_ratio) and, with a division, `num_division`, which must
    match the manifest. A split folder read with division=None gives the full source dataset with global labels.
    """
    name, path, split = _resolve(name, path, split)
    manifest = read_manifest(path)
    if manifest is not None:
        if canonical_name(manifest['dataset']) != name:
            raise DatasetError(f'{path}/{MANIFEST} is a split of {manifest["dataset"]}, not {name}')
        if division is None:
            samples, l2g = read_samples(name, manifest['source_path'], split), None
        else:
            expected = getattr(args, 'num_division', None)
            if expected is not None and int(expected) != len(manifest['divisions']):
                raise DatasetError(f'{path}/{MANIFEST} has {len(manifest["divisions"])} divisions '
                                   f'but --num_division is {expected}')
            samples = read_division(manifest, path, int(division), split)
            l2g = manifest['divisions'][int(division)]['classes']
    elif division is not None:
        raise DatasetError(f'--data-path {path} has no {MANIFEST}; run splite_dataset.py first')
    else:
        samples, l2g = read_samples(name, path, split), None
    if l2g is None:
        l2g = list(range(len(samples.class_names)))

    size = int(input_size or NATIVE_SIZE.get(name, 224))
    transform = build_transform(split == 'train', size, in_chans, tiny, args)
    if samples.images is not None:
        return ArrayDataset(samples, transform, l2g)
    return FileDataset(samples, transform, l2g, skip_bad=bool(getattr(args, 'skip_bad_images', False)))
