"""Attention over a batch of sequences: prefill chunks (q new tokens attending to kv tokens, the
last q of which are the chunk itself) and decode (q = 1). Each sequence has its own length
(``q_lens[i]``, ``kv_lens[i]``), so ragged batches, whose contexts differ, are timed as such.

Backends:
- ``sdpa``: torch scaled_dot_product_attention on a contiguous KV cache (block_size 0). It has no
  variable-length form: a ragged batch runs one call per distinct (q, kv) length pair. The kernel
  is forced with ``sdpa_kernel`` so it never silently drops to the MATH kernel (which builds the
  full q x kv matrix): an ``attn_mask`` together with ``enable_gqa`` does exactly that on CUDA.
- ``flash_attn``: FlashAttention-2 ``flash_attn_varlen_func`` (prefill) / ``flash_attn_with_kvcache``
  (decode). Upstream FA2 pages KV only in blocks that are multiples of 256; other block sizes run
  on a contiguous cache and are recorded as block_size 0.
- ``vllm``: vLLM's bundled flash-attention (``vllm.vllm_flash_attn``), paged KV in ``block_size``
  blocks, one ``flash_attn_varlen_func`` call for both phases as vLLM V1 does.

Signatures as read (cited so a reviewer can check them): flash-attn 2.8
``flash_attn/flash_attn_interface.py`` (Dao-AILab/flash-attention @005300258a:
``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...,
block_table=None)``, ``flash_attn_with_kvcache(q, k_cache, v_cache, ..., cache_seqlens=None, ...,
block_table=None, softmax_scale=None, causal=False, ...)``, block_table int32); vLLM's fork
``vllm_flash_attn/flash_attn_interface.py`` (vllm-project/flash-attention @03ef28b3:
``flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None,
seqused_k=None, ..., block_table=None, ..., out=None, ..., fa_version=2)``, exactly one of
cu_seqlens_k / seqused_k, seqused_k required with a block table).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from kernels.backends import has_enable_gqa, randn

PREFERRED = {"cuda": ("vllm", "flash_attn", "sdpa"), "cpu": ("sdpa",)}


def effective_block_size(backend: str, block_size: int) -> int:
    """The paged block size a backend really runs (0 = contiguous KV)."""
    if backend == "vllm":
        return block_size
    if backend == "flash_attn" and block_size and block_size % 256 == 0:
        return block_size
    return 0


def build(backend: str, q_lens, kv_lens, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
          dtype, device):
    """Launcher of one attention call over sequences with ``q_lens[i]`` new tokens and
    ``kv_lens[i]`` tokens of context (including the new ones)."""
    q_lens, kv_lens = [int(x) for x in q_lens], [int(x) for x in kv_lens]
    if len(q_lens) != len(kv_lens) or not q_lens:
        raise ValueError(f"attention: {len(q_lens)} q lengths for {len(kv_lens)} kv lengths")
    if any(q > kv or q < 1 for q, kv in zip(q_lens, kv_lens)):
        raise ValueError(f"attention: every 1 <= q_len <= kv_len, got q {q_lens} kv {kv_lens}")
    builder = {"sdpa": _sdpa, "flash_attn": _flash_attn, "vllm": _vllm}[backend]
    return builder(q_lens, kv_lens, num_heads, num_kv_heads, head_dim,
                   effective_block_size(backend, block_size), dtype, device)


@dataclass(frozen=True)
class SdpaPlan:
    """How one SDPA call runs: the kernels it may use (never MATH), the causal mask, and whether
    the KV heads are repeated up front (the kernel has no GQA, or torch < 2.5 has no enable_gqa)."""
    backends: tuple
    mask: str            # none | causal (top-left, q == kv) | lower_right (a chunk ending its sequence)
    repeat_kv: bool
    enable_gqa: bool


def sdpa_plan(device_type: str, q_len: int, kv_len: int, num_heads: int, num_kv_heads: int,
              gqa_supported: bool | None = None) -> SdpaPlan:
    """On CPU torch's flash kernel takes masks and GQA. On CUDA a lower-right causal mask runs
    only in the memory-efficient kernel (flash and cuDNN align a causal mask top-left, wrong for a
    chunk at the end of its sequence), which has no GQA, so the KV heads are repeated once,
    outside the timed call (the kernel then reads nq/nkv x the KV a GQA kernel reads). A boolean
    ``attn_mask`` is never used on CUDA: with ``enable_gqa`` it sends SDPA to MATH."""
    from torch.nn.attention import SDPBackend
    gqa_supported = has_enable_gqa() if gqa_supported is None else gqa_supported
    lower_right = 1 < q_len < kv_len
    mask = "lower_right" if lower_right else "causal" if q_len == kv_len and q_len > 1 else "none"
    gqa = num_heads != num_kv_heads
    if device_type != "cuda":
        backends = (SDPBackend.FLASH_ATTENTION,)
        repeat = gqa and not gqa_supported
    elif lower_right:
        backends = (SDPBackend.EFFICIENT_ATTENTION,)
        repeat = gqa
    else:
        backends = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
        repeat = gqa and not gqa_supported
    return SdpaPlan(backends, mask, repeat, gqa and not repeat)


def _sdpa_call(n, q_len, kv_len, nq, nkv, d, dtype, device, plan: SdpaPlan | None = None):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    plan = plan or sdpa_plan(device.type, q_len, kv_len, nq, nkv)
    q = randn((n, nq, q_len, d), dtype, device)
    k, v = randn((n, nkv, kv_len, d), dtype, device), randn((n, nkv, kv_len, d), dtype, device)
    if plan.repeat_kv:
        k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
    kw = {"enable_gqa": True} if plan.enable_gqa else {}
    if plan.mask == "causal":
        kw["is_causal"] = True
    elif plan.mask == "lower_right":
        if device.type == "cuda":
            from torch.nn.attention.bias import causal_lower_right
            kw["attn_mask"] = causal_lower_right(q_len, kv_len)
        else:
            # query i sees keys up to kv_len - q_len + i (causal_lower_right materialises the same
            # mask on CPU, and its import pulls in torch._dynamo)
            kw["attn_mask"] = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    backends = list(plan.backends)

    def call():
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, **kw)
    return call


def _sdpa(q_lens, kv_lens, nq, nkv, d, _block, dtype, device):
    groups = Counter(zip(q_lens, kv_lens))
    calls = [_sdpa_call(n, q, kv, nq, nkv, d, dtype, device) for (q, kv), n in sorted(groups.items())]
    if len(calls) == 1:
        return calls[0]
    return lambda: [c() for c in calls]


def _paged_cache(kv_lens, nkv, d, block, dtype, device):
    """KV blocks shuffled across the pool (as after serving churn) and the int32 block table
    (unused entries 0, as vLLM pads it)."""
    import torch
    per_seq = [-(-kv // block) for kv in kv_lens]
    num_blocks = sum(per_seq)
    k_cache = randn((num_blocks, block, nkv, d), dtype, device)
    v_cache = randn((num_blocks, block, nkv, d), dtype, device)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros((len(kv_lens), max(per_seq)), dtype=torch.int32)
    at = 0
    for i, n in enumerate(per_seq):
        table[i, :n] = order[at:at + n]
        at += n
    return k_cache, v_cache, table.to(device)


def _cu(lens, device):
    import torch
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    return out.to(device)


def _flash_attn(q_lens, kv_lens, nq, nkv, d, block, dtype, device):
    import torch
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    b, max_q, max_kv = len(q_lens), max(q_lens), max(kv_lens)
    if max_q == 1:
        q = randn((b, 1, nq, d), dtype, device)
        lens = torch.tensor(kv_lens, dtype=torch.int32, device=device)
        if block:
            k_cache, v_cache, table = _paged_cache(kv_lens, nkv, d, block, dtype, device)
            return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                                   causal=True)
        k_cache, v_cache = randn((b, max_kv, nkv, d), dtype, device), randn((b, max_kv, nkv, d), dtype, device)
        return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True)
    q = randn((sum(q_lens), nq, d), dtype, device)
    cu_q, cu_k = _cu(q_lens, device), _cu(kv_lens, device)
    if block:
        k_cache, v_cache, table = _paged_cache(kv_lens, nkv, d, block, dtype, device)
        return lambda: flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max_q, max_kv, causal=True,
                                              block_table=table)
    k, v = randn((sum(kv_lens), nkv, d), dtype, device), randn((sum(kv_lens), nkv, d), dtype, device)
    return lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_kv, causal=True)


def _fa_version():
    for mod in ("vllm.v1.attention.backends.fa_utils", "vllm.attention.utils.fa_utils"):
        try:
            return __import__(mod, fromlist=["get_flash_attn_version"]).get_flash_attn_version()
        except (ImportError, AttributeError):
            continue
    return None


def _vllm(q_lens, kv_lens, nq, nkv, d, block, dtype, device):
    import torch
    from vllm.vllm_flash_attn import flash_attn_varlen_func
    q = randn((sum(q_lens), nq, d), dtype, device)
    out = torch.empty_like(q)
    k_cache, v_cache, table = _paged_cache(kv_lens, nkv, d, block, dtype, device)
    cu_q = _cu(q_lens, device)
    seq_lens = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    max_q, max_kv = max(q_lens), max(kv_lens)
    kwargs = {"fa_version": v} if (v := _fa_version()) is not None else {}
    return lambda: flash_attn_varlen_func(q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu_q,
                                          max_seqlen_q=max_q, seqused_k=seq_lens, max_seqlen_k=max_kv,
                                          softmax_scale=d ** -0.5, causal=True, block_table=table, **kwargs)
