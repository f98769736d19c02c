"""The argument checks the kernel packages share: TypeError for a wrong type, ValueError for a wrong
value, each message naming the argument."""

import numpy as np
import pytest
import torch

from kernl.common.checks import check_float_tensor, check_real, check_same, check_tensor


@pytest.mark.parametrize(
    "value, error, message",
    [
        ([1.0], TypeError, "x must be a torch.Tensor, got list"),
        (torch.zeros(2, dtype=torch.float64), TypeError, "x must be float16, bfloat16 or float32, got torch.float64"),
        (torch.zeros(2, dtype=torch.int32), TypeError, "x must be float16"),
        (torch.zeros(2, device="meta"), ValueError, "x must be on a CUDA device"),
        (torch.zeros(2, requires_grad=True), ValueError, "x requires grad"),
    ],
)  # fmt: skip
def test_check_float_tensor_refuses_naming_the_argument(value, error, message):
    with pytest.raises(error, match=message):
        check_float_tensor("x", value)


def test_check_float_tensor_accepts_float_tensors_and_grad_outside_autograd():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        check_float_tensor("x", torch.zeros(2, dtype=dtype))
    with torch.no_grad():
        check_float_tensor("x", torch.zeros(2, requires_grad=True))


def test_check_tensor_names_the_accepted_dtypes():
    check_tensor("mask", torch.zeros(2, dtype=torch.bool), (torch.bool,), "bool")
    with pytest.raises(TypeError, match="mask must be bool, got torch.float32"):
        check_tensor("mask", torch.zeros(2), (torch.bool,), "bool")


def test_check_same_names_both_arguments():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=r"bias must have the dtype of x \(torch.float32\)"):
        check_same("bias", x.half(), "x", x)
    check_same("bias", x.clone(), "x", x)


@pytest.mark.parametrize("value", ["1e-5", None, True, 1j, torch.tensor(1e-5)])
def test_check_real_refuses_a_non_number_with_type_error(value):
    with pytest.raises(TypeError, match="eps must be a real number"):
        check_real("eps", value)


@pytest.mark.parametrize(
    "value, bounds, message",
    [(float("nan"), {}, "finite"), (float("inf"), {}, "finite"), (-1.0, {"minimum": 0.0}, "at least 0.0"),
     (0.0, {"positive": True}, "positive"), (-0.5, {"positive": True}, "positive")],
)  # fmt: skip
def test_check_real_refuses_a_bad_value_with_value_error(value, bounds, message):
    with pytest.raises(ValueError, match=f"eps must be {message}"):
        check_real("eps", value, **bounds)


def test_check_real_returns_a_python_float():
    for value in (0, 1e-5, np.float32(0.5), np.int64(2)):
        result = check_real("eps", value, minimum=0.0)
        assert type(result) is float and result == float(value)
