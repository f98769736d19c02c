#!/usr/bin/env bash
# The GPU suite: every package's tests on CUDA tensors (bf16 included, the larger hypothesis profile),
# then every benchmark, whose results land in benchmarks/results/<gpu>/.
# Works with the packages installed (nox -s gpu) or straight from the source tree (PYTHONPATH below).
# Usage: bash testing/gpu_suite.sh [tests|bench|all] [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
source testing/gpu_env.sh
export KERNL_TEST_DEVICE=cuda HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-gpu}"
what="${1:-all}"; shift || true
status=0
if [[ "$what" == tests || "$what" == all ]]; then
  # Tests check numbers, not speed: no matmul autotuning (it would time every tiny test shape).
  KERNL_AUTOTUNE=0 python3 -m pytest testing/tests packages/*/tests -q -rf "$@" || status=1
fi
if [[ "$what" == bench || "$what" == all ]]; then
  for bench in packages/*/benchmarks/bench_*.py; do
    echo "== $bench"; python3 "$bench" || status=1
  done
fi
exit $status
