#!/usr/bin/env bash
# Put a Jetson in the DeViT paper's measuring state: a fixed power mode and clocks pinned at that mode's maximum.
#
#   jetson/setup.sh                 # Nano: sudo /usr/sbin/nvpmodel -m 1 (5 W) ; sudo jetson_clocks
#   jetson/setup.sh --mode 0        # another nvpmodel mode (required on boards other than the Nano)
#   jetson/setup.sh --dry-run       # print the power modes and what would run, change nothing
#   jetson/setup.sh --show          # jetson_clocks --show and nvpmodel -q
#   jetson/setup.sh --restore       # the power mode and clocks saved before the first setup.sh run
#
# Before changing anything it prints the current power mode and the name the target mode has on this board
# (from nvpmodel -q and /etc/nvpmodel.conf): mode numbers mean different budgets on different boards (1 is the
# Nano's 5 W mode, 15 W on an AGX Orin), so off a Nano --mode must be given. The first run saves the current
# clocks (jetson_clocks --store) and power mode before it changes either, so --restore goes back to the state the
# board was in before setup.sh; later runs keep that first saved state.
# Off a Jetson (no /etc/nv_tegra_release, no "Jetson" in /proc/device-tree/model and no nvpmodel) it says so and
# exits 0 with nothing done; on a Jetson whose tools are missing (a container?) it fails.
# Overrides (tests use them): NVPMODEL, NVPMODEL_CONF, JETSON_CLOCKS, NV_TEGRA_RELEASE, DT_MODEL,
# JETSON_CLOCKS_STORE (the mode is saved beside it, in FILE.nvpmodel), SUDO (default sudo; empty when run as root).
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    cat <<'EOF'

Options:
  --mode N     nvpmodel mode (default 1 on a Nano; required elsewhere)
  --no-clocks  set the power mode only, leave the clocks alone
  --store      only save the current clocks and power mode
  --restore    restore the saved power mode and clocks
  --show       print the clocks and the power mode
  --dry-run    print the commands instead of running them
  -h, --help   this help
EOF
}

MODE=""
ACTION=setup
DRY_RUN=0
CLOCKS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --mode) [ $# -ge 2 ] || { echo "setup.sh: --mode needs a number" >&2; exit 2; }; MODE=$2; shift ;;
        --mode=*) MODE=${1#--mode=} ;;
        --no-clocks) CLOCKS=0 ;;
        --store) ACTION=store ;;
        --restore) ACTION=restore ;;
        --show) ACTION=show ;;
        --dry-run|-n) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$MODE" in
    '') ;;
    *[!0-9]*) echo "setup.sh: --mode takes a number, got '$MODE'" >&2; exit 2 ;;
esac

NVPMODEL=${NVPMODEL:-/usr/sbin/nvpmodel}
NVPMODEL_CONF=${NVPMODEL_CONF:-/etc/nvpmodel.conf}
JETSON_CLOCKS=${JETSON_CLOCKS:-$(command -v jetson_clocks || echo /usr/bin/jetson_clocks)}
NV_TEGRA_RELEASE=${NV_TEGRA_RELEASE:-/etc/nv_tegra_release}
DT_MODEL=${DT_MODEL:-/proc/device-tree/model}
STORE_FILE=${JETSON_CLOCKS_STORE:-/var/tmp/devit_jetson_clocks.conf}
MODE_FILE="$STORE_FILE.nvpmodel"
if [ -z "${SUDO+set}" ]; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO=sudo; fi
fi

model=""
[ -r "$DT_MODEL" ] && model=$(tr -d '\0' < "$DT_MODEL")
on_jetson=1
if [ ! -e "$NV_TEGRA_RELEASE" ] && [[ "$model" != *Jetson* ]] && [ ! -x "$NVPMODEL" ]; then
    on_jetson=0
fi

# The name of power mode $1 on this board, from nvpmodel.conf lines "< POWER_MODEL ID=1 NAME=5W >"; empty if none.
mode_name() {
    [ -r "$NVPMODEL_CONF" ] || return 0
    sed -n "s/^[[:space:]]*<[[:space:]]*POWER_MODEL[[:space:]]*ID=$1[[:space:]]*NAME=\([^[:space:]>]*\).*/\1/p" \
        "$NVPMODEL_CONF" | head -n 1
}
mode_list() {
    [ -r "$NVPMODEL_CONF" ] || { echo "($NVPMODEL_CONF not readable; nvpmodel -p --verbose lists them)"; return 0; }
    sed -n 's/^[[:space:]]*<[[:space:]]*POWER_MODEL[[:space:]]*ID=\([0-9]*\)[[:space:]]*NAME=\([^[:space:]>]*\).*/\1=\2/p' \
        "$NVPMODEL_CONF" | tr '\n' ' '
}

# The current mode, "ID NAME", from `nvpmodel -q` ("NV Power Mode: MAXN" then "0"); read-only, so also in dry runs.
CUR_ID=""
CUR_NAME=""
if [ "$on_jetson" -eq 1 ] && [ -x "$NVPMODEL" ] && [ "$ACTION" != show ]; then
    query=$("$NVPMODEL" -q 2>/dev/null || true)
    CUR_NAME=$(printf '%s\n' "$query" | sed -n 's/^NV Power Mode:[[:space:]]*//p' | head -n 1)
    CUR_ID=$(printf '%s\n' "$query" | grep -E '^[[:space:]]*[0-9]+[[:space:]]*$' | head -n 1 | tr -d '[:space:]' || true)
fi

if [ "$ACTION" = setup ] && [ -z "$MODE" ]; then
    if [ "$on_jetson" -eq 0 ] || { [[ "$model" == *"Jetson Nano"* ]] && [[ "$model" != *Orin* ]]; }; then
        MODE=1  # the paper's setting: the Nano's 5 W mode
    else
        echo "setup.sh: --mode is required on ${model:-this board}: mode 1 is the Nano's 5 W mode (the paper's)," \
            "and mode numbers mean other budgets here. Modes: $(mode_list)" >&2
        exit 2
    fi
fi

TARGET_NAME=""
if [ "$ACTION" = setup ] && [ "$on_jetson" -eq 1 ]; then
    TARGET_NAME=$(mode_name "$MODE")
    if [ -r "$NVPMODEL_CONF" ] && [ -z "$TARGET_NAME" ]; then
        echo "setup.sh: this board has no power mode $MODE ($NVPMODEL_CONF). Modes: $(mode_list)" >&2
        exit 2
    fi
fi

# Commands this run would execute, in order ("save-mode ID" is done by this script: the mode to restore).
CMDS=()
add() { CMDS+=("${SUDO:+$SUDO }$*"); }
store() {
    add "$JETSON_CLOCKS" --store "$STORE_FILE"
    CMDS+=("save-mode ${CUR_ID:-unknown}")
}
case "$ACTION" in
    setup)
        # Save first, before the mode changes: --restore then returns to the state before the first setup.sh.
        [ -e "$STORE_FILE" ] || store
        add "$NVPMODEL" -m "$MODE"
        [ "$CLOCKS" -eq 0 ] || add "$JETSON_CLOCKS"
        add "$NVPMODEL" -q ;;
    store) store ;;
    restore)
        saved=""
        [ -r "$MODE_FILE" ] && saved=$(tr -d '[:space:]' < "$MODE_FILE")
        case "$saved" in ''|*[!0-9]*) ;; *) add "$NVPMODEL" -m "$saved" ;; esac
        add "$JETSON_CLOCKS" --restore "$STORE_FILE" ;;
    show) add "$JETSON_CLOCKS" --show; add "$NVPMODEL" -q ;;
esac

show_cmds() {
    for cmd in "${CMDS[@]}"; do
        case "$cmd" in
            save-mode*) echo "  (save power mode ${cmd#save-mode } to $MODE_FILE)" ;;
            *) echo "  $cmd" ;;
        esac
    done
}

if [ "$on_jetson" -eq 0 ]; then
    echo "setup.sh: this is not a Jetson (no $NV_TEGRA_RELEASE, device-tree model '${model:-none}'," \
        "no $NVPMODEL): nothing done."
    if [ "$DRY_RUN" -eq 1 ]; then
        echo "On a Jetson it would run:"
        show_cmds
    fi
    exit 0
fi
echo "setup.sh: ${model:-Jetson} ($(head -n 1 "$NV_TEGRA_RELEASE" 2>/dev/null || echo 'no nv_tegra_release'))"
if [ "$ACTION" = setup ]; then
    echo "power mode now: ${CUR_NAME:-unknown} (${CUR_ID:-?}); setting mode $MODE: ${TARGET_NAME:-name unknown}" \
        "(modes on this board: $(mode_list))"
fi

if [ "$DRY_RUN" -eq 1 ]; then
    echo "dry run, would run:"
    show_cmds
    exit 0
fi

missing=0
for tool in "$NVPMODEL" "$JETSON_CLOCKS"; do
    if [ ! -x "$tool" ]; then
        echo "setup.sh: $tool not found or not executable (is this JetPack's L4T image?)" >&2
        missing=1
    fi
done
[ "$missing" -eq 0 ] || exit 1
if [ -n "$SUDO" ] && ! command -v "$SUDO" >/dev/null; then
    echo "setup.sh: $SUDO not found; run as root" >&2
    exit 1
fi
if [ "$ACTION" = restore ] && [ ! -e "$STORE_FILE" ]; then
    echo "setup.sh: no saved clocks at $STORE_FILE (run setup.sh or setup.sh --store first)" >&2
    exit 1
fi

for cmd in "${CMDS[@]}"; do
    case "$cmd" in
        save-mode*)
            id=${cmd#save-mode }
            if [ "$id" = unknown ]; then
                echo "setup.sh: nvpmodel -q gave no mode number; --restore will restore the clocks only" >&2
            else
                echo "+ echo $id > $MODE_FILE"
                echo "$id" > "$MODE_FILE"
            fi
            continue ;;
    esac
    echo "+ $cmd"
    # Word splitting is intended: each entry is a command line built above from paths without spaces.
    # shellcheck disable=SC2086
    $cmd
done
