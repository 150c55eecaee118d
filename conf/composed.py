"""Cached compositions: a command line seen before runs without importing Hydra.

Importing Hydra, composing ``conf/sim.yaml`` and Hydra's run setup take ~0.15 s of CPU, a
third of a small simulation's whole process. The composed job config of a plain command line
(``python -m sim.run workload.qps=3``) is a pure function of its inputs, so it is kept, pickled,
under ``~/.cache/opcast/compose`` (``$OPCAST_CACHE_DIR``; ``OPCAST_CONFIG_CACHE=0`` turns it
off) and reused while every input is unchanged:

- the key: job name, overrides, Python, OmegaConf and Hydra versions, and every file under
  ``conf/`` (content hashes);
- in the entry: the content hash of every opcast module loaded when the config was composed
  (the dataclass schemas live there); any change and the entry is not used.

Only runs that need nothing else from Hydra are kept: run mode, no working-directory change,
Hydra writing no files (``hydra.run.dir: .``, ``output_subdir: null``, no log file), no
callbacks, and no interpolation that needs a Hydra resolver (``${now:...}``, ``${hydra:...}``).
Those runs are set up here as Hydra's ``run_job`` would: logging from ``hydra.job_logging``,
then ``job(cfg)`` with the ``hydra`` node removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

from conf.files import write_bytes

VERSION = 1
_RESOLVER = re.compile(r"\$\{(?!oc\.)[\w.]+:")     # ${now:...}, ${hydra:...}, not ${oc.env:...}
_ROOT = Path(__file__).resolve().parents[1]


def enabled() -> bool:
    return os.environ.get("OPCAST_CONFIG_CACHE", "1") != "0"


def cache_dir() -> Path:
    base = os.environ.get("OPCAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "opcast")
    return Path(base) / "compose"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _version_of(package: str) -> str:
    """A package's version file (content hash), found without importing the package."""
    spec = find_spec(package)
    origin = Path(spec.origin) if spec and spec.origin else None
    if origin is None:
        return "none"
    version = origin.parent / "version.py"
    return _sha((version if version.is_file() else origin).read_bytes())


def key(config_name: str, overrides: list[str]) -> str:
    from conf import CONF_DIR
    h = hashlib.sha256(json.dumps([VERSION, config_name, overrides, sys.version,
                                   _version_of("omegaconf"), _version_of("hydra")]).encode())
    for path in sorted(CONF_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".py"):
            h.update(str(path.relative_to(CONF_DIR)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:32]


def _sources() -> dict[str, str]:
    """Content hash of every loaded opcast module (the schemas the composition used)."""
    out = {}
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if not (isinstance(path, str) and os.path.isabs(path) and path.endswith(".py")):
            continue          # builtins, extensions, generated modules with a bare file name
        file = Path(path).resolve()
        if file.is_relative_to(_ROOT) and file.is_file():
            out[str(file)] = _sha(file.read_bytes())
    return out


def run_cached(config_name: str, overrides: list[str], job: Callable) -> bool:
    """Run ``job`` on the cached composition of this command line; False when there is none."""
    if not enabled():
        return False
    path = cache_dir() / f"{key(config_name, overrides)}.pkl"
    try:
        sources, logging_conf, cfg_bytes = pickle.loads(path.read_bytes())
        if any(_sha(Path(p).read_bytes()) != digest for p, digest in sources.items()):
            return False
        cfg = pickle.loads(cfg_bytes)
    except Exception:
        return False
    import logging.config
    logging.config.dictConfig(logging_conf)
    job(cfg)
    return True


def save(config_name: str, overrides: list[str], cfg, hydra_cfg) -> None:
    """Keep the composition of a run that needs nothing else from Hydra (see the module doc)."""
    h = hydra_cfg
    if not enabled() or str(h.run.dir) != "." or h.output_subdir is not None:
        return
    try:
        from omegaconf import OmegaConf
        logging_conf = OmegaConf.to_container(h.job_logging, resolve=True)
        eligible = (str(h.mode) in ("RUN", "RunMode.RUN") and not h.job.chdir and not h.callbacks
                    and not h.verbose
                    and not any("filename" in hd for hd in logging_conf.get("handlers", {}).values())
                    and not _RESOLVER.search(OmegaConf.to_yaml(cfg)))
        if eligible:
            entry = pickle.dumps((_sources(), logging_conf, pickle.dumps(cfg)))
            write_bytes(cache_dir() / f"{key(config_name, overrides)}.pkl", entry)
    except Exception:
        pass
