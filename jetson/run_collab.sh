#!/usr/bin/env bash
# Start this board's process of the collaborative runtime (collab_infer.py) across N worker boards + 1 aggregator.
# Run it once on every host, each with its own NODE_RANK; rank 0 is the aggregator (ensemble head) and hosts the
# rendezvous at MASTER_ADDR, ranks 1..N are the workers (one backbone each). Transport is gloo over TCP: NCCL does
# not exist on Jetson.
#
#   MASTER_ADDR=192.168.1.10 NODE_RANK=2 GLOO_SOCKET_IFNAME=eth0 \
#       jetson/run_collab.sh --model-path output/ensemble/checkpoint.pth --dataset IMNET --data-path /data/imagenet
#
# Environment (flags win over it):
#   MASTER_ADDR         address of the rank-0 host, reachable from every board   (--master ADDR; required)
#   MASTER_PORT         rendezvous port, default 29500                           (--port P)
#   NODE_RANK           this host's rank: 0 aggregator, 1..N workers              (--node-rank R; required)
#   NNODES              hosts in all, default 5 (4 Nanos + 1 aggregator)         (--nnodes K)
#   GLOO_SOCKET_IFNAME  interface gloo binds to (eth0 on a Nano); set it when a board has docker0/l4tbr0/wlan0 too,
#                       or gloo may pick an address the others cannot reach       (--ifname IF)
#   CKPT                ensemble checkpoint, used as --model-path when none is given
#   PYTHON              interpreter, default python3
#   POWER_INTERVAL_MS   sampling interval of --power, default 100
# Options of this script: --dry-run (print the command, run nothing), --power (log this board's power to
# power_node<R>.csv and its energy to power_node<R>.json with jetson/power.py), --local (all NNODES processes on
# this host, for a check without boards), --script PATH (default collab_infer.py of this repo). Everything else goes to
# collab_infer.py as it is: --model-path --dataset --data-path --limit --timeout --report ...
#
# All boards at once from a laptop, with the repo at ~/devit on each (keys in ~/.ssh, same checkpoint paths):
#   HOSTS=(agg nano1 nano2 nano3 nano4); MASTER=192.168.1.10
#   for r in "${!HOSTS[@]}"; do
#       ssh "${HOSTS[$r]}" "cd ~/devit && MASTER_ADDR=$MASTER NODE_RANK=$r GLOO_SOCKET_IFNAME=eth0 \
#           jetson/run_collab.sh --power --model-path ckpt/ensemble.pth --dataset IMNET --data-path /data/val \
#           --limit 1000 --timeout 30 --report collab_$r.json" > "collab_$r.log" 2>&1 &
#   done; wait
#   scp agg:devit/collab_0.json . ; for h in "${HOSTS[@]}"; do scp "$h:devit/power_node*.json" . ; done
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
MASTER=${MASTER_ADDR:-}
PORT=${MASTER_PORT:-29500}
RANK=${NODE_RANK:-}
NNODES=${NNODES:-5}
IFNAME=${GLOO_SOCKET_IFNAME:-}
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
        --ifname) need "$1" $#; IFNAME=$2; shift ;;
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

if [ "$LOCAL" -eq 1 ]; then
    # One host plays every board: rank 0 aggregator, ranks 1..NNODES-1 workers, over loopback.
    RANK=0
    LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 --nproc_per_node="$NNODES"
            --master_addr=127.0.0.1 --master_port="$PORT")
else
    if [ -z "$MASTER" ]; then
        echo "run_collab.sh: set MASTER_ADDR (or --master) to the rank-0 host's address" >&2
        exit 2
    fi
    if [ -z "$RANK" ]; then
        echo "run_collab.sh: set NODE_RANK (or --node-rank): 0 aggregator, 1..$((NNODES - 1)) workers" >&2
        exit 2
    fi
    case "$RANK" in ''|*[!0-9]*) echo "run_collab.sh: NODE_RANK must be a number, got '$RANK'" >&2; exit 2 ;; esac
    if [ "$RANK" -ge "$NNODES" ]; then
        echo "run_collab.sh: NODE_RANK $RANK is not below NNODES $NNODES" >&2
        exit 2
    fi
    LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$RANK" --nproc_per_node=1
            --master_addr="$MASTER" --master_port="$PORT")
fi
CMD=("${LAUNCH[@]}" "$SCRIPT" "${ARGS[@]+"${ARGS[@]}"}")
if [ "$POWER" -eq 1 ]; then
    CMD=("$PYTHON" -m jetson.power --interval-ms "$INTERVAL" --csv "power_node$RANK.csv"
         --json "power_node$RANK.json" -- "${CMD[@]}")
fi

[ -z "$IFNAME" ] || export GLOO_SOCKET_IFNAME="$IFNAME"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # for python -m jetson.power from any directory
if [ "$DRY_RUN" -eq 1 ]; then
    [ -z "$IFNAME" ] || printf 'GLOO_SOCKET_IFNAME=%q ' "$IFNAME"
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
if [ ! -e "$SCRIPT" ]; then
    echo "run_collab.sh: $SCRIPT not found" >&2
    exit 1
fi
echo "run_collab.sh: node $RANK of $NNODES, master ${MASTER:-127.0.0.1}:$PORT${IFNAME:+, gloo on $IFNAME}" >&2
exec "${CMD[@]}"
