"""What one GPU runs for one transformer layer at a tensor/pipeline/expert-parallel split.

This is the arithmetic of Megatron-style sharding, shared by the profiler (which shapes to
measure) and the simulator (which shapes to price). Token counts are runtime variables, so
GEMMs are given as (n, k) with m = tokens.

Sparse models: a mixture-of-experts (MoE) layer replaces the dense MLP by a router, routed
experts (``num_experts``, top-``experts_per_token``, width ``moe_ffn_size``) and optional shared
experts; ``first_dense_layers`` leading layers and, with ``moe_layer_step`` = k, all but every
k-th layer keep a dense MLP of width ``ffn_size``. Multi-head latent attention (MLA,
``kv_lora_rank`` > 0) caches ``kv_lora_rank + qk_rope_head_dim`` values per token and layer.
``Layout`` says how a deployment spreads attention (TP, or data-parallel ranks) and experts
(EP) over the GPUs of one pipeline stage, as vLLM and SGLang run them.
"""
from __future__ import annotations

from dataclasses import dataclass

from conf.schema import DTYPE_BYTES, ModelConf


@dataclass(frozen=True)
class Gemm:
    op: str          # qkv_proj | o_proj | gate_up_proj | up_proj | down_proj | lm_head | router | MLA projections
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


# --- model structure ------------------------------------------------------------------------
def is_moe(model: ModelConf) -> bool:
    return model.num_experts > 0


def is_mla(model: ModelConf) -> bool:
    return model.kv_lora_rank > 0


def expert_ffn(model: ModelConf) -> int:
    """Intermediate size of one routed (and one shared) expert."""
    return model.moe_ffn_size or model.ffn_size


def moe_layer_flags(model: ModelConf) -> list[bool]:
    """Which layers (0-based) have an MoE block: after ``first_dense_layers`` dense ones, every
    ``moe_layer_step``-th layer (Llama-4 Maverick: step 2 -> layers 1, 3, 5, ... as its HF
    ``moe_layers``; DeepSeek-V3: first 3 dense, then all; Mixtral/Qwen3-MoE: all)."""
    if not is_moe(model):
        return [False] * model.num_layers
    first, step = model.first_dense_layers, max(1, model.moe_layer_step)
    return [i >= first and (i - first + 1) % step == 0 for i in range(model.num_layers)]


def weight_dtype(model: ModelConf) -> str:
    return model.weight_dtype or model.dtype


def kv_dtype(model: ModelConf) -> str:
    return model.kv_dtype or model.dtype


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage; the first ``num_layers % pp`` stages take one more."""
    base, extra = divmod(num_layers, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def stage_mlp_mix(model: ModelConf, pp: int) -> list[tuple[int, int]]:
    """(dense-MLP layers, MoE layers) on each pipeline stage."""
    flags, out, start = moe_layer_flags(model), [], 0
    for n in stage_layers(model.num_layers, pp):
        moe = sum(flags[start:start + n])
        out.append((n - moe, moe))
        start += n
    return out


# --- parallel layout ------------------------------------------------------------------------
ALL2ALL_BACKENDS = ("allgather_reducescatter", "deepep")
# token -> expert distributions of the MoE tables (aiconfigurator: moe_<routing> rows)
EXPERT_ROUTINGS = ("power_law_1.2", "power_law_1.01", "balanced")


@dataclass(frozen=True)
class Layout:
    """GPUs of one replica, as vLLM (``-tp``, ``-dp``, ``--enable-expert-parallel``) and SGLang
    (``--tp --dp --enable-dp-attention --ep``) run MoE models.

    Without ``dp_attention`` a pipeline stage is ``tp`` GPUs running attention and dense layers
    tensor-parallel; the MoE layers spread their experts over ``ep`` of them (ep divides tp)
    and each expert tensor-parallel over the other ``tp / ep`` (ep = tp is vLLM's
    ``--enable-expert-parallel`` without DP, ep = 1 plain TP); tokens are the same on every
    GPU, so the MoE output is summed by the TP all-reduce that follows any MLP.
    With ``dp_attention`` a stage is ``ep`` GPUs: attention (and dense layers, shared experts,
    LM head) runs in ``dp = ep / tp`` data-parallel ranks of ``tp`` GPUs, each with its own
    requests and KV cache, and every MoE layer runs expert-parallel over all ``ep`` GPUs
    (vLLM ``-dp {dp} -tp {tp} --enable-expert-parallel``: EP = DP x TP), dispatching tokens
    to the experts' GPUs and combining them back: vLLM's default ``allgather_reducescatter``
    (all-gather of every rank's tokens, reduce-scatter of the outputs) or ``deepep``
    (all-to-all of each token's top-k copies: vLLM ``deepep_*``/``pplx``, SGLang
    ``--moe-a2a-backend deepep``). ``expert_imbalance`` is the busiest EP rank's routed tokens
    over the mean (1 = balanced); the slowest rank sets the step time. ``expert_routing`` is
    how tokens spread over the experts inside the fused-MoE kernel (``EXPERT_ROUTINGS``: the
    distributions aiconfigurator measures; a skewed one leaves some experts' GEMMs longer).
    """
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp_attention: bool = False
    all2all: str = "allgather_reducescatter"
    expert_imbalance: float = 1.0
    expert_routing: str = "power_law_1.2"

    @property
    def dp(self) -> int:
        """Attention data-parallel ranks per stage (each its own scheduler and KV cache)."""
        return self.ep // self.tp if self.dp_attention else 1

    @property
    def width(self) -> int:
        """GPUs of one pipeline stage."""
        return self.tp * self.dp

    @property
    def moe_tp(self) -> int:
        """Tensor parallelism inside each expert."""
        return self.width // self.ep

    @property
    def gpus(self) -> int:
        return self.width * self.pp

    @property
    def imbalance(self) -> float:
        """The busiest EP rank's share over the mean, capped at ep (all tokens on one rank)."""
        return min(max(self.expert_imbalance, 1.0), float(self.ep))

    def label(self) -> str:
        """Short text for tables and run names: tp8, ep8-dp8 (dp attention), tp4-ep4, pp2."""
        parts = [f"tp{self.tp}"] if not self.dp_attention else [f"dp{self.dp}xtp{self.tp}"]
        if self.ep > 1:
            parts.append(f"ep{self.ep}" + ("-a2a" if self.dp_attention and self.all2all == "deepep" else ""))
        if self.pp > 1:
            parts.append(f"pp{self.pp}")
        return " ".join(parts)


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


def layout(model: ModelConf, tp: int = 1, pp: int = 1, ep: int = 1, dp_attention: bool = False,
           all2all: str = "allgather_reducescatter", expert_imbalance: float = 1.0,
           expert_routing: str = "power_law_1.2") -> Layout:
    """The validated layout; a layout the engines cannot run ends with one line naming the rule."""
    from conf import ConfigError
    check_tp(model, tp)
    check_pp(model, pp)
    name = model.name
    if ep < 1:
        raise ConfigError(f"parallel.ep={ep} must be >= 1")
    if not is_moe(model):
        if ep > 1:
            raise ConfigError(f"parallel.ep={ep}: {name} is a dense model (no experts); expert "
                              f"parallelism needs a mixture-of-experts model")
        if dp_attention:
            raise ConfigError(f"parallel.dp_attention=true: {name} is a dense model; DP attention "
                              f"pairs data-parallel attention with expert-parallel MoE layers "
                              f"(use parallel.replicas to replicate a dense model)")
        return Layout(tp, pp)
    if model.num_experts % ep:
        ok = [e for e in range(1, model.num_experts + 1) if model.num_experts % e == 0]
        raise ConfigError(f"parallel.ep={ep} does not divide {name}'s {model.num_experts} routed "
                          f"experts; allowed ep: {ok}")
    if all2all not in ALL2ALL_BACKENDS:
        raise ConfigError(f"parallel.all2all_backend={all2all!r}; choose one of {list(ALL2ALL_BACKENDS)}")
    if expert_imbalance < 1:
        raise ConfigError(f"parallel.expert_imbalance={expert_imbalance}: the busiest EP rank's "
                          f"routed tokens over the mean is >= 1 (1 = balanced)")
    if expert_routing not in EXPERT_ROUTINGS:
        raise ConfigError(f"parallel.expert_routing={expert_routing!r}; choose one of {list(EXPERT_ROUTINGS)} "
                          f"(the token -> expert distributions the MoE tables measure)")
    if dp_attention:
        if ep % tp:
            raise ConfigError(f"parallel.dp_attention=true: attention runs in ep/tp data-parallel "
                              f"ranks of tp GPUs, so ep={ep} must be a multiple of tp={tp}")
        if pp > 1:
            raise ConfigError(f"parallel.dp_attention=true with pp={pp}: DP attention is modelled "
                              f"at pp=1 only (its ranks exchange tokens in every MoE layer; the "
                              f"vLLM and SGLang expert-parallel deployments do not pipeline it)")
    elif tp % ep:
        ok = [e for e in range(1, tp + 1) if tp % e == 0 and model.num_experts % e == 0]
        raise ConfigError(f"parallel.ep={ep} with tp={tp}: without dp_attention the experts spread "
                          f"over the tp GPUs of a stage, so ep must divide tp (allowed ep: {ok}); "
                          f"or set parallel.dp_attention=true")
    lay = Layout(tp, pp, ep, bool(dp_attention), all2all, float(expert_imbalance), str(expert_routing))
    if expert_ffn(model) % lay.moe_tp:
        raise ConfigError(f"{name}: expert intermediate size {expert_ffn(model)} is not divisible by "
                          f"the {lay.moe_tp}-way tensor parallelism inside each expert (tp/ep)")
    return lay


def layout_of(model: ModelConf, parallel) -> Layout:
    """The validated layout of a ``parallel`` config node (tp, pp, ep, dp_attention, ...)."""
    get = parallel.get if hasattr(parallel, "get") else lambda k, d=None: getattr(parallel, k, d)
    return layout(model, int(get("tp", 1)), int(get("pp", 1)), int(get("ep", 1) or 1),
                  bool(get("dp_attention", False)),
                  str(get("all2all_backend", "allgather_reducescatter")),
                  float(get("expert_imbalance", 1.0)), str(get("expert_routing", "power_law_1.2")))


def stages_cross_node(lay: Layout, devices_per_node: int) -> list[bool]:
    """For each pipeline stage but the last: does its hand-off to the next cross a node?

    A replica's GPUs are numbered stage-major from a node boundary (stage s holds GPUs
    s*width .. (s+1)*width-1), as launchers fill nodes."""
    dpn = max(1, devices_per_node)
    return [((s + 1) * lay.width - 1) // dpn != ((s + 1) * lay.width) // dpn for s in range(lay.pp - 1)]


# --- per-GPU shapes -------------------------------------------------------------------------
def heads_per_gpu(model: ModelConf, tp: int) -> tuple[int, int]:
    """(query heads, kv heads) on one GPU; KV heads are replicated when tp exceeds them. MLA
    caches one latent shared by all heads (vLLM replicates it on every TP rank): 1 KV head."""
    check_tp(model, tp)
    if is_mla(model):
        return model.num_heads // tp, 1
    return model.num_heads // tp, max(1, model.num_kv_heads // tp)


def mla_gemms(model: ModelConf, tp: int) -> list[Gemm]:
    """MLA projections on one GPU (vLLM DeepseekV2MLAAttention): q_a/kv_a replicated, the
    head-wise q_b/kv_b and o_proj split over tp. kv_b_proj runs on the KV tokens of a prefill
    (decode uses it absorbed into the query and output)."""
    nh = model.num_heads // tp
    h, qk = model.hidden_size, model.qk_nope_head_dim + model.qk_rope_head_dim
    q = ([Gemm("q_a_proj", model.q_lora_rank, h), Gemm("q_b_proj", nh * qk, model.q_lora_rank)]
         if model.q_lora_rank else [Gemm("q_proj", nh * qk, h)])
    return [*q, Gemm("kv_a_proj", model.kv_lora_rank + model.qk_rope_head_dim, h),
            Gemm("kv_b_proj", nh * (model.qk_nope_head_dim + model.v_head_dim), model.kv_lora_rank),
            Gemm("o_proj", h, nh * model.v_head_dim)]


def attention_gemms(model: ModelConf, tp: int) -> list[Gemm]:
    if is_mla(model):
        return mla_gemms(model, tp)
    nq, nkv = heads_per_gpu(model, tp)
    d, h = model.head_dim, model.hidden_size
    return [Gemm("qkv_proj", (nq + 2 * nkv) * d, h), Gemm("o_proj", h, nq * d)]


def mlp_gemms(model: ModelConf, tp: int, ffn: int | None = None) -> list[Gemm]:
    """A dense (gated) MLP of width ``ffn`` (default ``ffn_size``) split over tp."""
    h, f = model.hidden_size, (ffn or model.ffn_size) // tp
    up = [Gemm("gate_up_proj", 2 * f, h)] if model.gated_mlp else [Gemm("up_proj", f, h)]
    return [*up, Gemm("down_proj", h, f)]


def layer_gemms(model: ModelConf, tp: int) -> list[Gemm]:
    """Attention projections and the dense MLP (an MoE model's dense layers) of one layer."""
    return attention_gemms(model, tp) + mlp_gemms(model, tp)


def shared_expert_ffn(model: ModelConf) -> int:
    """Total intermediate width of the shared experts (run as one dense MLP, as vLLM does)."""
    return model.num_shared_experts * expert_ffn(model)


def moe_block_gemms(model: ModelConf, tp: int) -> list[Gemm]:
    """The GEMMs of an MoE block outside the fused experts kernel: the router (replicated) and
    the shared experts, split over the attention tp (they run with the dense part)."""
    out = [Gemm("router", model.num_experts, model.hidden_size)]
    if model.num_shared_experts:
        out += mlp_gemms(model, tp, shared_expert_ffn(model))
    return out


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
        rot = model.qk_rope_head_dim if is_mla(model) else (model.rotary_dim or model.head_dim)
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


@dataclass(frozen=True)
class Collective:
    op: str              # all_reduce | all_gather | reduce_scatter | all_to_all (profiler/tables.py names)
    size_bytes: float    # NCCL message size (nccl-tests convention: the whole buffer of a rank)
    world_size: int


def moe_block_collectives(model: ModelConf, lay: Layout, num_tokens) -> list[Collective]:
    """The communication of one MoE block when ``num_tokens`` tokens sit on each attention
    rank (hand-computed sizes: tests/test_moe.py).

    Without dp_attention the tokens are already on every GPU of the stage: each computes its
    experts' share and one all-reduce over the stage sums them (as after a dense MLP).
    With dp_attention, vLLM's default ``allgather_reducescatter`` all-gathers every DP rank's
    tokens over the dp ranks and reduce-scatters the outputs (both buffers dp x tokens x
    hidden), then all-reduces over the rank's tp GPUs; ``deepep`` sends each token once per
    selected expert to the experts' GPUs and back (all-to-all over ep, tokens x top-k x hidden,
    the rank's tokens split over its tp GPUs, the busiest GPU moving ``imbalance`` x the mean)
    and all-gathers the split back over tp. ``num_tokens`` may be an array (sizes follow it)."""
    b = activation_bytes_per_token(model)
    n_b = num_tokens * b
    out: list[Collective] = []
    if not lay.dp_attention or (lay.dp == 1 and lay.all2all != "deepep"):
        return [Collective("all_reduce", n_b, lay.width)] if lay.width > 1 else []
    if lay.all2all == "deepep":
        size = num_tokens / lay.tp * model.experts_per_token * b * lay.imbalance
        out += [Collective("all_to_all", size, lay.ep), Collective("all_to_all", size, lay.ep)]
        if lay.tp > 1:
            out.append(Collective("all_gather", n_b, lay.tp))
        return out
    out += [Collective("all_gather", lay.dp * n_b, lay.dp), Collective("reduce_scatter", lay.dp * n_b, lay.dp)]
    if lay.tp > 1:
        out.append(Collective("all_reduce", n_b, lay.tp))
    return out


def kv_bytes_per_token_per_layer(model: ModelConf, tp: int) -> int:
    """KV-cache bytes of one token in one layer on one GPU: K and V of its KV heads, or MLA's
    compressed latent plus the decoupled RoPE key (not split by tp)."""
    b = DTYPE_BYTES[kv_dtype(model)]
    if is_mla(model):
        return (model.kv_lora_rank + model.qk_rope_head_dim) * b
    _, nkv = heads_per_gpu(model, tp)
    return 2 * nkv * model.head_dim * b


def kv_bytes_per_token(model: ModelConf, tp: int, pp: int = 1) -> int:
    """KV-cache bytes one token occupies on one GPU of a (tp, pp) replica (largest stage)."""
    layers = -(-model.num_layers // pp)
    return kv_bytes_per_token_per_layer(model, tp) * layers


# --- parameters and weight memory ----------------------------------------------------------
def _attention_params(model: ModelConf) -> tuple[int, int]:
    """(linear weights split over tp, weights replicated on every TP rank) of one attention."""
    h = model.hidden_size
    if is_mla(model):
        nh, qk = model.num_heads, model.qk_nope_head_dim + model.qk_rope_head_dim
        kv_a = h * (model.kv_lora_rank + model.qk_rope_head_dim)
        q_a = h * model.q_lora_rank
        q_b = (model.q_lora_rank or h) * nh * qk
        kv_b = model.kv_lora_rank * nh * (model.qk_nope_head_dim + model.v_head_dim)
        o = nh * model.v_head_dim * h
        norms = model.q_lora_rank + model.kv_lora_rank          # q_a / kv_a layernorms
        return q_b + kv_b + o, q_a + kv_a + norms
    d = model.head_dim
    return h * (model.num_heads + 2 * model.num_kv_heads) * d + model.num_heads * d * h, 0


def _mlp_params(model: ModelConf, ffn: int) -> int:
    return (3 if model.gated_mlp else 2) * model.hidden_size * ffn


def layer_params(model: ModelConf, moe: bool) -> int:
    """Parameters of one dense or MoE layer (all experts), norms included."""
    split, rep = _attention_params(model)
    h = model.hidden_size
    if moe:
        mlp = (model.num_experts * _mlp_params(model, expert_ffn(model))
               + _mlp_params(model, shared_expert_ffn(model)) + h * model.num_experts)
    else:
        mlp = _mlp_params(model, model.ffn_size)
    return split + rep + mlp + 2 * h


def params_per_layer(model: ModelConf) -> int:
    """Mean parameters of a layer (equal to every layer's in a dense model)."""
    flags = moe_layer_flags(model)
    return sum(layer_params(model, f) for f in flags) // model.num_layers


def num_params(model: ModelConf) -> int:
    """All parameters: every layer (every expert), embedding and an untied LM head."""
    return sum(layer_params(model, f) for f in moe_layer_flags(model)) + 2 * model.vocab_size * model.hidden_size


def active_params_per_token(model: ModelConf) -> int:
    """Parameters one token multiplies in the layers (not the embedding/LM head): attention,
    dense MLPs, the router, the shared and its top-k routed experts."""
    split, rep = _attention_params(model)
    h, total = model.hidden_size, 0
    for moe in moe_layer_flags(model):
        total += split + rep + 2 * h
        if moe:
            total += (_mlp_params(model, expert_ffn(model)) * model.experts_per_token
                      + _mlp_params(model, shared_expert_ffn(model)) + h * model.num_experts)
        else:
            total += _mlp_params(model, model.ffn_size)
    return total


def padded_vocab(model: ModelConf) -> int:
    """vLLM pads the vocabulary of its embedding and LM head to a multiple of 64."""
    return -(-model.vocab_size // 64) * 64


def _layer_weight_bytes(model: ModelConf, lay: Layout, moe: bool) -> int:
    """Bytes of one layer on one GPU: linear weights in weight_dtype (fp8: vLLM
    ``--quantization fp8``), norms and the router in the model dtype (vLLM leaves them
    unquantised; fp8 block scales, 1/16384 of the weights, are not counted)."""
    wb, b = DTYPE_BYTES[weight_dtype(model)], DTYPE_BYTES[model.dtype]
    h, tp = model.hidden_size, lay.tp
    if is_mla(model):
        split, rep = _attention_params(model)
        norms = model.q_lora_rank + model.kv_lora_rank
        attn = split // tp * wb + (rep - norms) * wb + norms * b
    else:
        nq, nkv = heads_per_gpu(model, tp)
        d = model.head_dim
        attn = (h * (nq + 2 * nkv) * d + nq * d * h) * wb
    if moe:
        experts = model.num_experts // lay.ep * _mlp_params(model, expert_ffn(model)) // lay.moe_tp
        mlp = (experts + _mlp_params(model, shared_expert_ffn(model)) // tp) * wb + h * model.num_experts * b
    else:
        mlp = _mlp_params(model, model.ffn_size) // tp * wb
    return attn + mlp + 2 * h * b


def stage_weight_bytes(model: ModelConf, lay: Layout) -> list[int]:
    """Weight bytes on one GPU of each pipeline stage (embedding on the first, LM head and
    final norm on the last), split over tp (attention, dense parts), ep and tp/ep (experts)."""
    b = DTYPE_BYTES[model.dtype]
    emb = padded_vocab(model) // lay.tp * model.hidden_size * b
    dense_b, moe_b = (_layer_weight_bytes(model, lay, m) for m in (False, True))
    out = []
    for s, (dense, moe) in enumerate(stage_mlp_mix(model, lay.pp)):
        w = dense * dense_b + (moe * moe_b if moe else 0)
        if s == 0:
            w += emb
        if s == lay.pp - 1:
            w += emb + model.hidden_size * b
        out.append(w)
    return out


def weight_bytes_per_gpu(model: ModelConf, tp: int, pp: int = 1, lay: Layout | None = None) -> int:
    """Weights on the most loaded GPU of a replica."""
    lay = lay or layout(model, tp, pp)
    return max(stage_weight_bytes(model, lay))
