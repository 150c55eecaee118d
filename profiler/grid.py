"""The points to measure: per-GPU operator shapes of one layer for each TP degree, crossed with the
token / KV-length / batch grid. Shapes that several TP degrees share are measured once (the row
keeps the smallest tp that produced it)."""
from __future__ import annotations

from dataclasses import dataclass

from conf import ConfigError
from conf.schema import ModelConf
from conf.shapes import heads_per_gpu, layer_elementwise, layer_gemms, lm_head_gemm
from profiler.config import FAMILIES, GRIDS, PRESETS
from profiler.tables import FAMILIES as TABLE_COLUMNS


@dataclass(frozen=True)
class Axes:
    tokens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    decode_batch_sizes: tuple[int, ...]
    prefill_batch_sizes: tuple[int, ...]
    max_tokens_per_batch: int


def axes(pcfg, device: str) -> Axes:
    """The grid axes: explicit lists in ``pcfg`` win over its preset (``auto`` = by device)."""
    if pcfg.grid not in GRIDS:
        raise ConfigError(f"profile.grid={pcfg.grid!r}; choose one of: {', '.join(GRIDS)}")
    preset = PRESETS[("gpu" if device == "cuda" else "cpu") if pcfg.grid == "auto" else pcfg.grid]
    vals = {}
    for name in ("tokens", "kv_lens", "decode_batch_sizes", "prefill_batch_sizes"):
        got = [int(x) for x in (getattr(pcfg, name) or preset[name])]
        if not got or min(got) < 1:
            raise ConfigError(f"profile.{name} must be positive integers, got {got}")
        vals[name] = tuple(sorted(set(got)))
    cap = int(pcfg.max_tokens_per_batch) or max(vals["tokens"])
    return Axes(**vals, max_tokens_per_batch=cap)


def tp_degrees(model: ModelConf, requested: list[int], default: list[int]) -> list[int]:
    """TP degrees to profile. The default list is filtered to divisors of the heads; an explicit
    list must divide them all."""
    requested = [int(t) for t in requested]
    if list(requested) == list(default):
        kept = [t for t in requested if t >= 1 and model.num_heads % t == 0]
        if kept:
            return kept
    for t in requested:
        if t < 1 or model.num_heads % t:
            ok = [x for x in (1, 2, 4, 8, 16, 32, 64) if model.num_heads % x == 0]
            raise ConfigError(f"profile.tp={t} does not divide {model.name}'s {model.num_heads} attention heads; "
                              f"allowed tp: {ok}")
    return sorted(set(requested))


def _dedup(rows: list[dict], family: str) -> list[dict]:
    shape_cols = [c for c, _ in TABLE_COLUMNS[family] if c not in ("model", "tp")] + ["op"]
    seen, out = set(), []
    for row in rows:
        key = tuple(row[c] for c in shape_cols)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def gemm_points(model: ModelConf, tps: list[int], ax: Axes) -> list[dict]:
    rows = []
    for tp in tps:
        for g in layer_gemms(model, tp):
            rows += [{"op": g.op, "model": model.name, "tp": tp, "m": m, "n": g.n, "k": g.k} for m in ax.tokens]
        head = lm_head_gemm(model, tp)   # m = sequences that sample this step
        seqs = [m for m in ax.tokens if m <= max(ax.decode_batch_sizes)] or [min(ax.tokens)]
        rows += [{"op": head.op, "model": model.name, "tp": tp, "m": m, "n": head.n, "k": head.k} for m in seqs]
    return _dedup(rows, "gemm")


def elementwise_points(model: ModelConf, tps: list[int], ax: Axes) -> list[dict]:
    rows = []
    for tp in tps:
        ops = layer_elementwise(model, tp)
        for e in ops:
            rows += [{"op": e.op, "model": model.name, "tp": tp, "num_tokens": t, "width": e.width,
                      "num_heads": e.num_heads, "num_kv_heads": e.num_kv_heads, "head_dim": e.head_dim}
                     for t in ax.tokens]
        rows += [{"op": "embedding", "model": model.name, "tp": tp, "num_tokens": t, "width": model.hidden_size,
                  "num_heads": 0, "num_kv_heads": 0, "head_dim": 0, "_vocab_shard": -(-model.vocab_size // tp)}
                 for t in ax.tokens]
    return _dedup(rows, "elementwise")


def attention_points(model: ModelConf, tps: list[int], ax: Axes, block_size: int) -> list[dict]:
    """Prefill: batch x chunk q_len x kv_len (kv = q, or a longer context ending with the chunk).
    Decode: batch x kv_len, one query token per sequence."""
    rows = []
    for tp in tps:
        nq, nkv = heads_per_gpu(model, tp)
        base = {"model": model.name, "tp": tp, "num_heads": nq, "num_kv_heads": nkv, "head_dim": model.head_dim,
                "block_size": block_size}
        for b in ax.prefill_batch_sizes:
            for q in ax.tokens:
                if q < 2 or b * q > ax.max_tokens_per_batch:
                    continue
                for kv in sorted({q, *(k for k in ax.kv_lens if k > q)}):
                    rows.append({**base, "op": "attention", "phase": "prefill", "batch_size": b,
                                 "num_q_tokens": b * q, "num_kv_tokens": b * kv, "max_q_len": q, "max_kv_len": kv,
                                 "q_kv_product_sum": b * q * kv})
        for b in ax.decode_batch_sizes:
            for kv in ax.kv_lens:
                rows.append({**base, "op": "attention", "phase": "decode", "batch_size": b, "num_q_tokens": b,
                             "num_kv_tokens": b * kv, "max_q_len": 1, "max_kv_len": kv, "q_kv_product_sum": b * kv})
    return _dedup(rows, "attention")


def build(model: ModelConf, tps: list[int], ax: Axes, families, block_size: int) -> dict[str, list[dict]]:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"profile.families: unknown {unknown}; choose from {', '.join(FAMILIES)} "
                          "(collectives: python -m profiler.collectives)")
    makers = {"gemm": lambda: gemm_points(model, tps, ax),
              "elementwise": lambda: elementwise_points(model, tps, ax),
              "attention": lambda: attention_points(model, tps, ax, block_size)}
    return {f: makers[f]() for f in families}
