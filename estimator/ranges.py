"""Which lookups of a simulation left the shape range the predictors were trained on.

``OpTimes`` tabulates a grid much wider than a workload reaches (batches to 4096, KV to 2^17),
so warning about the grid tells a user nothing about their run. Instead OpTimes records the
largest lookups a run makes (``OpTimes.queried``) and, while tabulating, each family's column
extents (``recording``); ``warn_outside_trained`` compares both with the trained ranges (the
model sidecars' ``shape_range``) and warns once per family and set of columns in a process. Columns that follow the
workload (tokens, batch, KV length, message size) are checked on their high side, the ones fixed
by the model shard (GEMM n/k, widths, heads) on both sides.
"""
from __future__ import annotations

from conf import shapes, warn_once


def recording(predict):
    """``predict`` wrapped to record, per family, the (min, max) of every numeric column it is
    asked about; returns (wrapped, extents)."""
    extents: dict[str, dict[str, list[float]]] = {}

    def wrapped(family, df):
        seen = extents.setdefault(family, {})
        for col in df.columns:
            if df[col].dtype.kind in "iuf" and len(df):
                lo, hi = float(df[col].min()), float(df[col].max())
                old = seen.get(col, [lo, hi])
                seen[col] = [min(old[0], lo), max(old[1], hi)]
        return predict(family, df)

    return wrapped, extents


def queried_highs(ot) -> dict[str, dict[str, float]]:
    """Per family, the largest value of each workload-dependent shape column the lookups of
    ``ot`` stood for (only families that were looked up)."""
    q, out = ot.queried, {}
    tokens, sampled, send = q["tokens"], q["sampled"], q["send_tokens"]
    if tokens or sampled:
        out["gemm"] = {"m": max(tokens, sampled)}
    if tokens:
        out["elementwise"] = {"num_tokens": tokens}
        if ot.model.num_experts:
            out["moe"] = {"num_tokens": tokens}
    collective = max(tokens if ot.tp > 1 else 0, send)
    if collective:
        out["collective"] = {"size_bytes": collective * shapes.activation_bytes_per_token(ot.model)}
    if q["decode_batch"] or q["prefill_batch"]:
        out["attention"] = {
            "batch_size": max(q["decode_batch"], q["prefill_batch"]),
            "num_q_tokens": max(q["decode_batch"], q["prefill_q_sum"]),
            "num_kv_tokens": max(q["decode_kv_sum"], q["prefill_kv_sum"]),
            "max_q_len": max(1 if q["decode_batch"] else 0, q["prefill_q"]),
            "max_kv_len": max(q["decode_kv"], q["prefill_kv"]),
            "q_kv_product_sum": max(q["decode_kv_sum"], q["prefill_pairs"]),
        }
    return out


def outside_trained(ot) -> dict[str, dict[str, str]]:
    """Per family, column -> "value vs trained range" for every lookup outside the range."""
    trained = ot.meta.get("trained_range", {})
    tabulated = ot.meta.get("tabulated", {})
    found = {}
    for family, highs in queried_highs(ot).items():
        ranges = trained.get(family)
        if not ranges:
            continue              # roofline family: no range to leave
        notes = {}
        for col, (lo, hi) in sorted(ranges.items()):
            if col in highs:
                if highs[col] > hi:
                    notes[col] = f"{col} up to {highs[col]:g} (trained up to {hi:g})"
            elif col in tabulated.get(family, {}):
                t_lo, t_hi = tabulated[family][col]
                if t_lo < lo or t_hi > hi:
                    notes[col] = f"{col} {t_lo:g}..{t_hi:g} (trained {lo:g}..{hi:g})"
        if notes:
            found[family] = notes
    return found


def warn_outside_trained(ot) -> None:
    """One warning per family and set of columns out of range (a later run that leaves the
    range in another column says so again)."""
    for family, notes in outside_trained(ot).items():
        warn_once(("outside-trained", ot.hw.name, ot.model.name, family, tuple(notes)),
                  f"{family} ({ot.hw.name}): this run looked up {'; '.join(notes.values())}; "
                  f"predictions there follow the roofline prior", "estimator")
