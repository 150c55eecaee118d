"""Attention over a batch of equal-shaped sequences: prefill chunks (q_len new tokens attending to
kv_len tokens, the last q_len of which are the chunk itself) and decode (q_len = 1).

Backends:
- ``sdpa``: torch scaled_dot_product_attention (CPU and GPU) on a contiguous KV cache (block_size 0).
- ``flash_attn``: FlashAttention-2 ``flash_attn_varlen_func`` (prefill) / ``flash_attn_with_kvcache``
  (decode). Upstream FA2 pages KV only in blocks that are multiples of 256; other block sizes run
  on a contiguous cache and are recorded as block_size 0.
- ``vllm``: vLLM's bundled flash-attention (``vllm.vllm_flash_attn``), paged KV in ``block_size``
  blocks, one ``flash_attn_varlen_func`` call for both phases as vLLM V1 does.
"""
from __future__ import annotations

from kernels.backends import randn

PREFERRED = {"cuda": ("vllm", "flash_attn", "sdpa"), "cpu": ("sdpa",)}


def effective_block_size(backend: str, block_size: int) -> int:
    """The paged block size a backend really runs (0 = contiguous KV)."""
    if backend == "vllm":
        return block_size
    if backend == "flash_attn" and block_size and block_size % 256 == 0:
        return block_size
    return 0


def build(backend: str, batch_size: int, q_len: int, kv_len: int, num_heads: int, num_kv_heads: int,
          head_dim: int, block_size: int, dtype, device):
    if q_len > kv_len:
        raise ValueError(f"attention: q_len {q_len} > kv_len {kv_len}")
    builder = {"sdpa": _sdpa, "flash_attn": _flash_attn, "vllm": _vllm}[backend]
    return builder(batch_size, q_len, kv_len, num_heads, num_kv_heads, head_dim,
                   effective_block_size(backend, block_size), dtype, device)


def _sdpa(b, q_len, kv_len, nq, nkv, d, _block, dtype, device):
    import torch.nn.functional as F
    q = randn((b, nq, q_len, d), dtype, device)
    k, v = randn((b, nkv, kv_len, d), dtype, device), randn((b, nkv, kv_len, d), dtype, device)
    if q_len == 1:
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=nq != nkv)
    if q_len == kv_len:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nq != nkv)
    import torch
    # The chunk sits at the end of its sequence: query i sees keys up to kv_len - q_len + i.
    # (torch.nn.attention.bias.causal_lower_right materialises the same mask on CPU, and its import
    # pulls in torch._dynamo.)
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nq != nkv)


def _paged_cache(b, kv_len, nkv, d, block, dtype, device):
    """KV blocks shuffled across the pool (as after serving churn) and the block table."""
    import torch
    per_seq = -(-kv_len // block)
    num_blocks = b * per_seq
    k_cache = randn((num_blocks, block, nkv, d), dtype, device)
    v_cache = randn((num_blocks, block, nkv, d), dtype, device)
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(num_blocks, generator=gen).view(b, per_seq).to(device=device, dtype=torch.int32)
    return k_cache, v_cache, table


def _cu(b, length, device):
    import torch
    return torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=device)


def _flash_attn(b, q_len, kv_len, nq, nkv, d, block, dtype, device):
    import torch
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    if q_len == 1:
        q = randn((b, 1, nq, d), dtype, device)
        lens = torch.full((b,), kv_len, dtype=torch.int32, device=device)
        if block:
            k_cache, v_cache, table = _paged_cache(b, kv_len, nkv, d, block, dtype, device)
            return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                                   causal=True)
        k_cache, v_cache = randn((b, kv_len, nkv, d), dtype, device), randn((b, kv_len, nkv, d), dtype, device)
        return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)
    q = randn((b * q_len, nq, d), dtype, device)
    cu_q, cu_k = _cu(b, q_len, device), _cu(b, kv_len, device)
    if block:
        k_cache, v_cache, table = _paged_cache(b, kv_len, nkv, d, block, dtype, device)
        return lambda: flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, q_len, kv_len, causal=True,
                                              block_table=table)
    k, v = randn((b * kv_len, nkv, d), dtype, device), randn((b * kv_len, nkv, d), dtype, device)
    return lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, q_len, kv_len, causal=True)


def _fa_version():
    for mod in ("vllm.v1.attention.backends.fa_utils", "vllm.attention.utils.fa_utils"):
        try:
            return __import__(mod, fromlist=["get_flash_attn_version"]).get_flash_attn_version()
        except (ImportError, AttributeError):
            continue
    return None


def _vllm(b, q_len, kv_len, nq, nkv, d, block, dtype, device):
    import torch
    from vllm.vllm_flash_attn import flash_attn_varlen_func
    q = randn((b * q_len, nq, d), dtype, device)
    out = torch.empty_like(q)
    k_cache, v_cache, table = _paged_cache(b, kv_len, nkv, d, block, dtype, device)
    cu_q = _cu(b, q_len, device)
    seq_lens = torch.full((b,), kv_len, dtype=torch.int32, device=device)
    kwargs = {"fa_version": v} if (v := _fa_version()) is not None else {}
    return lambda: flash_attn_varlen_func(q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu_q,
                                          max_seqlen_q=q_len, seqused_k=seq_lens, max_seqlen_k=kv_len,
                                          softmax_scale=d ** -0.5, causal=True, block_table=table, **kwargs)
