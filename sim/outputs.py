"""Files of one simulation: per-request parquet, summary, time series, plots, Perfetto trace.

All writes are atomic (conf.files.atomic_write). Perfetto/Chrome trace: one process per
replica, one thread per pipeline stage, one slice per batch (open it at ui.perfetto.dev).
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from conf.files import atomic_write, write_text

from sim.metrics import PREFIX_KEYS, REQUEST_METRICS, STATS


def summary_table(summary: dict, band: dict | None = None) -> str:
    """The headline table: one row per request metric (mean, p50, p90, p99), then the rest."""
    lines = [f"{'metric':<16}" + "".join(f"{s:>12}" for s in STATS)]
    for m in REQUEST_METRICS:
        lines.append(f"{m:<16}" + "".join(f"{summary[f'{m}_{s}']:>12.4f}" for s in STATS))
    rest = ("num_requests", "num_preemptions", "throughput_rps", "throughput_tok_s", "batch_size_mean",
            "kv_util_mean", "kv_util_peak", *PREFIX_KEYS, "mfu", "mbu", "sim_time_s", "wall_s")
    lines.append("")
    for k in rest:
        if k in summary:
            lines.append(f"{k:<22}{summary[k]:>14.4f}")
    if band:
        lines.append("")
        lines.append(f"{'band (op times)':<20}{'p10':>12}{'p50':>12}{'p90':>12}")
        for k, (lo, mid, hi) in band.items():
            lines.append(f"{k:<20}{lo:>12.4f}{mid:>12.4f}{hi:>12.4f}")
    return "\n".join(lines)


def perfetto_events(trace: list, pp: int) -> dict:
    events = []
    replicas = sorted({t[0] for t in trace})
    for r in replicas:
        events.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"replica {r}"}})
        for s in range(pp):
            events.append({"name": "thread_name", "ph": "M", "pid": r, "tid": s,
                           "args": {"name": f"stage {s}"}})
    for rep, stage, start_s, dur_s, kind, batch, tokens in trace:
        events.append({"name": kind, "ph": "X", "pid": rep, "tid": stage, "ts": start_s * 1e6,
                       "dur": dur_s * 1e6, "args": {"batch_size": batch, "num_tokens": tokens}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_outputs(result, cfg) -> dict[str, Path]:
    """Write result's files under cfg.sim.out_dir; returns name -> path."""
    import pandas as pd
    out = Path(cfg.sim.out_dir)
    paths: dict[str, Path] = {}
    paths["config"] = write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    summary = dict(result.summary)
    if result.band:
        summary["band"] = {k: list(v) for k, v in result.band.items()}
    if result.replicas:
        summary["replicas"] = result.replicas
    paths["summary"] = write_text(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    # The same run in `vllm bench serve`'s result schema, for tooling that reads vLLM's JSON.
    from sim.vllm_bench import from_simulation
    paths["vllm_result"] = write_text(out / "vllm_result.json",
                                      json.dumps(from_simulation(result, cfg, cfg.sim.vllm_detailed)))
    if result.requests is not None:
        paths["requests"] = atomic_write(out / "requests.parquet",
                                    lambda tmp: result.requests.to_parquet(tmp, index=False))
    timeline = pd.DataFrame(result.timeline, columns=["time_s", "replica", "kv_util", "batch_size",
                                                       "num_running", "num_waiting", "kv_cached",
                                                       "prefix_hit_rate"])
    paths["timeline"] = atomic_write(out / "timeline.parquet", lambda tmp: timeline.to_parquet(tmp, index=False))
    if cfg.sim.trace and result.trace:
        doc = perfetto_events(result.trace, cfg.parallel.pp)
        paths["trace"] = write_text(out / "trace.json", json.dumps(doc))
    if cfg.sim.plots:
        paths.update(plot(result, timeline, out))
    return paths


def plot(result, timeline, out: Path) -> dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    paths = {}
    if result.requests is not None and len(result.requests):
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
        for ax, m in zip(axes, ("ttft_s", "tpot_s", "e2e_s", "sched_delay_s")):
            v = np.sort(result.requests[m].dropna().to_numpy())
            ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1))
            ax.set_xlabel(m)
            ax.set_ylabel("CDF")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        paths["cdf"] = atomic_write(out / "cdf.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
    if len(timeline):
        caching = bool((timeline.kv_cached > 0).any())     # prefix caching: two more panels
        panels = [("kv_util", "KV cache used"), ("batch_size", "batch size"), ("num_waiting", "waiting requests")]
        if caching:
            panels += [("kv_cached", "KV blocks cached"), ("prefix_hit_rate", "prefix hit rate so far")]
        fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.3 * len(panels)), sharex=True)
        for rep, g in timeline.groupby("replica"):
            for ax, (col, _) in zip(axes, panels):
                ax.plot(g.time_s, g[col], lw=0.8, drawstyle="steps-post", label=f"replica {rep}")
        for ax, (_, lab) in zip(axes, panels):
            ax.set_ylabel(lab)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("time (s)")
        if timeline.replica.nunique() <= 8:
            axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths["timeseries"] = atomic_write(out / "timeseries.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
    return paths
