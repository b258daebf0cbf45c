#!/usr/bin/env bash
# Set-up (scripts/setup.sh), then every test: the C++ core under CTest, then pytest.
# GPU tests are marked `gpu` and skip without a GPU; run them on a GPU machine (docs/gpu-runs.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# every test runs: set-up also installs Debian's chromium (the HTML report's browser test) and lm-evaluation-harness
# (the lm_eval test); MOEQUANT_BROWSER=0 / MOEQUANT_LMEVAL=0 skip those installs (their tests then skip)
export MOEQUANT_BROWSER="${MOEQUANT_BROWSER:-1}" MOEQUANT_LMEVAL="${MOEQUANT_LMEVAL:-1}"
bash scripts/setup.sh

echo "[test] C++ core: build and CTest"
GEN=()
[ -x .venv/bin/ninja ] && GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja")
.venv/bin/cmake -S . -B build/cpp "${GEN[@]}" -DMOEQUANT_CUDA=OFF -DMOEQUANT_BUILD_TESTS=ON >/dev/null
.venv/bin/cmake --build build/cpp -j"$(nproc)"
(cd build/cpp && ../../.venv/bin/ctest --output-on-failure -j"$(nproc)")

echo "[test] Python: pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "[test] pytest collected no tests: that is a failure here (tests/python must not be empty)" >&2
  exit 1
fi
exit $rc
