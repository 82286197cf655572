"""DeViT models: `import models` registers the students `dedeit`, `devit`, `decct` and the teacher `cct_14_7x2`
with timm."""
from .adapter import FeatureAdapter, check_token_counts, layer_pairs
from .cct import CompactTransformer, cct_14_7x2, decct
from .checkpoint import CheckpointError, LoadResult, load_state_dict_checked, load_weights, read_checkpoint
from .ensemble_model import (
                       DeViTEnsemble,
                       EnsembleOutput,
                       build_ensemble,
                       create_backbone,
                       load_ensemble,
                       load_students,
                       student_checkpoint_paths,
                       student_spec,
)
from .features import Features, capture_qkv, forward_features, prefix_tokens, token_width
from .students import dedeit, devit

__all__ = [
    'CheckpointError', 'CompactTransformer', 'DeViTEnsemble', 'EnsembleOutput', 'FeatureAdapter', 'Features',
    'LoadResult', 'build_ensemble', 'capture_qkv', 'cct_14_7x2', 'check_token_counts', 'create_backbone', 'decct',
    'dedeit', 'devit', 'forward_features', 'layer_pairs', 'load_ensemble', 'load_state_dict_checked', 'load_students',
    'load_weights', 'prefix_tokens', 'read_checkpoint', 'student_checkpoint_paths', 'student_spec', 'token_width',
]
