"""Held-out error of the predictors: k-fold and leave-one-model-out, a table and a plot.

APE = |predicted - measured| / measured of the p50 prediction, in percent. Leave-one-model-out
holds out every row of one model (only rows with a ``model`` name; generic shapes always train),
so it measures what matters: pricing a model the profiles never saw.
"""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd

from conf.files import atomic_write
from conf.schema import HwConf
from estimator.features import measured_us
from estimator.model import FamilyModel, folds


def ape(pred: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return 100.0 * np.abs(pred - measured) / measured


def _summary(err: np.ndarray) -> dict:
    if len(err) == 0:
        return {"n": 0}
    return {"n": int(len(err)), "median_ape": float(np.median(err)), "p90_ape": float(np.percentile(err, 90))}


def kfold(df: pd.DataFrame, family: str, hw: HwConf, cfg) -> tuple[dict, pd.DataFrame]:
    """Out-of-fold p10/p50/p90 for every row, their APE summary and p10-p90 coverage."""
    k = min(cfg.eval.kfold, len(df))
    pred = pd.DataFrame(index=df.index, columns=["pred_time_us_p10", "pred_time_us_p50", "pred_time_us_p90"],
                        dtype=float)
    for test in folds(len(df), k, cfg.seed):
        train = np.setdiff1d(np.arange(len(df)), test)
        model = FamilyModel.fit(df.iloc[train], family, hw, cfg, meta={"serve": {}})
        model.quiet = True
        out = model.predict(df.iloc[test])
        pred.iloc[test] = out[pred.columns].to_numpy()
    measured = measured_us(df)
    err = ape(pred["pred_time_us_p50"].to_numpy(float), measured)
    inside = (measured >= pred["pred_time_us_p10"].to_numpy(float)) & (measured <= pred["pred_time_us_p90"].to_numpy(float))
    out = _summary(err) | {"folds": k, "coverage_p10_p90": float(inside.mean())}
    out["by_source"] = {s: _summary(err[(df["source"] == s).to_numpy()]) for s in sorted(df["source"].unique())}
    return out, pred


def leave_one_model_out(df: pd.DataFrame, family: str, hw: HwConf, cfg) -> dict:
    named = df["model"].astype(str) if "model" in df.columns else pd.Series([""] * len(df), index=df.index)
    models = sorted(m for m in named.unique() if m)
    if len(models) < 2:
        return {"n": 0, "note": "fewer than two named models in the table"}
    p50_only = copy.deepcopy(cfg)
    p50_only.quantile.folds = 0  # held-out APE is about the p50; the band is checked by k-fold
    errors, per_model, held = [], {}, []
    for name in models:
        test = (named == name).to_numpy()
        model = FamilyModel.fit(df[~test], family, hw, p50_only, meta={"serve": {}})
        model.quiet = True
        rows = df[test]
        err = ape(model.predict(rows)["pred_time_us"].to_numpy(float), measured_us(rows))
        per_model[name] = _summary(err)
        errors.append(err)
        held.append(rows)
    err, rows = np.concatenate(errors), pd.concat(held)
    out = _summary(err) | {"per_model": per_model}
    if family == "elementwise":  # norms are a target of their own; ops differ a lot
        ops = rows["op"].astype(str).to_numpy()
        out["per_op"] = {op: _summary(err[ops == op]) for op in sorted(set(ops))}
        out["norms"] = _summary(err[np.isin(ops, ["rmsnorm", "layernorm"])])
    return out


def plot(oof: dict[str, tuple[pd.DataFrame, pd.DataFrame]], path, title: str) -> None:
    """Predicted (out-of-fold p50) vs measured, log-log, one panel per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(oof)
    fig, axes = plt.subplots(1, max(len(fams), 1), figsize=(3.2 * max(len(fams), 1), 3.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, fam in zip(axes[0], fams):
        df, pred = oof[fam]
        idx = rng.permutation(len(df))[:4000]
        meas = measured_us(df)[idx]
        p = pred["pred_time_us_p50"].to_numpy(float)[idx]
        for src in sorted(df["source"].unique()):
            sel = (df["source"].to_numpy()[idx] == src)
            ax.scatter(meas[sel], p[sel], s=2, alpha=0.4, label=src, rasterized=True)
        lo, hi = max(min(meas.min(), p.min()), 1e-2), max(meas.max(), p.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", title=fam, xlabel="measured µs")
        ax.legend(fontsize=6, markerscale=3)
    axes[0][0].set_ylabel("predicted µs (k-fold p50)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
