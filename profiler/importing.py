"""Shared plumbing for the importers of other tools' measurements (Vidur, aiconfigurator, traces).

An importer turns one tool's files into opcast's tidy rows (``profiler.tables``), then merges
them into ``<out_dir>/<hw>/<family>.parquet`` so that one run replaces only its own source's
rows: running the importers again, in any order, gives byte-identical files. Provenance goes
into the file's metadata under ``sources.<tool>``; nothing time- or host-dependent is stored.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from conf import ConfigError
from conf.files import atomic_write
from profiler import tables

IMPORTER_VERSION = 1

UPSTREAM = {
    "vidur": {"repo": "https://github.com/microsoft/vidur", "commit": "7d47513", "licence": "MIT"},
    "aiconfigurator": {"repo": "https://github.com/ai-dynamo/aiconfigurator", "commit": "095f58a",
                       "licence": "Apache-2.0"},
}

# A single kernel call that takes over a minute is not a measurement in ms: the file is in µs/ns.
MAX_PLAUSIBLE_MS = 60_000.0


class SourceFormatError(ConfigError):
    """An input file that does not look like what the importer expects; one line says why."""


def require_columns(df: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SourceFormatError(f"{where}: missing column(s) {', '.join(missing)}; expected "
                                f"{', '.join(columns)}")


def check_ms(values: pd.Series, where: str) -> None:
    """Times must be NaN or finite, non-negative and plausible as milliseconds."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(v) & values.notna().to_numpy()
    if bad.any():
        raise SourceFormatError(f"{where}: non-numeric time {values[bad].iloc[0]!r}")
    wrong = (v < 0) | np.isinf(v)
    if wrong.any():
        raise SourceFormatError(f"{where}: negative or infinite time {v[wrong][0]}")
    if (v > MAX_PLAUSIBLE_MS).any():
        raise SourceFormatError(f"{where}: time {np.nanmax(v):g} is not plausible in milliseconds "
                                f"(> {MAX_PLAUSIBLE_MS:g} ms for one call); the file looks like µs or ns, "
                                f"the importer expects ms")


def ms_to_us(values) -> np.ndarray:
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64) * 1000.0


def positive_ints(df: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    for c in columns:
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any() or (v <= 0).any() or (v != np.floor(v)).any():
            raise SourceFormatError(f"{where}: column {c} must hold positive integers, found "
                                    f"{df[c][v.isna() | (v <= 0) | (v != np.floor(v))].iloc[0]!r}")


def rel(path: Path, root: Path) -> str:
    """Path of an input file relative to the folder the user pointed at (stable across machines)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    base = root if root.is_dir() else root.parent
    return path.relative_to(base).as_posix()


def fill_common(df: pd.DataFrame, family: str, **values) -> pd.DataFrame:
    """Add every contract column the converter left out, with its 'unknown' value."""
    defaults = {"source": "", "cuda_graph": False, "threads": 0, "status": "ok", "repeats": 0, "model": "", "tp": 0,
                **{c: math.nan for c in tables.STAT_COLUMNS}}
    for name, _ in tables.COMMON + tables.FAMILIES[family]:
        if name in values:
            df[name] = values[name]
        elif name not in df.columns:
            if name not in defaults:
                raise AssertionError(f"converter left {family}.{name} unset")
            df[name] = defaults[name]
    return df


def sort_rows(df: pd.DataFrame, family: str) -> pd.DataFrame:
    """A total, content-based order: identity columns, then the times (duplicates are real repeats)."""
    keys = tables.identity_columns(family) + tables.STAT_COLUMNS + ["repeats", "status"]
    return df.sort_values(keys, kind="mergesort", na_position="last").reset_index(drop=True)


def merge_write(path: Path, family: str, tool: str, hw: str, rows: pd.DataFrame, source_meta: dict,
                scope: str) -> int:
    """Merge ``tool``'s new rows for ``hw`` into ``path``; keep everything else.

    Replaced: the existing rows of this tool and hw whose ``scope`` column value (model, network or
    backend) appears in ``rows``, so importing one model's or one version's file leaves the others'
    rows alone, and re-running gives the same bytes. ``source_meta["files"]`` entries carry the
    same ``scope`` key and are merged the same way.
    """
    path = Path(path)
    rows = rows.copy()
    rows["source"] = tool
    replaced = {str(x) for x in rows[scope].unique()}
    kept = tables.schema(family).empty_table().to_pandas()
    meta: dict = {}
    if path.exists():
        old = tables.read(path, family)
        meta = tables.provenance(path)
        ours = (old["source"] == tool) & (old["hw"] == hw) & old[scope].isin(list(replaced))
        kept = old[~ours]
    sources = dict(meta.get("sources", {}))
    old_files = [f for f in sources.get(tool, {}).get("files", []) if str(f.get(scope)) not in replaced]
    files = sorted(old_files + list(source_meta.get("files", [])), key=lambda f: f["path"])
    sources[tool] = {**source_meta, "files": files}
    frames = [f for f in (kept, rows) if len(f)]
    merged = pd.concat(frames, ignore_index=True) if frames else rows
    merged = sort_rows(tables.to_arrow(merged, family).to_pandas(), family)
    # other writers' top-level provenance (e.g. the profiler's) stays as it was
    others = {k: v for k, v in meta.items() if k not in ("schema_version", "family", "sources")}
    tables.write(merged, path, family, {**others, "hw": hw, "sources": dict(sorted(sources.items()))})
    return len(rows)


def write_table_atomic(table: pa.Table, path: Path, meta: dict) -> Path:
    """Atomic parquet write with provenance under the same metadata key as profile tables."""
    table = table.replace_schema_metadata({tables.META_KEY: json.dumps(meta, sort_keys=True)})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def parse_cli(argv: Sequence[str], usage: str, keys: dict[str, str | None]) -> tuple[Path, dict]:
    """``PATH key=value ...``: the importers' small CLI (defaults in ``keys``; None = required)."""
    paths = [a for a in argv if "=" not in a]
    pairs = [a for a in argv if "=" in a]
    if len(paths) != 1:
        raise ConfigError(f"expected exactly one input PATH; usage: {usage}")
    opts = dict(keys)
    for a in pairs:
        k, v = a.split("=", 1)
        k = k.lstrip("-").lstrip("+")
        if k not in keys:
            raise ConfigError(f"unknown option {k!r}; allowed: {', '.join(keys)}; usage: {usage}")
        opts[k] = v
    missing = [k for k, v in opts.items() if v is None]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=...' for k in missing)}; usage: {usage}")
    path = Path(paths[0])
    if not path.exists():
        raise ConfigError(f"input path {path} does not exist")
    return path, opts


def cli(main: Callable[[Sequence[str]], None]) -> Callable[[], None]:
    """Run ``main(sys.argv[1:])``; user mistakes end as one line on stderr and exit code 2."""
    def run() -> None:
        if {"-h", "--help", "help"} & set(sys.argv[1:2]):
            print(sys.modules[main.__module__].__doc__)
            return
        try:
            main(sys.argv[1:])
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return run
