"""Structured configs of the estimator jobs (``conf/train.yaml``, ``conf/predict.yaml``).

The dataclasses type-check the YAML at composition, so ``xgb.max_depht=4`` fails with one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from profiler.tables import FAMILIES


@dataclass
class XgbConf:
    """Booster settings of the p50 model (squared error on log(measured / roofline))."""
    # depth 5 x 120 rounds: the H100 GEMM leave-one-model-out error of depth 6-8 x 150-300
    # rounds (4.4% median, 12.9% p90) at a third of the file size (0.33 MB).
    num_rounds: int = 120
    max_depth: int = 5
    learning_rate: float = 0.2
    min_child_weight: float = 1.0
    reg_lambda: float = 1.0
    max_bin: int = 256


@dataclass
class QuantileConf:
    """p10/p90: a small quantile booster on cross-fitted residuals of the p50 model."""
    folds: int = 2
    num_rounds: int = 40
    max_depth: int = 3
    learning_rate: float = 0.25


@dataclass
class EvalConf:
    kfold: int = 5
    leave_one_model_out: bool = True
    shape_groups: bool = True       # k-fold over shape groups (tables without model names)
    plot: bool = True


@dataclass
class TrainConf:
    hw: Any = MISSING
    data_dir: str = "data"
    profiles_dir: str = ""          # default: <data_dir>/profiles/<hw>
    out_dir: str = ""               # default: <data_dir>/estimators/<hw>
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    # all: every source trains, source/backend coded as features, queries priced as the newest
    # measurements of the engine (model.engine_rank); serve: only the rows of that source (the
    # others are set aside, with a warning).
    train_sources: str = "all"
    # {hw: {family: "source/backend"}}: the rows queries stand for on that GPU where end-to-end
    # engine runs contradict the newest table (conf/train.yaml says why for each entry)
    serve_override: dict[str, dict[str, str]] = field(default_factory=dict)
    # fp8: GEMM/MoE weights (model.weight_dtype) and attention KV cache (model.kv_dtype) rows.
    dtypes: list[str] = field(default_factory=lambda: ["float16", "bfloat16", "fp8"])
    # fleet=true: one model per family over every GPU with profiles and a cuda card (data/estimators/
    # fleet), evaluated leave-one-GPU-out; rows per GPU and family capped (deterministic subsample).
    fleet: bool = False
    fleet_max_rows_per_hw: int = 30000
    max_rows: int = 0               # >0: deterministic subsample per family (tests, quick looks)
    seed: int = 0
    # 1: OpenMP barriers on oversubscribed cores made 2 threads 10-40x slower here (measured)
    nthread: int = 1
    evaluate: bool = True
    xgb: XgbConf = field(default_factory=XgbConf)
    quantile: QuantileConf = field(default_factory=QuantileConf)
    eval: EvalConf = field(default_factory=EvalConf)


@dataclass
class PredictConf:
    hw: Any = MISSING
    data_dir: str = "data"
    estimators_dir: str = ""        # default: <data_dir>/estimators/<hw>
    family: str = ""                # default: guessed from the input file name or its columns


def register() -> None:
    from conf import register as register_shared
    register_shared()
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConf)
    cs.store(name="predict_schema", node=PredictConf)
