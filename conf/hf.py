"""Read a Hugging Face ``config.json`` into a ModelConf, offline.

Dense decoders (Llama, Mistral, Qwen, Phi, GPT), mixture-of-experts (Mixtral, Qwen2/3-MoE,
DeepSeek-V2/V3/R1, Llama-4 with its ``text_config``) and multi-head latent attention (DeepSeek).
Field names differ per family; each is mapped below with the family that uses it. What is not
modelled: Llama-4's chunked local attention (its KV is counted on every layer, as for global
attention), DeepSeek's multi-token-prediction layer, routing groups (n_group/topk_group).
"""
from __future__ import annotations

import json
from pathlib import Path

from conf.schema import ModelConf

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu",
                "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu"}
_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _first(c: dict, *keys, default=0):
    """The first key of ``keys`` present (and not null) in c."""
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    return default


def _moe_fields(c: dict, p: Path, num_layers: int) -> dict:
    """MoE fields: experts, top-k, shared experts, expert width and which layers are sparse."""
    from conf import ConfigError

    experts = int(_first(c, "num_local_experts", "n_routed_experts", "num_experts"))   # Mixtral/Llama-4, DeepSeek, Qwen
    if not experts:
        return {}
    llama4 = "llama4" in str(c.get("model_type", ""))
    out = dict(num_experts=experts, experts_per_token=int(_first(c, "num_experts_per_tok", "moe_topk")))
    if llama4:   # intermediate_size is the expert's, intermediate_size_mlp the dense layers'; one shared expert
        out.update(ffn_size=int(c.get("intermediate_size_mlp") or c["intermediate_size"]),
                   moe_ffn_size=int(c["intermediate_size"]), num_shared_experts=1,
                   moe_layer_step=int(c.get("interleave_moe_layer_step") or 1))
        return out
    moe_ffn = int(_first(c, "moe_intermediate_size"))
    out["moe_ffn_size"] = moe_ffn                  # 0 (Mixtral): the experts are intermediate_size wide
    shared = int(_first(c, "n_shared_experts"))     # DeepSeek
    if not shared and c.get("shared_expert_intermediate_size"):    # Qwen2-MoE: one wide shared expert
        shared = max(1, round(int(c["shared_expert_intermediate_size"]) / (moe_ffn or 1)))
    out["num_shared_experts"] = shared
    first = int(_first(c, "first_k_dense_replace"))                 # DeepSeek
    dense_list = sorted(int(i) for i in c.get("mlp_only_layers") or [])   # Qwen2/3-MoE
    if dense_list:
        if dense_list != list(range(len(dense_list))):
            raise ConfigError(f"model.hf_config: {p} has mlp_only_layers={dense_list}; only leading "
                              f"dense layers are modelled (first_dense_layers)")
        first = max(first, len(dense_list))
    out["first_dense_layers"] = min(first, num_layers - 1)
    out["moe_layer_step"] = int(_first(c, "decoder_sparse_step", "moe_layer_freq", default=1)) or 1
    return out


def _mla_fields(c: dict) -> dict:
    """DeepSeek-V2/V3 multi-head latent attention (q_lora_rank is null in V2-Lite)."""
    if not c.get("kv_lora_rank"):
        return {}
    nope, rope = int(c["qk_nope_head_dim"]), int(c["qk_rope_head_dim"])
    return dict(kv_lora_rank=int(c["kv_lora_rank"]), q_lora_rank=int(c.get("q_lora_rank") or 0),
                qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=int(c["v_head_dim"]),
                head_dim=nope + rope, num_kv_heads=int(c["num_attention_heads"]), rotary_dim=0)


def _weight_dtype(c: dict, p: Path) -> str:
    """fp8 for checkpoints shipped in FP8 (DeepSeek-V3/R1 block-wise e4m3), which vLLM serves in
    fp8; other quantisation formats are not modelled."""
    from conf import ConfigError

    q = c.get("quantization_config")
    if not q:
        return ""
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8":
        return "fp8"
    raise ConfigError(f"model.hf_config: {p} is quantised with quant_method={method!r}; opcast models "
                      f"16-bit and fp8 weights (model.weight_dtype) only")


def hf_model_name(config: dict, path: Path) -> str:
    """A name for the model of a config.json: its ``_name_or_path`` (last part, so it is one
    path component), else the file's stem (``mistral7b.json``), else its folder
    (``Mistral-7B/config.json``)."""
    for name in (str(config.get("_name_or_path") or "").rstrip("/").rpartition("/")[2],
                 "" if path.stem == "config" else path.stem, path.resolve().parent.name):
        if name:
            return name
    return "hf-model"


def model_from_hf_config(path: str | Path) -> ModelConf:
    from conf import ConfigError, validate_model

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"model.hf_config: no such file {str(p)!r} (give a Hugging Face config.json path)")
    try:
        top = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model.hf_config: {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    # Multimodal wrappers (Llama-4) keep the language model under text_config.
    c = {**top, **top["text_config"]} if isinstance(top.get("text_config"), dict) and "hidden_size" not in top \
        else top
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in c]
    if missing:
        raise ConfigError(f"model.hf_config: {p} lacks {', '.join(missing)}; is it a decoder LLM config.json?")
    heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    layers = int(c["num_hidden_layers"])
    head_dim = int(c.get("head_dim") or hidden // heads)
    act = str(c.get("hidden_act", c.get("activation_function", "silu")))
    arch = " ".join(top.get("architectures", [])).lower()
    layernorm = "phi" in arch and "phi3" not in arch or "gpt" in arch and "oss" not in arch
    rotary_dim = int(c.get("partial_rotary_factor", 1.0) * head_dim) if "partial_rotary_factor" in c else 0
    fields = dict(
        name=hf_model_name(top, p),
        hf_id=str(top.get("_name_or_path", "")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_size=int(c.get("intermediate_size") or c.get("n_inner") or 4 * hidden),
        gated_mlp=not layernorm,
        norm="layernorm" if layernorm else "rmsnorm",
        activation=_ACTIVATIONS.get(act, "silu" if "silu" in act else "gelu"),
        vocab_size=int(c["vocab_size"]),
        rope=True,
        rotary_dim=0 if rotary_dim in (0, head_dim) else rotary_dim,
        rope_theta=float(c.get("rope_theta", 10000.0)),
        max_position=int(c.get("max_position_embeddings", 4096)),
        dtype=_DTYPES.get(str(c.get("torch_dtype", c.get("dtype", top.get("torch_dtype", "float16")))), "float16"),
        weight_dtype=_weight_dtype(c, p),
        parallel_block="phi" in arch and "phi3" not in arch,
    )
    fields.update(_moe_fields(c, p, layers))
    fields.update(_mla_fields(c))
    model = ModelConf(**fields)
    validate_model(model)
    return model
