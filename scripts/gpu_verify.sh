#!/usr/bin/env bash
# GPU verification in one go, for a machine with an NVIDIA GPU and torch installed (no network needed):
# build with the CUDA kernels, run the GPU-marked tests, optionally train the shipped tiny MoE, and run the
# quality gate on the GPU. Logs go to $OUT (default ./out/gpu). Used for the runs recorded in docs/gpu-runs.md.
#   OUT=... TRAIN=1 QUALITY_MODEL=... QUALITY_TEXT=... bash scripts/gpu_verify.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PY=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T))"; }
{
  step "device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

  step "build (CUDA kernels for ${MOEQUANT_CUDA_ARCHS:-90})"
  EXTRA=()
  [ -d /usr/include/eigen3 ] || EXTRA+=(-Ccmake.define.MOEQUANT_EXTRA_INCLUDE_DIR="$PWD/.carry/include")
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  $PY -m pip install -q --no-build-isolation --no-deps -e . "${EXTRA[@]}" -Ccmake.define.MOEQUANT_CUDA=ON \
      -Ccmake.define.MOEQUANT_CUDA_ARCHS="${MOEQUANT_CUDA_ARCHS:-90}" -Cbuild-dir=build/gpu || exit 1
  $PY -c 'import moequant._C as C; print("cuda kernels compiled:", C.cuda_compiled())'

  step "GPU tests"
  $PY -m pytest -m gpu -q -p no:cacheprovider tests/python

  if [ "${TRAIN:-0}" = 1 ]; then
    step "train the tiny MoE"
    rm -rf "$OUT/tiny_model"
    $PY examples/tiny_moe/train.py --out "$OUT/tiny_model"
    rm -f "$OUT/tiny_model/tokenizer.json" "$OUT/tiny_model/tokenizer_config.json"  # shipped already
  fi

  if [ -n "${QUALITY_MODEL:-}" ]; then
    step "quality gate on the GPU"
    $PY benchmarks/quality.py --model "$QUALITY_MODEL" --text-dir "$QUALITY_TEXT" --device cuda \
        --configs "${QUALITY_CONFIGS:-bf16,rtn-w4,gptq-w4,rtn-w3,gptq-w3}" --json "$OUT/quality_gpu.json"
  fi
  step "done"
} 2>&1 | tee "$LOG"
