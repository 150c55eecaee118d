"""Estimator: training writes usable models, predictions behave physically, bad input fails clearly.

Profiles here are small synthetic frames made in this file (a roofline-like law with launch
overhead and noise), so the tests are fast and need no shipped data.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

import conf
from conf import shapes as conf_shapes
from estimator.config import register
from estimator.features import EstimatorError
from estimator.model import FamilyModel
from estimator.predictors import Predictors
from estimator.runtime import OpTimes, load_op_times
from profiler import tables

register()
REPO = Path(__file__).resolve().parents[1]
HW = conf.to_hw(conf.compose("train", ["hw=h100"]).hw)
MODEL = conf.to_model(OmegaConf.load(conf.CONF_DIR / "model" / "llama2-7b.yaml"))


def _common(n: int, source: str, backend: str) -> dict:
    return dict(hw="h100", source=source, dtype="float16", backend=backend, timer="cuda_event", l2_policy="hot",
                cuda_graph=False, threads=0, status="ok", time_us_mean=np.nan, time_us_min=np.nan,
                time_us_p10=np.nan, time_us_p90=np.nan, time_us_std=np.nan, repeats=10)


def synthetic_gemm(seed: int = 0) -> pd.DataFrame:
    """Three made-up 'models' (n, k pairs) x log-spaced m; time = 1.3 x roofline + 6 µs, 2% noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, (h, f) in {"a": (1024, 4096), "b": (2048, 5632), "c": (3072, 8192)}.items():
        for n, k in ((3 * h, h), (h, h), (2 * f, h), (h, f)):
            for m in np.unique(np.geomspace(1, 4096, 40).astype(int)):
                rows.append(dict(model=name, tp=1, m=m, n=n, k=k))
    df = pd.DataFrame(rows)
    flops, nbytes = 2.0 * df.m * df.n * df.k, 2.0 * (df.m * df.k + df.k * df.n + df.m * df.n)
    t = 1.3 * np.maximum(flops / (HW.peak_tflops * 1e6), nbytes / (HW.mem_bw_gbps * 1e3)) + 6.0
    df["time_us_median"] = t * np.exp(0.02 * rng.standard_normal(len(df)))
    df["op"] = "gemm"
    return df.assign(**_common(len(df), "synthetic", "torch"))


def synthetic_elementwise(seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [dict(model=name, tp=1, op=op, num_tokens=t, width=w, num_heads=0, num_kv_heads=0, head_dim=0)
            for name, w in {"a": 1024, "b": 2048, "c": 3072}.items() for op in ("rmsnorm", "add")
            for t in np.unique(np.geomspace(1, 4096, 30).astype(int))]
    df = pd.DataFrame(rows)
    t = 2.0 * 2 * df.num_tokens * df.width / (HW.mem_bw_gbps * 1e3) * np.where(df.op == "rmsnorm", 1.5, 1.0) + 4.0
    df["time_us_median"] = t * np.exp(0.02 * rng.standard_normal(len(df)))
    return df.assign(**_common(len(df), "synthetic", "torch"))


FAST = ["xgb.num_rounds=40", "xgb.max_depth=4", "quantile.folds=2", "quantile.num_rounds=15", "eval.kfold=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train gemm + elementwise for h100 from synthetic profiles into a temporary data dir."""
    data = tmp_path_factory.mktemp("data")
    tables.write(synthetic_gemm(), data / "profiles/h100/gemm.parquet", "gemm", {"note": "synthetic test data"})
    tables.write(synthetic_elementwise(), data / "profiles/h100/elementwise.parquet", "elementwise",
                 {"note": "synthetic test data"})
    from estimator.train import run
    cfg = conf.compose("train", ["hw=h100", f"data_dir={data}", *FAST])
    report = run(cfg)
    return data, report, cfg


def test_train_writes_models_sidecars_and_report(trained):
    data, report, _ = trained
    out = data / "estimators/h100"
    for name in ("gemm.ubj", "gemm.q.ubj", "gemm.json", "elementwise.ubj", "report.md", "report.json",
                 "pred_vs_measured.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.pkl")) and not list(out.glob("*.pickle"))
    side = json.loads((out / "gemm.json").read_text())
    assert side["data_sha256"] == report["families"]["gemm"]["data_sha256"]
    assert {"m", "n", "k", "log_flops", "intensity"} <= set(side["features"])
    assert side["xgboost_version"] and side["metrics"]["leave_one_model_out"]["n"] > 0
    # families without data are recorded as roofline fallbacks, with a note
    assert report["families"]["attention"]["status"] == "roofline"
    assert "roofline" in (out / "report.md").read_text()
    # a law the features can express is learned to within a few percent on held-out models
    assert report["families"]["gemm"]["leave_one_model_out"]["median_ape"] < 10


def test_round_trip_and_determinism(trained, tmp_path):
    data, _, cfg = trained
    df = synthetic_gemm(seed=5)
    fitted = FamilyModel.fit(df, "gemm", HW, cfg, meta={"serve": {"source": "synthetic", "backend": "torch"}})
    fitted.save(tmp_path)
    loaded = FamilyModel.load(tmp_path, "gemm")
    query = df.drop(columns=["source", "backend"]).iloc[::7]
    pd.testing.assert_frame_equal(fitted.predict(query), loaded.predict(query), check_exact=True)
    again = FamilyModel.fit(df, "gemm", HW, cfg, meta={"serve": {"source": "synthetic", "backend": "torch"}})
    assert bytes(again.p50.save_raw("ubj")) == bytes(fitted.p50.save_raw("ubj"))


def test_quantiles_ordered_and_more_tokens_never_much_faster(trained, caplog):
    data, _, _ = trained
    model = Predictors.load(HW, data).model("gemm")
    m = np.arange(1, 20001)  # beyond the trained m <= 4096 on purpose
    with caplog.at_level(logging.WARNING, logger="estimator"):
        pred = model.predict(pd.DataFrame(dict(m=m, n=6144, k=2048, dtype="float16")))
        model.predict(pd.DataFrame(dict(m=m, n=6144, k=2048, dtype="float16")))
    assert sum("outside the profiled range" in r.getMessage() for r in caplog.records) == 1
    p50 = pred["pred_time_us"].to_numpy()
    assert (p50 >= 0.9 * np.maximum.accumulate(p50)).all()
    assert p50[-1] > 3 * p50[4095]  # the roofline prior keeps extrapolation physical (5x the FLOPs)
    assert (pred.pred_time_us_p10 <= pred.pred_time_us_p50).all()
    assert (pred.pred_time_us_p50 <= pred.pred_time_us_p90).all()


def test_bad_queries_give_clear_errors(trained):
    data, _, _ = trained
    model = Predictors.load(HW, data).model("gemm")
    with pytest.raises(EstimatorError, match="lacks columns k"):
        model.predict(pd.DataFrame(dict(m=[1], n=[2])))
    with pytest.raises(EstimatorError, match="empty"):
        model.predict(pd.DataFrame(dict(m=[], n=[], k=[])))
    a40 = conf.to_hw(conf.compose("train", ["hw=a40"]).hw)
    with pytest.raises(EstimatorError, match=r"no trained estimator for hw=a40.*trained: h100"):
        Predictors.load(a40, data)


def test_train_config_errors(tmp_path):
    from estimator.train import run
    with pytest.raises(conf.ConfigError, match="no profile tables"):
        run(conf.compose("train", ["hw=h100", f"data_dir={tmp_path}"]))
    with pytest.raises(conf.ConfigError, match="unknown families"):
        run(conf.compose("train", ["hw=h100", f"data_dir={tmp_path}", "families=[gemm,conv]"]))


def test_op_times_from_trained_models_cached_and_monotonic(trained):
    data, _, _ = trained
    ops = load_op_times(HW, MODEL, 1, data_dir=str(data), max_tokens=2048)
    assert ops.source.startswith("estimator:h100:p50") and "attention" in ops.source
    assert len(list((data / "cache/optimes").glob("*.npz"))) == 1
    again = load_op_times(HW, MODEL, 1, data_dir=str(data), max_tokens=2048)
    assert again.layer_token_ops_us(777) == ops.layer_token_ops_us(777)
    token_ops = [ops.layer_token_ops_us(n) for n in range(1, 2049)]
    assert np.all(np.diff(token_ops) >= 0)
    # the table holds the predictor's answer: 4 GEMMs + norms/act/rope/adds at 512 tokens
    assert ops.layer_token_ops_us(512) > sum(
        Predictors.load(HW, data).predict("gemm", pd.DataFrame(dict(m=[512], n=[g.n], k=[g.k], dtype="float16")))[0]
        for g in conf_shapes.layer_gemms(MODEL, 1))
    p90 = load_op_times(HW, MODEL, 1, quantile="p90", data_dir=str(data), max_tokens=2048)
    assert p90.layer_token_ops_us(512) >= ops.layer_token_ops_us(512)


def test_attention_lookup_matches_predictor_and_grows(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="estimator"):
        ops = load_op_times(HW, MODEL, 1, data_dir=str(tmp_path), max_tokens=512)
    assert ops.source == "roofline" and any("no trained estimator" in r.getMessage() for r in caplog.records)
    direct = OpTimes(HW, MODEL, 1, max_tokens=512)  # roofline prior, vectorised predict
    frame = direct._frame(op=["attention"], phase=["decode"], batch_size=[64], num_q_tokens=[64],
                          num_kv_tokens=[64 * 1024], max_q_len=[1], max_kv_len=[1024], q_kv_product_sum=[64 * 1024],
                          num_heads=32, num_kv_heads=32, head_dim=128, block_size=16)
    exact = direct.predict("attention", frame)[0]
    assert ops.layer_attention_us([], [], [1024] * 64) == pytest.approx(exact, rel=1e-9)
    decode = [ops.layer_attention_us([], [], [kv] * 16) for kv in (10, 100, 1000, 10000, 300000)]
    assert np.all(np.diff(decode) > 0)
    prefill = [ops.layer_attention_us([q], [q], []) for q in (16, 256, 4096, 20000, 70000)]
    assert np.all(np.diff(prefill) > 0)
    both = ops.layer_attention_us([128], [128], [500] * 8)
    assert both == pytest.approx(ops.layer_attention_us([128], [128], []) + ops.layer_attention_us([], [], [500] * 8))


def test_predict_cli_adds_columns_and_rejects_bad_input(trained, tmp_path):
    data, _, _ = trained
    shapes = synthetic_gemm().drop(columns=["source", "backend"]).head(20)
    inp, out = tmp_path / "shapes.parquet", tmp_path / "pred.parquet"
    shapes.to_parquet(inp)
    cmd = [sys.executable, "-m", "estimator.predict", "hw=h100", f"data_dir={data}", "family=gemm"]
    ok = subprocess.run([*cmd, f"+input={inp}", f"+output={out}"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    pred = pd.read_parquet(out)
    assert list(pred.columns[:len(shapes.columns)]) == list(shapes.columns)
    assert {"pred_time_us", "pred_time_us_p10", "pred_time_us_p50", "pred_time_us_p90"} <= set(pred.columns)
    shapes.drop(columns=["k"]).to_parquet(inp)
    bad = subprocess.run([*cmd, f"+input={inp}", f"+output={out}"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "lacks columns k" in bad.stderr and "Traceback" not in bad.stderr


def test_loading_an_untrained_family_names_the_training_command(tmp_path):
    from conf import ConfigError
    from estimator.model import FamilyModel
    with pytest.raises(ConfigError, match="no trained gemm model.*estimator.train"):
        FamilyModel.load(tmp_path, "gemm")


def test_newest_engine_wins_and_no_public_row_is_silently_dropped(tmp_path, caplog):
    from estimator.model import engine_rank, serving_context
    ranked = sorted([("vidur", "torch"), ("aiconfigurator", "vllm-0.14.0"), ("aiconfigurator", "vllm-0.24.0"),
                     ("aiconfigurator", "nccl-2.29.2"), ("opcast", "torch")], key=lambda p: engine_rank(*p))
    assert ranked == [("vidur", "torch"), ("opcast", "torch"), ("aiconfigurator", "nccl-2.29.2"),
                      ("aiconfigurator", "vllm-0.14.0"), ("aiconfigurator", "vllm-0.24.0")]
    # one profiled model (opcast, eager torch) next to public vLLM rows: all train, vLLM serves
    old, new = synthetic_gemm(), synthetic_gemm(seed=3)
    new = new[new.model == "a"].assign(source="opcast")
    vllm = synthetic_gemm(seed=4).assign(source="aiconfigurator", backend="vllm-0.24.0", model="")
    df = pd.concat([old.assign(source="vidur"), new, vllm], ignore_index=True)
    assert serving_context(df, "gemm")[""] == {"source": "aiconfigurator", "backend": "vllm-0.24.0"}
    tables.write(df, tmp_path / "profiles/h100/gemm.parquet", "gemm", {"note": "synthetic"})
    from estimator.train import run
    report = run(conf.compose("train", ["hw=h100", f"data_dir={tmp_path}", "families=[gemm]", *FAST]))
    assert report["families"]["gemm"]["rows"] == len(df)
    with caplog.at_level(logging.WARNING, logger="estimator"):
        report = run(conf.compose("train", ["hw=h100", f"data_dir={tmp_path}", "families=[gemm]",
                                            "train_sources=serve", "evaluate=false", *FAST]))
    assert report["families"]["gemm"]["rows"] == len(vllm)
    assert any("rows set aside (train_sources=serve: opcast/torch" in r.getMessage() for r in caplog.records)


def _card(name: str, **over) -> "conf.schema.HwConf":
    import dataclasses
    return dataclasses.replace(HW, name=name, **over)


def _law(df: pd.DataFrame, hw, scale: float = 1.3, launch_us: float = 6.0, seed: int = 0) -> pd.DataFrame:
    """A roofline-like law on card ``hw``: fp8 at the fp8 peak with 1-byte operands."""
    rng = np.random.default_rng(seed)
    b = np.where(df.dtype == "fp8", 1.0, 2.0)
    peak = np.where(df.dtype == "fp8", hw.peak_tflops_fp8 or hw.peak_tflops, hw.peak_tflops)
    flops, nbytes = 2.0 * df.m * df.n * df.k, b * (df.m * df.k + df.k * df.n + df.m * df.n)
    t = scale * np.maximum(flops / (peak * 1e6), nbytes / (hw.mem_bw_gbps * 1e3)) + launch_us
    return df.assign(hw=hw.name, time_us_median=t * np.exp(0.02 * rng.standard_normal(len(df))))


def test_fp8_weights_priced_from_fp8_rows_and_bad_dtypes_fail_clearly(tmp_path):
    import dataclasses
    hw = _card("h100", peak_tflops_fp8=2 * HW.peak_tflops)
    df = pd.concat([synthetic_gemm(), synthetic_gemm(seed=2).assign(dtype="fp8")], ignore_index=True)
    tables.write(_law(df, hw), tmp_path / "profiles/h100/gemm.parquet", "gemm", {"note": "synthetic"})
    from estimator.train import run
    run(conf.compose("train", ["hw=h100", f"data_dir={tmp_path}", "families=[gemm]", "evaluate=false", *FAST]))
    bf16 = load_op_times(hw, MODEL, 1, data_dir=str(tmp_path), max_tokens=4096)
    fp8 = load_op_times(hw, dataclasses.replace(MODEL, weight_dtype="fp8"), 1, data_dir=str(tmp_path), max_tokens=4096)
    # compute-bound: fp8 GEMMs at twice the peak, memory-bound: half the weight bytes
    assert fp8.layer_token_ops_us(4096) < 0.8 * bf16.layer_token_ops_us(4096)
    assert fp8.layer_token_ops_us(1) < bf16.layer_token_ops_us(1)
    with pytest.raises(EstimatorError, match=r"model.weight_dtype='int3' is not a known dtype; known: .*fp8"):
        load_op_times(hw, dataclasses.replace(MODEL, weight_dtype="int3"), 1, data_dir=str(tmp_path))
    only16 = tmp_path / "only16"
    tables.write(_law(synthetic_gemm(), hw), only16 / "profiles/a100/gemm.parquet", "gemm", {"note": "synthetic"})
    run(conf.compose("train", ["hw=a100", f"data_dir={only16}", "families=[gemm]", "evaluate=false", *FAST]))
    a100 = conf.to_hw(conf.compose("train", ["hw=a100"]).hw)
    with pytest.raises(EstimatorError, match=r"hw=a100 has no fp8 gemm rows; gemm rows exist for float16"):
        load_op_times(a100, dataclasses.replace(MODEL, weight_dtype="fp8"), 1, data_dir=str(only16))


def test_fleet_prices_a_gpu_without_rows_from_its_card(tmp_path):
    """Two GPUs' rows follow one law on their cards; the fleet model prices a third card it never
    saw (H200-like: H100 compute, 1.43x the bandwidth) within a few percent, and sim uses it."""
    import dataclasses
    from estimator.train import run
    cards = {"h100": HW, "a100": conf.to_hw(conf.compose("train", ["hw=a100"]).hw)}
    for name, card in cards.items():
        tables.write(_law(synthetic_gemm(seed=len(name)), card), tmp_path / f"profiles/{name}/gemm.parquet",
                     "gemm", {"note": "synthetic"})
    report = run(conf.compose("train", ["fleet=true", f"data_dir={tmp_path}", "families=[gemm]", *FAST]))
    logo = report["families"]["gemm"]["leave_one_gpu_out"]
    assert set(logo["per_hw"]) == {"h100", "a100"} and logo["median_ape"] < 15
    assert "LOGO held out a100" in (tmp_path / "estimators/fleet/report.md").read_text()
    h200 = dataclasses.replace(HW, name="h200", mem_bw_gbps=4800.0)
    preds = Predictors.load(h200, tmp_path)
    assert preds.origin == {"gemm": "fleet"}
    query = _law(synthetic_gemm(seed=9), h200).iloc[::5]
    err = np.abs(preds.predict("gemm", query) / query.time_us_median.to_numpy() - 1)
    assert np.median(err) < 0.1
    ops = load_op_times(h200, MODEL, 1, data_dir=str(tmp_path), max_tokens=1024)
    assert "fleet: gemm" in ops.source


def test_tables_are_monotone_and_the_model_nearly_so(trained):
    """The simulator's tables never charge more tokens less (runtime.monotone); the raw model is
    checked too, so a model that needs the envelope a lot fails here, not silently."""
    from estimator.runtime import monotone
    assert monotone(np.array([3.0, 5.0, 4.0, 6.0])).tolist() == [3.0, 4.5, 4.5, 6.0]
    grid = np.array([[1.0, 3.0, 2.0], [2.0, 4.0, 5.0], [0.5, 6.0, 7.0]])
    both = monotone(monotone(grid, 0), 1)
    assert (np.diff(both, axis=0) >= 0).all() and (np.diff(both, axis=1) >= 0).all()
    data, _, _ = trained
    model = Predictors.load(HW, data).model("gemm")
    for n, k in ((3072, 1024), (8192, 2048), (2048, 5632)):
        p = model.predict(pd.DataFrame(dict(m=np.arange(1, 4097), n=n, k=k, dtype="float16")))["pred_time_us"].to_numpy()
        assert (np.abs(monotone(p) / p - 1)).max() < 0.15


def test_roofline_priors_by_hand():
    import dataclasses
    from estimator import roofline as R
    hw = dataclasses.replace(HW, peak_tflops=1000.0, peak_tflops_fp8=2000.0, mem_bw_gbps=4000.0, link_bw_gbps=400.0)
    # GEMM 4096^3: 2*4096^3 flops = 137.4 GFLOP -> 137.4 us at 1 PFLOP/s (bf16), 68.7 us in fp8
    assert R.gemm_us(4096, 4096, 4096, hw, 2) == pytest.approx(R.LAUNCH_US + 2 * 4096**3 / 1e9)
    assert R.gemm_us(4096, 4096, 4096, hw, 1) == pytest.approx(R.LAUNCH_US + 4096**3 / 1e9)
    # no fp8 tensor cores: fp8 weights run at the 16-bit peak
    assert R.peak_tflops(dataclasses.replace(hw, peak_tflops_fp8=0.0), 1) == 1000.0
    # decode attention, 1 sequence x 1000 keys, 8 KV heads x 128: K+V 2*1000*8*128*2 B = 4.1 MB -> ~1 us at 4e6 B/us;
    # fp8 KV halves the K/V bytes
    kv16 = R.attention_us(1, 1000, 1000, 32, 8, 128, hw, 2) - R.LAUNCH_US
    kv8 = R.attention_us(1, 1000, 1000, 32, 8, 128, hw, 1) - R.LAUNCH_US
    assert kv16 == pytest.approx((2 * 2 * 32 * 128 + 2 * 2 * 1000 * 8 * 128) / 4e6)
    assert kv8 == pytest.approx((2 * 2 * 32 * 128 + 2 * 1 * 1000 * 8 * 128) / 4e6)
    # ring all-reduce of 400 MB over 8 GPUs: 2*7/8 x 400 MB / 400 GB/s = 1750 us; all-gather half
    assert R.collective_us(4e8, 8, hw, "all_reduce") == pytest.approx(R.LAUNCH_US + 1750)
    assert R.collective_us(4e8, 8, hw, "all_gather") == pytest.approx(R.LAUNCH_US + 875)
    assert R.collective_us(4e8, 2, hw, "send_recv") == pytest.approx(R.LAUNCH_US + 1000)
    # batched GEMM: 128 heads x (1 x 512) @ (512 x 128) bf16: 128 x 2 x (512 + 65536 + 128) B read/written
    assert R.bmm_us(128, 1, 128, 512, hw) == pytest.approx(R.LAUNCH_US + 128 * 2 * (512 + 512 * 128 + 128) / 4e6)


def test_serve_override_picks_its_rows_where_they_exist_and_steps_aside_where_not():
    """conf/train.yaml's serve_override (a100 gemm -> vidur/torch) decides the serving context of
    that GPU and family only; a GPU profile without those rows (a user's own) serves the newest
    engine's rows and says so, rather than refusing to train."""
    from estimator.train import choose_sources
    cfg = OmegaConf.create({"serve_override": {"a100": {"gemm": "vidur/torch"}}, "train_sources": "all"})
    both = pd.DataFrame({"source": ["vidur", "aiconfigurator"], "backend": ["torch", "vllm-0.14.0"]})
    newest = choose_sources(both, "gemm", cfg, "h100/gemm", "h100")[1][""]      # no override for h100
    _, serve, note = choose_sources(both, "gemm", cfg, "a100/gemm", "a100")
    assert serve[""]["source"] == "vidur" and serve[""]["backend"] == "torch" and "serve_override" in note
    assert newest["source"] == "aiconfigurator"
    own = pd.DataFrame({"source": ["opcast"], "backend": ["torch"]})
    _, serve, note = choose_sources(own, "gemm", cfg, "a100/gemm", "a100")
    assert serve[""]["source"] == "opcast" and "has no rows here" in note
