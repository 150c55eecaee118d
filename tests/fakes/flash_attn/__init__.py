"""Fake flash-attn 2.8: ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache`` with the real
signatures of flash_attn/flash_attn_interface.py (Dao-AILab/flash-attention @005300258a, read
for this fake) and the checks of its CUDA API (csrc/flash_attn/flash_api.cpp): fp16/bf16 q/k/v
of one dtype, contiguous last dimension, head_dim <= 256, query heads a multiple of KV heads,
int32 cu_seqlens / cache_seqlens / block_table, paged KV pages a multiple of 256 tokens."""
from __future__ import annotations

from tests.fakes import CALLS, record, require
__version__ = "2.8.3"


def _common(q, k, v):
    import torch
    require(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only supports fp16 and bf16 data type")
    require(k.dtype == q.dtype and v.dtype == q.dtype, "query and key/value must have the same dtype")
    for t in (q, k, v):
        require(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    require(q.shape[-1] <= 256 and q.shape[-1] % 8 == 0, "head_dim must be a multiple of 8, at most 256")
    require(q.shape[-2] % k.shape[-2] == 0, "Number of heads in key/value must divide number of heads in query")


def _paged(k, block_table, batch):
    import torch
    require(block_table.dtype == torch.int32, "block_table must have dtype torch.int32")
    require(block_table.stride(-1) == 1, "block_table must have contiguous last dimension")
    require(k.dim() == 4, "paged KV cache is (num_blocks, page_block_size, nheads_k, headdim)")
    require(k.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256")
    require(block_table.shape[0] == batch, "block_table must have one row per sequence")
    require(int(block_table.max()) < k.shape[0] and int(block_table.min()) >= 0, "block index out of range")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    import torch
    _common(q, k, v)
    require(q.dim() == 3, "q must be (total_q, nheads, headdim)")
    for cu in (cu_seqlens_q, cu_seqlens_k):
        require(cu.dtype == torch.int32 and cu.is_contiguous(), "cu_seqlens must be contiguous int32")
    batch = cu_seqlens_q.numel() - 1
    require(cu_seqlens_k.numel() == batch + 1, "cu_seqlens_q and cu_seqlens_k must have the same length")
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    require(int(cu_seqlens_q[-1]) == q.shape[0], "cu_seqlens_q must end at total_q")
    require(max(q_lens) <= max_seqlen_q and max(k_lens) <= max_seqlen_k, "max_seqlen below a sequence length")
    if block_table is not None:
        _paged(k, block_table, batch)
        require(all(n <= block_table.shape[1] * k.shape[1] for n in k_lens), "sequence longer than its blocks")
    else:
        require(k.dim() == 3 and int(cu_seqlens_k[-1]) == k.shape[0], "cu_seqlens_k must end at total_k")
    record(CALLS, "flash_attn_varlen_func", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal, block_table=block_table,
           q_lens=q_lens, k_lens=k_lens)
    return torch.empty_like(q)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    import torch
    _common(q, k_cache, v_cache)
    require(q.dim() == 4, "q must be (batch_size, seqlen, nheads, headdim)")
    require(cache_seqlens is not None and cache_seqlens.dtype == torch.int32, "cache_seqlens must be int32")
    require(cache_seqlens.shape == (q.shape[0],), "cache_seqlens must be (batch_size,)")
    lens = cache_seqlens.tolist()
    if block_table is not None:
        _paged(k_cache, block_table, q.shape[0])
        require(all(n <= block_table.shape[1] * k_cache.shape[1] for n in lens), "sequence longer than its blocks")
    else:
        require(k_cache.shape[0] == q.shape[0] and max(lens) <= k_cache.shape[1], "cache smaller than its seqlens")
    record(CALLS, "flash_attn_with_kvcache", q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
           block_table=block_table, causal=causal, k_lens=lens)
    return torch.empty_like(q)
