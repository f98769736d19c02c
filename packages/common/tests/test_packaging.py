"""Every kernel package installs on its own with what it needs at run time (kernl-common brings numpy,
which Triton's interpreter computes with), states the same tested version ranges, and takes its launch
helpers and argument checks from kernl.common instead of a copy of its own."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PACKAGES = Path(__file__).resolve().parents[2]
KERNEL_PACKAGES = ["layernorm", "matmul", "flash_attention", "linear_act"]
SHARED = ["programmatic_launch", "runs_triton_kernel", "switched_off", "capability", "sm_count",
          "multiprocessor_count", "check_float_tensor", "check_tensor", "check_same", "check_real"]  # fmt: skip


def _dependencies(package: str) -> dict[str, str]:
    """``{distribution name: version specifier or URL}`` of ``packages/<package>``."""
    project = tomllib.loads((PACKAGES / package / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        name, rest = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", requirement).groups()
        found[name] = rest
    return found


def test_kernl_common_declares_what_the_kernels_need_at_run_time():
    assert {"torch", "triton", "numpy"} <= set(_dependencies("common"))


@pytest.mark.parametrize("package", KERNEL_PACKAGES)
def test_each_kernel_package_depends_on_kernl_common_by_its_path(package):
    assert _dependencies(package)["kernl-common"] == "@ {root:parent:uri}/common"


@pytest.mark.parametrize("package", [*KERNEL_PACKAGES, "integration"])
def test_every_package_states_kernl_commons_torch_and_triton_ranges(package):
    common = _dependencies("common")
    declared = _dependencies(package)
    assert {name: declared[name] for name in ("torch", "triton")} == {
        n: common[n] for n in ("torch", "triton")
    }


@pytest.mark.parametrize("package", KERNEL_PACKAGES)
def test_no_kernel_package_defines_a_shared_helper_again(package):
    sources = (PACKAGES / package / "src").rglob("*.py")
    defined = {m for path in sources for m in re.findall(r"^def _?(\w+)\(", path.read_text(), re.M)}
    assert not defined & set(SHARED)
