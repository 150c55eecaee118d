"""The search's points file: one row per simulated probe (config hash, candidate, qps, seed,
every summary metric). It is rewritten atomically after each finished candidate, and read
back as a cache so that a re-run answers those probes without simulating (resume)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from conf import ConfigError
from conf.files import atomic_write

# Columns of a points row that identify the probe rather than measure it.
IDENTITY_COLUMNS = ("config_hash", "qps", "seed", "config", "hw", "tp", "pp", "replicas", "gpus",
                    "scheduler", "knobs", "model", "workload", "deployment", "decode_hw", "decode_tp",
                    "decode_replicas")


def write_atomic(df: pd.DataFrame, path: Path) -> None:
    """A points/ranking table as parquet, or CSV when the name says so."""
    if Path(path).suffix == ".csv":
        atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def _read(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable points file ({type(exc).__name__}); move it "
                          f"away to start the search afresh, or choose another search.out_dir") from None
    missing = {"config_hash", "qps", "seed"} - set(frame.columns)
    if len(frame) and missing:
        raise ConfigError(f"{path} lacks the columns {sorted(missing)} of a points file; move it away "
                          f"to start the search afresh, or choose another search.out_dir")
    return frame


class PointsStore:
    """points.parquet plus its cache: config_hash -> {(qps, seed): summary dict}."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.frame = _read(self.path) if self.path.exists() else pd.DataFrame()
        self.cache: dict = {}
        metrics = [c for c in self.frame.columns if c not in IDENTITY_COLUMNS]
        for row in self.frame.to_dict("records"):
            self.cache.setdefault(row["config_hash"], {})[(float(row["qps"]), int(row["seed"]))] = \
                {c: row[c] for c in metrics}

    def cached(self, key: str) -> dict:
        return dict(self.cache.get(key, {}))

    def add(self, key: str, identity: dict, points: list[dict]) -> None:
        """Append a candidate's new probes ({"qps", "seed", **summary}) and rewrite the file."""
        if not points:
            return
        new = pd.DataFrame([{"config_hash": key, **identity, **p} for p in points])
        self.frame = pd.concat([self.frame, new], ignore_index=True) if len(self.frame) else new
        write_atomic(self.frame, self.path)
        for p in points:
            self.cache.setdefault(key, {})[(p["qps"], p["seed"])] = \
                {k: v for k, v in p.items() if k not in ("qps", "seed")}
