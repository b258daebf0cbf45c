#!/usr/bin/env bash
# Prepares, on the development machine, what the GPU machine lacks (no network there), in git-ignored folders that
# the device tool carries (64 MiB per call in all, the working tree included):
#   .carry/include    Eigen and fmt headers (the extension's build)
#   .whl              compressed-tensors 0.20.0 and the packages it needs, transformers 5.23.0 (the tested version;
#                     the image has 5.17), for python 3.12 manylinux
#   .whl-llmc         llm-compressor 0.14.0.1 and its pins (compressed-tensors 0.19), for bench_e2e --llmcompressor
#   .carryq/q.tar.xz  ../shared's tiny trained MoE, evaluation texts and baselines (the quality tables)
# .carry/prebuilt (the extension built on the GPU machine) comes back from a run of scripts/gpu_steps.sh: unpack its
# $OUT/prebuilt into .carry/prebuilt. Sizes (session 12): headers 7.3 MB, prebuilt 6 MB, .whl 16 MB, .whl-llmc 5 MB,
# .carryq 28 MB, the working tree ~12 MB: with a matching prebuilt carry `.carry/prebuilt` (not the headers), and
# leave .whl-llmc out of the quality calls. Usage (repository root): bash scripts/gpu_carry.sh [SHARED_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared}
mkdir -p .carry/include .whl .whl-llmc .carryq
[ -d .carry/include/Eigen ] || cp -r /usr/include/eigen3/Eigen .carry/include/
[ -d .carry/include/fmt ] || cp -r /usr/include/fmt .carry/include/
D=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
"${D[@]}" -d .whl compressed-tensors==0.20.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types \
  typing-inspection loguru transformers==5.23.0
"${D[@]}" -d .whl-llmc llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets loguru pydantic==2.12.5 \
  pydantic-core==2.41.5 annotated-types typing-inspection auto-round==0.15.1 dill multiprocess
[ -f .carryq/q.tar.xz ] || tar -C "$SHARED" -cJf .carryq/q.tar.xz models/qwen3moe-tiny data/evaltext baselines
du -sh .carry .whl .whl-llmc .carryq
