#!/usr/bin/env bash
# The stamp of a build's sources: the first 12 hex digits of the sha256 of the named files and folders' files
# (*.pyc left out), concatenated in C-locale path order. scripts/gpu_steps.sh compares it with the stamps of carried
# builds (.carry/prebuilt: the extension's sources; .carry/kernels: the kernels', written by scripts/gpu_kernels.sh).
#   bash scripts/source_stamp.sh libmoequant kernels
set -euo pipefail
find "$@" -type f ! -name '*.pyc' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-12
