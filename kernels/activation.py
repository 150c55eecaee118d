"""MLP activations: SiLU(gate)*up over [tokens, 2*width] -> [tokens, width], or GELU over width."""
from __future__ import annotations

from kernels.backends import randn


def build(op: str, num_tokens: int, width: int, dtype, device, backend: str = "torch"):
    import torch
    import torch.nn.functional as F
    if op == "silu_mul":
        x = randn((num_tokens, 2 * width), dtype, device)
        if backend == "vllm":
            import vllm._custom_ops  # noqa: F401  (loads vllm._C, which registers torch.ops._C)
            out = torch.empty((num_tokens, width), dtype=dtype, device=device)
            return lambda: torch.ops._C.silu_and_mul(out, x)
        return lambda: F.silu(x[:, :width]) * x[:, width:]
    if op == "gelu":
        x = randn((num_tokens, width), dtype, device)
        if backend == "vllm":
            import vllm._custom_ops  # noqa: F401
            out = torch.empty_like(x)
            return lambda: torch.ops._C.gelu_new(out, x)
        return lambda: F.gelu(x, approximate="tanh")
    raise ValueError(f"activation: unknown op {op!r}")
