"""Load the trained predictors of one hardware card and answer (family, shapes) -> µs.

Families without a trained model fall back to the roofline prior; ``Predictors.notes`` says
which (and ``load_op_times`` warns once).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from conf.schema import HwConf
from estimator.features import EstimatorError
from estimator.model import QUANTILES, FamilyModel, warn_once
from profiler.tables import FAMILIES, file_sha256


def estimators_dir(hw_name: str, data_dir: str | Path = "data") -> Path:
    return Path(data_dir) / "estimators" / hw_name


def available_hw(data_dir: str | Path = "data") -> list[str]:
    root = Path(data_dir) / "estimators"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.ubj"))) if root.is_dir() else []


def model_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*") if p.suffix in (".ubj", ".json") and not p.name.startswith("report"))


def files_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


class Predictors:
    """The trained family models of one hw; ``predict`` falls back to roofline per family."""

    def __init__(self, hw: HwConf, trained: list[str], directory: Path | None):
        self.hw, self.trained, self.directory = hw, trained, directory
        self.fallback = [f for f in FAMILIES if f not in trained]
        self._models: dict[str, FamilyModel] = {}

    def model(self, family: str) -> FamilyModel:
        """The family's fitted model, read from disk on first use (a cached OpTimes needs none)."""
        if family not in self._models:
            model = FamilyModel.load(self.directory, family)
            data = Path(model.meta.get("data_path", ""))
            if data.is_file() and file_sha256(data) != model.meta.get("data_sha256"):
                warn_once(("stale", str(self.directory), family),
                          f"{self.directory}/{family}: {data} changed since training; retrain with "
                          f"python -m estimator.train hw={self.hw.name}")
            self._models[family] = model
        return self._models[family]

    @classmethod
    def load(cls, hw: HwConf, data_dir: str | Path = "data", families=FAMILIES,
             directory: str | Path | None = None) -> "Predictors":
        """All families trained for ``hw`` (in ``directory``, default data/estimators/<hw>);
        raises EstimatorError if none is, naming the hw that are."""
        d = Path(directory) if directory else estimators_dir(hw.name, data_dir)
        trained = [f for f in families if (d / f"{f}.ubj").is_file() and (d / f"{f}.json").is_file()]
        if not trained:
            have = available_hw(data_dir)
            raise EstimatorError(f"no trained estimator for hw={hw.name} in {d}; trained: "
                                 f"{', '.join(have) or 'none'} (run python -m estimator.train hw={hw.name})")
        return cls(hw, trained, d)

    def fingerprint(self) -> str:
        return files_sha256(model_files(self.directory)) if self.directory else "roofline"

    def predict(self, family: str, df: pd.DataFrame, quantile: str = "p50") -> np.ndarray:
        if quantile not in QUANTILES:
            raise EstimatorError(f"quantile {quantile!r} is not one of {', '.join(QUANTILES)}")
        if family in self.trained:
            return self.model(family).predict(df)[f"pred_time_us_{quantile}"].to_numpy(float)
        from estimator.runtime import roofline_predict
        return roofline_predict(self.hw)(family, df)

    def knows(self, family: str, op: str) -> bool:
        """Whether ``family``'s model was trained on rows of operator ``op`` (families whose model
        has no op vocabulary, or that use the roofline prior, answer True)."""
        if family not in self.trained:
            return True
        ops = self.model(family).meta.get("vocab", {}).get("op")
        return ops is None or op in ops

    def predict_fn(self, quantile: str = "p50"):
        return lambda family, df: self.predict(family, df, quantile)
