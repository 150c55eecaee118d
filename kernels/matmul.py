"""GEMM: [m, k] x [k, n] the way a linear layer runs it (weights stored [n, k]) -> cuBLAS/oneDNN."""
from __future__ import annotations

from kernels.backends import randn


def build(m: int, n: int, k: int, dtype, device, backend: str = "torch"):
    import torch
    x = randn((m, k), dtype, device)
    weight_t = randn((n, k), dtype, device, scale=k ** -0.5).t()   # the transposed view F.linear uses
    out = torch.empty((m, n), dtype=dtype, device=device)
    return lambda: torch.matmul(x, weight_t, out=out)
