"""datasets.py: every reader on real Fashion-MNIST or on tiny fixtures written in the real on-disk formats."""
import os
import pickle
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data_transforms
import datasets
from datasets import build_dataset
from fileio import DatasetError

# --- fixture writers (also used by test_split.py) ----------------------------------------------------------------


def class_colour(k: int) -> int:
    """Grey level that encodes class k in fixture images, so a test can check an image against its label."""
    return 10 + 20 * k


def colour_to_class(img: torch.Tensor) -> int:
    """Inverse of class_colour for a tiny-transform tensor (ImageNet normalisation, any channel count)."""
    mean, std = data_transforms.default_mean_std(img.shape[0])
    grey = float((img[0].mean() * std[0] + mean[0]) * 255)
    return round((grey - 10) / 20)


def write_image(path, k: int, size=(8, 8), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, (class_colour(k),) * 3).save(path, fmt)


def write_image_folder(root, class_names, n_train=2, n_val=1, ext='.png'):
    """ImageFolder tree root/{train,val}/<class>/<i>.png; class k's images have grey class_colour(k)."""
    for split, n in (('train', n_train), ('val', n_val)):
        for k, name in enumerate(class_names):
            for i in range(n):
                write_image(os.path.join(root, split, name, f'{i}{ext}'), k)
    return str(root)


def write_cifar100(root, num_classes=100, n_train=2, n_test=1):
    """root/cifar-100-python/{train,test,meta} pickles as torchvision reads them; image colour encodes the class."""
    d = os.path.join(root, 'cifar-100-python')
    os.makedirs(d, exist_ok=True)
    for name, n in (('train', n_train), ('test', n_test)):
        labels = [k for k in range(num_classes) for _ in range(n)]
        data = np.stack([np.full(3 * 32 * 32, class_colour(k % 12), np.uint8) for k in labels])
        with open(os.path.join(d, name), 'wb') as f:
            pickle.dump({'filenames': [f'{i}.png' for i in range(len(labels))], 'batch_label': name,
                         'fine_labels': labels, 'coarse_labels': [k // 5 for k in labels], 'data': data}, f)
    with open(os.path.join(d, 'meta'), 'wb') as f:
        pickle.dump({'fine_label_names': [f'c{k}' for k in range(num_classes)],
                     'coarse_label_names': [f'super{k}' for k in range(num_classes // 5)]}, f)
    return str(root)


def write_flowers(root, labels=(1, 2, 3, 1, 2, 3, 1, 2, 3), trnid=(1, 2, 3), valid=(4, 5, 6), tstid=(7, 8, 9)):
    """root/flowers-102/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat} (labels 1-based, as the real files)."""
    from scipy.io import savemat
    base = os.path.join(root, 'flowers-102')
    for i, lab in enumerate(labels, 1):
        write_image(os.path.join(base, 'jpg', f'image_{i:05d}.jpg'), lab - 1, fmt='JPEG')
    savemat(os.path.join(base, 'imagelabels.mat'), {'labels': np.array([labels], dtype=np.uint8)})
    savemat(os.path.join(base, 'setid.mat'), {k: np.array([v], dtype=np.uint16)
                                              for k, v in (('trnid', trnid), ('valid', valid), ('tstid', tstid))})
    return str(root)


def write_cars(root, class_names=('AM General Hummer SUV 2000', 'Acura RL Sedan 2012', 'BMW M3 Coupe 2012'),
               train_labels=(1, 2, 3, 1), test_labels=(3, 2, 1)):
    """root/stanford_cars/ in torchvision's layout: devkit/{cars_meta,cars_train_annos}.mat, cars_train/,
    cars_test_annos_withlabels.mat, cars_test/ (classes 1-based, as the real files)."""
    from scipy.io import savemat
    base = os.path.join(root, 'stanford_cars')
    fields = [(f, 'O') for f in ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'fname')]
    for folder, annos, labels in (('cars_train', 'devkit/cars_train_annos.mat', train_labels),
                                  ('cars_test', 'cars_test_annos_withlabels.mat', test_labels)):
        records = np.empty((1, len(labels)), dtype=fields)
        for i, lab in enumerate(labels):
            records[0, i] = (0, 0, 7, 7, lab, f'{i + 1:05d}.jpg')
            write_image(os.path.join(base, folder, f'{i + 1:05d}.jpg'), lab - 1, fmt='JPEG')
        os.makedirs(os.path.dirname(os.path.join(base, annos)), exist_ok=True)
        savemat(os.path.join(base, annos), {'annotations': records})
    savemat(os.path.join(base, 'devkit', 'cars_meta.mat'), {'class_names': np.array(class_names, dtype=object)})
    return str(root)


def labels_match_images(ds) -> bool:
    return all(colour_to_class(ds[i][0]) == ds.local_to_global[ds[i][1]] for i in range(len(ds)))


# --- Fashion-MNIST (real files) -----------------------------------------------------------------------------------

@pytest.mark.parametrize('in_chans', [1, 3])
def test_fashion_mnist_tiny_shapes(fmnist_root, in_chans):
    train = build_dataset('fashion_mnist', fmnist_root, 'train', in_chans=in_chans, tiny=True)
    val = build_dataset('fashion_mnist', None, 'val', in_chans=in_chans, tiny=True)  # default path
    assert (len(train), len(val)) == (60000, 10000)
    x, y = train[0]
    assert x.shape == (in_chans, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert train.num_classes == 10 and train.local_to_global == list(range(10))
    assert train.class_names[0] == 'T-shirt/top' and np.bincount(train.targets).tolist() == [6000] * 10
    batch = val.__getitems__([0, 1, 2])
    assert all(torch.equal(batch[i][0], val[i][0]) for i in range(3))  # eval: no randomness, same as one by one
    assert build_dataset('fashion_mnist', fmnist_root, 'val', input_size=32, tiny=True)[0][0].shape == (3, 32, 32)


def test_fashion_mnist_decoded_once_into_cache(fmnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv('DEVIT_CACHE', str(tmp_path))
    datasets._fashion_mnist_arrays.cache_clear()
    before = sorted(os.listdir(fmnist_root))
    try:
        a = build_dataset('fashion_mnist', fmnist_root, 'val', tiny=True)
        cached = sorted(os.listdir(tmp_path / 'idx'))
        assert [c.rsplit('-', 1)[0] for c in cached] == ['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte']
        b = build_dataset('fashion_mnist', fmnist_root, 'val', tiny=True)
        assert a.images.data_ptr() == b.images.data_ptr()  # decoded once per process, shared
    finally:
        datasets._fashion_mnist_arrays.cache_clear()
    assert sorted(os.listdir(fmnist_root)) == before


def test_fashion_mnist_without_a_writable_cache(fmnist_root, tmp_path, monkeypatch):
    (tmp_path / 'file').write_text('')
    monkeypatch.setenv('DEVIT_CACHE', str(tmp_path / 'file'))  # cannot mkdir under a file: decode in memory
    datasets._fashion_mnist_arrays.cache_clear()
    try:
        assert len(build_dataset('fashion_mnist', fmnist_root, 'val', tiny=True)) == 10000
    finally:
        datasets._fashion_mnist_arrays.cache_clear()


def test_fashion_mnist_epoch_is_fast(fmnist_root):
    """The tiny path must feed training much faster than a tiny model trains (a full epoch in a few seconds)."""
    ds = build_dataset('fashion_mnist', fmnist_root, 'train', tiny=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=0)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[1])
    seconds = time.perf_counter() - start
    assert n == 60000 and batch[0].shape[1:] == (3, 28, 28) and batch[1].dtype == torch.int64
    assert n / seconds > 6000, f'{n / seconds:.0f} images/s'


@pytest.mark.parametrize('in_chans', [1, 3])
def test_deit_transforms(fmnist_root, in_chans):
    args = SimpleNamespace(aa='rand-m9-mstd0.5-inc1', color_jitter=0.3, train_interpolation='bicubic', reprob=0.25,
                           remode='pixel', recount=1)
    for split in ('train', 'val'):
        ds = build_dataset('fashion_mnist', fmnist_root, split, input_size=224, in_chans=in_chans, args=args)
        assert ds[0][0].shape == (in_chans, 224, 224)
    assert build_dataset('fashion_mnist', fmnist_root, 'train')[0][0].shape == (3, 28, 28)  # native: pad + crop


def test_randaugment_top_magnitude_posterize_works():
    """timm's RandAugment posterizes to 0 bits at magnitude 10, which Pillow >= 13 refuses: our transforms' ops take
    data_transforms.posterize, timm's own table is left alone."""
    from timm.data import auto_augment
    transform = data_transforms.build_transform(True, 32, 3)
    ops = [op for step in transform.transforms for op in getattr(step, 'ops', ())]
    posterize_ops = [op for op in ops if op.name.startswith('Posterize')]
    assert posterize_ops and all(op.aug_fn is data_transforms.posterize for op in posterize_ops)
    assert auto_augment.NAME_TO_OP['PosterizeIncreasing'] is auto_augment.posterize  # no global patch
    img = Image.new('RGB', (8, 8), (200, 100, 50))
    top = posterize_ops[0]
    top.prob, top.magnitude, top.magnitude_std = 1.0, 10, 0
    assert top(img).getpixel((0, 0)) == (0, 0, 0)
    top.magnitude = 0
    assert top(img).getpixel((0, 0)) == (192, 96, 48)


def _every_kind(tmp_path, fmnist_root):
    return {'folder': write_image_folder(tmp_path / 'folder', ['a', 'b', 'c']),
            'cifar100': write_cifar100(tmp_path / 'cifar', num_classes=100),
            'flowers': write_flowers(tmp_path / 'flowers'), 'cars': write_cars(tmp_path / 'cars'),
            'fashion_mnist': fmnist_root}


@pytest.mark.parametrize('tiny', [False, True], ids=['deit', 'tiny'])
def test_every_dataset_and_transform_pickles(tmp_path, fmnist_root, tiny):
    """A loader worker (forkserver) receives the dataset and its transform pickled: no local function or lambda may
    hide in them, for any dataset kind, split or recipe."""
    import pickle

    import cli
    import train_subdata
    args = cli.parse_args(train_subdata.get_parser(), [])  # every DeiT default, as the seed's commands run
    for name, root in _every_kind(tmp_path, fmnist_root).items():
        for split in ('train', 'val'):
            for size in (32, 48):  # DeiT's small-image crop and its random-resized crop
                ds = build_dataset(name, root, split, input_size=size, tiny=tiny, args=args)
                clone = pickle.loads(pickle.dumps(ds))
                transform = pickle.loads(pickle.dumps(ds.transform))
                x, y = clone[0]
                assert x.shape == (3, size, size) and y == ds[0][1], (name, split, size)
                if split == 'val':
                    torch.testing.assert_close(x, ds[0][0])  # evaluation: deterministic, the same after pickling
                assert callable(transform)


def test_hflip_mean_and_std_reach_both_recipes():
    from torchvision import transforms
    img = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8) * 30, (8, 1)))  # left dark, right bright
    expected = torch.from_numpy((np.asarray(img, dtype=np.float32) / 255 - 0.5) / 0.25)

    def build(tiny, hflip):
        args = SimpleNamespace(hflip=hflip, mean=[0.5], std=[0.25], aa='none', reprob=0.0, color_jitter=None)
        return data_transforms.build_transform(True, 8, 1, tiny=tiny, args=args)
    for _ in range(8):  # the tiny recipe: exactly to-tensor + normalise without flips, always flipped at 1
        torch.testing.assert_close(build(True, 0.0)(img)[0], expected)
        torch.testing.assert_close(build(True, 1.0)(img)[0], expected.flip(-1))
    for hflip in (0.0, 0.3):  # DeiT's recipe: timm's flip step with that probability, or none
        steps = build(False, hflip).transforms
        flips = [s.p for s in steps if isinstance(s, transforms.RandomHorizontalFlip)]
        assert flips == ([hflip] if hflip else [])
        normalize = next(s for s in steps if isinstance(s, transforms.Normalize))
        assert [float(v) for v in normalize.mean] == [0.5] * 3 and [float(v) for v in normalize.std] == [0.25] * 3
    with pytest.raises(DatasetError, match='--mean has 2 values but the model takes 3'):
        data_transforms.resolve_mean_std([0.1, 0.2], None, 3)
    assert data_transforms.resolve_mean_std([0.5], [0.2], 3) == ((0.5,) * 3, (0.2,) * 3)
    assert data_transforms.resolve_mean_std(None, None, 1) == data_transforms.default_mean_std(1)


# --- ImageFolder ----------------------------------------------------------------------------------------------------

def test_image_folder_natural_order_and_labels(tmp_path):
    names = [str(k) for k in range(1, 13)]
    root = write_image_folder(tmp_path / 'data', names)
    train = build_dataset('folder', root, 'train', tiny=True)
    assert train.class_names == names  # '2' before '10'
    assert len(train) == 24 and train[0][0].shape == (3, 224, 224)
    small = build_dataset('folder', root, 'val', tiny=True, input_size=8, in_chans=1)
    assert small[0][0].shape == (1, 8, 8) and len(small) == 12 and labels_match_images(small)
    assert build_dataset('imagenet', root, 'val', tiny=True, input_size=8).num_classes == 12
    assert build_dataset('IMNET', root, 'val', input_size=32)[0][0].shape == (3, 32, 32)  # DeiT eval transform


def test_natural_key():
    assert sorted(['10', '2', '1', 'b', 'a10', 'a9'], key=datasets.natural_key) == ['1', '2', '10', 'a9', 'a10', 'b']
    assert sorted(['n01440764', 'n01443537'], key=datasets.natural_key) == ['n01440764', 'n01443537']


def test_corrupt_image_names_the_file(tmp_path):
    root = write_image_folder(tmp_path / 'data', ['a', 'b'])
    bad = tmp_path / 'data' / 'train' / 'b' / '1.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    ds = build_dataset('folder', root, 'train', tiny=True)
    idx = ds.files.index(str(bad))
    with pytest.raises(DatasetError, match=str(bad)):
        ds[idx]
    with pytest.raises(DatasetError, match='empty file'):
        (tmp_path / 'empty.png').touch()
        datasets.check_image_file(str(tmp_path / 'empty.png'))
    datasets.check_image_file(ds.files[0])


# --- CIFAR-100, Flowers102, StanfordCars in their torchvision formats --------------------------------------------

def test_cifar100_pickles(tmp_path, monkeypatch):
    root = write_cifar100(tmp_path, num_classes=12)
    train = build_dataset('cifar100', root, 'train', tiny=True)
    val = build_dataset('cifar100', os.path.join(root, 'cifar-100-python'), 'val', tiny=True, in_chans=1)
    assert (len(train), len(val), train.num_classes) == (24, 12, 12)
    assert train[0][0].shape == (3, 32, 32) and val[0][0].shape == (1, 32, 32)
    assert train.class_names[:2] == ['c0', 'c1'] and labels_match_images(train) and labels_match_images(val)
    # Same samples as torchvision's reader, which refuses the fixture only for its md5.
    from torchvision.datasets import CIFAR100
    monkeypatch.setattr(CIFAR100, '_check_integrity', lambda self: True)
    monkeypatch.setattr(CIFAR100, '_load_meta', lambda self: None)
    tv = CIFAR100(str(root), train=True)
    assert tv.targets == train.targets.tolist()
    assert np.array_equal(tv.data, train.images.permute(0, 2, 3, 1).numpy())


def test_cifar100_image_folder(tmp_path):
    root = write_image_folder(tmp_path, ['apple', 'bee'], n_train=1, n_val=1)
    ds = build_dataset('cifar100', root, 'val', tiny=True)
    assert ds.class_names == ['apple', 'bee'] and ds[0][0].shape == (3, 32, 32) and labels_match_images(ds)


def test_flowers102_files(tmp_path, monkeypatch):
    root = write_flowers(tmp_path)
    train = build_dataset('flowers', root, 'train', tiny=True, input_size=8)
    val = build_dataset('flowers', os.path.join(root, 'flowers-102'), 'val', tiny=True, input_size=8)
    assert (len(train), len(val), train.num_classes) == (6, 3, 3)  # train = trnid + valid, val = tstid
    assert train.class_names == ['pink primrose', 'hard-leaved pocket orchid', 'canterbury bells']
    assert labels_match_images(train) and labels_match_images(val)
    from torchvision.datasets import Flowers102
    monkeypatch.setattr(Flowers102, '_check_integrity', lambda self: True)
    tv = Flowers102(str(root), split='test')
    assert [str(f) for f in tv._image_files] == val.files and tv._labels == val.targets.tolist()


def test_stanford_cars_files(tmp_path):
    root = write_cars(tmp_path)
    train = build_dataset('cars', root, 'train', tiny=True, input_size=8)
    val = build_dataset('cars', os.path.join(root, 'stanford_cars'), 'val', tiny=True, input_size=8)
    assert (len(train), len(val), train.num_classes) == (4, 3, 3)
    assert train.class_names[1] == 'Acura RL Sedan 2012'
    assert labels_match_images(train) and labels_match_images(val)
    from torchvision.datasets import StanfordCars
    tv = StanfordCars(str(root), split='test')
    assert [s for s, _ in tv._samples] == val.files and [t for _, t in tv._samples] == val.targets.tolist()


# --- errors ---------------------------------------------------------------------------------------------------------

def test_clear_errors(tmp_path, fmnist_root):
    with pytest.raises(DatasetError, match='unknown dataset'):
        build_dataset('mnist', str(tmp_path), 'train')
    with pytest.raises(DatasetError, match=f'{tmp_path / "nope"} does not exist'):
        build_dataset('folder', str(tmp_path / 'nope'), 'train')
    with pytest.raises(DatasetError, match='has no split.json; run splite_dataset.py first'):
        build_dataset('fashion_mnist', fmnist_root, 'train', division=0)
    with pytest.raises(DatasetError, match='unknown split'):
        build_dataset('fashion_mnist', fmnist_root, 'training')
    with pytest.raises(DatasetError, match='cifar-100-python'):
        build_dataset('cifar100', str(tmp_path), 'train')
    with pytest.raises(DatasetError, match='no val/'):
        os.makedirs(tmp_path / 'tree' / 'train' / 'a')
        build_dataset('folder', str(tmp_path / 'tree'), 'val')
    assert issubclass(DatasetError, ValueError)
