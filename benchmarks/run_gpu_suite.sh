#!/usr/bin/env bash
# GPU suite of issue "GPU fast path": build the extension with CUDA, run the GPU tests and the benchmarks, tee every
# log to $OUT (default ./out). Budget: ~13 minutes on one H100 (build ~2 min with sm_90 only, GPU tests ~4).
# Usage (repository root): bash benchmarks/run_gpu_suite.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
QUICK="${1:-}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"

EXTRA=()
if [ ! -d /usr/include/eigen3 ] && [ -d "$PWD/.carry/include" ]; then
  EXTRA+=("-Ccmake.define.MOEQUANT_EXTRA_INCLUDE_DIR=$PWD/.carry/include")
fi
echo "== build ($(date +%T))" | tee "$OUT/build.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/build.log"
"$PY" -m pip install --no-build-isolation --no-deps -e . -Ccmake.define.MOEQUANT_CUDA=ON \
  -Ccmake.define.MOEQUANT_CUDA_ARCHS=90 "${EXTRA[@]}" >> "$OUT/build.log" 2>&1
rc=$?
tail -5 "$OUT/build.log"
if [ $rc -ne 0 ]; then echo "BUILD FAILED (see $OUT/build.log)"; exit 1; fi
"$PY" -c "import moequant._C as C; assert C.cuda_compiled(), 'extension built without CUDA'; print('cuda_compiled OK')" \
  2>&1 | tee -a "$OUT/build.log"

echo "== pytest -m gpu ($(date +%T))"
timeout 400 "$PY" -m pytest -m gpu tests/python -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40

run() {  # name, timeout seconds, command...
  local name=$1 t=$2
  shift 2
  echo "== $name ($(date +%T))"
  timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log" | tail -30
}
run bench_gptq 170 "$PY" benchmarks/bench_gptq.py $QUICK
run bench_gptq_format 300 "$PY" benchmarks/bench_gptq_format.py $QUICK
run bench_hadamard 60 "$PY" benchmarks/bench_hadamard.py
run bench_quant_pack 45 "$PY" benchmarks/bench_quant_pack.py
run bench_hessian 120 "$PY" benchmarks/bench_hessian.py
run bench_layer 150 "$PY" benchmarks/bench_layer.py
echo "== done ($(date +%T)); logs in $OUT"
