"""KV offload to CPU memory (sim/offload.py): a working set twice the GPU cache recomputes less
by the hand-computed amount, PCIe time with and without per-layer overlap, swap preemption,
the books of both tiers, end-to-end metrics and the one-line errors."""
import pytest

import sim
from conf import ConfigError, to_hw, to_model
from estimator.runtime import load_op_times
from sim.config import OffloadConf, SchedulerConf
from sim.engine import Engine, Replica
from sim.metrics import Metrics
from sim.offload import OffloadCache
from sim.prefix_cache import PrefixCache
from sim.schedulers import SCHEDULERS

BLOCK_BYTES = 1_600_000          # one block on one GPU: 20 of them cross a 32 GB/s link in 1000 µs


class StubCost:
    """A forward of n tokens takes 1000 + 10 n µs; records the prefill chunks (tokens, KV)."""

    def __init__(self):
        self.prefills = []

    def stage_us(self, num_tokens, prefills, num_decodes, kv_sum, sampled):
        self.prefills += prefills
        return [1000.0 + 10 * num_tokens]

    def decode_us(self, num_decodes, kv_sum):
        return 1000.0 + 10 * num_decodes


def engine(capacity, cpu_blocks=0, overlap=False, swap=False, block_size=16):
    sc = SchedulerConf(name="vllm_v1", block_size=block_size, watermark=0.0, prefix_caching=True,
                       offload=OffloadConf(cpu_gib=1.0 if cpu_blocks else 0.0, overlap=overlap,
                                           preempt="swap" if swap else "recompute"))
    cache = (OffloadCache(capacity, block_size, 0.0, cpu_blocks, block_bytes=BLOCK_BYTES, replica_block_bytes=BLOCK_BYTES,
                          pcie_bw_gbps=32, layers=[32], overlap=overlap, swap=swap)
             if cpu_blocks else PrefixCache(capacity, block_size, 0.0))
    rep = Replica(0, SCHEDULERS["vllm_v1"](sc), cache, StubCost(), pp=1)
    metrics = Metrics(True)
    return Engine([rep], "round_robin", 0, metrics, True), rep, cache, metrics


def cyclic(prompts=10, cycles=2):
    """Requests one at a time through `prompts` distinct 328-token prompts (20 full shared
    blocks of 16 tokens + 8 own tokens), 4 output tokens, `cycles` times round."""
    return [(1.0 * i, 328, 4, [(i % prompts) << 24 | b for b in range(20)]) for i in range(prompts * cycles)]


def test_working_set_twice_the_gpu_cache_recomputes_less_by_the_hand_computed_amount():
    # 10 prompts x 20 shared blocks = 200 blocks, twice the 100-block GPU cache. Cached LRU,
    # the second cycle finds nothing on the GPU (each prompt was evicted before it came back):
    # all 20 x 328 prompt tokens are computed.
    eng, rep, gpu_only, _ = engine(100)
    eng.run(cyclic())
    computed_without = sum(q for q, _ in rep.cost.prefills)
    assert computed_without == 20 * 328 and gpu_only.saved_tokens == 0
    # With a 200-block CPU tier every evicted block survives there: in the second cycle each
    # request loads its 20 blocks back and computes only its own 8 tokens.
    eng, rep, tiered, metrics = engine(100, cpu_blocks=200)
    eng.run(cyclic())
    computed_with = sum(q for q, _ in rep.cost.prefills)
    assert computed_with == 10 * 328 + 10 * 8
    assert computed_without - computed_with == 10 * 20 * 16 == 3200          # recomputed less
    assert tiered.loaded_blocks == 200 and tiered.saved_tokens == 3200 and tiered.cpu_evictions == 0
    assert metrics.requests_frame().num_cached_tokens.tolist() == [0] * 10 + [320] * 10
    # the GPU tier's own hit rate counts no hit (vLLM's prefix cache hit rate); the CPU tier all
    assert (tiered.hit_tokens, tiered.cpu_first_hit_tokens) == (0, 3200)
    # GPU + CPU tiers of 150 blocks under a 200-block cycle: LRU keeps the wrong blocks, as
    # the GPU alone did - nothing comes back and everything is computed again
    eng, rep, small, _ = engine(100, cpu_blocks=50)
    eng.run(cyclic())
    assert small.loaded_blocks == 0 and small.cpu_evictions > 0
    assert sum(q for q, _ in rep.cost.prefills) == computed_without


@pytest.mark.parametrize("overlap, copy_us", [(False, 2080.0), (True, (1080 + 1000) / 32 + 31 / 32 * 1080)])
def test_loads_cost_pcie_time_before_or_beside_the_forward(overlap, copy_us):
    eng, _, cache, metrics = engine(100, cpu_blocks=200, overlap=overlap)
    eng.run(cyclic())
    df = metrics.requests_frame()
    # a second-cycle prefill step: forward of 8 tokens (1080 µs) and 20 blocks over PCIe (1000 µs)
    assert df.ttft_s[10:].tolist() == pytest.approx([copy_us * 1e-6] * 10, rel=1e-12)
    assert df.ttft_s[:10].tolist() == pytest.approx([(1000 + 3280) * 1e-6] * 10, rel=1e-12)
    assert cache.transfer_us == pytest.approx(10 * 1000.0)


def test_swap_preemption_keeps_the_kv_and_recomputes_nothing():
    # two 150-token prompts with 100-token outputs need 2 x 16 blocks; the GPU has 20
    reqs = [(0.0, 150, 100, None), (0.0, 150, 100, None)]
    eng, rep, _, metrics = engine(20)
    eng.run(reqs)
    recomputed = sum(q for q, _ in rep.cost.prefills)
    assert metrics.num_preemptions >= 1 and recomputed > 300
    eng, rep, cache, metrics = engine(20, cpu_blocks=40, swap=True)
    eng.run(reqs)
    df = metrics.requests_frame()
    assert metrics.num_preemptions >= 1 and cache.swap_outs == metrics.num_preemptions
    assert sum(q for q, _ in rep.cost.prefills) == 300                        # no prompt computed twice
    assert df.num_generated_tokens.tolist() == [100, 100]
    assert cache.swap_in_blocks == cache.stored_blocks > 0 and cache.swapped_blocks == 0
    assert cache.transfer_us > 0 and cache.free == cache.capacity


# --- end to end -------------------------------------------------------------------------------
BASE = ["hw=a100", "model=llama2-7b", "scheduler=vllm_v1", "workload=shared_prompt", "workload.num_requests=120",
        "workload.num_system_prompts=10", "workload.qps=4", "sim.num_gpu_blocks_override=640", "seed=0"]


@pytest.fixture(scope="module")
def op_times():
    cfg = sim.compose(BASE)
    return load_op_times(to_hw(cfg.hw), to_model(cfg.model), 1)


def test_offload_reuses_evicted_prefixes_end_to_end(op_times):
    off = sim.simulate(sim.compose(BASE), op_times=op_times).summary
    on = sim.simulate(sim.compose(BASE + ["scheduler.offload.cpu_gib=64"]), op_times=op_times).summary
    assert off["kv_evictions"] > 0 and "offload_bytes_to_gpu" not in off
    assert on["prefill_tokens_saved"] > off["prefill_tokens_saved"] and on["ttft_s_mean"] < off["ttft_s_mean"]
    assert on["prefix_hit_rate_cpu"] > 0 and on["prefill_tokens_loaded"] > 0
    # bytes moved: every loaded token's KV (32 layers x 2 x 4096 x 2 bytes = 512 KiB per token)
    assert on["offload_bytes_to_gpu"] == on["prefill_tokens_loaded"] * 512 * 1024
    assert on["offload_bytes_to_cpu"] > 0 and on["offload_transfer_s"] > 0
    swap = sim.simulate(sim.compose(BASE + ["scheduler.offload.cpu_gib=64", "scheduler.offload.preempt=swap",
                                            "sim.num_gpu_blocks_override=300", "workload.qps=20"]),
                        op_times=op_times)
    assert swap.summary["offload_swap_outs"] > 0
    assert (swap.requests.num_generated_tokens == swap.requests.num_decode_tokens).all()


@pytest.mark.parametrize("overrides, message", [
    (["scheduler.offload.cpu_gib=8", "scheduler.prefix_caching=false"], "needs scheduler.prefix_caching=true"),
    (["scheduler=sarathi", "scheduler.prefix_caching=true", "scheduler.offload.cpu_gib=8"],
     r"KV offload for scheduler=vllm_v1 .* not scheduler=sarathi"),
    (["hw=cpu", "model=tiny-llama", "scheduler.offload.cpu_gib=8"], "no host link"),
    (["scheduler.offload.preempt=swap"], "needs scheduler.offload.cpu_gib > 0"),
    (["scheduler.offload.preempt=drop", "scheduler.offload.cpu_gib=8"], "choose one of"),
    (["scheduler.offload.cpu_gib=-1"], "must be >= 0"),
    (["scheduler.offload.cpu_gib=0.0001"], "holds no KV block"),
])
def test_offload_settings_opcast_does_not_model_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as exc:
        sim.simulate(sim.compose(BASE + ["workload.num_requests=2"] + overrides))
    assert "\n" not in str(exc.value)


def test_search_dimension_sizes_the_cpu_pool():
    from sim.search.exec import check_fits
    from sim.search.run import compose
    from sim.search.space import enumerate_space
    cfg = compose(["model=llama2-7b", "search.hw=[a100]", "search.tp=[1]", "search.pp=[1]", "search.gpu_budget=1",
                   "search.schedulers=[vllm_v1]", "search.offload_cpu_gib=[0,128]", "search.prefix_caching=[true,false]"])
    runnable, skipped = enumerate_space(cfg, fits=check_fits)
    assert sorted(c.label for c, _ in runnable) == [
        "a100 tp1 pp1 x1 vllm_v1 no-prefix-cache no-offload", "a100 tp1 pp1 x1 vllm_v1 prefix-cache no-offload",
        "a100 tp1 pp1 x1 vllm_v1 prefix-cache offload-128GiB"]
    assert [s.candidate.label for s in skipped] == ["a100 tp1 pp1 x1 vllm_v1 no-prefix-cache offload-128GiB"]
    assert "needs scheduler.prefix_caching=true" in skipped[0].reason
    on = next(s for c, s in runnable if c.offload_gib)
    assert on.scheduler.offload.cpu_gib == 128
