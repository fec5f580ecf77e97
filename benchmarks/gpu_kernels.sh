#!/usr/bin/env bash
# The GPU kernel suite on one H100/H200, under 10 minutes end to end:
#
#   bash benchmarks/gpu_kernels.sh [OUT]        # OUT defaults to runs/kernels-gpu
#
# 1. the Triton kernel tests, compiled for the GPU (CI runs them interpreted on CPU);
# 2. python -m benchmarks.kernels: torch reference vs ours vs fla, every implementation checked
#    before it is timed, results written to OUT/kernels.{json,md,png} after every case;
# 3. prints OUT/kernels.md (paste it into the closing note).
#
# Needs a python with torch and triton (PY=..., default .venv/bin/python, else python3). fla is
# optional: if it is missing and .wheels/ holds its pure-Python wheels, they are installed from
# there (fetch them beforehand where a registry is reachable:
#   pip download --no-deps -d .wheels flash-linear-attention==0.6.0 fla-core==0.6.0);
# without fla its rows say why they failed and everything else still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/kernels-gpu}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/ and distill/ from this checkout
if ! "$PY" -c "import distill_kernels" 2>/dev/null; then  # not installed: expose kernels/ under its package name
    shim=$(mktemp -d)
    ln -s "$PWD/kernels" "$shim/distill_kernels"
    export PYTHONPATH="$shim:$PYTHONPATH"
fi
if ! "$PY" -c "import fla" 2>/dev/null && ls .wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index .wheels/*.whl
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    "$PY" -c "import fla; print('fla', fla.__version__)" 2>/dev/null || echo "fla: not installed"
} | tee "$OUT/gpu.txt"

echo "== kernel tests (compiled, one autotune config) =="
DISTILL_TRITON_AUTOTUNE=0 timeout 200 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    -k "triton or dispatch or bad_input or once or benchmark" 2>&1 | tail -25 | tee "$OUT/tests.txt"

echo "== benchmark =="
timeout 330 "$PY" -m benchmarks.kernels --out "$OUT"
status=$?
[ $status -eq 0 ] || echo "benchmark stopped early (exit $status); the table below holds the cases that finished"
cat "$OUT/kernels.md"
