"""Prefix caching (vLLM v1's), prefix-structured workloads, cache-aware routing, their errors.

Hand-computed cases on the block manager and the engine with a stub cost; real shared prefixes
from ShareGPT token ids (tests/fixtures/prefix, README there) checked against a token-level
count; small end-to-end simulations for routing, metrics and the search.
"""
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

import sim
from conf import ConfigError, to_hw, to_model
from estimator.runtime import load_op_times
from sim import workload as workloads
from sim.config import RouterConf, SchedulerConf
from sim.engine import Engine, Replica, Request
from sim.metrics import Metrics
from sim.prefix_cache import PrefixCache
from sim.router import RouterState, route_prefix_affinity
from sim.schedulers import SCHEDULERS

FIX = Path(__file__).parent / "fixtures" / "prefix"


def keys(segment, start, stop):
    return [segment << 24 | i for i in range(start, stop)]


class StubCost:
    """1 ms per iteration whatever it holds; records the prefill (q, kv) pairs it was asked for."""

    def __init__(self):
        self.prefills = []

    def stage_us(self, num_tokens, prefills, num_decodes, kv_sum, sampled):
        self.prefills += prefills
        return [1000.0]

    def decode_us(self, num_decodes, kv_sum):
        return 1000.0


def engine_with_cache(capacity=1000, block_size=16, scheduler="vllm_v1", fast_forward=False, **knobs):
    sc = SchedulerConf(name=scheduler, block_size=block_size, watermark=0.0, prefix_caching=True, **knobs)
    cache = PrefixCache(capacity, block_size, 0.0)
    rep = Replica(0, SCHEDULERS[scheduler](sc), cache, StubCost(), pp=1)
    metrics = Metrics(True)
    return Engine([rep], "round_robin", 0, metrics, fast_forward), rep, cache, metrics


# --- the block manager ----------------------------------------------------------------------
def test_two_requests_sharing_a_1024_token_prefix_reuse_exactly_64_blocks():
    shared = keys(7, 0, 64)                                   # 1024 tokens in 16-token blocks
    a = (0.0, 1100, 3, shared + keys(8, 64, 68))              # 68 full blocks, 64 shared
    b = (100.0, 1200, 3, shared + keys(9, 64, 75))
    engine, rep, cache, metrics = engine_with_cache()
    engine.run([a, b])
    assert (cache.hit_blocks, cache.hit_tokens, cache.saved_tokens) == (64, 1024, 1024)
    assert metrics.requests_frame().num_cached_tokens.tolist() == [0, 1024]
    # b prefills only its 176 uncached tokens, attending over its whole 1200-token context
    assert rep.cost.prefills == [(1100, 1100), (176, 1200)]
    assert cache.evictions == 0 and cache.free == cache.capacity and set(cache.ref.values()) == {0}


def test_identical_prompts_hit_after_the_first_even_in_the_same_step():
    prompt = keys(3, 0, 12)                                   # 200 tokens: 12 full blocks
    engine, rep, _, metrics = engine_with_cache()
    engine.run([(0.0, 200, 2, prompt)] * 4 + [(50.0, 200, 2, prompt)])
    cached = metrics.requests_frame().num_cached_tokens.tolist()
    # all but the first reuse 12 blocks (192 tokens; at most prompt - 1 tokens are reused); the
    # three that arrive with the first reuse its blocks within the same step, as vLLM does
    assert cached == [0, 192, 192, 192, 192]
    assert rep.cost.prefills[:4] == [(200, 200), (8, 200), (8, 200), (8, 200)]


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_freed_tail_first():
    cache = PrefixCache(capacity=4, block_size=4, watermark=0.0)

    def run(rid, hashes, tokens):
        r = Request(rid, 0.0, tokens, 1, hashes)
        hit, _ = cache.lookup(r)
        new = -(-tokens // 4) - hit
        cache.admit(r, hit, new, tokens - hit * 4)
        return r, hit

    a, _ = run(1, ["a0", "a1"], 8)
    a.done = True
    cache.release(a)
    assert cache.free == 4 and cache.cached == 2 and cache.ref == {"a0": 0, "a1": 0}
    b, _ = run(2, ["b0", "b1"], 8)          # takes the two never-used blocks: nothing evicted
    assert cache.evictions == 0 and cache.cached == 4
    b.done = True
    cache.release(b)
    run(3, ["c0"], 4)                       # least recently freed: a's tail block a1 goes first
    assert cache.evictions == 1 and "a1" not in cache.ref and "a0" in cache.ref
    again = Request(4, 0.0, 9, 1, ["a0", "a1"])
    assert cache.lookup(again) == (1, 1)    # a0 is still there, and free
    _, hit = run(5, ["b0", "b1", "b2"], 12)  # b's blocks are reused (hit, 2) and leave the queue
    assert hit == 2 and cache.ref["b0"] == cache.ref["b1"] == 1
    assert cache.free == 4 - 1 - 2 - 1 == 0


def test_preemption_frees_blocks_into_the_cache_and_the_request_reuses_its_own():
    # 22 blocks of 4 tokens; two 32+20-token requests need 13 each at the end: one is preempted
    engine, _, cache, metrics = engine_with_cache(capacity=22, block_size=4)
    engine.run([(0.0, 32, 20), (0.0, 32, 20)])
    df = metrics.requests_frame()
    assert df.num_preemptions.tolist() == [0, 1]
    # its return skipped the blocks it had computed that were not evicted meanwhile
    assert 0 < cache.saved_tokens < 32 + 20
    assert cache.free == 22 and set(cache.ref.values()) == {0}
    assert (df.num_generated_tokens == 20).all()


def test_caching_changes_nothing_when_nothing_is_shared_or_preempted():
    cfg = sim.compose(["workload=splitwise_conv", "workload.num_requests=60", "scheduler=vllm_v1"])
    ot = load_op_times(to_hw(cfg.hw), to_model(cfg.model), 1)
    on = sim.simulate(cfg, op_times=ot)
    OmegaConf.update(cfg, "scheduler.prefix_caching", False)
    off = sim.simulate(cfg, op_times=ot)
    assert on.summary["num_preemptions"] == 0
    assert on.requests.equals(off.requests)
    assert on.summary["prefix_hit_rate"] == off.summary["prefix_hit_rate"] == 0.0


# --- real prompts: ShareGPT token ids ---------------------------------------------------------
def chained_hashes(token_ids, block_tokens=16):
    """One id per full block, chained as vLLM's block hashes (int64 from blake2b)."""
    out, prev = [], b""
    for i in range(len(token_ids) // block_tokens):
        block = token_ids[i * block_tokens:(i + 1) * block_tokens]
        prev = hashlib.blake2b(prev + json.dumps(block).encode(), digest_size=8).digest()
        out.append(int.from_bytes(prev, "little", signed=True))
    return out


def write_trace(path, rows, hash_block_tokens=16, hashes=None, meta=True):
    table = pa.table({
        "arrived_at_s": [100.0 * i for i in range(len(rows))],      # one at a time
        "num_prefill_tokens": pa.array([r["input_toks"] for r in rows], pa.int64()),
        "num_decode_tokens": pa.array([min(r["output_toks"], 50) for r in rows], pa.int64()),
        "prefix_hashes": pa.array(hashes if hashes is not None else
                                  [chained_hashes(r["input_tok_ids"], hash_block_tokens) for r in rows],
                                  pa.list_(pa.int64()))})
    if meta:
        table = table.replace_schema_metadata({"opcast": json.dumps({"hash_block_tokens": hash_block_tokens})})
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def sharegpt():
    return [json.loads(line) for line in (FIX / "sharegpt_llama_shared.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def op_times():
    cfg = sim.compose([])
    return load_op_times(to_hw(cfg.hw), to_model(cfg.model), 1)


def expected_cached_tokens(rows, block_size):
    """Per prompt: tokens of its longest prefix equal to an earlier prompt's, in whole blocks,
    capped at prompt - 1 tokens. What the trace can tell is equality of whole 16-token hash
    blocks, so a simulator block smaller than that is shared only within shared hash blocks."""
    unit = max(block_size, 16)
    seen, out = set(), []
    for r in rows:
        ids = r["input_tok_ids"]
        n = 0
        while (n + 1) * unit <= len(ids) and tuple(ids[:(n + 1) * unit]) in seen:
            n += 1
        out.append(min(n * unit // block_size, (len(ids) - 1) // block_size) * block_size)
        seen.update(tuple(ids[:m * unit]) for m in range(1, len(ids) // unit + 1))
    return out


@pytest.mark.parametrize("block_size", [16, 32, 8])
def test_sharegpt_prompts_reuse_exactly_their_shared_token_prefixes(sharegpt, op_times, tmp_path, block_size):
    trace = write_trace(tmp_path / "sharegpt.parquet", sharegpt)
    cfg = sim.compose(["workload=fidelity_trace", f"workload.trace={trace}",
                       f"workload.num_requests={len(sharegpt)}", f"scheduler.block_size={block_size}"])
    res = sim.simulate(cfg, op_times=op_times)
    want = expected_cached_tokens(sharegpt, block_size)
    assert res.requests.num_cached_tokens.tolist() == want
    assert sum(want) > 1500 and res.summary["prefill_tokens_saved"] == sum(want)
    total = sum(r["input_toks"] for r in sharegpt)
    assert res.summary["prefix_hit_rate"] == pytest.approx(sum(want) / total)


def test_trace_prefix_errors_name_the_row(sharegpt, tmp_path):
    rows = sharegpt[:4]
    good = [chained_hashes(r["input_tok_ids"]) for r in rows]

    def error(**kw):
        path = write_trace(tmp_path / "bad.parquet", rows, **kw)
        with pytest.raises(ConfigError) as exc:
            list(workloads.requests(sim.compose(["workload=fidelity_trace", f"workload.trace={path}",
                                                 "workload.num_requests=4"]).workload, 0, 4096))
        return str(exc.value)

    assert "row 2: prefix_hashes has a missing id (null) at block 1" in error(
        hashes=good[:2] + [[good[2][0], None] + good[2][2:]] + good[3:])
    assert "row 1: prefix_hashes is missing" in error(hashes=[good[0], None] + good[2:])
    assert "row 3: 1 prefix_hashes for a" in error(hashes=good[:3] + [good[3][:1]])
    assert "no hash_block_tokens" in error(meta=False)
    empty = [dict(rows[0], input_toks=0)] + rows[1:]
    path = write_trace(tmp_path / "empty.parquet", empty, hashes=[[]] + good[1:])
    with pytest.raises(ConfigError, match="row 0: empty prompt"):
        list(workloads.requests(sim.compose(["workload=fidelity_trace", f"workload.trace={path}",
                                             "workload.num_requests=4"]).workload, 0, 4096))


def test_trace_hash_blocks_map_onto_simulator_blocks():
    assert workloads.block_keys([1, 2, 3, 4, 5], 16, 16) == [1, 2, 3, 4, 5]
    assert workloads.block_keys([1, 2, 3, 4, 5], 16, 32) == [2, 4]      # the last id inside each
    assert workloads.block_keys([1, 2], 32, 16) == [2, 3, 4, 5]           # id * 2 + half
    with pytest.raises(ConfigError, match="one must divide the other"):
        workloads.block_keys([1], 16, 24)


# --- synthetic prefix workloads ----------------------------------------------------------------
def stream(*overrides, max_tokens=4096):
    wl = sim.compose(["workload=fixed", *overrides]).workload
    return list(workloads.requests(wl, 0, max_tokens, block_size=16))


def test_sessions_resend_the_conversation_and_reuse_it():
    first = stream("workload.prefix=sessions", "workload.num_requests=6", "workload.turns=3",
                   "workload.system_prompt_tokens=100", "workload.prefill_tokens=50",
                   "workload.decode_tokens=30", "workload.think_time_s=0")
    assert len(first) == 2                                   # two sessions of three turns
    _, prompt, answer, k1, session = first[0]
    assert (prompt, answer) == (150, 30) and k1[:6] == keys(1, 0, 6)   # the system prompt's blocks
    _, prompt2, _, k2, _ = session.next_turn(5.0)
    assert prompt2 == 150 + 30 + 50 and k2[:len(k1)] == k1  # its history, answer included
    assert session.next_turn(9.0)[0] == 9.0 and session.next_turn(12.0) is None
    assert first[1][3][:6] == k1[:6] and first[1][3][6:] != k1[6:]    # only the system prompt shared


def test_session_longer_than_the_context_names_the_session_and_the_excess():
    with pytest.raises(ConfigError, match=r"session 0: its 5 turns reach 5100 tokens .* 1004 more than "
                                          r"the 4096-token context"):
        stream("workload.prefix=sessions", "workload.turns=5", "workload.system_prompt_tokens=100",
               "workload.prefill_tokens=500", "workload.decode_tokens=500")


def test_shared_system_prompts_and_tree_prefixes():
    shared = stream("workload.prefix=shared", "workload.num_requests=40", "workload.system_prompt_tokens=64",
                    "workload.num_system_prompts=2")
    assert {tuple(k) for *_, k in shared} == {tuple(keys(1, 0, 4)), tuple(keys(2, 0, 4))}
    assert all(p == 64 + 512 for _, p, _, _ in shared)
    tree = stream("workload.prefix=tree", "workload.num_requests=200", "workload.system_prompt_tokens=32",
                  "workload.tree_depth=2", "workload.tree_branching=2", "workload.tree_segment_tokens=64")
    paths = {tuple(k) for *_, k in tree}
    assert len(paths) == 4 and all(len(k) == (32 + 2 * 64) // 16 for k in paths)
    firsts = {k[2:6] for k in paths}                         # level-1 blocks: two nodes
    assert len(firsts) == 2 and all(k[:2] == tuple(keys(1, 0, 2)) for k in paths)


# --- routing, metrics, search ------------------------------------------------------------------
class FakeReplica:
    def __init__(self, hit, outstanding):
        self.outstanding = outstanding
        self.blocks = type("B", (), {"caching": True, "lookup": lambda _, req: (hit, 0)})()


def test_prefix_affinity_prefers_the_longest_cached_prefix_within_the_load_limit():
    state = RouterState(None, RouterConf(name="prefix_affinity", max_imbalance=4))
    reps = [FakeReplica(0, 0), FakeReplica(5, 3), FakeReplica(9, 9)]
    assert route_prefix_affinity(reps, None, state) is reps[1]     # reps[2] is 9 above the least
    state.conf.max_imbalance = 10
    assert route_prefix_affinity(reps, None, state) is reps[2]
    assert route_prefix_affinity([FakeReplica(0, 2), FakeReplica(0, 1)], None, state).outstanding == 1


def test_prefix_affinity_keeps_sessions_on_their_cache(op_times):
    base = ["workload=fixed", "workload.prefix=sessions", "workload.num_requests=120", "workload.turns=6",
            "workload.system_prompt_tokens=256", "workload.prefill_tokens=128", "workload.decode_tokens=64",
            "workload.think_time_s=1", "workload.qps=2", "parallel.replicas=3"]
    rr = sim.simulate(sim.compose(base + ["router=round_robin"]), op_times=op_times).summary
    pa_ = sim.simulate(sim.compose(base + ["router=prefix_affinity"]), op_times=op_times)
    # round robin still reuses the system prompt everywhere, but a turn's history only on the
    # replica that served the previous turn
    assert pa_.summary["prefix_hit_rate"] > rr["prefix_hit_rate"] + 0.15
    assert pa_.summary["ttft_s_mean"] < rr["ttft_s_mean"]
    assert [r["num_requests"] for r in pa_.replicas] and sum(r["num_requests"] for r in pa_.replicas) == 120
    assert sum(r["prefill_tokens_saved"] for r in pa_.replicas) == pa_.summary["prefill_tokens_saved"]
    with pytest.raises(ConfigError, match="prefix_affinity .* needs scheduler.prefix_caching=true"):
        sim.simulate(sim.compose(base + ["router=prefix_affinity", "scheduler.prefix_caching=false"]))


def test_caching_one_override_and_sessions_are_deterministic(op_times):
    base = ["workload=fixed", "workload.prefix=sessions", "workload.num_requests=40", "workload.turns=4",
            "workload.prefill_tokens=200", "workload.qps=4", "workload.think_time_s=0.5"]
    on = sim.simulate(sim.compose(base), op_times=op_times)
    again = sim.simulate(sim.compose(base), op_times=op_times)
    off = sim.simulate(sim.compose(base + ["scheduler.prefix_caching=false"]), op_times=op_times)
    assert on.requests.equals(again.requests)
    assert on.summary["prefix_hit_rate"] > 0.5 and off.summary["prefix_hit_rate"] == 0.0
    assert on.summary["prefill_tokens_saved"] > 0 and on.summary["ttft_s_mean"] < off.summary["ttft_s_mean"]


def test_search_compares_routers_and_caching(tmp_path):
    from sim import search
    from sim.search.space import enumerate_space
    cfg = search.compose(["model=llama2-7b", "search.hw=[a100]", "search.tp=[1]", "search.pp=[1]",
                          "search.gpu_budget=2", "search.schedulers=[vllm_v1]",
                          "search.routers=[round_robin,prefix_affinity]", "search.prefix_caching=[true,false]",
                          f"search.out_dir={tmp_path}"])
    runnable, skipped = enumerate_space(cfg)
    labels = sorted(c.label for c, _ in runnable)
    assert labels == ["a100 tp1 pp1 x2 vllm_v1 prefix_affinity prefix-cache",
                      "a100 tp1 pp1 x2 vllm_v1 round_robin no-prefix-cache",
                      "a100 tp1 pp1 x2 vllm_v1 round_robin prefix-cache"]
    assert [s.reason for s in skipped] == ["router prefix_affinity needs prefix caching"]
    for cand, sim_cfg in runnable:
        assert sim_cfg.router.name == cand.router
        assert sim_cfg.scheduler.prefix_caching == cand.prefix_caching


def test_search_ranks_caching_and_routing_on_a_multi_turn_workload(tmp_path):
    from sim import search
    cfg = search.compose(["model=llama2-7b", "workload=multi_turn", "workload.think_time_s=1",
                          "search.hw=[a100]", "search.tp=[1]", "search.pp=[1]", "search.gpu_budget=2",
                          "search.schedulers=[vllm_v1]", "search.routers=[round_robin,prefix_affinity]",
                          "search.prefix_caching=[true,false]", "search.seeds=[0]", "search.num_requests=60",
                          "search.rel_tol=0.2", "search.executor=serial", "search.progress=false",
                          "search.prune_fraction=0", "slo.ttft_p90_s=0.05", f"search.out_dir={tmp_path}"])
    ranked = search.run_search(cfg).ranked.set_index("config")
    on = ranked.loc["a100 tp1 pp1 x2 vllm_v1 prefix_affinity prefix-cache"]
    off = ranked.loc["a100 tp1 pp1 x2 vllm_v1 round_robin no-prefix-cache"]
    assert on.prefix_hit_rate_at_capacity > 0.5 and off.prefix_hit_rate_at_capacity == 0
    assert on.capacity_qps_mean > off.capacity_qps_mean     # shorter prefills: more sessions/s in the SLO
    assert ranked.loc["a100 tp1 pp1 x2 vllm_v1 prefix_affinity no-prefix-cache"].status == "skipped"


def test_a_trace_imported_with_token_ids_shares_its_real_prefixes(sharegpt, op_times, tmp_path):
    """The trace importer's prefix_hashes (profiler.import_traces, llmservingsim format) drive
    the cache: with the requests spaced out, each reuses exactly its shared token prefix."""
    from profiler.import_traces import import_trace
    path = import_trace(FIX / "sharegpt_llama_shared.jsonl", "sg", tmp_path, fmt="llmservingsim")
    cfg = sim.compose(["workload=fidelity_trace", f"workload.trace={path}", "workload.num_requests=26",
                       "workload.trace_time_scale=1000"])      # seconds apart: nothing overlaps
    res = sim.simulate(cfg, op_times=op_times)
    assert res.requests.num_cached_tokens.tolist() == expected_cached_tokens(sharegpt, 16)
