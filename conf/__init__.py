"""opcast configuration: Hydra YAML groups (hw/, model/, ...) plus the typed views of them.

Every job composes with ``config_path="pkg://conf"`` so that an installed package finds the
YAML. ``compose`` is the programmatic entry used by tests, benchmarks and the search.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from conf.schema import DTYPE_BYTES, HwConf, ModelConf, ParallelConf, register

CONF_DIR = Path(__file__).resolve().parent

__all__ = ["CONF_DIR", "DTYPE_BYTES", "HwConf", "ModelConf", "ParallelConf", "ConfigError",
           "check_fields", "choices", "cli", "close_matches", "compose", "explain_hydra_error",
           "resolve_model", "user_errors", "to_hw", "to_model", "register", "warn_once"]


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one line that says what to fix."""


_warned: set = set()


def warn_once(key: tuple, msg: str, logger: str = "opcast") -> None:
    """Log ``msg`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        import logging
        logging.getLogger(logger).warning(msg)


_REGISTRARS: list[Callable[[], None]] = []


def add_registrar(fn: Callable[[], None]) -> None:
    """A package's schema registration, run before any composition (sim/config.py adds its own
    at import). Importing a package thus costs no Hydra import: Hydra is loaded to compose."""
    if fn not in _REGISTRARS:
        _REGISTRARS.append(fn)


def register_all() -> None:
    register()
    for fn in _REGISTRARS:
        fn()


def choices(group: str) -> list[str]:
    """The YAML names available in a config group, e.g. ``choices("hw")``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a job config like the CLI would (without changing directories or logging)."""
    from hydra import compose as _compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException

    register_all()
    try:
        with initialize_config_module(version_base="1.3", config_module="conf"):
            return _compose(config_name=config_name, overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(explain_hydra_error(exc, config_name)) from None


def _fields(dc) -> set[str]:
    return {f.name for f in dataclasses.fields(dc)}


def to_hw(node) -> HwConf:
    """Typed hardware card from a composed ``cfg.hw`` node."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    data.pop("defaults", None)        # a card read with OmegaConf.load, not composed
    check_fields(data, HwConf, "hw")
    return HwConf(**data)


def to_model(node) -> ModelConf:
    """Typed model card from ``cfg.model``; ``hf_config`` (a config.json path) wins when set."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    data.pop("defaults", None)
    check_fields(data, ModelConf, "model")
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
    model = ModelConf(**data)
    validate_model(model)
    return model


def resolve_model(cfg: DictConfig) -> ModelConf:
    """The typed model of ``cfg``; with ``model.hf_config`` the ``cfg.model`` node is rewritten
    to the config.json's model (name included), so headers, output paths and the saved config
    name the model that runs, not the default card the override replaced."""
    model = to_model(cfg.model)
    if cfg.model.get("hf_config"):
        from omegaconf import open_dict
        with open_dict(cfg):
            for key, value in dataclasses.asdict(model).items():
                if key != "hf_config":
                    cfg.model[key] = value
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


def close_matches(name: str, options) -> str:
    """`` (did you mean a, b?)`` for the options that look like ``name``, else ""."""
    import difflib
    near = difflib.get_close_matches(str(name), [str(o) for o in options], n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def _node_keys(config_name: str | None, dotted_parent: str) -> list[str]:
    """Keys of a node of the job's composed config (for "unknown key" messages)."""
    if not config_name:
        return []
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        return []
    try:
        node = compose(config_name)
        node = OmegaConf.select(node, dotted_parent) if dotted_parent else node
        return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        return []


def _expected_type(object_type, key: str) -> str:
    if dataclasses.is_dataclass(object_type):
        for f in dataclasses.fields(object_type):
            if f.name == key:
                t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                return {"int": "an integer", "float": "a number", "bool": "true or false",
                        "str": "a string", "Optional[str]": "a string or null"}.get(t, t)
    return ""


def unknown_field(where: str, key: str, fields) -> str:
    """The one line for a key that a config node does not have: its close matches and fields."""
    fields = sorted(fields)
    return (f"unknown field {where}.{key}{close_matches(key, fields)}; {where} has: {', '.join(fields)}"
            if where else f"unknown key {key!r}{close_matches(key, fields)}; the config has: "
                          f"{', '.join(fields)}")


def check_fields(node, schema, where: str) -> None:
    """ConfigError when ``node`` holds keys its dataclass ``schema`` lacks (``+workload.qsp=3``
    composes: Hydra lets ``+`` add keys to a typed node)."""
    keys = list(node.keys()) if isinstance(node, (DictConfig, dict)) else []
    known = _fields(schema)
    extra = [str(k) for k in keys if str(k) not in known]
    if extra:
        raise ConfigError(unknown_field(where, extra[0], known))


def explain_hydra_error(exc: Exception, config_name: str | None = None) -> str:
    """Turn Hydra's composition errors into one line: the field, what it takes, close matches."""
    import re

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if m:
        group, name = m.groups()
        opts = choices(group)
        if opts:
            return f"unknown {group} {name!r}{close_matches(name, opts)}; choose one of: {', '.join(opts)}"
    cause = exc.__cause__
    full_key = str(getattr(cause, "full_key", "") or "")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and full_key:
        parent, _, key = full_key.rpartition(".")
        obj = getattr(cause, "object_type", None)
        fields = _fields(obj) if dataclasses.is_dataclass(obj) else _node_keys(config_name, parent)
        if fields:
            return unknown_field(parent, key, fields)
        return f"unknown key {full_key!r}"
    if isinstance(cause, ValidationError) and full_key:
        given = re.search(r"override \S+?=(.*)$", msg)
        value = given.group(1) if given else str(getattr(cause, "value", ""))
        want = _expected_type(getattr(cause, "object_type", None), full_key.rpartition(".")[2])
        hint = ""
        if want == "an integer":
            try:
                as_float = float(value)
                if as_float.is_integer():
                    hint = f" (write {int(as_float)})"
            except ValueError:
                pass
        reason = str(cause).splitlines()[0]
        return (f"{full_key}={value}: expected {want}{hint}" if want
                else f"{full_key}={value}: {reason}")
    return msg


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def user_errors(fn: Callable[[], None], config_name: str | None = None) -> None:
    """Call ``fn``; configuration mistakes end with one ``error:`` line on stderr and exit 2."""
    import yaml
    # Hydra's errors come only from Hydra: a run from a cached composition never imports it.
    HydraException = sys.modules["hydra.errors"].HydraException if "hydra.errors" in sys.modules else ()

    try:
        fn()
    except ConfigError as exc:
        _fail(str(exc))
    except HydraException as exc:
        _fail(explain_hydra_error(exc, config_name))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" ({mark.name}, line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        _fail(f"malformed YAML{where}: {problem}")


def _plain_run(args: Sequence[str]) -> bool:
    """Whether a command line is only overrides of a single run (no Hydra flags, no sweep or
    launcher settings): then Hydra's answer is the same with one composition instead of two."""
    return all(not a.startswith("-") and "hydra.mode" not in a and not a.lstrip("+~").startswith("hydra/")
               for a in args)


def _run_once(config_name: str, task: Callable[[DictConfig], None], overrides: list[str]) -> None:
    """What ``hydra.main`` does for a plain run, composing once: ``hydra.main`` composes twice
    (first only to read hydra.mode) and parses its flags, ~0.13 s of a 0.4 s simulation."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    version.setbase("1.3")   # as hydra.main(version_base="1.3"): no chdir into the run dir
    search_path = create_automatic_config_search_path(None, None, "pkg://conf")
    app = Hydra.create_main_hydra2(task_name=config_name, config_search_path=search_path)
    try:
        app.run(config_name=config_name, task_function=task, overrides=[*overrides, "hydra.mode=RUN"])
    finally:
        GlobalHydra.instance().clear()


def cli(config_name: str, job: Callable[[DictConfig], None]) -> None:
    """Run ``job(cfg)`` as the Hydra app ``config_name``; user mistakes end with one line and exit 2.

    Hydra reports exceptions raised inside a job itself (exit 1, multi-line), so ConfigError is
    caught inside the job; composition errors (unknown group option, bad override, malformed
    YAML) surface outside it once HYDRA_FULL_ERROR lets them through. A command line of plain
    overrides runs from its cached composition when there is one (conf/composed.py), else
    through Hydra's own run path directly (``_run_once``); flags (``--cfg``, ``-m``,
    ``--help``, ...) go through ``hydra.main``.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    args = sys.argv[1:]
    plain = _plain_run(args)
    if plain:
        from conf import composed
        hit = []
        user_errors(lambda: hit.append(composed.run_cached(config_name, list(args), job)), config_name)
        if hit[0]:
            return
    register_all()

    def task(cfg: DictConfig) -> None:
        if plain:
            from hydra.core.hydra_config import HydraConfig

            from conf import composed
            composed.save(config_name, list(args), cfg, HydraConfig.get())
        user_errors(lambda: job(cfg), config_name)

    if plain:
        user_errors(lambda: _run_once(config_name, task, list(args)), config_name)
        return
    import hydra
    user_errors(hydra.main(version_base="1.3", config_path="pkg://conf", config_name=config_name)(task),
                config_name)
