"""How the simulator prices what vLLM runs (sim/costs.py, engine profiles, conf/shapes.py
collective counts, estimator.runtime's pricing of unmeasured ops): each term against a
hand-computed answer on a stand-in OpTimes whose times are simple numbers."""
import numpy as np
import pytest

import sim
from conf import ConfigError, shapes
from conf.schema import HwConf, ModelConf
from estimator import roofline
from estimator.runtime import OpTimes
from sim.config import EngineConf
from sim.costs import BatchCost

# hidden 4096 bf16: 8192 bytes per token; 2 layers keep the arithmetic short
MODEL = ModelConf(name="toy", hidden_size=4096, num_layers=2, num_heads=32, num_kv_heads=8, head_dim=128,
                  ffn_size=14336, vocab_size=32000, dtype="bfloat16")


class FakeOps:
    """Per-layer token ops 100 + n µs, all-reduce: NCCL 30 + n, custom 5 + n/100; attention:
    decode 10 + batch * kv / 100, prefill 20 + sum(q) / 10; embedding 2, final norm 3,
    LM head (+gather + sampler) 50 + sequences, send/recv 7."""
    tp = 4

    def __init__(self):
        self.calls = []

    def layer_token_ops_us(self, n):
        self.calls.append(("token_ops", n))
        return 100.0 + n

    def allreduce_us(self, n, custom=False):
        self.calls.append(("allreduce", n, custom))
        return 5.0 + n / 100 if custom else 30.0 + n

    def decode_attention_us(self, batch, mean_kv):
        return 10.0 + batch * mean_kv / 100

    def layer_attention_us(self, prefill_q, prefill_kv, decode_kv):
        t = 20.0 + sum(prefill_q) / 10 if prefill_q else 0.0
        return t + (self.decode_attention_us(len(decode_kv), sum(decode_kv) / len(decode_kv)) if decode_kv else 0.0)

    def embed_us(self, n):
        return 2.0

    def final_norm_us(self, n):
        return 3.0

    def lm_head_us(self, s):
        return 50.0 + s

    def send_recv_us(self, n):
        return 7.0


def engine(**kw):
    base = dict(name="t", cpu_per_iteration_us=1000.0, cpu_per_sequence_us=10.0, cpu_per_token_us=0.5,
                cuda_graph_sizes=[1, 2, 4, 8, 16], graph_mixed_batches=False, custom_allreduce_max_bytes=8 * 1024 * 1024,
                mixed_attention="one_call")
    return EngineConf(**{**base, **kw})


def test_graph_padding_prices_token_ops_at_the_captured_size():
    bc = BatchCost(FakeOps(), MODEL, 1, engine=engine())
    assert [bc.padded(n, True) for n in (1, 3, 5, 16, 17)] == [1, 4, 8, 16, 17]
    assert bc.padded(3, False) == 3                      # v0-style: prefills run eagerly
    assert BatchCost(FakeOps(), MODEL, 1, engine=engine(graph_mixed_batches=True)).padded(3, False) == 4
    assert BatchCost(FakeOps(), MODEL, 1, engine=engine(), graphs=False).padded(3, True) == 3   # a CPU card


def test_custom_allreduce_below_its_size_limit_nccl_above():
    # 8 MiB / 8192 bytes per token = 1024 tokens: custom below, NCCL from 1024 on
    ops = FakeOps()
    bc = BatchCost(ops, MODEL, 1, engine=engine())
    assert bc.allreduce_us(1023) == pytest.approx(5 + 10.23)
    assert bc.allreduce_us(1024) == 30 + 1024
    # vLLM uses it at tp > 2 only when every GPU pair is NVLinked (a switch); tp=2 anywhere
    assert BatchCost(ops, MODEL, 1, engine=engine(), interconnect="pcie").allreduce_us(10) == 40
    ops2 = FakeOps()
    ops2.tp = 2
    assert BatchCost(ops2, MODEL, 1, engine=engine(), interconnect="pcie").allreduce_us(10) == pytest.approx(5.1)
    assert BatchCost(ops, MODEL, 1, engine=engine(custom_allreduce_max_bytes=0)).allreduce_us(10) == 40


def test_decode_iteration_hand_computed():
    """3 decodes holding 300 KV tokens (mean 100) at tp=4, pp=1, padded to 4:
    2 layers x (token ops 104 + 2 all-reduces x (5 + 0.04) + attention 10 + 3 x 100 / 100)
    + embedding 2 + its all-reduce 5.04 + final norm 3 + LM head 53 + CPU 1000 + 3 x (10 + 0.5)."""
    expected = 2 * (104 + 2 * 5.04 + 13) + 2 + 5.04 + 3 + 53 + 1000 + 3 * 10.5
    bc = BatchCost(FakeOps(), MODEL, 1, engine=engine())
    assert bc.decode_us(3, 300) == pytest.approx(expected)
    # the memoised line holds inside the KV cell and agrees with the general path
    assert bc.decode_us(3, 300) == pytest.approx(expected)
    assert bc.stage_us(3, [], 3, 300, 3) == [pytest.approx(expected)]


def test_mixed_batch_attention_is_one_call():
    """A 100-token chunk and 2 decodes (KV 50 each): one call pays the fixed cost once -
    prefill 20 + 10 and decode 10 + 1, minus min(decode floor 10.01, prefill floor 20.1)."""
    one = BatchCost(FakeOps(), MODEL, 1, engine=engine())
    split = BatchCost(FakeOps(), MODEL, 1, engine=engine(mixed_attention="split"))
    floor = min(10 + 1 / 100, 20 + 1 / 10)
    assert one.attention_us([(100, 100)], 2, 100) == pytest.approx(30 + 11 - floor)
    assert split.attention_us([(100, 100)], 2, 100) == pytest.approx(30 + 11)
    assert one.attention_us([(100, 100)], 0, 0) == pytest.approx(30)     # nothing to merge


def test_pipeline_stages_split_the_per_forward_ops():
    """pp=2, one 40-token prefill: stage 0 = its layer + embedding + its all-reduce + CPU + the
    hand-off; stage 1 = its layer + final norm + LM head (1 sequence)."""
    ops = FakeOps()
    bc = BatchCost(ops, MODEL, 2, engine=engine())
    per_layer = (100 + 40) + 2 * (5 + 0.4) + (20 + 4)
    s0, s1 = bc.stage_us(40, [(40, 40)], 0, 0, 1)
    assert s0 == pytest.approx(per_layer + 7 + 2 + 5.4 + 1000 + 10 + 0.5 * 40)
    assert s1 == pytest.approx(per_layer + 3 + 51)


def test_frontend_latency_adds_to_ttft_and_e2e_not_tpot():
    base = ["workload=fixed", "workload.num_requests=1", "workload.prefill_tokens=100",
            "workload.decode_tokens=20", "hw=h100", "model=tiny-llama"]
    a = sim.simulate(sim.compose(base + ["engine.frontend_latency_us=0"])).requests.iloc[0]
    b = sim.simulate(sim.compose(base + ["engine.frontend_latency_us=7000"])).requests.iloc[0]
    assert b.ttft_s - a.ttft_s == pytest.approx(0.007)
    assert b.e2e_s - a.e2e_s == pytest.approx(0.007)
    assert b.tpot_s == pytest.approx(a.tpot_s)


@pytest.mark.parametrize("override,message", [
    ("engine.cpu_per_iteration_us=-1", "engine.cpu_per_iteration_us=-1.0 must be >= 0"),
    ("engine.mixed_attention=twice", "engine.mixed_attention='twice'; choose one of"),
    ("engine.cuda_graph_sizes=[0,8]", "engine.cuda_graph_sizes=[0, 8] must hold sizes >= 1"),
])
def test_engine_profile_errors_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sim.simulate(sim.compose(["workload=fixed", "workload.num_requests=1", override]))


def test_vllm_layer_ops_and_collective_counts():
    ops = {e.op: e for e in shapes.engine_layer_elementwise(MODEL, 4)}
    assert ops["fused_add_rmsnorm"].per_layer == 2 and ops["fused_add_rmsnorm"].width == 4096
    assert "rmsnorm" not in ops and "add" not in ops
    assert ops["kv_cache_write"].width == 2 * 2 * 128          # K and V of 8 / 4 KV heads per GPU
    layernorm = ModelConf(**{**MODEL.__dict__, "norm": "layernorm", "parallel_block": True, "activation": "gelu",
                             "gated_mlp": False})
    assert {e.op for e in shapes.engine_layer_elementwise(layernorm, 1)} >= {"layernorm", "add", "kv_cache_write"}
    # vLLM reduces after o_proj and after down_proj - also in parallel-block models - and once
    # after the vocabulary-parallel embedding
    assert [shapes.allreduces_per_layer(m, tp) for m in (MODEL, layernorm) for tp in (1, 2)] == [0, 2, 0, 2]
    assert [shapes.allreduces_per_forward(MODEL, tp) for tp in (1, 8)] == [0, 1]


def test_unmeasured_ops_use_the_roofline_and_custom_allreduce_falls_back_to_nccl():
    """A predictor that answers 100 µs for everything but has no kv_cache_write, sampler or
    custom all-reduce rows: those come from the roofline prior / the NCCL rows."""
    hw = HwConf(name="h", sku="x", peak_tflops=1000, mem_bw_gbps=1000, mem_gib=80, link_bw_gbps=100,
                network="n", devices_per_node=8)
    known = {"kv_cache_write": False, "sampler": False, "custom_all_reduce": False, "all_gather": False}
    ops = OpTimes(hw, MODEL, 2, predict=lambda family, df: np.full(len(df), 100.0), max_tokens=64,
                  knows=lambda family, op: known.get(op, True))
    kv = roofline.elementwise_us(np.array([1.0]), np.array([2 * 4 * 128]), hw, 2)[0]   # floor: 1 µs
    # 4 GEMMs + fused norm x 2 + silu_mul + rope, at 100 each, + the roofline KV write
    assert ops.layer_token_ops_us(1) == pytest.approx(4 * 100 + 2 * 100 + 100 + 100 + kv)
    assert ops.allreduce_us(8, custom=True) == ops.allreduce_us(8) == 100
    sampler = roofline.elementwise_us(np.array([1.0]), np.array([32000.0]), hw, 2)[0]
    gather = roofline.collective_us(np.array([32000 * 2.0]), np.array([2]), hw, "all_gather")[0]
    assert ops.lm_head_us(1) == pytest.approx(100 + gather + sampler)
    assert ops.embed_us(5) == ops.final_norm_us(5) == 100


def test_predictors_report_the_ops_they_were_trained_on():
    from conf import to_hw
    from estimator.predictors import Predictors
    from sim.workload import resolve_data_dir
    preds = Predictors.load(to_hw(sim.compose(["hw=h100"]).hw), str(resolve_data_dir("data")))
    assert preds.knows("elementwise", "rmsnorm") and not preds.knows("elementwise", "kv_cache_write")
    assert preds.knows("gemm", "anything")        # families without an op vocabulary
