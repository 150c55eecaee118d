"""RMSNorm / LayerNorm over [tokens, width], and vLLM's residual add + RMSNorm (``fused_add_rmsnorm``).

Backends: ``torch`` (eager), ``compile`` (vLLM's torch-native forward under torch.compile, as
vLLM v1 runs it by default: custom ops are off when Inductor compiles the model), ``vllm``
(vLLM's CUDA custom ops: ``rms_norm(out, input, weight, epsilon)`` and
``fused_add_rms_norm(input, residual, weight, epsilon)``, in place on input and residual, per
vllm/_custom_ops.py @0002bde5).
"""
from __future__ import annotations

from kernels.backends import compiled, randn

EPS = 1e-6


def rms_norm_native(x, weight):
    """vLLM's RMSNorm.forward_native (vllm/model_executor/layers/layernorm.py): fp32 statistics."""
    import torch
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return xf.to(x.dtype) * weight


def fused_add_rms_norm_native(x, residual, weight):
    """vLLM's RMSNorm.forward_native with a residual: add in fp32, return (normed, new residual)."""
    import torch
    xf = x.float() + residual.float()
    new_residual = xf.to(x.dtype)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return xf.to(x.dtype) * weight, new_residual


def layer_norm_native(x, weight, bias):
    import torch.nn.functional as F
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def build(op: str, num_tokens: int, width: int, dtype, device, backend: str = "torch"):
    import torch
    import torch.nn.functional as F
    x = randn((num_tokens, width), dtype, device)
    weight = torch.ones(width, dtype=dtype, device=device)
    if op == "layernorm":                     # vLLM runs torch's LayerNorm (compiled by default)
        bias = torch.zeros(width, dtype=dtype, device=device)
        fn = compiled(layer_norm_native) if backend == "compile" else layer_norm_native
        return lambda: fn(x, weight, bias)
    if op == "rmsnorm":
        if backend == "vllm":
            from vllm import _custom_ops as ops
            out = torch.empty_like(x)
            return lambda: ops.rms_norm(out, x, weight, EPS)
        if backend == "compile":
            fn = compiled(rms_norm_native)
            return lambda: fn(x, weight)
        return lambda: F.rms_norm(x, (width,), weight, EPS)
    if op == "fused_add_rmsnorm":
        residual = randn((num_tokens, width), dtype, device)
        if backend == "vllm":
            from vllm import _custom_ops as ops
            # in place on x and residual: values drift over the reps, the work does not
            return lambda: ops.fused_add_rms_norm(x, residual, weight, EPS)
        fn = compiled(fused_add_rms_norm_native) if backend == "compile" else fused_add_rms_norm_native
        return lambda: fn(x, residual, weight)
    raise ValueError(f"norms: unknown op {op!r}")
