#!/usr/bin/env bash
# The GPU suite: every package's tests on CUDA tensors (bf16 included, the larger hypothesis profile),
# then every benchmark, whose results land in benchmarks/results/<gpu>/.
# Works with the packages installed (nox -s gpu) or straight from the source tree (gpu_env.sh).
# Usage: bash testing/gpu_suite.sh [tests|bench|all] [package ...]   (default: all, every package)
# Tests run one package at a time, each with its own log in $KERNL_GPU_LOGS (default /tmp/kernl-gpu)
# and a one-line summary, so that a slow package cannot hide the others' results. On an H100 the
# whole test pass takes about 12 minutes: testing 6 s, layernorm 60 s, matmul 175 s, linear_act 120 s,
# flash_attention 255 s, integration 90 s. KERNL_GPU_PARALLEL=1 runs the packages' tests side by side
# on the one GPU (about the longest package's time; they check numbers, not speed), for a device call
# with a time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
source testing/gpu_env.sh
export KERNL_TEST_DEVICE=cuda HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-gpu}"
what="${1:-all}"; shift || true
packages=("$@")
[[ ${#packages[@]} -eq 0 ]] && packages=(testing common layernorm matmul linear_act flash_attention integration)
logs="${KERNL_GPU_LOGS:-/tmp/kernl-gpu}"
mkdir -p "$logs"
status=0
run_tests() {  # one package's tests into its log; exit status of pytest
  local path="packages/$1/tests"; [[ "$1" == testing ]] && path=testing/tests
  # Tests check numbers, not speed: no matmul autotuning (it would time every tiny test shape).
  KERNL_AUTOTUNE=0 python3 -m pytest "$path" -q -rf --tb=short -p no:cacheprovider >"$logs/$1.log" 2>&1
}
summarise() {
  echo "== $1: $(tail -n 1 "$logs/$1.log")"
  grep -E "^FAILED" "$logs/$1.log" || true
}
if [[ "$what" == tests || "$what" == all ]]; then
  if [[ "${KERNL_GPU_PARALLEL:-0}" == 1 ]]; then
    pids=()
    for package in "${packages[@]}"; do run_tests "$package" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    for package in "${packages[@]}"; do summarise "$package"; done
  else
    for package in "${packages[@]}"; do run_tests "$package" || status=1; summarise "$package"; done
  fi
fi
if [[ "$what" == bench || "$what" == all ]]; then
  for package in "${packages[@]}"; do
    for bench in packages/"$package"/benchmarks/bench_*.py; do
      [[ -e "$bench" ]] || continue
      echo "== $bench"; python3 "$bench" || status=1
    done
  done
fi
exit $status
