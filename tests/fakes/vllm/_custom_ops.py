"""Fake ``vllm._custom_ops``: the ops opcast's kernels call, with the signatures of
vllm/_custom_ops.py (vllm-project/vllm @0002bde5, read for this fake):
``rms_norm(out, input, weight, epsilon)``, ``fused_add_rms_norm(input, residual, weight, epsilon)``
(in place on input and residual), ``rotary_embedding(positions, query, key, head_size,
cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False)`` (in place),
``reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
k_scale, v_scale)``; importing it registers ``torch.ops._C.silu_and_mul(out, input)`` and
``gelu_new(out, input)`` as loading vllm._C does. Each checks what the CUDA kernel needs
(csrc/layernorm_kernels.cu, pos_encoding_kernels.cu, cache_kernels.cu, activation_kernels.cu)
and computes the real result on the CPU."""
from __future__ import annotations

import torch

from tests.fakes import CALLS, record, require


def _rms(x, weight, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight if weight is not None else xf.to(x.dtype)


def rms_norm(out, input, weight, epsilon):
    require(input.stride(-1) == 1 and out.is_contiguous(), "rms_norm: input last dim and out must be contiguous")
    require(out.shape == input.shape and out.dtype == input.dtype, "rms_norm: out must match input")
    require(weight is None or weight.shape == (input.shape[-1],), "rms_norm: weight must be (hidden,)")
    record(CALLS, "rms_norm", out=out, input=input, weight=weight, epsilon=epsilon)
    out.copy_(_rms(input, weight, epsilon))


def fused_add_rms_norm(input, residual, weight, epsilon):
    require(input.shape == residual.shape and input.dtype == residual.dtype, "input and residual must match")
    require(input.is_contiguous() and residual.is_contiguous(), "fused_add_rms_norm: contiguous input/residual")
    record(CALLS, "fused_add_rms_norm", input=input, residual=residual, weight=weight, epsilon=epsilon)
    residual.add_(input)
    input.copy_(_rms(residual, weight, epsilon))


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False):
    require(positions.dtype == torch.int64, "positions must be int64")
    require(query.shape[0] == positions.shape[0], "one position per token")
    require(query.shape[-1] % head_size == 0 and (key is None or key.shape[-1] % head_size == 0),
            "query/key width must be a multiple of head_size")
    require(cos_sin_cache.dtype == query.dtype, "cos_sin_cache must be in the query's dtype")
    require(int(positions.max()) < cos_sin_cache.shape[0], "position beyond cos_sin_cache")
    record(CALLS, "rotary_embedding", positions=positions, query=query, key=key, head_size=head_size,
           cos_sin_cache=cos_sin_cache, is_neox=is_neox)
    rot = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    for t in (query, key) if key is not None else (query,):
        v = t.view(t.shape[0], -1, head_size)
        x1, x2 = v[..., :rot // 2].clone(), v[..., rot // 2:rot].clone()
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        v[..., :rot // 2] = x1 * c - x2 * s
        v[..., rot // 2:rot] = x2 * c + x1 * s


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    require(slot_mapping.dtype == torch.int64, "slot_mapping must be int64")
    require(key.dim() == 3 and key.shape == value.shape, "key/value must be (num_tokens, num_heads, head_size)")
    require(key.stride(-1) == 1 and key.stride(-2) == key.shape[-1],
            "key heads must be packed (head stride = head_size)")
    require(key_cache.dim() == 4 and key_cache.shape == value_cache.shape,
            "key/value cache must be (num_blocks, block_size, num_heads, head_size)")
    require(key_cache.shape[2:] == key.shape[1:], "cache heads / head_size must match key")
    require(key_cache.stride(0) == value_cache.stride(0), "key and value cache block strides must match")
    require(slot_mapping.shape == (key.shape[0],), "one slot per token")
    require(kv_cache_dtype in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"), f"unknown kv_cache_dtype {kv_cache_dtype!r}")
    require(isinstance(k_scale, torch.Tensor) and k_scale.dtype == torch.float32 and k_scale.numel() == 1,
            "k_scale must be a float32 tensor of one value")
    require(isinstance(v_scale, torch.Tensor) and v_scale.dtype == torch.float32 and v_scale.numel() == 1,
            "v_scale must be a float32 tensor of one value")
    require(int(slot_mapping.max()) < key_cache.shape[0] * key_cache.shape[1], "slot beyond the cache")
    record(CALLS, "reshape_and_cache_flash", key=key, value=value, key_cache=key_cache, value_cache=value_cache,
           slot_mapping=slot_mapping, kv_cache_dtype=kv_cache_dtype, k_scale=k_scale, v_scale=v_scale)
    key_cache.view(-1, *key.shape[1:])[slot_mapping] = key
    value_cache.view(-1, *value.shape[1:])[slot_mapping] = value


def _silu_and_mul(out, input):
    d = input.shape[-1] // 2
    require(out.shape == (*input.shape[:-1], d), "silu_and_mul: out must be [..., d] for input [..., 2d]")
    record(CALLS, "silu_and_mul", out=out, input=input)
    out.copy_(torch.nn.functional.silu(input[..., :d]) * input[..., d:])


def _gelu_new(out, input):
    require(out.shape == input.shape, "gelu_new: out must match input")
    record(CALLS, "gelu_new", out=out, input=input)
    out.copy_(torch.nn.functional.gelu(input, approximate="tanh"))


def _register() -> None:
    """torch.ops._C.silu_and_mul / gelu_new, once per process (as vllm._C registers them)."""
    if hasattr(torch.ops._C, "silu_and_mul"):
        return
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define("silu_and_mul(Tensor(a!) out, Tensor input) -> ()")
    lib.define("gelu_new(Tensor(a!) out, Tensor input) -> ()")
    lib.impl("silu_and_mul", lambda out, input: _dispatch("_silu_and_mul", out, input), "CPU")
    lib.impl("gelu_new", lambda out, input: _dispatch("_gelu_new", out, input), "CPU")
    torch._fake_vllm_lib = lib      # keep the registration alive


def _dispatch(name, *args):
    import sys
    getattr(sys.modules[__name__], name)(*args)


_register()
