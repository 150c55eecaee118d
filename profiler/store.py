"""The profiler's output tables in one directory (``<out_dir>/<family>.parquet``), shared by the
operator profile (profiler.run) and the collectives (profiler.collectives).

- Resume: a point is done when the table holds an ``opcast`` row with its resume key: the shape
  columns plus hw, dtype, backend and source (``resume_columns``). How it was timed (timer,
  l2_policy, cuda_graph, threads) is not part of it, so changing a timing setting does not
  re-measure and duplicate every point.
- Writes go through the importers' merge (profiler.importing.merge_write): only this source's
  (``opcast``) rows of this hw and scope (the model, or the network for collectives) are
  replaced, so rows imported from Vidur or aiconfigurator are never touched, with or without
  ``profile.resume``. Provenance goes under ``sources.opcast`` in the table metadata.
- Passes: with ``profile.passes > 1`` a point's samples come from several sweeps through the grid.
  Each finished pass's samples are kept in ``<out_dir>/.passes/<family>.parquet`` (written with
  the tables), so a run killed in any pass resumes with the passes it finished.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from conf import ConfigError
from profiler import tables
from profiler.importing import merge_write

SOURCE = "opcast"
# How a point was timed, not what was timed: left out of the resume key.
TIMING_COLUMNS = ("timer", "l2_policy", "cuda_graph", "threads")


def resume_columns(family: str) -> list[str]:
    return [c for c in tables.identity_columns(family) if c not in TIMING_COLUMNS]


def resume_key(row: dict, family: str) -> str:
    return json.dumps([str(row[c]) for c in resume_columns(family)])


class Store:
    """One run's view of its output directory: the rows already there, the new rows, the samples
    of unfinished passes; ``flush`` writes what changed, atomically."""

    def __init__(self, out_dir: str | Path, families, hw: str, scope: str, scope_value: str, provenance: dict,
                 resume: bool = True):
        self.out_dir, self.hw, self.scope, self.scope_value = Path(out_dir), hw, scope, str(scope_value)
        self.provenance = provenance
        self.mine: dict[str, list[dict]] = {}     # this source's rows in scope: kept (resume) + new
        self.done: dict[str, set[str]] = {}
        self.dirty: set[str] = set()
        self.old_runs: list[dict] = []
        self.passes: dict[str, dict[str, list[list[float]]]] = {}
        for f in families:
            path = self.out_dir / f"{f}.parquet"
            try:
                df = tables.read(path, f) if path.exists() else tables.schema(f).empty_table().to_pandas()
            except (tables.TableError, OSError, ValueError) as exc:
                raise ConfigError(f"cannot resume from {path}: {exc}; move it away") from None
            ours = df[(df["source"] == SOURCE) & (df["hw"] == hw) & (df[scope].astype(str) == self.scope_value)]
            rows = ours.to_dict("records") if resume else []
            self.mine[f] = rows
            self.done[f] = {resume_key(r, f) for r in rows}
            if path.exists() and len(ours) and resume:
                self.old_runs = self._previous_runs(path)
            self.passes[f] = self._read_passes(f) if resume else {}

    @staticmethod
    def _previous_runs(path: Path) -> list[dict]:
        meta = tables.provenance(path)
        prev = dict(meta.get("sources", {}).get(SOURCE) or
                    # tables written before the profiler merged by source kept it at the top level
                    {k: v for k, v in meta.items() if k not in ("schema_version", "family", "sources", "hw")})
        runs = prev.pop("previous_runs", [])
        prev.pop("config", None)
        prev.pop("files", None)
        return runs + ([prev] if prev else [])

    def existing(self, family: str) -> int:
        return len(self.mine[family])

    def is_done(self, family: str, row: dict) -> bool:
        return resume_key(row, family) in self.done[family]

    def add(self, family: str, row: dict) -> None:
        key = resume_key(row, family)
        self.mine[family].append(row)
        self.done[family].add(key)
        self.passes[family].pop(key, None)
        self.dirty.add(family)

    # -- samples of points whose passes are not all done
    def pass_samples(self, family: str, row: dict) -> list[list[float]]:
        return self.passes[family].get(resume_key(row, family), [])

    def add_pass(self, family: str, row: dict, samples: list[float]) -> None:
        self.passes[family].setdefault(resume_key(row, family), []).append(list(samples))
        self.dirty.add(family)

    def _passes_path(self, family: str) -> Path:
        return self.out_dir / ".passes" / f"{family}.parquet"

    def _read_passes(self, family: str) -> dict[str, list[list[float]]]:
        path = self._passes_path(family)
        if not path.exists():
            return {}
        df = pd.read_parquet(path)
        df = df[(df["hw"] == self.hw) & (df["scope"] == self.scope_value)]
        out: dict[str, list[list[float]]] = {}
        for key, samples in zip(df["key"], df["samples"]):
            out.setdefault(key, []).append([float(x) for x in samples])
        return out

    def _write_passes(self, family: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from conf.files import atomic_write
        path = self._passes_path(family)
        others = pd.DataFrame(columns=["hw", "scope", "key", "samples"])
        if path.exists():
            old = pd.read_parquet(path)
            others = old[(old["hw"] != self.hw) | (old["scope"] != self.scope_value)]
        rows = [{"hw": self.hw, "scope": self.scope_value, "key": k, "samples": s}
                for k, runs in sorted(self.passes[family].items()) for s in runs]
        df = pd.concat([others, pd.DataFrame(rows, columns=others.columns)], ignore_index=True)
        if not len(df):
            path.unlink(missing_ok=True)
            return
        table = pa.Table.from_pandas(df, schema=pa.schema([("hw", pa.string()), ("scope", pa.string()),
                                                           ("key", pa.string()), ("samples", pa.list_(pa.float64()))]),
                                     preserve_index=False)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    def flush(self) -> None:
        for f in sorted(self.dirty):
            if self.mine[f]:
                rows = pd.DataFrame(self.mine[f])
                for col in tables.schema(f).names:
                    if col not in rows.columns:
                        rows[col] = None
                meta = {**self.provenance, "family": f, "previous_runs": self.old_runs}
                merge_write(self.out_dir / f"{f}.parquet", f, SOURCE, self.hw, rows, meta, self.scope)
            if self.passes[f] or self._passes_path(f).exists():
                self._write_passes(f)
        self.dirty.clear()
