"""python -m estimator.bench [hw=h100] [model=llama2-7b] [tp=1] [train=false]: the estimator's figures.

Prints: training time of all families (no evaluation) against the 60 s target; OpTimes load
time cold (no disk cache) and warm against the 2 s target; the simulator's per-call lookup cost
next to one-row XGBoost; the shipped GEMM model against every measured GEMM row per source,
engine version and dtype; and the tabulated attention against measured batched rows (which
checks the grid and the uniform-batch pricing end to end). ``train=false`` skips the training. Overrides other than model/tp go to the
train config (e.g. ``nthread=2``).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

import conf
from estimator.config import register
from estimator.features import measured_us
from estimator.predictors import Predictors
from estimator.runtime import load_op_times
from profiler import tables


def _per_call_us(fn, repeats: int = 20000) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e6


def bench_train(cfg, out: Path) -> None:
    from estimator.train import run
    t0 = time.perf_counter()
    report = run(OmegaConf.merge(cfg, {"evaluate": False, "out_dir": str(out)}))
    total = time.perf_counter() - t0
    per = ", ".join(f"{f} {e.get('train_s', '-')} s" for f, e in report["families"].items())
    print(f"train all families ({cfg.hw.name}, nthread={cfg.nthread}): {total:.1f} s "
          f"(target < 60 s, ratio {total / 60:.2f}); {per}")


def bench_load(hw, model, tp: int, data_dir: str) -> object:
    with tempfile.TemporaryDirectory() as tmp:  # a private cache dir: the first load is cold
        (Path(tmp) / "estimators").symlink_to(Path(data_dir).resolve() / "estimators")
        t0 = time.perf_counter()
        ops = load_op_times(hw, model, tp, data_dir=tmp)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ops = load_op_times(hw, model, tp, data_dir=tmp)
        warm = time.perf_counter() - t0
    print(f"load_op_times({hw.name}, {model.name}, tp={tp}): cold {cold:.2f} s, cached {warm:.3f} s "
          f"(target < 2 s, ratios {cold / 2:.2f} / {warm / 2:.3f}); source: {ops.source}")
    return ops


def bench_calls(ops, hw, data_dir: str) -> None:
    decode = [700] * 64
    attn = _per_call_us(lambda: ops.layer_attention_us([512], [1024], decode))
    token = _per_call_us(lambda: ops.layer_token_ops_us(576))
    preds = Predictors.load(hw, data_dir)
    row = pd.DataFrame(dict(m=[576], n=[4096], k=[4096], dtype=["float16"]))
    one = _per_call_us(lambda: preds.predict("gemm", row), repeats=200) if "gemm" in preds.trained else float("nan")
    print(f"per call: layer_attention_us (1 prefill + 64 decodes) {attn:.1f} µs, layer_token_ops_us "
          f"{token:.2f} µs; one-row gemm FamilyModel.predict {one:.0f} µs ({one / attn:.0f}x the attention lookup)")


def bench_vs_rows(hw, data_dir: str, family: str = "gemm") -> None:
    """The shipped model as the simulator queries it (no source/backend: the serving context)
    against every measured row of the table, per (source, backend, dtype); in-sample for rows
    it trained on (the report's k-fold by_context lines are the held-out figures)."""
    path = Path(data_dir) / "profiles" / hw.name / f"{family}.parquet"
    preds = Predictors.load(hw, data_dir)
    if not path.is_file() or family not in preds.trained:
        print(f"{family} vs measured rows: no table or no trained model")
        return
    df = tables.read(path, family)
    df = df[(df.status == "ok") & df.dtype.isin(["float16", "bfloat16", "fp8"])]
    for (src, backend, dtype), rows in df.groupby(["source", "backend", "dtype"]):
        pred = preds.predict(family, rows.drop(columns=["source", "backend"]))
        err = 100 * np.abs(pred - measured_us(rows)) / measured_us(rows)
        print(f"{family} ({hw.name}, {preds.origin[family]} model) vs {src}/{backend}/{dtype} ({len(rows)} rows): "
              f"median APE {np.median(err):.1f}%, p90 {np.percentile(err, 90):.1f}%")


def bench_attention_vs_measured(ops, hw, data_dir: str) -> None:
    path = Path(data_dir) / "profiles" / hw.name / "attention.parquet"
    if not path.is_file():
        print("attention lookup vs measured: no attention table")
        return
    df = tables.read(path, "attention")
    preds = Predictors.load(hw, data_dir)
    serve = preds.model("attention").meta["serve"][""] if "attention" in preds.trained else {}
    sel = ((df.num_heads == ops.nq) & (df.num_kv_heads == ops.nkv) & (df.head_dim == ops.model.head_dim)
           & (df.dtype == ops.dtype) & (df.status == "ok"))
    for col, val in serve.items():
        sel &= df[col].astype(str) == val
    rows = df[sel]
    if rows.empty:
        print(f"attention lookup vs measured: no measured rows with heads {ops.nq}/{ops.nkv}x{ops.model.head_dim}")
        return
    pred = []
    for r in rows.itertuples():
        b, q, kv = int(r.batch_size), int(r.max_q_len), int(r.max_kv_len)
        pred.append(ops.layer_attention_us([q] * b, [kv] * b, []) if r.phase == "prefill"
                    else ops.layer_attention_us([], [], [kv] * b))
    err = 100 * np.abs(np.array(pred) - measured_us(rows)) / measured_us(rows)
    for phase in ("prefill", "decode"):
        e = err[(rows.phase == phase).to_numpy()]
        if len(e):
            print(f"attention lookup vs measured {phase} ({len(e)} rows, heads {ops.nq}/{ops.nkv}): "
                  f"median APE {np.median(e):.1f}%, p90 {np.percentile(e, 90):.1f}%")


def main(argv: list[str]) -> None:
    register()
    own = ("model", "tp", "train")
    mine = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in own}
    rest = [a for a in argv if a.split("=", 1)[0] not in own]
    cfg = conf.compose("train", rest)
    hw = conf.to_hw(cfg.hw)
    model = conf.to_model(OmegaConf.load(conf.CONF_DIR / "model" / f"{mine.get('model', 'llama3-8b')}.yaml"))
    tp = int(mine.get("tp", 1))
    if mine.get("train", "true") != "false":
        out = Path(tempfile.mkdtemp(prefix="opcast-bench-"))
        try:
            bench_train(cfg, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    ops = bench_load(hw, model, tp, cfg.data_dir)
    bench_calls(ops, hw, cfg.data_dir)
    bench_vs_rows(hw, cfg.data_dir)
    bench_attention_vs_measured(ops, hw, cfg.data_dir)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except conf.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
