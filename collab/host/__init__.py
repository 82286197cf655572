"""The aggregator host's side of deployment: what needs PyTorch, the models or the datasets (see collab/__init__.py)."""
