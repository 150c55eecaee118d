"""python -m estimator.train hw=h100: fit one predictor per operator family and evaluate it.

Reads data/profiles/<hw>/<family>.parquet, keeps measured rows (status ok) of the configured
dtypes, fits the family model (see estimator/model.py) and writes it with a sidecar, plus
report.md, report.json and pred_vs_measured.png, to ``out_dir``: by default
<data_dir>/estimators/<hw>, except that the predictors shipped in this repository's data/ are
only replaced when asked (``out_dir=data/estimators/<hw>``); otherwise a training writes to
outputs/estimators/<hw>. It prints where it wrote. A family without data is recorded as
"roofline" (the simulator then uses the fleet model or the roofline prior).

python -m estimator.train fleet=true: the same over every GPU with profiles and a card in
conf/hw (one model per family, the card's numbers as features) -> data/estimators/fleet/ (the
same rule: outputs/estimators/fleet/ unless asked), with the leave-one-GPU-out error per family
and GPU in its report.
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
from estimator.predictors import FLEET
from profiler.tables import file_sha256
from profiler import tables

log = logging.getLogger("estimator")
register()
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "estimators"


def default_out_dir(data_dir: str | Path, hw_name: str) -> Path:
    """<data_dir>/estimators/<hw>, unless that is the shipped predictors' directory: a training
    replaces those only when asked (out_dir=...), so it goes to outputs/estimators/<hw>."""
    d = Path(data_dir) / "estimators" / hw_name
    return Path("outputs") / "estimators" / hw_name if d.resolve().is_relative_to(SHIPPED) else d


def set_aside(what: str, df: pd.DataFrame, keep, reason: str) -> str:
    """Log (warning) and describe rows that do not train, by source/backend; "" if none."""
    dropped = df[~np.asarray(keep)]
    if dropped.empty:
        return ""
    by = dropped.groupby([dropped["source"].astype(str), dropped["backend"].astype(str)]).size()
    text = f"{len(dropped)} rows set aside ({reason}: " + ", ".join(f"{s}/{b} {n}" for (s, b), n in by.items()) + ")"
    log.warning("%s: %s", what, text)
    return "; " + text


def training_rows(df: pd.DataFrame, family: str, cfg, what: str = "") -> tuple[pd.DataFrame, str]:
    """Measured rows that train: status ok, a positive time (median, else mean), finite shapes,
    wanted dtypes. Every row set aside for a reason other than a failed measurement is warned about."""
    n0 = len(df)
    t = measured_us(df)
    keep = (df["status"].astype(str) == "ok") & np.isfinite(t) & (t > 0)
    for c in SHAPE_COLUMNS[family]:
        if c not in ("op", "phase"):
            keep &= np.isfinite(pd.to_numeric(df[c], errors="coerce"))
    df = df[keep]
    note = f"{len(df)} of {n0} rows measured ok"
    if cfg.dtypes and family != "collective":  # collectives move bytes; their dtype does not matter
        wanted = df["dtype"].astype(str).isin(list(cfg.dtypes)).to_numpy()
        note += set_aside(what or family, df, wanted, f"dtype not in {list(cfg.dtypes)}")
        df = df[wanted]
    if cfg.max_rows and len(df) > cfg.max_rows:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(df), cfg.max_rows, replace=False))
        df = df.iloc[idx]
        note += f"; subsampled to {cfg.max_rows}"
    return df.reset_index(drop=True), note


def choose_sources(df: pd.DataFrame, family: str, cfg, what: str, hw_name: str = "") -> tuple[pd.DataFrame, dict, str]:
    """(training rows, serving context, note): every source trains (train_sources=all) or only
    the serving context's (serve; the others are set aside with a warning). The context is the
    newest engine's rows (``serving_context``), unless ``serve_override`` names another for this
    GPU and family (where end-to-end engine runs on that GPU contradict the newest table)."""
    serve = serving_context(df, family)
    note = ""
    chosen = (cfg.get("serve_override") or {}).get(hw_name, {}).get(family)
    if chosen:
        source, _, backend = str(chosen).partition("/")
        have = sorted(set(df["source"].astype(str) + "/" + df["backend"].astype(str)))
        if f"{source}/{backend}" in have:
            serve[""] = dict(serve[""], source=source, backend=backend)
            note = f"; serves {chosen} (serve_override, not the newest engine's {what} rows)"
        else:   # e.g. a user's own profile of this GPU: the override's evidence is about other rows
            note = (f"; serve_override {chosen} has no rows here ({what} rows come from {', '.join(have)}): "
                    f"serves the newest engine's")
    if cfg.train_sources == "serve":
        contexts = {(c["source"], c["backend"]) for c in serve.values()}
        pair = list(zip(df["source"].astype(str), df["backend"].astype(str)))
        keep = np.array([p in contexts for p in pair])
        note = set_aside(what, df, keep, "train_sources=serve")
        df = df[keep].reset_index(drop=True)
    return df, serve, note


def run(cfg: DictConfig) -> dict:
    """Train (and evaluate) every configured family; returns the report dict."""
    hw = conf.to_hw(cfg.hw)
    profiles = Path(cfg.profiles_dir or Path(cfg.data_dir) / "profiles" / hw.name)
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg.data_dir, hw.name)
    if cfg.train_sources not in ("serve", "all"):
        raise ConfigError(f"train_sources={cfg.train_sources!r}; choose serve or all")
    unknown = [f for f in cfg.families if f not in tables.FAMILIES]
    if unknown:
        raise ConfigError(f"unknown families {unknown}; choose from {', '.join(tables.FAMILIES)}")
    if cfg.fleet:
        return run_fleet(cfg)
    if not any((profiles / f"{f}.parquet").is_file() for f in cfg.families):
        raise ConfigError(f"no profile tables ({', '.join(cfg.families)}).parquet in {profiles}; "
                          f"profile or import data for hw={hw.name} first")
    report = {"hw": hw.name, "profiles_dir": str(profiles), "families": {},
              "versions": {"xgboost": xgb.__version__, "pandas": pd.__version__, "python": platform.python_version()},
              "settings": _settings(cfg)}
    oof = {}
    for family in tqdm(list(cfg.families), desc=f"train {hw.name}", unit="family"):
        path = profiles / f"{family}.parquet"
        entry: dict = {}
        report["families"][family] = entry
        if not path.is_file():
            entry.update(status="roofline", note=f"no {path.name}; the simulator uses the roofline prior")
            _remove_model(out, family)
            continue
        df, note = training_rows(tables.read(path, family), family, cfg, f"{hw.name}/{family}")
        entry["note"] = note
        if len(df) < 10:
            entry.update(status="roofline", note=note + "; too few rows to train, fleet model or roofline prior used")
            _remove_model(out, family)
            continue
        df, serve, note = choose_sources(df, family, cfg, f"{hw.name}/{family}", hw.name)
        entry["note"] += note
        meta = {"serve": serve, "data_sha256": file_sha256(path), "data_path": str(path),
                "sources": _counts(df), "settings": report["settings"]}
        fit_and_evaluate(df, family, hw, cfg, meta, entry, oof, out)
    return _write_report(report, oof, out, cfg, hw.name)


def _write_report(report: dict, oof: dict, out: Path, cfg, title: str) -> dict:
    """report.json, report.md (printed) and the out-of-fold plot; says where they went."""
    out.mkdir(parents=True, exist_ok=True)
    _keep_other_families(report, out / "report.json")
    if oof and cfg.eval.plot:
        ev.plot(oof, out / "pred_vs_measured.png", f"{title}: out-of-fold p50 vs measured")
    write_bytes(out / "report.json", json.dumps(report, indent=1, sort_keys=True).encode())
    text = report_markdown(report)
    write_bytes(out / "report.md", text.encode())
    print(text)
    _say_where(report, out, cfg)
    return report


def _say_where(report: dict, out: Path, cfg) -> None:
    """Where the models went, and how the simulator gets them when that is not where it reads."""
    name = report["hw"]
    trained = [f for f, e in report["families"].items() if e.get("status") == "trained"]
    print(f"wrote {len(trained)} trained families ({', '.join(trained) or 'none'}) and the report to {out}")
    if not out.resolve().is_relative_to(SHIPPED) and Path(cfg.data_dir).resolve() / "estimators" == SHIPPED:
        print(f"the simulator reads data/estimators/{name}: to use these predictors, train with "
              f"out_dir=data/estimators/{name} (replaces the shipped ones) or copy them there")


def _settings(cfg) -> dict:
    settings = OmegaConf.to_container(cfg, resolve=True)
    return {k: settings[k] for k in ("train_sources", "serve_override", "dtypes", "max_rows", "seed", "nthread",
                                     "fleet", "fleet_max_rows_per_hw", "xgb", "quantile", "eval")}


def _counts(df: pd.DataFrame) -> dict[str, int]:
    keys = df["source"].astype(str) + "/" + df["backend"].astype(str)
    return {k: int(v) for k, v in keys.value_counts().sort_index().items()}


def fit_and_evaluate(df: pd.DataFrame, family: str, hw, cfg, meta: dict, entry: dict, oof: dict, out: Path,
                     cards: dict | None = None) -> None:
    """Fit the family model on ``df`` (one GPU's card ``hw``, or ``cards`` for the fleet), evaluate
    it (k-fold, leave-one-model-out, shape groups, leave-one-GPU-out for the fleet), save it."""
    t0 = time.perf_counter()
    model = FamilyModel.fit(df, family, cards or hw, cfg, meta=meta)
    entry.update(status="trained", rows=len(df), serve=meta["serve"], sources=meta["sources"],
                 dtypes=model.meta["dtypes"], train_s=round(time.perf_counter() - t0, 2),
                 data_sha256=meta["data_sha256"])
    if cfg.evaluate:
        t0 = time.perf_counter()
        fit_hw = cards or hw
        entry["kfold"], pred = ev.kfold(df, family, fit_hw, cfg)
        oof[family] = (df, pred)
        if cfg.eval.leave_one_model_out:
            entry["leave_one_model_out"] = ev.leave_one_model_out(df, family, fit_hw, cfg)
        if cfg.eval.shape_groups:
            entry["shape_groups"] = ev.shape_groups(df, family, fit_hw, cfg)
        if cards:
            entry["leave_one_gpu_out"] = ev.leave_one_gpu_out(df, family, cards, cfg)
        entry["eval_s"] = round(time.perf_counter() - t0, 2)
        model.meta["metrics"] = {k: entry[k] for k in ("kfold", "leave_one_model_out", "shape_groups",
                                                       "leave_one_gpu_out") if k in entry}
    model.save(out)


def fleet_cards(data_dir: Path) -> dict:
    """Cards of every GPU with a profile directory and a conf/hw card (device cuda)."""
    cards = {}
    root = data_dir / "profiles"
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        card = conf.CONF_DIR / "hw" / f"{d.name}.yaml"
        if card.is_file():
            hw = conf.to_hw(OmegaConf.load(card))
            if hw.device == "cuda":
                cards[hw.name] = hw
    return cards


def run_fleet(cfg: DictConfig) -> dict:
    """python -m estimator.train fleet=true: one model per family over every GPU's rows."""
    data_dir = Path(cfg.data_dir)
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(data_dir, FLEET)
    cards = fleet_cards(data_dir)
    if len(cards) < 2:
        raise ConfigError(f"fleet=true needs profiles of two or more GPUs with cards in conf/hw; found "
                          f"{', '.join(cards) or 'none'} under {data_dir / 'profiles'}")
    report = {"hw": FLEET, "profiles_dir": str(data_dir / "profiles"), "gpus": sorted(cards), "families": {},
              "versions": {"xgboost": xgb.__version__, "pandas": pd.__version__, "python": platform.python_version()},
              "settings": _settings(cfg)}
    oof = {}
    for family in tqdm(list(cfg.families), desc="train fleet", unit="family"):
        entry: dict = {}
        report["families"][family] = entry
        frames, notes, hashes = [], [], {}
        for name in sorted(cards):
            path = data_dir / "profiles" / name / f"{family}.parquet"
            if not path.is_file():
                continue
            df, note = training_rows(tables.read(path, family), family, cfg, f"{name}/{family}")
            cap = int(cfg.fleet_max_rows_per_hw)
            if cap and len(df) > cap:  # stratified by nothing but the seed: a deterministic subsample
                df = df.iloc[np.sort(np.random.default_rng(cfg.seed).choice(len(df), cap, replace=False))]
                note += f"; {cap} sampled for the fleet"
            frames.append(df.assign(hw=name))
            notes.append(f"{name}: {note}")
            hashes[name] = file_sha256(path)
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if len(df) < 10 or df["hw"].nunique() < 2:
            entry.update(status="roofline", note="; ".join(notes) + "; fewer than two GPUs with rows")
            _remove_model(out, family)
            continue
        df, serve, note = choose_sources(df, family, cfg, f"fleet/{family}", FLEET)
        entry["note"] = "; ".join(notes) + note
        meta = {"serve": serve, "data_sha256": hashes, "sources": _counts(df), "settings": report["settings"],
                "dtypes_by_hw": {n: sorted(g["dtype"].astype(str).unique()) for n, g in df.groupby("hw")}}
        fit_and_evaluate(df, family, None, cfg, meta, entry, oof, out, cards={n: cards[n] for n in df["hw"].unique()})
    return _write_report(report, oof, out, cfg, "fleet")


def _keep_other_families(report: dict, path: Path) -> None:
    """Training a subset (families=[gemm]) keeps the other families' entries of the last report."""
    try:
        previous = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        previous = {}
    if previous.get("hw") == report["hw"]:
        for family, entry in previous.get("families", {}).items():
            report["families"].setdefault(family, entry)
    order = {f: i for i, f in enumerate(tables.FAMILIES)}
    report["families"] = dict(sorted(report["families"].items(), key=lambda kv: order.get(kv[0], len(order))))


def _remove_model(out: Path, family: str) -> None:
    for suffix in (".ubj", ".q.ubj", ".json"):
        (out / f"{family}{suffix}").unlink(missing_ok=True)


def _fmt(d: dict | None, key: str) -> str:
    return f"{d[key]:.1f}" if d and key in d else "-"


def _serve_text(serve: dict) -> str:
    default = serve.get("", serve)  # reports written before per-op contexts hold one dict
    text = f"{default.get('source', '-')}/{default.get('backend', '-')}"
    others = {op: c for op, c in serve.items() if op and isinstance(c, dict) and c != {k: default.get(k) for k in c}}
    return text + "".join(f"; {op}: {c['source']}/{c['backend']}" for op, c in sorted(others.items()))


def report_markdown(report: dict) -> str:
    fleet = report["hw"] == FLEET
    lines = [f"# opcast estimator report: {report['hw']}", "",
             f"Data: `{report['profiles_dir']}`{' (GPUs: ' + ', '.join(report['gpus']) + ')' if fleet else ''}. "
             "APE = |pred - measured| / measured of the p50, in %. k-fold: random folds over all rows; "
             "LOMO: leave-one-model-out over rows with a model name; shapes: k-fold over shape groups "
             "(every row of one shape held out at once, for tables without model names)"
             + ("; LOGO: leave-one-GPU-out (the held-out GPU priced from its card)." if fleet else "."), "",
             "| family | status | rows | serve (source/backend) | k-fold median | k-fold p90 | p10-p90 coverage "
             "| LOMO median | LOMO p90 | shapes median | shapes p90 |" + (" LOGO median | LOGO p90 |" if fleet else "")
             + " train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if fleet else "") + "---|"]
    for fam, e in report["families"].items():
        kf, lo, sg, lg = (e.get(k) for k in ("kfold", "leave_one_model_out", "shape_groups", "leave_one_gpu_out"))
        serve = _serve_text(e["serve"]) if "serve" in e else "-"
        cov = f"{100 * kf['coverage_p10_p90']:.0f}%" if kf and "coverage_p10_p90" in kf else "-"
        row = (f"| {fam} | {e['status']} | {e.get('rows', 0)} | {serve} | {_fmt(kf, 'median_ape')} | "
               f"{_fmt(kf, 'p90_ape')} | {cov} | {_fmt(lo, 'median_ape')} | {_fmt(lo, 'p90_ape')} | "
               f"{_fmt(sg, 'median_ape')} | {_fmt(sg, 'p90_ape')} |")
        if fleet:
            row += f" {_fmt(lg, 'median_ape')} | {_fmt(lg, 'p90_ape')} |"
        lines.append(row + f" {e.get('train_s', '-')} |")
    lines.append("")
    for fam, e in report["families"].items():
        lines.append(f"- **{fam}**: {e.get('note', '')}")
        for ctx, m in ((e.get("kfold") or {}).get("by_context") or {}).items():
            lines.append(f"  - k-fold {ctx}: median {m['median_ape']:.1f}%, p90 {m['p90_ape']:.1f}% ({m['n']} rows)")
        lo = e.get("leave_one_model_out") or {}
        for name, m in (lo.get("per_model") or {}).items():
            lines.append(f"  - held out {name}: median {m['median_ape']:.1f}%, p90 {m['p90_ape']:.1f}% ({m['n']} rows)")
        for op, m in (lo.get("per_op") or {}).items():
            lines.append(f"  - LOMO op {op}: median {m['median_ape']:.1f}%, p90 {m['p90_ape']:.1f}% ({m['n']} rows)")
        if lo.get("norms", {}).get("n"):
            m = lo["norms"]
            lines.append(f"  - LOMO norms (rmsnorm + layernorm): median {m['median_ape']:.1f}%, "
                         f"p90 {m['p90_ape']:.1f}% ({m['n']} rows)")
        for fold, m in ((e.get("shape_groups") or {}).get("per_fold") or {}).items():
            if m.get("n"):
                lines.append(f"  - shapes {fold}: median {m['median_ape']:.1f}%, p90 {m['p90_ape']:.1f}% ({m['n']} rows)")
        for name, m in ((e.get("leave_one_gpu_out") or {}).get("per_hw") or {}).items():
            parts = [f"{k} {v['median_ape']:.1f}/{v['p90_ape']:.1f}%" for k, v in
                     {**m.get("by_dtype", {}), **m.get("by_phase", {})}.items() if v.get("n")]
            lines.append(f"  - LOGO held out {name}: median {m['median_ape']:.1f}%, p90 {m['p90_ape']:.1f}% "
                         f"({m['n']} rows{'; ' + ', '.join(parts) if parts else ''})")
    return "\n".join(lines) + "\n"


def main() -> None:
    cli("train", run)


if __name__ == "__main__":
    main()
