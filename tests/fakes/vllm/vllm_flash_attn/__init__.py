"""Fake ``vllm.vllm_flash_attn``: ``flash_attn_varlen_func`` with the signature of vLLM's fork
(vllm_flash_attn/flash_attn_interface.py, vllm-project/flash-attention @03ef28b3, read for this
fake) and its asserts: exactly one of cu_seqlens_k / seqused_k, seqused_k with a block table;
plus the CUDA API's: fp16/bf16, int32 metadata, paged cache (num_blocks, block_size, nkv, d)
with block_size a multiple of 16, ``out`` shaped like q."""
from __future__ import annotations

from tests.fakes import CALLS, record, require


def flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, seqused_k=None,
                           q_v=None, dropout_p=0.0, softmax_scale=None, causal=False, window_size=None, softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None,
                           return_softmax_lse=False, out=None, scheduler_metadata=None, q_descale=None,
                           k_descale=None, v_descale=None, num_splits=0, fa_version=2, s_aux=None,
                           cp_world_size=1, cp_rank=0, cp_tot_seqused_k=None):
    import torch
    assert cu_seqlens_k is not None or seqused_k is not None, "cu_seqlens_k or seqused_k must be provided"
    assert cu_seqlens_k is None or seqused_k is None, "cu_seqlens_k and seqused_k cannot be provided at the same time"
    assert block_table is None or seqused_k is not None, "seqused_k must be provided if block_table is provided"
    require(fa_version in (2, 3), f"Unsupported FA version: {fa_version}")
    require(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only supports fp16 and bf16 data type")
    require(k.dtype == q.dtype == v.dtype, "query and key/value must have the same dtype")
    require(q.dim() == 3 and q.stride(-1) == 1, "q must be (total_q, nheads, headdim), contiguous last dim")
    require(cu_seqlens_q.dtype == torch.int32, "cu_seqlens_q must be int32")
    batch = cu_seqlens_q.numel() - 1
    require(int(cu_seqlens_q[-1]) == q.shape[0], "cu_seqlens_q must end at total_q")
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    require(max(q_lens) <= max_seqlen_q, "max_seqlen_q below a query length")
    k_lens = None
    if seqused_k is not None:
        require(seqused_k.dtype == torch.int32 and seqused_k.shape == (batch,), "seqused_k must be int32 (batch,)")
        k_lens = seqused_k.tolist()
        require(max(k_lens) <= max_seqlen_k, "max_seqlen_k below a context length")
        require(all(qq <= kk for qq, kk in zip(q_lens, k_lens)), "more queries than context in a sequence")
    if block_table is not None:
        require(block_table.dtype == torch.int32 and block_table.shape[0] == batch, "block_table int32 (batch, n)")
        require(k.dim() == 4 and k.shape[1] % 16 == 0, "paged KV cache: (num_blocks, block_size % 16 == 0, nkv, d)")
        require(k.shape[2] == v.shape[2] and q.shape[1] % k.shape[2] == 0, "query heads a multiple of KV heads")
        require(int(block_table.max()) < k.shape[0], "block index out of range")
        require(all(n <= block_table.shape[1] * k.shape[1] for n in k_lens), "sequence longer than its blocks")
    if out is not None:
        require(out.shape == q.shape and out.dtype == q.dtype, "out must be shaped like q")
    record(CALLS, "vllm_flash_attn.flash_attn_varlen_func", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
           seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, block_table=block_table,
           causal=causal, fa_version=fa_version, softmax_scale=softmax_scale, q_lens=q_lens, k_lens=k_lens)
    return out if out is not None else torch.empty_like(q)
