"""Deployment search over colocated and disaggregated (prefill/decode pool) candidates.

The search is driven by FAKE_SIM below: a made-up, closed-form latency-vs-QPS model (not a
measurement) for both families, so these tests check the search's enumeration, pricing,
ranking and reporting without depending on the simulator's disaggregated engine.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conf import ConfigError
from sim import search
from sim.search import exec as search_exec
from sim.config import deployment_name
from sim.search.report import plot_pareto
from sim.search.space import Candidate, config_hash, enumerate_space

PRICES = {"a100": 1.79, "h100": 2.99}          # conf/hw/*.yaml price_per_gpu_hour_usd
SPEED = {"a100": 1.0, "h100": 2.2}             # made-up requests/s of one GPU


def _pools(cfg) -> list[tuple[str, int, int]]:
    """(hw, tp, replicas) of the prefill and decode pools; one pool for a colocated config."""
    if deployment_name(cfg) != "disaggregated":
        return [(cfg.hw.name, cfg.parallel.tp * cfg.parallel.pp, cfg.parallel.replicas)]
    dep = cfg.deployment
    return [(dep[p].hw or cfg.hw.name, dep[p].tp, dep[p].replicas) for p in ("prefill", "decode")]


def fake_sim(cfg) -> dict:
    """Saturation rate: a colocated replica serves SPEED x tp^0.85; a disaggregated candidate
    is limited by its slower pool (prefill pools are 3x, decode pools 1.5x as fast per GPU
    as a colocated one at their own phase). TTFT = base / (1 - qps / rate)."""
    qps = float(OmegaConf.select(cfg, search.QPS_KEY))
    cap = int(cfg.scheduler.max_num_seqs)
    pools = _pools(cfg)
    speed = [r * SPEED[hw] * tp ** 0.85 * (cap / 64) ** 0.3 for hw, tp, r in pools]
    if len(pools) == 1:
        rate, base = speed[0], 1.2 / SPEED[pools[0][0]] / pools[0][1] ** 0.7
    else:
        rate, base = min(3 * speed[0], 1.5 * speed[1]), 0.8 / SPEED[pools[0][0]] / pools[0][1] ** 0.7
    ttft = base / (1 - qps / rate) if qps < rate else 1e4
    itl = 0.02 / pools[-1][1] ** 0.5
    return {"ttft_s_p90": ttft, "itl_s_p99": itl, "tpot_s_p50": itl, "e2e_s_p90": ttft + 200 * itl,
            "throughput_rps": min(qps, rate), "num_requests": 50}


def fake_fits(cfg) -> None:
    for hw, tp, _ in _pools(cfg):
        if tp < 2:
            raise ConfigError(f"llama2-70b does not fit at tp={tp} on {hw}: weights exceed GPU memory")


def compose(*extra):
    return search.compose(["model=llama2-70b", "search.hw=[h100]", "search.pp=[1]",
                           "search.schedulers=[vllm]", "search.knobs.vllm.max_num_seqs=[128]",
                           "search.progress=false", "slo.ttft_p90_s=2.0", "slo.tbt_p99_s=0.2", *extra])


def test_disaggregated_candidates_are_the_splits_that_fill_the_budget():
    runnable, skipped = enumerate_space(compose("search.gpu_budget=8", "search.tp=[1,2,4,8]",
                                                "search.deployments=[disaggregated]"))
    # x prefill replicas of tp_p + y decode replicas of tp_d = 8 GPUs, x, y >= 1 (by hand)
    expected = {(1, x, 1, 8 - x) for x in range(1, 8)} | {
        (1, 6, 2, 1), (1, 4, 2, 2), (1, 2, 2, 3), (1, 4, 4, 1),
        (2, 1, 1, 6), (2, 2, 1, 4), (2, 3, 1, 2),
        (2, 1, 2, 3), (2, 2, 2, 2), (2, 3, 2, 1), (2, 2, 4, 1),
        (4, 1, 1, 4), (4, 1, 2, 2), (4, 1, 4, 1)}
    splits = [(c.tp, c.replicas, c.decode_tp, c.decode_replicas) for c, _ in runnable]
    assert len(splits) == len(expected) == 21 and set(splits) == expected
    for cand, sim_cfg in runnable:
        assert cand.deployment == "disaggregated" and cand.gpus == 8 and cand.pp == 1
        dep = sim_cfg.deployment
        assert dep.name == "disaggregated" and (dep.prefill.pp, dep.decode.pp) == (1, 1)
        assert (dep.prefill.tp, dep.prefill.replicas, dep.decode.tp, dep.decode.replicas) == \
            (cand.tp, cand.replicas, cand.decode_tp, cand.decode_replicas)
        assert (dep.prefill.hw, dep.decode.hw, sim_cfg.hw.name) == ("", "", "h100")
        assert sim_cfg.scheduler.max_num_seqs == 128        # the candidate's knobs: both pools
    assert runnable[0][0].label == "disagg P:h100 tp1x1 D:h100 tp1x7 vllm max_num_seqs=128"
    # tp pairs without a split are listed, not dropped
    assert sorted((s.candidate.tp, s.candidate.decode_tp) for s in skipped) == \
        [(1, 8), (2, 8), (4, 8), (8, 1), (8, 2), (8, 4), (8, 8)]
    assert all("fill the 8-GPU budget" in s.reason and "x-" in s.candidate.label for s in skipped)


def test_mixed_hw_candidates_price_each_pool_at_its_own_hw():
    cand = Candidate("h100", 2, 1, 2, "vllm", deployment="disaggregated", decode_hw="a100",
                     decode_tp=4, decode_replicas=1)
    assert cand.gpus == 8 and cand.pool_gpus == {"h100": 4, "a100": 4}
    assert cand.cost_usd_per_hour(PRICES) == pytest.approx(4 * 2.99 + 4 * 1.79)   # 19.12
    assert cand.label == "disagg P:h100 tp2x2 D:a100 tp4x1 vllm"
    colocated = Candidate("a100", 4, 1, 2, "vllm")
    assert colocated.cost_usd_per_hour(PRICES) == pytest.approx(8 * 1.79)
    assert colocated.columns()["deployment"] == "colocated" and "decode_hw" not in colocated.columns()

    runnable, _ = enumerate_space(compose("search.hw=[a100,h100]", "search.tp=[4]", "search.gpu_budget=8",
                                          "search.deployments=[disaggregated]", "search.disagg_mixed_hw=true"))
    pairs = {(c.hw, c.decode_hw): s for c, s in runnable}
    assert sorted(pairs) == [("a100", "a100"), ("a100", "h100"), ("h100", "a100"), ("h100", "h100")]
    mixed = pairs[("h100", "a100")]
    assert (mixed.hw.name, mixed.deployment.prefill.hw, mixed.deployment.decode.hw) == ("h100", "", "a100")
    same, _ = enumerate_space(compose("search.hw=[a100,h100]", "search.tp=[4]", "search.gpu_budget=8",
                                      "search.deployments=[disaggregated]"))
    assert sorted((c.hw, c.decode_hw) for c, _ in same) == [("a100", "a100"), ("h100", "h100")]


def test_search_ranks_both_families_by_cost_per_slo_request(tmp_path):
    cfg = compose("search.hw=[a100,h100]", "search.tp=[2,4]", "search.gpu_budget=8",
                  "search.deployments=[colocated,disaggregated]", "search.disagg_mixed_hw=true",
                  "search.seeds=[0]", "search.rel_tol=0.1", "search.executor=serial",
                  "search.prune_fraction=0", f"search.out_dir={tmp_path}")
    outcome = search.run_search(cfg, simulate_fn=fake_sim, fits=fake_fits)
    ranked = pd.read_csv(tmp_path / "ranked.csv")
    assert set(ranked.deployment) == {"colocated", "disaggregated"}
    ok = outcome.ranked[outcome.ranked.status == "ok"]
    assert set(ok.deployment) == {"colocated", "disaggregated"}
    assert ok.usd_per_slo_request.is_monotonic_increasing
    best = ok.iloc[0]
    assert best.usd_per_slo_request == ok.usd_per_slo_request.min()
    assert ok.usd_per_slo_request.to_numpy() == pytest.approx(
        (ok.cost_usd_per_hour / (ok.capacity_qps_mean * 3600)).to_numpy())
    assert ok.requests_per_usd.to_numpy() == pytest.approx(1 / ok.usd_per_slo_request.to_numpy())
    # a mixed-hw row is priced from both SKUs
    row = outcome.ranked.set_index("config").loc["disagg P:h100 tp2x2 D:a100 tp4x1 vllm max_num_seqs=128"]
    assert row.cost_usd_per_hour == pytest.approx(4 * 2.99 + 4 * 1.79)
    assert (row.price_usd_per_gpu_hour, row.decode_price_usd_per_gpu_hour) == (2.99, 1.79)
    # the message compares the winner with the best of the other family
    fam = best.deployment
    other = ok[ok.deployment != fam].iloc[0]
    ratio = best.requests_per_usd / other.requests_per_usd
    assert f"{fam} {best.config.removeprefix('disagg ')} serves {ratio:.2f}x the SLO-meeting " \
           f"requests/USD of the best {other.deployment} ({other.config.removeprefix('disagg ')}" \
           in outcome.message
    assert (tmp_path / "pareto.png").stat().st_size > 0
    # skipped candidates (tp pairs that cannot fill the budget do not exist here: tp 2/4 always do)
    assert (outcome.ranked.status == "skipped").sum() == 0


def test_default_deployments_keep_todays_candidates():
    space = ["search.hw=[a100]", "search.tp=[1,2]", "search.pp=[1,2]", "search.gpu_budget=4",
             "search.knobs.vllm.max_num_seqs=[64]"]
    default, skipped = enumerate_space(compose(*space))
    assert [c.label for c, _ in default] == [
        "a100 tp1 pp1 x4 vllm max_num_seqs=64", "a100 tp1 pp2 x2 vllm max_num_seqs=64",
        "a100 tp2 pp1 x2 vllm max_num_seqs=64", "a100 tp2 pp2 x1 vllm max_num_seqs=64"]
    assert skipped == [] and all(c.deployment == "colocated" for c, _ in default)
    assert all(deployment_name(s) == "colocated" for _, s in default)
    both, _ = enumerate_space(compose(*space, "search.deployments=[colocated,disaggregated]"))
    colocated = [(c, s) for c, s in both if c.deployment == "colocated"]
    # the same colocated candidates, with the same sim configs (so stored probes are reused)
    assert [c for c, _ in colocated] == [c for c, _ in default]
    assert [config_hash(s) for _, s in colocated] == [config_hash(s) for _, s in default]
    assert len(both) > len(default)


def test_bad_deployments_value_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        search.run_search(compose("search.deployments=[colo]", f"search.out_dir={tmp_path}"),
                          simulate_fn=fake_sim, fits=fake_fits)
    assert str(err.value) == "search.deployments=['colo']: choose one or more of colocated, disaggregated"
    with pytest.raises(ConfigError, match="choose one or more of colocated, disaggregated"):
        enumerate_space(compose("search.deployments=[]"))


def test_exec_dispatches_on_the_deployment_family(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        simulate=lambda cfg, load_op_times=None: calls.append(("simulate", load_op_times))
        or types.SimpleNamespace(summary={"throughput_rps": 1.0}),
        check_fits=lambda cfg: calls.append(("check_fits", None)))
    import sim
    monkeypatch.setitem(sys.modules, "sim.disagg", fake)
    monkeypatch.setattr(sim, "disagg", fake, raising=False)
    cfg = OmegaConf.create({"deployment": {"name": "disaggregated"}})
    assert search_exec.simulate_summary(cfg) == {"throughput_rps": 1.0}
    search_exec.check_fits(cfg)
    assert calls == [("simulate", search_exec.op_times_for), ("check_fits", None)]
    assert deployment_name(OmegaConf.create({"hw": {}})) == "colocated"   # configs stored before


def test_pareto_plot_draws_one_front_per_family(tmp_path):
    # colocated: A dominates B; disaggregated: C and D are both on their front; one front
    # over all would hold only A and D
    ok = pd.DataFrame(dict(
        config=["A", "B", "C", "D"], status="ok", hw="h100", scheduler="vllm",
        deployment=["colocated", "colocated", "disaggregated", "disaggregated"],
        e2e_s_p90_at_capacity=[1.0, 2.0, 1.5, 3.0], requests_per_usd=[10.0, 5.0, 8.0, 11.0],
        requests_per_usd_ci95_low=np.nan, requests_per_usd_ci95_high=np.nan))
    assert plot_pareto(ok, "e2e_s_p90", tmp_path / "both.png", "t") == 3
    assert plot_pareto(ok.iloc[[0, 1]], "e2e_s_p90", tmp_path / "one.png", "t") == 1
    assert (tmp_path / "both.png").stat().st_size > 0
