"""MLP activations: SiLU(gate)*up over [tokens, 2*width] -> [tokens, width], or GELU over width.
Backends as in kernels.norms: ``torch``, ``compile`` (torch-native under torch.compile, vLLM's
default) or ``vllm`` (``torch.ops._C.silu_and_mul(out, input)`` / ``gelu_new(out, input)``, the
ops vLLM's SiluAndMul / NewGELU call in forward_cuda)."""
from __future__ import annotations

from kernels.backends import compiled, randn


def silu_mul_native(x):
    import torch.nn.functional as F
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_native(x):
    import torch.nn.functional as F
    return F.gelu(x, approximate="tanh")


def build(op: str, num_tokens: int, width: int, dtype, device, backend: str = "torch"):
    import torch
    if op == "silu_mul":
        x = randn((num_tokens, 2 * width), dtype, device)
        if backend == "vllm":
            import vllm._custom_ops  # noqa: F401  (loads vllm._C, which registers torch.ops._C)
            out = torch.empty((num_tokens, width), dtype=dtype, device=device)
            return lambda: torch.ops._C.silu_and_mul(out, x)
        fn = compiled(silu_mul_native) if backend == "compile" else silu_mul_native
        return lambda: fn(x)
    if op == "gelu":
        x = randn((num_tokens, width), dtype, device)
        if backend == "vllm":
            import vllm._custom_ops  # noqa: F401
            out = torch.empty_like(x)
            return lambda: torch.ops._C.gelu_new(out, x)
        fn = compiled(gelu_native) if backend == "compile" else gelu_native
        return lambda: fn(x)
    raise ValueError(f"activation: unknown op {op!r}")
