"""What one GPU runs for one transformer layer at a tensor/pipeline-parallel split.

This is the arithmetic of Megatron-style sharding, shared by the profiler (which shapes to
measure) and the simulator (which shapes to price). Token counts are runtime variables, so
GEMMs are given as (n, k) with m = tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from conf.schema import DTYPE_BYTES, ModelConf


@dataclass(frozen=True)
class Gemm:
    op: str          # qkv_proj | o_proj | gate_up_proj | up_proj | down_proj | lm_head
    n: int
    k: int


@dataclass(frozen=True)
class Elementwise:
    op: str          # rmsnorm | layernorm | silu_mul | gelu | rope | add | embedding |
                     # fused_add_rmsnorm | kv_cache_write | sampler (COORDINATION.md names)
    width: int       # elements per token that the op reads (per GPU)
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    per_layer: int = 1   # how many times one layer runs it


def allowed_tp(model: ModelConf) -> list[int]:
    """The TP degrees (powers of two up to 64) that split ``model``'s attention heads evenly."""
    return [t for t in (1, 2, 4, 8, 16, 32, 64) if model.num_heads % t == 0]


def check_tp(model: ModelConf, tp: int, setting: str = "tp") -> None:
    from conf import ConfigError
    if tp < 1 or model.num_heads % tp:
        raise ConfigError(f"{setting}={tp} does not divide {model.name}'s {model.num_heads} attention heads; "
                          f"allowed tp: {allowed_tp(model)}")


def check_pp(model: ModelConf, pp: int) -> None:
    from conf import ConfigError
    if pp < 1 or pp > model.num_layers:
        raise ConfigError(f"pp={pp} must be between 1 and {model.name}'s {model.num_layers} layers")


def heads_per_gpu(model: ModelConf, tp: int) -> tuple[int, int]:
    """(query heads, kv heads) on one GPU; KV heads are replicated when tp exceeds them."""
    check_tp(model, tp)
    return model.num_heads // tp, max(1, model.num_kv_heads // tp)


def layer_gemms(model: ModelConf, tp: int) -> list[Gemm]:
    nq, nkv = heads_per_gpu(model, tp)
    d, h = model.head_dim, model.hidden_size
    ffn = model.ffn_size // tp
    up = [Gemm("gate_up_proj", 2 * ffn, h)] if model.gated_mlp else [Gemm("up_proj", ffn, h)]
    return [Gemm("qkv_proj", (nq + 2 * nkv) * d, h), Gemm("o_proj", h, nq * d), *up,
            Gemm("down_proj", h, ffn)]


def lm_head_gemm(model: ModelConf, tp: int) -> Gemm:
    return Gemm("lm_head", -(-model.vocab_size // tp), model.hidden_size)


def layer_elementwise(model: ModelConf, tp: int) -> list[Elementwise]:
    nq, nkv = heads_per_gpu(model, tp)
    h, ffn = model.hidden_size, model.ffn_size // tp
    norms = 1 if model.parallel_block else 2
    act = Elementwise("silu_mul", ffn) if model.activation == "silu" and model.gated_mlp else \
        Elementwise(model.activation if not model.gated_mlp else "silu_mul", ffn)
    ops = [Elementwise(model.norm, h, per_layer=norms), act, Elementwise("add", h, per_layer=2)]
    if model.rope:
        rot = model.rotary_dim or model.head_dim
        ops.append(Elementwise("rope", (nq + nkv) * rot, nq, nkv, model.head_dim))
    return ops


def engine_layer_elementwise(model: ModelConf, tp: int) -> list[Elementwise]:
    """The elementwise ops vLLM runs per layer: ``layer_elementwise`` with RMSNorm models' norm +
    residual add fused into ``fused_add_rmsnorm`` (vLLM's fused_add_rms_norm kernel, width =
    hidden), plus the KV-cache write of the layer's new tokens (reshape_and_cache_flash: K and V
    of the GPU's KV heads). LayerNorm models keep a separate norm and add (vLLM fuses only RMSNorm)."""
    _, nkv = heads_per_gpu(model, tp)
    ops = layer_elementwise(model, tp)
    if model.norm == "rmsnorm":
        norms = sum(e.per_layer for e in ops if e.op == "rmsnorm")
        ops = [e for e in ops if e.op not in ("rmsnorm", "add")]
        ops.insert(0, Elementwise("fused_add_rmsnorm", model.hidden_size, per_layer=norms))
    return ops + [Elementwise("kv_cache_write", 2 * nkv * model.head_dim, 0, nkv, model.head_dim)]


def allreduces_per_layer(model: ModelConf, tp: int) -> int:
    """All-reduces vLLM issues per layer at tp > 1: one after the attention output projection
    and one after the MLP down projection (RowParallelLinear with reduce_results). vLLM keeps
    both in parallel-block models too (phi-2: the dense and fc2 projections each reduce) and in
    MoE layers (the fused MoE output is reduced once, like the dense MLP)."""
    return 0 if tp == 1 else 2


def allreduces_per_forward(model: ModelConf, tp: int) -> int:
    """All-reduces outside the layers at tp > 1: the vocabulary-parallel embedding sums its
    shards' lookups once per forward (VocabParallelEmbedding)."""
    return 0 if tp == 1 else 1


def activation_bytes_per_token(model: ModelConf) -> int:
    """Bytes of one token's hidden state: the all-reduce and PP send/recv payload per token."""
    return model.hidden_size * DTYPE_BYTES[model.dtype]


def kv_bytes_per_token(model: ModelConf, tp: int, pp: int = 1) -> int:
    """KV-cache bytes one token occupies on one GPU of a (tp, pp) replica."""
    _, nkv = heads_per_gpu(model, tp)
    layers = -(-model.num_layers // pp)
    return 2 * nkv * model.head_dim * DTYPE_BYTES[model.dtype] * layers


def params_per_layer(model: ModelConf) -> int:
    h, d = model.hidden_size, model.head_dim
    attn = h * (model.num_heads + 2 * model.num_kv_heads) * d + model.num_heads * d * h
    mlp = (3 if model.gated_mlp else 2) * h * model.ffn_size
    if model.num_experts:
        mlp = mlp * model.num_experts + h * model.num_experts
    return attn + mlp + 2 * h


def weight_bytes_per_gpu(model: ModelConf, tp: int, pp: int = 1) -> int:
    """Weights on the most loaded GPU: its layers' shard plus embedding/LM head on end stages."""
    check_tp(model, tp)
    check_pp(model, pp)
    b = DTYPE_BYTES[model.dtype]
    layers = -(-model.num_layers // pp)
    emb = model.vocab_size * model.hidden_size * b // tp
    return layers * params_per_layer(model) * b // tp + (2 * emb if pp == 1 else emb)


def num_params(model: ModelConf) -> int:
    return model.num_layers * params_per_layer(model) + 2 * model.vocab_size * model.hidden_size
