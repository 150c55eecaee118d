"""Mixture-of-experts and MLA deployments: layouts and their rules, the collectives each layout
implies (sizes hand-computed from tokens x hidden x top-k), MoE/MLA pricing queries, the
expert-imbalance knob, MFU with top-k experts, pipeline hand-offs across nodes, and whole
simulations of DeepSeek-V3 with DP attention + EP."""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import sim
from conf import ConfigError, compose, shapes, to_hw, to_model
from estimator import runtime as rt
from sim.costs import BatchCost

REPO = Path(__file__).resolve().parents[1]


def card(name: str):
    return to_model(compose("sim", [f"model={name}"]).model)


DS, MIX = card("deepseek-v3"), card("mixtral-8x7b")
H100 = to_hw(compose("sim", ["hw=h100"]).hw)


# --- layouts and their rules ------------------------------------------------------------------
def test_layout_widths():
    lay = shapes.layout(DS, tp=1, ep=8, dp_attention=True)
    assert (lay.dp, lay.width, lay.moe_tp, lay.gpus) == (8, 8, 1, 8)
    lay = shapes.layout(DS, tp=2, ep=8, dp_attention=True)
    assert (lay.dp, lay.width, lay.moe_tp) == (4, 8, 1)
    lay = shapes.layout(MIX, tp=8, ep=2)                    # experts over 2 GPUs, each split 4 ways
    assert (lay.dp, lay.width, lay.moe_tp) == (1, 8, 4)


@pytest.mark.parametrize("model, kw, rule", [
    (DS, dict(ep=7), "ep=7 does not divide deepseek-v3's 256 routed experts"),
    (MIX, dict(tp=2, ep=4), "ep must divide tp"),
    (DS, dict(tp=4, ep=2, dp_attention=True), "ep=2 must be a multiple of tp=4"),
    (DS, dict(tp=1, pp=2, ep=8, dp_attention=True), "DP attention is modelled at pp=1 only"),
    (card("llama3-8b"), dict(ep=2), "dense model .* expert parallelism needs a mixture-of-experts"),
    (card("llama3-8b"), dict(dp_attention=True), "dense model; DP attention"),
    (MIX, dict(tp=2, ep=2, all2all="nccl"), "all2all_backend='nccl'; choose one of"),
    (MIX, dict(tp=2, ep=2, expert_imbalance=0.5), "expert_imbalance=0.5"),
    (MIX, dict(tp=2, expert_routing="zipf"), "expert_routing='zipf'; choose one of"),
])
def test_invalid_layouts_name_the_rule(model, kw, rule):
    with pytest.raises(ConfigError, match=rule):
        shapes.layout(model, **kw)


def test_cli_invalid_layout_is_one_line():
    out = subprocess.run([sys.executable, "-m", "sim.run", "model=deepseek-v3", "hw=h100", "parallel.ep=7",
                          "parallel.dp_attention=true"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: parallel.ep=7 does not divide deepseek-v3's 256 routed experts")
    assert not any("Traceback" in line for line in lines)


# --- collectives: sizes by hand ---------------------------------------------------------------
def sizes(model, n, **kw):
    return [(c.op, c.size_bytes, c.world_size) for c in shapes.moe_block_collectives(model, shapes.layout(model, **kw), n)]


def test_moe_collective_sizes_by_hand():
    tok = 7168 * 2                          # one DeepSeek-V3 hidden state in bf16: 14,336 bytes
    assert tok == shapes.activation_bytes_per_token(DS)
    n = 100                                 # tokens on each attention rank
    # TP attention (tp8, experts over ep8): the MLP all-reduce of the rank's tokens
    assert sizes(DS, n, tp=8, ep=8) == [("all_reduce", 1_433_600, 8)]
    # DP attention, vLLM's allgather_reducescatter: every rank's tokens gathered, outputs scattered
    assert sizes(DS, n, tp=1, ep=8, dp_attention=True) == [("all_gather", 8 * 100 * tok, 8),
                                                          ("reduce_scatter", 8 * 100 * tok, 8)]
    assert 8 * 100 * tok == 11_468_800
    # ... with tp2 inside each of 4 DP ranks: gather over the 4 ranks, then reduce over tp
    assert sizes(DS, n, tp=2, ep=8, dp_attention=True) == [("all_gather", 5_734_400, 4),
                                                          ("reduce_scatter", 5_734_400, 4),
                                                          ("all_reduce", 1_433_600, 2)]
    # DeepEP all-to-all: each token once per selected expert (top-8), there and back
    assert sizes(DS, n, tp=1, ep=16, dp_attention=True, all2all="deepep") == [("all_to_all", 100 * 8 * tok, 16)] * 2
    assert 100 * 8 * tok == 11_468_800
    # ... tokens split over tp2, then gathered back; the busiest rank moves 1.5x the mean
    assert sizes(DS, n, tp=2, ep=8, dp_attention=True, all2all="deepep", expert_imbalance=1.5) == [
        ("all_to_all", 50 * 8 * tok * 1.5, 8), ("all_to_all", 50 * 8 * tok * 1.5, 8), ("all_gather", 1_433_600, 2)]
    assert 50 * 8 * tok * 1.5 == 8_601_600
    # Mixtral (hidden 4096 -> 8,192 bytes), top-2
    assert sizes(MIX, n, tp=2, ep=2) == [("all_reduce", 819_200, 2)]
    assert sizes(MIX, n, tp=1, ep=2, dp_attention=True, all2all="deepep") == [("all_to_all", 1_638_400, 2)] * 2
    assert sizes(MIX, n, tp=1) == []        # one GPU: nothing to exchange


# --- pricing queries ----------------------------------------------------------------------------
class Recorder:
    """predict() that records every query frame and answers with the roofline prior."""

    def __init__(self, hw):
        self.base, self.frames = rt.roofline_predict(hw), []

    def __call__(self, family, df):
        self.frames.append((family, df.copy()))
        return self.base(family, df)

    def of(self, family):
        return pd.concat([df for fam, df in self.frames if fam == family], ignore_index=True)


def test_moe_query_per_layout_and_imbalance():
    rec = Recorder(H100)
    lay = shapes.layout(DS, tp=1, ep=8, dp_attention=True, expert_imbalance=1.25)
    ops = rt.OpTimes(H100, DS, 1, predict=rec, max_tokens=64, layout=lay)
    moe = rec.of("moe")
    # each GPU sees all 8 DP ranks' tokens, the busiest 1.25x its share: num_tokens = 8 x 1.25 x n
    assert np.allclose(moe.num_tokens.to_numpy(), 10.0 * np.arange(1, 65))
    assert set(moe.ep) == {8} and set(moe.tp) == {1} and set(moe.dtype) == {"fp8"}
    assert set(moe.ffn_size) == {2048} and set(moe.num_experts) == {256} and set(moe.top_k) == {8}
    coll = rec.of("collective")
    gathered = coll[coll.op == "all_gather"]
    assert np.allclose(gathered.size_bytes.to_numpy(), 8 * 14336 * np.arange(1, 65))
    # MLA: attention is the whole module, per GPU 128 heads at tp1
    mla = rec.of("mla")
    assert set(mla.num_heads) == {128} and set(mla.kv_lora_rank) == {512} and set(mla.phase) == {"prefill", "decode"}
    assert set(mla.op) == {"mla"} and set(mla.weight_dtype) == {"fp8_block"} and set(mla.dtype) == {"bfloat16"}
    assert not {"qkv_proj", "o_proj", "q_b_proj"} & set(rec.of("gemm").op)   # inside the module
    # more imbalance, slower MoE blocks; nothing else moves
    flat = rt.OpTimes(H100, DS, 1, max_tokens=64, layout=dataclasses.replace(lay, expert_imbalance=1.0))
    assert ops.moe_mlp_us(64) > flat.moe_mlp_us(64)
    assert ops.layer_token_ops_us(64) == flat.layer_token_ops_us(64)


def test_moe_rows_follow_the_routing_distribution(caplog):
    """The experts are priced from the rows of the layout's routing (default power_law_1.2, as
    aiconfigurator prices real, skewed routers); a GPU without those rows uses the nearest it
    has and says so once."""
    def ops_for(routing, knows=None):
        rec = Recorder(H100)
        rt.OpTimes(H100, MIX, 2, predict=rec, max_tokens=16, knows=knows,
                   layout=shapes.layout(MIX, tp=2, expert_routing=routing))
        return set(rec.of("moe").op)
    assert shapes.layout(MIX, tp=2).expert_routing == "power_law_1.2"
    assert ops_for("power_law_1.2") == {"moe_power_law_1.2"}
    assert ops_for("balanced") == {"moe_balanced"}
    only_balanced = lambda family, op: family != "moe" or op == "moe_balanced"  # noqa: E731
    with caplog.at_level(logging.WARNING):
        assert ops_for("power_law_1.01", only_balanced) == {"moe_balanced"}
    assert "no moe_power_law_1.01 rows" in caplog.text


def test_moe_block_replaces_the_dense_mlp():
    rec = Recorder(H100)
    ops = rt.OpTimes(H100, MIX, 2, predict=rec, max_tokens=32, layout=shapes.layout(MIX, tp=2, ep=2))
    assert not {"gate_up_proj", "down_proj"} & set(rec.of("gemm").op)
    assert "silu_mul" not in set(rec.of("elementwise").op)
    moe = rec.of("moe")
    assert set(moe.ep) == {2} and set(moe.tp) == {1} and np.allclose(moe.num_tokens, np.arange(1, 33))
    # tp2 ep2 without DP attention: the MoE block's communication is the MLP all-reduce the
    # engine's all-reduce prices (sim/costs.py), nothing more
    assert not {"reduce_scatter", "all_to_all"} & set(rec.of("collective").op)
    one = rt.OpTimes(H100, card("llama3-8b"), 2, max_tokens=32)
    assert ops.dense_mlp_us(16) == 0.0 and one.moe_mlp_us(16) == 0.0      # Mixtral has no dense layer
    ds = rt.OpTimes(H100, DS, 8, max_tokens=32, layout=shapes.layout(DS, tp=8))
    assert ds.dense_mlp_us(16) > 0                                         # DeepSeek's first 3


def test_stage_layer_mix():
    assert shapes.stage_mlp_mix(DS, 2) == [(3, 28), (0, 30)]           # 61 layers: 31 + 30
    assert shapes.stage_mlp_mix(card("llama4-maverick"), 1) == [(24, 24)]
    assert shapes.stage_mlp_mix(MIX, 4) == [(0, 8)] * 4


def test_batch_cost_prices_each_stages_mix():
    ops = rt.OpTimes(H100, DS, 4, max_tokens=64, layout=shapes.layout(DS, tp=4, pp=2))
    cost = BatchCost(ops, DS, 2, 0.0, 0.0)                 # eager, NCCL all-reduces, no CPU terms
    t = cost.stage_us(10, [(10, 10)], 0, 0, 1)
    ar = ops.allreduce_us(10)
    common = ops.layer_token_ops_us(10) + 2 * ar + ops.layer_attention_us([10], [10], ())
    assert t[0] == pytest.approx(31 * common + 3 * ops.dense_mlp_us(10) + 28 * ops.moe_mlp_us(10)
                                 + ops.embed_us(10) + ar + ops.send_recv_us(10))
    assert t[1] == pytest.approx(30 * common + 30 * ops.moe_mlp_us(10) + ops.final_norm_us(10) + ops.lm_head_us(1))
    # DP attention with DeepEP all-to-all at tp2: the MoE layers give back the MLP all-reduce
    lay = shapes.layout(DS, tp=2, ep=8, dp_attention=True, all2all="deepep")
    a2a = BatchCost(rt.OpTimes(H100, DS, 2, max_tokens=64, layout=lay), DS, 1, 0.0, 0.0)
    assert a2a._moe_ar_delta == -1
    lay = shapes.layout(DS, tp=2, ep=8, dp_attention=True)
    assert BatchCost(rt.OpTimes(H100, DS, 2, max_tokens=64, layout=lay), DS, 1, 0.0, 0.0)._moe_ar_delta == 0


# --- MFU counts top-k experts ------------------------------------------------------------------
def test_mfu_counts_top_k_experts():
    from sim.core import _utilisation

    m = dataclasses.make_dataclass("M", ["tokens", "sampled", "attn_pairs", "iterations", "kv_read_tokens"])(
        1000, 0, 0, 0, 0)
    out = _utilisation(m, H100, MIX, shapes.layout(MIX, tp=2), 1, 1.0)
    active = 32 * (4096 * 48 * 128 + 32 * 128 * 4096 + 2 * 3 * 4096 * 14336 + 4096 * 8 + 2 * 4096)
    assert active == 12_617_777_152
    assert out["mfu"] == pytest.approx(2 * active * 1000 / (989.4e12 * 2))


# --- nodes: PP across nodes on the network, TP across nodes warned --------------------------------
NET = dataclasses.replace(H100, network_bw_gbps=50.0, network_latency_us=10.0)   # DGX H100: 400 Gb/s per GPU


def test_pp_across_nodes_uses_the_network():
    m = card("llama3-70b")
    assert shapes.stages_cross_node(shapes.Layout(tp=8, pp=2), 8) == [True]
    assert shapes.stages_cross_node(shapes.Layout(tp=4, pp=2), 8) == [False]
    assert shapes.stages_cross_node(shapes.Layout(tp=4, pp=4), 8) == [False, True, False]
    ops = rt.OpTimes(NET, m, 8, max_tokens=64, layout=shapes.layout(m, tp=8, pp=2))
    # 64 hidden states of 8192 bf16 values = 1 MiB over 50 GB/s + one 10 us hop
    assert ops.send_recv_network_us(64) == pytest.approx(64 * 16384 / 50e3 + 10.0)
    cost = BatchCost(ops, m, 2, 0.0, 0.0)
    assert cost._send_us(0, 64) == ops.send_recv_network_us(64) > ops.send_recv_us(64)
    # a card without network fields: priced as within a node, with a warning
    plain = rt.OpTimes(dataclasses.replace(H100, network_bw_gbps=0.0), m, 8, max_tokens=64,
                       layout=shapes.layout(m, tp=8, pp=2))
    assert plain.send_recv_network_us(64) == plain.send_recv_us(64)


def test_ep_across_nodes_all_to_all_on_the_network():
    lay = shapes.layout(DS, tp=1, ep=16, dp_attention=True, all2all="deepep")
    ops = rt.OpTimes(NET, DS, 1, max_tokens=16, layout=lay)
    size = 16 * 8 * 14336                   # 16 tokens x top-8 x hidden
    # half the copies leave the node (8 of 16 GPUs are remote): two all-to-alls
    expect = 2 * (size * 0.5 / 50e3 + 10.0)
    assert ops._collectives_us(shapes.moe_block_collectives(DS, lay, np.array([16.0]))) == pytest.approx(expect)


def test_tp_across_nodes_warns_and_all_reduces_on_the_network(caplog):
    from sim.core import warn_layout
    with caplog.at_level(logging.WARNING):
        warn_layout(H100, shapes.Layout(tp=16))
    assert "parallel.tp=16 spans nodes of 8 GPUs" in caplog.text
    m = card("llama3-70b")                    # 64 heads: tp16 allowed
    ops = rt.OpTimes(NET, m, 16, max_tokens=8)
    ring = 8 * 16384 * 2 * 15 / 16 / 50e3 + 2 * 15 * 10.0     # 8 tokens, ring over 16 GPUs, 30 hops
    assert ops.allreduce_us(8) == pytest.approx(ring)
    assert ops.allreduce_us(8, custom=True) == pytest.approx(ring)   # no custom all-reduce across nodes


# --- whole simulations ------------------------------------------------------------------------------
def ds_cfg(*extra):
    return sim.compose(["model=deepseek-v3", "hw=h200", "parallel.ep=8", "parallel.dp_attention=true",
                        "workload=fixed", "workload.num_requests=24", "workload.qps=8",
                        "workload.prefill_tokens=256", "workload.decode_tokens=16", *extra])


def test_deepseek_v3_dp_attention_ep8_runs_offline():
    res = sim.simulate(ds_cfg())
    s = res.summary
    assert s["num_requests"] == 24 and s["tpot_s_p50"] > 0
    assert sorted(res.requests.replica.unique()) == list(range(8))     # 8 DP ranks, each its own engine
    assert s["kv_capacity_tokens"] == 8 * res.memory.num_tokens
    again = sim.simulate(ds_cfg())
    assert again.summary["e2e_s_mean"] == s["e2e_s_mean"]               # deterministic


def test_deepseek_layouts_trade_memory_for_time():
    """TP attention replicates MLA's latent cache on every GPU; DP attention does not."""
    tp8 = sim.simulate(ds_cfg("parallel.tp=8", "parallel.dp_attention=false")).summary
    dp8 = sim.simulate(ds_cfg()).summary
    assert dp8["kv_capacity_tokens"] > 4 * tp8["kv_capacity_tokens"]
    assert tp8["weight_gib_per_gpu"] < dp8["weight_gib_per_gpu"]


def test_search_covers_ep_and_dp_for_moe_only():
    from sim.search.exec import check_fits
    from sim.search.run import compose as search_compose
    from sim.search.space import enumerate_space
    base = ["search.hw=[h100]", "search.tp=[1,8]", "search.pp=[1]", "search.ep=[1,8]",
            "search.dp_attention=[false,true]", "search.schedulers=[vllm]", "search.knobs={}",
            "search.weight_dtype=['',fp8]"]
    runnable, skipped = enumerate_space(search_compose(["model=mixtral-8x7b", *base]), fits=check_fits)
    layouts = {(c.tp, c.ep, c.dp_attention, c.weight_dtype) for c, _ in runnable}
    assert (1, 8, True, "") in layouts and (8, 8, False, "fp8") in layouts and (8, 1, False, "") in layouts
    assert (8, 8, True, "") not in layouts                                # one DP rank = tp8 ep8
    assert any("is one DP rank" in s.reason for s in skipped)
    assert any("ep must divide tp" in s.reason for s in skipped)          # tp1 ep8 without DP attention
    runnable, _ = enumerate_space(search_compose(["model=llama3-8b", *base]), fits=check_fits)
    assert {(c.ep, c.dp_attention) for c, _ in runnable} == {(1, False)}
    for cand, sim_cfg in runnable:
        assert sim_cfg.model.get("weight_dtype", "") == cand.weight_dtype


def test_search_explains_the_winner():
    from sim.search.report import explain
    ok = pd.DataFrame([
        dict(config="h100 tp1 pp1 ep8 dp-attn x1 vllm", tp=1, pp=1, ep=8, dp_attention=True, weight_dtype="",
             kv_dtype="", requests_per_usd=300.0, kv_capacity_tokens_at_capacity=2.0e6,
             weight_gib_per_gpu_at_capacity=30.0, tpot_s_p50_at_capacity=0.03),
        dict(config="h100 tp8 pp1 ep8 x1 vllm", tp=8, pp=1, ep=8, dp_attention=False, weight_dtype="",
             kv_dtype="", requests_per_usd=200.0, kv_capacity_tokens_at_capacity=3.0e5,
             weight_gib_per_gpu_at_capacity=20.0, tpot_s_p50_at_capacity=0.025)])
    text = explain(ok)
    assert text.startswith("why: attention in 8 data-parallel ranks of tp1, experts over ep8 serves 1.50x")
    assert "KV cache per replica (tokens) 2e+06 vs 3e+05" in text and "TPOT p50 at capacity (s) 0.03 vs 0.025" in text
