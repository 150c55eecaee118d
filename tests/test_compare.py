"""vLLM-format results out (vllm_result.json) and `python -m sim.compare` (replay a vLLM benchmark
result, compare, calibrate), checked against real `vllm bench serve` result files."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import sim
from sim import calibrate, compare, vllm_bench

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tests" / "fixtures" / "fidelity" / "bench_result.json"      # vLLM 0.32 --save-detailed
EXP7 = REPO / "tests" / "fixtures" / "traces" / "exp7_vllm-2replicas_benchmark_2025-05-11_22-45-40.json"
CPU = ["hw=cpu", "model=tiny-llama", "scheduler=vllm_v1_cpu", "sim.reserved_gib=0"]
# What opcast cannot know without per-token times of every request, documented in sim/vllm_bench.py.
NOT_WRITTEN = {"itls", "generated_texts", "max_output_tokens_per_s"}


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = sim.compose(["hw=a100", "model=llama2-7b", "workload.num_requests=40", f"sim.out_dir={out}",
                       "sim.plots=false", "sim.trace=false", "sim.print_summary=false"])
    res = sim.simulate(cfg)
    return res, json.loads((out / "vllm_result.json").read_text())


def test_vllm_result_has_vllms_keys_and_types(sim_run):
    res, ours = sim_run
    real = json.loads(BENCH.read_text())
    assert set(real) - set(ours) <= NOT_WRITTEN
    for k in set(real) & set(ours):
        if real[k] is None or k == "request_rate":        # "inf" or a number, as vLLM writes it
            continue
        assert type(ours[k]) is type(real[k]), k
    for k in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
              "p99_itl_ms", "std_itl_ms", "request_throughput", "output_throughput", "total_token_throughput"):
        assert isinstance(ours[k], float), k
    s = res.summary
    assert ours["completed"] == ours["num_prompts"] == 40 and ours["failed"] == 0
    assert ours["mean_ttft_ms"] == pytest.approx(s["ttft_s_mean"] * 1e3)
    assert ours["p99_itl_ms"] == pytest.approx(s["itl_s_p99"] * 1e3) and ours["std_itl_ms"] > 0
    assert ours["total_output_tokens"] == int(res.requests.num_decode_tokens.sum())
    assert ours["request_throughput"] == pytest.approx(40 / ours["duration"])
    assert ours["request_rate"] == 2.0 and ours["burstiness"] == 1.0
    assert len(ours["ttfts"]) == len(ours["input_lens"]) == 40 and ours["errors"] == [""] * 40


def test_vllm_result_round_trips_through_the_reader(sim_run):
    res, ours = sim_run
    req = vllm_bench.requests(ours, "ours")
    r = res.requests.sort_values("arrived_at_s", kind="stable")
    assert req.arrival_source == "recorded" and list(req.input_lens) == list(r.num_prefill_tokens)
    assert req.arrivals_s == pytest.approx(r.arrived_at_s.to_numpy() - r.arrived_at_s.min())
    stats = vllm_bench.engine_stats(ours, "ours")
    assert stats["mean_ttft_ms"] == pytest.approx(ours["mean_ttft_ms"])
    assert stats["p99_e2el_ms"] == pytest.approx(ours["p99_e2el_ms"])


def test_engine_stats_reproduce_vllms_own_summary():
    doc = json.loads(BENCH.read_text())
    st = vllm_bench.engine_stats(doc, "bench")
    for k in ("mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
              "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "std_itl_ms"):
        assert st[k] == pytest.approx(doc[k], rel=1e-9), k


def test_compare_replays_a_detailed_result_and_calibrates(tmp_path):
    doc = json.loads(BENCH.read_text())
    cfg = sim.compose(CPU + [f"+bench={BENCH}", "+calibrate=true"])
    rep = compare.run(cfg, tmp_path)
    rt = rep["round_trip"]
    assert rt["equal"] and rt["opcast"] == {"requests": 30, "input_tokens": doc["total_input_tokens"],
                                            "output_tokens": doc["total_output_tokens"]}
    rows = {(r["metric"], r["stat"]): r for r in rep["table"]}
    assert rows[("ttft", "mean")]["engine_ms"] == pytest.approx(doc["mean_ttft_ms"])
    assert rows[("ttft", "mean")]["opcast_error_pct"] == pytest.approx(
        (rows[("ttft", "mean")]["opcast_ms"] / doc["mean_ttft_ms"] - 1) * 100)
    assert "calibrated_ms" in rows[("e2el", "p99")]
    prof = (tmp_path / "engine_profile.yaml").read_text()
    assert all(k in prof for k in compare.ENGINE_COSTS) and "sources" in prof and "engine.cpu_per_iteration_us=" in prof
    again = compare.run(sim.compose(CPU + [f"+bench={BENCH}", f"+engine_profile={tmp_path / 'engine_profile.yaml'}"]),
                        tmp_path / "again")
    for k, v in compare.engine_costs(rep["calibration"]).items():
        assert again["deployment"][k] == pytest.approx(v)
    # the written profile is an engine group file: it composes on top of the engine it extends
    (REPO / "conf" / "engine" / "_test_calibrated.yaml").write_text(prof)
    try:
        cfg = sim.compose(CPU + ["engine=_test_calibrated"])
        assert cfg.engine.cpu_per_iteration_us == pytest.approx(rep["calibration"]["cpu_overhead_per_iteration_us"])
        assert list(cfg.engine.cuda_graph_sizes) == list(sim.compose([]).engine.cuda_graph_sizes)
    finally:
        (REPO / "conf" / "engine" / "_test_calibrated.yaml").unlink()
    assert json.loads((tmp_path / "vllm_result.json").read_text())["completed"] == 30


def test_compare_replays_an_aggregate_result(tmp_path):
    cfg = sim.compose(["hw=a100", "model=llama3-8b", "model.max_position=131072", "parallel.replicas=2",
                       f"+bench={EXP7}"])
    rep = compare.run(cfg, tmp_path)
    assert rep["round_trip"]["opcast"] == {"requests": 200, "input_tokens": 1600000, "output_tokens": 40000}
    assert rep["bench"]["arrival_source"] == "legacy"
    row = next(r for r in rep["table"] if (r["metric"], r["stat"]) == ("ttft", "p99"))
    assert row["engine_ms"] == pytest.approx(1628.2638817280522) and row["opcast_ms"] > 0
    assert pd.read_parquet(tmp_path / "bench_trace.parquet").num_prefill_tokens.eq(8000).all()


def test_compare_bad_input_is_one_line(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "sim.compare", *a, f"+out={tmp_path}", *CPU],  # noqa: E731
                                    capture_output=True, text=True, cwd=REPO)
    r = run()
    assert r.returncode == 2 and "missing +bench=RESULT.json" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: v for k, v in json.loads(EXP7.read_text()).items() if k != "burstiness"}))
    r = run(f"+bench={bad}")
    assert r.returncode == 2 and "missing key 'burstiness'" in r.stderr and r.stderr.count("\n") == 1
    r = run(f"+bench={EXP7}", "+calibrate=true")
    assert r.returncode == 2 and "--save-detailed" in r.stderr


class _Cost:
    """Stand-in BatchCost: decode 1 ms + 0.5 ms per sequence; prefill 0.1 ms per token."""
    def stage_us(self, num_tokens, prefills, num_decodes, kv_sum, num_sampled):
        return [1000.0 + 500.0 * num_decodes if not prefills else 100.0 * num_tokens]


def test_client_timing_fit_recovers_known_overheads():
    # Hand-built timings. 4 requests decode together, then 2 together: every step = the stand-in
    # forward + a + b * sequences. Then 3 requests alone: TTFT = forward + (a + b) + frontend f +
    # c * prompt tokens. The fit must give back a, b, c and f.
    a, b, f, c = 3000.0, 200.0, 5000.0, 10.0
    rows = []
    for start, batch in ((0.0, 4), (5.0, 2)):
        step = (1000 + 500 * batch + a + b * batch) / 1e6
        rows += [{"input_len": 100, "output_len": 21, "start_s": start, "ttft_s": 0.5, "itl_s": [step] * 20,
                  "e2e_s": 0.5 + 20 * step} for _ in range(batch)]
    for k, n in enumerate((200, 400, 800)):
        ttft = (100 * n + a + b + f + c * n) / 1e6
        rows.append({"input_len": n, "output_len": 1, "start_s": 10.0 + k, "ttft_s": ttft, "itl_s": [],
                     "e2e_s": ttft})
    fit = calibrate.from_client_timings(pd.DataFrame(rows), _Cost(), budget=2048)
    assert fit["num_decode_gaps"] == 6 * 20 and fit["num_solo_requests"] == 3
    assert fit["cpu_overhead_per_iteration_us"] == pytest.approx(a, abs=0.1)
    assert fit["cpu_overhead_per_sequence_us"] == pytest.approx(b, abs=0.1)
    assert fit["cpu_overhead_per_token_us"] == pytest.approx(c, abs=1e-3)
    assert fit["frontend_latency_ms"] == pytest.approx(f / 1e3, abs=1e-3)
