"""Files of one simulation: per-request parquet, summary, time series, plots, Perfetto trace.

All writes are atomic (conf.files.atomic_write). Perfetto/Chrome trace: one process per
replica, one thread per pipeline stage, one slice per batch (open it at ui.perfetto.dev).
Tables are written with pyarrow and figures as SVG (sim/svg.py), so that writing the outputs
of a small run costs milliseconds, not the ~1 s that importing pandas and matplotlib takes.
A run directory is claimed before the simulation starts (``claim_run_dir``): two runs never
share one, and a directory that holds a run is never written over.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from conf import ConfigError
from conf.files import atomic_write, check_writable, write_text
from sim.metrics import PREFIX_KEYS, REQUEST_METRICS, STATS

TIMELINE_COLUMNS = ("time_s", "replica", "kv_util", "batch_size", "num_running", "num_waiting",
                    "kv_cached", "prefix_hit_rate")
RUN_MARKER = ".opcast-run"     # created exclusively by the run that owns the directory
MAX_PLOT_POINTS = 600          # time bins (and CDF points) per series in the figures


def summary_table(summary: dict, band: dict | None = None, band_runs: dict | None = None) -> str:
    """The headline table: one row per request metric (mean, p50, p90, p99), then the rest."""
    lines = [f"{'metric':<16}" + "".join(f"{s:>12}" for s in STATS)]
    for m in REQUEST_METRICS:
        lines.append(f"{m:<16}" + "".join(f"{summary[f'{m}_{s}']:>12.4f}" for s in STATS))
    rest = ("num_requests", "num_clipped_requests", "num_preemptions", "throughput_rps",
            "throughput_tok_s", "batch_size_mean", "kv_util_mean", "kv_util_peak", *PREFIX_KEYS,
            # speculative decoding and KV offload (sim/spec.py, sim/offload.py), when on
            *(k for k in summary if k.startswith(("spec_", "offload_", "prefix_hit_rate_cpu", "prefill_tokens_loaded"))),
            # prefill/decode disaggregation (sim/disagg.py): where a request's time goes, per pool
            *(k for k in summary if k.startswith(("prefill_queue_s", "prefill_s_", "kv_wait_s", "kv_transfer_s",
                                                  "decode_queue_s", "prefill_kv_util", "decode_kv_util",
                                                  "num_kv_transfers"))),
            "goodput_rps", "goodput_rps_per_gpu", "slo_attainment", "gpus", "mfu", "mbu", "sim_time_s", "wall_s")
    lines.append("")
    for k in rest:
        if k in summary:
            lines.append(f"{k:<22}{summary[k]:>14.4f}")
    if band:
        lines.append("")
        lines.extend(band_table(band, band_runs))
    return "\n".join(lines)


def band_table(band: dict, runs: dict | None) -> list[str]:
    """The sim.band rows: each metric in the runs with p10, p50 and p90 operator times, and its
    band over those runs (low..high). A metric need not move with the operator times: faster
    operators let the scheduler batch and admit differently (and preempt at other moments), so
    e.g. a p10-ops run can show a higher TTFT p90 than the p50 run; such rows are marked."""
    lines = [f"{'band over runs':<20}{'ops p10':>12}{'ops p50':>12}{'ops p90':>12}{'low':>12}{'high':>12}"]
    crossed = []
    for k, (lo, mid, hi) in band.items():
        r = (runs or {}).get(k, {})
        per = [r.get(q, float("nan")) for q in ("p10", "p50", "p90")]
        monotone = per[0] <= per[1] <= per[2] or per[0] >= per[1] >= per[2]
        if runs and not monotone:
            crossed.append(k)
        lines.append(f"{k:<20}" + "".join(f"{v:>12.4f}" for v in (*per, lo, hi))
                     + ("" if monotone or not runs else " *"))
    if crossed:
        lines.append("* not monotone in the operator times: the runs batch, admit and preempt "
                     "differently; low..high is the band over the runs")
    return lines


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


def run_dir_name(cfg, model_name: str) -> Path:
    """Default run directory of ``python -m sim.run``: outputs/sim/<hw>-<model>-<scheduler>-<workload>/<time>."""
    return (Path("outputs") / "sim" / f"{cfg.hw.name}-{model_name}-{cfg.scheduler.name}-{cfg.workload.name}"
            / time.strftime("%Y-%m-%d_%H-%M-%S"))


def claim_run_dir(out_dir: str | Path | None, default: Path) -> Path:
    """The directory this run writes, created and claimed before any work.

    ``out_dir`` given (sim.out_dir): it must be writable and must not hold another run. Not
    given: ``default``, or ``default_2``, ``_3``, ... when a run started in the same second has
    it. Claiming creates ``.opcast-run`` exclusively, so two processes never get one directory.
    """
    if out_dir:
        d = check_writable(out_dir, "sim.out_dir")
        if not _claim(d):
            raise ConfigError(f"sim.out_dir={str(out_dir)!r} already holds a run (summary.json or "
                              f"{RUN_MARKER}); choose another directory or remove that one")
        return d
    check_writable(default.parent, "sim.out_dir")
    for n in range(1, 10000):
        d = default if n == 1 else default.with_name(f"{default.name}_{n}")
        try:
            d.mkdir()
        except FileExistsError:
            continue
        if _claim(d):
            return d
    raise ConfigError(f"no free run directory next to {default}")


def _claim(d: Path) -> bool:
    if (d / "summary.json").exists():
        return False
    try:
        fd = os.open(d / RUN_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.write(fd, f"pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    os.close(fd)
    return True


def _write_parquet(path: Path, columns: dict) -> Path:
    """Numeric numpy columns as a parquet file. Arrow arrays are made from the numpy buffers:
    pa.array/pa.table on numpy import pandas (0.15 s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    arrays = []
    for values in columns.values():
        v = np.ascontiguousarray(values)
        arrays.append(pa.Array.from_buffers(pa.from_numpy_dtype(v.dtype), len(v), [None, pa.py_buffer(v)]))
    table = pa.Table.from_arrays(arrays, names=list(columns))
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def timeline_columns(timeline: list) -> dict[str, np.ndarray]:
    rows = np.asarray(timeline, dtype=np.float64).reshape(-1, len(TIMELINE_COLUMNS))
    cols = {c: rows[:, i] for i, c in enumerate(TIMELINE_COLUMNS)}
    for c in ("replica", "batch_size", "num_running", "num_waiting", "kv_cached"):
        cols[c] = cols[c].astype(np.int64)
    return cols


def write_outputs(result, cfg) -> dict[str, Path]:
    """Write result's files under cfg.sim.out_dir; returns name -> path."""
    out = Path(cfg.sim.out_dir)
    paths: dict[str, Path] = {}
    paths["config"] = write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    summary = dict(result.summary)
    if result.band:
        summary["band"] = {k: list(v) for k, v in result.band.items()}
    if result.replicas:
        summary["replicas"] = result.replicas
    if getattr(result, "band_runs", None):
        summary["band_runs"] = result.band_runs
    paths["summary"] = write_text(out / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    # The same run in `vllm bench serve`'s result schema, for tooling that reads vLLM's JSON.
    from sim.vllm_bench import from_simulation
    paths["vllm_result"] = write_text(out / "vllm_result.json",
                                      json.dumps(from_simulation(result, cfg, cfg.sim.vllm_detailed)))
    if result.columns is not None:
        paths["requests"] = _write_parquet(out / "requests.parquet", result.columns)
    timeline = timeline_columns(result.timeline)
    paths["timeline"] = _write_parquet(out / "timeline.parquet", timeline)
    if cfg.sim.trace and result.trace:
        doc = perfetto_events(result.trace, cfg.parallel.pp)
        paths["trace"] = write_text(out / "trace.json", json.dumps(doc))
    if cfg.sim.plots:
        paths.update(plot(result, timeline, out))
    return paths


def aggregate(time_s: np.ndarray, values: np.ndarray, bins: int = MAX_PLOT_POINTS):
    """A step series (value holds until the next sample) as at most ``bins`` time bins: bin
    starts, mean, min and max of the samples in each bin; an empty bin holds the last value.
    A million-request run has millions of samples, which drawn one by one make a solid blob."""
    t, v = np.asarray(time_s, dtype=float), np.asarray(values, dtype=float)
    if len(t) <= bins:
        return t, v, v, v
    t0, t1 = float(t[0]), float(t[-1])
    edges = np.linspace(t0, t1, bins + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    mean = np.bincount(idx, weights=v, minlength=bins) / np.maximum(count, 1)
    lo, hi = np.full(bins, np.inf), np.full(bins, -np.inf)
    np.minimum.at(lo, idx, v)
    np.maximum.at(hi, idx, v)
    for i in np.flatnonzero(count == 0):       # steps-post: an empty bin holds the last value
        prev = mean[i - 1] if i else v[0]
        mean[i] = lo[i] = hi[i] = prev
    return edges[:-1], mean, lo, hi


def _cdf(values: np.ndarray, points: int = MAX_PLOT_POINTS) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(values[np.isfinite(values)])
    if len(v) <= points:
        return v, np.arange(1, len(v) + 1) / max(len(v), 1)
    q = np.linspace(0, 1, points)
    return np.quantile(v, q), q


def plot(result, timeline: dict, out: Path) -> dict[str, Path]:
    """cdf.svg (per-request latency CDFs) and timeseries.svg (KV use, batch size and queue
    over time, aggregated to MAX_PLOT_POINTS time bins with the per-bin min..max shaded)."""
    from sim.svg import Panel, Series, chart
    paths = {}
    cols = result.columns
    if cols is not None and len(cols["request_id"]):
        panels = []
        for m in ("ttft_s", "tpot_s", "e2e_s", "sched_delay_s"):
            x, y = _cdf(np.asarray(cols[m], dtype=float))
            panels.append(Panel(m, "CDF", [Series(x, y)]))
        paths["cdf"] = write_text(out / "cdf.svg", chart(panels, cols=4, panel_w=300))
    t = timeline["time_s"]
    if len(t):
        replicas = np.unique(timeline["replica"])
        series = [("kv_util", "KV cache used"), ("batch_size", "batch size"), ("num_waiting", "waiting requests")]
        if bool((timeline["kv_cached"] > 0).any()):     # prefix caching: two more panels
            series += [("kv_cached", "KV blocks cached"), ("prefix_hit_rate", "prefix hit rate so far")]
        panels = [Panel("", label) for _, label in series]
        panels[-1].xlabel = "time (s)"
        for rep in replicas[:8]:      # more replicas than colours: the first 8
            sel = timeline["replica"] == rep
            for panel, (col, _) in zip(panels, series):
                tb, mean, lo, hi = aggregate(t[sel], timeline[col][sel])
                panel.series.append(Series(tb, mean, f"replica {rep}", step=True,
                                           low=lo if len(tb) < sel.sum() else None,
                                           high=hi if len(tb) < sel.sum() else None))
        title = "" if len(replicas) <= 8 else f"first 8 of {len(replicas)} replicas"
        paths["timeseries"] = write_text(out / "timeseries.svg",
                                         chart(panels, cols=1, panel_w=900, panel_h=200, title=title))
    return paths
