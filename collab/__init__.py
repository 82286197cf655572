"""Deployment of a DeViT ensemble: collaborative inference over torch.distributed and its baselines.

- `comm`: point-to-point messages with timeouts and byte counters (one gloo group per pair of ranks).
- `runtime`: what each process loads (`load_ensemble`, `load_backbone`, `build_teacher`), the image codec and the
  layer-split stages.
- `modes`: the collab, layer-split and monolithic modes (rank 0 clients, worker loops) and the measured run.
- `report`: the report JSON, the per-image CSV and the printed table.
`collab_infer.py` is the entry script.
"""
from .runtime import load_backbone, load_ensemble, split_stages

__all__ = ['load_backbone', 'load_ensemble', 'split_stages']
