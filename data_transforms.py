"""Transforms for every DeViT stage: DeiT's recipe (timm's RandAugment, random erasing, resize + center crop for eval)
or a plain, fast one for tiny CPU runs, and the normalisation a model was trained with.

`build_transform(is_train, input_size, in_chans, tiny, args)` gives a PIL image -> C×H×W float tensor callable that
pickles into DataLoader worker processes (module-level classes and functions only).
"""
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fileio import DatasetError

AUG_DEFAULTS = {'aa': 'rand-m9-mstd0.5-inc1', 'color_jitter': 0.3, 'train_interpolation': 'bicubic', 'reprob': 0.25,
                'remode': 'pixel', 'recount': 1, 'eval_crop_ratio': 0.875, 'hflip': 0.5}


def default_mean_std(in_chans: int):
    """ImageNet statistics (what pretrained teachers expect); their channel average for one channel."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if in_chans == 1:
        return (float(np.mean(IMAGENET_DEFAULT_MEAN)),), (float(np.mean(IMAGENET_DEFAULT_STD)),)
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def resolve_mean_std(mean, std, in_chans: int):
    """The normalisation (mean, std) of an `in_chans`-channel model input, as tuples of floats.

    mean/std: None (ImageNet's, see default_mean_std), one value for every channel, or one per channel.
    """
    defaults = default_mean_std(in_chans)
    out = []
    for name, given, default in (('mean', mean, defaults[0]), ('std', std, defaults[1])):
        values = tuple(float(v) for v in (default if given is None else given))
        if len(values) == 1:
            values = values * in_chans
        if len(values) != in_chans:
            raise DatasetError(f'--{name} has {len(values)} values but the model takes {in_chans} input channel(s): '
                               f'give one value, or one per channel')
        out.append(values)
    return tuple(out)


def recorded_mean_std(train_args, in_chans: int):
    """The normalisation a model was trained with: its checkpoint's recorded `--mean`/`--std` (``train_args``, the
    checkpoint's 'args' as a dict), ImageNet's where it recorded none. Deployment and export feed inputs this way."""
    train_args = train_args or {}
    return resolve_mean_std(train_args.get('mean'), train_args.get('std'), in_chans)


def _to_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """...×C×H×W with C in {1, 3} -> in_chans channels (grey repeated, colour to luma)."""
    c = x.shape[-3]
    if c == in_chans:
        return x
    if c == 1:
        return x.expand(*x.shape[:-3], in_chans, *x.shape[-2:])
    if in_chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
        return (x * w).sum(-3, keepdim=True)
    raise DatasetError(f'cannot map {c} image channels to in_chans={in_chans}')


@contextmanager
def one_thread():
    """Run a batch op on one intra-op thread: on a loaded machine, waking an OpenMP team for each ~100k-element op
    of a batch costs more than the op (measured 20x slower epochs on 2 busy cores)."""
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class TinyTransform:
    """Plain, fast transform on uint8 tensors (C×H×W or B×C×H×W): horizontal flip with probability `hflip` (training
    only), resize, normalise.

    The resize runs only when the image is not already input_size × input_size. Scaling by 1/255 and normalising
    are one fused op, which also broadcasts one grey channel to three.
    """

    def __init__(self, is_train: bool, input_size: int, in_chans: int, mean, std, hflip: float = 0.5):
        self.is_train, self.size, self.in_chans, self.hflip = is_train, input_size, in_chans, hflip
        mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale, self.bias = 1.0 / (255.0 * std), -mean / std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        batched = img.dim() == 4
        x = img if batched else img.unsqueeze(0)
        with one_thread():
            if self.is_train and self.hflip > 0:
                flip = torch.rand(x.shape[0]) < self.hflip
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            x = x.float()
            if x.shape[1] != self.in_chans and self.in_chans == 1:
                x = _to_channels(x, 1)
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode='bilinear', align_corners=False,
                                  antialias=True)
            x = torch.addcmul(self.bias, x, self.scale)
        return x if batched else x[0]


class _ToChannels:
    def __init__(self, in_chans):
        self.in_chans = in_chans

    def __call__(self, x):
        return _to_channels(x, self.in_chans)


def posterize(img, bits_to_keep, **kwargs):
    """timm's posterize op, where 0 bits gives a black image.

    timm's RandAugment asks for 0 bits at the top of its magnitude range (`inc1`, with `mstd` noise, reaches it);
    Pillow >= 13 raises on 0 bits where older Pillow returned a black image, which would kill training at random.
    Only the AugmentOps our own transforms build use this function (see `_allow_zero_bit_posterize`); timm's table is
    left as it is. Module-level, so that a transform holding it pickles into DataLoader worker processes.
    """
    from timm.data import auto_augment
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _allow_zero_bit_posterize(transform):
    """Point the posterize AugmentOps inside `transform` (RandAugment, AutoAugment, AugMix) at `posterize`."""
    from timm.data import auto_augment
    for step in getattr(transform, 'transforms', ()):
        ops = list(getattr(step, 'ops', ()))
        for sub_policy in getattr(step, 'policy', ()):  # AutoAugment: a list of sub-policies, each a list of ops
            ops.extend(sub_policy)
        for op in ops:
            if isinstance(op, auto_augment.AugmentOp) and op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize
    return transform


def build_transform(is_train: bool, input_size: int, in_chans: int = 3, tiny: bool = False, args=None, mean=None,
                    std=None) -> Callable:
    """PIL image -> C×H×W float tensor.

    tiny: TinyTransform. Otherwise DeiT's: train = timm's create_transform (RandAugment `args.aa`, `color_jitter`,
    `train_interpolation`, random erasing `reprob/remode/recount`), eval = resize to input_size/eval_crop_ratio +
    center crop. At 32 px and below, as DeiT, train crops with 4 px padding instead of random-resized crop and eval
    does not rescale (the resize + center crop there only touch images not already input_size, a no-op for
    CIFAR and Fashion-MNIST at their native size). The channel mapping to `in_chans` comes last, so RandAugment
    always sees RGB. Both train transforms flip horizontally with probability `args.hflip` (default 0.5).
    Normalisation: `mean`/`std`, else `args.mean`/`args.std`, else ImageNet's (see resolve_mean_std).
    """
    from timm.data import create_transform  # timm and torchvision load lazily: the split script needs neither
    from torchvision import transforms

    def opt(k):
        return getattr(args, k, AUG_DEFAULTS[k]) if args is not None else AUG_DEFAULTS[k]
    mean = getattr(args, 'mean', None) if mean is None else mean
    std = getattr(args, 'std', None) if std is None else std
    mean, std = resolve_mean_std(mean, std, in_chans)
    if tiny:
        return transforms.Compose([transforms.PILToTensor(),
                                   TinyTransform(is_train, input_size, in_chans, mean, std, hflip=opt('hflip'))])

    # RandAugment and erasing see 3 channels; for in_chans=1 the same statistic on each keeps the luma map exact.
    mean3, std3 = (tuple(mean) * 3, tuple(std) * 3) if len(mean) == 1 else (tuple(mean), tuple(std))
    resize_im = input_size > 32
    if is_train:
        t = create_transform(input_size, is_training=True, hflip=opt('hflip'), color_jitter=opt('color_jitter'),
                             auto_augment=None if str(opt('aa')).lower() in ('', 'none') else opt('aa'),
                             interpolation=opt('train_interpolation'), re_prob=opt('reprob'),
                             re_mode=opt('remode'), re_count=opt('recount'), mean=mean3, std=std3)
        steps = list(_allow_zero_bit_posterize(t).transforms)
        if not resize_im:
            steps[0:1] = [transforms.Resize(input_size), transforms.CenterCrop(input_size),
                          transforms.RandomCrop(input_size, padding=4)]
    else:
        size = int(input_size / opt('eval_crop_ratio')) if resize_im else input_size
        steps = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                 transforms.CenterCrop(input_size), transforms.ToTensor(), transforms.Normalize(mean3, std3)]
    if in_chans != 3:
        steps.append(_ToChannels(in_chans))
    return transforms.Compose(steps)
