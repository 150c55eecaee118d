"""The search's answers: ranked table, best config, "no config meets the SLO", Pareto plot.

Cost is what the whole GPU budget costs per hour, each pool of a disaggregated candidate at
its own hw's price; requests per dollar is the sustainable QPS times 3600 over that cost, and
the ranking's ``usd_per_slo_request`` its inverse: what one request served within the SLOs costs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from sim.search.capacity import mean_ci95, violation

# Latency columns always reported at capacity (besides the SLO's own and the Pareto metric).
REPORTED_METRICS = ("ttft_s_p90", "itl_s_p99", "tpot_s_p50", "e2e_s_p90", "kv_capacity_tokens",
                    "weight_gib_per_gpu", "prefix_hit_rate")
# What makes two candidates different deployments (not just scheduler knobs), with the value
# a row without the column has (tables from before disaggregated candidates, colocated rows).
LAYOUT_DEFAULTS = {"tp": 1, "pp": 1, "ep": 1, "dp_attention": False, "weight_dtype": "", "kv_dtype": "",
                   "deployment": "colocated", "decode_hw": "", "decode_tp": 0, "decode_replicas": 0}
LAYOUT_COLUMNS = tuple(LAYOUT_DEFAULTS)
FAMILY_NAMES = {"colocated": "colocated", "disaggregated": "disaggregated"}
STATUS_ORDER = {"ok": 0, "no_qps_meets_slo": 1, "pruned": 2, "skipped": 3}


def _price_columns(cand, prices: dict) -> dict:
    cols = dict(price_usd_per_gpu_hour=prices.get(cand.hw, math.nan),
                cost_usd_per_hour=cand.cost_usd_per_hour(prices))
    if cand.disaggregated:
        cols["decode_price_usd_per_gpu_hour"] = prices.get(cand.decode_hw, math.nan)
    return cols


def rank(candidates: list, skipped: list, results: dict, cache: dict, limits: dict,
         prices: dict, metrics: tuple, pruned: dict | None = None) -> pd.DataFrame:
    """One row per candidate, lowest cost per SLO-meeting request (usd_per_slo_request, the
    inverse of requests per dollar) first.

    Latency columns ``<metric>_at_capacity`` are averaged over the seeds' capacity probes; for
    a candidate that met no SLO they are taken at its closest probe (``closest_qps``).

    candidates: [(Candidate, config_hash)]; results: config_hash -> TaskResult;
    cache: config_hash -> {(qps, seed): summary}; prices: hw -> USD per GPU-hour;
    pruned: config_hash -> (requests-per-USD upper bound, reason).
    """
    rows = []
    for cand, key in candidates:
        row = dict(cand.columns(), **_price_columns(cand, prices), config_hash=key)
        cost = row["cost_usd_per_hour"]
        if pruned and key in pruned:
            bound, reason = pruned[key]
            rows.append(dict(row, status="pruned", reason=reason,
                             requests_per_usd_upper_bound=bound,
                             saturation_qps_mean=bound * cost / 3600))
            continue
        res = results.get(key)
        if res is None:
            continue
        if res.error:
            rows.append(dict(row, status="skipped", reason=res.error))
            continue
        caps = [s.capacity_qps for s in res.seeds]
        mean, low, high = mean_ci95(caps)
        met = [s for s in res.seeds if s.capacity_qps > 0]
        low = max(low, 0.0) if math.isfinite(low) else low     # capacity is never negative
        row.update(status="ok" if met else "no_qps_meets_slo", reason="" if met else
                   f"no probed QPS (down to {min(s.hi_qps for s in res.seeds):.4g}) met the SLO",
                   num_seeds=len(caps), capacity_qps_mean=mean, capacity_qps_ci95_low=low,
                   capacity_qps_ci95_high=high, capacity_qps_seeds=json.dumps(caps),
                   saturation_qps_mean=float(np.mean([s.saturation_qps for s in res.seeds])),
                   requests_per_usd=mean * 3600 / cost,
                   usd_per_slo_request=cost / (mean * 3600) if mean > 0 else math.inf,
                   requests_per_usd_ci95_low=low * 3600 / cost,
                   requests_per_usd_ci95_high=high * 3600 / cost,
                   slo_worst_ratio=min(s.min_violation for s in res.seeds),
                   num_probes=sum(s.num_probes for s in res.seeds),
                   capacity_status=",".join(sorted({s.status for s in res.seeds})))
        points = cache.get(key, {})
        if met:   # latency at each seed's capacity probe, averaged over seeds
            at = [points[(s.capacity_qps, s.seed)] for s in met]
        else:     # the probe that came closest to the SLO
            best = min(res.seeds, key=lambda s: s.min_violation)
            qps = min(best.probes, key=lambda p: p[1])[0]
            at = [points[(qps, best.seed)]]
            row["closest_qps"] = qps
        for metric in dict.fromkeys((*limits, *metrics, *REPORTED_METRICS)):
            row[f"{metric}_at_capacity"] = float(np.mean([p.get(metric, math.nan) for p in at]))
        rows.append(row)
    for skip in skipped:
        rows.append(dict(skip.candidate.columns(), status="skipped", reason=skip.reason,
                         **_price_columns(skip.candidate, prices)))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in ("requests_per_usd", "usd_per_slo_request", "slo_worst_ratio", "capacity_qps_mean"):
        if col not in df:
            df[col] = math.nan
    df["_order"] = df["status"].map(STATUS_ORDER)
    if "requests_per_usd_upper_bound" not in df:
        df["requests_per_usd_upper_bound"] = math.nan
    # pruned ones by their bound's cost per request (1 / requests per USD), the others by how
    # close they came to the SLO
    df["_score"] = np.select([df["status"] == "ok", df["status"] == "pruned"],
                             [df["usd_per_slo_request"], 1.0 / df["requests_per_usd_upper_bound"]],
                             df["slo_worst_ratio"])
    df = df.sort_values(["_order", "_score", "config"], kind="stable").drop(columns=["_order",
                                                                                     "_score"])
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of points not dominated in (lower x, higher y)."""
    order = np.lexsort((-y, x))
    mask = np.zeros(len(x), dtype=bool)
    best_y = -math.inf
    for i in order:
        if y[i] > best_y:
            mask[i], best_y = True, y[i]
    return mask


LABEL_OFFSETS = ((4, 3), (4, -9), (-4, 3), (-4, -9), (4, 12), (-4, 12), (4, -18), (-4, -18))


def place_labels(ax, x, y, labels, fontsize: float = 6, avoid=()) -> list:
    """Annotate points without overprinting: each label takes the first offset around its
    point where it overlaps no label placed before it (nor the boxes in ``avoid``, e.g. the
    legend) and stays inside the axes; a label with no such place is left out. Returns the
    annotations drawn."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken, placed = list(avoid), []
    for xi, yi, label in sorted(zip(x, y, labels), key=lambda t: (t[0], -t[1])):
        for dx, dy in LABEL_OFFSETS:
            ann = ax.annotate(str(label), (xi, yi), xytext=(dx, dy), textcoords="offset points",
                              fontsize=fontsize, ha="left" if dx > 0 else "right")
            box = ann.get_window_extent(renderer)
            fits = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0
                    and box.y1 <= inside.y1)
            if fits and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                placed.append(ann)
                break
            ann.remove()
    return placed


def families(frame: pd.DataFrame) -> np.ndarray:
    """Deployment family per row ("colocated" where the table has no such column)."""
    if "deployment" not in frame:
        return np.full(len(frame), "colocated", dtype=object)
    return frame["deployment"].fillna("colocated").astype(str).to_numpy()


def _hw_text(row) -> str:
    decode = row.get("decode_hw", "")
    mixed = isinstance(decode, str) and decode and decode != row["hw"]
    return f"{row['hw']}/{decode}" if mixed else str(row["hw"])


# Line style of each family's Pareto front when both are drawn.
FRONT_STYLES = {"colocated": "k--", "disaggregated": "k:"}


def plot_pareto(ranked: pd.DataFrame, latency_metric: str, path: Path, title: str) -> int:
    """Requests per dollar (95% CI bars where several seeds ran) vs latency at capacity, the
    Pareto front highlighted - one front per deployment family (colocated dashed,
    disaggregated dotted, hollow markers) when both are present, so the plot shows where each
    family pays; returns how many candidates are on the front(s)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = ranked[ranked["status"] == "ok"] if "status" in ranked else ranked.iloc[:0]
    col = f"{latency_metric}_at_capacity"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.set_xlabel(f"{latency_metric} at capacity (s)")
    ax.set_ylabel("requests per USD (capacity QPS x 3600 / cost per hour)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    front = np.zeros(0, dtype=bool)
    if len(ok) and col in ok:
        x, y = ok[col].to_numpy(float), ok["requests_per_usd"].to_numpy(float)
        fam = families(ok)
        both = len(set(fam)) > 1
        ok = ok.assign(_family=fam, _hw=[_hw_text(r) for _, r in ok.iterrows()])
        markers = dict(zip(sorted(ok["scheduler"].unique()), "os^Dvp<>*"))
        hws = sorted(ok["_hw"].unique())
        for (family, hw, sched), group in ok.groupby(["_family", "_hw", "scheduler"]):
            color = f"C{hws.index(hw)}"
            hollow = family == "disaggregated"
            ax.scatter(group[col], group["requests_per_usd"], alpha=0.6, s=22,
                       label=f"{'disagg ' if hollow else ''}{hw} {sched}",
                       marker=markers.get(sched, "o"), edgecolors=color,
                       facecolors="none" if hollow else color)
        fronts = {}
        if both:
            for family, style in FRONT_STYLES.items():
                idx = np.flatnonzero(fam == family)
                fronts[family] = (idx[pareto_front(x[idx], y[idx])], style,
                                  f"{family} Pareto front")
        else:
            fronts["all"] = (np.flatnonzero(pareto_front(x, y)), "k--", "Pareto front")
        front = np.zeros(len(ok), dtype=bool)
        for idx, _, _ in fronts.values():
            front[idx] = True
        low = ok["requests_per_usd_ci95_low"].to_numpy(float)
        high = ok["requests_per_usd_ci95_high"].to_numpy(float)
        has_ci = np.isfinite(low) & np.isfinite(high)
        if has_ci.any():      # 95% CI over seeds
            yerr = [y[has_ci] - low[has_ci], high[has_ci] - y[has_ci]]
            ax.errorbar(x[has_ci], y[has_ci], yerr=yerr, fmt="none", ecolor="gray", alpha=0.4,
                        lw=0.8)
        for idx, style, label in fronts.values():
            idx = idx[np.argsort(x[idx])]
            ax.plot(x[idx], y[idx], style, lw=1, label=label)
        legend = ax.legend(fontsize=7)
        fig.tight_layout()
        placed = place_labels(ax, x[front], y[front], ok["config"].to_numpy()[front],
                              avoid=[legend.get_window_extent(fig.canvas.get_renderer())])
        if len(placed) < int(front.sum()):
            ax.text(0.01, 0.01, f"{int(front.sum()) - len(placed)} front labels left out where they "
                    "would overlap (all in ranked.csv)", transform=ax.transAxes, fontsize=6, color="gray")
    else:
        ax.text(0.5, 0.5, "no config meets the SLO", ha="center", transform=ax.transAxes)
        fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return int(front.sum())


def describe(ranked: pd.DataFrame, limits: dict, closest: int = 5) -> str:
    """The best config, or a clear "no config meets the SLO" with the closest candidates."""
    slo = ", ".join(f"{k} <= {v:g} s" for k, v in limits.items())
    ok = ranked[ranked["status"] == "ok"] if len(ranked) else ranked
    if len(ok):
        b = ok.iloc[0]
        ci = (f"95% CI {b['capacity_qps_ci95_low']:.3g}-{b['capacity_qps_ci95_high']:.3g} over "
              f"{int(b['num_seeds'])} seeds" if b["num_seeds"] > 1 else "1 seed, no CI")
        best = (f"best config: {b['config']}  capacity {b['capacity_qps_mean']:.3g} QPS ({ci}), "
                f"{b['requests_per_usd']:.4g} requests/USD at {b['cost_usd_per_hour']:.4g} USD/h "
                f"[SLO: {slo}]")
        why = "\n".join(t for t in (explain(ok), compare_families(ranked)) if t)
        return best + (f"\n{why}" if why else "")
    lines = [f"no config meets the SLO ({slo}); closest:"]
    near = ranked[ranked["status"] == "no_qps_meets_slo"].head(closest) if len(ranked) else ranked
    for _, r in near.iterrows():
        values = ", ".join(f"{k}={r.get(f'{k}_at_capacity', math.nan):.3g}s" for k in limits)
        lines.append(f"  {r['config']}: worst latency/limit {r['slo_worst_ratio']:.2f} at "
                     f"{r['closest_qps']:.3g} QPS ({values})")
    if not len(near):
        lines.append("  (none ran: every candidate was skipped; see the reasons in ranked.csv)")
    return "\n".join(lines)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _layout(row) -> tuple:
    # a colocated row in a table with disaggregated ones has NaN decode columns: the default
    return tuple(d if _missing(row.get(c, d)) else row.get(c, d) for c, d in LAYOUT_DEFAULTS.items())


def _layout_text(row) -> str:
    layout = dict(zip(LAYOUT_COLUMNS, _layout(row)))
    tp, pp, ep, dp, wdt, kvdt = (layout[c] for c in LAYOUT_COLUMNS[:6])
    if layout["deployment"] == "disaggregated":
        hw, dhw = row.get("hw", ""), layout["decode_hw"]
        on = (f"prefill on {hw}, decode on {dhw}: " if dhw and dhw != hw else "")
        text = (f"{on}disaggregated prefill tp{tp} x{int(row.get('replicas', 0))} + decode "
                f"tp{int(layout['decode_tp'])} x{int(layout['decode_replicas'])}")
    elif dp:
        text = f"attention in {int(ep) // int(tp)} data-parallel ranks of tp{tp}, experts over ep{ep}"
    else:
        text = f"tp{tp}" + (f" with experts over ep{ep}" if int(ep) > 1 else "")
    text += f", pp{pp}" if int(pp) > 1 else ""
    text += "".join(f", {name} {v}" for name, v in (("weights", wdt), ("KV", kvdt)) if v)
    return text


def _short(label: str) -> str:
    return label.removeprefix("disagg ")


def compare_families(ranked: pd.DataFrame) -> str:
    """When the search ran both deployment families: how the best candidate compares with the
    best of the other family (ratio of SLO-meeting requests per USD), or that none of the
    other family ranked ok. Empty when only one family was searched."""
    if not len(ranked) or "status" not in ranked:
        return ""
    fam = families(ranked)
    ok = ranked["status"].to_numpy() == "ok"
    if not ok.any():
        return ""
    b = ranked[ok].iloc[0]
    mine = fam[ok][0]
    other = "disaggregated" if mine == "colocated" else "colocated"
    theirs = ranked[fam == other]
    if not len(theirs):
        return ""
    theirs_ok = theirs[theirs["status"] == "ok"]
    if not len(theirs_ok):
        counts = ", ".join(f"{n} {status}" for status, n in theirs["status"].value_counts().items())
        return (f"{mine} {_short(b['config'])} is the best; no {other} candidate meets the SLO "
                f"({counts}; reasons in ranked.csv)")
    r = theirs_ok.iloc[0]
    return (f"{mine} {_short(b['config'])} serves {b['requests_per_usd'] / r['requests_per_usd']:.2f}x "
            f"the SLO-meeting requests/USD of the best {other} ({_short(r['config'])}: "
            f"{r['usd_per_slo_request']:.3g} vs {b['usd_per_slo_request']:.3g} USD per request)")


def explain(ok: pd.DataFrame) -> str:
    """Why the best candidate wins: against the best one with another parallel layout or
    precision, how much more it serves per USD, and the memory and step-time differences
    behind it (KV capacity, weights per GPU, TPOT at capacity)."""
    if not len(ok):
        return ""
    b = ok.iloc[0]
    others = ok[[_layout(r) != _layout(b) for _, r in ok.iterrows()]]
    if not len(others):
        return f"why: {_layout_text(b)} is the only layout that meets the SLO"
    r = others.iloc[0]
    parts = [f"why: {_layout_text(b)} serves {b['requests_per_usd'] / r['requests_per_usd']:.2f}x the "
             f"requests/USD of the best other layout ({r['config']}: {_layout_text(r)})"]
    for col, what, fmt in (("kv_capacity_tokens_at_capacity", "KV cache per replica (tokens)", "{:.3g}"),
                           ("weight_gib_per_gpu_at_capacity", "weights per GPU (GiB)", "{:.1f}"),
                           ("tpot_s_p50_at_capacity", "TPOT p50 at capacity (s)", "{:.3g}")):
        if col in ok and math.isfinite(b.get(col, math.nan)) and math.isfinite(r.get(col, math.nan)):
            parts.append(f"{what} {fmt.format(b[col])} vs {fmt.format(r[col])}")
    return "; ".join(parts)


__all__ = ["compare_families", "describe", "explain", "pareto_front", "plot_pareto", "rank",
           "violation"]
