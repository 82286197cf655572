"""Student ViTs registered with timm: `dedeit` (DeiT-Tiny-distilled shape) and `devit` (no distillation token).

Both are timm's own classes (VisionTransformerDistilled / VisionTransformer) built through timm's builder, so the
state dict uses timm's DeiT key names and a DeiT checkpoint of the same shape loads directly. Size overrides
(`img_size`, `patch_size`, `in_chans`, `embed_dim`, `depth`, `num_heads`, ...) go straight to the model class.
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn


def _create_student(variant: str, pretrained: bool = False, distilled: bool = False, **kwargs):
    if pretrained:
        # No hub weights exist for our students; weights come from a local checkpoint (models.load_weights).
        raise ValueError(f'{variant} has no pretrained weights; load a local checkpoint with models.load_weights')
    return build_model_with_cfg(
        VisionTransformerDistilled if distilled else VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={'out_indices': 3, 'feature_cls': 'getter'},
        **kwargs,
    )


def _cfg(**kwargs):
    # No url: the cfg only carries data defaults and classifier names, so create_model never tries a download.
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'dedeit': _cfg(classifier=('head', 'head_dist')),
    'devit': _cfg(),
})


@register_model
def dedeit(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    """DeDeiT student: DeiT-Tiny distilled shape (dim 192, depth 12, 3 heads, cls + dist tokens)."""
    model_args = {'patch_size': 16, 'embed_dim': 192, 'depth': 12, 'num_heads': 3}
    return _create_student('dedeit', pretrained=pretrained, distilled=True, **dict(model_args, **kwargs))


@register_model
def devit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeViT student: the same shape without the distillation token (students of a plain ViT teacher)."""
    model_args = {'patch_size': 16, 'embed_dim': 192, 'depth': 12, 'num_heads': 3}
    return _create_student('devit', pretrained=pretrained, distilled=False, **dict(model_args, **kwargs))
