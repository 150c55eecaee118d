"""Rotary position embedding (NeoX layout) applied to the query and key heads of a batch of tokens.
Backends: ``torch`` (vLLM's RotaryEmbedding.forward_native, out of place), ``compile`` (the same
under torch.compile, vLLM's default) or ``vllm`` (``rotary_embedding(positions, query, key,
head_size, cos_sin_cache, is_neox)``, in place, per vllm/_custom_ops.py @0002bde5; the cache in
the query's dtype, as vLLM's layer casts it before the call)."""
from __future__ import annotations

from kernels.backends import compiled, randn


def cos_sin_cache(max_position: int, rotary_dim: int, theta: float, dtype, device):
    import torch
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(max_position, device=device, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def _rotate(x, cos, sin, rot: int):
    import torch
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


def rope_native(positions, q, k, cache, head_dim: int, rot: int):
    """vLLM's RotaryEmbedding.forward_native for the NeoX layout, out of place."""
    cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    qr = _rotate(q.view(q.shape[0], -1, head_dim), cos, sin, rot)
    kr = _rotate(k.view(k.shape[0], -1, head_dim), cos, sin, rot)
    return qr, kr


def build(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, dtype, device,
          backend: str = "torch", max_position: int = 4096, theta: float = 10000.0):
    import torch
    rot = rotary_dim or head_dim
    cache = cos_sin_cache(max(max_position, num_tokens), rot, theta, dtype, device)
    positions = torch.arange(num_tokens, device=device, dtype=torch.int64) % cache.shape[0]
    q = randn((num_tokens, num_heads * head_dim), dtype, device)
    k = randn((num_tokens, num_kv_heads * head_dim), dtype, device)
    if backend == "vllm":
        from vllm import _custom_ops as ops
        return lambda: ops.rotary_embedding(positions, q, k, head_dim, cache, True)   # in place
    fn = compiled(rope_native) if backend == "compile" else rope_native
    return lambda: fn(positions, q, k, cache, head_dim, rot)
