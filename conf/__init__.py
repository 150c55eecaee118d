"""opcast configuration: Hydra YAML groups (hw/, model/, ...) plus the typed views of them.

Every job composes with ``config_path="pkg://conf"`` so that an installed package finds the
YAML. ``compose`` is the programmatic entry used by tests, benchmarks and the search.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from conf.schema import DTYPE_BYTES, HwConf, ModelConf, ParallelConf, register

CONF_DIR = Path(__file__).resolve().parent

__all__ = ["CONF_DIR", "DTYPE_BYTES", "HwConf", "ModelConf", "ParallelConf", "ConfigError",
           "choices", "compose", "to_hw", "to_model", "main_guard", "register"]


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
        return model_from_hf_config(data["hf_config"])
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


def main_guard(fn: Callable[[], None]) -> Callable[[], None]:
    """Wrap a Hydra ``main`` so that user mistakes end with one clear line and exit code 2."""
    @functools.wraps(fn)
    def wrapper() -> None:
        from hydra.errors import HydraException
        try:
            fn()
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except HydraException as exc:
            print(f"error: {explain_hydra_error(exc)}", file=sys.stderr)
            raise SystemExit(2) from None
    return wrapper
