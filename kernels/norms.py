"""RMSNorm / LayerNorm over [tokens, width]: torch, or vLLM's fused CUDA ops when asked for."""
from __future__ import annotations

from kernels.backends import randn

EPS = 1e-6


def build(op: str, num_tokens: int, width: int, dtype, device, backend: str = "torch"):
    import torch
    import torch.nn.functional as F
    x = randn((num_tokens, width), dtype, device)
    weight = torch.ones(width, dtype=dtype, device=device)
    bias = torch.zeros(width, dtype=dtype, device=device)
    if backend == "vllm":
        from vllm import _custom_ops as ops
        out = torch.empty_like(x)
        if op == "rmsnorm":
            return lambda: ops.rms_norm(out, x, weight, EPS)
        return lambda: F.layer_norm(x, (width,), weight, bias, EPS)   # vLLM runs torch's LayerNorm
    if op == "rmsnorm":
        return lambda: F.rms_norm(x, (width,), weight, EPS)
    if op == "layernorm":
        return lambda: F.layer_norm(x, (width,), weight, bias, EPS)
    raise ValueError(f"norms: unknown op {op!r}")
