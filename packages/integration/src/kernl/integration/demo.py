"""``kernl demo``: run the layernorm kernels against their PyTorch references and print the result."""

import sys

import torch


def run_demo(device: str) -> bool:
    """Compare ``layer_norm``/``rms_norm`` (fused residual included) with the references on ``device``.

    Prints one line per check (max absolute error) and returns True when every check is within 1e-3.
    """
    from kernl.layernorm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 768, generator=generator).to(device, torch.float16)
    residual = torch.randn(64, 768, generator=generator).to(device, torch.float16)
    weight = torch.rand(768, generator=generator).to(device, torch.float16)
    bias = torch.randn(768, generator=generator).to(device, torch.float16)
    checks = {
        "layer_norm": (layer_norm(x, weight, bias, 1e-12), layer_norm_reference(x, weight, bias, 1e-12)),
        "layer_norm(x + residual)": (
            layer_norm(x, weight, bias, 1e-12, residual=residual)[0],
            layer_norm_reference(x, weight, bias, 1e-12, residual)[0],
        ),
        "rms_norm (T5)": (rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6)),
    }
    all_ok = True
    print(f"kernl demo on {device} (fp16, 64 x 768): Triton kernel vs PyTorch reference")
    for name, (kernel_out, reference_out) in checks.items():
        error = (kernel_out.float() - reference_out.float()).abs().max().item()
        ok = error <= 1e-3 * (1 + reference_out.float().abs().max().item())
        all_ok &= ok
        print(f"  {name:<26} max |error| = {error:.2e}  {'OK' if ok else 'MISMATCH'}")
    return all_ok


if __name__ == "__main__":  # `kernl demo` runs this in a fresh Python when its own cannot interpret kernels
    sys.exit(0 if run_demo("cpu") else 1)
