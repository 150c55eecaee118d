"""Shape features and the roofline prior of each operator family.

Features come from shapes only (never model names), so a predictor trained on some models
prices a model it has never seen. Each family names the shape columns a query must have
(``SHAPE_COLUMNS``), its categorical columns (integer-coded with the vocabulary stored next to
the model) and two functions: ``derived`` (numeric features) and ``prior_us`` (roofline µs).
The learned target is log(measured / prior), so predictions outside the profiled range still
scale with FLOPs and bytes.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from conf import ConfigError
from conf.schema import DTYPE_BYTES, HwConf
from estimator import roofline


class EstimatorError(ConfigError):
    """A bad query or missing model; the message is one line that says what to fix."""


# Shape columns a query needs (beyond the categorical ones, which have defaults).
SHAPE_COLUMNS = {
    "gemm": ["m", "n", "k"],
    "elementwise": ["op", "num_tokens", "width", "num_heads", "num_kv_heads", "head_dim"],
    "attention": ["phase", "batch_size", "num_q_tokens", "num_kv_tokens", "max_q_len", "max_kv_len",
                  "q_kv_product_sum", "num_heads", "num_kv_heads", "head_dim"],
    "collective": ["op", "size_bytes", "world_size", "devices_per_node"],
    "moe": ["num_tokens", "hidden_size", "ffn_size", "num_experts", "top_k", "ep", "tp"],
    "mla": ["phase", "batch_size", "num_q_tokens", "num_kv_tokens", "max_q_len", "max_kv_len", "q_kv_product_sum",
            "num_heads", "hidden_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim"],
    "bmm": ["batch", "m", "n", "k"],
}
# Measurement context shared by all families: which harness/kernel library measured the row.
CONTEXT_CATEGORICAL = ["source", "backend"]
CATEGORICAL = {
    "gemm": CONTEXT_CATEGORICAL,
    "elementwise": ["op", *CONTEXT_CATEGORICAL],
    "attention": ["phase", *CONTEXT_CATEGORICAL],
    # vLLM's custom all-reduce is measured both captured in a CUDA graph and eager (2-3x apart)
    "collective": ["op", "network", "cuda_graph", *CONTEXT_CATEGORICAL],
    "moe": ["op", *CONTEXT_CATEGORICAL],   # op names the routing distribution (moe_balanced, ...)
    "mla": ["phase", "weight_dtype", "attn_dtype", *CONTEXT_CATEGORICAL],
    "bmm": ["op", *CONTEXT_CATEGORICAL],
}


def measured_us(df: pd.DataFrame) -> np.ndarray:
    """The training target: time_us_median, or time_us_mean where a source gives only a mean
    (aiconfigurator reports one mean latency per point)."""
    med = pd.to_numeric(df["time_us_median"], errors="coerce").to_numpy(float)
    mean = pd.to_numeric(df["time_us_mean"], errors="coerce").to_numpy(float)
    return np.where(np.isfinite(med), med, mean)


def _f(df: pd.DataFrame, col: str) -> np.ndarray:
    return df[col].to_numpy(dtype=float)


def map_strings(values: pd.Series, table: dict, missing=np.nan) -> np.ndarray:
    """table[str(value)] per row, looking up each distinct value once (tabulation maps ~1e6 rows)."""
    codes, uniques = pd.factorize(values.astype(str))
    mapped = np.array([table.get(u, missing) for u in uniques] + [missing], dtype=float)
    return mapped[codes]  # code -1 (a missing value) picks the trailing `missing`


def dtype_bytes(df: pd.DataFrame) -> np.ndarray:
    if "dtype" not in df.columns:
        return np.full(len(df), 2.0)
    return map_strings(df["dtype"], DTYPE_BYTES, 2.0)


def _log2(x) -> np.ndarray:
    return np.log2(np.maximum(np.asarray(x, float), 1e-9))


def _gemm(df, hw):
    m, n, k, b = _f(df, "m"), _f(df, "n"), _f(df, "k"), dtype_bytes(df)
    flops, nbytes = roofline.gemm_flops(m, n, k), roofline.gemm_bytes(m, n, k, b)
    # 128x128 output tiles: wave quantisation over the SMs is a step function of this count.
    tiles = np.ceil(m / 128) * np.ceil(n / 128)
    feats = dict(m=m, n=n, k=k, dtype_bytes=b, log_flops=_log2(flops), log_bytes=_log2(nbytes),
                 intensity=flops / nbytes, tiles=tiles, m_mod_64=m % 64,
                 waves=tiles / hw.sm_count if hw.sm_count else np.full(len(m), np.nan))
    return feats, roofline.gemm_us(m, n, k, hw, b)


# Coarse kind of each elementwise op: an op never profiled (layernorm where only rmsnorm was)
# is still priced like its kind. Unknown names get NaN.
OP_KIND = {"rmsnorm": 0, "layernorm": 0, "fused_add_rmsnorm": 0, "silu_mul": 1, "gelu": 1, "sampler": 1,
           "rope": 2, "add": 3, "kv_cache_write": 3, "embedding": 4}


def _elementwise(df, hw):
    t, w, b = _f(df, "num_tokens"), _f(df, "width"), dtype_bytes(df)
    kind = map_strings(df["op"], OP_KIND)
    feats = dict(num_tokens=t, width=w, dtype_bytes=b, log_elements=_log2(t * w), op_kind=kind,
                 num_heads=_f(df, "num_heads"), num_kv_heads=_f(df, "num_kv_heads"),
                 head_dim=_f(df, "head_dim"))
    return feats, roofline.elementwise_us(t, w, hw, b)


def _attention(df, hw):
    bs, q, kv = _f(df, "batch_size"), _f(df, "num_q_tokens"), _f(df, "num_kv_tokens")
    pairs, nh, nkv, hd = _f(df, "q_kv_product_sum"), _f(df, "num_heads"), _f(df, "num_kv_heads"), _f(df, "head_dim")
    b = dtype_bytes(df)
    mean_kv = kv / np.maximum(bs, 1)
    feats = dict(batch_size=bs, num_q_tokens=q, num_kv_tokens=kv, max_q_len=_f(df, "max_q_len"),
                 max_kv_len=_f(df, "max_kv_len"), log_pairs=_log2(pairs), mean_q_len=q / np.maximum(bs, 1),
                 mean_kv_len=mean_kv, kv_spread=_f(df, "max_kv_len") / np.maximum(mean_kv, 1),
                 num_heads=nh, num_kv_heads=nkv, head_dim=hd, gqa=nh / np.maximum(nkv, 1), dtype_bytes=b,
                 log_work=_log2(pairs * nh * hd), log_kv_bytes=_log2(kv * nkv * hd * b))
    return feats, roofline.attention_us(q, kv, pairs, nh, nkv, hd, hw, b)


def _collective(df, hw):
    size, world = _f(df, "size_bytes"), _f(df, "world_size")
    feats = dict(size_bytes=size, world_size=world, devices_per_node=_f(df, "devices_per_node"),
                 nodes=np.ceil(world / np.maximum(_f(df, "devices_per_node"), 1)))
    return feats, roofline.collective_us(size, world, hw, df["op"].astype(str).to_numpy())


def _moe(df, hw):
    t, h, f = _f(df, "num_tokens"), _f(df, "hidden_size"), _f(df, "ffn_size")
    e, k, ep, tp = _f(df, "num_experts"), _f(df, "top_k"), _f(df, "ep"), _f(df, "tp")
    tp, ep, b = np.maximum(tp, 1), np.maximum(ep, 1), dtype_bytes(df)
    feats = dict(num_tokens=t, hidden_size=h, ffn_size=f, num_experts=e, top_k=k, ep=ep, tp=tp,
                 dtype_bytes=b, tokens_per_expert=t * k / e, log_flops=_log2(roofline.moe_flops(t, h, f, k, tp, ep)))
    return feats, roofline.moe_us(t, h, f, e, k, hw, tp, ep, b)


def hw_features(hw: HwConf, n: int) -> dict[str, np.ndarray]:
    """The card's numbers as features, so one model trained across GPUs tells them apart and prices
    a GPU it has no rows for (``arch`` enters through ``sm_version``). 0 on a card = unknown (NaN)."""
    def col(v):
        return np.full(n, float(v) if v else np.nan)
    return dict(hw_sm_version=col(hw.sm_version), hw_sm_count=col(hw.sm_count), hw_l2_mib=col(hw.l2_mib),
                hw_log_tflops=col(np.log2(hw.peak_tflops)), hw_log_mem_bw=col(np.log2(hw.mem_bw_gbps)),
                hw_fp8_ratio=np.full(n, hw.peak_tflops_fp8 / hw.peak_tflops),  # 0: no fp8 tensor cores
                hw_log_link_bw=col(np.log2(hw.link_bw_gbps) if hw.link_bw_gbps else 0))


def _mla(df, hw):
    bs, q, kv, pairs = _f(df, "batch_size"), _f(df, "num_q_tokens"), _f(df, "num_kv_tokens"), _f(df, "q_kv_product_sum")
    kvb = dtype_bytes(df)
    wb = (map_strings(df["weight_dtype"], roofline.WIDTH_BYTES, 2.0) if "weight_dtype" in df.columns
          else np.full(len(df), 2.0))
    dims = {c: _f(df, c) for c in ("num_heads", "hidden_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                   "qk_rope_head_dim", "v_head_dim")}
    feats = dict(batch_size=bs, num_q_tokens=q, num_kv_tokens=kv, max_q_len=_f(df, "max_q_len"),
                 max_kv_len=_f(df, "max_kv_len"), log_pairs=_log2(pairs), mean_kv_len=kv / np.maximum(bs, 1),
                 kv_bytes=kvb, weight_bytes=wb, **dims)
    prior = roofline.mla_us(df["phase"].astype(str).to_numpy() == "prefill", q, kv, pairs, *dims.values(), hw, wb, kvb)
    return feats, prior


def _bmm(df, hw):
    bt, m, n, k, b = _f(df, "batch"), _f(df, "m"), _f(df, "n"), _f(df, "k"), dtype_bytes(df)
    flops, nbytes = bt * roofline.gemm_flops(m, n, k), bt * roofline.gemm_bytes(m, n, k, b)
    feats = dict(batch=bt, m=m, n=n, k=k, dtype_bytes=b, log_flops=_log2(flops), log_bytes=_log2(nbytes))
    return feats, roofline.bmm_us(bt, m, n, k, hw, b)


DERIVED = {"gemm": _gemm, "mla": _mla, "bmm": _bmm, "elementwise": _elementwise, "attention": _attention,
           "collective": _collective, "moe": _moe}


def check_query(df: pd.DataFrame, family: str) -> None:
    if family not in SHAPE_COLUMNS:
        raise EstimatorError(f"unknown operator family {family!r}; known: {', '.join(SHAPE_COLUMNS)}")
    if not isinstance(df, pd.DataFrame) or len(df) == 0:
        raise EstimatorError(f"{family} query is empty: give at least one row with columns "
                             f"{', '.join(SHAPE_COLUMNS[family])}")
    missing = [c for c in SHAPE_COLUMNS[family] if c not in df.columns]
    if missing:
        raise EstimatorError(f"{family} query lacks columns {', '.join(missing)}; needs "
                             f"{', '.join(SHAPE_COLUMNS[family])}")
    bad = [c for c in SHAPE_COLUMNS[family] if c not in ("op", "phase")
           and not np.all(np.isfinite(pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)))]
    if bad:
        raise EstimatorError(f"{family} query has non-numeric or missing values in {', '.join(bad)}")


def design(df: pd.DataFrame, family: str, hw: HwConf, vocab: dict[str, list[str]]):
    """(feature matrix float32, feature names, roofline prior µs) for rows in profile-table columns.

    Categorical columns are coded by their index in ``vocab``; values never seen in training
    become NaN, which XGBoost routes along each split's learned default direction.
    """
    feats, prior = DERIVED[family](df, hw)
    cols = dict(feats, **hw_features(hw, len(df)))
    cols["log_prior"] = _log2(prior)
    for c in CATEGORICAL[family]:
        index = {v: i for i, v in enumerate(vocab.get(c, []))}
        values = df[c] if c in df.columns else pd.Series([""] * len(df))
        cols[f"cat_{c}"] = map_strings(values, index)
    names = list(cols)
    x = np.column_stack([np.asarray(cols[n], dtype=np.float32) for n in names])
    return x, names, np.asarray(prior, dtype=float)
