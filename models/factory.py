"""Models by name (``timm.create_model``; importing ``models`` registers the students) and the input a model takes."""
import timm

from fileio import UsageError


def create_model(name, num_classes, kwargs, input_size=None, **extra):
    """``timm.create_model`` with ``--input-size`` passed as ``img_size`` (as DeiT) and clear errors."""
    kwargs = dict(kwargs)
    if input_size and 'img_size' not in kwargs:
        kwargs['img_size'] = input_size
    if not timm.is_model(name):
        raise UsageError(f'unknown model {name!r} (not registered in timm)')
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs, **extra)
    except TypeError as err:
        raise UsageError(f'bad model arguments for {name}: {err}') from None


def input_spec(model):
    """(image size, input channels) the data must have for a timm ViT-like ``model``."""
    embed = model.patch_embed
    return embed.img_size[0], embed.proj.in_channels
