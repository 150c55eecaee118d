"""The simulator's API, memory plan, workloads, metrics and outputs, and its CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

import sim
from conf import ConfigError, to_hw, to_model
from estimator.runtime import load_op_times
from sim import workload as workloads
from sim.metrics import REQUEST_METRICS, LogHistogram

REPO = Path(__file__).resolve().parents[1]
CARD = lambda group, name: OmegaConf.load(REPO / "conf" / group / f"{name}.yaml")  # noqa: E731


@pytest.fixture(scope="module")
def op_times():
    return load_op_times(to_hw(CARD("hw", "a100")), to_model(CARD("model", "llama2-7b")), 1)


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    """A small synthetic trace made here (not data): 50 rows, arrivals 0.5 s apart."""
    d = tmp_path_factory.mktemp("data")
    (d / "traces").mkdir()
    rng = np.random.default_rng(0)
    pd.DataFrame({"arrived_at_s": np.arange(50) * 0.5,
                  "num_prefill_tokens": rng.integers(10, 3000, 50),
                  "num_decode_tokens": rng.integers(1, 300, 50)}).to_parquet(d / "traces" / "toy.parquet")
    pd.DataFrame({"num_prefill_tokens": [100, 200], "num_decode_tokens": [5, 6]}).to_parquet(
        d / "traces" / "noarrivals.parquet")
    return d


def test_summary_has_the_contract_keys(op_times):
    res = sim.simulate(sim.compose(["workload=fixed", "workload.num_requests=20"]), op_times=op_times)
    keys = {f"{m}_{s}" for m in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "norm_e2e_s", "sched_delay_s")
            for s in ("mean", "p50", "p90", "p99")}
    keys |= {"throughput_rps", "throughput_tok_s", "num_requests", "num_preemptions", "mfu", "mbu",
             "kv_util_mean", "batch_size_mean", "sim_time_s", "wall_s"}
    assert keys <= set(res.summary)
    assert all(isinstance(v, float) for v in res.summary.values())
    s = res.summary
    assert s["num_requests"] == 20 and 0 < s["mfu"] < 1 and 0 < s["mbu"] < 1 and 0 < s["kv_util_mean"] < 1
    assert s["ttft_s_p50"] <= s["ttft_s_p90"] <= s["ttft_s_p99"]
    assert res.requests is not None and len(res.requests) == 20


def test_fixed_lengths_single_request_matches_its_iterations(op_times):
    """One 512+128 request alone: TTFT is one prefill iteration; every later token one decode."""
    cfg = sim.compose(["workload=fixed", "workload.num_requests=1", "scheduler=vllm"])
    res = sim.simulate(cfg, op_times=op_times)
    r = res.requests.iloc[0]
    assert res.summary["num_iterations"] == 128       # 1 prefill + 127 decodes
    assert r.num_generated_tokens == 128
    tpot = (r.completed_at_s - r.first_token_s) / 127
    assert res.summary["itl_s_mean"] == pytest.approx(tpot, rel=1e-9)
    assert r.sched_delay_s == 0.0


def test_more_load_means_more_latency(op_times):
    lo, hi = (sim.simulate(sim.compose(["workload.num_requests=200", f"workload.qps={q}"]), op_times=op_times)
              for q in (0.5, 8.0))
    assert hi.summary["e2e_s_p90"] > lo.summary["e2e_s_p90"]
    assert hi.summary["batch_size_mean"] > lo.summary["batch_size_mean"]


def test_model_that_does_not_fit_is_a_config_error_with_the_reason():
    with pytest.raises(ConfigError, match="does not fit on h100 at tp=1"):
        sim.simulate(sim.compose(["hw=h100", "model=llama2-70b", "parallel.tp=1"]))
    plan = sim.memory_plan(to_hw(CARD("hw", "h100")), to_model(CARD("model", "llama2-70b")), 1, 1)
    assert not plan.fits and "weights 128.5 GiB" in plan.reason


def test_memory_plan_counts_blocks_from_what_is_left():
    hw, model = to_hw(CARD("hw", "a100")), to_model(CARD("model", "llama2-7b"))
    plan = sim.memory_plan(hw, model, 1, 1, block_size=16, gpu_memory_utilization=0.9, reserved_gib=1.0)
    kv_block = 2 * 32 * 128 * 2 * 32 * 16                     # K+V, heads, head_dim, fp16, layers, tokens
    left = 80 * 2 ** 30 * 0.9 - 2 ** 30 - plan.weight_bytes - plan.activation_bytes
    assert plan.fits and plan.kv_bytes_per_block == kv_block and plan.num_blocks == int(left // kv_block)
    tp2 = sim.memory_plan(hw, model, 2, 1)
    assert tp2.num_blocks > 2 * plan.num_blocks                # half the KV per token, more room
    pp2 = sim.memory_plan(hw, model, 1, 2)
    assert pp2.weight_bytes < plan.weight_bytes


def test_workload_is_seedable_and_clipped(trace_dir):
    wl = sim.compose(["workload=splitwise_conv", "workload.trace=toy", "workload.num_requests=100",
                      "workload.qps=4"]).workload
    a = list(workloads.requests(wl, 1, 1024, str(trace_dir)))
    assert a == list(workloads.requests(wl, 1, 1024, str(trace_dir)))
    assert a != list(workloads.requests(wl, 2, 1024, str(trace_dir)))
    assert all(p + d <= 1024 and p >= 1 and d >= 1 for _, p, d in a)
    gaps = np.diff([0.0] + [t for t, _, _ in a])
    assert (gaps >= 0).all() and 0.15 < gaps.mean() < 0.4       # Poisson at 4 QPS


def test_gamma_cv_and_static_arrivals():
    base = ["workload=fixed", "workload.num_requests=4000", "workload.qps=10", "workload.arrival=gamma"]
    for cv in (0.5, 3.0):
        wl = sim.compose(base + [f"workload.cv={cv}"]).workload
        gaps = np.diff([t for t, _, _ in workloads.requests(wl, 0, 4096)])
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)
        assert gaps.mean() == pytest.approx(0.1, rel=0.15)
    wl = sim.compose(["workload=offline"]).workload
    assert {t for t, _, _ in workloads.requests(wl, 0, 4096)} == {0.0}


def test_trace_replay_uses_recorded_arrivals_in_order(trace_dir, op_times):
    cfg = sim.compose(["workload=splitwise_conv_replay", "workload.trace=toy", "workload.num_requests=60",
                       "workload.trace_time_scale=0.5", f"sim.data_dir={trace_dir}"])
    rows = pd.read_parquet(trace_dir / "traces" / "toy.parquet")
    stream = list(workloads.requests(cfg.workload, 0, 4096, str(trace_dir)))
    assert [(p, d) for _, p, d in stream[:50]] == list(zip(rows.num_prefill_tokens, rows.num_decode_tokens))
    assert [t for t, _, _ in stream[:3]] == [0.0, 0.25, 0.5]
    assert stream[50][0] == pytest.approx(25 * 0.5)            # cycles after the trace's span
    res = sim.simulate(cfg, op_times=op_times)
    assert np.allclose(res.requests.arrived_at_s, [t for t, _, _ in stream])


def test_trace_errors_are_one_clear_line(trace_dir):
    with pytest.raises(ConfigError, match="not found; available traces: .*toy"):
        sim.simulate(sim.compose(["workload.trace=nope", f"sim.data_dir={trace_dir}"]))
    with pytest.raises(ConfigError, match="no arrived_at_s"):
        sim.simulate(sim.compose(["workload=splitwise_conv_replay", "workload.trace=noarrivals",
                                  f"sim.data_dir={trace_dir}"]))
    with pytest.raises(ConfigError, match="workload.arrival"):
        sim.simulate(sim.compose(["workload.arrival=weekly"]))
    with pytest.raises(ConfigError, match="scheduler.name"):
        sim.simulate(sim.compose(["scheduler.name=fifo"]))


def test_streaming_metrics_match_exact_ones(op_times):
    cfg = sim.compose(["workload.num_requests=300", "workload.qps=3"])
    exact = sim.simulate(cfg, op_times=op_times).summary
    OmegaConf.update(cfg, "sim.keep_requests", False)
    res = sim.simulate(cfg, op_times=op_times)
    assert res.requests is None
    for m in REQUEST_METRICS:
        assert res.summary[f"{m}_mean"] == pytest.approx(exact[f"{m}_mean"], rel=1e-9)
        for s in ("p50", "p90"):
            assert res.summary[f"{m}_{s}"] == pytest.approx(exact[f"{m}_{s}"], rel=0.03)


def test_log_histogram_quantiles():
    h = LogHistogram()
    v = np.random.default_rng(0).lognormal(-3, 1, 100_000)
    for x in v[:50_000]:
        h.add(float(x))
    h.add_many(v[50_000:].tolist())
    h.add(float("nan"))
    assert h.mean() == pytest.approx(v.mean(), rel=1e-9)
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(v, q), rel=0.012)


def test_outputs_are_written_when_asked(tmp_path, op_times):
    cfg = sim.compose(["workload.num_requests=30", "parallel.pp=2", "parallel.replicas=2",
                       f"sim.out_dir={tmp_path}"])
    res = sim.simulate(cfg, op_times=op_times)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"requests.parquet", "summary.json", "timeline.parquet", "trace.json", "cdf.svg",
            "timeseries.svg", "config.yaml"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert pd.read_parquet(tmp_path / "requests.parquet").equals(res.requests)
    assert json.loads((tmp_path / "summary.json").read_text())["num_requests"] == 30
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert {(e["pid"], e["tid"]) for e in slices} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for rep in (0, 1):   # a stage never runs two batches at once
        for st in (0, 1):
            ev = sorted((e["ts"], e["dur"]) for e in slices if e["pid"] == rep and e["tid"] == st)
            assert all(a[0] + a[1] <= b[0] + 1e-3 for a, b in zip(ev, ev[1:]))
    assert sim.simulate(sim.compose(["workload.num_requests=5"]), op_times=op_times).trace == []


def test_op_times_of_another_tp_are_refused(op_times):
    with pytest.raises(ConfigError, match="op_times"):
        sim.simulate(sim.compose(["parallel.tp=2"]), op_times=op_times)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sim.run", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_cli_prints_the_table_and_writes_outputs(tmp_path):
    p = run_cli("workload.num_requests=40", f"sim.out_dir={tmp_path}", "sim.plots=false")
    assert p.returncode == 0, p.stderr
    for m in REQUEST_METRICS:
        assert m in p.stdout
    assert f"outputs in {tmp_path}" in p.stdout and (tmp_path / "requests.parquet").exists()


def test_cli_bad_input_is_one_line_exit_2():
    p = run_cli("hw=h100", "model=llama2-70b", "parallel.tp=1")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "does not fit" in p.stderr
    p = run_cli("scheduler=nope")
    assert p.returncode == 2 and "choose one of" in p.stderr and "Traceback" not in p.stderr


def test_sim_never_imports_torch():
    code = ("import sys, sim, sim.run, sim.bench, sim.outputs, sim.core; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_band_runs_the_estimator_quantiles(monkeypatch, tmp_path):
    """sim.band: p10/p90 operator times (here a roofline scaled 0.8x/1.25x, made in this test)
    give a latency band around the p50 run."""
    import estimator.runtime as rt
    from sim.run import run

    def fake_load(hw, model, tp, quantile="p50", data_dir="data", **kw):
        scale = {"p10": 0.8, "p50": 1.0, "p90": 1.25}[quantile]
        base = rt.roofline_predict(hw)
        return rt.OpTimes(hw, model, tp, predict=lambda fam, df: base(fam, df) * scale, max_tokens=4096)

    monkeypatch.setattr(rt, "load_op_times", fake_load)
    cfg = sim.compose(["workload=fixed", "workload.num_requests=20", "sim.band=true",
                       f"sim.out_dir={tmp_path}", "sim.plots=false", "sim.trace=false"])
    res = run(cfg)
    lo, mid, hi = res.band["tpot_s_p50"]
    assert lo < mid < hi
    runs = res.band_runs["throughput_tok_s"]       # faster operators, more tokens per second
    assert runs["p10"] >= runs["p50"] >= runs["p90"]
    assert res.band["throughput_tok_s"] == (runs["p90"], runs["p50"], runs["p10"])
    assert json.loads((tmp_path / "summary.json").read_text())["band"]["tpot_s_p50"] == [lo, mid, hi]


@pytest.mark.parametrize("pp,names", [(1, "engine"), (2, "engine"), (1, "former")])
def test_a_lone_prefill_takes_the_estimators_time(op_times, pp, names):
    """TTFT of one request on an idle replica = layers x (token ops + attention) per stage +
    send/recv between stages + embedding, final norm and LM head + the engine's CPU time +
    its frontend latency, from OpTimes itself (tp=1: no all-reduce; 700 tokens: no CUDA graph).
    The former sim.cpu_overhead_* names still set the engine's CPU terms."""
    prefix = "engine.cpu_per_" if names == "engine" else "sim.cpu_overhead_per_"
    cfg = sim.compose(["workload=fixed", "workload.num_requests=1", "workload.prefill_tokens=700",
                       f"parallel.pp={pp}", f"{prefix}iteration_us=500", f"{prefix}sequence_us=7",
                       f"{prefix}token_us=0.5", "engine.frontend_latency_us=3000"])
    res = sim.simulate(cfg, op_times=op_times)
    ot, n = op_times, 700
    per_layer = ot.layer_token_ops_us(n) + ot.layer_attention_us([n], [n], ())
    layers = [32] if pp == 1 else [16, 16]
    expected_us = (sum(layers) * per_layer + ot.embed_us(n) + ot.final_norm_us(n) + ot.lm_head_us(1)
                   + 500 + 7 + 0.5 * n + (pp - 1) * ot.send_recv_us(n) + 3000)
    assert res.requests.ttft_s[0] == pytest.approx(expected_us * 1e-6, rel=1e-9)


def test_routers_spread_requests(op_times):
    base = ["workload=fixed", "workload.num_requests=12", "workload.qps=1", "parallel.replicas=3"]
    rr = sim.simulate(sim.compose(base + ["router=round_robin"]), op_times=op_times).requests
    assert rr.replica.tolist() == [0, 1, 2] * 4
    from types import SimpleNamespace
    from sim.router import ROUTERS
    reps = [SimpleNamespace(outstanding=n) for n in (3, 1, 2, 1)]
    assert ROUTERS["least_outstanding"](reps, None, [0]) is reps[1]
    rnd = [sim.simulate(sim.compose(base + ["router=random", f"seed={s}"]), op_times=op_times).requests.replica.tolist()
           for s in (0, 0, 1)]
    assert rnd[0] == rnd[1] and rnd[0] != rnd[2]
