#!/usr/bin/env bash
# Set-up on a fresh Debian machine, idempotent: Debian packages, a .venv at the project root with the Python
# dependencies, and the moequant build (C++ core, CUDA kernels when nvcc is on PATH, the _C extension).
# Re-running it only redoes what is missing; the extension build is incremental.
# MOEQUANT_CUDA=AUTO|ON|OFF (environment) chooses whether the CUDA kernels are built (AUTO: if nvcc is found).
# MOEQUANT_BROWSER=1 (environment) also installs Debian's headless Chromium, which the HTML report's browser test
# uses (tests/python/test_report.py; skipped without it); scripts/test.sh sets it. MOEQUANT_LMEVAL=1: lm-eval (below).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

# ---- Debian packages -----------------------------------------------------------------------------------------
pkgs=(libeigen3-dev libfmt-dev catch2 g++ cmake git)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || pkgs+=(python3-venv)
if [ "${MOEQUANT_BROWSER:-0}" = 1 ]; then pkgs+=(chromium); fi
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ---- Python environment --------------------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! $PY -c 'import torch, transformers, safetensors, compressed_tensors, pytest, scikit_build_core, pybind11, yaml, tqdm, matplotlib' >/dev/null 2>&1; then
  log "installing Python dependencies into .venv (torch is large: a few minutes)"
  $PY -m pip install -q --upgrade pip
  # transformers and compressed-tensors are pinned to the versions the round-trip tests were written against
  # (docs/export.md records what loads with them); torch is the newest wheel. matplotlib: the report's figures.
  $PY -m pip install -q torch numpy safetensors "transformers==5.23.0" tqdm pyyaml "compressed-tensors==0.20.0" \
    pytest pybind11 "scikit-build-core>=0.10" ninja cmake matplotlib
fi

# lm-evaluation-harness (not a moequant dependency): MOEQUANT_LMEVAL=1 installs it for tests/python/test_lm_eval.py,
# which proves a moequant checkpoint loads and scores under `lm_eval --model hf` (skipped without it); scripts/test.sh sets it
if [ "${MOEQUANT_LMEVAL:-0}" = 1 ] && ! $PY -c 'import lm_eval' >/dev/null 2>&1; then
  log "installing lm-evaluation-harness into .venv"
  $PY -m pip install -q "lm-eval[hf]==0.4.13"
fi

# ---- build ---------------------------------------------------------------------------------------------------
log "building moequant (C++ core, CUDA kernels if nvcc is found, _C extension)"
$PY -m pip install -q --no-build-isolation --no-deps -e . -Ccmake.define.MOEQUANT_CUDA="${MOEQUANT_CUDA:-AUTO}"
$PY -c 'import moequant._C as C; print("[setup] moequant._C ok, CUDA kernels compiled:", C.cuda_compiled())'
