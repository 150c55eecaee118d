"""Which trained predictor files price a GPU, and their content hash: what the simulator's
operator-table cache is keyed by. Light on purpose (no pandas, no XGBoost): a simulation whose
tables are cached needs only this to find them."""
from __future__ import annotations

import hashlib
from pathlib import Path


def model_files(directory: Path) -> list[Path]:
    # boosters, sidecars and measured anchors (estimator/anchors.py); not the reports
    return sorted(p for p in directory.glob("*")
                  if p.suffix in (".ubj", ".json", ".parquet") and not p.name.startswith("report"))


def files_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cache_fingerprint(hw, data_dir: str | Path = "data") -> str:
    """Content hash of every model file that can price ``hw``: its own directory and, for a
    GPU, the fleet's (a superset of what Predictors.load picks, so a retrain of either
    invalidates the cached tables); "" when there are none (the roofline prior prices it)."""
    root = Path(data_dir) / "estimators"
    files = model_files(root / hw.name)
    if hw.device == "cuda" and hw.name != "fleet":
        files += model_files(root / "fleet")
    return files_sha256(files) if files else ""
