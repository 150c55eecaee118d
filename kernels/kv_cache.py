"""The KV-cache write of one layer (``kv_cache_write``): the new tokens' K and V [tokens, kv heads,
head_dim] scattered into a paged cache [blocks, block_size, kv heads, head_dim] by slot.

Backends: ``vllm`` (vLLM's ``reshape_and_cache_flash(key, value, key_cache, value_cache,
slot_mapping, kv_cache_dtype, k_scale, v_scale)``, slot_mapping int64, scales float32 tensors,
per vllm/_custom_ops.py @0002bde5; what vLLM v1's FlashAttention backend calls before attention)
or ``torch`` (``index_copy_`` of the rows into the flattened cache: the same bytes moved, a
stand-in where vLLM is absent). The pool holds twice the blocks the tokens need and the tokens go
to shuffled blocks, as after serving churn.
"""
from __future__ import annotations

from kernels.backends import randn


def build(num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int, dtype, device,
          backend: str = "torch", seed: int = 0):
    import torch
    block = max(1, block_size)
    key = randn((num_tokens, num_kv_heads, head_dim), dtype, device)
    value = randn((num_tokens, num_kv_heads, head_dim), dtype, device)
    needed = -(-num_tokens // block)
    num_blocks = 2 * needed
    key_cache = torch.zeros((num_blocks, block, num_kv_heads, head_dim), dtype=dtype, device=device)
    value_cache = torch.zeros_like(key_cache)
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(num_blocks, generator=gen)[:needed]
    tok = torch.arange(num_tokens)
    slot_mapping = (blocks[tok // block] * block + tok % block).to(device=device, dtype=torch.int64)
    if backend == "vllm":
        from vllm import _custom_ops as ops
        k_scale = torch.ones((), dtype=torch.float32, device=device)
        v_scale = torch.ones((), dtype=torch.float32, device=device)
        return lambda: ops.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, "auto",
                                                   k_scale, v_scale)
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)

    def write():
        flat_k.index_copy_(0, slot_mapping, key)
        flat_v.index_copy_(0, slot_mapping, value)
    return write
