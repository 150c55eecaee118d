"""Read a Hugging Face ``config.json`` into a ModelConf, offline."""
from __future__ import annotations

import json
from pathlib import Path

from conf.schema import ModelConf

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu",
                "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu"}
_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def model_from_hf_config(path: str | Path) -> ModelConf:
    from conf import ConfigError, validate_model

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"model.hf_config: no such file {str(p)!r} (give a Hugging Face config.json path)")
    try:
        c = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model.hf_config: {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in c]
    if missing:
        raise ConfigError(f"model.hf_config: {p} lacks {', '.join(missing)}; is it a decoder LLM config.json?")
    heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    head_dim = int(c.get("head_dim") or hidden // heads)
    act = str(c.get("hidden_act", c.get("activation_function", "silu")))
    arch = " ".join(c.get("architectures", [])).lower()
    layernorm = "phi" in arch and "phi3" not in arch or "gpt" in arch
    rotary_dim = int(c.get("partial_rotary_factor", 1.0) * head_dim) if "partial_rotary_factor" in c else 0
    model = ModelConf(
        name=str(c.get("_name_or_path") or p.parent.name) or "hf-model",
        hf_id=str(c.get("_name_or_path", "")),
        hidden_size=hidden,
        num_layers=int(c["num_hidden_layers"]),
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
        dtype=_DTYPES.get(str(c.get("torch_dtype", c.get("dtype", "float16"))), "float16"),
        num_experts=int(c.get("num_local_experts", 0) or 0),
        experts_per_token=int(c.get("num_experts_per_tok", 0) or 0),
        parallel_block="phi" in arch and "phi3" not in arch,
    )
    validate_model(model)
    return model
