"""opcast configuration: Hydra YAML groups (hw/, model/, ...) plus the typed views of them.

Every job composes with ``config_path="pkg://conf"`` so that an installed package finds the
YAML. ``compose`` is the programmatic entry used by tests, benchmarks and the search.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from conf.schema import DTYPE_BYTES, HwConf, ModelConf, ParallelConf, register

CONF_DIR = Path(__file__).resolve().parent

__all__ = ["CONF_DIR", "DTYPE_BYTES", "HwConf", "ModelConf", "ParallelConf", "ConfigError",
           "choices", "cli", "compose", "user_errors", "to_hw", "to_model", "register"]


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one line that says what to fix."""


def choices(group: str) -> list[str]:
    """The YAML names available in a config group, e.g. ``choices("hw")``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a job config like the CLI would (without changing directories or logging)."""
    from hydra import compose as _compose, initialize_config_module
    from hydra.errors import HydraException

    register()
    try:
        with initialize_config_module(version_base="1.3", config_module="conf"):
            return _compose(config_name=config_name, overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(explain_hydra_error(exc)) from None


def _fields(dc) -> set[str]:
    return {f.name for f in dataclasses.fields(dc)}


def to_hw(node) -> HwConf:
    """Typed hardware card from a composed ``cfg.hw`` node."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return HwConf(**{k: v for k, v in data.items() if k in _fields(HwConf)})


def to_model(node) -> ModelConf:
    """Typed model card from ``cfg.model``; ``hf_config`` (a config.json path) wins when set."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if data.get("hf_config"):
        from conf.hf import model_from_hf_config
        model = model_from_hf_config(data["hf_config"])
        # Storage precision is a serving choice (--quantization fp8, --kv-cache-dtype fp8):
        # an explicit model.weight_dtype / model.kv_dtype applies on top of the checkpoint's.
        stored = {k: data[k] for k in ("weight_dtype", "kv_dtype") if data.get(k)}
        if stored:
            model = dataclasses.replace(model, **stored)
            validate_model(model)
        return model
    model = ModelConf(**{k: v for k, v in data.items() if k in _fields(ModelConf)})
    validate_model(model)
    return model


def validate_model(model: ModelConf) -> None:
    if model.dtype not in DTYPE_BYTES:
        raise ConfigError(f"model {model.name}: dtype {model.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    if model.num_heads % model.num_kv_heads:
        raise ConfigError(f"model {model.name}: num_heads={model.num_heads} is not a multiple of "
                          f"num_kv_heads={model.num_kv_heads}")
    if model.norm not in ("rmsnorm", "layernorm"):
        raise ConfigError(f"model {model.name}: norm {model.norm!r} must be rmsnorm or layernorm")
    if model.activation not in ("silu", "gelu"):
        raise ConfigError(f"model {model.name}: activation {model.activation!r} must be silu or gelu")
    from conf.schema import check_model
    check_model(model)                # MoE / MLA / storage dtypes


def explain_hydra_error(exc: Exception) -> str:
    """Turn Hydra's composition errors into one line that names the valid choices."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    import re
    m = re.search(r"Could not find '([^/']+)/([^']+)'", str(exc))
    if m:
        group, name = m.groups()
        opts = choices(group)
        if opts:
            return f"unknown {group} {name!r}; choose one of: {', '.join(opts)}"
    return msg


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def user_errors(fn: Callable[[], None]) -> None:
    """Call ``fn``; configuration mistakes end with one ``error:`` line on stderr and exit 2."""
    import yaml
    from hydra.errors import HydraException

    try:
        fn()
    except ConfigError as exc:
        _fail(str(exc))
    except HydraException as exc:
        _fail(explain_hydra_error(exc))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" ({mark.name}, line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        _fail(f"malformed YAML{where}: {problem}")


def cli(config_name: str, job: Callable[[DictConfig], None]) -> None:
    """Run ``job(cfg)`` as the Hydra app ``config_name``; user mistakes end with one line and exit 2.

    Hydra reports exceptions raised inside a job itself (exit 1, multi-line), so ConfigError is
    caught inside the job; composition errors (unknown group option, bad override, malformed
    YAML) surface outside it once HYDRA_FULL_ERROR lets them through.
    """
    import hydra

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    register()

    def task(cfg: DictConfig) -> None:
        user_errors(lambda: job(cfg))

    user_errors(hydra.main(version_base="1.3", config_path="pkg://conf", config_name=config_name)(task))
