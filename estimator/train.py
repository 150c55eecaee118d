"""python -m estimator.train hw=h100: fit one predictor per operator family and evaluate it.

Reads data/profiles/<hw>/<family>.parquet, keeps measured rows (status ok) of the configured
dtypes, fits the family model (see estimator/model.py) and writes it with a sidecar to
data/estimators/<hw>/, plus report.md, report.json and pred_vs_measured.png. A family without
data is recorded as "roofline" (the simulator then uses the roofline prior for it).
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import conf
from conf import ConfigError, cli
from conf.files import write_bytes
from estimator import evaluate as ev
from estimator.config import register
from estimator.features import SHAPE_COLUMNS, measured_us
from estimator.model import FamilyModel, serving_context
from profiler.tables import file_sha256
from profiler import tables

log = logging.getLogger("estimator")
register()


def training_rows(df: pd.DataFrame, family: str, cfg) -> tuple[pd.DataFrame, str]:
    """Measured rows that train: status ok, a positive time (median, else mean), finite shapes, wanted dtypes."""
    n0 = len(df)
    t = measured_us(df)
    keep = (df["status"].astype(str) == "ok") & np.isfinite(t) & (t > 0)
    for c in SHAPE_COLUMNS[family]:
        if c not in ("op", "phase"):
            keep &= np.isfinite(pd.to_numeric(df[c], errors="coerce"))
    df = df[keep]
    note = f"{len(df)} of {n0} rows measured ok"
    if cfg.dtypes and family != "collective":  # collectives move bytes; their dtype does not matter
        wanted = df["dtype"].astype(str).isin(list(cfg.dtypes))
        note += f"; {int(wanted.sum())} in dtypes {list(cfg.dtypes)}"
        df = df[wanted]
    if cfg.max_rows and len(df) > cfg.max_rows:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(df), cfg.max_rows, replace=False))
        df = df.iloc[idx]
        note += f"; subsampled to {cfg.max_rows}"
    return df.reset_index(drop=True), note


def run(cfg: DictConfig) -> dict:
    """Train (and evaluate) every configured family; returns the report dict."""
    hw = conf.to_hw(cfg.hw)
    profiles = Path(cfg.profiles_dir or Path(cfg.data_dir) / "profiles" / hw.name)
    out = Path(cfg.out_dir or Path(cfg.data_dir) / "estimators" / hw.name)
    if cfg.train_sources not in ("serve", "all"):
        raise ConfigError(f"train_sources={cfg.train_sources!r}; choose serve or all")
    unknown = [f for f in cfg.families if f not in tables.FAMILIES]
    if unknown:
        raise ConfigError(f"unknown families {unknown}; choose from {', '.join(tables.FAMILIES)}")
    if not any((profiles / f"{f}.parquet").is_file() for f in cfg.families):
        raise ConfigError(f"no profile tables ({', '.join(cfg.families)}).parquet in {profiles}; "
                          f"profile or import data for hw={hw.name} first")
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings.pop("hw", None)
    report = {"hw": hw.name, "profiles_dir": str(profiles), "families": {},
              "versions": {"xgboost": xgb.__version__, "pandas": pd.__version__, "python": platform.python_version()},
              "settings": {k: settings[k] for k in ("prefer_sources", "train_sources", "dtypes", "max_rows", "seed", "nthread",
                                                    "xgb", "quantile", "eval")}}
    oof = {}
    for family in tqdm(list(cfg.families), desc=f"train {hw.name}", unit="family"):
        path = profiles / f"{family}.parquet"
        entry: dict = {}
        report["families"][family] = entry
        if not path.is_file():
            entry.update(status="roofline", note=f"no {path.name}; the simulator uses the roofline prior")
            _remove_model(out, family)
            continue
        df, note = training_rows(tables.read(path, family), family, cfg)
        entry["note"] = note
        if len(df) < 10:
            entry.update(status="roofline", note=note + "; too few rows to train, roofline prior used")
            _remove_model(out, family)
            continue
        serve = serving_context(df, cfg.prefer_sources, family)
        if cfg.train_sources == "serve":
            df = df[df["source"].astype(str) == serve["source"]].reset_index(drop=True)
            entry["note"] += f"; {len(df)} rows of serving source {serve['source']} train"
        meta = {"serve": serve, "data_sha256": file_sha256(path), "data_path": str(path),
                "sources": df["source"].value_counts().sort_index().to_dict(),
                "settings": report["settings"]}
        t0 = time.perf_counter()
        model = FamilyModel.fit(df, family, hw, cfg, meta=meta)
        entry.update(status="trained", rows=len(df), serve=serve, sources=meta["sources"],
                     train_s=round(time.perf_counter() - t0, 2), data_sha256=meta["data_sha256"])
        if cfg.evaluate:
            t0 = time.perf_counter()
            entry["kfold"], pred = ev.kfold(df, family, hw, cfg)
            oof[family] = (df, pred)
            if cfg.eval.leave_one_model_out:
                entry["leave_one_model_out"] = ev.leave_one_model_out(df, family, hw, cfg)
            entry["eval_s"] = round(time.perf_counter() - t0, 2)
            model.meta["metrics"] = {k: entry[k] for k in ("kfold", "leave_one_model_out") if k in entry}
        model.save(out)
    out.mkdir(parents=True, exist_ok=True)
    _keep_other_families(report, out / "report.json")
    if oof and cfg.eval.plot:
        ev.plot(oof, out / "pred_vs_measured.png", f"{hw.name}: out-of-fold p50 vs measured")
    write_bytes(out / "report.json", json.dumps(report, indent=1, sort_keys=True).encode())
    text = report_markdown(report)
    write_bytes(out / "report.md", text.encode())
    print(text)
    return report


def _keep_other_families(report: dict, path: Path) -> None:
    """Training a subset (families=[gemm]) keeps the other families' entries of the last report."""
    try:
        previous = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        previous = {}
    if previous.get("hw") == report["hw"]:
        for family, entry in previous.get("families", {}).items():
            report["families"].setdefault(family, entry)


def _remove_model(out: Path, family: str) -> None:
    for suffix in (".ubj", ".q.ubj", ".json"):
        (out / f"{family}{suffix}").unlink(missing_ok=True)


def _fmt(d: dict | None, key: str) -> str:
    return f"{d[key]:.1f}" if d and key in d else "-"


def report_markdown(report: dict) -> str:
    lines = [f"# opcast estimator report: {report['hw']}", "",
             f"Data: `{report['profiles_dir']}`. APE = |pred - measured| / measured of the p50, in %. "
             "k-fold: random folds over all rows; LOMO: leave-one-model-out over rows with a model name.", "",
             "| family | status | rows | serve (source/backend) | k-fold median | k-fold p90 | p10-p90 coverage "
             "| LOMO median | LOMO p90 | LOMO rows | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fam, e in report["families"].items():
        kf, lo = e.get("kfold"), e.get("leave_one_model_out")
        serve = f"{e['serve']['source']}/{e['serve']['backend']}" if "serve" in e else "-"
        cov = f"{100 * kf['coverage_p10_p90']:.0f}%" if kf and "coverage_p10_p90" in kf else "-"
        lines.append(f"| {fam} | {e['status']} | {e.get('rows', 0)} | {serve} | {_fmt(kf, 'median_ape')} | "
                     f"{_fmt(kf, 'p90_ape')} | {cov} | {_fmt(lo, 'median_ape')} | {_fmt(lo, 'p90_ape')} | "
                     f"{lo.get('n', 0) if lo else 0} | {e.get('train_s', '-')} |")
    lines.append("")
    for fam, e in report["families"].items():
        lines.append(f"- **{fam}**: {e.get('note', '')}")
        lo = e.get("leave_one_model_out") or {}
        for name, m in (lo.get("per_model") or {}).items():
            lines.append(f"  - held out {name}: median {m['median_ape']:.1f}%, p90 {m['p90_ape']:.1f}% ({m['n']} rows)")
        for op, m in (lo.get("per_op") or {}).items():
            lines.append(f"  - LOMO op {op}: median {m['median_ape']:.1f}%, p90 {m['p90_ape']:.1f}% ({m['n']} rows)")
        if lo.get("norms", {}).get("n"):
            m = lo["norms"]
            lines.append(f"  - LOMO norms (rmsnorm + layernorm): median {m['median_ape']:.1f}%, "
                         f"p90 {m['p90_ape']:.1f}% ({m['n']} rows)")
    return "\n".join(lines) + "\n"


def main() -> None:
    cli("train", run)


if __name__ == "__main__":
    main()
