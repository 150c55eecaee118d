"""Side-by-side engine vs simulator: per-request latency statistics and per-iteration shapes.

Percentiles use numpy's default (linear) on both sides; error_pct = (sim - engine) / engine.
"""
from __future__ import annotations

import numpy as np
import pandas as pd



METRICS = ("ttft_s", "tpot_s", "e2e_s")
STATS = ("mean", "p50", "p90")
# The acceptance bar on mean errors (fraction).
TARGETS = {"ttft_s": 0.10, "tpot_s": 0.05, "e2e_s": 0.05}


def stats(requests: pd.DataFrame, metrics=METRICS) -> dict[str, float]:
    """{'ttft_s_mean': ..., 'ttft_s_p50': ..., ...} over requests with a defined value."""
    out = {}
    for m in metrics:
        x = requests[m].to_numpy(dtype=float)
        x = x[~np.isnan(x)]
        if not len(x):
            raise ValueError(f"no defined {m} values to summarise")
        out[f"{m}_mean"] = float(x.mean())
        out[f"{m}_p50"] = float(np.percentile(x, 50))
        out[f"{m}_p90"] = float(np.percentile(x, 90))
    return out


def compare(engine: pd.DataFrame, sim: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """Rows (metric, stat) with engine, sim, error_pct and whether the mean meets its target."""
    if len(engine) != len(sim):
        raise ValueError(f"engine has {len(engine)} requests, simulator {len(sim)}: not the same workload")
    e, s = stats(engine, metrics), stats(sim, metrics)
    rows = []
    for m in metrics:
        for st in STATS:
            k = f"{m}_{st}"
            err = (s[k] - e[k]) / e[k] * 100.0
            ok = abs(err) <= TARGETS[m] * 100.0 if st == "mean" and m in TARGETS else None
            rows.append({"metric": m, "stat": st, "engine": e[k], "sim": s[k], "error_pct": err,
                         "meets_target": ok})
    return pd.DataFrame(rows)


def per_request_errors(engine: pd.DataFrame, sim: pd.DataFrame, metrics=METRICS) -> dict[str, float]:
    """Median |relative error| per request, matched by position (both are in trace order)."""
    out = {}
    for m in metrics:
        e, s = engine[m].to_numpy(float), sim[m].to_numpy(float)
        ok = ~(np.isnan(e) | np.isnan(s)) & (e > 0)
        out[f"{m}_median_abs_error_pct"] = float(np.median(np.abs(s[ok] - e[ok]) / e[ok]) * 100)
    return out


def format_table(table: pd.DataFrame, title: str) -> str:
    lines = [title, f"{'metric':<8}{'stat':<6}{'engine ms':>12}{'sim ms':>12}{'error %':>10}  target"]
    for r in table.itertuples():
        mark = "" if r.meets_target is None else ("ok" if r.meets_target else "MISS")
        lines.append(f"{r.metric[:-2]:<8}{r.stat:<6}{r.engine * 1e3:>12.2f}{r.sim * 1e3:>12.2f}"
                     f"{r.error_pct:>+10.1f}  {mark}")
    return "\n".join(lines)


def iteration_summary(iters: pd.DataFrame) -> pd.DataFrame:
    """Per kind of iteration (prefill / mixed / decode / all): count, mean tokens, mean
    sequences, mean forward ms and mean period ms (forward + CPU overhead; NaN where unknown).
    ``iters`` has kind, seqs, num_tokens, forward_ms, period_ms."""
    def row(g):
        return {"count": len(g), "mean_tokens": g["num_tokens"].mean(), "mean_seqs": g["seqs"].mean(),
                "forward_ms": g["forward_ms"].mean(), "period_ms": g["period_ms"].mean()}
    rows = {k: row(iters[iters["kind"] == k]) for k in ("prefill", "mixed", "decode") if (iters["kind"] == k).any()}
    rows["all"] = row(iters)
    return pd.DataFrame.from_dict(rows, orient="index")


def format_iterations(engine: pd.DataFrame, sim: pd.DataFrame | None) -> str:
    """Engine vs simulated iteration mix side by side. Engine forward = model execution +
    sampling (the log's elapsed); engine period = gap between back-to-back iterations."""
    e = iteration_summary(engine)
    s = iteration_summary(sim) if sim is not None and len(sim) else None
    head = f"{'n':>6} {'tokens':>7} {'seqs':>5} {'fwd ms':>7} {'per ms':>7}"
    lines = [f"per-iteration {'kind':<8} engine: {head}" + (f"  | sim: {head}" if s is not None else "")]

    def cell(t, kind):
        if t is None or kind not in t.index:
            return f"{'-':>6} {'-':>7} {'-':>5} {'-':>7} {'-':>7}"
        r = t.loc[kind]
        return (f"{int(r['count']):>6} {r['mean_tokens']:>7.1f} {r['mean_seqs']:>5.1f} "
                f"{r['forward_ms']:>7.2f} {r['period_ms']:>7.2f}")
    kinds = list(e.index) + [k for k in (s.index if s is not None else []) if k not in e.index]
    for kind in kinds:
        lines.append(f"              {kind:<8} engine: {cell(e, kind)}"
                     + (f"  | sim: {cell(s, kind)}" if s is not None else ""))
    return "\n".join(lines)
