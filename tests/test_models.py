"""Model cards, Hugging Face config reading, parameter and KV arithmetic, and the memory plan
(vLLM-style KV capacity, fp8 weights/KV on every hardware card). Expected numbers are
hand-computed from the models' config.json values, written out as arithmetic below."""
from __future__ import annotations

import json

import pytest

from conf import ConfigError, choices, compose, shapes, to_hw, to_model
from sim import memory

GIB = 2 ** 30


def card(name: str):
    return to_model(compose("sim", [f"model={name}"]).model)


def hw_card(name: str):
    return to_hw(compose("sim", [f"hw={name}"]).hw)


# --- Hugging Face configs (the published values) and the shipped cards agree --------------------
DEEPSEEK_V3 = {   # deepseek-ai/DeepSeek-V3 config.json (R1 has the same architecture)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "_name_or_path": "deepseek-v3",
    "hidden_size": 7168, "intermediate_size": 18432, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "vocab_size": 129280, "max_position_embeddings": 163840, "rope_theta": 10000,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "moe_intermediate_size": 2048, "n_group": 8, "topk_group": 4,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                            "activation_scheme": "dynamic"},
}
MAVERICK = {      # meta-llama/Llama-4-Maverick-17B-128E-Instruct config.json (multimodal wrapper)
    "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "_name_or_path": "llama4-maverick",
    "torch_dtype": "bfloat16",
    "text_config": {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
                    "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
                    "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 128,
                    "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "vocab_size": 202048,
                    "max_position_embeddings": 131072, "rope_theta": 500000.0, "hidden_act": "silu",
                    "attention_chunk_size": 8192, "torch_dtype": "bfloat16"},
    "vision_config": {"hidden_size": 1408},
}
QWEN3_30B = {     # Qwen/Qwen3-30B-A3B config.json
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "_name_or_path": "qwen3-30b-a3b",
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "hidden_act": "silu", "torch_dtype": "bfloat16",
}
MIXTRAL = {       # mistralai/Mixtral-8x7B-v0.1 config.json
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "_name_or_path": "mixtral-8x7b",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
    "max_position_embeddings": 32768, "rope_theta": 1e6, "hidden_act": "silu", "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("config, name", [(DEEPSEEK_V3, "deepseek-v3"), (QWEN3_30B, "qwen3-30b-a3b"),
                                          (MIXTRAL, "mixtral-8x7b")])
def test_hf_config_reads_as_the_card(tmp_path, config, name):
    (tmp_path / "config.json").write_text(json.dumps(config))
    from conf.hf import model_from_hf_config
    got, want = model_from_hf_config(tmp_path), card(name)
    for field in ("hidden_size", "num_layers", "num_heads", "head_dim", "ffn_size", "vocab_size", "dtype",
                  "weight_dtype", "num_experts", "experts_per_token", "num_shared_experts", "first_dense_layers",
                  "moe_layer_step", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                  "v_head_dim"):
        assert getattr(got, field) == getattr(want, field), field
    assert shapes.expert_ffn(got) == shapes.expert_ffn(want)
    assert shapes.num_params(got) == shapes.num_params(want)


def test_llama4_text_config_and_interleaved_moe(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MAVERICK))
    from conf.hf import model_from_hf_config
    m = model_from_hf_config(tmp_path)
    assert (m.num_experts, m.experts_per_token, m.num_shared_experts) == (128, 1, 1)
    assert (m.ffn_size, m.moe_ffn_size, m.moe_layer_step) == (16384, 8192, 2)
    flags = shapes.moe_layer_flags(m)
    assert flags[:4] == [False, True, False, True] and sum(flags) == 24   # HF moe_layers = 1, 3, 5, ...
    assert shapes.num_params(m) == shapes.num_params(card("llama4-maverick"))


def test_hf_config_rejects_unmodelled_layouts(tmp_path):
    from conf.hf import model_from_hf_config
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_30B, "mlp_only_layers": [5, 9]}))
    with pytest.raises(ConfigError, match="only leading dense layers"):
        model_from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**MIXTRAL, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ConfigError, match="quant_method='awq'"):
        model_from_hf_config(tmp_path)


def test_explicit_kv_dtype_applies_on_top_of_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL))
    m = to_model(compose("sim", [f"+model.hf_config={tmp_path}", "model.kv_dtype=fp8"]).model)
    assert m.kv_dtype == "fp8" and m.num_experts == 8


@pytest.mark.parametrize("override, rule", [
    ("model.experts_per_token=9", "experts_per_token=9 must be between 1 and num_experts=8"),
    ("model.first_dense_layers=32", "first_dense_layers=32 must leave"),
    ("model.weight_dtype=int4", "weight_dtype='int4' is not one of"),
    ("model.moe_layer_step=0", "moe_layer_step=0 must be >= 1"),
])
def test_card_field_rules(override, rule):
    with pytest.raises(ConfigError, match=rule):
        to_model(compose("sim", ["model=mixtral-8x7b", override]).model)
    with pytest.raises(ConfigError, match="MLA .* needs qk_nope_head_dim"):
        to_model(compose("sim", ["model=deepseek-v3", "model.qk_nope_head_dim=0"]).model)
    with pytest.raises(ConfigError, match="need num_experts > 0"):
        to_model(compose("sim", ["model=llama2-7b", "model.num_shared_experts=1"]).model)


# --- parameters and KV bytes, by hand ------------------------------------------------------------
def test_deepseek_v3_parameters_and_kv_by_hand():
    m = card("deepseek-v3")
    h = 7168
    mla = (h * 1536 + 1536 * 128 * (128 + 64)        # q_a, q_b
           + h * (512 + 64) + 512 * 128 * (128 + 128)  # kv_a (latent + rope key), kv_b
           + 128 * 128 * h + 1536 + 512)              # o_proj, q_a/kv_a norms
    assert mla == 187_107_328
    expert = 3 * h * 2048
    dense_layer = mla + 3 * h * 18432 + 2 * h
    moe_layer = mla + 256 * expert + 1 * expert + h * 256 + 2 * h
    assert shapes.num_params(m) == 3 * dense_layer + 58 * moe_layer + 2 * 129280 * h == 671_026_397_184
    active = 3 * dense_layer + 58 * (mla + 8 * expert + expert + h * 256 + 2 * h)
    assert shapes.active_params_per_token(m) == active           # ~35.7 B + 1.85 B embeddings = 37.6 B
    # KV: one 512-wide latent + one 64-wide RoPE key per token and layer, bf16, not split by tp
    assert shapes.kv_bytes_per_token(m, 1) == (512 + 64) * 2 * 61 == 70_272
    assert shapes.kv_bytes_per_token(m, 8) == 70_272
    fp8 = shapes.kv_bytes_per_token(to_model(compose("sim", ["model=deepseek-v3", "model.kv_dtype=fp8"]).model), 1)
    assert fp8 == (512 + 64) * 1 * 61 == 35_136


def test_mixtral_parameters_and_kv_by_hand():
    m = card("mixtral-8x7b")
    h, f = 4096, 14336
    attn = h * (32 + 2 * 8) * 128 + 32 * 128 * h
    layer = attn + 8 * 3 * h * f + h * 8 + 2 * h
    assert shapes.num_params(m) == 32 * layer + 2 * 32000 * h == 46_702_788_608
    assert shapes.active_params_per_token(m) == 32 * (attn + 2 * 3 * h * f + h * 8 + 2 * h) == 12_617_777_152
    assert shapes.kv_bytes_per_token(m, 1) == 2 * 8 * 128 * 2 * 32 == 131_072
    assert shapes.kv_bytes_per_token(m, 2) == 65_536
    assert shapes.kv_bytes_per_token(m, 8) == 2 * 1 * 128 * 2 * 32 == 16_384


def test_published_totals():
    """Total parameters as published (B): the cards count what the model cards say."""
    for name, total in (("mixtral-8x22b", 141), ("qwen3-30b-a3b", 30.5), ("qwen3-235b-a22b", 235),
                        ("llama4-scout", 108), ("llama4-maverick", 400), ("deepseek-r1", 671)):
        assert shapes.num_params(card(name)) / 1e9 == pytest.approx(total, rel=0.01), name


def test_expert_weights_shard_over_ep_by_hand():
    m = card("deepseek-v3")
    lay = shapes.layout(m, tp=1, ep=8, dp_attention=True)
    h = 7168
    attn = (1536 * 128 * 192 + 512 * 128 * 256 + 128 * 128 * h) + (h * 1536 + h * 576) + (1536 + 512) * 2
    dense = attn + 3 * h * 18432 + 2 * h * 2                   # fp8 linears, bf16 norms
    moe = attn + 32 * 3 * h * 2048 + 3 * h * 2048 + h * 256 * 2 + 2 * h * 2   # 32 local experts, shared, router
    emb = 129280 * h * 2
    assert shapes.weight_bytes_per_gpu(m, 1, 1, lay) == 3 * dense + 58 * moe + 2 * emb + h * 2 == 100_817_025_024
    mix = card("mixtral-8x7b")
    attn = (4096 * (16 + 2 * 4) * 128 + 16 * 128 * 4096) * 2
    layer = attn + 4 * 3 * 4096 * 14336 * 2 + 4096 * 8 * 2 + 2 * 4096 * 2
    by_ep = shapes.weight_bytes_per_gpu(mix, 2, 1, shapes.layout(mix, tp=2, ep=2))
    assert by_ep == 32 * layer + 2 * 16000 * 4096 * 2 + 4096 * 2 == 46_704_107_520
    # EP and TP shard an expert's bytes alike: 4 whole experts = 8 half experts
    assert by_ep == shapes.weight_bytes_per_gpu(mix, 2, 1, shapes.layout(mix, tp=2, ep=1))


# --- KV capacity as vLLM computes it -------------------------------------------------------------
def test_kv_capacity_vllm_formula_by_hand():
    hw, m = hw_card("h100"), card("llama3-8b")
    plan = memory.memory_plan(hw, m, 1, 1)                 # 4096 batched tokens, 128 seqs, util 0.9
    weights = 32 * ((4096 * 48 * 128 + 32 * 128 * 4096 + 3 * 4096 * 14336) * 2 + 2 * 4096 * 2) \
        + 2 * 128256 * 4096 * 2 + 4096 * 2
    act = 4096 * (2 * 4096 + 48 * 128 + 2 * 14336) * 2 + 128 * 128256 * (2 + 8)
    block = 2 * 8 * 128 * 2 * 32 * 16
    assert (plan.weight_bytes, plan.activation_bytes, plan.kv_bytes_per_block) == (weights, act, block)
    assert plan.nccl_bytes == 0 and plan.cuda_graph_bytes == 0
    assert plan.num_blocks == (int(80 * GIB * 0.9) - weights - act) // block == 28_959
    # a CUDA-graph pool in the budget (vLLM >= 0.21) costs exactly its size: 1 GiB = 512 blocks of 2 MiB
    assert memory.memory_plan(hw, m, 1, 1, cuda_graph_gib=1.0).num_blocks == 28_959 - 512
    # tp=2: NCCL buffers of a 2-GPU communicator (aiconfigurator's 342 MB) come off each GPU
    tp2 = memory.memory_plan(hw, m, 2, 1)
    assert tp2.nccl_bytes == 358_612_992
    assert tp2.num_blocks == (int(80 * GIB * 0.9) - tp2.weight_bytes - tp2.activation_bytes - 358_612_992) // (block // 2)


def test_mla_and_moe_activation_and_kv_in_the_plan():
    m = card("deepseek-v3")
    lay = shapes.layout(m, tp=1, ep=8, dp_attention=True)
    hw = hw_card("h200")                                     # 140.4 GiB
    plan = memory.memory_plan(hw, m, layout=lay, max_tokens_per_batch=2048, max_num_seqs=64)
    forward = 2048 * (2 * 7168 + 128 * (2 * 192 + 128) + 2 * 18432) * 2
    fused_moe = min(2048 * 8, memory.FUSED_MOE_CHUNK_TOKENS) * 8 * (3 * 2048 + 7168) * 2
    assert plan.activation_bytes == forward + fused_moe + 64 * 129280 * 10
    assert plan.kv_bytes_per_block == 70_272 * 16
    assert plan.nccl_bytes == 411_041_792                   # an 8-GPU expert group
    free = int(140.4 * GIB * 0.9) - plan.weight_bytes - plan.activation_bytes - plan.nccl_bytes
    assert plan.fits and plan.num_blocks == free // (70_272 * 16)


# --- issue 14.2: what fits at which TP in fp8 vs bf16, on every hardware card ---------------------
LLAMA3_70B_LINEAR = 80 * (8192 * (64 + 16) * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672)   # 68,451,041,280
LLAMA3_70B_EMB = 128256 * 8192                                                            # per table


def llama3_70b_weight_bytes(tp: int, weight_bytes: int) -> int:
    """Hand count: linear layers in the weight dtype, embedding + LM head and norms in bf16."""
    norms = (80 * 2 + 1) * 8192 * 2
    return LLAMA3_70B_LINEAR * weight_bytes // tp + 2 * LLAMA3_70B_EMB // tp * 2 + norms


@pytest.mark.parametrize("hw_name", choices("hw"))
def test_fp8_memory_arithmetic_per_card(hw_name):
    hw = hw_card(hw_name)
    assert LLAMA3_70B_LINEAR == 68_451_041_280
    fits = {}
    for tp in (1, 2, 4, 8):
        for wdt, kvdt in (("", ""), ("fp8", ""), ("fp8", "fp8")):
            m = to_model(compose("sim", ["model=llama3-70b", f"model.weight_dtype={wdt}",
                                         f"model.kv_dtype={kvdt}"]).model)
            plan = memory.memory_plan(hw, m, tp, 1, max_model_len=8192)
            want_w = llama3_70b_weight_bytes(tp, 1 if wdt else 2)
            kv_token = 2 * (8 // tp) * 128 * (1 if kvdt else 2) * 80
            assert plan.weight_bytes == want_w and plan.kv_bytes_per_block == kv_token * 16
            free = int(hw.mem_gib * GIB * 0.9) - want_w - plan.activation_bytes - memory.nccl_buffer_bytes(tp)
            expect = free > 0 and free // (kv_token * 16) * 16 >= 8192
            assert plan.fits == expect, (hw_name, tp, wdt, kvdt, plan.reason)
            fits[tp, wdt, kvdt] = plan.fits
    for tp in (1, 2, 4, 8):        # fp8 weights never need more GPUs than bf16, fp8 KV never more than bf16 KV
        assert fits[tp, "", ""] <= fits[tp, "fp8", ""] <= fits[tp, "fp8", "fp8"]
    bf16 = llama3_70b_weight_bytes(1, 2)
    assert llama3_70b_weight_bytes(1, 1) / bf16 == pytest.approx(0.515, abs=0.005)   # embeddings stay bf16
