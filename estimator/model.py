"""One operator family's learned runtime predictor: fit, predict (p10/p50/p90), save, load.

Target: y = log(measured µs / roofline µs). The p50 booster fits y with squared error (a
relative-error objective on the time). p10/p90 come from a small quantile booster fitted on
cross-fitted residuals of the p50 model, so the band covers held-out error, not only noise.
Files: ``<family>.ubj`` (p50) and ``<family>.q.ubj`` (p10/p90) in XGBoost's UBJSON format and
``<family>.json`` (features, vocabularies, trained range, data hash, versions, metrics). No pickle.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb

from conf.files import write_bytes
from conf.schema import HwConf
from estimator import features as F
from estimator.anchors import Anchors, build as build_anchors
from estimator.features import EstimatorError

log = logging.getLogger("estimator")
QUANTILES = ("p10", "p50", "p90")
FORMAT_VERSION = 1
_warned: set[tuple] = set()


def warn_once(key: tuple, msg: str) -> None:
    """Log ``msg`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def _params(xc, seed: int, nthread: int) -> dict:
    return dict(objective="reg:squarederror", tree_method="hist", max_depth=xc.max_depth,
                eta=xc.learning_rate, min_child_weight=xc.min_child_weight, reg_lambda=xc.reg_lambda,
                max_bin=xc.max_bin, seed=seed, nthread=nthread)


def _fit_p50(x, y, xc, seed, nthread) -> xgb.Booster:
    dm = xgb.QuantileDMatrix(x, y, max_bin=xc.max_bin, nthread=nthread)
    return xgb.train(_params(xc, seed, nthread), dm, num_boost_round=xc.num_rounds)


def _fit_band(x, resid, qc, seed, nthread) -> xgb.Booster:
    params = dict(objective="reg:quantileerror", quantile_alpha=np.array([0.1, 0.9]), tree_method="hist",
                  max_depth=qc.max_depth, eta=qc.learning_rate, seed=seed, nthread=nthread, max_bin=64)
    dm = xgb.QuantileDMatrix(x, resid, max_bin=64, nthread=nthread)
    return xgb.train(params, dm, num_boost_round=qc.num_rounds)


def folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint test-index sets covering range(n), deterministic in seed."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(order[i::k]) for i in range(k)]


def vocabulary(df: pd.DataFrame, family: str) -> dict[str, list[str]]:
    return {c: sorted(df[c].astype(str).unique().tolist()) for c in F.CATEGORICAL[family] if c in df.columns}


def engine_rank(source: str, backend: str) -> tuple:
    """How recent a measurement of the engine being simulated (vLLM) a (source, backend) is.

    Newest wins: a vLLM version beats any non-vLLM harness and a newer vLLM an older one
    (aiconfigurator's vllm-0.24.0 over vllm-0.14.0 over Vidur's 2024 eager-torch timings); then
    NCCL library timings (nccl-tests) over torch wrappers; then our own profiles (opcast) over
    public ones; then names, so the choice is deterministic.
    """
    engine, _, version = backend.partition("-")
    parsed = tuple(int(x) if x.isdigit() else 0 for x in version.split(".")) if version else ()
    kind = {"vllm": 2, "nccl": 1}.get(engine, 0)
    return (kind, parsed, source == "opcast", source, backend)


def serving_context(df: pd.DataFrame, family: str = "") -> dict[str, dict[str, str]]:
    """The (source, backend) a simulator query stands for, per op: the newest measurements of the
    engine being simulated (``engine_rank``) among the rows of that op; ``""`` holds the family
    default (the newest over all rows) for ops never measured. MoE queries also get a routing
    distribution (``op``): balanced where measured."""
    pairs = df[["source", "backend"]].astype(str).drop_duplicates().itertuples(index=False)
    best = max(pairs, key=lambda p: engine_rank(*p))
    context = {"": {"source": best[0], "backend": best[1]}}
    if family in ("elementwise", "collective"):  # ops measured by different harnesses
        for op, rows in df.groupby(df["op"].astype(str)):
            pairs = rows[["source", "backend"]].astype(str).drop_duplicates().itertuples(index=False)
            s, b = max(pairs, key=lambda p: engine_rank(*p))
            context[op] = {"source": s, "backend": b}
            if family == "collective":  # decode runs under CUDA graphs where the op was measured so
                context[op]["cuda_graph"] = str(rows["cuda_graph"].astype(bool).any())
    if family == "moe":
        ops = sorted(df["op"].astype(str).unique())
        context[""]["op"] = "moe_balanced" if "moe_balanced" in ops else ops[0]
    return context


def design_rows(df: pd.DataFrame, family: str, cards: dict[str, HwConf], vocab: dict, hw: HwConf | None = None):
    """Features and prior of rows measured on several GPUs (column ``hw``), each with its card;
    with ``hw`` given, every row is priced on that card."""
    if hw is not None:
        return F.design(df, family, hw, vocab)
    names = df["hw"].astype(str).to_numpy()
    x = prior = cols = None
    for name in sorted(set(names)):
        sel = np.flatnonzero(names == name)
        xs, cols, ps = F.design(df.iloc[sel], family, cards[name], vocab)
        if x is None:
            x, prior = np.empty((len(df), xs.shape[1]), np.float32), np.empty(len(df))
        x[sel], prior[sel] = xs, ps
    return x, cols, prior


class FamilyModel:
    """Fitted boosters of one family plus the metadata needed to rebuild its features."""

    def __init__(self, family: str, hw: HwConf | None, p50: xgb.Booster, band: xgb.Booster | None, meta: dict,
                 anchors: Anchors | None = None):
        self.family, self.hw, self.p50, self.band, self.meta = family, hw, p50, band, meta
        self.anchors = anchors   # measured series that price their own shapes (estimator/anchors.py)
        self.quiet = False  # evaluation folds predict outside their training range on purpose
        self.warn_range = True  # off while the simulator tabulates (it checks its own lookups)
        self._warned: set[tuple] = set()

    def _warn_once(self, key: tuple, msg: str) -> None:
        """Each loaded model warns about a kind of query once per run (not once per call)."""
        if not self.quiet and key not in self._warned:
            self._warned.add(key)
            log.warning(msg)

    # --- fitting ----------------------------------------------------------------------
    @classmethod
    def fit(cls, df: pd.DataFrame, family: str, hw: HwConf | dict[str, HwConf], cfg,
            meta: dict | None = None) -> "FamilyModel":
        """Fit on measured rows (status ok, a positive measured time) in profile-table columns.

        ``hw``: the card of a per-GPU model, or {hw name: card} of a fleet model whose rows come
        from several GPUs (column ``hw``); a fleet model prices any card given at predict time.
        """
        vocab = vocabulary(df, family)
        cards = hw if isinstance(hw, dict) else {hw.name: hw}
        rows = df if isinstance(hw, dict) else df.assign(hw=hw.name)
        x, names, prior = design_rows(rows, family, cards, vocab)
        y = np.log(F.measured_us(df) / prior)
        p50 = _fit_p50(x, y, cfg.xgb, cfg.seed, cfg.nthread)
        band = None
        if cfg.quantile.folds >= 2 and len(df) >= 4 * cfg.quantile.folds:
            oof = np.empty_like(y)
            for test in folds(len(y), cfg.quantile.folds, cfg.seed):
                train = np.setdiff1d(np.arange(len(y)), test)
                oof[test] = _fit_p50(x[train], y[train], cfg.xgb, cfg.seed, cfg.nthread).inplace_predict(x[test])
            band = _fit_band(x, y - oof, cfg.quantile, cfg.seed, cfg.nthread)
        shape_range = {c: [float(df[c].min()), float(df[c].max())] for c in F.SHAPE_COLUMNS[family]
                       if c not in ("op", "phase")}
        dtypes = sorted(df["dtype"].astype(str).unique()) if "dtype" in df else []
        meta = dict(meta or {}, format_version=FORMAT_VERSION, family=family, features=names, vocab=vocab,
                    shape_range=shape_range, num_rows=int(len(df)), dtypes=dtypes,
                    hw=None if isinstance(hw, dict) else dataclasses.asdict(hw),
                    cards={n: dataclasses.asdict(c) for n, c in sorted(cards.items())},
                    target="log(measured_us / roofline_us), measured = time_us_median else time_us_mean", xgboost_version=xgb.__version__)
        # one GPU's model only: a fleet model prices cards by their numbers, its rows' series
        # belong to other GPUs
        table = None if isinstance(hw, dict) else build_anchors(df, family, y - p50.inplace_predict(x))
        anchors = Anchors(family, table) if table is not None else None
        return cls(family, None if isinstance(hw, dict) else hw, p50, band, meta, anchors)

    @property
    def fleet(self) -> bool:
        return self.hw is None

    # --- prediction ---------------------------------------------------------------------
    def predict(self, df: pd.DataFrame, hw: HwConf | None = None) -> pd.DataFrame:
        """pred_time_us (= p50) and pred_time_us_{p10,p50,p90} for every query row, priced on
        ``hw`` (a fleet model needs it unless the rows name trained GPUs in column ``hw``)."""
        F.check_query(df, self.family)
        df = self._with_context(df)
        hw = hw or self.hw
        self._warn_out_of_range(df, hw)
        if hw is None:
            cards = {n: HwConf(**c) for n, c in self.meta["cards"].items()}
            unknown = sorted(set(df["hw"].astype(str)) - set(cards)) if "hw" in df else ["(no hw column)"]
            if unknown:
                raise F.EstimatorError(f"the fleet {self.family} model needs the card to price {unknown}; "
                                       f"pass hw= (trained on {', '.join(cards)})")
            x, names, prior = design_rows(df, self.family, cards, self.meta["vocab"])
        else:
            x, names, prior = F.design(df, self.family, hw, self.meta["vocab"])
        if names != self.meta["features"]:
            raise F.EstimatorError(f"the {self.family} model was trained with other features "
                                   f"({len(self.meta['features'])} vs {len(names)} now); retrain with "
                                   f"python -m estimator.train hw={getattr(hw, 'name', 'fleet')}")
        mid = self.p50.inplace_predict(x).astype(float)
        if self.band is not None:
            lo_hi = self.band.inplace_predict(x).astype(float).reshape(len(df), 2)
            lo, hi = mid + np.minimum(lo_hi[:, 0], 0.0), mid + np.maximum(lo_hi[:, 1], 0.0)
        else:
            lo = hi = mid
        if self.anchors is not None:   # measured shapes: the p50 is the measurement, the band keeps its width
            shift = self.anchors.log_shift(df)
            lo, mid, hi = lo + shift, mid + shift, hi + shift
        out = pd.DataFrame({"pred_time_us": prior * np.exp(mid)}, index=df.index)
        for name, val in zip(QUANTILES, (lo, mid, hi)):
            out[f"pred_time_us_{name}"] = prior * np.exp(val)
        return out

    def _with_context(self, df: pd.DataFrame) -> pd.DataFrame:
        """Queries without source/backend stand for the serving context chosen at training: per op
        where ops were measured by different harnesses, else the family's."""
        serve = self.meta["serve"]
        default = serve.get("", serve)  # {"": family context, op: context} or one flat context
        keys = ("source", "backend", "op", "cuda_graph")
        missing = [c for c in keys if c not in df.columns and any(c in v for v in serve.values() if isinstance(v, dict))
                   or c not in df.columns and c in default]
        if missing:
            if "op" in df.columns and len(serve) > 1:
                ops = df["op"].astype(str)
                df = df.assign(**{c: ops.map(lambda o, c=c: serve.get(o, default).get(c, default.get(c, "")))
                                  for c in missing})
            else:
                df = df.assign(**{c: default[c] for c in missing})
        for c in F.CATEGORICAL[self.family]:
            if c not in df.columns:
                continue
            unknown = set(df[c].astype(str).unique()) - set(self.meta["vocab"].get(c, []))
            if unknown:
                self._warn_once((c, tuple(sorted(unknown))),
                          f"{self.family}: {c} value(s) {sorted(unknown)} were never trained on "
                          f"(known: {self.meta['vocab'].get(c)}); predicting without that feature")
        return df

    def _warn_out_of_range(self, df: pd.DataFrame, hw: HwConf | None) -> None:
        if not self.warn_range:
            return
        outside = []
        for c, (lo, hi) in self.meta["shape_range"].items():
            v = pd.to_numeric(df[c]).to_numpy(float)
            if (v < lo).any() or (v > hi).any():
                outside.append(f"{c} [{v.min():g}, {v.max():g}] vs trained [{lo:g}, {hi:g}]")
        if outside:
            self._warn_once(("range",), f"{self.family} ({getattr(hw, 'name', 'fleet')}): queries outside the profiled "
                      f"range, predictions there follow the roofline prior: {'; '.join(outside)}")

    # --- files --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> list[Path]:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = [write_bytes(d / f"{self.family}.ubj", bytes(self.p50.save_raw("ubj")))]
        qpath = d / f"{self.family}.q.ubj"
        if self.band is not None:
            paths.append(write_bytes(qpath, bytes(self.band.save_raw("ubj"))))
        else:
            qpath.unlink(missing_ok=True)
        text = json.dumps(self.meta, indent=1, sort_keys=True, default=float)
        paths.append(write_bytes(d / f"{self.family}.json", text.encode()))
        if self.anchors is not None:
            paths.append(self.anchors.save(d))
        else:
            (d / f"{self.family}.anchors.parquet").unlink(missing_ok=True)
        return paths

    @classmethod
    def load(cls, directory: str | Path, family: str) -> "FamilyModel":
        d = Path(directory)
        side = d / f"{family}.json"
        if not side.is_file() or not (d / f"{family}.ubj").is_file():
            raise EstimatorError(f"no trained {family} model in {d}; run python -m estimator.train")
        meta = json.loads(side.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise EstimatorError(f"{side}: format_version {meta.get('format_version')} != {FORMAT_VERSION}; retrain")
        p50 = xgb.Booster()
        p50.load_model(bytearray((d / f"{family}.ubj").read_bytes()))
        band = None
        if (d / f"{family}.q.ubj").is_file():
            band = xgb.Booster()
            band.load_model(bytearray((d / f"{family}.q.ubj").read_bytes()))
        for b in (p50, band):
            if b is not None:
                b.set_param({"nthread": 1})  # see TrainConf.nthread
        return cls(family, HwConf(**meta["hw"]) if meta.get("hw") else None, p50, band, meta,
                   Anchors.load(d, family) if meta.get("hw") else None)


