"""Simulator invariants over random workloads and deployments (hypothesis)."""
import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from omegaconf import OmegaConf

import sim
from conf import to_hw, to_model
from estimator.runtime import load_op_times
from sim import workload as workloads
from sim.schedulers import SCHEDULERS

MAX_LEN = 256


@pytest.fixture(scope="module")
def base():
    cfg = sim.compose(["hw=a100", "model=llama2-7b", "workload=uniform",
                       f"workload.max_request_tokens={MAX_LEN}", "sim.keep_requests=true"])
    return cfg, load_op_times(to_hw(cfg.hw), to_model(cfg.model), 1)


deployments = st.fixed_dictionaries({
    "scheduler.name": st.sampled_from(sorted(SCHEDULERS)),
    "scheduler.max_num_seqs": st.integers(1, 12),
    "scheduler.max_tokens_per_batch": st.sampled_from([MAX_LEN, 300, 1024]),
    "scheduler.chunk_size": st.sampled_from([16, 64, 512]),
    "scheduler.block_size": st.sampled_from([4, 16]),
    "scheduler.watermark": st.sampled_from([0.0, 0.01, 0.1]),
    "sim.num_gpu_blocks_override": st.integers(80, 400),  # small: forces preemption
    "parallel.pp": st.sampled_from([1, 1, 2, 3]),
    "parallel.replicas": st.integers(1, 3),
    "router.name": st.sampled_from(["random", "round_robin", "least_outstanding"]),
    "workload.num_requests": st.integers(1, 40),
    "workload.arrival": st.sampled_from(["poisson", "gamma", "static"]),
    "workload.qps": st.sampled_from([0.5, 5.0, 100.0]),
    "workload.cv": st.sampled_from([0.5, 3.0]),
    "workload.lengths": st.sampled_from(["fixed", "uniform", "zipf"]),
    "workload.prefill_tokens": st.integers(1, 200),
    "workload.decode_tokens": st.integers(1, 50),
    "workload.min_tokens": st.integers(2, 20),
    "workload.max_tokens": st.integers(20, MAX_LEN),
    "workload.prefill_decode_ratio": st.sampled_from([0.5, 4.0]),
    "seed": st.integers(0, 2 ** 16),
})


def configure(base_cfg, params):
    cfg = copy.deepcopy(base_cfg)
    for k, v in params.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def requested(cfg):
    return list(workloads.requests(cfg.workload, cfg.seed, MAX_LEN, cfg.sim.data_dir))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=deployments)
def test_invariants(base, params):
    cfg = configure(base[0], params)
    res = sim.simulate(cfg, op_times=base[1])
    df = res.requests
    want = requested(cfg)
    # every request completes exactly once, with the tokens it asked for
    assert sorted(df.request_id) == list(range(len(want)))
    assert df.num_prefill_tokens.tolist() == [p for _, p, _ in want]
    assert df.num_decode_tokens.tolist() == [d for _, _, d in want]
    assert (df.num_generated_tokens == df.num_decode_tokens).all()
    assert np.allclose(df.arrived_at_s, [t for t, _, _ in want])
    # timestamps are ordered and the KV cache never overflowed
    assert (df.arrived_at_s <= df.first_scheduled_s).all()
    assert (df.first_scheduled_s < df.first_token_s).all()
    assert (df.first_token_s <= df.completed_at_s).all()
    assert (df.ttft_s <= df.e2e_s).all()
    assert 0 < res.summary["kv_util_peak"] <= 1
    assert res.summary["num_preemptions"] == df.num_preemptions.sum()
    assert res.summary["num_requests"] == len(want)
    if cfg.scheduler.name in ("orca", "faster_transformer", "lightllm"):
        assert res.summary["num_preemptions"] == 0     # they reserve KV for the whole output


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=deployments)
def test_same_seed_same_results_and_fast_forward_changes_nothing(base, params):
    cfg = configure(base[0], params)
    a = sim.simulate(cfg, op_times=base[1])
    b = sim.simulate(cfg, op_times=base[1])
    OmegaConf.update(cfg, "sim.fast_forward", False)
    c = sim.simulate(cfg, op_times=base[1])
    assert a.requests.equals(b.requests)
    assert a.requests.equals(c.requests)
    for k in ("ttft_s_p90", "e2e_s_p99", "num_preemptions", "num_iterations", "batch_size_mean", "mfu"):
        assert a.summary[k] == b.summary[k] and a.summary[k] == pytest.approx(c.summary[k], rel=1e-12, nan_ok=True)


def test_fast_forward_is_exact_for_lightllm_while_requests_wait(base):
    """LightLLM's admission test can pass in the middle of a decode stretch (a waiting request's
    projected peak falls as the running ones decode): it must not be fast-forwarded then."""
    cfg = sim.compose(["hw=a100", "model=llama2-7b", "workload=splitwise_conv", "workload.num_requests=20",
                       "scheduler=lightllm", "workload.qps=30", "sim.num_gpu_blocks_override=400"])
    a = sim.simulate(cfg, op_times=base[1])
    OmegaConf.update(cfg, "sim.fast_forward", False)
    b = sim.simulate(cfg, op_times=base[1])
    assert a.requests.equals(b.requests)
