"""Speculative decoding (sim/spec.py): hand-computed steps and costs on the engine with a stub
cost, the acceptance draws against their profile, the real pricing end to end, memory, metrics,
the search dimension and the one-line errors for what opcast does not model."""
import math

import pytest

import sim
from conf import ConfigError, to_hw, to_model
from estimator.runtime import load_op_times
from sim import spec
from sim.config import SchedulerConf, SpecConf
from sim.core import engine_profile, plan_for
from sim.costs import BatchCost
from sim.engine import Engine, Replica
from sim.metrics import Metrics
from sim.schedulers import SCHEDULERS
from sim.schedulers.common import Blocks


class StubCost:
    """Hand-checkable times: a forward of n tokens 1000 + 10 n µs (a decode-only batch of b
    sequences the same, 1000 + 10 b), a head pass over n tokens 100 + n µs."""

    def stage_us(self, num_tokens, prefills, num_decodes, kv_sum, sampled):
        return [1000.0 + 10 * num_tokens]

    def decode_us(self, num_decodes, kv_sum):
        return 1000.0 + 10 * num_decodes

    def head_us(self, num_tokens, prefills, num_decodes, kv_sum, sampled):
        return 100.0 + num_tokens

    def head_decode_us(self, num_decodes, kv_sum):
        return 100.0 + num_decodes


def run_stub(requests, acceptance=None, k=3, block_size=16, capacity=10_000, fast_forward=True, audit=None,
             propose_rate=-1.0):
    """Engine with one vllm_v1 replica on StubCost; acceptance None = no speculative decoding."""
    on = acceptance is not None
    sc = SchedulerConf(name="vllm_v1", block_size=block_size, watermark=0.0,
                       spec=SpecConf(method="eagle", num_tokens=k, acceptance=list(acceptance),
                                     propose_rate=propose_rate) if on else SpecConf())
    blocks = Blocks(capacity, block_size, 0.0)
    rep = Replica(0, SCHEDULERS["vllm_v1"](sc), blocks, StubCost(), pp=1)
    if on:
        spec.attach(rep, sc, seed=0)
    metrics = Metrics(True)
    engine = Engine([rep], "round_robin", 0, metrics, fast_forward)
    if audit:
        finish = engine.finish

        def audited(*args):
            finish(*args)
            audit(rep)
        engine.finish = audited
    end = engine.run(requests)
    return metrics, rep, end


# --- hand-computed steps ------------------------------------------------------------------
def test_acceptance_one_with_k3_cuts_decode_steps_4x_and_emits_exactly_the_output():
    # prompt 100, output 129: the prefill step samples token 1, then 128 more tokens
    base, _, _ = run_stub([(0.0, 100, 129)])
    full, rep, end = run_stub([(0.0, 100, 129)], acceptance=[1, 1, 1])
    assert base.iterations == 1 + 128 and full.iterations == 1 + 32          # 128 / (1 + 3) = 32
    assert full.requests_frame().num_generated_tokens.tolist() == [129]
    # prefill step: forward 1000 + 10 x 100, head over the 100 tokens (200) and 2 one-token passes (2 x 101);
    # each decode step: a 4-token verify (1040) + head over those 4 tokens (104) + 2 x 101
    assert end == pytest.approx((2000 + 200 + 202 + 32 * (1040 + 104 + 202)) * 1e-6, abs=1e-12)
    assert (rep.spec.num_drafts, rep.spec.accepted, rep.spec.accepted_per_pos) == (32, 96, [32, 32, 32])
    # an output that is not 1 + 4 m: the last step keeps only the one token still needed
    odd, rep, _ = run_stub([(0.0, 100, 130)], acceptance=[1, 1, 1])
    assert odd.iterations == 1 + 33 and odd.requests_frame().num_generated_tokens.tolist() == [130]
    assert rep.spec.accepted == 99          # vLLM counts what the sampler accepted, not what was kept


def test_acceptance_zero_keeps_the_output_and_adds_the_proposer_and_verify_cost():
    base, _, base_end = run_stub([(0.0, 100, 129)])
    zero, rep, end = run_stub([(0.0, 100, 129)], acceptance=[0, 0, 0])
    assert zero.iterations == base.iterations == 129
    assert zero.requests_frame().num_generated_tokens.tolist() == [129]
    # per decode step: verify 1040 instead of 1010 (+30) and the proposer 104 + 202 (+306);
    # the prefill step adds the proposer's pass over the prompt and its 2 one-token passes (+402)
    assert end - base_end == pytest.approx((402 + 128 * (30 + 306)) * 1e-6, abs=1e-12)
    assert (rep.spec.num_drafts, rep.spec.draft_tokens, rep.spec.accepted) == (128, 384, 0)


def test_rejected_drafts_give_their_blocks_back_and_the_books_balance():
    def audit(rep):
        b = rep.blocks
        assert sum(r.blocks for r in rep.running) + b.free == b.capacity
        for r in rep.running:          # after a step: blocks for the kept KV only
            assert r.blocks == -(-r.kv // b.block_size)
    metrics, rep, _ = run_stub([(0.0, 8, 40), (0.001, 30, 25), (0.002, 5, 60)], acceptance=[0.6, 0.3, 0.1],
                               block_size=2, audit=audit)
    assert sorted(metrics.requests_frame().num_generated_tokens) == [25, 40, 60]
    assert rep.blocks.free == rep.blocks.capacity and 0 < rep.spec.accepted < rep.spec.draft_tokens


def test_draws_reproduce_the_profile_and_the_seed_fixes_them():
    reqs = [(0.01 * i, 64, 400) for i in range(60)]
    _, rep, _ = run_stub(reqs, acceptance=[0.7296, 0.5208, 0.3545])
    d = rep.spec
    rates = [c / d.num_drafts for c in d.accepted_per_pos]
    assert d.num_drafts > 5000
    assert rates == pytest.approx([0.7296, 0.5208, 0.3545], abs=0.02)
    again = run_stub(reqs, acceptance=[0.7296, 0.5208, 0.3545])[1].spec
    assert (again.num_drafts, again.accepted_per_pos) == (d.num_drafts, d.accepted_per_pos)


# --- the real pricing, end to end ------------------------------------------------------------
ONE = ["hw=a100", "model=llama2-7b", "scheduler=vllm_v1", "workload=fixed", "workload.num_requests=1",
       "workload.prefill_tokens=200", "workload.decode_tokens=129", "seed=0", "sim.fast_forward=true"]


@pytest.fixture(scope="module")
def op_times():
    cfg = sim.compose(ONE)
    return load_op_times(to_hw(cfg.hw), to_model(cfg.model), 1)


def test_real_costs_acceptance_one_quarter_steps_and_zero_adds_verify_and_proposer(op_times):
    base = sim.simulate(sim.compose(ONE), op_times=op_times)
    full = sim.simulate(sim.compose(ONE + ["scheduler.spec.method=eagle", "scheduler.spec.acceptance=[1,1,1]"]),
                        op_times=op_times)
    zero_cfg = sim.compose(ONE + ["scheduler.spec.method=eagle", "scheduler.spec.acceptance=[0,0,0]"])
    zero = sim.simulate(zero_cfg, op_times=op_times)
    assert base.summary["num_iterations"] == 129 and full.summary["num_iterations"] == 33
    for r in (base, full, zero):
        assert r.requests.num_generated_tokens.tolist() == [129]
    assert full.summary["spec_acceptance_length_mean"] == 4.0
    assert zero.summary["num_iterations"] == 129 and zero.summary["spec_acceptance_length_mean"] == 1.0
    # acceptance 0 costs, per decode step, a 4-token verify instead of a decode and three head
    # passes (the first over the verified tokens); the prefill step adds the head's passes
    engine = engine_profile(zero_cfg)
    cost = BatchCost(op_times, to_model(zero_cfg.model), 1, engine=engine, interconnect="nvswitch")
    extra = cost.head_us(200, [(200, 200)], 0, 0, 1) + cost.head_decode_us(1, 201) + cost.head_decode_us(1, 202)
    for s in range(128):                 # decode step s: context 200 + s tokens before it
        kv = 200 + s
        extra += (cost.stage_us(4, [(4, kv + 4)], 0, 0, 4)[0] - cost.decode_us(1, kv + 1)
                  + cost.head_us(4, [(4, kv + 4)], 0, 0, 1)
                  + sum(cost.head_decode_us(1, kv + 4 + j) for j in (1, 2)))
    delta = zero.summary["e2e_s_mean"] - base.summary["e2e_s_mean"]
    assert delta == pytest.approx(extra * 1e-6, rel=1e-9)
    assert delta > 0 and full.summary["e2e_s_mean"] < base.summary["e2e_s_mean"]


def test_metrics_keep_vllm_definitions(op_times):
    cfg = sim.compose(ONE + ["workload.num_requests=40", "workload.qps=5", "scheduler.spec.method=eagle"])
    res = sim.simulate(cfg, op_times=op_times)
    s, df = res.summary, res.requests
    assert (df.num_generated_tokens == 129).all()
    # TPOT per output token; ITL per step (one gap per request and step): ITL > TPOT when steps emit > 1
    assert df.tpot_s.tolist() == pytest.approx(((df.completed_at_s - df.first_token_s) / 128).tolist())
    assert s["itl_s_mean"] > 1.5 * s["tpot_s_mean"]
    assert s["spec_acceptance_length_mean"] == pytest.approx(1 + s["spec_num_accepted_tokens"] / s["spec_num_drafts"])
    assert s["spec_acceptance_length_mean"] == pytest.approx(1 + sum(s[f"spec_acceptance_rate_pos{i}"]
                                                                     for i in range(3)))
    assert [s[f"spec_acceptance_rate_pos{i}"] for i in range(3)] == pytest.approx([0.7296, 0.5208, 0.3545], abs=0.03)
    assert "spec_num_drafts" not in sim.simulate(sim.compose(ONE), op_times=op_times).summary


def test_steps_without_a_draft_decode_one_token():
    # propose_rate 0.5: about half the steps carry 3 drafts (all accepted: 4 tokens), the others 1 token
    metrics, rep, _ = run_stub([(0.0, 100, 129)], acceptance=[1, 1, 1], propose_rate=0.5)
    drafts, plain = rep.spec.num_drafts, metrics.iterations - 1 - rep.spec.num_drafts
    assert 4 * drafts + plain >= 128 > 4 * (drafts - 1) + plain and drafts > 10 and plain > 10
    assert metrics.requests_frame().num_generated_tokens.tolist() == [129]


def test_ngram_uses_its_measured_profile_and_cpu_time(op_times):
    cfg = sim.compose(ONE + ["workload.num_requests=20", "workload.qps=5", "scheduler.spec.method=ngram",
                             "scheduler.spec.num_tokens=5"])
    s = sim.simulate(cfg, op_times=op_times).summary
    assert s["spec_num_draft_tokens"] == 5 * s["spec_num_drafts"]
    assert s["spec_acceptance_length_mean"] == pytest.approx(1 + sum(spec.DEFAULTS["ngram"][0]), abs=0.15)
    # 1.06 ns per context token scanned (vLLM PR #56732): 0.2 µs for a 200-token context
    assert spec.NGRAM_NS_PER_TOKEN == pytest.approx(1.06, abs=0.01)


def test_draft_model_is_priced_from_its_own_tables_and_takes_memory(op_times):
    on = ["scheduler.spec.method=draft", "scheduler.spec.draft_model=tiny-llama", "scheduler.spec.acceptance=[0.8,0.5,0.3]"]
    base_plan, plan = plan_for(sim.compose(ONE)), plan_for(sim.compose(ONE + on))
    tiny = to_model(sim.compose(["model=tiny-llama"]).model)
    from conf import shapes
    assert plan.weight_bytes - base_plan.weight_bytes == shapes.weight_bytes_per_gpu(tiny, 1)
    assert plan.kv_bytes_per_block - base_plan.kv_bytes_per_block == shapes.kv_bytes_per_token(tiny, 1) * 16
    assert plan.num_blocks < base_plan.num_blocks
    res = sim.simulate(sim.compose(ONE + on), op_times=op_times)
    assert res.requests.num_generated_tokens.tolist() == [129] and res.summary["num_iterations"] < 129
    # an EAGLE head: one target layer and its KV (1 of llama2-7b's 32 layers)
    eagle = plan_for(sim.compose(ONE + ["scheduler.spec.method=eagle"]))
    assert eagle.kv_bytes_per_block == base_plan.kv_bytes_per_block * 33 // 32


# --- what opcast does not model: one line each ------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["scheduler=orca", "scheduler.spec.method=eagle"], r"speculative decoding for scheduler=vllm_v1 .* not scheduler=orca"),
    (["scheduler.spec.method=eagle", "parallel.pp=2"], "pipeline parallelism"),
    (["scheduler.spec.method=eagle", "scheduler.spec.num_tokens=5"], r"eagle default acceptance .* 3 position"),
    (["scheduler.spec.method=mtp", "scheduler.spec.num_tokens=2"], r"mtp default acceptance .* 1 position"),
    (["scheduler.spec.method=draft", "scheduler.spec.draft_model=tiny-llama"], "no published acceptance profile"),
    (["scheduler.spec.method=draft", "scheduler.spec.acceptance=[0.5,0.4,0.3]"], "needs scheduler.spec.draft_model"),
    (["scheduler.spec.method=draft", "scheduler.spec.draft_model=llama3-8b", "scheduler.spec.acceptance=[0.5,0.4,0.3]"],
     "must share the target's vocabulary"),
    (["scheduler.spec.method=eagle", "scheduler.spec.acceptance=[0.5,0.6,0.3]"], "non-increasing"),
    (["scheduler.spec.method=eagle", "scheduler.spec.acceptance=[0.5]"], "at least 3 rates"),
    (["scheduler.spec.method=medusa"], "choose one of"),
    (["scheduler.spec.draft_model=tiny-llama"], "used by method=draft only"),
    (["scheduler.spec.acceptance=[0.5]"], "method=none"),
    (["scheduler.spec.method=eagle", "scheduler.spec.num_tokens=0"], "must be >= 1"),
])
def test_settings_opcast_does_not_model_fail_in_one_line(overrides, message, op_times):
    with pytest.raises(ConfigError, match=message) as exc:
        sim.simulate(sim.compose(ONE + overrides), op_times=op_times)
    assert "\n" not in str(exc.value)


def test_search_dimension_turns_spec_on_and_off_and_skips_what_cannot_run():
    from sim.search.exec import check_fits
    from sim.search.run import compose
    from sim.search.space import enumerate_space
    cfg = compose(["model=llama2-7b", "search.hw=[a100]", "search.tp=[1]", "search.pp=[1]", "search.gpu_budget=1",
                   "search.schedulers=[vllm_v1,orca]", "search.knobs.orca={max_num_seqs:[128]}",
                   "search.spec_num_tokens=[0,2,3]",
                   "scheduler.spec.method=eagle"])
    runnable, skipped = enumerate_space(cfg, fits=check_fits)
    labels = {c.label: s for c, s in runnable}
    assert sorted(labels) == ["a100 tp1 pp1 x1 orca max_num_seqs=128 no-spec", "a100 tp1 pp1 x1 vllm_v1 no-spec",
                              "a100 tp1 pp1 x1 vllm_v1 spec-k2", "a100 tp1 pp1 x1 vllm_v1 spec-k3"]
    assert labels["a100 tp1 pp1 x1 vllm_v1 spec-k2"].scheduler.spec.num_tokens == 2
    assert labels["a100 tp1 pp1 x1 vllm_v1 no-spec"].scheduler.spec.method == "none"
    assert [(s.candidate.label, "not scheduler=orca" in s.reason) for s in skipped] == \
        [("a100 tp1 pp1 x1 orca max_num_seqs=128 spec-k2", True), ("a100 tp1 pp1 x1 orca max_num_seqs=128 spec-k3", True)]
    assert runnable[0][0].columns()["spec_num_tokens"] in (0, 2, 3)
    with pytest.raises(ConfigError, match="set scheduler.spec.method"):
        enumerate_space(compose(["model=llama2-7b", "search.hw=[a100]", "search.tp=[1]", "search.pp=[1]",
                                 "search.gpu_budget=1", "search.schedulers=[vllm_v1]", "search.knobs={}",
                                 "search.spec_num_tokens=[2]"]), fits=check_fits)


def test_profiles_cite_their_measurements():
    for rates, rate, source in spec.DEFAULTS.values():
        assert source and 0 < rate <= 1 and list(rates) == sorted(rates, reverse=True)
    assert spec.profile(SpecConf(method="eagle", num_tokens=2)) == ([0.7296, 0.5208], 1.0)
    assert spec.profile(SpecConf(method="ngram", num_tokens=2))[1] == pytest.approx(993 / 1814)
    assert math.isclose(1 + sum(spec.DEFAULTS["eagle"][0]), 2.6049)          # vLLM CI: AL 2.60


def test_the_memoised_one_token_head_pass_matches_the_head(op_times):
    cfg = sim.compose(ONE)
    cost = BatchCost(op_times, to_model(cfg.model), 1, engine=engine_profile(cfg), interconnect="nvswitch")
    for n, mean_kv in [(1, 200), (8, 1000), (32, 4096), (64, 777)]:
        assert cost.head_decode_us(n, n * mean_kv) == pytest.approx(cost.head_us(n, [], n, n * mean_kv, n), rel=0.01)
    assert cost.head_decode_us(8, 8 * 1024) == pytest.approx(cost.head_us(8, [], 8, 8 * 1024, 8), rel=1e-12)
