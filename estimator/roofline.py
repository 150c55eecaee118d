"""Speed-of-light operator times from a hardware card: the physical prior under the learned model.

Trees cannot extrapolate, so predictors learn ``measured / roofline`` and multiply back; outside
the profiled range a prediction then still grows with FLOPs and bytes. All functions are
vectorised over numpy arrays and return microseconds.
"""
from __future__ import annotations

import numpy as np

from conf.schema import HwConf

# The smallest time any launched kernel takes; keeps ratios finite for tiny shapes.
MIN_KERNEL_US = 1.0


def _roof(flops, nbytes, hw: HwConf):
    compute_us = np.asarray(flops, dtype=float) / (hw.peak_tflops * 1e6)
    memory_us = np.asarray(nbytes, dtype=float) / (hw.mem_bw_gbps * 1e3)
    return np.maximum(np.maximum(compute_us, memory_us), MIN_KERNEL_US)


def gemm_flops(m, n, k):
    return 2.0 * np.asarray(m, float) * np.asarray(n, float) * np.asarray(k, float)


def gemm_bytes(m, n, k, dtype_bytes=2):
    m, n, k = (np.asarray(x, float) for x in (m, n, k))
    return dtype_bytes * (m * k + k * n + m * n)


def gemm_us(m, n, k, hw: HwConf, dtype_bytes=2):
    return _roof(gemm_flops(m, n, k), gemm_bytes(m, n, k, dtype_bytes), hw)


def elementwise_us(num_tokens, width, hw: HwConf, dtype_bytes=2, passes=2.0):
    """Read + write of a [tokens, width] tensor (``passes`` tensor sweeps)."""
    nbytes = passes * dtype_bytes * np.asarray(num_tokens, float) * np.asarray(width, float)
    return _roof(0.0, nbytes, hw)


def attention_us(num_q_tokens, num_kv_tokens, q_kv_product_sum, num_heads, num_kv_heads, head_dim,
                 hw: HwConf, dtype_bytes=2):
    """QK^T and PV FLOPs over the (query, key) pairs, and one read of Q, K, V and write of O.

    ``q_kv_product_sum`` is the sum over the batch of q_len * kv_len (no causal halving).
    """
    pairs = np.asarray(q_kv_product_sum, float)
    flops = 4.0 * pairs * np.asarray(num_heads, float) * np.asarray(head_dim, float)
    nbytes = dtype_bytes * np.asarray(head_dim, float) * (
        2 * np.asarray(num_q_tokens, float) * np.asarray(num_heads, float)
        + 2 * np.asarray(num_kv_tokens, float) * np.asarray(num_kv_heads, float))
    return _roof(flops, nbytes, hw)


def collective_us(size_bytes, world_size, hw: HwConf, op="all_reduce"):
    # op may be one name or an array of names (one per row)
    """Ring all-reduce moves 2(n-1)/n of the buffer over each link; send/recv moves it once."""
    size = np.asarray(size_bytes, float)
    n = np.asarray(world_size, float)
    is_allreduce = np.char.find(np.asarray(op, dtype=str), "all_reduce") >= 0  # incl. custom_all_reduce
    factor = np.where(is_allreduce, np.where(n > 1, 2 * (n - 1) / np.maximum(n, 1), 0.0), 1.0)
    bw = max(hw.link_bw_gbps, 1e-3) * 1e3  # bytes per us
    return np.maximum(size * factor / bw, MIN_KERNEL_US)


def moe_flops(num_tokens, hidden_size, ffn_size, top_k, tp=1, ep=1, gated=True):
    """Each routed token runs one expert MLP (gate+up and down), sharded over tp and ep."""
    mats = 3.0 if gated else 2.0
    return (2.0 * mats * np.asarray(num_tokens, float) * np.asarray(top_k, float)
            * np.asarray(hidden_size, float) * np.asarray(ffn_size, float)
            / (np.asarray(tp, float) * np.asarray(ep, float)))


def moe_bytes(num_tokens, hidden_size, ffn_size, num_experts, top_k, tp=1, ep=1, dtype_bytes=2, gated=True):
    """Weights of the experts that receive at least one token (at most all local ones) + activations."""
    mats = 3.0 if gated else 2.0
    t = np.asarray(num_tokens, float)
    local_experts = np.asarray(num_experts, float) / np.asarray(ep, float)
    touched = np.minimum(local_experts, t * np.asarray(top_k, float))
    weights = touched * mats * np.asarray(hidden_size, float) * np.asarray(ffn_size, float) / np.asarray(tp, float)
    acts = 2.0 * t * np.asarray(top_k, float) * np.asarray(hidden_size, float)
    return dtype_bytes * (weights + acts)


def moe_us(num_tokens, hidden_size, ffn_size, num_experts, top_k, hw: HwConf, tp=1, ep=1, dtype_bytes=2):
    return _roof(moe_flops(num_tokens, hidden_size, ffn_size, top_k, tp, ep),
                 moe_bytes(num_tokens, hidden_size, ffn_size, num_experts, top_k, tp, ep, dtype_bytes), hw)


def mla_us(prefill, num_q_tokens, num_kv_tokens, q_kv_product_sum, num_heads, hidden_size, q_lora_rank,
           kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, hw: HwConf, dtype_bytes=2,
           kv_dtype_bytes=2):
    """One multi-head latent attention module (DeepSeek-V2/V3 as vLLM runs it; what
    aiconfigurator's ``mla_context_module``/``mla_generation_module`` time): projections,
    attention and output projection, each kernel at its own roofline, summed.

    Per query token: q_a + q_b (or q_proj), kv_a (latent + RoPE key), o_proj. Prefill
    (``prefill`` true) up-projects every KV token's latent with kv_b and runs attention over
    heads of qk = nope + rope, v = v_head_dim; decode runs it absorbed: the query is mapped
    into the latent space (nope x kv_lora per head), attention reads the cached latent + RoPE
    key (one shared KV head of kv_lora + rope) and its output is mapped back (kv_lora x v).
    ``num_heads`` are those of one GPU."""
    q, kv, pairs = (np.asarray(x, float) for x in (num_q_tokens, num_kv_tokens, q_kv_product_sum))
    nh, h, qr, kr, dn, dr, dv = (np.asarray(x, float) for x in (num_heads, hidden_size, q_lora_rank,
                                                                  kv_lora_rank, qk_nope_head_dim,
                                                                  qk_rope_head_dim, v_head_dim))
    pre = np.asarray(prefill, bool)
    qk = dn + dr
    q_in = np.where(qr > 0, qr, h)
    t = np.where(qr > 0, gemm_us(q, qr, h, hw, dtype_bytes), 0.0)              # q_a
    t = t + gemm_us(q, nh * qk, q_in, hw, dtype_bytes)                         # q_b / q_proj
    t = t + gemm_us(q, kr + dr, h, hw, dtype_bytes)                            # kv_a
    t = t + gemm_us(q, h, nh * dv, hw, dtype_bytes)                            # o_proj
    # prefill: kv_b over the KV tokens, attention with expanded heads
    pre_flops = 2.0 * pairs * nh * (qk + dv)
    pre_bytes = dtype_bytes * (q * nh * (qk + dv) + kv * nh * (qk + dv)) + kv_dtype_bytes * kv * (kr + dr)
    pre_t = gemm_us(kv, nh * (dn + dv), kr, hw, dtype_bytes) + _roof(pre_flops, pre_bytes, hw)
    # decode: absorbed query (nope -> latent) and output (latent -> v) per head, latent attention
    dec_flops = 2.0 * pairs * nh * ((kr + dr) + kr)
    dec_bytes = dtype_bytes * q * nh * (2 * (kr + dr)) + kv_dtype_bytes * kv * (kr + dr)
    uk = _roof(2.0 * q * nh * dn * kr, dtype_bytes * (nh * dn * kr + q * nh * (dn + kr)), hw)
    uv = _roof(2.0 * q * nh * kr * dv, dtype_bytes * (nh * kr * dv + q * nh * (kr + dv)), hw)
    dec_t = uk + uv + _roof(dec_flops, dec_bytes, hw)
    return t + np.where(pre, pre_t, dec_t)
