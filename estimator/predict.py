"""python -m estimator.predict hw=h100 +input=shapes.parquet +output=pred.parquet

Adds ``pred_time_us`` (the p50) and ``pred_time_us_{p10,p50,p90}`` to every row of a table of
shapes in profile-table columns (see profiler/tables.py). The family comes from ``family=``,
else from the file name (``gemm.parquet``), else from the columns. Rows without ``source`` /
``backend`` are priced for the serving context chosen at training (see the model sidecar).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

import conf
from conf import cli
from conf.files import atomic_write
from estimator.config import register
from estimator.features import SHAPE_COLUMNS, EstimatorError
from estimator.model import QUANTILES, warn_once
from estimator.predictors import Predictors
from estimator.roofline import predict_fn as roofline_predict

register()

# Shape columns that may be 0: heads and head_dim of elementwise ops other than RoPE.
MAY_BE_ZERO = {("elementwise", "num_heads"), ("elementwise", "num_kv_heads"), ("elementwise", "head_dim")}


def check_shapes(df: pd.DataFrame, family: str) -> None:
    """EstimatorError naming the first row whose shape is not a size: tokens, dims, heads,
    bytes and ranks count things, so they are >= 1 (a model would still price m=0 or m=-5)."""
    from estimator.features import check_query
    check_query(df, family)
    for col in SHAPE_COLUMNS[family]:
        if col in ("op", "phase"):
            continue
        low = 0 if (family, col) in MAY_BE_ZERO else 1
        values = pd.to_numeric(df[col]).to_numpy(dtype=float)
        bad = (values < low).nonzero()[0]
        if len(bad):
            raise EstimatorError(f"{family} row {int(bad[0])}: {col}={values[bad[0]]:g}; {col} must be >= {low} "
                                 f"({len(bad)} such rows)")


def guess_family(path: Path, df: pd.DataFrame, family: str = "") -> str:
    if family:
        if family not in SHAPE_COLUMNS:
            raise EstimatorError(f"unknown family {family!r}; choose one of {', '.join(SHAPE_COLUMNS)}")
        return family
    if path.stem in SHAPE_COLUMNS:
        return path.stem
    fits = [f for f, cols in SHAPE_COLUMNS.items() if set(cols) <= set(df.columns)]
    if len(fits) != 1:
        raise EstimatorError(f"cannot tell the operator family of {path} from its columns "
                             f"({'matches ' + ', '.join(fits) if fits else 'matches none'}); pass family=<one of "
                             f"{', '.join(SHAPE_COLUMNS)}>")
    return fits[0]


def predict_table(df: pd.DataFrame, family: str, predictors: Predictors) -> pd.DataFrame:
    """``df`` with the prediction columns appended (roofline where the family is untrained)."""
    if family in predictors.trained:
        pred = predictors.frame(family, df)
    else:
        from estimator.features import check_query
        check_query(df, family)
        warn_once(("predict-fallback", family), f"no trained {family} model for hw={predictors.hw.name}; "
                  "predicting the roofline prior (p10 = p50 = p90)")
        us = roofline_predict(predictors.hw)(family, df)
        pred = pd.DataFrame({"pred_time_us": us, **{f"pred_time_us_{q}": us for q in QUANTILES}}, index=df.index)
    return pd.concat([df.drop(columns=[c for c in pred.columns if c in df.columns]), pred], axis=1)


def run(cfg: DictConfig) -> Path:
    hw = conf.to_hw(cfg.hw)
    inp, out = cfg.get("input"), cfg.get("output")
    if not inp or not out:
        raise EstimatorError("give the table to price and where to write it: +input=shapes.parquet "
                             "+output=pred.parquet")
    inp, out = Path(inp), Path(out)
    if not inp.is_file():
        raise EstimatorError(f"input table {inp} does not exist")
    try:
        df = pd.read_parquet(inp)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise EstimatorError(f"cannot read {inp} as parquet: {type(exc).__name__}") from None
    family = guess_family(inp, df, cfg.family)
    check_shapes(df, family)
    predictors = Predictors.load(hw, cfg.data_dir, directory=cfg.estimators_dir or None)
    result = predict_table(df, family, predictors)
    atomic_write(out, lambda tmp: result.to_parquet(tmp, index=False))
    logging.getLogger("estimator").info("wrote %d %s predictions to %s", len(result), family, out)
    print(f"{len(result)} {family} rows priced on {hw.name} -> {out}")
    return out


def main() -> None:
    cli("predict", run)


if __name__ == "__main__":
    main()
