"""Collaborative inference with a DeViT ensemble: N workers each run one backbone, the aggregator runs the head.

Batch evaluation under a launcher, N+1 processes (rank 0 the aggregator, rank r the device holding backbone r-1):

    python -m torch.distributed.launch --nproc_per_node=5 --master_addr=127.0.0.1 --master_port=29500 --use_env \\
        collab_infer.py --model-path output/demo/stage3/checkpoint.pth --limit 200 --timeout 10 --report collab.json

The launcher only starts the processes: they talk over ZeroMQ (collab/wire.py), the aggregator listening on
MASTER_PORT + 1 (or --collab-port), so the same runs across hosts with torchrun (--nnodes/--node_rank; rank 0 on
the node at MASTER_ADDR), or with no launcher at all: the aggregator alone (`python collab_infer.py ...
--collab-port 29501`) and on each board `python -m collab.worker --aggregator tcp://AGGREGATOR:29501
--device-index I --model-path ...` (no PyTorch needed there with --backend onnxruntime).

As a service (until SIGINT/SIGTERM; workers may join, leave and come back while it runs):

    python collab_infer.py --serve --port 8080 --deadline-ms 200 --model-path ... [--collab-port 29501]
    curl -s --data-binary @image.png http://localhost:8080/predict ; curl -s http://localhost:8080/health

Backends: --backend torch (the stage-3 checkpoint) or --backend onnxruntime (--model-path: the folder
export_onnx.py writes; --fp16-model runs its half-precision copies), for the workers and the head alike.
Baselines on the same images: --mode layer-split (the teacher's blocks cut into N consecutive stages, activations
passed stage to stage; random weights unless --teacher-path; same N+1 processes) and --mode monolithic (the
teacher, or the whole ensemble, in one process).
--images a.png b.png predicts files. --cpu-quota 1 1 0.25 0.25 emulates slow devices (worker r limited to that
fraction of one core; --cpu-reserve: and given it on a busy machine).
"""
import cli
from collab.host.infer import main

if __name__ == '__main__':
    cli.run_main(main)
