"""Test support shared by every kernl package: device switch, hypothesis strategies, tolerance rule."""

from kernl_testing.device import (
    TEST_DEVICE,
    float_dtypes,
    needs_two_devices,
    needs_two_gpus,
    on_gpu,
    other_device,
)
from kernl_testing.strategies import LAYOUTS, ValueSpec, layouts, make_tensor, value_specs
from kernl_testing.tolerance import assert_matches_reference, reduction_scale, tolerance_for

__all__ = [
    "LAYOUTS",
    "TEST_DEVICE",
    "ValueSpec",
    "assert_matches_reference",
    "float_dtypes",
    "layouts",
    "make_tensor",
    "needs_two_devices",
    "needs_two_gpus",
    "on_gpu",
    "other_device",
    "reduction_scale",
    "tolerance_for",
    "value_specs",
]
