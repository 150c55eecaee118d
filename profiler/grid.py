"""The points to measure: per-GPU operator shapes of one layer for each TP degree, crossed with the
token / KV-length / batch grid. Shapes that several TP degrees share are measured once (the row
keeps the smallest tp that produced it).

Beyond the layer's own ops (conf.shapes) the elementwise grid has the ops vLLM v1 runs around
them, under the operator names the estimator and simulator share: ``fused_add_rmsnorm`` (residual
add + RMSNorm, width = hidden), ``kv_cache_write`` (reshape_and_cache_flash, width = 2 x KV heads
per GPU x head_dim), ``embedding`` (width = hidden; its all-reduce at TP > 1 is the collective
profile's all_reduce of the same bytes) and ``sampler`` (sampled sequences x vocab). The final norm
is an ``rmsnorm`` row of the layer's shape: nothing more to measure.

Attention contexts never exceed the model's context (``max_position``). Batches of two or more
sequences are also measured ragged (``profile.ragged``): the same longest context with the others
shorter, so the estimator sees ``kv_spread`` (max / mean context) vary.
"""
from __future__ import annotations

from dataclasses import dataclass

from conf import ConfigError
from conf.schema import ModelConf
from conf.shapes import Elementwise, allowed_tp, check_tp, engine_layer_elementwise, heads_per_gpu, \
    layer_elementwise, layer_gemms, lm_head_gemm
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
    """TP degrees to profile. The default list is filtered to those the model allows
    (conf.shapes.allowed_tp); an explicit list must hold only allowed degrees."""
    requested = [int(t) for t in requested]
    if list(requested) == list(default):
        kept = [t for t in requested if t in allowed_tp(model)]
        if kept:
            return kept
    for t in requested:
        check_tp(model, t, "profile.tp")
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
        rows += [{"op": head.op, "model": model.name, "tp": tp, "m": m, "n": head.n, "k": head.k}
                 for m in sampled_seqs(ax)]
    return _dedup(rows, "gemm")


def vllm_elementwise(model: ModelConf, tp: int) -> list[Elementwise]:
    """The per-layer elementwise ops vLLM v1 runs that conf.shapes.layer_elementwise does not list
    (conf.shapes.engine_layer_elementwise is the list the simulator prices)."""
    plain = {e.op for e in layer_elementwise(model, tp)}
    return [e for e in engine_layer_elementwise(model, tp) if e.op not in plain]


def sampled_seqs(ax: Axes) -> list[int]:
    """Sequences that sample in one step (LM head, sampler): token counts up to the largest decode batch."""
    return [m for m in ax.tokens if m <= max(ax.decode_batch_sizes)] or [min(ax.tokens)]


def elementwise_points(model: ModelConf, tps: list[int], ax: Axes) -> list[dict]:
    rows = []
    for tp in tps:
        for e in layer_elementwise(model, tp) + vllm_elementwise(model, tp):
            rows += [{"op": e.op, "model": model.name, "tp": tp, "num_tokens": t, "width": e.width,
                      "num_heads": e.num_heads, "num_kv_heads": e.num_kv_heads, "head_dim": e.head_dim}
                     for t in ax.tokens]
        rows += [{"op": "embedding", "model": model.name, "tp": tp, "num_tokens": t, "width": model.hidden_size,
                  "num_heads": 0, "num_kv_heads": 0, "head_dim": 0, "_vocab_shard": -(-model.vocab_size // tp)}
                 for t in ax.tokens]
        # after the logits all-gather every TP rank samples from the whole vocabulary
        rows += [{"op": "sampler", "model": model.name, "tp": tp, "num_tokens": t, "width": model.vocab_size,
                  "num_heads": 0, "num_kv_heads": 0, "head_dim": 0} for t in sampled_seqs(ax)]
    return _dedup(rows, "elementwise")


def ragged_contexts(batch_size: int, max_kv: int, min_kv: int) -> list[tuple[int, ...]]:
    """Context-length spreads of a batch whose longest context is ``max_kv``: a ramp (contexts
    evenly spaced up to max_kv, max / mean ~ 2), then a long tail (one long context among short
    ones of max_kv / 8: max / mean up to 8). Each at least ``min_kv``; a spread equal to the
    uniform batch is dropped."""
    if batch_size < 2:
        return []
    ramp = tuple(max(min_kv, round(max_kv * (i + 1) / batch_size)) for i in range(batch_size))
    tail = tuple([max(min_kv, max_kv // 8)] * (batch_size - 1) + [max_kv])
    uniform = tuple([max_kv] * batch_size)
    return [c for c in dict.fromkeys((ramp, tail)) if c != uniform]


def _attention_row(base: dict, phase: str, q_lens: tuple, kv_lens: tuple) -> dict:
    return {**base, "op": "attention", "phase": phase, "batch_size": len(q_lens), "num_q_tokens": sum(q_lens),
            "num_kv_tokens": sum(kv_lens), "max_q_len": max(q_lens), "max_kv_len": max(kv_lens),
            "q_kv_product_sum": sum(q * kv for q, kv in zip(q_lens, kv_lens)),
            "_q_lens": tuple(q_lens), "_kv_lens": tuple(kv_lens)}


def attention_points(model: ModelConf, tps: list[int], ax: Axes, block_size: int, ragged: bool = True) -> list[dict]:
    """Prefill: batch x chunk q_len x kv_len (kv = q, or a longer context ending with the chunk).
    Decode: batch x kv_len, one query token per sequence. Contexts up to the model's max_position."""
    rows = []
    limit = model.max_position
    kv_lens = [k for k in ax.kv_lens if k <= limit]
    for tp in tps:
        nq, nkv = heads_per_gpu(model, tp)
        base = {"model": model.name, "tp": tp, "num_heads": nq, "num_kv_heads": nkv, "head_dim": model.head_dim,
                "block_size": block_size}
        for b in ax.prefill_batch_sizes:
            for q in ax.tokens:
                if q < 2 or q > limit or b * q > ax.max_tokens_per_batch:
                    continue
                for kv in sorted({q, *(k for k in kv_lens if k > q)}):
                    rows.append(_attention_row(base, "prefill", (q,) * b, (kv,) * b))
                    if ragged:   # the ramp only: chunked-prefill batches hold few sequences
                        rows += [_attention_row(base, "prefill", (q,) * b, c) for c in ragged_contexts(b, kv, q)[:1]]
        for b in ax.decode_batch_sizes:
            for kv in kv_lens:
                rows.append(_attention_row(base, "decode", (1,) * b, (kv,) * b))
                if ragged:
                    rows += [_attention_row(base, "decode", (1,) * b, c) for c in ragged_contexts(b, kv, 1)]
    return _dedup(rows, "attention")


def build(model: ModelConf, tps: list[int], ax: Axes, families, block_size: int,
          ragged: bool = True) -> dict[str, list[dict]]:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"profile.families: unknown {unknown}; choose from {', '.join(FAMILIES)} "
                          "(collectives: python -m profiler.collectives)")
    makers = {"gemm": lambda: gemm_points(model, tps, ax),
              "elementwise": lambda: elementwise_points(model, tps, ax),
              "attention": lambda: attention_points(model, tps, ax, block_size, ragged)}
    return {f: makers[f]() for f in families}
