#!/usr/bin/env bash
# The GPU machine's side of a device-tool call (docs/gpu-runs.md from session 12 on): installs the carried wheels
# (scripts/gpu_carry.sh) into /tmp, gets the extension (.carry/prebuilt when its stamp -- a hash of the C++/CUDA
# sources and build files -- matches, else the build of a warm machine in /tmp/mqsite, else a fresh sm_90 build,
# around the kernels of .carry/kernels when scripts/gpu_kernels.sh compiled them from this tree, whose .so comes back
# xz-compressed in $OUT/prebuilt), then runs the named steps, each within what is left of
# BUDGET seconds, with their logs under $OUT:
#   STEPS="custom gputests qwen4 qwen4llmc qwenprof ds1 ds2 kimi1 cgroup quality" BUDGET=570 bash scripts/gpu_steps.sh
# custom: bash -c "$CUSTOM" (at most CMAX s); QL: Qwen3 layers; CGL: the cgroup run's layers; QROWS / QW: the
# quality table's configs and workers; DSARGS / KIMIARGS: extra bench_e2e arguments. On a card of more than 100 GB
# the DeepSeek-V3 and Kimi-K2 steps get an H100's budget (--device-memory-gb 70).
set -uo pipefail
T0=$(date +%s)
BUDGET=${BUDGET:-570}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CMAKE_BUILD_PARALLEL_LEVEL=16
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "=== $* (t=$(( $(date +%s) - T0 ))s, left $(left)s)"; }
tmo() { local want=$1 l; l=$(( $(left) - 8 )); [ "$want" -lt "$l" ] && echo "$want" || echo "$l"; }

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,memory.used --format=csv,noheader
GPU_MB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
df -h /tmp /dev/shm | tail -2; free -g | head -2

if [ -d .whl ] && [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.ok || echo "WHEELS FAILED"
fi
if [ -d .whl-llmc ] && [ ! -f /tmp/llmc/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llmc .whl-llmc/*.whl \
    && touch /tmp/llmc/.ok || echo "LLMC WHEELS FAILED"
fi
export PYTHONPATH=/tmp/site:$PWD/python
if [ -f .carryq/q.tar.xz ] && [ ! -d /tmp/q/models ]; then mkdir -p /tmp/q && tar -xJf .carryq/q.tar.xz -C /tmp/q; fi

STAMP=$(bash scripts/source_stamp.sh libmoequant kernels bindings cmake build_support CMakeLists.txt pyproject.toml)
log "build (stamp $STAMP)"
if [ -f .carry/prebuilt/stamp ] && [ "$(cat .carry/prebuilt/stamp)" = "$STAMP" ]; then
  xz -dc .carry/prebuilt/C.so.xz > python/moequant/_C.cpython-312-x86_64-linux-gnu.so && cp .carry/prebuilt/_build_info.py python/moequant/ && echo "prebuilt used"
elif [ -f /tmp/mqsite/stamp ] && [ "$(cat /tmp/mqsite/stamp)" = "$STAMP" ]; then
  cp /tmp/mqsite/moequant/_C*.so /tmp/mqsite/moequant/_build_info.py python/moequant/ && echo "warm build used"
else
  rm -rf /tmp/mqsite
  # the kernels compiled on the development machine (scripts/gpu_kernels.sh) when they are this tree's
  KSTAMP=$(bash scripts/source_stamp.sh libmoequant kernels)
  KLIB=(-Ccmake.define.MOEQUANT_CUDA_PREBUILT=)  # empty unless they match: the build directory's cache keeps a value
  if [ -f .carry/kernels/stamp ] && [ "$(cat .carry/kernels/stamp)" = "$KSTAMP" ]; then
    xz -dc .carry/kernels/libmoequant_cuda.a.xz > /tmp/libmoequant_cuda.a && KLIB=(-Ccmake.define.MOEQUANT_CUDA_PREBUILT=/tmp/libmoequant_cuda.a)
    echo "prebuilt kernels used (stamp $KSTAMP)"
  fi
  python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/mqsite . "${KLIB[@]}" \
    -Ccmake.define.MOEQUANT_CUDA=ON -Ccmake.define.MOEQUANT_CUDA_ARCHS=90 \
    -Ccmake.define.MOEQUANT_EXTRA_INCLUDE_DIR="$PWD/.carry/include" -Cbuild-dir=/tmp/mqbuild > "$OUT/build.log" 2>&1
  rc=$?; tail -5 "$OUT/build.log"
  [ $rc -eq 0 ] || { echo "BUILD FAILED"; exit 1; }
  echo "$STAMP" > /tmp/mqsite/stamp
  cp /tmp/mqsite/moequant/_C*.so /tmp/mqsite/moequant/_build_info.py python/moequant/
  mkdir -p "$OUT/prebuilt" && xz -T8 -6 -c /tmp/mqsite/moequant/_C*.so > "$OUT/prebuilt/C.so.xz" \
    && cp /tmp/mqsite/moequant/_build_info.py "$OUT/prebuilt/" && echo "$STAMP" > "$OUT/prebuilt/stamp"
fi
python3 -c 'import torch, transformers, compressed_tensors as ct, moequant._C as C; print("torch", torch.__version__, "transformers", transformers.__version__, "ct", ct.__version__, "cuda kernels", C.cuda_compiled())' || exit 1

DSMEM=""
[ "${GPU_MB:-0}" -gt 100000 ] && DSMEM="--device-memory-gb 70"
E2E="python3 benchmarks/bench_e2e.py"
for s in ${STEPS:-}; do
  [ "$(left)" -lt 25 ] && { log "no time left for $s"; break; }
  log "step $s"
  case $s in
    custom) timeout "$(tmo ${CMAX:-400})" bash -c "$CUSTOM" 2>&1 | tee "$OUT/custom.log" ;;
    gputests) timeout "$(tmo ${CMAX:-400})" python3 -m pytest -m gpu -q -p no:cacheprovider tests/python 2>&1 | tee "$OUT/gputests.log" | tail -40 ;;
    qwen4) timeout "$(tmo 300)" $E2E --model qwen3-30b-a3b --layers "${QL:-4}" --json "$OUT/qwen4.json" 2>&1 | tee "$OUT/qwen4.log" | grep -v "it/s\]" ;;
    qwen4llmc) timeout "$(tmo 500)" $E2E --model qwen3-30b-a3b --layers "${QL:-3}" --llmcompressor /tmp/llmc --json "$OUT/qwen4llmc.json" 2>&1 | tee "$OUT/qwen4llmc.log" | grep -v "it/s\]" ;;
    qwenprof) timeout "$(tmo 300)" $E2E --model qwen3-30b-a3b --layers 2 --profile-layer 1 --profile-out "$OUT/prof_qwen.txt" ${PROFTRACE:+--profile-trace "$OUT/trace_qwen.json.gz"} 2>&1 | tee "$OUT/qwenprof.log" | grep -v "it/s\]" | tail -30 ;;
    ds1) timeout "$(tmo 500)" $E2E --model deepseek-v3 --layers 1 --out /dev/shm/moequant-out $DSMEM ${DSARGS:-} --json "$OUT/ds1.json" 2>&1 | tee "$OUT/ds1.log" | grep -v "it/s\]" ;;
    ds2) timeout "$(tmo 550)" $E2E --model deepseek-v3 --layers 2 --out /dev/shm/moequant-out $DSMEM ${DSARGS:-} --json "$OUT/ds2.json" 2>&1 | tee "$OUT/ds2.log" | grep -v "it/s\]" ;;
    kimi1) timeout "$(tmo 500)" $E2E --model kimi-k2 --layers 1 --out /dev/shm/moequant-out $DSMEM ${KIMIARGS:-} --json "$OUT/kimi1.json" 2>&1 | tee "$OUT/kimi1.log" | grep -v "it/s\]" ;;
    cgroup) timeout "$(tmo 500)" python3 scripts/host_memory_cgroup.py --layers "${CGL:-2}" --json "$OUT/cgroup.json" 2>&1 | tee "$OUT/cgroup.log" | grep -v "it/s\]" | tail -40 ;;
    quality) timeout "$(tmo 560)" python3 benchmarks/quality_table.py --out "$OUT/quality" --configs "$QROWS" --workers "${QW:-8}" \
               --model /tmp/q/models/qwen3moe-tiny --text-dir /tmp/q/data/evaltext --baseline /tmp/q/baselines/qwen3moe-tiny.json 2>&1 | tee "$OUT/quality.log" | tail -40 ;;
    *) echo "unknown step $s" ;;
  esac
done
log "end"
nvidia-smi --query-gpu=memory.used --format=csv,noheader
