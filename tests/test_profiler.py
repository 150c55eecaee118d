"""profiler.run: the grid it builds, the tables it writes (schema, provenance, resume, merge by
source, passes that survive kill -9, OOM rows), its GPU timing path (through a fake torch.cuda and
a fake NVML), the dry run, and the one-line errors of its CLI."""
import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conf import ConfigError, ModelConf, to_model
from conf.shapes import allowed_tp, check_tp
from profiler import grid, tables
from profiler.config import PRESETS, ProfileConf, compose
from tests.fakes import fakes, needs_gpu  # noqa: F401  (fakes: a fixture)

REPO = Path(__file__).resolve().parents[1]
FAST = ["profile.grid=small", "profile.tp=[1,2]", "profile.warmup=1", "profile.warmup_ms=2", "profile.repeats=5",
        "profile.min_repeats=3", "profile.max_seconds_per_point=0.2", "profile.progress=false",
        "profile.dtype=float32"]   # CPU bf16 GEMMs are ~8x slower than fp32 here; the dtype is not under test


def _cfg(tmp_path, *extra):
    return compose([f"out_dir={tmp_path}", *FAST, *extra])


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    pytest.importorskip("torch")
    from profiler.run import run
    out = tmp_path_factory.mktemp("profile")
    counts = run(_cfg(out))
    return out, counts


def _long_model(**kw):
    base = dict(name="long", hidden_size=1024, num_layers=2, num_heads=16, num_kv_heads=4, head_dim=64,
                ffn_size=2816, vocab_size=32000, max_position=32768)
    return ModelConf(**{**base, **kw})


# ---------------------------------------------------------------- grid

def test_grids_cover_long_contexts_and_dedup_tp():
    gpu = PRESETS["gpu"]
    assert max(gpu["tokens"]) >= 16384 and max(gpu["kv_lens"]) >= 32768
    ax = grid.axes(ProfileConf(grid="gpu"), "cuda")
    points = grid.build(_long_model(), [1, 2, 4], ax, ["gemm", "elementwise", "attention"], 16)
    for family, rows in points.items():
        shape = [c for c, _ in tables.FAMILIES[family] if c not in ("model", "tp")] + ["op"]
        keys = [tuple(r[c] for c in shape) for r in rows]
        assert len(keys) == len(set(keys)), family
    # RMSNorm / residual add are not sharded: measured once, at tp=1
    assert {r["tp"] for r in points["elementwise"] if r["op"] in ("rmsnorm", "add", "fused_add_rmsnorm")} == {1}
    assert {r["tp"] for r in points["gemm"] if r["op"] == "qkv_proj"} == {1, 2, 4}
    att = points["attention"]
    assert all(r["num_kv_tokens"] == sum(r["_kv_lens"]) and r["num_q_tokens"] == sum(r["_q_lens"]) for r in att)
    assert all(r["q_kv_product_sum"] == sum(q * k for q, k in zip(r["_q_lens"], r["_kv_lens"])) for r in att)
    dec = [r for r in att if r["phase"] == "decode"]
    assert all(r["q_kv_product_sum"] == r["num_kv_tokens"] for r in dec)
    pre = [r for r in att if r["phase"] == "prefill"]
    assert all(q <= k for r in pre for q, k in zip(r["_q_lens"], r["_kv_lens"]))
    assert max(r["max_kv_len"] for r in pre) == 32768


def test_attention_grid_respects_the_context_limit_and_is_ragged():
    ax = grid.axes(ProfileConf(grid="gpu"), "cuda")
    model = to_model(compose(["model=llama2-70b"]).model)            # max_position 4096
    att = grid.attention_points(model, [8], ax, 16)
    assert max(r["max_kv_len"] for r in att) == model.max_position
    spread = {round(r["max_kv_len"] * r["batch_size"] / r["num_kv_tokens"], 2) for r in att}
    assert len(spread) > 10 and max(spread) > 4 and 1.0 in spread   # kv_spread varies: learnable
    for phase in ("prefill", "decode"):
        rows = [r for r in att if r["phase"] == phase and r["batch_size"] > 1]
        uniform = [r for r in rows if r["num_kv_tokens"] == r["batch_size"] * r["max_kv_len"]]
        assert 0 < len(uniform) < len(rows), phase
    assert not any(r["batch_size"] == 1 and r["num_kv_tokens"] != r["max_kv_len"] for r in att)
    flat = grid.attention_points(model, [8], ax, 16, ragged=False)
    assert all(r["num_kv_tokens"] == r["batch_size"] * r["max_kv_len"] for r in flat)


def test_elementwise_grid_has_the_ops_vllm_runs():
    model = to_model(compose(["model=tiny-llama"]).model)
    ax = grid.axes(ProfileConf(grid="small"), "cpu")
    rows = grid.elementwise_points(model, [1, 2], ax)
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
    assert {"fused_add_rmsnorm", "kv_cache_write", "embedding", "sampler", "rmsnorm"} <= set(by_op)
    assert {r["width"] for r in by_op["fused_add_rmsnorm"]} == {model.hidden_size}
    for r in by_op["kv_cache_write"]:                # 2 x KV heads per GPU x head_dim
        assert r["width"] == 2 * r["num_kv_heads"] * r["head_dim"] and r["head_dim"] == model.head_dim
    assert {(r["tp"], r["num_kv_heads"]) for r in by_op["kv_cache_write"]} == {(1, 4), (2, 2)}
    assert {r["width"] for r in by_op["sampler"]} == {model.vocab_size}
    assert max(r["num_tokens"] for r in by_op["sampler"]) <= max(ax.decode_batch_sizes)


def test_tp_rule_is_one_function_for_profiler_and_simulator():
    model = ModelConf(name="m12", hidden_size=768, num_layers=2, num_heads=12, num_kv_heads=12, head_dim=64,
                      ffn_size=3072, vocab_size=1000)
    assert allowed_tp(model) == [1, 2, 4]
    assert grid.tp_degrees(model, [1, 2, 4, 8], [1, 2, 4, 8]) == [1, 2, 4]
    with pytest.raises(ConfigError) as prof:
        grid.tp_degrees(model, [8], [1, 2, 4, 8])
    with pytest.raises(ConfigError) as sim:
        check_tp(model, 8)
    assert "allowed tp: [1, 2, 4]" in str(prof.value) and "allowed tp: [1, 2, 4]" in str(sim.value)
    assert str(prof.value).startswith("profile.tp=8") and str(sim.value).startswith("tp=8")
    big = _long_model(num_heads=64, num_kv_heads=8)
    assert allowed_tp(big) == [1, 2, 4, 8, 16, 32, 64] and grid.tp_degrees(big, [32], [1]) == [32]


# ---------------------------------------------------------------- tables

def test_tables_follow_the_contract(profiled):
    out, counts = profiled
    for family in ("gemm", "elementwise", "attention"):
        path = out / f"{family}.parquet"
        df = tables.read(path, family)
        assert list(df.columns) == tables.schema(family).names
        assert len(df) == counts[family] > 0
        assert (df.status == "ok").all() and (df.time_us_median > 0).all()
        assert (df.time_us_min <= df.time_us_median).all() and (df.time_us_median <= df.time_us_p90 * 1.0001).all()
        assert set(df.backend) <= {"torch", "sdpa"} and set(df.timer) == {"perf_counter"}
        assert set(df.hw) == {"cpu"} and set(df.source) == {"opcast"} and set(df.threads) == {1}
        assert not df.duplicated(tables.identity_columns(family)).any()
        assert df.sm_clock_mhz.isna().all()              # no GPU clock on a CPU
        meta = tables.provenance(path)["sources"]["opcast"]
        for k in ("device_name", "cpu_model", "threads", "git_commit", "date_utc", "versions", "config"):
            assert k in meta, k
        assert meta["family"] == family and meta["versions"]["torch"]
    ops = set(tables.read(out / "elementwise.parquet").op)
    assert ops == {"rmsnorm", "fused_add_rmsnorm", "silu_mul", "add", "rope", "embedding", "kv_cache_write", "sampler"}


def test_times_grow_with_work(profiled):
    out, _ = profiled
    g = tables.read(out / "gemm.parquet")
    for op in ("qkv_proj", "gate_up_proj", "down_proj"):
        rows = g[(g.op == op) & (g.tp == 1)].set_index("m").time_us_median
        assert rows[128] > 3 * rows[1], op
    a = tables.read(out / "attention.parquet")
    a = a[(a.tp == 1) & (a.num_kv_tokens == a.batch_size * a.max_kv_len)]       # uniform batches
    dec = a[a.phase == "decode"].set_index(["batch_size", "max_kv_len"]).time_us_median
    assert dec[(8, 256)] > dec[(1, 256)] and dec[(8, 256)] > dec[(8, 16)]
    pre = a[(a.phase == "prefill") & (a.max_q_len == 128)].set_index("max_kv_len").time_us_median
    assert pre[256] > pre[128]
    e = tables.read(out / "elementwise.parquet")
    silu = e[(e.op == "silu_mul") & (e.tp == 1)].set_index("num_tokens").time_us_median
    assert silu[128] > silu[1]


def test_resume_skips_measured_points_and_completes_partial_runs(tmp_path, profiled):
    from profiler.run import run
    out, counts = profiled
    before = {f: tables.read(out / f"{f}.parquet") for f in counts}
    assert sum(run(_cfg(out)).values()) == 0          # everything is already there
    for f, df in before.items():
        assert tables.read(out / f"{f}.parquet").equals(df)
    partial = run(_cfg(tmp_path, "profile.max_points=4", "profile.families=[gemm]"))
    assert partial == {"gemm": 4}
    assert len(tables.read(tmp_path / "gemm.parquet")) == 4
    rest = run(_cfg(tmp_path, "profile.families=[gemm]"))
    assert rest["gemm"] == counts["gemm"] - 4
    df = tables.read(tmp_path / "gemm.parquet")
    assert len(df) == counts["gemm"] and not df.duplicated(tables.identity_columns("gemm")).any()
    assert tables.provenance(tmp_path / "gemm.parquet")["sources"]["opcast"]["previous_runs"]
    run(_cfg(tmp_path, "profile.families=[gemm]", "profile.resume=false", "profile.max_points=2"))
    assert len(tables.read(tmp_path / "gemm.parquet")) == 2     # this model's opcast rows were replaced


def test_resume_key_ignores_how_a_point_was_timed(tmp_path, profiled):
    """threads / timer / cuda_graph / l2_policy are not part of a point's identity for resume: a
    run with another thread count or timer does not re-measure (and duplicate) every point."""
    from profiler.importing import merge_write
    from profiler.run import run
    out, counts = profiled
    df = tables.read(out / "gemm.parquet")
    df = df.assign(threads=7, timer="cuda_event", cuda_graph=True, l2_policy="flush")
    merge_write(tmp_path / "gemm.parquet", "gemm", "opcast", "cpu", df, {}, "model")
    assert run(_cfg(tmp_path, "profile.families=[gemm]")) == {"gemm": 0}


def test_resume_false_never_touches_imported_rows(tmp_path, profiled):
    """Rows of other sources (Vidur, aiconfigurator) and of other models stay, byte for byte in
    content, whatever profile.resume says."""
    from profiler.importing import merge_write
    from profiler.run import run
    out, _ = profiled
    ours = tables.read(out / "elementwise.parquet")
    vidur = ours.head(5).assign(source="vidur", backend="torch", timer="record_function")
    other_model = ours.head(3).assign(model="some-other-model")
    merge_write(tmp_path / "elementwise.parquet", "elementwise", "vidur", "cpu", vidur, {"commit": "x"}, "model")
    merge_write(tmp_path / "elementwise.parquet", "elementwise", "opcast", "cpu", other_model, {}, "model")
    run(_cfg(tmp_path, "profile.families=[elementwise]", "profile.resume=false", "profile.max_points=3"))
    df = tables.read(tmp_path / "elementwise.parquet")
    assert len(df[df.source == "vidur"]) == 5 and len(df[df.model == "some-other-model"]) == 3
    assert len(df[(df.source == "opcast") & (df.model == "tiny-llama")]) == 3
    meta = tables.provenance(tmp_path / "elementwise.parquet")
    assert meta["sources"]["vidur"]["commit"] == "x" and "config" in meta["sources"]["opcast"]


def test_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from profiler import run as run_mod
    real, calls = run_mod.measure, []

    def measure(setup, family, point, *rest):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(point)
        return real(setup, family, point, *rest)
    monkeypatch.setattr(run_mod, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        run_mod.run(_cfg(tmp_path, "profile.families=[elementwise]", "profile.flush_every_points=1000"))
    assert len(tables.read(tmp_path / "elementwise.parquet")) == 5
    assert not list(tmp_path.glob(".*.tmp"))


def test_passes_pool_samples_taken_in_separate_sweeps(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from profiler import run as run_mod
    real, seen = run_mod.measure, []

    def measure(setup, family, point, repeats=None, earlier=None):
        seen.append((point["op"], point["num_tokens"], repeats, len(earlier or [])))
        return real(setup, family, point, repeats, earlier)
    monkeypatch.setattr(run_mod, "measure", measure)
    counts = run_mod.run(_cfg(tmp_path, "profile.families=[elementwise]", "profile.passes=2",
                              "profile.repeats=4", "profile.min_repeats=1", "profile.warmup=1"))
    df = tables.read(tmp_path / "elementwise.parquet")
    assert len(df) == counts["elementwise"] == len(seen) // 2     # every point visited once per pass
    assert (df.repeats == 4).all()                                # 2 samples per pass, pooled
    first, second = seen[:len(seen) // 2], seen[len(seen) // 2:]
    assert {s[3] for s in first} == {0} and {s[3] for s in second} == {2}
    assert [s[:2] for s in first] != [s[:2] for s in second]      # each pass in its own order
    assert not (tmp_path / ".passes" / "elementwise.parquet").exists()   # all passes done: nothing pending


KILL_IN_LAST_PASS = textwrap.dedent("""
    import os, signal, sys
    from profiler import run as run_mod
    from profiler.config import compose
    real, n = run_mod.measure, [0]
    def measure(setup, family, point, repeats=None, earlier=None):
        if earlier and len(earlier) >= 4:      # the third pass: kill -9, no cleanup, no flush
            os.kill(os.getpid(), signal.SIGKILL)
        return real(setup, family, point, repeats, earlier)
    run_mod.measure = measure
    run_mod.run(compose(sys.argv[1:]))
""")


def test_kill_9_before_the_last_pass_keeps_the_finished_passes(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from profiler import run as run_mod
    args = [f"out_dir={tmp_path}", *FAST, "profile.tp=[1]", "profile.families=[gemm]", "profile.passes=3",
            "profile.repeats=6", "profile.min_repeats=1", "profile.flush_every_points=1"]
    r = subprocess.run([sys.executable, "-c", KILL_IN_LAST_PASS, *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    pending = tmp_path / ".passes" / "gemm.parquet"
    assert pending.exists()                        # two passes of every point survived kill -9
    import pandas as pd
    kept = pd.read_parquet(pending)
    n_points = kept.key.nunique()
    assert len(kept) == 2 * n_points and all(len(s) == 2 for s in kept.samples)
    seen = []
    real = run_mod.measure

    def measure(setup, family, point, repeats=None, earlier=None):
        seen.append(len(earlier or []))
        return real(setup, family, point, repeats, earlier)
    monkeypatch.setattr(run_mod, "measure", measure)
    counts = run_mod.run(compose(args))
    assert counts == {"gemm": n_points} and seen == [4] * n_points    # only the last pass was left
    df = tables.read(tmp_path / "gemm.parquet")
    assert len(df) == n_points and (df.repeats == 6).all() and not pending.exists()


def test_out_of_memory_is_a_row_not_a_crash(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from profiler import run as run_mod
    real = run_mod.build_kernel

    def build(setup, family, point):
        if family == "gemm" and point["m"] == 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(setup, family, point)
    monkeypatch.setattr(run_mod, "build_kernel", build)
    run_mod.run(_cfg(tmp_path, "profile.families=[gemm]", "profile.tp=[1]"))
    df = tables.read(tmp_path / "gemm.parquet")
    oom = df[df.status == "oom"]
    assert set(oom.m) == {128} and oom.time_us_median.isna().all()
    assert (df[df.status == "ok"].time_us_median > 0).all()


# ---------------------------------------------------------------- GPU timing path, on a fake torch.cuda

def _cuda_setup(tmp_path, *extra):
    from profiler.run import resolve
    setup = resolve(_cfg(tmp_path, "profile.tp=[1]", *extra))
    setup.device, setup.graph_mode = "cuda", "vllm"
    return setup


def test_cuda_timer_flushes_from_one_buffer_and_times_graph_replays(monkeypatch):
    torch = pytest.importorskip("torch")
    from tests.fakes.fake_cuda import FakeCuda
    from profiler.timing import CudaTimer
    fake = FakeCuda(monkeypatch)
    allocs = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocs.append(a) or real_empty(*a, **k))
    timer = CudaTimer(True, device="cpu", flush_bytes=1 << 16, clock=lambda: 1755.0)
    buf = timer.flush
    t = timer.time(fake.kernel(), graph=True, warmup_ms=1, repeats=4, min_repeats=4, max_s=1, label="gemm m=8")
    t2 = timer.time(fake.kernel(), graph=False, warmup_ms=1, repeats=3, min_repeats=3, max_s=1)
    assert timer.flush is buf and allocs == [(1 << 16,)]            # allocated once, at start
    assert t.timer == "cuda_graph" and t.cuda_graph and len(t.samples_us) == 4 and t.sm_clock_mhz == 1755.0
    assert t2.timer == "cuda_event" and not t2.cuda_graph
    log = fake.log
    first = log.index("graph.capture")
    assert log.index("stream.enter") < log.index("kernel") < log.index("stream.exit") < first   # warm-up first
    reps = log.index("event.record", first)
    assert log[first:reps].count("graph.replay") == 1             # an untimed replay uploads the graph
    timed = log[reps:log.index("empty_cache", first)]
    assert timed.count("graph.replay") == 4 and "kernel" not in timed           # reps replay the graph
    assert timed.count("event.record") == 8                                      # a pair around each rep


def test_warm_up_is_by_time_not_by_count():
    import time
    from profiler.timing import warm_up
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.001)
    n = warm_up(fn, lambda: None, warmup_ms=30, min_calls=1, max_s=10)
    assert n == len(calls) and 12 <= n <= 40        # ~30 ms of ~1.1 ms calls, plus the estimate
    calls.clear()
    assert warm_up(lambda: calls.append(1), lambda: None, warmup_ms=0, min_calls=3, max_s=10) == 1 + 5 + 3


def test_graph_capture_oom_is_an_oom_row_and_other_failures_time_eagerly(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from tests.fakes.fake_cuda import FakeCuda
    from profiler import run as run_mod
    from profiler.timing import CudaTimer, GraphCaptureOOM, is_oom
    fake = FakeCuda(monkeypatch, capture_error=RuntimeError("CUDA error: operation not permitted when stream "
                                                            "is capturing"))
    setup = _cuda_setup(tmp_path, "profile.families=[elementwise]")
    setup.timer = CudaTimer(False, device="cpu")
    monkeypatch.setattr(run_mod, "build_kernel", lambda s, f, p: fake.kernel())
    point = next(p for p in setup.points["elementwise"] if p["op"] == "rmsnorm" and p["num_tokens"] == 16)
    with pytest.warns(UserWarning, match="capture failed"):
        row = run_mod.measure(setup, "elementwise", point)
    assert row["status"] == "ok" and row["timer"] == "cuda_event" and row["cuda_graph"] is False
    assert setup.timer.capture_failures and "rmsnorm" in setup.timer.capture_failures[0]
    fake.capture_error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    row = run_mod.measure(setup, "elementwise", point)
    assert row["status"] == "oom" and math.isnan(row["time_us_median"])
    assert len(setup.timer.capture_failures) == 1         # an OOM is not a capture failure
    assert is_oom(GraphCaptureOOM("x")) and not is_oom(RuntimeError("operation not permitted"))


def test_vllm_timing_mode_uses_graphs_where_vllm_does(tmp_path):
    from profiler.run import common_columns, graph_mode, op_backend, use_graph
    setup = _cuda_setup(tmp_path)
    dec = {"op": "attention", "phase": "decode", "batch_size": 8}
    assert use_graph(setup, "attention", dec) and not use_graph(setup, "attention", {**dec, "batch_size": 1024})
    assert not use_graph(setup, "attention", {**dec, "phase": "prefill"})
    assert use_graph(setup, "gemm", {"op": "qkv_proj", "m": 512}) and not use_graph(setup, "gemm", {"op": "qkv_proj",
                                                                                                      "m": 513})
    assert not use_graph(setup, "gemm", {"op": "lm_head", "m": 8})
    assert not use_graph(setup, "elementwise", {"op": "sampler", "num_tokens": 8})
    assert common_columns(setup, "gemm", {"op": "o_proj", "m": 4})["timer"] == "cuda_graph"
    setup.graph_mode = graph_mode("false")
    assert not use_graph(setup, "gemm", {"op": "qkv_proj", "m": 4}) and graph_mode(True) == "always"
    with pytest.raises(ConfigError, match="choose one of: vllm, always, never"):
        graph_mode("sometimes")
    setup.backends["elementwise"] = "compile"
    assert op_backend(setup, "elementwise", "rmsnorm") == "compile"
    assert op_backend(setup, "elementwise", "sampler") == "torch"
    assert op_backend(setup, "elementwise", "kv_cache_write") == "torch"          # no vLLM installed here
    setup.vllm_present = True
    assert op_backend(setup, "elementwise", "kv_cache_write") == "vllm"
    setup.backends["elementwise"] = "vllm"
    assert op_backend(setup, "elementwise", "add") == "torch" and op_backend(setup, "elementwise", "rope") == "vllm"


# ---------------------------------------------------------------- NVML, through the fake pynvml

def test_missing_nvml_library_is_a_warning_and_empty_metadata(fakes):
    import pynvml
    from profiler.nvml import Monitor, open_device
    pynvml.STATE["library"] = False
    with pytest.warns(UserWarning, match="NVML Shared Library Not Found"):
        assert open_device(0, "abc") is None
    with Monitor(None, 0.01) as mon:
        pass
    assert mon.summary() == {}


def test_nvml_facts_by_uuid_and_clocks_sampled_during_the_run(fakes):
    import time
    import pynvml
    from profiler.nvml import Monitor, open_device
    pynvml.STATE.update(power_supported=False)
    nv = open_device(0, "1234abcd")                       # torch's UUID lacks NVML's "GPU-" prefix
    assert {"name": "pynvml.nvmlDeviceGetHandleByUUID", "args": ("GPU-1234abcd",)} in fakes
    facts = nv.facts()
    assert facts["gpu_name"] == "NVIDIA H100 80GB HBM3" and facts["power_limit_w"] == 700.0
    assert facts["power_w"] is None and facts["sm_clock_mhz"] == 1980      # NOT_SUPPORTED is a None
    with Monitor(nv, 0.005) as mon:
        time.sleep(0.05)
        pynvml.STATE.update(temp=83, sm_clock=1410, reasons=0x40)          # HW thermal slowdown
        time.sleep(0.05)
    s = mon.summary()
    assert s["samples"] >= 4 and s["temp_c"]["max"] == 83 and s["sm_clock_mhz"]["min"] == 1410
    assert 0 < s["throttled_fraction"] < 1 and s["clocks_event_reasons_seen"] & 0x40
    assert nv.sm_clock_mhz() == 1410.0
    nv.close()
    assert pynvml.STATE["initialised"] == 0


# ---------------------------------------------------------------- CLI

def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "profiler.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, expected", [
    (["hw=nope"], "unknown hw 'nope'; choose one of: a100, "),   # the list grows with conf/hw cards
    (["model=llama-9000"], "tiny-llama"),
    (["profile.tp=[3]"], "tp=3 does not divide"),
    (["model.hf_config=/nonexistent/config.json"], "no such file"),
    (["profile.cuda_graph=maybe"], "profile.cuda_graph='maybe'"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, expected):
    r = _cli(*args, f"out_dir={tmp_path}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".opcast-write-check")]


def test_unwritable_out_dir_is_reported_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = _cli(f"out_dir={blocker / 'profiles'}", *FAST, "hydra.run.dir=" + str(tmp_path / "hydra"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "out_dir=" in lines[0] and "not writable" in lines[0], r.stderr
    assert "measured" not in r.stdout


def test_gpu_hw_without_gpu_is_a_config_error(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from profiler.run import resolve
    with pytest.raises(ConfigError, match="no GPU"):
        resolve(compose(["hw=h100", "model=llama2-70b", f"out_dir={tmp_path}"]))


def test_cli_malformed_yaml_is_one_line(tmp_path):
    (tmp_path / "hw").mkdir()
    (tmp_path / "hw" / "mine.yaml").write_text("defaults:\n  - hw_schema\nname: [unclosed\n  sku: x\n")
    r = _cli(f"--config-dir={tmp_path}", "hw=mine")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "malformed YAML" in lines[0] and "mine.yaml" in lines[0]


def test_cli_writes_tables(tmp_path):
    pytest.importorskip("torch")
    r = _cli(f"out_dir={tmp_path}", *FAST, "profile.tp=[1]", "profile.families=[elementwise]",
             "profile.max_points=4", "hydra.run.dir=" + str(tmp_path / "hydra"))
    assert r.returncode == 0, r.stderr
    df = tables.read(tmp_path / "elementwise.parquet")
    assert len(df) == 4 and "elementwise=4 rows" in r.stdout and "measurements/s" in r.stdout
    meta = json.loads(json.dumps(tables.provenance(tmp_path / "elementwise.parquet")))
    assert meta["sources"]["opcast"]["tp"] == [1]


def test_a_finished_grid_says_why_nothing_is_measured(profiled, tmp_path):
    """A fresh clone already holds the shipped CPU profile: the README command must say so, not
    silently measure 0 points."""
    out, _ = profiled
    r = _cli(f"out_dir={out}", *FAST, "hydra.run.dir=" + str(tmp_path / "hydra"))
    assert r.returncode == 0, r.stderr
    assert "already in" in r.stdout and "profile.resume=false" in r.stdout and "nothing to measure" in r.stdout


def test_dry_run_counts_points_and_estimates_time_writing_nothing(tmp_path):
    pytest.importorskip("torch")
    r = _cli(f"out_dir={tmp_path / 'p'}", *FAST, "profile.dry_run=true", "profile.calibration_points=3",
             "hydra.run.dir=" + str(tmp_path / "hydra"))
    assert r.returncode == 0, r.stderr
    for family in ("gemm", "elementwise", "attention"):
        assert f"  {family}" in r.stdout
    assert "ms/point" in r.stdout and "ETA:" in r.stdout
    assert not (tmp_path / "p").exists()
    r = _cli(f"out_dir={tmp_path / 'g'}", "hw=h100", "model=llama2-70b", "profile.dry_run=true",
             "hydra.run.dir=" + str(tmp_path / "hydra"))
    assert r.returncode == 0, r.stderr
    import torch
    if not torch.cuda.is_available():
        assert "ETA: needs the device" in r.stdout and "attention" in r.stdout


@pytest.mark.gpu
@needs_gpu
def test_small_grid_profiles_on_a_real_gpu(tmp_path):
    """Real GPU: the default (vLLM-like) timing mode measures every family of a small grid."""
    from profiler.run import run
    counts = run(compose([f"out_dir={tmp_path}", "hw=h100", "model=tiny-llama", "profile.grid=small",
                          "profile.tp=[1]", "profile.progress=false", "profile.repeats=5"]))
    for family, n in counts.items():
        df = tables.read(tmp_path / f"{family}.parquet")
        assert n > 0 and len(df) == n and (df.status == "ok").all() and (df.time_us_median > 0).all()
    g = tables.read(tmp_path / "gemm.parquet")
    assert "cuda_graph" in set(g.timer) and set(g.l2_policy) == {"flush"}
