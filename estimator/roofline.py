"""Speed-of-light operator times from a hardware card: the physical prior under the learned model.

Trees cannot extrapolate, so predictors learn ``measured / roofline`` and multiply back; outside
the profiled range a prediction then still grows with FLOPs and bytes, and a GPU with no rows
is priced from its own card (peak FLOP/s for the op's dtype, memory and link bandwidth). All
functions are vectorised over numpy arrays and return microseconds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:      # annotations only: the simulator's cached path never loads pandas
    import pandas as pd

from conf.schema import DTYPE_BYTES, HwConf

# Operand width of each dtype name a table may hold (fp8_block: fp8 with per-block scales).
WIDTH_BYTES = {**DTYPE_BYTES, "fp8_block": 1}

# The smallest time any launched kernel takes (network-priced collectives' floor, runtime.py).
MIN_KERNEL_US = 1.0

# Fixed cost of one launched kernel, added to the roofline time: the smallest CUDA-graph replayed
# kernels in the aiconfigurator tables take ~5-10 us, and an additive floor (rather than a max)
# makes the learned ratio vary less with size (H100 GEMM k-fold 3.3% -> 3.0% median, measured).
LAUNCH_US = 5.0


def peak_tflops(hw: HwConf, dtype_bytes) -> np.ndarray:
    """Dense tensor FLOP/s for the op's input width: fp8 rows (1 byte) run at the card's fp8 peak
    where it has fp8 tensor cores; without them (A100, A40) fp8 weights are dequantised to 16 bit."""
    fp8 = np.asarray(dtype_bytes, float) <= 1
    fp8_peak = hw.peak_tflops_fp8 if hw.peak_tflops_fp8 > 0 else hw.peak_tflops
    return np.where(fp8, fp8_peak, hw.peak_tflops)


def _roof(flops, nbytes, hw: HwConf, peak=None):
    peak = hw.peak_tflops if peak is None else peak
    compute_us = np.asarray(flops, dtype=float) / (np.asarray(peak, float) * 1e6)
    memory_us = np.asarray(nbytes, dtype=float) / (hw.mem_bw_gbps * 1e3)
    return LAUNCH_US + np.maximum(compute_us, memory_us)


def gemm_flops(m, n, k):
    return 2.0 * np.asarray(m, float) * np.asarray(n, float) * np.asarray(k, float)


def gemm_bytes(m, n, k, dtype_bytes=2):
    m, n, k = (np.asarray(x, float) for x in (m, n, k))
    return dtype_bytes * (m * k + k * n + m * n)


def gemm_us(m, n, k, hw: HwConf, dtype_bytes=2):
    return _roof(gemm_flops(m, n, k), gemm_bytes(m, n, k, dtype_bytes), hw, peak_tflops(hw, dtype_bytes))


def elementwise_us(num_tokens, width, hw: HwConf, dtype_bytes=2, passes=2.0):
    """Read + write of a [tokens, width] tensor (``passes`` tensor sweeps)."""
    nbytes = passes * dtype_bytes * np.asarray(num_tokens, float) * np.asarray(width, float)
    return _roof(0.0, nbytes, hw)


def attention_us(num_q_tokens, num_kv_tokens, q_kv_product_sum, num_heads, num_kv_heads, head_dim,
                 hw: HwConf, kv_dtype_bytes=2):
    """QK^T and PV FLOPs over the (query, key) pairs, and one read of Q, K, V and write of O.

    ``q_kv_product_sum`` is the sum over the batch of q_len * kv_len (no causal halving). Q and O
    stay 16 bit; K and V are read at the KV-cache width (fp8 KV halves them), and the math runs
    at the 16-bit peak (vLLM dequantises fp8 KV in the kernel).
    """
    pairs = np.asarray(q_kv_product_sum, float)
    flops = 4.0 * pairs * np.asarray(num_heads, float) * np.asarray(head_dim, float)
    nbytes = np.asarray(head_dim, float) * (
        2 * 2 * np.asarray(num_q_tokens, float) * np.asarray(num_heads, float)
        + 2 * np.asarray(kv_dtype_bytes, float) * np.asarray(num_kv_tokens, float) * np.asarray(num_kv_heads, float))
    return _roof(flops, nbytes, hw)


def collective_us(size_bytes, world_size, hw: HwConf, op="all_reduce"):
    """Ring all-reduce moves 2(n-1)/n of the buffer over each link; all-gather, reduce-scatter
    and all-to-all (n-1)/n; send/recv moves it once. ``op``: one name or one per row."""
    size = np.asarray(size_bytes, float)
    n = np.asarray(world_size, float)
    ops = np.asarray(op, dtype=str)
    is_allreduce = np.char.find(ops, "all_reduce") >= 0  # incl. custom_all_reduce
    is_send = np.char.find(ops, "send") >= 0
    share = np.where(n > 1, (n - 1) / np.maximum(n, 1), 0.0)
    factor = np.where(is_allreduce, 2 * share, np.where(is_send, 1.0, share))
    bw = max(hw.link_bw_gbps, 1e-3) * 1e3  # bytes per us
    return LAUNCH_US + size * factor / bw


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
    return dtype_bytes * weights + 2.0 * acts


def moe_us(num_tokens, hidden_size, ffn_size, num_experts, top_k, hw: HwConf, tp=1, ep=1, dtype_bytes=2):
    return _roof(moe_flops(num_tokens, hidden_size, ffn_size, top_k, tp, ep),
                 moe_bytes(num_tokens, hidden_size, ffn_size, num_experts, top_k, tp, ep, dtype_bytes), hw,
                 peak_tflops(hw, dtype_bytes))


def bmm_us(batch, m, n, k, hw: HwConf, dtype_bytes=2):
    """``batch`` independent (m x k) @ (k x n) products (MLA's absorbed per-head projections)."""
    b = np.asarray(batch, float)
    return _roof(b * gemm_flops(m, n, k), b * gemm_bytes(m, n, k, dtype_bytes), hw, peak_tflops(hw, dtype_bytes))


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


def predict_fn(hw: HwConf):
    """``predict(family, frame) -> µs`` from the roofline alone (families without a trained model)."""
    def predict(family: str, df: pd.DataFrame) -> np.ndarray:
        b = (df["dtype"].astype(str).map(DTYPE_BYTES).fillna(2).to_numpy(float) if "dtype" in df
             else np.full(len(df), 2.0))
        if family == "gemm":
            return gemm_us(df.m, df.n, df.k, hw, b)
        if family == "elementwise":
            return elementwise_us(df.num_tokens, df.width, hw, b)
        if family == "attention":
            return attention_us(df.num_q_tokens, df.num_kv_tokens, df.q_kv_product_sum,
                                df.num_heads, df.num_kv_heads, df.head_dim, hw, b)
        if family == "collective":
            return collective_us(df.size_bytes, df.world_size, hw, df.op.astype(str).to_numpy())
        if family == "moe":
            return moe_us(df.num_tokens, df.hidden_size, df.ffn_size, df.num_experts, df.top_k, hw,
                          df.tp.clip(lower=1), df.ep.clip(lower=1), b)
        if family == "bmm":
            return bmm_us(df.batch, df.m, df.n, df.k, hw, b)
        if family == "mla":   # dtype = the KV cache's, weight_dtype = the projections' (profiler/tables.py)
            wb = (df["weight_dtype"].astype(str).map(WIDTH_BYTES).fillna(2).to_numpy(float)
                  if "weight_dtype" in df else np.full(len(df), 2.0))
            return mla_us(df.phase.astype(str).to_numpy() == "prefill", df.num_q_tokens, df.num_kv_tokens,
                          df.q_kv_product_sum, df.num_heads, df.hidden_size, df.q_lora_rank, df.kv_lora_rank,
                          df.qk_nope_head_dim, df.qk_rope_head_dim, df.v_head_dim, hw, wb, b)
        raise ValueError(f"no roofline for family {family!r}")
    return predict
