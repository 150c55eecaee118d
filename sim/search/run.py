"""Deployment search: the cheapest deployment that meets latency SLOs, by simulation.

    python -m sim.search model=llama2-70b workload=splitwise_conv slo.ttft_p90_s=2 slo.tbt_p99_s=0.2

For every candidate of the space in ``search`` (hw SKU x TP x PP x scheduler knobs, replicas
filling a fixed GPU budget; conf/search.yaml; with ``search.deployments=[colocated,
disaggregated]`` also prefill/decode pools splitting the budget, sim/search/pools.py) it finds
the maximum sustainable QPS under the SLOs (sim/search/capacity.py) on several seeds, prices it
(hw.price_per_gpu_hour_usd of each pool's hw) and ranks by cost per SLO-meeting request
(``usd_per_slo_request``, the inverse of requests per dollar). Outputs under ``search.out_dir``:

- points.parquet: every simulated probe (config hash, candidate, qps, seed, all summary
  metrics). A re-run with the same out_dir reuses these points instead of simulating again,
  so an interrupted search resumes, and a new SLO re-ranks mostly from stored points. The
  hash covers the whole sim config, the trained predictors' files and the simulator and
  estimator code, so after a retrain or a code change probes are simulated afresh.
- capacity.parquet: capacity per candidate and seed; ranked.parquet / ranked.csv: one row
  per candidate (skipped/pruned ones with their reason); pareto.png: requests per USD vs
  latency at capacity, with the Pareto front (one per deployment family when both ran).

Exit codes: 0 a deployment meets the SLOs, 3 none does (the closest are printed and ranked),
2 bad input (one ``error:`` line), 1 an unexpected failure (traceback).

Candidates run on a local process pool (``search.workers``; each worker loads operator
tables once per hw/model/tp; workers exit when the search process dies, even by kill -9)
or, with ``search.executor=ray``, as Ray tasks
(``pip install 'opcast[ray]'``; ``search.ray_address`` joins a cluster). The pruning and
seed-screening passes that keep the default search fast are described in ``run_search``.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import conf
from conf import ConfigError, cli, resolve_model
from conf.files import check_writable
from sim.config import register
from sim.search.capacity import slo_limits
from sim.search.exec import Task, check_fits, executor, simulate_summary
from sim.search.points import PointsStore, write_atomic
from sim.search.pools import deployments
from sim.search.report import describe, plot_pareto, rank
from sim.search.space import (
    code_fingerprint,
    config_hash,
    enumerate_space,
    estimator_fingerprint,
    hw_prices,
)
from sim.workload import resolve_data_dir

EXIT_NO_DEPLOYMENT = 3      # the search ran, and no candidate meets the SLOs

# Where one probe's rate, seed and request count live in the simulator's config.
QPS_KEY = "workload.qps"
SEED_KEY = "seed"
NUM_REQUESTS_KEY = "workload.num_requests"


@dataclass
class SearchConf:
    gpu_budget: int = 8
    # colocated replicas and/or disaggregated prefill/decode pools (sim/search/pools.py)
    deployments: list = field(default_factory=lambda: ["colocated"])
    disagg_mixed_hw: bool = False    # decode pool on another hw of search.hw than prefill
    hw: list = field(default_factory=lambda: ["a100", "h100"])
    tp: list = field(default_factory=lambda: [1, 2, 4, 8])
    pp: list = field(default_factory=lambda: [1, 2, 3, 4])
    # MoE models only (dense ones take ep=1 without DP attention): expert parallelism and DP attention
    ep: list = field(default_factory=lambda: [1, 2, 4, 8])
    dp_attention: list = field(default_factory=lambda: [False, True])
    weight_dtype: list = field(default_factory=lambda: [""])    # "" = the model's; e.g. ["", fp8]
    kv_dtype: list = field(default_factory=lambda: [""])
    schedulers: list = field(default_factory=lambda: ["vllm", "orca", "sarathi"])
    knobs: dict = field(default_factory=dict)        # scheduler name -> {knob: [values]}
    routers: list = field(default_factory=list)      # [] = the config's router; else each one
    prefix_caching: list = field(default_factory=list)   # [] = each scheduler's own; [true, false]
    spec_num_tokens: list = field(default_factory=list)  # [] = the config's; e.g. [0, 3] (0 = off)
    offload_cpu_gib: list = field(default_factory=list)  # [] = the config's; e.g. [0, 256] (0 = off)
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
    # Candidates whose first-seed requests per USD is below this fraction of the best are not
    # re-run on the other seeds (0 = every seed for every candidate).
    screen_fraction: float = 0.5
    # Candidates whose saturation throughput per USD (an upper bound on what they can reach)
    # is below this fraction of the best requests per USD found are not searched (0 = search all).
    prune_fraction: float = 0.5


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
    deployments({"deployments": opts.deployments})     # one ConfigError naming the allowed values
    if not opts.seeds:
        raise ConfigError("search.seeds is empty; give at least one seed")
    if opts.num_requests < 10:
        raise ConfigError(f"search.num_requests={opts.num_requests}: use at least 10 requests")
    if not 0 < opts.rel_tol < 1:
        raise ConfigError(f"search.rel_tol={opts.rel_tol}: must be in (0, 1)")
    if opts.step <= 1 or opts.reseed_step <= 1:
        raise ConfigError("search.step and search.reseed_step must be > 1")
    for name in ("screen_fraction", "prune_fraction"):
        if not 0 <= getattr(opts, name) <= 1:
            raise ConfigError(f"search.{name}={getattr(opts, name)}: must be in [0, 1]")
    if not 0 < opts.floor_fraction <= opts.guess_fraction <= 1:
        raise ConfigError("search: need 0 < floor_fraction <= guess_fraction <= 1")
    return opts


def capacity_params(opts: SearchConf) -> dict:
    return dict(saturation_qps=opts.saturation_qps, guess_fraction=opts.guess_fraction,
                step=opts.step, reseed_step=opts.reseed_step, rel_tol=opts.rel_tol,
                floor_fraction=opts.floor_fraction)


@dataclass
class SearchOutcome:
    ranked: pd.DataFrame
    points: pd.DataFrame
    message: str
    out_dir: Path
    simulated: int          # probes simulated in this run
    reused: int             # probes answered from points stored before this run
    wall_s: float
    probe_cpu_s: float      # CPU seconds the simulated probes took (wall_s includes waiting)


def run_search(cfg: DictConfig, simulate_fn=None, fits=check_fits) -> SearchOutcome:
    """Search the space of ``cfg.search`` under ``cfg.slo``; writes and returns the results.

    Passes: (1) with ``search.prune_fraction`` > 0, each candidate's saturation throughput
    (first seed), an upper bound on its capacity; the few with the highest bound per USD are
    searched first, and candidates whose bound is below prune_fraction x the best requests per
    USD found are listed as "pruned" without a capacity. (2) The capacity of the others on the
    first seed. (3) With ``search.screen_fraction`` > 0, the other seeds only for candidates
    within that fraction of the best requests per USD; the rest keep a one-seed answer
    (``num_seeds`` in the table). Both fractions 0: every seed for every candidate.
    """
    start = time.perf_counter()
    register()
    resolve_model(cfg)        # model.hf_config: out_dir and labels name the config.json's model
    opts = search_conf(cfg.search)
    limits = slo_limits(OmegaConf.to_container(cfg.slo, resolve=True))
    run = executor(opts.executor)
    out_dir = check_writable(opts.out_dir, "search.out_dir")   # before any simulation
    store = PointsStore(out_dir / "points.parquet")             # a corrupt file: one clear line

    runnable, skipped = enumerate_space(cfg, fits=fits)
    prices = hw_prices(cfg)
    for cand, _ in runnable:
        for hw in cand.pool_gpus:
            if not prices.get(hw, 0.0) > 0:
                raise ConfigError(f"hw {hw}: price_per_gpu_hour_usd is not set; the search "
                                  f"ranks by cost (set hw.price_per_gpu_hour_usd)")
    sim_cfgs, keyed, fingerprints, code = {}, [], {}, code_fingerprint()

    def fingerprint(hw: str, sim_cfg) -> str:
        if hw not in fingerprints:
            fingerprints[hw] = estimator_fingerprint(
                resolve_data_dir(sim_cfg.sim.data_dir) / "estimators" / hw)
        return fingerprints[hw]

    for cand, sim_cfg in runnable:
        OmegaConf.update(sim_cfg, NUM_REQUESTS_KEY, opts.num_requests, force_add=True)
        # a colocated candidate keeps its one-hw key, so its stored probes stay valid
        estimator = "+".join(fingerprint(hw, sim_cfg) for hw in cand.pool_gpus)
        key = config_hash(sim_cfg, volatile_keys=(QPS_KEY, SEED_KEY),
                          extra={"estimator": estimator, "code": code})
        if key not in sim_cfgs:                   # (a knob value listed twice)
            sim_cfgs[key] = OmegaConf.to_container(sim_cfg, resolve=True)
            keyed.append((cand, key))
    ident = {key: dict(cand.columns(), model=str(cfg.model.name),
                       workload=str(cfg.workload.get("name", ""))) for cand, key in keyed}
    cost = {key: cand.cost_usd_per_hour(prices) for cand, key in keyed}

    def tasks(keys, seeds, saturation_only=False):
        return [Task(i, key, sim_cfgs[key], list(seeds), limits, capacity_params(opts), QPS_KEY,
                     SEED_KEY, cached=store.cached(key), saturation_only=saturation_only)
                for i, key in enumerate(keys)]

    results, counts, reused = {}, {"simulated": 0, "cpu": 0.0}, set()
    stored_before = {(k, *probe) for k, probes in store.cache.items() for probe in probes}
    from tqdm import tqdm
    bar = tqdm(total=0, desc="search", unit="task", disable=not opts.progress, file=sys.stderr)

    def run_all(batch) -> dict:
        bar.total += len(batch)
        bar.refresh()
        done = {}
        for res in run(batch, simulate_fn or simulate_summary, opts.workers, opts.ray_address):
            done[res.config_hash] = res
            store.add(res.config_hash, ident[res.config_hash], res.points)
            counts["simulated"] += len(res.points)
            counts["cpu"] += sum(p.get("probe_cpu_s", 0.0) for p in res.points)
            reused.update(p for p in ((res.config_hash, *q) for q in res.reused)
                          if p in stored_before)
            bar.update(1)
            bar.set_postfix(simulated=counts["simulated"], reused=len(reused))
        results.update({k: r for k, r in done.items() if r.seeds or r.error})
        return done

    def per_usd(keys) -> dict:
        return {k: results[k].seeds[0].capacity_qps * 3600 / cost[k] for k in keys
                if k in results and not results[k].error}

    seeds, keys, pruned = list(opts.seeds), [k for _, k in keyed], {}
    screening = opts.screen_fraction > 0 and len(seeds) > 1
    first_seeds = seeds[:1] if screening else seeds
    try:
        if opts.prune_fraction > 0:
            # Saturation throughput bounds what a candidate can reach: run the most promising
            # few first, then skip those whose bound cannot come near the best found.
            saturated = run_all(tasks(keys, seeds[:1], saturation_only=True))
            bound = {k: r.saturation_qps * 3600 / cost[k] for k, r in saturated.items()
                     if not r.error}
            order = sorted(bound, key=lambda k: (-bound[k], k))
            lead, rest = order[:max(2, opts.workers)], order[max(2, opts.workers):]
            run_all(tasks(lead, first_seeds))
            best = max(per_usd(lead).values(), default=0.0)
            for k in rest:
                if bound[k] < opts.prune_fraction * best:
                    pruned[k] = (bound[k], f"saturation bound {bound[k]:.4g} requests/USD < "
                                           f"{opts.prune_fraction:g} x best found {best:.4g}")
            run_all(tasks([k for k in rest if k not in pruned], first_seeds))
            results.update({k: r for k, r in saturated.items() if r.error})
        else:
            run_all(tasks(keys, first_seeds))
        if screening:
            first = per_usd(keys)
            best = max(first.values(), default=0.0)
            run_all(tasks([k for k, v in first.items()
                           if best > 0 and v >= opts.screen_fraction * best], seeds))
    finally:
        bar.close()

    ranked = rank(keyed, skipped, results, store.cache, limits, prices, (opts.pareto_latency,),
                  pruned)
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
    return SearchOutcome(ranked, store.frame, describe(ranked, limits), out_dir,
                         counts["simulated"], len(reused), time.perf_counter() - start,
                         counts["cpu"])


def summary_table(ranked: pd.DataFrame, rows: int = 15) -> str:
    cols = [c for c in ("rank", "config", "status", "capacity_qps_mean", "capacity_qps_ci95_low",
                        "capacity_qps_ci95_high", "cost_usd_per_hour", "usd_per_slo_request",
                        "requests_per_usd",
                        "ttft_s_p90_at_capacity", "itl_s_p99_at_capacity") if c in ranked]
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        return ranked[cols].head(rows).to_string(index=False)


def _main(cfg: DictConfig) -> None:
    outcome = run_search(cfg)
    print(summary_table(outcome.ranked))
    skipped = int((outcome.ranked["status"] == "skipped").sum())
    print(f"{len(outcome.ranked)} candidates ({skipped} skipped, reasons in ranked.csv); "
          f"{outcome.simulated} probes simulated ({outcome.probe_cpu_s:.0f} CPU s), "
          f"{outcome.reused} reused; {outcome.wall_s:.1f} s; outputs in {outcome.out_dir}")
    print(outcome.message)
    if not (outcome.ranked["status"] == "ok").any():
        raise SystemExit(EXIT_NO_DEPLOYMENT)


def main() -> None:
    cli("search", _main)


if __name__ == "__main__":
    main()
