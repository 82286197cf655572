#!/usr/bin/env bash
# Put a Jetson in the DeViT paper's measuring state: a fixed power mode and clocks pinned at that mode's maximum.
#
#   jetson/setup.sh                 # sudo /usr/sbin/nvpmodel -m 1 ; sudo jetson_clocks  (clocks saved first once)
#   jetson/setup.sh --mode 0        # another nvpmodel mode (Nano: 0 = MAXN 10 W, 1 = 5 W; Orin: see nvpmodel -p)
#   jetson/setup.sh --dry-run       # print what would run, change nothing
#   jetson/setup.sh --show          # jetson_clocks --show and nvpmodel -q
#   jetson/setup.sh --restore       # jetson_clocks --restore from the file saved before the first pinning
#
# Off a Jetson (no /etc/nv_tegra_release, no "Jetson" in /proc/device-tree/model and no nvpmodel) it says so and
# exits 0 with nothing done; on a Jetson whose tools are missing (a container?) it fails.
# Overrides (tests use them): NVPMODEL, JETSON_CLOCKS, NV_TEGRA_RELEASE, DT_MODEL, JETSON_CLOCKS_STORE,
# SUDO (default sudo; empty when run as root).
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    cat <<'EOF'

Options:
  --mode N     nvpmodel mode (default 1)
  --no-clocks  set the power mode only, leave the clocks alone
  --store      only save the current clocks (jetson_clocks --store)
  --restore    restore the saved clocks (jetson_clocks --restore)
  --show       print the clocks and the power mode
  --dry-run    print the commands instead of running them
  -h, --help   this help
EOF
}

MODE=1
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
    ''|*[!0-9]*) echo "setup.sh: --mode takes a number, got '$MODE'" >&2; exit 2 ;;
esac

NVPMODEL=${NVPMODEL:-/usr/sbin/nvpmodel}
JETSON_CLOCKS=${JETSON_CLOCKS:-$(command -v jetson_clocks || echo /usr/bin/jetson_clocks)}
NV_TEGRA_RELEASE=${NV_TEGRA_RELEASE:-/etc/nv_tegra_release}
DT_MODEL=${DT_MODEL:-/proc/device-tree/model}
STORE_FILE=${JETSON_CLOCKS_STORE:-/var/tmp/devit_jetson_clocks.conf}
if [ -z "${SUDO+set}" ]; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO=sudo; fi
fi

# Commands this run would execute, in order.
CMDS=()
add() { CMDS+=("${SUDO:+$SUDO }$*"); }
case "$ACTION" in
    setup)
        add "$NVPMODEL" -m "$MODE"
        if [ "$CLOCKS" -eq 1 ]; then
            # Save the clocks before the first pinning so --restore can undo it.
            [ -e "$STORE_FILE" ] || add "$JETSON_CLOCKS" --store "$STORE_FILE"
            add "$JETSON_CLOCKS"
        fi
        add "$NVPMODEL" -q ;;
    store) add "$JETSON_CLOCKS" --store "$STORE_FILE" ;;
    restore) add "$JETSON_CLOCKS" --restore "$STORE_FILE" ;;
    show) add "$JETSON_CLOCKS" --show; add "$NVPMODEL" -q ;;
esac

model=""
[ -r "$DT_MODEL" ] && model=$(tr -d '\0' < "$DT_MODEL")
if [ ! -e "$NV_TEGRA_RELEASE" ] && [[ "$model" != *Jetson* ]] && [ ! -x "$NVPMODEL" ]; then
    echo "setup.sh: this is not a Jetson (no $NV_TEGRA_RELEASE, device-tree model '${model:-none}'," \
        "no $NVPMODEL): nothing done."
    if [ "$DRY_RUN" -eq 1 ]; then
        echo "On a Jetson it would run:"
        printf '  %s\n' "${CMDS[@]}"
    fi
    exit 0
fi
echo "setup.sh: ${model:-Jetson} ($(head -n 1 "$NV_TEGRA_RELEASE" 2>/dev/null || echo 'no nv_tegra_release'))"

if [ "$DRY_RUN" -eq 1 ]; then
    echo "dry run, would run:"
    printf '  %s\n' "${CMDS[@]}"
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
    echo "+ $cmd"
    # Word splitting is intended: each entry is a command line built above from paths without spaces.
    # shellcheck disable=SC2086
    $cmd
done
