#!/usr/bin/env bash
# Create one virtual environment per peer MLIP code (never a dependency of equiforce), pinned to the versions
# of the reference measurements (../../../shared/BENCHMARKS.md):
#
#   bash benchmarks/peers/setup.sh [mace-torch] [mlip] [nequip]     (default: all three)
#
# Venvs go to ${EQF_PEERS_DIR:-<repo>/benchmarks/.peers}/<name>. Idempotent: a venv whose pinned packages
# import and report the pinned versions is left alone; a broken or half-built one is rebuilt.
# torch is installed alone and first with the exact pin 2.13.0: on these machines that resolves to a local CPU
# wheel (2.13.0+cpu); any other torch request pulls several GB of CUDA packages. The script fails if any
# nvidia-* package ended up in a torch venv.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PEERS_DIR="${EQF_PEERS_DIR:-$REPO/benchmarks/.peers}"
PYTHON="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
MACE_PINS=("mace-torch==0.3.16" "ase")
MLIP_PINS=("mlip==0.2.5" "jax==0.10.2" "jaxlib==0.10.2" "ase")
NEQUIP_PINS=("nequip==0.19.1" "nequip-allegro==0.8.3" "ase")

log() { printf '[peers] %s\n' "$*" >&2; }

# check_venv NAME PYTHON_SNIPPET: the venv exists and the snippet runs (it asserts the pinned versions)
check_venv() {
    local py="$PEERS_DIR/$1/bin/python"
    [[ -x "$py" ]] && "$py" -c "$2" >/dev/null 2>&1
}

new_venv() {
    local dir="$PEERS_DIR/$1"
    log "creating $dir"
    rm -rf "$dir"
    mkdir -p "$PEERS_DIR"
    "$PYTHON" -m venv "$dir"
}

pip_in() {
    local name="$1"
    shift
    log "$name: pip install $*"
    "$PEERS_DIR/$name/bin/python" -m pip install --quiet "$@"
}

no_cuda_packages() {
    local name="$1"
    if "$PEERS_DIR/$name/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
        log "ERROR: CUDA (nvidia-*) packages were installed into $name:"
        "$PEERS_DIR/$name/bin/python" -m pip list 2>/dev/null | grep -i '^nvidia-' >&2
        return 1
    fi
}

report() {
    local name="$1"
    shift
    log "$name ready ($(du -sh "$PEERS_DIR/$name" | cut -f1)): $("$PEERS_DIR/$name/bin/python" -m pip list 2>/dev/null |
        grep -i -E "^($(IFS='|'; echo "$*")) " | awk '{printf "%s=%s ", $1, $2}')"
}

setup_mace_torch() {
    local check='
from importlib.metadata import version as v
assert v("torch").startswith("2.13.0") and v("mace-torch") == "0.3.16"
import mace, torch, mace.modules, ase'
    if check_venv mace-torch "$check"; then
        log "mace-torch: existing venv OK, skipped"
    else
        new_venv mace-torch
        pip_in mace-torch "$TORCH_PIN"
        pip_in mace-torch "$TORCH_PIN" "${MACE_PINS[@]}"
        no_cuda_packages mace-torch
        check_venv mace-torch "$check" || { log "mace-torch: import check failed"; return 1; }
    fi
    report mace-torch torch mace-torch e3nn ase numpy
}

setup_mlip() {
    local check='
from importlib.metadata import version as v
assert v("mlip") == "0.2.5" and v("jax") == "0.10.2" and v("jaxlib") == "0.10.2"
import jax, mlip.models, mlip.simulation.jax_md, ase
assert jax.default_backend() == "cpu"'
    if check_venv mlip "$check"; then
        log "mlip: existing venv OK, skipped"
    else
        new_venv mlip
        pip_in mlip "${MLIP_PINS[@]}"
        no_cuda_packages mlip
        check_venv mlip "$check" || { log "mlip: import check failed"; return 1; }
    fi
    report mlip mlip jax jaxlib jax-md flax e3nn-jax optax ase numpy
}

setup_nequip() {
    local check='
from importlib.metadata import version as v
assert v("torch").startswith("2.13.0") and v("nequip") == "0.19.1" and v("nequip-allegro") == "0.8.3"
import nequip, allegro, torch, ase'
    if check_venv nequip "$check"; then
        log "nequip: existing venv OK, skipped"
    else
        new_venv nequip
        pip_in nequip "$TORCH_PIN"
        pip_in nequip "$TORCH_PIN" "${NEQUIP_PINS[@]}"
        no_cuda_packages nequip
        check_venv nequip "$check" || { log "nequip: import check failed"; return 1; }
    fi
    report nequip torch nequip nequip-allegro e3nn ase numpy
}

main() {
    local peers=("$@")
    [[ ${#peers[@]} -gt 0 ]] || peers=(mace-torch mlip nequip)
    for peer in "${peers[@]}"; do
        case "$peer" in
            mace-torch) setup_mace_torch ;;
            mlip) setup_mlip ;;
            nequip) setup_nequip ;;
            *) log "unknown peer '$peer' (choose from: mace-torch mlip nequip)"; exit 2 ;;
        esac
    done
}

main "$@"
