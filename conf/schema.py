"""Structured configs shared by every job: hardware, model and parallelism.

YAML files in conf/hw and conf/model hold the data; these dataclasses give their types so
that a typo (``model.hiden=1``) or a wrong type fails at composition, not deep in a run.
Each job adds its own groups (profiler, sim, ...) in its own package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp8": 1}


@dataclass
class HwConf:
    name: str = "???"
    sku: str = "???"
    device: str = "cuda"              # cuda | cpu
    peak_tflops: float = "???"        # dense fp16/bf16 tensor throughput, TFLOP/s per device
    mem_bw_gbps: float = "???"        # device memory bandwidth, GB/s
    mem_gib: float = "???"            # device memory capacity, GiB
    l2_mib: float = 0.0
    devices_per_node: int = 1
    interconnect: str = "none"        # nvswitch | nvlink_pairs | pcie | none
    link_bw_gbps: float = 0.0         # per-device intra-node bandwidth, one direction
    network: str = ""                 # key of the collective tables (e.g. h100_dgx)
    price_per_gpu_hour_usd: float = 0.0
    threads: int = 0                  # CPU threads used for profiling (0 = torch default)
    # What a predictor needs to price a GPU it has no measurements of (estimator, fleet model),
    # and the links that KV transfer, offload and multi-node parallelism cross.
    arch: str = ""                    # ampere | ada | hopper | blackwell | cpu
    sm_version: int = 0               # CUDA compute capability x 10: 80, 89, 90, 100, 103
    sm_count: int = 0
    peak_tflops_fp8: float = 0.0      # dense FP8 tensor TFLOP/s per device; 0 = no FP8 tensor cores
    pcie_bw_gbps: float = 0.0         # host link per device, GB/s one direction (KV offload)
    network_bw_gbps: float = 0.0      # inter-node bandwidth per GPU, GB/s one direction (IB/RoCE)
    network_latency_us: float = 0.0   # inter-node point-to-point latency


@dataclass
class ModelConf:
    name: str = "???"
    hf_id: str = ""
    hidden_size: int = "???"
    num_layers: int = "???"
    num_heads: int = "???"
    num_kv_heads: int = "???"
    head_dim: int = "???"
    ffn_size: int = "???"
    gated_mlp: bool = True
    norm: str = "rmsnorm"             # rmsnorm | layernorm
    activation: str = "silu"          # silu | gelu
    vocab_size: int = "???"
    rope: bool = True
    rotary_dim: int = 0               # 0 = whole head_dim
    rope_theta: float = 10000.0
    max_position: int = 4096
    dtype: str = "float16"
    # Storage precision of weights and KV cache ("" = dtype). fp8 weights: vLLM --quantization
    # fp8 (GEMMs priced from fp8 rows, weight memory halved); fp8 KV: --kv-cache-dtype fp8.
    weight_dtype: str = ""
    kv_dtype: str = ""
    num_experts: int = 0              # routed experts; 0 = dense MLP
    experts_per_token: int = 0        # top-k
    num_shared_experts: int = 0       # always-active experts (DeepSeek, Qwen2-MoE, Llama-4)
    moe_ffn_size: int = 0             # intermediate size of one expert; 0 = ffn_size
    first_dense_layers: int = 0       # leading dense layers before the MoE ones (DeepSeek)
    moe_layer_step: int = 1           # every k-th layer is MoE, the others dense (Llama-4 Maverick)
    # Multi-head latent attention (DeepSeek-V2/V3): kv_lora_rank > 0 turns it on; the KV cache
    # then holds kv_lora_rank + qk_rope_head_dim values per token and layer.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    parallel_block: bool = False      # attention and MLP read the same input (phi-2)
    # A Hugging Face config.json that replaces the fields above (no network needed).
    hf_config: Optional[str] = None


@dataclass
class ParallelConf:
    tp: int = 1
    pp: int = 1
    replicas: int = 1
    ep: int = 1                       # expert parallelism over the MoE layers (MoE models)
    dp_attention: bool = False        # attention data-parallel over the ep group (vLLM/SGLang DP attention)
    # MoE dispatch/combine under dp_attention: allgather_reducescatter (vLLM's default
    # --all2all-backend) | deepep (all-to-all of top-k token copies: vLLM deepep_*/pplx, SGLang
    # --moe-a2a-backend deepep). Meaning of every field: conf/shapes.py Layout.
    all2all_backend: str = "allgather_reducescatter"
    expert_imbalance: float = 1.0     # busiest EP rank's routed tokens / mean (1 = balanced)
    # token -> expert distribution the fused-MoE kernel is priced at: one of the distributions
    # aiconfigurator measures (balanced, power_law_1.01, power_law_1.2); its default, real
    # routers being skewed, is power_law_1.2 (ModelConfig.workload_distribution = "power_law")
    expert_routing: str = "power_law_1.2"


def check_model(model: ModelConf) -> None:
    """The MoE, MLA and storage-dtype fields of a model card make sense together (one line each)."""
    from conf import ConfigError

    def bad(msg: str) -> None:
        raise ConfigError(f"model {model.name}: {msg}")

    for field in ("weight_dtype", "kv_dtype"):
        value = getattr(model, field)
        if value and value not in DTYPE_BYTES:
            bad(f"{field}={value!r} is not one of {sorted(DTYPE_BYTES)} ('' = dtype {model.dtype})")
    for field in ("num_experts", "experts_per_token", "num_shared_experts", "moe_ffn_size",
                  "first_dense_layers", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                  "qk_nope_head_dim", "v_head_dim"):
        if getattr(model, field) < 0:
            bad(f"{field}={getattr(model, field)} must be >= 0")
    if model.num_experts:
        if not 1 <= model.experts_per_token <= model.num_experts:
            bad(f"experts_per_token={model.experts_per_token} must be between 1 and num_experts="
                f"{model.num_experts}")
        if not 0 <= model.first_dense_layers < model.num_layers:
            bad(f"first_dense_layers={model.first_dense_layers} must leave at least one of its "
                f"{model.num_layers} layers for experts")
        if model.moe_layer_step < 1:
            bad(f"moe_layer_step={model.moe_layer_step} must be >= 1 (1 = every layer after the dense ones)")
    elif model.experts_per_token or model.num_shared_experts or model.moe_ffn_size or model.first_dense_layers:
        bad("experts_per_token/num_shared_experts/moe_ffn_size/first_dense_layers need num_experts > 0")
    if model.kv_lora_rank:
        missing = [f for f in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim") if not getattr(model, f)]
        if missing:
            bad(f"MLA (kv_lora_rank={model.kv_lora_rank}) needs {', '.join(missing)} > 0")
    elif model.q_lora_rank:
        bad("q_lora_rank is an MLA field: set kv_lora_rank (and the MLA head dims) too")


def register() -> None:
    """Register the shared schemas; idempotent, call before composing."""
    from hydra.core.config_store import ConfigStore   # here: a cached composition needs no hydra
    cs = ConfigStore.instance()
    cs.store(group="hw", name="hw_schema", node=HwConf)
    cs.store(group="model", name="model_schema", node=ModelConf)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConf)
