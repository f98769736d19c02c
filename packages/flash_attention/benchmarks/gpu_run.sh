#!/usr/bin/env bash
# One GPU session: tests (bf16 too; hypothesis without shrinking, $1 examples a test), benchmark, sweep.
# Usage from the repo root: bash packages/flash_attention/benchmarks/gpu_run.sh [examples] [tests|bench|sweep ...]
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 KERNL_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=gpufast OUT="${OUT:-/tmp/out}"
export PYTHONPATH="$PWD/testing:$PWD/packages/flash_attention/src:$PWD/packages/layernorm/src"
mkdir -p "$OUT"
examples="${1:-25}"; shift || true
steps="${*:-tests bench sweep}"
for step in $steps; do
  case $step in
    tests) timeout 120 python3 -c "
import sys, pytest
from hypothesis import HealthCheck, Phase, settings
settings.register_profile('gpufast', max_examples=$examples, deadline=None, suppress_health_check=list(HealthCheck),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
sys.exit(pytest.main(['packages/flash_attention/tests', '-q', '--maxfail=6', '-p', 'no:cacheprovider']))
" 2>&1 | tee "$OUT/tests.log" | tail -n 60 ;;
    bench) timeout 120 python3 packages/flash_attention/benchmarks/bench_flash_attention.py 2>&1 | tee "$OUT/bench.log" ;;
    sweep) timeout 70 python3 packages/flash_attention/benchmarks/sweep_flash_attention_config.py 2>&1 | tee "$OUT/sweep.log" ;;
  esac
done
