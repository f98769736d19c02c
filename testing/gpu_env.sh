# Source me: puts the test helpers and every package's source on PYTHONPATH (the GPU image has the
# dependencies but not the kernl packages), so tests, benchmarks and tools run from the source tree.
_kernl_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="$_kernl_root/testing:${PYTHONPATH:-}"
for _src in "$_kernl_root"/packages/*/src; do PYTHONPATH="$_src:$PYTHONPATH"; done
export PYTHONPATH PYTHONUNBUFFERED=1
unset _kernl_root _src
