"""Root pytest configuration shared by every package's tests.

* ``KERNL_TEST_DEVICE`` (``cpu`` default, or ``cuda``) picks the device; ``cpu`` turns on Triton's
  interpreter before any kernel module is imported.
* Hypothesis profiles: ``cpu`` (small, fast; derandomised when ``CI`` is set) and ``gpu`` (more examples,
  no shrinking).
  ``HYPOTHESIS_PROFILE`` overrides the choice.
* Every test runs with uninitialised memory poisoned: ``torch.empty`` returns NaN-filled float tensors
  (torch's deterministic mode), so an output element a kernel forgets to write fails the tolerance rule.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "testing"))

from kernl_testing.device import TEST_DEVICE, configure  # noqa: E402

configure()

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

_quiet_checks = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile(
    "cpu",
    max_examples=20,
    deadline=None,
    suppress_health_check=_quiet_checks,
    derandomize=bool(os.environ.get("CI")),
)
# No shrinking on the GPU: every shrink step can compile new kernel specialisations (minutes); the
# first falsifying example is reported as found.
settings.register_profile(
    "gpu",
    max_examples=100,
    deadline=None,
    suppress_health_check=_quiet_checks,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if TEST_DEVICE == "cuda" else "cpu"))


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Fill every freshly allocated tensor with NaN for the duration of a test."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def pytest_report_header(config):
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    return f"kernl: device={TEST_DEVICE}, triton interpreter={'on' if interpreter else 'off'}"
