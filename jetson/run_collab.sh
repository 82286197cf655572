#!/usr/bin/env bash
# Start this board's process of the collaborative runtime: N worker boards + 1 aggregator host.
# Node 0 runs the aggregator (collab_infer.py: the ensemble head; a batch evaluation, or --serve); node R = 1..N runs
# device R-1 as `python -m collab.worker` (numpy + pyzmq + onnxruntime or PyTorch, Python 3.6+; no torch.distributed,
# which NVIDIA's Jetson wheels often lack). Workers connect to the aggregator over ZeroMQ; only the aggregator
# listens (on every interface with --keys), so no board has to pick an interface, and JetPack's 127.0.1.1 hostname
# entry does not matter. Boards may start before the aggregator, be restarted, or reboot: they join (again) on
# their own.
#
# Keys first (docs/security.md), on the aggregator host; each board gets its own secret and the aggregator's public
# key, nothing else:
#   python -m collab.keys init keys --devices 4
#   for i in 0 1 2 3; do ssh nano$((i + 1)) 'mkdir -p -m 700 ~/devit/keys'; \
#       scp -p keys/device$i.key_secret keys/aggregator.key nano$((i + 1)):devit/keys/; done
#
#   MASTER_ADDR=192.168.1.10 NODE_RANK=2 jetson/run_collab.sh --keys keys --backend onnxruntime --model-path export/
#   MASTER_ADDR=192.168.1.10 NODE_RANK=0 jetson/run_collab.sh --keys keys --backend onnxruntime --model-path export/ \
#       --dataset IMNET --data-path /data/imagenet --limit 1000 --report collab.json      # or: --serve --port 8080
# Without --keys the aggregator listens on 127.0.0.1 only; --insecure opens it to the network unauthenticated.
#
# Environment (flags win over it):
#   MASTER_ADDR         address of the aggregator host, reachable from every board    (--master ADDR; required)
#   COLLAB_PORT         port the aggregator listens on for workers, default 29501     (--port P)
#   NODE_RANK           this host: 0 aggregator, 1..N workers (device NODE_RANK-1)     (--node-rank R; required)
#   NNODES              hosts in all, default 5 (4 Nanos + 1 aggregator)              (--nnodes K)
#   CKPT                checkpoint or export folder, used as --model-path when none is given
#   PYTHON              interpreter, default python3
#   POWER_INTERVAL_MS   sampling interval of --power, default 100
# Options of this script: --dry-run (print the command, run nothing), --power (log this board's power to
# power_node<R>.csv and its energy to power_node<R>.json with jetson/power.py), --local (every process on this host
# under torch's launcher, for a check without boards), --script PATH (default collab_infer.py of this repo).
# Everything else goes to collab_infer.py on node 0. A worker takes only its own flags from it: --model-path
# (--worker-model-path wins), --backend, --fp16-model, --threads, --device, --ema, --startup-timeout, --keys.
#
# All boards at once from a laptop, with the repo at ~/devit on each (keys in ~/.ssh, same paths):
#   HOSTS=(agg nano1 nano2 nano3 nano4); MASTER=192.168.1.10
#   for r in "${!HOSTS[@]}"; do
#       ssh "${HOSTS[$r]}" "cd ~/devit && MASTER_ADDR=$MASTER NODE_RANK=$r jetson/run_collab.sh --power \
#           --backend onnxruntime --model-path export/ --dataset IMNET --data-path /data/val --limit 1000 \
#           --timeout 30 --report collab_$r.json" > "collab_$r.log" 2>&1 &
#   done; wait
#   scp agg:devit/collab_0.json . ; for h in "${HOSTS[@]}"; do scp "$h:devit/power_node*.json" . ; done
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
MASTER=${MASTER_ADDR:-}
PORT=${COLLAB_PORT:-29501}
RANK=${NODE_RANK:-}
NNODES=${NNODES:-5}
INTERVAL=${POWER_INTERVAL_MS:-100}
SCRIPT=$REPO/collab_infer.py
DRY_RUN=0
POWER=0
LOCAL=0
ARGS=()

need() { [ "$2" -ge 2 ] || { echo "run_collab.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --power) POWER=1 ;;
        --local) LOCAL=1 ;;
        --master) need "$1" $#; MASTER=$2; shift ;;
        --port) need "$1" $#; PORT=$2; shift ;;
        --node-rank) need "$1" $#; RANK=$2; shift ;;
        --nnodes) need "$1" $#; NNODES=$2; shift ;;
        --script) need "$1" $#; SCRIPT=$2; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --) shift; ARGS+=("$@"); break ;;
        *) ARGS+=("$1") ;;
    esac
    shift
done

if [ -n "${CKPT:-}" ]; then
    has_ckpt=0
    for a in "${ARGS[@]+"${ARGS[@]}"}"; do
        case "$a" in --model-path|--model-path=*) has_ckpt=1 ;; esac
    done
    [ "$has_ckpt" -eq 1 ] || ARGS=(--model-path "$CKPT" "${ARGS[@]+"${ARGS[@]}"}")
fi

# The flags of ARGS a worker takes (with their values); --worker-model-path becomes its --model-path.
worker_args() {
    local out=() model="" wmodel="" i=0 a
    local -a all=("${ARGS[@]+"${ARGS[@]}"}")
    while [ "$i" -lt "${#all[@]}" ]; do
        a=${all[$i]}
        case "$a" in
            --model-path) model=${all[$((i + 1))]:-}; i=$((i + 1)) ;;
            --worker-model-path) wmodel=${all[$((i + 1))]:-}; i=$((i + 1)) ;;
            --backend|--threads|--device|--startup-timeout|--keys) out+=("$a" "${all[$((i + 1))]:-}"); i=$((i + 1)) ;;
            --ema|--fp16-model) out+=("$a") ;;
        esac
        i=$((i + 1))
    done
    model=${wmodel:-$model}
    [ -z "$model" ] || out=(--model-path "$model" "${out[@]+"${out[@]}"}")
    WORKER_ARGS=("${out[@]+"${out[@]}"}")
}

case "$PORT" in ''|*[!0-9]*) echo "run_collab.sh: the port must be a number, got '$PORT'" >&2; exit 2 ;; esac
if [ "$LOCAL" -eq 1 ]; then
    # One host plays every board: rank 0 aggregator, ranks 1..NNODES-1 workers, over loopback.
    RANK=0
    CMD=("$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 --nproc_per_node="$NNODES"
         --master_addr=127.0.0.1 --master_port=$((PORT - 1)) "$SCRIPT" --collab-port "$PORT"
         "${ARGS[@]+"${ARGS[@]}"}")
else
    if [ -z "$RANK" ]; then
        echo "run_collab.sh: set NODE_RANK (or --node-rank): 0 aggregator, 1..$((NNODES - 1)) workers" >&2
        exit 2
    fi
    case "$RANK" in ''|*[!0-9]*) echo "run_collab.sh: NODE_RANK must be a number, got '$RANK'" >&2; exit 2 ;; esac
    if [ "$RANK" -ge "$NNODES" ]; then
        echo "run_collab.sh: NODE_RANK $RANK is not below NNODES $NNODES" >&2
        exit 2
    fi
    if [ "$RANK" -eq 0 ]; then
        CMD=("$PYTHON" "$SCRIPT" --collab-port "$PORT" "${ARGS[@]+"${ARGS[@]}"}")
    else
        if [ -z "$MASTER" ]; then
            echo "run_collab.sh: set MASTER_ADDR (or --master) to the aggregator host's address" >&2
            exit 2
        fi
        case "$MASTER" in
            127.*|localhost|::1)
                echo "run_collab.sh: MASTER_ADDR=$MASTER is this board's own loopback: give the aggregator's" \
                     "address on the network (use --local to run everything on one host)" >&2
                exit 2 ;;
        esac
        worker_args
        CMD=("$PYTHON" -m collab.worker --aggregator "tcp://$MASTER:$PORT" --device-index $((RANK - 1))
             "${WORKER_ARGS[@]+"${WORKER_ARGS[@]}"}")
    fi
fi
if [ "$POWER" -eq 1 ]; then
    CMD=("$PYTHON" -m jetson.power --interval-ms "$INTERVAL" --csv "power_node$RANK.csv"
         --json "power_node$RANK.json" -- "${CMD[@]}")
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # for python -m collab.worker / jetson.power from anywhere
if [ "$DRY_RUN" -eq 1 ]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
if [ ! -e "$SCRIPT" ]; then
    echo "run_collab.sh: $SCRIPT not found" >&2
    exit 1
fi
echo "run_collab.sh: node $RANK of $NNODES, aggregator ${MASTER:-this host}:$PORT" >&2
exec "${CMD[@]}"
