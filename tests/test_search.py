"""Deployment search: capacity by bracketing + bisection, ranking by cost, resume, executors.

Most tests drive the search with SYNTHETIC_SIM below: a made-up, closed-form latency-vs-QPS
model (not a measurement) whose capacity per candidate is known exactly, so the search's
answers can be checked against it. One test runs the real simulator on a tiny space.
"""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conf import ConfigError
from sim import search
from sim.search.capacity import capacity_over_seeds, find_capacity, mean_ci95, slo_limits, violation

REPO = Path(__file__).resolve().parents[1]

# --- a synthetic deployment model (made up for tests) ---------------------------------------
SPEED_PER_GPU = {"a100": 1.0, "h100": 2.2}     # requests/s one GPU serves at batch cap 64


def synthetic_rate(hw: str, tp: int, pp: int, replicas: int, cap: int, seed: int) -> float:
    """Saturation throughput: TP and PP lose a little efficiency; bigger batches help."""
    per_replica = SPEED_PER_GPU[hw] * tp * pp * tp ** -0.15 * pp ** -0.1 * (cap / 64) ** 0.3
    return replicas * per_replica * (1 + 0.02 * (seed % 3 - 1))


def synthetic_base_ttft(hw: str, tp: int, cap: int) -> float:
    return 1.2 / SPEED_PER_GPU[hw] / tp ** 0.7 * (1 + cap / 512)


def synthetic_capacity(hw, tp, pp, replicas, cap, seed, ttft_limit) -> float:
    """Closed form of SYNTHETIC_SIM: TTFT = base / (1 - qps/rate) <= limit."""
    base = synthetic_base_ttft(hw, tp, cap)
    return max(0.0, synthetic_rate(hw, tp, pp, replicas, cap, seed) * (1 - base / ttft_limit))


def synthetic_sim(cfg) -> dict:
    hw, par = cfg.hw.name, cfg.parallel
    cap = int(cfg.scheduler.max_num_seqs)
    qps = float(OmegaConf.select(cfg, search.QPS_KEY))
    seed = int(OmegaConf.select(cfg, search.SEED_KEY))
    rate = synthetic_rate(hw, par.tp, par.pp, par.replicas, cap, seed)
    base = synthetic_base_ttft(hw, par.tp, cap)
    ttft = base / (1 - qps / rate) if qps < rate else 1e4
    itl = 0.02 * (1 + cap / 256) / par.tp ** 0.5
    return {"ttft_s_p90": ttft, "ttft_s_p99": 1.5 * ttft, "itl_s_p99": itl, "itl_s_p90": 0.8 * itl,
            "tpot_s_p50": itl, "e2e_s_p90": ttft + 200 * itl, "throughput_rps": min(qps, rate),
            "num_requests": 50}


def synthetic_fits(sim_cfg) -> None:
    if sim_cfg.parallel.tp * sim_cfg.parallel.pp < 2:
        raise ConfigError("llama2-70b does not fit at tp=1 pp=1: weights exceed GPU memory")


class CountingSim:
    """SYNTHETIC_SIM that records its probes and can fail after a number of calls ("kill")."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[tuple] = []
        self.fail_after = fail_after

    def __call__(self, cfg) -> dict:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append((cfg.hw.name, cfg.parallel.tp, cfg.parallel.pp,
                           int(cfg.scheduler.max_num_seqs),
                           float(OmegaConf.select(cfg, search.QPS_KEY)),
                           int(OmegaConf.select(cfg, search.SEED_KEY))))
        return synthetic_sim(cfg)


TINY_SPACE = ["search.hw=[a100,h100]", "search.tp=[1,2,4]", "search.pp=[1,2,3]",
              "search.gpu_budget=4", "search.schedulers=[vllm]",
              "search.knobs.vllm.max_num_seqs=[64,256]",
              "search.seeds=[0,1,2]", "search.progress=false", "slo.ttft_p90_s=2.0",
              "slo.tbt_p99_s=0.2", "model=llama2-70b"]


def tiny_cfg(tmp_path, *extra):
    return search.compose([*TINY_SPACE, f"search.out_dir={tmp_path}", *extra])


def expected_best(ttft_limit: float, budget: int = 4):
    prices = {"a100": 1.79, "h100": 2.99}
    best = None
    for hw in prices:
        for tp in (1, 2, 4):
            for pp in (1, 2):
                if tp * pp < 2 or budget % (tp * pp):
                    continue
                for cap in (64, 256):
                    caps = [synthetic_capacity(hw, tp, pp, budget // (tp * pp), cap, s, ttft_limit)
                            for s in (0, 1, 2)]
                    per_usd = sum(caps) / 3 * 3600 / (budget * prices[hw])
                    if best is None or per_usd > best[0]:
                        best = (per_usd, hw, tp, pp, cap, sum(caps) / 3)
    return best


# --- capacity search ------------------------------------------------------------------------
def test_find_capacity_brackets_and_bisects_to_the_tolerance():
    true_capacity = 7.3
    lo, hi, status, probes = find_capacity(lambda q: q / true_capacity, guess=1.0, ceiling=50,
                                           floor=0.1, step=2.0, rel_tol=0.05)
    assert status == "ok" and lo <= true_capacity < hi and hi / lo <= 1.05
    assert all((v <= 1) == (q <= true_capacity) for q, v in probes)
    # From above: the guess fails, the search descends, then bisects.
    lo2, hi2, _, _ = find_capacity(lambda q: q / true_capacity, guess=40, ceiling=50, floor=0.1,
                                   step=2.0, rel_tol=0.02)
    assert lo2 <= true_capacity < hi2 and hi2 / lo2 <= 1.02


def test_capacity_is_capped_by_saturation_and_floored():
    # A loose SLO that even the saturated system meets: capacity = saturation throughput.
    lo, hi, status, _ = find_capacity(lambda q: 0.1, guess=5, ceiling=10, floor=0.2, step=2,
                                      rel_tol=0.05)
    assert (lo, hi, status) == (10, math.inf, "throughput_bound")
    lo, _, status, probes = find_capacity(lambda q: 3.0, guess=5, ceiling=10, floor=0.2, step=2,
                                          rel_tol=0.05)
    assert (lo, status) == (0.0, "below_floor") and probes[-1][0] == 0.2


def test_each_seed_is_capped_by_its_own_saturation():
    rates = {0: 10.0, 1: 12.0, 2: 9.0}     # a loose SLO: only stability limits the capacity

    def at(qps, seed):
        rate = rates[seed]
        return {"ttft_s_p90": 0.1 if qps <= rate else 100.0, "throughput_rps": min(qps, rate)}

    seeds = capacity_over_seeds(at, {"ttft_s_p90": 1.0}, [0, 1, 2], saturation_qps=1e6)
    assert (seeds[0].capacity_qps, seeds[0].status) == (10.0, "throughput_bound")
    assert (seeds[1].capacity_qps, seeds[1].saturation_qps) == (12.0, 12.0)
    assert 9 / 1.05 <= seeds[2].capacity_qps <= 9 and seeds[2].status == "ok"


def test_capacity_over_seeds_matches_closed_form_and_ci_covers_it():
    limits = slo_limits({"ttft_p90_s": 2.0, "tbt_p99_s": 0.2})
    cfg = OmegaConf.create({"hw": {"name": "a100"}, "parallel": {"tp": 2, "pp": 1, "replicas": 2},
                            "scheduler": {"max_num_seqs": 64}})

    def at(qps, seed):
        c = cfg.copy()
        OmegaConf.update(c, search.QPS_KEY, qps, force_add=True)
        OmegaConf.update(c, search.SEED_KEY, seed, force_add=True)
        return synthetic_sim(c)

    seeds = capacity_over_seeds(at, limits, [0, 1, 2], saturation_qps=1e6, rel_tol=0.03)
    for s in seeds:
        truth = synthetic_capacity("a100", 2, 1, 2, 64, s.seed, 2.0)
        assert s.status == "ok" and truth / 1.03 <= s.capacity_qps <= truth
    mean, low, high = mean_ci95([s.capacity_qps for s in seeds])
    assert low < mean < high


def test_slo_limits_parse_and_reject_bad_names():
    assert slo_limits({"ttft_p90_s": 2, "tbt_p99_s": 0.2, "e2e_p99_s": None}) == \
        {"ttft_s_p90": 2.0, "itl_s_p99": 0.2}
    with pytest.raises(ConfigError, match="metric"):
        slo_limits({"ttft_p95_s": 2})
    with pytest.raises(ConfigError, match="no limit"):
        slo_limits({"ttft_p90_s": None})
    limits = {"ttft_s_p90": 2.0, "itl_s_p99": 0.2}
    assert violation({"ttft_s_p90": 3.0, "itl_s_p99": 0.1}, limits) == 1.5
    assert violation({}, {"ttft_s_p90": 2.0}) == math.inf


def test_mean_ci95_is_the_student_t_interval():
    mean, low, high = mean_ci95([1.0, 2.0, 3.0])     # sd 1, t(0.975, 2) = 4.303
    assert mean == 2.0 and high - mean == pytest.approx(4.303 / math.sqrt(3))


# --- the whole search ------------------------------------------------------------------------
def test_search_on_tiny_space_finds_the_known_best_config(tmp_path):
    outcome = search.run_search(tiny_cfg(tmp_path, "search.executor=process"),
                                simulate_fn=synthetic_sim, fits=synthetic_fits)
    per_usd, hw, tp, pp, cap, capacity = expected_best(2.0)
    best = outcome.ranked.iloc[0]
    assert (best.hw, best.tp, best.pp, best.knobs) == (hw, tp, pp, f'{{"max_num_seqs": {cap}}}')
    assert capacity / 1.05 <= best.capacity_qps_mean <= capacity
    price = {"a100": 1.79, "h100": 2.99}[hw]
    assert best.requests_per_usd == pytest.approx(best.capacity_qps_mean * 3600 / (4 * price))
    assert best.capacity_qps_ci95_low <= best.capacity_qps_mean <= best.capacity_qps_ci95_high
    assert outcome.message.startswith(f"best config: {best.config}")
    ok = outcome.ranked[outcome.ranked.status == "ok"]
    assert ok.requests_per_usd.is_monotonic_decreasing
    # Skipped configs are listed with the reason.
    reasons = outcome.ranked.set_index("config").reason
    assert "does not fit" in reasons["a100 tp1 pp1 x4 vllm max_num_seqs=64"]
    assert "does not divide the 4-GPU budget" in reasons["h100 tp1 pp3 x- vllm max_num_seqs=256"]
    for name in ("points.parquet", "ranked.parquet", "ranked.csv", "capacity.parquet",
                 "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    points = pd.read_parquet(tmp_path / "points.parquet")
    assert len(points) == outcome.simulated
    assert not points.duplicated(["config_hash", "qps", "seed"]).any()
    assert {"ttft_s_p90", "itl_s_p99", "hw", "tp", "config_hash"} <= set(points.columns)


def test_pruning_and_screening_keep_the_exhaustive_answer(tmp_path):
    exhaustive = search.run_search(
        tiny_cfg(tmp_path / "all", "search.prune_fraction=0", "search.screen_fraction=0"),
        simulate_fn=synthetic_sim, fits=synthetic_fits)
    fast = search.run_search(
        tiny_cfg(tmp_path / "fast", "search.prune_fraction=0.9", "search.screen_fraction=0.9"),
        simulate_fn=synthetic_sim, fits=synthetic_fits)
    assert (exhaustive.ranked.status != "pruned").all()
    assert (exhaustive.ranked.num_seeds.dropna() == 3).all()
    cols = ["config", "capacity_qps_mean", "capacity_qps_ci95_low", "num_seeds"]
    pd.testing.assert_series_equal(fast.ranked.iloc[0][cols], exhaustive.ranked.iloc[0][cols],
                                   check_names=False)
    assert fast.simulated < exhaustive.simulated
    best = fast.ranked.iloc[0].requests_per_usd
    pruned = fast.ranked[fast.ranked.status == "pruned"]
    assert len(pruned) and (pruned.requests_per_usd_upper_bound < 0.9 * best).all()
    assert pruned.reason.str.startswith("saturation bound").all()
    one_seed = fast.ranked[(fast.ranked.status == "ok") & (fast.ranked.num_seeds == 1)]
    assert len(one_seed) and (one_seed.requests_per_usd < 0.9 * best).all()
    assert one_seed.capacity_qps_ci95_low.isna().all()


def test_impossible_slo_reports_no_config_and_the_closest(tmp_path):
    cfg = tiny_cfg(tmp_path, "slo.ttft_p90_s=0.05", "search.executor=serial")
    outcome = search.run_search(cfg, simulate_fn=synthetic_sim, fits=synthetic_fits)
    assert outcome.message.startswith("no config meets the SLO (ttft_s_p90 <= 0.05 s")
    assert (outcome.ranked.status != "ok").all()
    closest = outcome.ranked[outcome.ranked.status == "no_qps_meets_slo"]
    # Lowest TTFT at near-zero load is the fastest GPU at the widest TP with the small batch cap.
    assert closest.iloc[0].config == "h100 tp4 pp1 x1 vllm max_num_seqs=64"
    assert closest.slo_worst_ratio.is_monotonic_increasing and (closest.slo_worst_ratio > 1).all()
    assert "h100 tp4 pp1 x1 vllm max_num_seqs=64: worst latency/limit" in outcome.message


def test_interrupted_search_resumes_without_resimulating_stored_points(tmp_path):
    def serial_h100(out_dir):
        return tiny_cfg(out_dir, "search.executor=serial", "search.hw=[h100]")

    full = CountingSim()
    reference = search.run_search(serial_h100(tmp_path / "ref"),
                                  simulate_fn=full, fits=synthetic_fits)
    killed = CountingSim(fail_after=len(full.calls) // 2)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(serial_h100(tmp_path / "run"),
                          simulate_fn=killed, fits=synthetic_fits)
    stored = pd.read_parquet(tmp_path / "run" / "points.parquet")
    assert 0 < len(stored) <= len(killed.calls)
    resumed = CountingSim()
    outcome = search.run_search(serial_h100(tmp_path / "run"),
                                simulate_fn=resumed, fits=synthetic_fits)
    stored_keys = {(r.hw, r.tp, r.pp, int(r.knobs.split(": ")[1][:-1]), r.qps, r.seed)
                   for r in stored.itertuples()}
    assert not stored_keys & set(resumed.calls)
    assert outcome.reused == len(stored) and outcome.simulated == len(full.calls) - len(stored)
    cols = ["config", "capacity_qps_mean", "requests_per_usd"]
    pd.testing.assert_frame_equal(outcome.ranked[cols], reference.ranked[cols])
    # A third run simulates nothing at all.
    again = CountingSim()
    search.run_search(serial_h100(tmp_path / "run"), simulate_fn=again,
                      fits=synthetic_fits)
    assert again.calls == []


def test_points_are_keyed_by_config_and_estimator_version(tmp_path):
    from sim.search.space import config_hash, estimator_fingerprint
    assert estimator_fingerprint(tmp_path) == "roofline"
    (tmp_path / "gemm.json").write_text("{}")
    trained = estimator_fingerprint(tmp_path)
    (tmp_path / "gemm.json").write_text('{"retrained": 1}')
    assert trained != estimator_fingerprint(tmp_path) != "roofline"
    cfg = {"workload": {"qps": 1.0, "num_requests": 300}, "seed": 0, "parallel": {"tp": 2}}
    key = config_hash(cfg, ("workload.qps", "seed"), {"estimator": trained})
    moved = {**cfg, "workload": {"qps": 9.0, "num_requests": 300}, "seed": 4}
    assert config_hash(moved, ("workload.qps", "seed"), {"estimator": trained}) == key
    assert config_hash(cfg, ("workload.qps", "seed"), {"estimator": "roofline"}) != key
    assert config_hash({**cfg, "parallel": {"tp": 4}}, ("workload.qps", "seed"),
                       {"estimator": trained}) != key


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_executor_gives_the_process_pool_answer(tmp_path):
    pooled = search.run_search(tiny_cfg(tmp_path / "pool", "search.executor=process",
                                        "search.hw=[h100]"),
                               simulate_fn=synthetic_sim, fits=synthetic_fits)
    rayed = search.run_search(tiny_cfg(tmp_path / "ray", "search.executor=ray", "search.workers=2",
                                       "search.hw=[h100]"),
                              simulate_fn=synthetic_sim, fits=synthetic_fits)
    cols = ["config", "status", "capacity_qps_mean"]
    pd.testing.assert_frame_equal(rayed.ranked[cols], pooled.ranked[cols])


def test_bad_search_config_is_one_clear_error_line(tmp_path):
    with pytest.raises(ConfigError, match="executor='bogus'"):
        search.run_search(tiny_cfg(tmp_path, "search.executor=bogus"), simulate_fn=synthetic_sim)
    with pytest.raises(ConfigError, match="unknown hw 'mi300x'"):
        search.run_search(tiny_cfg(tmp_path, "search.hw=[mi300x]"), simulate_fn=synthetic_sim)
    proc = subprocess.run([sys.executable, "-m", "sim.search", "search.rel_tol=2",
                           f"search.out_dir={tmp_path}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: search.rel_tol=2.0: must be in (0, 1)"


def test_real_simulator_on_a_tiny_space(tmp_path):
    """The real simulator: batching (max_num_seqs 32) must beat serving one request at a time,
    a tp that does not divide the heads is skipped with the reason, and every capacity is a
    probe that met the SLO with the next probe above it failing."""
    cfg = search.compose([
        "model=llama2-7b", "workload=fixed", "workload.prefill_tokens=256",
        "workload.decode_tokens=32", "search.hw=[a100]", "search.tp=[1,3]", "search.pp=[1]",
        "search.gpu_budget=3", "search.schedulers=[vllm]", "search.knobs.vllm.max_num_seqs=[1,32]",
        "search.seeds=[0,1]", "search.num_requests=40", "search.rel_tol=0.1",
        "search.executor=serial", "search.progress=false", "slo.ttft_p90_s=0.3",
        "slo.tbt_p99_s=0.1", f"search.out_dir={tmp_path}"])
    outcome = search.run_search(cfg)
    ranked = outcome.ranked.set_index("config")
    batched, serial = ranked.loc["a100 tp1 pp1 x3 vllm max_num_seqs=32"], \
        ranked.loc["a100 tp1 pp1 x3 vllm max_num_seqs=1"]
    assert outcome.ranked.iloc[0].config == "a100 tp1 pp1 x3 vllm max_num_seqs=32"
    assert batched.capacity_qps_mean > 2 * serial.capacity_qps_mean > 0
    assert "tp=3 does not divide" in ranked.loc["a100 tp3 pp1 x1 vllm max_num_seqs=32"].reason
    points = outcome.points
    capacity = pd.read_parquet(tmp_path / "capacity.parquet")
    limits = slo_limits({"ttft_p90_s": 0.3, "tbt_p99_s": 0.1})
    for row in capacity.itertuples():
        mine = points[(points.config_hash == row.config_hash) & (points.seed == row.seed)]
        at = mine[mine.qps == row.capacity_qps].iloc[0]
        assert violation(at.to_dict(), limits) <= 1
        if math.isfinite(row.hi_qps):
            above = mine[mine.qps == row.hi_qps].iloc[0]
            assert violation(above.to_dict(), limits) > 1 and row.hi_qps / row.capacity_qps <= 1.1
