"""GPU fidelity harness (bench/gpu_fidelity) on a small recorded case: 8 real requests at two
loads of the llm-d LMBench short_input runs (tests/fixtures/gpu_fidelity), replayed through
the simulator with a cheap stand-in deployment (tiny model, roofline operator times)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.gpu_fidelity import convert, run

FIX = Path(__file__).parent / "fixtures" / "gpu_fidelity"
LOADS = {0.5: "lmbench_short_input_qps0_5_first8.csv", 10.0: "lmbench_short_input_qps10_first8.csv"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """data dir with traces/, engine/ and index.json for one replay case at two loads."""
    d = tmp_path_factory.mktemp("gpu")
    (d / "traces").mkdir()
    loads = []
    for load, name in LOADS.items():
        measured = convert.lmbench_measured(FIX / name)
        stem = convert.load_name("toy", load)
        raw = pd.read_csv(FIX / name).sort_values("launch_time", kind="stable")
        pd.DataFrame({"arrived_at_s": (raw.launch_time - raw.launch_time.iloc[0]).to_numpy(),
                      "num_prefill_tokens": measured.num_prefill_tokens,
                      "num_decode_tokens": measured.num_decode_tokens}).to_parquet(d / "traces" / f"{stem}.parquet")
        convert.write_measured(measured, d / "engine" / f"{stem}.parquet", {"source": {"path": name}})
        loads.append({"load": load, "trace": f"traces/{stem}.parquet", "engine": f"engine/{stem}.parquet"})
    (d / "index.json").write_text(json.dumps({"toy": {"loads": loads}}))
    (d / "empty").mkdir()
    return d


def toy_case(d: Path, **extra) -> run.Case:
    return run.Case(name="toy", kind="replay", about="", assumed=[], targets=True,
                    sim=["hw=h100", "model=tiny-llama", "parallel.replicas=2", "router=random",
                         f"sim.data_dir={d / 'empty'}"], extra=extra)


def test_engine_side_follows_vllms_definitions():
    m = convert.lmbench_measured(FIX / LOADS[10.0])
    raw = pd.read_csv(FIX / LOADS[10.0])
    assert m.ttft_s.tolist() == raw.ttft.tolist()                       # already in launch order
    assert m.e2e_s.to_numpy() == pytest.approx((raw.ttft + raw.generation_time).to_numpy())
    assert m.tpot_s.to_numpy() == pytest.approx((raw.generation_time / 19).to_numpy())


def test_replay_compares_each_load_and_finds_saturation(recorded):
    res = run.run_replay(toy_case(recorded, seeds=2), json.loads((recorded / "index.json").read_text())["toy"],
                         run.Simulator([]), ratio=3.0, data=recorded)
    assert [r["load"] for r in res["loads"]] == [0.5, 10.0] and all(r["num_requests"] == 8 for r in res["loads"])
    raw = pd.read_csv(FIX / LOADS[0.5])
    low = res["loads"][0]
    assert low["engine"]["ttft_s_mean"] == pytest.approx(raw.ttft.mean())
    assert low["engine"]["ttft_s_p90"] == pytest.approx(np.percentile(raw.ttft, 90))
    for k, e in low["engine"].items():
        assert low["error_pct"][k] == pytest.approx((low["sim"][k] - e) / e * 100)
    # neither side queues at these loads; targets are judged on the mean |error| below saturation
    assert res["saturation_qps"] == {"engine": None, "sim": None, "within_one_step": True}
    mean = res["below_saturation"]["mean_abs_error_pct"]
    assert mean["ttft_s_mean"] == pytest.approx(np.mean([abs(r["error_pct"]["ttft_s_mean"]) for r in res["loads"]]))
    assert res["meets_targets"] == (max(mean.values()) <= run.TARGET_PCT)


def test_replay_refuses_a_trace_that_is_not_the_engines(recorded, tmp_path):
    index = json.loads((recorded / "index.json").read_text())["toy"]
    eng = pd.read_parquet(recorded / index["loads"][0]["engine"])
    eng.loc[0, "num_prefill_tokens"] += 1
    eng.to_parquet(tmp_path / "bad.parquet")
    index["loads"] = [dict(index["loads"][0], engine=str(tmp_path / "bad.parquet"))]
    with pytest.raises(RuntimeError, match="not the engine's"):
        run.run_replay(toy_case(recorded), index, run.Simulator([]), ratio=3.0, data=recorded)


def test_saturation_is_the_first_load_where_ttft_explodes():
    assert run.saturation([1, 2, 3, 4], [0.1, 0.12, 0.5, 9.0], 3.0) == 2
    assert run.saturation([1, 2], [0.1, 0.2], 3.0) == 2          # none: one past the last load


def test_throughput_curve_bins_every_output_token():
    req = pd.DataFrame({"first_token_s": [0.5, 1.2], "completed_at_s": [2.5, 1.2], "num_decode_tokens": [5, 1]})
    tok = run.tokens_per_second(req, 5)
    # request 0: tokens at 0.5, 1.0, 1.5, 2.0, 2.5; request 1: one token at 1.2
    assert tok.tolist() == [1, 3, 2, 0, 0, 0]
    assert run.curve_measures(tok) == {"output_tokens": 6.0, "makespan_s": 3.0, "peak_tok_s": 3.0, "mean_tok_s": 2.0}


def test_cases_state_their_assumptions_and_blocked_ones_say_why():
    cases, settings = run.load_cases()
    assert settings["sweep_saturation_ttft_ratio"] > 1
    for c in cases:
        assert c.kind in run.KINDS and c.about
        assert c.blocked or c.assumed, c.name
        assert c.targets or c.why_not_targets or c.blocked, c.name
        assert c.extra["upstream"]["commit"] and c.extra["upstream"]["licence"]


def test_variants_report_prefix_caching_off_beside_the_case(recorded, tmp_path):
    """A case's ``variants`` rerun it with extra overrides and report the same headline figures:
    8 requests repeating one 2048-token prompt (chained prefix ids) are prefilled once with the
    prefix cache on, so turning it off raises the simulated TTFT and with it the error."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    index = json.loads((recorded / "index.json").read_text())["toy"]
    (tmp_path / "traces").mkdir()
    (tmp_path / "engine").mkdir()
    for e in index["loads"]:
        trace = pd.read_parquet(recorded / e["trace"])
        n = len(trace)
        table = pa.table({"arrived_at_s": trace.arrived_at_s.to_numpy(), "num_prefill_tokens": [2048] * n,
                          "num_decode_tokens": trace.num_decode_tokens.to_numpy(),
                          "prefix_hashes": [list(range(1, 129))] * n})
        pq.write_table(table.replace_schema_metadata({"opcast": json.dumps({"hash_block_tokens": 16})}),
                       tmp_path / e["trace"])
        eng = pd.read_parquet(recorded / e["engine"]).assign(num_prefill_tokens=2048)
        eng.to_parquet(tmp_path / e["engine"])
    case = toy_case(recorded, variants={"prefix_caching_off": ["scheduler.prefix_caching=false"]})
    case.sim += ["model=llama3-8b", "engine=vllm_v1", "scheduler=vllm_v1"]   # a prefill worth saving
    simr = run.Simulator([])
    on = run.run_replay(case, index, simr, ratio=3.0, data=tmp_path)
    off = run.run_variants(case, index, simr, 3.0, tmp_path)["prefix_caching_off"]
    assert off["sim_overrides"] == ["scheduler.prefix_caching=false"]
    assert set(off) == {"sim_overrides", "below_saturation", "saturation_qps", "error_pct_by_load", "meets_targets"}
    # 7 of 8 prompts hit the cache with it on: 2048 tokens prefilled instead of 16 per request
    assert off["error_pct_by_load"]["0.5"]["ttft_s_mean"] > on["loads"][0]["error_pct"]["ttft_s_mean"] + 50
    assert run.headline("replay", on)["error_pct_by_load"]["0.5"]["ttft_s_mean"] == \
        round(on["loads"][0]["error_pct"]["ttft_s_mean"], 2)
