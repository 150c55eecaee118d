"""Measured anchors (estimator/anchors.py): a shape that was measured is priced as measured.

Hand-computed: a series whose booster residual is log 4 at m = 1 and log 2 at m = 4 shifts the
booster by log 4 at m = 1, log 2 at m = 4 and, between them, by the smaller of the two (log 2);
by nothing between points whose residuals disagree in sign, outside [1, 4], at another dtype
width, in another engine's table or for another shape.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import conf
from estimator.anchors import Anchors, build
from estimator.config import register
from estimator.model import FamilyModel
from tests.test_estimator import FAST, HW, synthetic_gemm

register()
REPO = Path(__file__).resolve().parents[1]


def _gemm_rows(points: dict[int, list[float]], dtype="bfloat16", n=4096, k=4096) -> pd.DataFrame:
    rows = [dict(m=m, n=n, k=k, time_us_median=10.0 * m, time_us_mean=np.nan) for m, ts in points.items() for _ in ts]
    return pd.DataFrame(rows).assign(source="aiconfigurator", backend="vllm-0.24.0", dtype=dtype)


def _anchors(points: dict[int, list[float]]) -> Anchors:
    rows = _gemm_rows(points)
    return Anchors("gemm", build(rows, "gemm", np.concatenate([ts for ts in points.values()])))


def _query(m, dtype="bfloat16", n=4096, k=4096, backend="vllm-0.24.0") -> pd.DataFrame:
    return pd.DataFrame(dict(m=np.asarray(m, float), n=n, k=k, dtype=dtype, source="aiconfigurator",
                             backend=backend))


def test_residual_carried_by_hand():
    a = _anchors({1: [math.log(4)], 4: [math.log(2)], 8: [-0.1]})
    got = a.log_shift(_query([1, 2, 4, 6, 8, 0.5, 16]))
    assert got == pytest.approx([math.log(4), math.log(2), math.log(2), 0.0, -0.1, 0.0, 0.0], abs=1e-12)


def test_only_the_same_series_shifts():
    a = _anchors({1: [math.log(4)], 4: [math.log(2)]})
    assert a.log_shift(_query([2], dtype="fp8"))[0] == 0.0                 # another width
    assert a.log_shift(_query([2], backend="vllm-0.14.0"))[0] == 0.0      # another engine's table
    assert a.log_shift(_query([2], n=8192))[0] == 0.0                     # another shape
    # float16 and bfloat16 are the same width: Vidur's fp16 rows serve a bf16 model (A100)
    assert a.log_shift(_query([2], dtype="float16"))[0] == pytest.approx(math.log(2))


def test_repeated_measurements_give_their_median():
    a = _anchors({1: [0.1, 0.2, 0.9], 4: [0.3]})
    assert a.log_shift(_query([1]))[0] == pytest.approx(0.2)


def test_fitted_model_prices_training_shapes_as_measured(tmp_path):
    df = synthetic_gemm()
    cfg = conf.compose("train", ["hw=h100", *FAST])
    model = FamilyModel.fit(df, "gemm", HW, cfg, meta={"serve": {"": {"source": "synthetic", "backend": "torch"}}})
    row = df.iloc[[17]]
    out = model.predict(row.drop(columns=["source", "backend"]))   # the serving context fills them in
    assert out["pred_time_us_p50"].iloc[0] == pytest.approx(row["time_us_median"].iloc[0], rel=1e-6)
    assert out["pred_time_us_p10"].iloc[0] <= out["pred_time_us_p50"].iloc[0] <= out["pred_time_us_p90"].iloc[0]
    # an unmeasured shape is the booster's alone, and the files carry the anchors
    assert model.anchors is not None and model.anchors.log_shift(row.assign(n=row["n"] * 3 + 1))[0] == 0.0
    model.save(tmp_path)
    again = FamilyModel.load(tmp_path, "gemm")
    assert again.predict(row)["pred_time_us_p50"].iloc[0] == pytest.approx(out["pred_time_us_p50"].iloc[0])
    # a fleet model (rows of several GPUs) has none: its series belong to other cards
    fleet = FamilyModel.fit(df, "gemm", {"h100": HW}, cfg, meta={"serve": {}})
    assert fleet.anchors is None


def test_shipped_h100_prices_mixtral_expert_block_as_measured():
    """aiconfigurator's H100 fused-MoE row for Mixtral at tp=4 (8192 tokens, balanced routing)
    is what the shipped model answers (the booster alone was 14 % under it)."""
    model = FamilyModel.load(REPO / "data" / "estimators" / "h100", "moe")
    rows = pd.read_parquet(REPO / "data" / "profiles" / "h100" / "moe.parquet")
    rows = rows[(rows.op == "moe_balanced") & (rows.hidden_size == 4096) & (rows.num_experts == 8)
                & (rows.tp == 4) & (rows.ep == 1) & (rows.num_tokens == 8192) & (rows.dtype == "bfloat16")
                & (rows.backend == "vllm-0.24.0")]
    assert len(rows) == 1
    query = rows.drop(columns=["source", "backend", "op"])
    got = model.predict(query)["pred_time_us_p50"].iloc[0]
    assert got == pytest.approx(float(rows["time_us_mean"].iloc[0]), rel=1e-6)
