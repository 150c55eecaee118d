"""How many paged KV-cache blocks one replica has, or why the model does not fit.

KV capacity as vLLM computes it (vllm/v1/worker/gpu_worker.py ``determine_available_memory``
with ``vllm/utils/mem_utils.py memory_profiling``): the memory the engine may use,
``total x gpu_memory_utilization``, minus what is not KV cache: the weights of its shard
(``model_memory_usage``), the peak activation of its profile run (``profile_run``: one forward
over ``max_num_batched_tokens`` tokens, then the sampler over ``max_num_seqs`` rows), the
memory outside torch that the run adds (NCCL and custom all-reduce buffers) and, from vLLM
0.21 on (``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS``, on by default there), its estimate of
the CUDA-graph pool; earlier versions capture graphs after sizing the KV cache, in the
1 - utilisation headroom. What is left, over the KV bytes of one block of the stage's layers,
is the block count. Like vLLM, a replica must hold one ``max_model_len`` sequence.

Assumptions (stated where used below): the device total is the card's ``mem_gib`` (torch
reports ~1% less on H100/A100 80GB, e.g. 79.2 GiB); NCCL buffers are aiconfigurator's observed
footprint per communicator size; activation tensors are the widest ones a layer keeps alive
at once; CUDA-graph memory is an input (``sim.cuda_graph_gib``, 0 = graphs outside the KV
budget as in vLLM <= 0.20), since no public measurement of it per model and GPU exists here.
"""
from __future__ import annotations

from dataclasses import dataclass

from conf import ConfigError, shapes
from conf.schema import DTYPE_BYTES, HwConf, ModelConf

GIB = 1024 ** 3

# NCCL (+ vLLM custom all-reduce) memory by the size of a GPU's largest communicator:
# aiconfigurator systems/{h100_sxm,b200_sxm,...}.yaml misc.nccl_mem (commit 095f58a, Apache-2.0;
# "nonofficial correction based on observations"), identical for every GPU there. Beyond 8
# GPUs the 8-GPU value is used (no larger observation).
NCCL_BYTES = {1: 0, 2: 358612992, 4: 411041792, 8: 411041792}

# vLLM's fused MoE processes at most this many tokens per call (VLLM_FUSED_MOE_CHUNK_SIZE,
# 16 * 1024 in vLLM >= 0.11, 32768 before), so its workspace stops growing there.
FUSED_MOE_CHUNK_TOKENS = 16 * 1024


@dataclass(frozen=True)
class MemoryPlan:
    fits: bool
    num_blocks: int               # KV blocks per replica (per DP-attention rank) (0 when it does not fit)
    block_size: int               # tokens per block
    kv_bytes_per_block: int       # on the most loaded GPU
    weight_bytes: int             # per GPU
    activation_bytes: int         # per GPU, peak of the profile run
    usable_bytes: int             # per GPU, mem * utilisation - reserved
    reason: str = ""              # why it does not fit ("" when it fits)
    nccl_bytes: int = 0           # per GPU, communication buffers counted against the budget
    cuda_graph_bytes: int = 0     # per GPU, CUDA-graph pool counted against the budget

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def nccl_buffer_bytes(world: int) -> int:
    """NCCL buffers of a GPU whose largest communicator has ``world`` ranks (NCCL_BYTES)."""
    if world <= 1:
        return 0
    sizes = sorted(NCCL_BYTES)
    return NCCL_BYTES[max(s for s in sizes if s <= world)]


def _as_layout(model: ModelConf, tp_or_layout) -> shapes.Layout:
    return tp_or_layout if isinstance(tp_or_layout, shapes.Layout) else shapes.layout(model, int(tp_or_layout))


def activation_peak_bytes(model: ModelConf, tp_or_layout, max_tokens_per_batch: int,
                          max_num_seqs: int) -> int:
    """Peak activation of vLLM's profile run on one GPU.

    The forward over ``max_tokens_per_batch`` tokens keeps, per token, the residual and hidden
    state, the attention projections' output (QKV; MLA prefill: expanded K/V and the query) and
    the dense MLP's gate/up output; an MoE layer adds fused-MoE's workspace (per routed copy:
    gate/up, activation and down outputs) over the tokens it sees (all DP ranks' under DP
    attention, at most FUSED_MOE_CHUNK_TOKENS per call). The sampler holds the logits of
    ``max_num_seqs`` sequences gathered to the full vocabulary (vLLM all-gathers them over
    tp) in the model dtype and in fp32, plus fp32 probabilities."""
    lay = _as_layout(model, tp_or_layout)
    nq, nkv = shapes.heads_per_gpu(model, lay.tp)
    b = DTYPE_BYTES[model.dtype]
    if shapes.is_mla(model):
        qk = model.qk_nope_head_dim + model.qk_rope_head_dim
        attn = nq * (2 * qk + model.v_head_dim)
    else:
        attn = (nq + 2 * nkv) * model.head_dim
    flags = shapes.moe_layer_flags(model)
    mlp = (2 if model.gated_mlp else 1) * model.ffn_size // lay.tp if not all(flags) else 0
    if shapes.is_moe(model):
        mlp = max(mlp, 2 * shapes.shared_expert_ffn(model) // lay.tp)
    forward = max_tokens_per_batch * (2 * model.hidden_size + attn + mlp) * b
    if shapes.is_moe(model):
        seen = min(max_tokens_per_batch * lay.dp, FUSED_MOE_CHUNK_TOKENS)
        per_copy = 3 * shapes.expert_ffn(model) // lay.moe_tp + model.hidden_size
        forward += seen * model.experts_per_token * per_copy * b
    logits = min(max_num_seqs, max_tokens_per_batch) * model.vocab_size * (b + 8)
    return forward + logits


def memory_plan(hw: HwConf, model: ModelConf, tp: int = 1, pp: int = 1, *, block_size: int = 16,
                gpu_memory_utilization: float = 0.9, reserved_gib: float = 0.0,
                max_tokens_per_batch: int = 4096, max_num_seqs: int = 128,
                max_model_len: int | None = None, layout: shapes.Layout | None = None,
                cuda_graph_gib: float = 0.0) -> MemoryPlan:
    """KV capacity of one (tp, pp) replica, or of one DP-attention rank of ``layout``; ``fits``
    False with a one-line ``reason`` otherwise. ``reserved_gib``: any further allowance."""
    lay = layout or shapes.layout(model, tp, pp)
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be >= 1")
    if reserved_gib < 0 or cuda_graph_gib < 0:
        raise ConfigError("sim.reserved_gib and sim.cuda_graph_gib must be >= 0")
    max_model_len = max_model_len or model.max_position
    weights = shapes.weight_bytes_per_gpu(model, lay.tp, lay.pp, lay)
    act = activation_peak_bytes(model, lay, max_tokens_per_batch, max_num_seqs)
    nccl = nccl_buffer_bytes(max(lay.width, 2 if lay.pp > 1 else 1))
    graphs = int(cuda_graph_gib * GIB)
    usable = int(hw.mem_gib * GIB * gpu_memory_utilization - reserved_gib * GIB)
    kv_block = shapes.kv_bytes_per_token(model, lay.tp, lay.pp) * block_size
    free = usable - weights - act - nccl - graphs
    blocks = max(0, free // kv_block)
    where = f"{model.name} does not fit on {hw.name} at {lay.label()}" if lay.ep > 1 or lay.dp_attention \
        else f"{model.name} does not fit on {hw.name} at tp={lay.tp} pp={lay.pp}"
    extra = dict(nccl_bytes=nccl, cuda_graph_bytes=graphs)
    if free <= 0:
        reason = (f"{where}: weights {weights / GIB:.1f} GiB + activations {act / GIB:.1f} GiB + NCCL "
                  f"{nccl / GIB:.2f} GiB + CUDA graphs {graphs / GIB:.2f} GiB per GPU exceed {usable / GIB:.1f} "
                  f"GiB usable ({hw.mem_gib} GiB x {gpu_memory_utilization} - {reserved_gib} GiB reserved)")
        return MemoryPlan(False, 0, block_size, kv_block, weights, act, usable, reason, **extra)
    if blocks * block_size < max_model_len:
        reason = (f"{where}: KV cache holds {blocks * block_size} tokens, less than one "
                  f"{max_model_len}-token sequence")
        return MemoryPlan(False, 0, block_size, kv_block, weights, act, usable, reason, **extra)
    return MemoryPlan(True, int(blocks), block_size, kv_block, weights, act, usable, **extra)
