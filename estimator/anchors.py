"""Measured anchors: a query whose shape was measured is priced as measured.

The boosters fit every row of a family at once and leave a few percent of error on the very
rows they were trained on, more where one family spans many kernels: on H100 the MoE model
under-prices Mixtral's tp=4 expert block at 1-16k tokens by 4-14 %. Where the profile holds the
query's series (same measurement context, dtype width and every shape column but the swept one)
at sweep values on both sides of the query, the booster's error at those measured points is
carried over: at a measured point all of it (the answer is the measurement, the median where a
point was measured twice); between two measured points, where both residuals (log measured - log
booster) have the same sign, the smaller of them, and nothing where they disagree (a "minmod"
limiter: a bias the series shows on both sides is corrected, noise at one point is not spread).
Between points the booster keeps the shape it learned (GEMM tile steps: 4097 tokens cost more
than 4096, which interpolating the times themselves would smooth away). Outside a series'
measured sweep, for shapes never measured, and for families without a single sweep axis
(attention's grid of batch, query and KV lengths), the booster prices alone. The p10/p90 band
moves with the p50. k-fold error on H100 (median/p90 %): GEMM 3.6/10.8 -> 2.5/9.7, MoE
6.0/17.5 -> 3.8/13.1; interpolating the residual linearly instead: 2.6/10.9 and 3.5/12.4, and
interpolating the measured times themselves: GEMM p90 15.2 (tile steps smoothed away).

File: ``<family>.anchors.parquet`` beside the booster (one row per measured point: the key
columns, the sweep column, ``time_us`` and the booster's ``log_residual`` there), written at
training from the rows it trained on, so held-out evaluation never reads its own test rows.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from conf.files import write_bytes
from estimator.features import dtype_bytes, measured_us

# family -> (the swept shape column, the columns that name one measured series)
SERIES = {
    "gemm": ("m", ["source", "backend", "dtype_bytes", "n", "k"]),
    "moe": ("num_tokens", ["source", "backend", "dtype_bytes", "op", "hidden_size", "ffn_size",
                           "num_experts", "top_k", "ep", "tp"]),
}
CATEGORICAL = ("source", "backend", "op")


def _keyed(df: pd.DataFrame, family: str) -> pd.DataFrame:
    """The key columns of ``df`` in one canonical form (strings, float numbers, dtype as bytes)."""
    sweep, keys = SERIES[family]
    out = {}
    for c in keys:
        if c == "dtype_bytes":
            out[c] = dtype_bytes(df)
        elif c in CATEGORICAL:
            out[c] = df[c].astype(str).to_numpy(object) if c in df.columns else np.full(len(df), "", object)
        else:
            out[c] = pd.to_numeric(df[c]).to_numpy(float)
    out[sweep] = pd.to_numeric(df[sweep]).to_numpy(float)
    return pd.DataFrame(out, index=df.index)


def build(df: pd.DataFrame, family: str, log_residual: np.ndarray) -> pd.DataFrame | None:
    """One row per measured point of ``df`` (training rows): key columns, sweep, the median
    time_us and the median of the booster's ``log_residual`` (log measured - log predicted)."""
    if family not in SERIES or df.empty:
        return None
    sweep, keys = SERIES[family]
    tab = _keyed(df, family).assign(time_us=measured_us(df), log_residual=np.asarray(log_residual, float))
    return tab.groupby([*keys, sweep], sort=True)[["time_us", "log_residual"]].median().reset_index()


def _minmod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smaller in magnitude of two residuals that agree in sign; 0 where they disagree."""
    return np.where(np.sign(a) == np.sign(b), np.sign(a) * np.minimum(np.abs(a), np.abs(b)), 0.0)


class Anchors:
    """The measured series of one family, ready to interpolate."""

    def __init__(self, family: str, table: pd.DataFrame):
        self.family, self.table = family, table
        sweep, keys = SERIES[family]
        self._series = {key: (np.log(g[sweep].to_numpy(float)), g["log_residual"].to_numpy(float))
                        for key, g in table.groupby(keys, sort=False)}

    def __len__(self) -> int:
        return len(self.table)

    def log_shift(self, df: pd.DataFrame) -> np.ndarray:
        """What to add to the booster's log prediction of each query row: its series' residual
        at a measured sweep value, the limited one of its two neighbours between them; 0 where
        the row's shape has no series or its sweep value lies outside the measured ones."""
        sweep, keys = SERIES[self.family]
        out = np.zeros(len(df))
        q = _keyed(df, self.family).reset_index(drop=True)
        logx = np.log(np.maximum(q[sweep].to_numpy(float), 1e-30))
        for key, idx in q.groupby(keys, sort=False).indices.items():
            series = self._series.get(key if isinstance(key, tuple) else (key,))
            if series is None:
                continue
            xs, ys = series
            x = logx[idx]
            inside = (x >= xs[0] - 1e-9) & (x <= xs[-1] + 1e-9)
            x = x[inside]
            last = len(xs) - 1
            j = np.clip(np.searchsorted(xs, x + 1e-9, side="right") - 1, 0, last)
            here, nxt = ys[j], ys[np.minimum(j + 1, last)]
            out[idx[inside]] = np.where(np.abs(x - xs[j]) <= 1e-9, here, _minmod(here, nxt))
        return out

    def save(self, directory: str | Path) -> Path:
        buf = io.BytesIO()
        self.table.to_parquet(buf, index=False)
        return write_bytes(Path(directory) / f"{self.family}.anchors.parquet", buf.getvalue())

    @classmethod
    def load(cls, directory: str | Path, family: str) -> "Anchors | None":
        path = Path(directory) / f"{family}.anchors.parquet"
        return cls(family, pd.read_parquet(path)) if path.is_file() else None
