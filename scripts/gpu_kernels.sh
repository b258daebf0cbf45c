#!/usr/bin/env bash
# Compiles the CUDA kernels (moequant::cuda, torch-free) for sm_90 on this machine -- nvcc 13.0, the GPU image's --
# into .carry/kernels/libmoequant_cuda.a.xz with its stamp, so that scripts/gpu_steps.sh on the GPU machine builds only
# the LibTorch extension around them (the kernels are most of the build: 155 s on one H100 machine, 442 s on an H200
# one). The stamp is a hash of the sources compiled into the library (libmoequant/, kernels/); gpu_steps.sh compiles
# the kernels itself when it does not match the tree it runs on.
#   bash scripts/gpu_kernels.sh            (from the repository root; then carry .carry/kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "gpu_kernels.sh: error: nvcc not found (the kernels need CUDA's compiler)" >&2; exit 2; }
CMAKE=$( [ -x .venv/bin/cmake ] && echo .venv/bin/cmake || echo cmake )
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
STAMP=$(bash scripts/source_stamp.sh libmoequant kernels)  # what gpu_steps.sh compares
"$CMAKE" -S . -B build/cuda90 "${GEN[@]}" -DMOEQUANT_CUDA=ON -DMOEQUANT_CUDA_ARCHS=90 -DMOEQUANT_BUILD_TESTS=OFF \
  -DMOEQUANT_BUILD_PYTHON=OFF -DMOEQUANT_INSTALL=OFF -DMOEQUANT_EXTRA_INCLUDE_DIR="$PWD/.carry/include" >/dev/null
"$CMAKE" --build build/cuda90 --target moequant_cuda -j"$(nproc)"
mkdir -p .carry/kernels
xz -T0 -6 -c build/cuda90/libmoequant_cuda.a > .carry/kernels/libmoequant_cuda.a.xz.tmp
mv .carry/kernels/libmoequant_cuda.a.xz.tmp .carry/kernels/libmoequant_cuda.a.xz
echo "$STAMP" > .carry/kernels/stamp
echo "gpu_kernels.sh: .carry/kernels/libmoequant_cuda.a.xz ($(du -h .carry/kernels/libmoequant_cuda.a.xz | cut -f1)), stamp $STAMP"
