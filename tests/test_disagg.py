"""Prefill/decode disaggregation (sim/disagg.py, sim/kv_transfer.py): the hand-computed KV
transfer, conservation over random deployments (every request prefills once, transfers once,
decodes to its length, KV freed on both sides), exact fast-forward, backpressure, the errors."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import sim
from conf import ConfigError, shapes, to_hw, to_model
from estimator.runtime import load_op_times
from sim import disagg, kv_transfer
from sim.config import KvTransferConf
from sim.schedulers import SCHEDULERS

MAX_LEN = 512
DISAGG = ["deployment=disaggregated"]


# --- the transfer, by hand ------------------------------------------------------------------
def test_llama3_70b_4096_token_prompt_over_400_gbps_by_hand():
    model = to_model(sim.compose(["model=llama3-70b"]).model)
    # 80 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes
    assert shapes.kv_bytes_per_token(model, 1) == 80 * 8 * 128 * 2 * 2 == 327_680
    assert 327_680 * 4096 == 1_342_177_280
    link = kv_transfer.Link("network", bw_gbps=50.0, latency_us=10.0)     # 400 Gb/s = 50 GB/s
    for tp, want_ms in ((1, 10e-3 + 1_342_177_280 / 50e9 * 1e3), (8, 10e-3 + 1_342_177_280 / 8 / 50e9 * 1e3)):
        lay = shapes.layout_of(model, OmegaConf.create({"tp": tp, "pp": 1}))
        t = kv_transfer.transfer_model(model, lay, model, lay, link)
        assert t.total_bytes_per_token * 4096 == 1_342_177_280
        assert t.seconds(4096) * 1e3 == pytest.approx(want_ms, rel=1e-12)
    assert 10e-3 + 1_342_177_280 / 50e9 * 1e3 == pytest.approx(26.8535, abs=1e-4)
    assert 10e-3 + 1_342_177_280 / 8 / 50e9 * 1e3 == pytest.approx(3.3654, abs=1e-4)
    # tp4 -> tp8: the prefill GPUs hold twice the share of a decode GPU and bound the transfer
    four = shapes.layout_of(model, OmegaConf.create({"tp": 4, "pp": 1}))
    eight = shapes.layout_of(model, OmegaConf.create({"tp": 8, "pp": 1}))
    assert kv_transfer.transfer_model(model, four, model, eight, link).seconds(4096) == pytest.approx(
        10e-6 + 1_342_177_280 / 4 / 50e9)


def test_link_choice_follows_the_cards_and_the_node():
    h100, b200 = (to_hw(sim.compose([f"hw={n}"]).hw) for n in ("h100", "b200"))
    auto = KvTransferConf()
    assert kv_transfer.choose_link(auto, h100, h100, 8) == kv_transfer.Link("nvlink", h100.link_bw_gbps,
                                                                           h100.network_latency_us)
    assert kv_transfer.choose_link(auto, h100, h100, 12).kind == "network"      # more than one node
    mixed = kv_transfer.choose_link(auto, h100, b200, 8)
    assert mixed.kind == "network" and mixed.bw_gbps == min(h100.network_bw_gbps, b200.network_bw_gbps)
    assert kv_transfer.choose_link(KvTransferConf(link="network", bw_gbps=25, latency_us=0), h100, h100, 2) == \
        kv_transfer.Link("network", 25.0, 0.0)
    with pytest.raises(ConfigError, match="choose one of"):
        kv_transfer.choose_link(KvTransferConf(link="pcie"), h100, h100, 2)


# --- end to end -----------------------------------------------------------------------------
def run(overrides, **kw):
    return sim.simulate(sim.compose(DISAGG + list(overrides)), **kw)


def test_one_request_alone_pays_prefill_transfer_and_first_decode_step():
    ov = ["hw=h100", "model=llama3-70b", "parallel.tp=4", "workload=fixed", "workload.num_requests=1",
          "workload.prefill_tokens=4096", "workload.decode_tokens=64", "deployment.kv_transfer.link=network",
          "deployment.kv_transfer.bw_gbps=50", "deployment.kv_transfer.latency_us=10"]
    s = run(ov).summary
    assert s["kv_transfer_s_mean"] == pytest.approx(10e-6 + 1_342_177_280 / 4 / 50e9)
    assert s["kv_wait_s_mean"] == 0 and s["prefill_queue_s_mean"] == 0
    parts = s["prefill_s_mean"] + s["kv_transfer_s_mean"] + s["decode_queue_s_mean"]
    frontend = sim.compose(["engine=vllm_v1"]).engine.frontend_latency_us * 1e-6
    assert s["ttft_s_mean"] == pytest.approx(parts + frontend)
    assert s["kv_transfer_bytes"] == 1_342_177_280
    # overlapped layer by layer, only the last layer's share is left after the prefill
    s2 = run(ov + ["deployment.kv_transfer.overlap=true"]).summary
    assert s2["kv_transfer_s_mean"] == pytest.approx(s["kv_transfer_s_mean"] / 80)
    assert s2["ttft_s_mean"] < s["ttft_s_mean"]


@pytest.fixture(scope="module")
def tables():
    cfg = sim.compose(["hw=a100", "model=llama2-7b"])
    hw, model, cache = to_hw(cfg.hw), to_model(cfg.model), {}

    def load(pool_cfg):
        tp = int(pool_cfg.parallel.tp)
        if tp not in cache:
            cache[tp] = load_op_times(hw, model, tp)
        return cache[tp]
    return load


deployments = st.fixed_dictionaries({
    "scheduler.name": st.sampled_from(sorted(SCHEDULERS)),
    "scheduler.max_num_seqs": st.integers(1, 12),
    "scheduler.max_tokens_per_batch": st.sampled_from([MAX_LEN, 1024]),
    "scheduler.chunk_size": st.sampled_from([64, 512]),
    "scheduler.prefix_caching": st.booleans(),
    "sim.num_gpu_blocks_override": st.integers(70, 300),      # small: backpressure and preemption
    "deployment.prefill.tp": st.sampled_from([1, 2]),
    "deployment.decode.tp": st.sampled_from([1, 2]),
    "deployment.prefill.replicas": st.integers(1, 2),
    "deployment.decode.replicas": st.integers(1, 3),
    "deployment.decode.scheduler.max_num_seqs": st.sampled_from([None, 2]),
    "deployment.kv_transfer.overlap": st.booleans(),
    "deployment.kv_transfer.link": st.sampled_from(["auto", "network"]),
    "workload.qps": st.sampled_from([2.0, 20.0, 200.0]),
    "workload.prefix": st.sampled_from(["none", "shared", "sessions"]),
    "seed": st.integers(0, 3),
})


def configure(params):
    cfg = sim.compose(DISAGG + ["hw=a100", "model=llama2-7b", "workload=uniform", "workload.num_requests=60",
                                "workload.min_tokens=16", "workload.max_tokens=160",
                                f"workload.max_request_tokens={MAX_LEN}", "workload.system_prompt_tokens=64",
                                "workload.turns=3", "workload.think_time_s=0.5"])
    for key, value in params.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=deployments)
def test_every_request_prefills_transfers_and_decodes_once(tables, params):
    cfg = configure(params)
    res = disagg.simulate(cfg, load_op_times=tables, outputs=False)   # raises if KV is left held
    s, req = res.summary, res.requests
    n = cfg.workload.num_requests
    assert s["num_requests"] == n and len(req) == n and sorted(req["request_id"]) == list(range(n))
    assert s["num_kv_transfers"] == n                                    # one hand-off each
    assert (req["num_generated_tokens"] == req["num_decode_tokens"]).all()
    bytes_per_token = shapes.kv_bytes_per_token(to_model(cfg.model), 1)
    assert s["kv_transfer_bytes"] == bytes_per_token * req["num_prefill_tokens"].sum()
    assert (req["ttft_s"] > 0).all() and (req["e2e_s"] >= req["ttft_s"]).all()
    decode_ids = {r["replica"] for r in res.replicas if r["pool"] == "decode"}
    assert set(req["replica"]) <= decode_ids                            # completed on the decode pool
    for key in ("kv_wait_s_mean", "kv_transfer_s_mean", "prefill_queue_s_mean", "decode_queue_s_mean"):
        assert s[key] >= 0
    OmegaConf.update(cfg, "sim.fast_forward", not cfg.sim.fast_forward)
    again = disagg.simulate(cfg, load_op_times=tables, outputs=False).requests
    for col in ("first_token_s", "completed_at_s", "num_preemptions"):
        assert np.array_equal(req[col].to_numpy(), again[col].to_numpy()), col


def test_full_decode_memory_holds_prompts_back_on_the_prefill_pool(tables):
    base = {"scheduler.name": "vllm_v1", "workload.qps": 50.0, "workload.prefix": "none", "seed": 0,
            "deployment.decode.scheduler.max_num_seqs": 2, "deployment.prefill.replicas": 1}
    tight = disagg.simulate(configure(base), load_op_times=tables, outputs=False).summary
    roomy = disagg.simulate(configure(dict(base, **{"deployment.decode.scheduler.max_num_seqs": 64})),
                            load_op_times=tables, outputs=False).summary
    assert tight["kv_wait_s_mean"] > 10 * max(roomy["kv_wait_s_mean"], 1e-4)
    assert tight["ttft_s_mean"] > roomy["ttft_s_mean"]


def test_prefix_caching_runs_on_the_prefill_pool(tables):
    params = {"scheduler.name": "vllm_v1", "scheduler.prefix_caching": True, "workload.prefix": "sessions",
              "workload.qps": 2.0, "seed": 1}
    s = disagg.simulate(configure(params), load_op_times=tables, outputs=False).summary
    assert s["prefix_hit_rate"] > 0.3
    pools = disagg.pool_configs(configure(params))
    assert pools["prefill"].scheduler.prefix_caching and not pools["decode"].scheduler.prefix_caching


def test_pools_take_their_own_gpu_layout_and_scheduler():
    cfg = sim.compose(DISAGG + ["hw=h100", "model=llama3-70b", "parallel.tp=4", "deployment.prefill.hw=h200",
                                "deployment.decode.tp=8", "deployment.decode.replicas=2",
                                "deployment.prefill.scheduler.max_tokens_per_batch=8192",
                                "+deployment.decode.scheduler.watermark=0.05"])
    pools = disagg.pool_configs(cfg)
    assert pools["prefill"].hw.name == "h200" and pools["decode"].hw.name == "h100"
    assert (pools["prefill"].parallel.tp, pools["decode"].parallel.tp, pools["decode"].parallel.replicas) == (4, 8, 2)
    assert pools["prefill"].scheduler.max_tokens_per_batch == 8192
    assert pools["decode"].scheduler.max_tokens_per_batch == cfg.scheduler.max_tokens_per_batch
    assert pools["decode"].scheduler.watermark == 0.05
    assert pools["prefill"].router.name == pools["decode"].router.name == "least_outstanding"


@pytest.mark.parametrize("override, message", [
    ("deployment.name=split", "choose colocated or disaggregated"),
    ("deployment.decode_router=prefix_affinity", "no prefix cache"),
    ("deployment.prefill_router=fastest", "choose one of"),
    ("deployment.decode.replicas=0", "must be >= 1"),
    ("deployment.prefill.hw=h900", "choose one of"),
    ("+deployment.decode.scheduler.max_num_seq=8", "no knob 'max_num_seq'"),
    ("deployment.kv_transfer.link=pcie", "choose one of"),
    ("deployment.decode.tp=3", "decode pool"),
])
def test_bad_input_is_one_clear_error(override, message):
    cfg = sim.compose(DISAGG + ["hw=h100", "model=llama3-70b", "parallel.tp=4", "workload.num_requests=5",
                                override])
    with pytest.raises(ConfigError, match=message):
        sim.simulate(cfg)


def test_a_pool_that_does_not_fit_names_the_pool():
    cfg = sim.compose(DISAGG + ["hw=h100", "model=llama3-70b", "parallel.tp=4", "deployment.decode.tp=1"])
    with pytest.raises(ConfigError, match="^decode pool: .*fit"):
        disagg.check_fits(cfg)
    disagg.check_fits(sim.compose(DISAGG + ["hw=h100", "model=llama3-70b", "parallel.tp=4"]))


def test_goodput_counts_requests_meeting_both_limits():
    res = sim.simulate(sim.compose(["hw=a100", "model=llama2-7b", "workload.num_requests=80", "workload.qps=4"]))
    req, s = res.requests, res.summary
    ok = (req["ttft_s"] <= 2.0) & (req["tpot_s"].isna() | (req["tpot_s"] <= 0.1))
    assert s["slo_attainment"] == pytest.approx(ok.mean())
    assert s["goodput_rps"] == pytest.approx(s["throughput_rps"] * ok.mean())
    assert s["goodput_rps_per_gpu"] == pytest.approx(s["goodput_rps"] / s["gpus"])
    strict = sim.simulate(sim.compose(["hw=a100", "model=llama2-7b", "workload.num_requests=80", "workload.qps=4",
                                       "sim.goodput_ttft_s=1e-6"])).summary
    assert strict["goodput_rps"] == 0 and not math.isnan(strict["slo_attainment"])
