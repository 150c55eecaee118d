"""How many paged KV-cache blocks one replica has, or why the model does not fit.

Per GPU: ``mem_gib * gpu_memory_utilization`` minus the weights of its shard
(``conf.shapes.weight_bytes_per_gpu``), minus the activation peak of one full batch, minus a
reserved allowance; what is left, divided by the KV bytes of one block of its layers, is the
block count. Like vLLM, a replica must hold at least one ``max_model_len`` sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

from conf import ConfigError, shapes
from conf.schema import DTYPE_BYTES, HwConf, ModelConf

GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryPlan:
    fits: bool
    num_blocks: int               # KV blocks per replica (0 when it does not fit)
    block_size: int               # tokens per block
    kv_bytes_per_block: int       # on the most loaded GPU
    weight_bytes: int             # per GPU
    activation_bytes: int         # per GPU, peak of one batch
    usable_bytes: int             # per GPU, mem * utilisation - reserved
    reason: str = ""              # why it does not fit ("" when it fits)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def activation_peak_bytes(model: ModelConf, tp: int, max_tokens_per_batch: int,
                          max_num_seqs: int) -> int:
    """Largest live activations of one forward pass: the widest per-token tensors of a layer
    (hidden in/out, QKV, gated-MLP intermediate) for every token of a full batch, plus fp32
    logits of the sampled sequences."""
    nq, nkv = shapes.heads_per_gpu(model, tp)
    b = DTYPE_BYTES[model.dtype]
    per_token = (2 * model.hidden_size + (nq + 2 * nkv) * model.head_dim
                 + (2 if model.gated_mlp else 1) * model.ffn_size // tp) * b
    logits = max_num_seqs * (-(-model.vocab_size // tp)) * 4
    return max_tokens_per_batch * per_token + logits


def memory_plan(hw: HwConf, model: ModelConf, tp: int = 1, pp: int = 1, *, block_size: int = 16,
                gpu_memory_utilization: float = 0.9, reserved_gib: float = 1.0,
                max_tokens_per_batch: int = 4096, max_num_seqs: int = 128,
                max_model_len: int | None = None) -> MemoryPlan:
    """KV capacity of one (tp, pp) replica; ``fits`` False with a one-line ``reason`` otherwise."""
    shapes.check_tp(model, tp)
    shapes.check_pp(model, pp)
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be >= 1")
    max_model_len = max_model_len or model.max_position
    weights = shapes.weight_bytes_per_gpu(model, tp, pp)
    act = activation_peak_bytes(model, tp, max_tokens_per_batch, max_num_seqs)
    usable = int(hw.mem_gib * GIB * gpu_memory_utilization - reserved_gib * GIB)
    kv_block = shapes.kv_bytes_per_token(model, tp, pp) * block_size
    free = usable - weights - act
    blocks = max(0, free // kv_block)
    where = f"{model.name} does not fit on {hw.name} at tp={tp} pp={pp}"
    if free <= 0:
        reason = (f"{where}: weights {weights / GIB:.1f} GiB + activations {act / GIB:.1f} GiB per GPU "
                  f"exceed {usable / GIB:.1f} GiB usable ({hw.mem_gib} GiB x {gpu_memory_utilization} "
                  f"- {reserved_gib} GiB reserved)")
        return MemoryPlan(False, 0, block_size, kv_block, weights, act, usable, reason)
    if blocks * block_size < max_model_len:
        reason = (f"{where}: KV cache holds {blocks * block_size} tokens, less than one "
                  f"{max_model_len}-token sequence")
        return MemoryPlan(False, 0, block_size, kv_block, weights, act, usable, reason)
    return MemoryPlan(True, int(blocks), block_size, kv_block, weights, act, usable)
