"""Deployment of a DeViT ensemble: collaborative inference over ZeroMQ, its baselines, export and the service.

Board side, this package's own modules (what a device imports; Python 3.6+, numpy + pyzmq + onnxruntime, no
PyTorch at import):
- `wire`: the protocol (multipart JSON header + raw arrays), the sockets, the image codec;
- `worker`: a device worker (`python -m collab.worker`), also what collab_infer.py's ranks 1..N run;
- `dispatch`: the aggregator's registry of workers and the requests in flight (an aggregator may be a board too);
- `backends`: the models behind a worker (onnxruntime export, or a PyTorch checkpoint) and the ensemble head;
- `manifest`: the export folder's manifest.json, its schema and its one reader;
- `sessions`: onnxruntime sessions (execution providers, threads, optimisation level), for every part of DeViT;
- `launcher`: ranks and addresses from the launcher's environment, following a dead launcher;
- `quota`: CPU quotas (emulated slow devices);
- `client`: a client of the service (standard library).
Aggregator host, `collab.host` (PyTorch, the models, the datasets):
- `modes`: collab, layer-split and monolithic, the batch evaluation run;
- `service`: the HTTP service (`collab_infer.py --serve`);
- `export`: an ensemble checkpoint to ONNX graphs and their manifest (`export_onnx.py`);
- `report`: the report JSON, the per-image CSV and the printed table;
- `torch_models`: the PyTorch pieces (backbone i alone, the layer-split stages).
`collab_infer.py` and `export_onnx.py` are the entry scripts. This package imports nothing itself.
"""
