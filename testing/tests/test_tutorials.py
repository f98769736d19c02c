"""Every tutorial in ``tutorials/`` runs as a script on the CPU, through Triton's interpreter: a tutorial
that breaks (an exception, a failed check against its reference) fails CI.

Each runs in its own process (``TRITON_INTERPRET`` must be set before triton is imported, and a
tutorial changes process-wide state such as kernl's rule list), from a scratch directory.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernl_testing import on_gpu

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))


def test_the_tutorials_are_found():
    assert [path.name[:2] for path in TUTORIALS] == ["00", "01", "02", "03", "04", "05"]


@pytest.mark.skipif(
    on_gpu(), reason="on a GPU machine the tutorials run as scripts (see tutorials/README.md)"
)
@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_runs_on_the_cpu(tutorial, tmp_path):
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "testing"), os.environ.get("PYTHONPATH")])),
    }
    env.pop("TUTORIAL_PDB", None)  # a breakpoint would wait for input
    result = subprocess.run(
        [sys.executable, str(tutorial)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"{tutorial.name} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    if not tutorial.name.startswith("00"):  # 00 has no GPU part; the others say their timing is skipped
        assert "timing and plot skipped" in result.stdout
