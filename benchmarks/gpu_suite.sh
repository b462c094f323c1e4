#!/usr/bin/env bash
# The GPU benchmark suite on a machine with an NVIDIA GPU and nothing else prepared (issue 14 §5):
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [BUDGET_S]          (defaults: runs/gpu_suite, 480 s of measurements)
#
# Creates a fresh venv (.gpu-venv), installs the CUDA build of jax (JAX_VERSION, default the tested 0.10.2) and equiforce,
# checks that jax sees a GPU, then runs benchmarks/gpu_suite.py within the budget (MD steps/s of MACE and NequIP
# on aspirin and the 1029-atom water box in float32 / float64 / mixed, the training step, steps/s and memory
# against atoms up to the memory limit, 64 replicas). Results: OUT_DIR/gpu_suite.json and gpu_suite.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_suite}"
BUDGET="${2:-480}"
PYTHON="${PYTHON:-python3}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"  # the jax the test suite and the CPU figures use
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
    echo "no NVIDIA GPU visible (nvidia-smi failed)" >&2
    exit 1
}
"$PYTHON" -m venv .gpu-venv
# shellcheck disable=SC1091
. .gpu-venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "jax[cuda12]==$JAX_VERSION"
python -m pip install --quiet -e .
python -c "import jax; d = jax.devices(); print('jax', jax.__version__, d); assert d[0].platform == 'gpu', d"
python benchmarks/gpu_suite.py --out "$OUT" --budget-s "$BUDGET"
