#!/usr/bin/env bash
# One GPU session: tests (bf16 too; hypothesis without shrinking, $1 examples a test), benchmark, sweep.
# Each test file runs on its own, with its own time limit, so a slow one cannot hide the others' reports.
# Usage from the repo root: bash packages/flash_attention/benchmarks/gpu_run.sh [examples] [tests|varlen_tests|candidate_tests|bench|sweep|candidates|varlen|buckets ...]
cd "$(dirname "$0")/../../.."
source testing/gpu_env.sh
export KERNL_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=gpufast OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
examples="${1:-25}"; shift || true
steps="${*:-tests bench sweep}"
run_tests() {  # $1: test file, $2: seconds
  timeout "$2" python3 -c "
import sys, pytest
from hypothesis import HealthCheck, Phase, settings
settings.register_profile('gpufast', max_examples=$examples, deadline=None, suppress_health_check=list(HealthCheck),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
sys.exit(pytest.main(['$1', '-v', '--tb=short', '-rf', '-p', 'no:cacheprovider']))
" 2>&1 | tee -a "$OUT/tests.log" | grep -E "PASSED|FAILED|ERROR|^E |Error|passed|failed" | cut -c1-220 | tail -n 40
}
for step in $steps; do
  case $step in
    tests)
      run_tests packages/flash_attention/tests/test_errors.py 40
      run_tests packages/flash_attention/tests/test_torch_library.py 60
      run_tests packages/flash_attention/tests/test_attention.py 150
      run_tests packages/flash_attention/tests/test_varlen.py 150 ;;
    varlen_tests)
      run_tests packages/flash_attention/tests/test_errors.py 40
      run_tests packages/flash_attention/tests/test_varlen.py 150 ;;
    candidate_tests)  # the attention suite with a load candidate ($KERNL_TEST_ATTENTION_LOADS, default tma)
      KERNL_TEST_ATTENTION_LOADS="${KERNL_TEST_ATTENTION_LOADS:-tma}" run_tests packages/flash_attention/tests/test_attention.py 150 ;;
    candidates) timeout 280 python3 packages/flash_attention/benchmarks/sweep_flash_attention_config.py candidates 2>&1 | tee "$OUT/candidates.log" ;;
    buckets) timeout 170 python3 packages/flash_attention/benchmarks/bench_varlen.py buckets 2>&1 | tee "$OUT/bench_varlen_buckets.log" ;;
    bench) timeout 120 python3 packages/flash_attention/benchmarks/bench_flash_attention.py 2>&1 | tee "$OUT/bench.log" ;;
    varlen) timeout 150 python3 packages/flash_attention/benchmarks/bench_varlen.py sweep 2>&1 | tee "$OUT/bench_varlen.log" ;;
    sweep) timeout 70 python3 packages/flash_attention/benchmarks/sweep_flash_attention_config.py 2>&1 | tee "$OUT/sweep.log" ;;
  esac
done
