"""Load the trained predictors of one hardware card and answer (family, shapes) -> µs.

Per family, in order: the GPU's own model (``data/estimators/<hw>/``, trained on its rows), else
the fleet model (``data/estimators/fleet/``, trained on every GPU's rows with the card's numbers
as features, so it prices a GPU it has no rows for from its card), else the roofline prior.
``Predictors.origin`` says which each family uses (and ``load_op_times`` warns once).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from conf.schema import DTYPE_BYTES, HwConf
from estimator import roofline
from estimator.features import EstimatorError
from estimator.fingerprint import files_sha256, model_files
from estimator.model import QUANTILES, FamilyModel, warn_once
from profiler.tables import FAMILIES, file_sha256

FLEET = "fleet"  # data/estimators/fleet: the cross-GPU models


def estimators_dir(hw_name: str, data_dir: str | Path = "data") -> Path:
    return Path(data_dir) / "estimators" / hw_name


def available_hw(data_dir: str | Path = "data") -> list[str]:
    root = Path(data_dir) / "estimators"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.ubj"))) if root.is_dir() else []


def _trained(directory: Path, family: str) -> bool:
    return (directory / f"{family}.ubj").is_file() and (directory / f"{family}.json").is_file()


class Predictors:
    """The family models that price ``hw``; ``predict`` falls back to roofline per family."""

    def __init__(self, hw: HwConf, dirs: dict[str, Path]):
        self.hw, self.dirs = hw, dirs                     # family -> directory of its model
        self.trained = list(dirs)
        self.fallback = [f for f in FAMILIES if f not in dirs]
        self.origin = {f: ("fleet" if d.name == FLEET and hw.name != FLEET else "own") for f, d in dirs.items()}
        self._models: dict[str, FamilyModel] = {}

    @property
    def directory(self) -> Path | None:
        own = [d for d in self.dirs.values() if d.name != FLEET]
        return own[0] if own else next(iter(self.dirs.values()), None)

    def model(self, family: str) -> FamilyModel:
        """The family's fitted model, read from disk on first use (a cached OpTimes needs none)."""
        if family not in self._models:
            if family not in self.dirs:
                raise EstimatorError(f"no trained {family} model for hw={self.hw.name}; run python -m estimator.train")
            directory = self.dirs[family]
            model = FamilyModel.load(directory, family)
            data = Path(model.meta.get("data_path", ""))
            if data.is_file() and file_sha256(data) != model.meta.get("data_sha256"):
                warn_once(("stale", str(directory), family),
                          f"{directory}/{family}: {data} changed since training; retrain with "
                          f"python -m estimator.train hw={directory.name}")
            self._models[family] = model
        return self._models[family]

    @classmethod
    def load(cls, hw: HwConf, data_dir: str | Path = "data", families=FAMILIES,
             directory: str | Path | None = None) -> "Predictors":
        """The models that price ``hw``: its own (``directory``, default data/estimators/<hw>),
        else the fleet's; raises EstimatorError if neither has any, naming the hw that do."""
        own = Path(directory) if directory else estimators_dir(hw.name, data_dir)
        fleet = estimators_dir(FLEET, data_dir)
        dirs = {}
        for f in families:
            if _trained(own, f):
                dirs[f] = own
            elif directory is None and _trained(fleet, f) and hw.device == "cuda":
                dirs[f] = fleet
        if not dirs:
            have = available_hw(data_dir)
            raise EstimatorError(f"no trained estimator for hw={hw.name} in {own} (and no fleet model in {fleet}); "
                                 f"trained: {', '.join(have) or 'none'} (run python -m estimator.train hw={hw.name})")
        return cls(hw, dirs)

    def fingerprint(self) -> str:
        return files_sha256(sorted({p for d in set(self.dirs.values()) for p in model_files(d)}))

    def dtypes(self, family: str) -> list[str]:
        """Dtypes the family has rows for on this GPU (any GPU's for a fleet model with fp8-capable
        card), or every known dtype where the roofline prices the family."""
        if family not in self.dirs:
            return sorted(DTYPE_BYTES)
        meta = self.model(family).meta
        if "dtypes" not in meta:  # trained before dtypes were recorded: not checked
            return sorted(DTYPE_BYTES)
        if self.origin[family] == "own" or meta.get("hw"):
            return list(meta.get("dtypes", []))
        have = list(meta.get("dtypes_by_hw", {}).get(self.hw.name, [])) or list(meta.get("dtypes", []))
        return [d for d in have if d != "fp8" or self.hw.peak_tflops_fp8 > 0]

    def frame(self, family: str, df: pd.DataFrame) -> pd.DataFrame:
        """pred_time_us and pred_time_us_{p10,p50,p90} from the family's model: a GPU's own
        model prices with the card it was trained with, the fleet model with this card."""
        model = self.model(family)
        return model.predict(df, None if self.origin[family] == "own" else self.hw)

    def predict(self, family: str, df: pd.DataFrame, quantile: str = "p50") -> np.ndarray:
        if quantile not in QUANTILES:
            raise EstimatorError(f"quantile {quantile!r} is not one of {', '.join(QUANTILES)}")
        if family in self.dirs:
            return self.frame(family, df)[f"pred_time_us_{quantile}"].to_numpy(float)
        return roofline.predict_fn(self.hw)(family, df)

    def knows(self, family: str, op: str) -> bool:
        """Whether ``family``'s model was trained on rows of operator ``op`` (families whose model
        has no op vocabulary, or that use the roofline prior, answer True)."""
        if family not in self.trained:
            return True
        ops = self.model(family).meta.get("vocab", {}).get("op")
        return ops is None or op in ops

    def predict_fn(self, quantile: str = "p50"):
        return lambda family, df: self.predict(family, df, quantile)
