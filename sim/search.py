"""Deployment search: the cheapest deployment that meets latency SLOs, by simulation.

    python -m sim.search model=llama2-70b workload=splitwise_conv slo.ttft_p90_s=2 slo.tbt_p99_s=0.2

For every candidate of the space in ``search`` (hw SKU x TP x PP x scheduler knobs, replicas
filling a fixed GPU budget; conf/search.yaml) it finds the maximum sustainable QPS under
the SLOs (sim/capacity.py) on several seeds, prices it (hw.price_per_gpu_hour_usd) and
ranks by requests per dollar. Outputs under ``search.out_dir``:

- points.parquet: every simulated probe (config hash, candidate, qps, seed, all summary
  metrics). A re-run with the same out_dir reuses these points instead of simulating again,
  so an interrupted search resumes, and a new SLO re-ranks mostly from stored points.
- capacity.parquet: capacity per candidate and seed; ranked.parquet / ranked.csv: one row
  per candidate (skipped ones with their reason); pareto.png: requests per USD vs latency.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import conf
from conf import ConfigError, main_guard
from sim.capacity import slo_limits
from sim.config import register
from sim.search_exec import Task, check_fits, executor, simulate_summary
from sim.search_report import describe, plot_pareto, rank
from sim.search_space import config_hash, enumerate_space

# Where one probe's rate, seed and request count live in the simulator's config.
QPS_KEY = "workload.qps"
SEED_KEY = "seed"
NUM_REQUESTS_KEY = "workload.num_requests"


@dataclass
class SearchConf:
    gpu_budget: int = 8
    hw: list = field(default_factory=lambda: ["a100", "h100"])
    tp: list = field(default_factory=lambda: [1, 2, 4, 8])
    pp: list = field(default_factory=lambda: [1, 2, 3, 4])
    schedulers: list = field(default_factory=lambda: ["vllm", "orca", "sarathi"])
    knobs: dict = field(default_factory=dict)        # scheduler name -> {knob: [values]}
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    num_requests: int = 300          # requests per probe
    rel_tol: float = 0.05            # bisection stops when hi/lo <= 1 + rel_tol
    guess_fraction: float = 0.5      # first probe, as a fraction of saturation throughput
    step: float = 2.0                # bracketing factor for the first seed
    reseed_step: float = 1.25        # bracketing factor for later seeds
    floor_fraction: float = 0.02     # lowest probe, as a fraction of saturation throughput
    saturation_qps: float = 1.0e6    # arrival rate that puts every request in the queue at once
    executor: str = "process"        # process | serial | ray
    workers: int = 2
    ray_address: Optional[str] = None
    out_dir: str = "outputs/search"
    pareto_latency: str = "e2e_s_p90"
    progress: bool = True


def compose(overrides=()) -> DictConfig:
    """The composed ``conf/search.yaml`` with ``overrides`` (what ``python -m sim.search`` sees)."""
    register()
    return conf.compose("search", overrides)


def search_conf(node) -> SearchConf:
    """Typed, validated ``search`` node: unknown keys and wrong types become one ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SearchConf), node)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"search: {str(exc).splitlines()[0]}") from None
    opts = SearchConf(**OmegaConf.to_container(merged, resolve=True))
    if not opts.seeds:
        raise ConfigError("search.seeds is empty; give at least one seed")
    if opts.num_requests < 10:
        raise ConfigError(f"search.num_requests={opts.num_requests}: use at least 10 requests")
    if not 0 < opts.rel_tol < 1:
        raise ConfigError(f"search.rel_tol={opts.rel_tol}: must be in (0, 1)")
    if opts.step <= 1 or opts.reseed_step <= 1:
        raise ConfigError("search.step and search.reseed_step must be > 1")
    if not 0 < opts.floor_fraction <= opts.guess_fraction <= 1:
        raise ConfigError("search: need 0 < floor_fraction <= guess_fraction <= 1")
    return opts


def capacity_params(opts: SearchConf) -> dict:
    return dict(saturation_qps=opts.saturation_qps, guess_fraction=opts.guess_fraction,
                step=opts.step, reseed_step=opts.reseed_step, rel_tol=opts.rel_tol,
                floor_fraction=opts.floor_fraction)


# --- points file ---------------------------------------------------------------------------
def load_points(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def write_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".csv":
        df.to_csv(tmp, index=False)
    else:
        df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def points_cache(points: pd.DataFrame) -> dict:
    """config_hash -> {(qps, seed): summary dict} from the points file."""
    cache: dict = {}
    if points.empty:
        return cache
    meta = {"config_hash", "qps", "seed", "config", "hw", "tp", "pp", "replicas", "gpus",
            "scheduler", "knobs", "model", "workload"}
    metric_cols = [c for c in points.columns if c not in meta]
    for row in points.to_dict("records"):
        summary = {c: row[c] for c in metric_cols}
        cache.setdefault(row["config_hash"], {})[(float(row["qps"]), int(row["seed"]))] = summary
    return cache


@dataclass
class SearchOutcome:
    ranked: pd.DataFrame
    points: pd.DataFrame
    message: str
    out_dir: Path
    simulated: int          # probes simulated in this run
    reused: int             # probes answered from the points file
    wall_s: float
    probe_cpu_s: float      # CPU seconds the simulated probes took (wall_s includes waiting)


def run_search(cfg: DictConfig, simulate_fn=None, fits=check_fits) -> SearchOutcome:
    """Search the space of ``cfg.search`` under ``cfg.slo``; writes and returns the results."""
    start = time.perf_counter()
    register()
    opts = search_conf(cfg.search)
    limits = slo_limits(OmegaConf.to_container(cfg.slo, resolve=True))
    run = executor(opts.executor)
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points_path = out_dir / "points.parquet"

    runnable, skipped = enumerate_space(cfg, fits=fits)
    prices = {}
    for cand, sim_cfg in runnable:
        prices[cand.hw] = float(sim_cfg.hw.price_per_gpu_hour_usd)
        if prices[cand.hw] <= 0:
            raise ConfigError(f"hw {cand.hw}: price_per_gpu_hour_usd is not set; the search "
                              f"ranks by cost (set hw.price_per_gpu_hour_usd)")
    points = load_points(points_path)
    cache = points_cache(points)
    tasks, keyed = [], []
    for i, (cand, sim_cfg) in enumerate(runnable):
        OmegaConf.update(sim_cfg, NUM_REQUESTS_KEY, opts.num_requests, force_add=True)
        key = config_hash(sim_cfg, volatile_keys=(QPS_KEY, SEED_KEY))
        if any(key == k for _, k in keyed):        # a knob value listed twice
            continue
        keyed.append((cand, key))
        tasks.append(Task(i, key, OmegaConf.to_container(sim_cfg, resolve=True), list(opts.seeds),
                          limits, capacity_params(opts), QPS_KEY, SEED_KEY,
                          cached=dict(cache.get(key, {}))))
    ident = {key: dict(cand.columns(), model=str(cfg.model.name),
                       workload=str(cfg.workload.get("name", ""))) for cand, key in keyed}

    results, simulated, reused, probe_cpu_s = {}, 0, 0, 0.0
    from tqdm import tqdm
    bar = tqdm(total=len(tasks), desc="search", unit="config", disable=not opts.progress,
               file=sys.stderr)
    try:
        for res in run(tasks, simulate_fn or simulate_summary, opts.workers, opts.ray_address):
            results[res.config_hash] = res
            reused += res.reused
            if res.points:
                simulated += len(res.points)
                probe_cpu_s += sum(p.get("probe_cpu_s", 0.0) for p in res.points)
                new = pd.DataFrame([{"config_hash": res.config_hash, **ident[res.config_hash], **p}
                                    for p in res.points])
                points = pd.concat([points, new], ignore_index=True) if len(points) else new
                write_atomic(points, points_path)
                for p in res.points:
                    cache.setdefault(res.config_hash, {})[(p["qps"], p["seed"])] = \
                        {k: v for k, v in p.items() if k not in ("qps", "seed")}
            bar.update(1)
            bar.set_postfix(simulated=simulated, reused=reused)
    finally:
        bar.close()

    ranked = rank(keyed, skipped, results, cache, limits, prices, (opts.pareto_latency,))
    write_atomic(ranked, out_dir / "ranked.parquet")
    write_atomic(ranked, out_dir / "ranked.csv")
    capacity_rows = [dict(ident[key], config_hash=key, **{k: v for k, v in
                                                          dataclasses.asdict(s).items()
                                                          if k != "probes"})
                     for key, res in results.items() for s in res.seeds]
    write_atomic(pd.DataFrame(capacity_rows), out_dir / "capacity.parquet")
    title = (f"{cfg.model.name} on {cfg.workload.get('name', 'workload')}, "
             f"{opts.gpu_budget}-GPU budget; SLO " + ", ".join(f"{k}<={v:g}s"
                                                               for k, v in limits.items()))
    plot_pareto(ranked, opts.pareto_latency, out_dir / "pareto.png", title)
    message = describe(ranked, limits)
    return SearchOutcome(ranked, points, message, out_dir, simulated, reused,
                         time.perf_counter() - start, probe_cpu_s)


def summary_table(ranked: pd.DataFrame, rows: int = 15) -> str:
    cols = [c for c in ("rank", "config", "status", "capacity_qps_mean", "capacity_qps_ci95_low",
                        "capacity_qps_ci95_high", "cost_usd_per_hour", "requests_per_usd",
                        "ttft_s_p90_at_capacity", "itl_s_p99_at_capacity") if c in ranked]
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        return ranked[cols].head(rows).to_string(index=False)


def _main(cfg: DictConfig) -> None:
    try:
        outcome = run_search(cfg)
    except ConfigError as exc:     # raised inside Hydra's job: SystemExit passes without its log
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary_table(outcome.ranked))
    skipped = int((outcome.ranked["status"] == "skipped").sum())
    print(f"{len(outcome.ranked)} candidates ({skipped} skipped, reasons in ranked.csv); "
          f"{outcome.simulated} probes simulated ({outcome.probe_cpu_s:.0f} CPU s), "
          f"{outcome.reused} reused; {outcome.wall_s:.1f} s; outputs in {outcome.out_dir}")
    print(outcome.message)


def main() -> None:
    register()
    # Let ConfigError/Hydra errors reach main_guard (one line, exit 2) instead of Hydra's report.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main_guard(hydra.main(version_base="1.3", config_path="pkg://conf", config_name="search")(_main))()


if __name__ == "__main__":
    main()
