#!/usr/bin/env bash
# DeViT end to end on the embedded Fashion-MNIST (Debian's dataset-fashion-mnist), from nothing:
#   teacher: a small ViT trained from scratch on all 60k training images (no pretrained weights offline), its
#      confusion matrix on those training images written to OUT/confusion.json;
#   0. split the classes into 4 disjoint divisions (splite_dataset.py --strategy, the authors' random split by default);
#   1. fine-tune the teacher into a sub-teacher per division                                 (train_subdata.py);
#   2. distil a smaller student per division: hard KD + q/k/v relations, gama 0.2 0.1 0.3   (distill_sub.py);
#   3. train the ensemble head (and backbones) against the full teacher                      (ensemble.py);
#   baseline: one student of the same size, KD on all classes for as many epochs as stages 2 and 3;
#   then evaluate everything on the 10,000 test images: OUT/results.json, results.txt and results.png.
# Every stage runs through `python -m torch.distributed.launch ... --use_env`, as the seed's commands do, with
# the small-data recipe configs/small.yaml.
#
#   bash demo.sh            full demo (about 13 minutes on 2 idle cores)
#   bash demo.sh --quick    the same pipeline on a slice of the data, for the tests (about 2 minutes)
#   bash demo.sh --family decct   the DeCCTs decomposition (CCT teacher, decct students) into output/demo-decct
#   bash demo.sh --strategy S [--split-seed K]   which classes share a division (splite_dataset.py --strategy):
#       random (default: the authors' seeded shuffle, seed K, default 42), confusion-together or confusion-spread
#       (from OUT/confusion.json, the teacher's confusions on its own training images: no test label chooses them)
#   bash demo.sh --devices F0 F1 F2 F3   also the decomposition plan.py plans for these device profiles, against the
#       uniform plan of this demo's own student; stages 1-3 a second time, with the same recipe, teacher and split
#       flags, into OUT/planned, reported beside the uniform one (planned_* keys of results.json). The profiles are
#       planned first (a bad one: one error line before anything is deleted or trained). The demo fleet:
#       profiles/demo/slow.json profiles/demo/fast.json profiles/demo/slow.json profiles/demo/fast.json (two
#       devices 4x slower than the other two; fast.json measured here, slow.json its x4 estimate). In this order
#       the plan's class counts (2 3 2 3) are the uniform split's, so both ensembles learn the same four groups and
#       differ only where the plan differs: each slow device's student is dedeit 96x1 (one block: at 28x28 a
#       block's fixed cost dominates, so wide-and-shallow is its fastest student that keeps the uniform plan's
#       parameters per class) instead of 64x2, the fast ones keep 64x2. Whether one block learns its two classes as
#       well is what the comparison measures (target: within 1 point of the uniform ensemble's top-1).
# Environment: PYTHON (default python3), OUT (default output/demo), NPROC (processes per stage, default 2, one
# thread each: 15% faster than one process with two threads on two cores; the global batch stays 256),
# PORT (default 29531), DATA (default /usr/share/datasets/fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")"

COMMAND="${OUT:+OUT=$OUT }bash demo.sh${*:+ $*}"  # as the docs name the figures it makes
QUICK=0
FAMILY=dedeits
STRATEGY=random
SPLIT_SEED=42
DEVICES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --family) FAMILY=${2:-}; shift ;;
    --family=*) FAMILY=${1#--family=} ;;
    --strategy) STRATEGY=${2:-}; shift ;;
    --strategy=*) STRATEGY=${1#--strategy=} ;;
    --split-seed) SPLIT_SEED=${2:-}; shift ;;
    --split-seed=*) SPLIT_SEED=${1#--split-seed=} ;;
    --devices) while [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; do DEVICES+=("$2"); shift; done
               if [ ${#DEVICES[@]} -eq 0 ]; then
                 echo "error: --devices needs profile files (one per device)" >&2; exit 2
               fi ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (use --quick, --family dedeits|decct, --strategy S, --split-seed K," \
            "--devices FILES...)" >&2; exit 2 ;;
  esac
  shift
done
case "$FAMILY" in
  dedeits|decct) ;;
  *) echo "error: --family must be dedeits or decct, got '$FAMILY'" >&2; exit 2 ;;
esac
case "$STRATEGY" in
  random|confusion-together|confusion-spread) ;;
  *) echo "error: --strategy must be random, confusion-together or confusion-spread, got '$STRATEGY'" >&2; exit 2 ;;
esac
case "$SPLIT_SEED" in
  ''|*[!0-9]*) echo "error: --split-seed must be a non-negative integer, got '$SPLIT_SEED'" >&2; exit 2 ;;
esac
if [ "$FAMILY" = decct ]; then OUT=${OUT:-output/demo-decct}; fi

PYTHON=${PYTHON:-python3}
OUT=${OUT:-output/demo}
NPROC=${NPROC:-2}
PORT=${PORT:-29531}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
N=4

if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  echo "error: Fashion-MNIST not found in $DATA (install it: sudo apt-get install dataset-fashion-mnist)" >&2
  exit 2
fi

# Model shapes: the teacher is timm's DeiT (distilled) and the students are `dedeit`, sized for 28x28 images
# (patch 7: 16 patches + cls + dist = 18 tokens; teacher and students share the token count for the relation loss).
TEACHER=deit_tiny_distilled_patch16_224
TEACHER_KW=(img_size=28 patch_size=7 in_chans=1 embed_dim=128 depth=4 num_heads=4 mlp_ratio=2)
STUDENT=dedeit
STUDENT_KW=(img_size=28 patch_size=7 in_chans=1 embed_dim=64 depth=2 num_heads=2 mlp_ratio=2)
# Epochs: E0 the teacher's, E1..E3 stages 1..3; the baseline gets E2 + E3, as long as a student trains in total.
E0=${E0:-8}; E1=${E1:-1}; E2=${E2:-4}; E3=${E3:-4}
# The recipe for small ViTs from scratch on CPU (configs/small.yaml): AdamW with a high lr (not scaled by
# batch/512), ~100 warm-up steps then cosine per step, plain transforms, no mixup, no label smoothing, no
# drop-path; the global batch stays 256 whatever NPROC.
COMMON=(-c configs/small.yaml --dataset fashion_mnist --batch-size $((256 / NPROC)) --eval-batch-size 1000
        --overwrite --no-progress)
if [ "$QUICK" = 1 ]; then
  E0=1; E1=1; E2=1; E3=1
  TEACHER_KW=(img_size=28 patch_size=7 in_chans=1 embed_dim=64 depth=2 num_heads=2 mlp_ratio=2)
  STUDENT_KW=(img_size=28 patch_size=7 in_chans=1 embed_dim=32 depth=2 num_heads=2 mlp_ratio=2)
  COMMON+=(--limit-train 4000 --limit-val 1000)
fi
if [ "$FAMILY" = decct ]; then
  # DeCCTs: a CCT-style teacher and `decct` students (no class token: devices send sequence-pooled features).
  # Three 3x3 conv + max-pool layers turn 28x28 into 4x4 = 16 tokens, the token count of the patch-7 ViTs above.
  TEACHER=cct_14_7x2
  TEACHER_KW=(img_size=28 in_chans=1 kernel_size=3 n_conv_layers=3 conv_planes=32 embed_dim=128 depth=4 num_heads=4
              mlp_ratio=2)
  STUDENT=decct
  STUDENT_KW=(img_size=28 in_chans=1 kernel_size=3 n_conv_layers=3 conv_planes=16 embed_dim=64 depth=2 num_heads=2
              mlp_ratio=2)
  if [ "$QUICK" = 1 ]; then
    TEACHER_KW=(img_size=28 in_chans=1 kernel_size=3 n_conv_layers=3 conv_planes=16 embed_dim=64 depth=2 num_heads=2
                mlp_ratio=2)
    STUDENT_KW=(img_size=28 in_chans=1 kernel_size=3 n_conv_layers=3 conv_planes=16 embed_dim=32 depth=2 num_heads=2
                mlp_ratio=2)
  fi
fi

# Threads per process: the cores shared out (the launcher would set 1, with a warning, for more than one process).
if [ -z "${OMP_NUM_THREADS:-}" ] && [ "$NPROC" -gt 1 ]; then
  CORES=$(nproc 2>/dev/null || echo "$NPROC")
  export OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi

launch() {
  "$PYTHON" -m torch.distributed.launch --nproc_per_node="$NPROC" --master_addr=127.0.0.1 --master_port="$PORT" \
    --use_env "$@"
}
stage() { echo; echo "=== $* ($(date +%T))"; }
kw() { local w; for w in "${STUDENT_KW[@]}"; do if [ "${w%%=*}" = "$1" ]; then echo "${w#*=}"; fi; done; }

START=$(date +%s)
PLAN_TMP=
if [ ${#DEVICES[@]} -gt 0 ]; then
  # Planned first, into a temporary folder: bad profiles stop the demo before anything is deleted or trained.
  PLAN_TMP=$(mktemp -d)
  trap 'rm -rf "$PLAN_TMP"' EXIT
  stage "plan: ${#DEVICES[@]} devices (${DEVICES[*]}); uniform plan: $STUDENT $(kw embed_dim)x$(kw depth) on each"
  "$PYTHON" plan.py --devices "${DEVICES[@]}" --dataset fashion_mnist --data_path "$DATA" --family "$FAMILY" \
    --uniform-width "$(kw embed_dim)" --uniform-depth "$(kw depth)" --output "$PLAN_TMP/plan.json"
fi
rm -rf "$OUT"
mkdir -p "$OUT"
if [ -n "$PLAN_TMP" ]; then
  mkdir -p "$OUT/planned"
  mv "$PLAN_TMP/plan.json" "$OUT/planned/plan.json"
fi

stage "teacher from scratch: $TEACHER ${TEACHER_KW[*]}, $E0 epochs (data: all classes as one division)"
"$PYTHON" splite_dataset.py --dataset fashion_mnist --data_path "$DATA" --num_division 1 --output_path "$OUT/split1"
launch train_subdata.py "${COMMON[@]}" --model $TEACHER --model-kwargs "${TEACHER_KW[@]}" --lr 2e-3 \
  --epochs "$E0" --data-path "$OUT/split1" --num_division 1 --start-division 0 --output_dir "$OUT/teacher"
TEACHER_CKPT="$OUT/teacher/sub-dataset0/checkpoint.pth"
# Its confusions on its own training images (not the test images the accuracies are reported on).
"$PYTHON" splite_dataset.py --dataset fashion_mnist --data_path "$DATA" --teacher-path "$TEACHER_CKPT" \
  --write-confusion "$OUT/confusion.json" --confusion-split train

# Which classes share a division: the same flags for the uniform split and the planned one.
SPLIT_FLAGS=(--strategy "$STRATEGY" --seed "$SPLIT_SEED")
if [ "$STRATEGY" != random ]; then SPLIT_FLAGS+=(--confusion "$OUT/confusion.json" --confusion-split train); fi
stage "0. split: $N class-disjoint divisions (${SPLIT_FLAGS[*]})"
"$PYTHON" splite_dataset.py --dataset fashion_mnist --data_path "$DATA" --num_division $N --output_path "$OUT/split$N" \
  "${SPLIT_FLAGS[@]}"

# Stages 1-3 on the split $2 into $3 ($1: a label for the stage lines; $4: its number of divisions; the rest: how
# stage 2 shapes the students, --model-kwargs or --plan).
decompose() {
  local label=$1 split=$2 dest=$3 ndiv=$4
  shift 4
  stage "${label}1. sub-teachers: fine-tune the teacher on each division, $E1 epoch(s)"
  launch train_subdata.py "${COMMON[@]}" --model $TEACHER --model-kwargs "${TEACHER_KW[@]}" --lr 5e-4 \
    --model-path "$TEACHER_CKPT" --epochs "$E1" --data-path "$split" --num_division "$ndiv" --all-divisions \
    --output_dir "$dest/stage1"
  stage "${label}2. students: distil a $STUDENT student per division ($*; hard KD, gama 0.2 0.1 0.3), $E2 epochs"
  launch distill_sub.py "${COMMON[@]}" --model $STUDENT "$@" --lr 2e-3 \
    --epochs "$E2" --data-path "$split" --teacher-model $TEACHER --teacher-kwargs "${TEACHER_KW[@]}" \
    --teacher-path "$dest/stage1" --distillation-type hard --gama 0.2 0.1 0.3 --num_division "$ndiv" --all-divisions \
    --output_dir "$dest/stage2"
  stage "${label}3. ensemble: $ndiv students + head against the full teacher, $E3 epochs"
  launch ensemble.py "${COMMON[@]}" --model $STUDENT --model-path "$dest/stage2" --lr 3e-3 --epochs "$E3" \
    --data-path "$DATA" --num_division "$ndiv" --teacher-model $TEACHER --teacher-kwargs "${TEACHER_KW[@]}" \
    --teacher-path "$TEACHER_CKPT" --output_dir "$dest/stage3" --eval-missing
}
decompose "" "$OUT/split$N" "$OUT" $N --model-kwargs "${STUDENT_KW[@]}"

stage "baseline: one $STUDENT student, KD from the teacher on all classes, $((E2 + E3)) epochs"
launch distill_sub.py "${COMMON[@]}" --model $STUDENT --model-kwargs "${STUDENT_KW[@]}" --lr 2e-3 \
  --epochs $((E2 + E3)) --data-path "$OUT/split1" --teacher-model $TEACHER --teacher-kwargs "${TEACHER_KW[@]}" \
  --teacher-path "$OUT/teacher" --distillation-type hard --gama 0.2 0.1 0.3 --num_division 1 --start-division 0 \
  --output_dir "$OUT/baseline"

if [ -n "$PLAN_TMP" ]; then
  # The planned decomposition: each device's classes and student from OUT/planned/plan.json, then stages 1-3 with
  # the same recipe, the same teacher and the same split flags. No --model-kwargs in stage 2: the plan carries each
  # student's whole shape (explicit ones would win over it key by key).
  P="$OUT/planned"
  stage "planned 0. split: the plan's class counts (${SPLIT_FLAGS[*]})"
  "$PYTHON" splite_dataset.py --dataset fashion_mnist --data_path "$DATA" --plan "$P/plan.json" \
    --output_path "$P/split" "${SPLIT_FLAGS[@]}"
  decompose "planned " "$P/split" "$P" ${#DEVICES[@]} --plan "$P/plan.json"
fi

stage "results: table, results.json and results.png"
"$PYTHON" demo_report.py --out "$OUT" --seconds $(( $(date +%s) - START )) --command "$COMMAND"
