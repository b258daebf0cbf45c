#!/usr/bin/env bash
# Set-up (scripts/setup.sh), then the main job: quantize the small trained MoE that ships with the repository,
# export a compressed-tensors checkpoint, reload it with transformers and print both perplexities.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/main_job.py "$@"
