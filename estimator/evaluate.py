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
    context = (df["source"].astype(str) + "/" + df["backend"].astype(str) + "/" + df["dtype"].astype(str)).to_numpy()
    out["by_context"] = {c: _summary(err[context == c]) for c in sorted(set(context))}
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


# Columns that say which model-like shape a row is: rows sharing them are held out together by
# ``shape_groups`` (tables without model names, e.g. aiconfigurator's grids, MoE and MLA).
SHAPE_GROUPS = {"gemm": ["n", "k"], "attention": ["num_heads", "num_kv_heads", "head_dim"],
                "elementwise": ["op", "width"], "collective": ["op", "world_size"],
                "moe": ["hidden_size", "ffn_size", "num_experts", "top_k"],
                "mla": ["num_heads", "kv_lora_rank", "qk_rope_head_dim", "hidden_size"], "bmm": ["batch", "n", "k"]}


def shape_groups(df: pd.DataFrame, family: str, hw, cfg) -> dict:
    """k-fold over shape groups: every row of one shape (e.g. one MoE config, one attention head
    layout) is held out at once, so the error is that of pricing a shape never measured. Per
    fold: the range of the held-out shapes."""
    cols = [c for c in SHAPE_GROUPS.get(family, []) if c in df.columns]
    if not cols:
        return {"n": 0}
    if family == "collective":  # message sizes, 4 octaves at a time: hold out a size range
        df = df.assign(size_octaves=(np.log2(df["size_bytes"].clip(lower=1)) // 4).astype(int) * 4)
        cols = ["op", "size_octaves"]
    keys = df[cols].astype(str).agg("|".join, axis=1)
    uniq = np.array(sorted(keys.unique()))
    k = min(cfg.eval.kfold, len(uniq))
    if k < 2:
        return {"n": 0, "note": "fewer than two shapes"}
    p50_only = copy.deepcopy(cfg)
    p50_only.quantile.folds = 0
    errors, per_fold = [], {}
    for i, test_keys in enumerate(folds(len(uniq), k, cfg.seed)):
        test = keys.isin(uniq[test_keys]).to_numpy()
        model = FamilyModel.fit(df[~test], family, hw, p50_only, meta={"serve": {}})
        model.quiet = True
        rows = df[test]
        err = ape(model.predict(rows)["pred_time_us"].to_numpy(float), measured_us(rows))
        ranges = ", ".join(f"{c} {rows[c].min()}-{rows[c].max()}" for c in cols if c not in ("op", "size_octaves"))
        if family == "collective":
            ranges = f"size_bytes {rows['size_bytes'].min()}-{rows['size_bytes'].max()}"
        per_fold[f"fold {i + 1}: {len(test_keys)} shapes ({ranges})"] = _summary(err)
        errors.append(err)
    return _summary(np.concatenate(errors)) | {"by": cols, "per_fold": per_fold}


def leave_one_gpu_out(df: pd.DataFrame, family: str, cards: dict, cfg) -> dict:
    """Train the fleet model on every other GPU, price the held-out GPU's rows from its card."""
    p50_only = copy.deepcopy(cfg)
    p50_only.quantile.folds = 0
    per_hw, errors = {}, []
    for name in sorted(cards):
        test = (df["hw"].astype(str) == name).to_numpy()
        if not test.any() or test.all():
            continue
        model = FamilyModel.fit(df[~test], family, {n: c for n, c in cards.items() if n != name}, p50_only,
                                meta={"serve": {}})
        model.quiet = True
        rows = df[test]
        err = ape(model.predict(rows, cards[name])["pred_time_us"].to_numpy(float), measured_us(rows))
        entry = _summary(err)
        if "dtype" in rows:
            entry["by_dtype"] = {d: _summary(err[(rows["dtype"].astype(str) == d).to_numpy()])
                                 for d in sorted(rows["dtype"].astype(str).unique())}
        if "phase" in rows:
            entry["by_phase"] = {p: _summary(err[(rows["phase"].astype(str) == p).to_numpy()])
                                 for p in sorted(rows["phase"].astype(str).unique())}
        per_hw[name] = entry
        errors.append(err)
    if not errors:
        return {"n": 0, "note": "fewer than two GPUs"}
    return _summary(np.concatenate(errors)) | {"per_hw": per_hw}


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
