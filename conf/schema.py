"""Structured configs shared by every job: hardware, model and parallelism.

YAML files in conf/hw and conf/model hold the data; these dataclasses give their types so
that a typo (``model.hiden=1``) or a wrong type fails at composition, not deep in a run.
Each job adds its own groups (profiler, sim, ...) in its own package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore

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
    num_experts: int = 0              # 0 = dense MLP
    experts_per_token: int = 0
    parallel_block: bool = False      # attention and MLP read the same input (phi-2)
    # A Hugging Face config.json that replaces the fields above (no network needed).
    hf_config: Optional[str] = None


@dataclass
class ParallelConf:
    tp: int = 1
    pp: int = 1
    replicas: int = 1


def register() -> None:
    """Register the shared schemas; idempotent, call before composing."""
    cs = ConfigStore.instance()
    cs.store(group="hw", name="hw_schema", node=HwConf)
    cs.store(group="model", name="model_schema", node=ModelConf)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConf)
