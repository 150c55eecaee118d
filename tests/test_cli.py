"""First-day trust (issue 19): what a new user sees from the command lines and their files.

One test per numbered item of the issue; each failed on the code before the fix. CLI tests run
``python -m ...`` in a temporary working directory with this checkout first on PYTHONPATH and
their own composition cache (OPCAST_CACHE_DIR), so they never write into the repository.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import conf
import sim
from conf import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMALL = ["workload=fixed", "workload.num_requests=8", "workload.prefill_tokens=128",
         "workload.decode_tokens=8", "sim.plots=false", "sim.trace=false"]


def cli(tmp_path, module: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               OPCAST_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Warnings said once per process are said again in this test."""
    monkeypatch.setattr(conf, "_warned", set(), raising=False)


# 1 ------------------------------------------------------------------------------------------
def test_hf_config_runs_and_errors_under_the_config_json_model_name(tmp_path):
    path = tmp_path / "mistral7b.json"
    path.write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "torch_dtype": "bfloat16", "vocab_size": 32000, "hidden_act": "silu"}))
    p = cli(tmp_path, "sim.run", f"model.hf_config={path}", *SMALL)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("mistral7b on a100"), p.stdout[:200]
    run_dir = Path(p.stdout.strip().splitlines()[-1].removeprefix("outputs in "))
    assert run_dir.parent.name == "a100-mistral7b-vllm_v1-fixed"
    saved = (tmp_path / run_dir / "config.yaml").read_text()
    assert "name: mistral7b" in saved and "num_kv_heads: 8" in saved and "llama2-7b" not in saved
    p = cli(tmp_path, "sim.run", f"model.hf_config={path}", "parallel.tp=3", *SMALL)
    assert p.returncode == 2 and "mistral7b" in p.stderr and "hf" not in p.stderr.replace("hf_config", "")


# 2 ------------------------------------------------------------------------------------------
def test_prompts_longer_than_the_context_are_counted_or_refused(caplog, fresh_warnings):
    long = ["workload=fixed", "workload.num_requests=6", "workload.prefill_tokens=100000",
            "workload.decode_tokens=16", "model=tiny-llama", "hw=a100"]
    with caplog.at_level(logging.WARNING):
        res = sim.simulate(sim.compose(long))
    assert res.summary["num_clipped_requests"] == 6
    assert "6 of 6 requests were longer than the" in caplog.text and "clipped" in caplog.text
    with pytest.raises(ConfigError, match="100000 \\+ 16 tokens exceed the .*-token request limit"):
        sim.simulate(sim.compose([*long, "workload.too_long=error"]))
    fits = sim.simulate(sim.compose([*long[:2], "workload.prefill_tokens=100", *long[3:]]))
    assert fits.summary["num_clipped_requests"] == 0


# 3 ------------------------------------------------------------------------------------------
def test_runs_started_together_get_their_own_directories_and_none_is_overwritten(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OPCAST_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-m", "sim.run", *SMALL, f"seed={s}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = {o.strip().splitlines()[-1].removeprefix("outputs in ") for o, _ in outs}
    assert len(dirs) == 2
    seeds = sorted(json.loads((tmp_path / d / "config.yaml").read_text().split("\nseed: ")[1].split("\n")[0])
                   for d in dirs)
    assert seeds == [0, 1]
    again = cli(tmp_path, "sim.run", *SMALL, f"sim.out_dir={sorted(dirs)[0]}")
    assert again.returncode == 2 and "already holds a run" in again.stderr


# 4 ------------------------------------------------------------------------------------------
def test_an_unwritable_out_dir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    start = time.perf_counter()
    p = cli(tmp_path, "sim.run", f"sim.out_dir={blocker}/run", "workload.num_requests=1000000", timeout=60)
    assert p.returncode == 2 and p.stderr.startswith(f"error: sim.out_dir='{blocker}/run' is not writable")
    assert "Traceback" not in p.stderr and time.perf_counter() - start < 60

    from sim import search
    calls = []
    cfg = search.compose(["search.executor=serial", "search.progress=false", f"search.out_dir={blocker}/search"])
    with pytest.raises(ConfigError, match="search.out_dir=.* is not writable"):
        search.run_search(cfg, simulate_fn=lambda c: calls.append(c) or {}, fits=lambda c: None)
    assert calls == []


# 5 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("workload.qsp=3", r"unknown field workload.qsp \(did you mean qps\?\); workload has: .*qps"),
    ("scheduler.max_num_seq=3", r"unknown field scheduler.max_num_seq \(did you mean max_num_seqs\?\)"),
    ("workload.num_requests=1e6", r"workload.num_requests=1e6: expected an integer \(write 1000000\)"),
    ("parallel.tp=2.5", r"parallel.tp=2.5: expected an integer$"),
    ("sim.band=maybe", r"sim.band=maybe: expected true or false"),
    ("workload=fixd", r"unknown workload 'fixd' \(did you mean fixed\?\); choose one of"),
])
def test_override_mistakes_name_the_field_the_type_and_close_matches(override, message):
    with pytest.raises(ConfigError, match=message):
        sim.compose([override])


def test_adding_an_unknown_field_is_one_error_line_not_a_traceback(tmp_path):
    p = cli(tmp_path, "sim.run", "+workload.qsp=3", *SMALL)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: unknown field workload.qsp (did you mean qps?)")


# 7 ------------------------------------------------------------------------------------------
def test_range_warnings_are_about_what_a_run_looks_up_once(tmp_path, caplog, fresh_warnings):
    """The tabulation grid reaches batch 4096 and KV 2^17, beyond the profiles: that alone must
    not warn. A run's own lookups beyond them do, once. (llama3-8b's LM head, n = 128256, is
    beyond h100's measured GEMMs in every run: that warning is right.)"""
    import shutil

    from estimator.runtime import load_op_times
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "estimators" / "h100", data / "estimators" / "h100")
    hw, model = conf.to_hw(sim.compose(["hw=h100"]).hw), conf.to_model(sim.compose(["model=llama3-8b"]).model)
    looked_up = lambda: [r.getMessage() for r in caplog.records if "looked up" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="estimator"):
        ot = load_op_times(hw, model, 1, data_dir=str(data), max_tokens=8192)   # tabulates (cold)
        base = ["hw=h100", "model=llama3-8b", "workload=fixed", "workload.num_requests=2",
                "workload.decode_tokens=4", f"sim.data_dir={data}"]
        sim.simulate(sim.compose([*base, "workload.prefill_tokens=1000"]), op_times=ot)
        assert "queries outside the profiled range" not in caplog.text              # the grid is not the run
        assert looked_up() and not any("up to" in m or m.startswith("attention") for m in looked_up())
        before = len(looked_up())
        for _ in range(2):    # h100's elementwise ops were measured up to 4096 tokens: 6000 leave that
            sim.simulate(sim.compose([*base, "workload.prefill_tokens=6000", "scheduler=vllm",
                                      "scheduler.max_tokens_per_batch=8192"]), op_times=ot)
    new = looked_up()[before:]
    trained = json.loads((data / "estimators" / "h100" / "elementwise.json").read_text())["shape_range"]
    assert trained["num_tokens"][1] < 6000, "h100 elementwise now covers 6000 tokens: pick a longer prompt"
    said = [m for m in new if m.startswith("elementwise") and "num_tokens up to 6000" in m]
    assert len(said) == 1 and len(new) == len(set(new))                            # each finding once


# 8 ------------------------------------------------------------------------------------------
def test_corrupt_parquet_is_one_clear_line(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(ConfigError, match="broken.parquet is not a readable parquet file"):
        sim.simulate(sim.compose(["workload.num_requests=5", f"workload.trace={bad}"]))
    out = tmp_path / "search"
    out.mkdir()
    (out / "points.parquet").write_bytes(b"garbage")
    from sim import search
    with pytest.raises(ConfigError, match="points.parquet is not a readable points file.*move it away"):
        search.run_search(search.compose(["search.executor=serial", f"search.out_dir={out}"]),
                          simulate_fn=lambda c: {}, fits=lambda c: None)


# 9 ------------------------------------------------------------------------------------------
def test_long_runs_show_progress_and_a_cycled_trace_is_announced(tmp_path, monkeypatch, capsys, caplog,
                                                               fresh_warnings):
    import sim.core
    monkeypatch.setattr(sim.core, "PROGRESS_DELAY_S", 0.0, raising=False)
    sim.simulate(sim.compose(["workload=fixed", "workload.num_requests=2100", "workload.qps=50",
                              "workload.prefill_tokens=64", "workload.decode_tokens=4", "model=tiny-llama"]))
    err = capsys.readouterr().err
    assert "simulate" in err and "2100/2100" in err and "req/s" in err

    traces = tmp_path / "traces"
    traces.mkdir()
    pd.DataFrame({"arrived_at_s": np.arange(40) * 0.1, "num_prefill_tokens": [64] * 40,
                  "num_decode_tokens": [4] * 40}).to_parquet(traces / "toy.parquet")
    with caplog.at_level(logging.WARNING, logger="sim"):
        res = sim.simulate(sim.compose(["workload=splitwise_conv_replay", "workload.trace=toy",
                                        "workload.num_requests=100", f"sim.data_dir={tmp_path}",
                                        "model=tiny-llama"]))
    assert res.summary["num_requests"] == 100
    assert "trace toy has 40 rows; workload.num_requests=100 replays it 3 times" in caplog.text


# 10 -----------------------------------------------------------------------------------------
def test_train_leaves_the_shipped_predictors_alone_and_says_where_it_wrote(tmp_path, monkeypatch, capsys):
    import shutil

    from estimator import train
    data = tmp_path / "data"
    shutil.copy(REPO / "data" / "profiles" / "h100" / "gemm.parquet", tmp_path / "gemm.parquet")
    (data / "profiles" / "h100").mkdir(parents=True)
    shutil.move(tmp_path / "gemm.parquet", data / "profiles" / "h100" / "gemm.parquet")
    shipped = data / "estimators" / "h100"
    shipped.mkdir(parents=True)
    (shipped / "gemm.ubj").write_bytes(b"the shipped model")
    monkeypatch.setattr(train, "SHIPPED", (data / "estimators").resolve())   # stand-in for data/estimators
    monkeypatch.chdir(tmp_path)
    fast = ["families=[gemm]", "max_rows=300", "evaluate=false", "xgb.num_rounds=5", "quantile.folds=0"]
    train.run(conf.compose("train", ["hw=h100", f"data_dir={data}", *fast]))
    assert (shipped / "gemm.ubj").read_bytes() == b"the shipped model"
    assert (tmp_path / "outputs" / "estimators" / "h100" / "gemm.ubj").is_file()
    assert "wrote 1 trained families (gemm) and the report to outputs/estimators/h100" in capsys.readouterr().out
    train.run(conf.compose("train", ["hw=h100", f"data_dir={data}", f"out_dir={shipped}", *fast]))
    assert (shipped / "gemm.ubj").read_bytes() != b"the shipped model"     # asked for: replaced


@pytest.mark.parametrize("m", [0, -5])
def test_predict_refuses_shapes_that_are_not_sizes(tmp_path, m):
    from estimator import predict
    table = tmp_path / "gemm.parquet"
    pd.DataFrame({"m": [16, m], "n": [4096, 4096], "k": [4096, 4096]}).to_parquet(table)
    cfg = conf.compose("predict", ["hw=h100", f"+input={table}", f"+output={tmp_path / 'out.parquet'}"])
    with pytest.raises(ConfigError, match=f"gemm row 1: m={m}; m must be >= 1"):
        predict.run(cfg)
    assert not (tmp_path / "out.parquet").exists()


def test_search_without_a_deployment_meeting_the_slo_exits_3(tmp_path):
    p = cli(tmp_path, "sim.search", "workload=fixed", "workload.prefill_tokens=128", "workload.decode_tokens=8",
            "search.hw=[a100]", "search.tp=[1]", "search.pp=[1]", "search.gpu_budget=1",
            "search.schedulers=[vllm]", "search.knobs={}", "search.seeds=[0]", "search.num_requests=10",
            "search.executor=serial", "search.progress=false", "slo.ttft_p90_s=0.000001",
            f"search.out_dir={tmp_path / 'out'}")
    assert p.returncode == 3, p.stderr[-2000:]
    assert "no config meets the SLO" in p.stdout


def test_killing_the_search_ends_its_pool_workers(tmp_path):
    script = tmp_path / "search_like.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing, sys, threading, time
        from sim.search.exec import Task, run_pool

        def slow(cfg):
            time.sleep(60)
            return {}

        tasks = [Task(i, str(i), {}, [0], {}, {"saturation_qps": 1.0}, "workload.qps", "seed",
                      saturation_only=True) for i in range(2)]
        results = run_pool(tasks, slow, 2)
        threading.Thread(target=lambda: next(results), daemon=True).start()
        start = time.time()
        while len(multiprocessing.active_children()) < 2 and time.time() - start < 30:
            time.sleep(0.05)
        time.sleep(0.5)       # both workers are inside slow()
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        time.sleep(120)
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    assert len(workers) == 2

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()

    deadline = time.time() + 10
    try:
        while time.time() < deadline and any(alive(p) for p in workers):
            time.sleep(0.1)
        assert not any(alive(p) for p in workers), "pool workers outlived the killed search"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_band_is_a_band_over_runs_even_when_a_metric_is_not_monotone(monkeypatch):
    """Runs with p10, p50 and p90 operator times batch, admit and preempt differently, so a
    metric need not follow the operator times (seen with the shipped a100 predictors: 600 KV
    blocks, 4 QPS of fixed 512+128 requests gave TTFT p90 of 0.15 / 0.29 / 0.26 s). The three
    runs' summaries here are made up in that shape; the band must be low <= p50 run <= high over
    the runs, with the crossing metric marked."""
    import sim.core
    import sim.run
    from sim.core import SimResult
    from sim.outputs import summary_table

    made_up = {"p10": 0.15, "p50": 0.29, "p90": 0.26}       # TTFT p90 per run (s), as seen
    base = {k: 1.0 for k in sim.run.BAND_METRICS}
    monkeypatch.setattr(sim.core, "load_op_times_for", lambda cfg, q=None: q)
    monkeypatch.setattr(sim.run, "simulate", lambda cfg, op_times="p50", outputs=None: SimResult(
        dict(base, ttft_s_p90=made_up[op_times or "p50"])))
    res = sim.run.run(sim.compose(["sim.band=true"]))
    assert res.band["ttft_s_p90"] == (0.15, 0.29, 0.29)
    assert res.band_runs["ttft_s_p90"] == made_up
    for lo, mid, hi in res.band.values():
        assert lo <= mid <= hi
    table = summary_table(dict(res.summary, **{f"{m}_{s}": 0.0 for m in ("ttft_s", "tpot_s", "itl_s", "e2e_s",
                                                                           "norm_e2e_s", "sched_delay_s")
                                               for s in ("mean", "p50", "p90", "p99")}), res.band, res.band_runs)
    assert next(line for line in table.splitlines() if line.startswith("ttft_s_p90 ")).endswith(" *")
    assert "* not monotone in the operator times" in table


def test_pipeline_stages_say_how_they_split_the_layers(tmp_path):
    p = cli(tmp_path, "sim.run", "parallel.pp=5", *SMALL)
    assert p.returncode == 0, p.stderr
    assert "pp=5 (32 layers as 7+7+6+6+6)" in p.stdout.splitlines()[0]


def test_the_time_series_of_a_long_run_is_aggregated_not_a_blob(tmp_path):
    from sim.outputs import MAX_PLOT_POINTS, plot, timeline_columns
    n = 200_000      # iterations of a long run on one replica
    t = np.cumsum(np.full(n, 0.01))
    rows = list(zip(t, np.zeros(n, int), np.linspace(0, 1, n), np.arange(n) % 64, np.arange(n) % 64,
                    np.arange(n) % 7, np.zeros(n, int), np.zeros(n)))
    paths = plot(SimpleNamespace(columns=None), timeline_columns(rows), tmp_path)
    svg = paths["timeseries"].read_text()
    lines = [seg for seg in svg.split('<polyline points="')[1:]]
    assert len(lines) == 3
    for seg in lines:    # steps: two vertices per time bin
        assert len(seg.split('"')[0].split()) <= 2 * MAX_PLOT_POINTS
    assert paths["timeseries"].stat().st_size < 500_000


def test_pareto_labels_do_not_overprint():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sim.search.report import place_labels
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.linspace(1.0, 1.2, 12)          # twelve front points crowded together
    y = np.linspace(100.0, 95.0, 12)
    ax.scatter(x, y)
    fig.tight_layout()
    labels = [f"h100 tp{1 + i % 4} pp1 x{8 // (1 + i % 4)} vllm max_num_seqs={64 * (1 + i)}" for i in range(12)]
    placed = place_labels(ax, x, y, labels)
    boxes = [a.get_window_extent(fig.canvas.get_renderer()) for a in placed]
    assert placed and all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


# speed: the cached composition behind a 0.4 s `python -m sim.run` must never be stale ---------
def test_a_cached_composition_is_used_only_while_its_inputs_are_unchanged(tmp_path, monkeypatch):
    import shutil

    from conf import composed
    conf_dir = tmp_path / "conf"
    shutil.copytree(conf.CONF_DIR, conf_dir)
    monkeypatch.setattr(conf, "CONF_DIR", conf_dir)
    monkeypatch.setenv("OPCAST_CACHE_DIR", str(tmp_path / "cache"))
    cfg = sim.compose(["workload.qps=3"])
    from omegaconf import OmegaConf
    hydra_cfg = OmegaConf.create({"run": {"dir": "."}, "output_subdir": None, "mode": "RUN", "job": {"chdir": False},
                                  "callbacks": {}, "verbose": False,
                                  "job_logging": {"version": 1, "disable_existing_loggers": False}})
    composed.save("sim", ["workload.qps=3"], cfg, hydra_cfg)
    seen = []
    assert composed.run_cached("sim", ["workload.qps=3"], seen.append) and seen[0].workload.qps == 3
    assert not composed.run_cached("sim", ["workload.qps=4"], seen.append)          # other overrides
    (conf_dir / "workload" / "splitwise_conv.yaml").write_text(
        (conf_dir / "workload" / "splitwise_conv.yaml").read_text() + "\n# edited\n")
    assert not composed.run_cached("sim", ["workload.qps=3"], seen.append)          # a conf file changed
    assert len(seen) == 1
