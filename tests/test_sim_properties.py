"""Simulator invariants over random workloads and deployments (hypothesis), prefix caching and
prefix-structured workloads included."""
import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import sim
from conf import to_hw, to_model
from estimator.runtime import load_op_times
from sim import workload as workloads
from sim.engine import Engine
from sim.offload import OffloadCache
from sim.prefix_cache import PrefixCache
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
    "scheduler.prefix_caching": st.booleans(),
    "sim.num_gpu_blocks_override": st.integers(80, 400),  # small: forces preemption
    "parallel.pp": st.sampled_from([1, 1, 2, 3]),
    "parallel.replicas": st.integers(1, 3),
    "router.name": st.sampled_from(["random", "round_robin", "least_outstanding", "prefix_affinity"]),
    "router.max_imbalance": st.sampled_from([0, 4, 100]),
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
    "workload.prefix": st.sampled_from(["none", "none", "shared", "tree", "sessions"]),
    "workload.system_prompt_tokens": st.integers(0, 96),
    "workload.num_system_prompts": st.integers(1, 3),
    "workload.tree_depth": st.integers(1, 3),
    "workload.tree_branching": st.integers(1, 3),
    "workload.tree_segment_tokens": st.sampled_from([16, 40]),
    "workload.turns": st.integers(1, 4),
    "workload.think_time_s": st.sampled_from([0.0, 0.3]),
    "seed": st.integers(0, 2 ** 16),
})


def configure(base_cfg, params):
    cfg = copy.deepcopy(base_cfg)
    for k, v in params.items():
        OmegaConf.update(cfg, k, v)
    if cfg.router.name == "prefix_affinity":       # it routes by the replicas' caches
        OmegaConf.update(cfg, "scheduler.prefix_caching", True)
    if cfg.workload.prefix == "sessions":          # whole sessions must fit MAX_LEN
        OmegaConf.update(cfg, "workload.lengths", "fixed")
        OmegaConf.update(cfg, "workload.prefill_tokens", min(cfg.workload.prefill_tokens, 24))
        OmegaConf.update(cfg, "workload.decode_tokens", min(cfg.workload.decode_tokens, 16))
    return cfg


def requested(cfg):
    return list(workloads.requests(cfg.workload, cfg.seed, MAX_LEN, cfg.sim.data_dir,
                                   cfg.scheduler.block_size))


def audit(rep) -> None:
    """The KV block manager's books: blocks in use (cached or not) + free = capacity, each cached
    block's reference count = the running requests holding it, free cached blocks are queued."""
    b = rep.blocks
    if not isinstance(b, PrefixCache):
        assert sum(r.blocks for r in rep.running) + b.free == b.capacity
        return
    held: dict = {}
    for r in rep.running:
        for k in r.keys:
            held[k] = held.get(k, 0) + 1
    assert {k: c for k, c in b.ref.items() if c} == held
    queued = [k for k, run in b.queue.items() if run is None]
    assert all(b.ref[k] == 0 for k in queued) and len(queued) == sum(c == 0 for c in b.ref.values())
    assert b.fresh + len(queued) + sum(run for run in b.queue.values() if run) == b.free
    unkeyed = sum(r.blocks - len(r.keys) for r in rep.running)
    assert len(held) + unkeyed + b.free == b.capacity          # cached + used never exceed capacity
    if isinstance(b, OffloadCache):   # the CPU tier: its own keys, swapped KV pinned, within its size
        assert not set(b.cpu) & set(b.ref)
        assert b.swapped_blocks == sum(r.swapped for r in rep.waiting)
        assert len(b.cpu) + b.swapped_blocks <= b.cpu_capacity
        assert all(r.swapped == 0 for r in rep.running)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=deployments)
def test_invariants(base, params, monkeypatch):
    cfg = configure(base[0], params)
    start = Engine.start

    def audited_start(self, rep, now):
        start(self, rep, now)
        audit(rep)
    monkeypatch.setattr(Engine, "start", audited_start)
    res = sim.simulate(cfg, op_times=base[1])
    monkeypatch.undo()
    df = res.requests
    want = requested(cfg)
    n = cfg.workload.num_requests
    # every request completes exactly once, with the tokens it asked for
    assert sorted(df.request_id) == list(range(n)) and res.summary["num_requests"] == n
    assert (df.num_generated_tokens == df.num_decode_tokens).all()
    if cfg.workload.prefix != "sessions":      # (sessions: later turns are made as they go)
        assert df.num_prefill_tokens.tolist() == [w[1] for w in want]
        assert df.num_decode_tokens.tolist() == [w[2] for w in want]
        assert np.allclose(df.arrived_at_s, [w[0] for w in want])
    # timestamps are ordered and the KV cache never overflowed
    assert (df.arrived_at_s <= df.first_scheduled_s).all()
    assert (df.first_scheduled_s < df.first_token_s).all()
    assert (df.first_token_s <= df.completed_at_s).all()
    assert (df.ttft_s <= df.e2e_s).all()
    assert 0 < res.summary["kv_util_peak"] <= 1
    assert res.summary["num_preemptions"] == df.num_preemptions.sum()
    if cfg.scheduler.name in ("orca", "faster_transformer", "lightllm"):
        assert res.summary["num_preemptions"] == 0     # they reserve KV for the whole output
    # prefix caching: nothing cached without it; a prompt never reuses its last token
    assert (df.num_cached_tokens <= df.num_prefill_tokens - 1).all()
    if not cfg.scheduler.prefix_caching:
        assert (df.num_cached_tokens == 0).all() and res.summary["prefix_hit_rate"] == 0
    elif (cfg.workload.prefix == "shared" and cfg.workload.num_system_prompts == 1
          and res.summary["kv_evictions"] == 0):
        # one system prompt, nothing evicted: every request after a replica's first reuses it
        bs, sys_blocks = cfg.scheduler.block_size, cfg.workload.system_prompt_tokens // cfg.scheduler.block_size
        # (once every earlier request there has prefilled: a request admitted while the one
        # before it is still prefilling reuses only the chunks already scheduled)
        order = df.sort_values(["replica", "first_scheduled_s", "request_id"])
        prefilled_before = order.groupby("replica").first_token_s.transform(lambda t: t.cummax().shift())
        later = order[order.replica.duplicated()]
        full = np.minimum(sys_blocks, (later.num_prefill_tokens - 1) // bs) * bs
        settled = later.first_scheduled_s >= prefilled_before[later.index]
        assert (later.num_cached_tokens[settled] == full[settled]).all()
        assert (later.num_cached_tokens <= full).all()


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


# --- speculative decoding and KV offload (sim/spec.py, sim/offload.py; vLLM V1 only) ----------
rates = st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]), min_size=4, max_size=4).map(
    lambda r: sorted(r, reverse=True))
features = st.fixed_dictionaries({
    "scheduler.spec.method": st.sampled_from(["none", "eagle", "ngram", "mtp"]),
    "scheduler.spec.num_tokens": st.integers(1, 4),
    "scheduler.spec.acceptance": rates,
    "scheduler.spec.propose_rate": st.sampled_from([-1.0, 0.5]),
    "scheduler.offload.cpu_gib": st.sampled_from([0.0, 0.02, 0.2, 1.0]),
    "scheduler.offload.overlap": st.booleans(),
    "scheduler.offload.preempt": st.sampled_from(["recompute", "swap"]),
    # shared prefixes and a small GPU cache: evictions, loads back and preemption
    "workload.prefix": st.sampled_from(["none", "shared", "tree", "sessions"]),
    "sim.num_gpu_blocks_override": st.integers(20, 80),
    "scheduler.block_size": st.just(16),
    "scheduler.max_num_seqs": st.integers(4, 12),
    "workload.num_requests": st.integers(8, 40),
    "workload.qps": st.sampled_from([20.0, 100.0]),
    "workload.min_tokens": st.integers(32, 128),
    "workload.max_tokens": st.integers(128, MAX_LEN),
    "workload.prefill_tokens": st.integers(64, 200),
})


def configure_features(base_cfg, params, extra):
    extra = dict(extra)
    params = {**params, "scheduler.name": "vllm_v1", "parallel.pp": 1,
              **{k: extra.pop(k) for k in list(extra) if k.startswith(("workload.", "sim.", "scheduler.b",
                                                                       "scheduler.m"))}}
    cfg = configure(base_cfg, params)
    if extra["scheduler.spec.method"] == "none":
        extra.update({"scheduler.spec.acceptance": [], "scheduler.spec.propose_rate": -1.0})
    if extra["scheduler.offload.cpu_gib"]:
        extra["scheduler.prefix_caching"] = True
    else:
        extra["scheduler.offload.preempt"] = "recompute"
    for k, v in extra.items():
        OmegaConf.update(cfg, k, v)
    return cfg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=deployments, extra=features)
def test_spec_and_offload_invariants(base, params, extra, monkeypatch):
    """Every request emits exactly its output (a step keeps only what is left), the KV blocks of
    both tiers balance after every step, and a run is deterministic."""
    cfg = configure_features(base[0], params, extra)
    start, finish = Engine.start, Engine.finish

    def audited_start(self, rep, now):
        start(self, rep, now)
        audit(rep)

    def audited_finish(self, rep, *args):
        finish(self, rep, *args)
        audit(rep)
    monkeypatch.setattr(Engine, "start", audited_start)
    monkeypatch.setattr(Engine, "finish", audited_finish)
    res = sim.simulate(cfg, op_times=base[1])
    monkeypatch.undo()
    df, s = res.requests, res.summary
    n = cfg.workload.num_requests
    assert sorted(df.request_id) == list(range(n)) and s["num_requests"] == n
    assert (df.num_generated_tokens == df.num_decode_tokens).all()
    assert (df.first_scheduled_s < df.first_token_s).all() and (df.first_token_s <= df.completed_at_s).all()
    assert 0 < s["kv_util_peak"] <= 1
    if cfg.scheduler.spec.method != "none":
        assert s["spec_num_accepted_tokens"] <= s["spec_num_draft_tokens"]
        assert 1 <= s["spec_acceptance_length_mean"] <= 1 + cfg.scheduler.spec.num_tokens
    if cfg.scheduler.offload.cpu_gib:
        assert s["offload_swap_outs"] <= s["num_preemptions"]
        if cfg.scheduler.offload.preempt == "recompute":
            assert s["offload_swap_outs"] == 0
    again = sim.simulate(cfg, op_times=base[1])
    assert res.requests.equals(again.requests)
