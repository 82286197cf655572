"""Deployment of a DeViT ensemble: collaborative inference over ZeroMQ, its baselines, and the service.

Device side (what a board runs; Python 3.6+, numpy + pyzmq + onnxruntime or PyTorch, nothing else at import):
- `wire`: the protocol (multipart JSON header + raw arrays), the sockets, the image codec;
- `worker`: a device worker (`python -m collab.worker`), also what collab_infer.py's ranks 1..N run;
- `backends`: the models behind a worker (onnxruntime export, or a PyTorch checkpoint) and the ensemble head;
- `manifest`: the export folder's manifest.json, its schema and its one reader (export_onnx.py validates with it);
- `sessions`: onnxruntime sessions (execution providers, threads, optimisation level), for every part of DeViT;
- `launcher`: ranks and addresses from the launcher's environment, following a dead launcher;
- `quota`: CPU quotas (emulated slow devices);
- `client`: a client of the service (standard library).
Aggregator side:
- `dispatch`: the workers' registry and the requests in flight (numpy + pyzmq);
- `modes`: collab, layer-split and monolithic, the batch evaluation run;
- `service`: the HTTP service (`collab_infer.py --serve`);
- `report`: the report JSON, the per-image CSV and the printed table;
- `torch_models`: the PyTorch pieces (backbone i alone, the layer-split stages).
`collab_infer.py` is the entry script. This package imports nothing itself.
"""
