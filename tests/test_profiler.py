"""profiler.run: the grid it builds, the tables it writes (schema, provenance, resume, OOM rows),
and the one-line errors of its CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conf import ConfigError, ModelConf, to_model
from profiler import grid, tables
from profiler.config import PRESETS, ProfileConf, compose

REPO = Path(__file__).resolve().parents[1]
FAST = ["profile.grid=small", "profile.tp=[1,2]", "profile.warmup=1", "profile.repeats=5",
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


def test_grids_cover_long_contexts_and_dedup_tp():
    gpu = PRESETS["gpu"]
    assert max(gpu["tokens"]) >= 16384 and max(gpu["kv_lens"]) >= 32768
    model = to_model(compose(["model=llama2-70b"]).model)
    ax = grid.axes(ProfileConf(grid="gpu"), "cuda")
    points = grid.build(model, [1, 2, 4, 8], ax, ["gemm", "elementwise", "attention"], 16)
    for family, rows in points.items():
        shape = [c for c, _ in tables.FAMILIES[family] if c not in ("model", "tp")] + ["op"]
        keys = [tuple(r[c] for c in shape) for r in rows]
        assert len(keys) == len(set(keys)), family
    # RMSNorm / residual add are not sharded: measured once, at tp=1
    assert {r["tp"] for r in points["elementwise"] if r["op"] in ("rmsnorm", "add")} == {1}
    assert {r["tp"] for r in points["gemm"] if r["op"] == "qkv_proj"} == {1, 2, 4, 8}
    dec = [r for r in points["attention"] if r["phase"] == "decode"]
    assert all(r["q_kv_product_sum"] == r["batch_size"] * r["max_kv_len"] for r in dec)
    pre = [r for r in points["attention"] if r["phase"] == "prefill"]
    assert all(r["max_q_len"] <= r["max_kv_len"] for r in pre)
    assert max(r["max_kv_len"] for r in pre) == 32768


def test_tp_default_is_filtered_but_explicit_tp_must_divide_heads():
    model = ModelConf(name="m12", hidden_size=768, num_layers=2, num_heads=12, num_kv_heads=12, head_dim=64,
                      ffn_size=3072, vocab_size=1000)
    assert grid.tp_degrees(model, [1, 2, 4, 8], [1, 2, 4, 8]) == [1, 2, 4]
    with pytest.raises(ConfigError, match="does not divide"):
        grid.tp_degrees(model, [8], [1, 2, 4, 8])


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
        meta = tables.provenance(path)
        for k in ("device_name", "cpu_model", "threads", "git_commit", "date_utc", "versions", "config"):
            assert k in meta, k
        assert meta["family"] == family and meta["versions"]["torch"]
    ops = set(tables.read(out / "elementwise.parquet").op)
    assert ops == {"rmsnorm", "silu_mul", "add", "rope", "embedding"}


def test_times_grow_with_work(profiled):
    out, _ = profiled
    g = tables.read(out / "gemm.parquet")
    for op in ("qkv_proj", "gate_up_proj", "down_proj"):
        rows = g[(g.op == op) & (g.tp == 1)].set_index("m").time_us_median
        assert rows[128] > 3 * rows[1], op
    a = tables.read(out / "attention.parquet")
    dec = a[(a.phase == "decode") & (a.tp == 1)].set_index(["batch_size", "max_kv_len"]).time_us_median
    assert dec[(8, 256)] > dec[(1, 256)] and dec[(8, 256)] > dec[(8, 16)]
    pre = a[(a.phase == "prefill") & (a.tp == 1) & (a.max_q_len == 128)].set_index("max_kv_len").time_us_median
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
    assert tables.provenance(tmp_path / "gemm.parquet")["previous_runs"]
    run(_cfg(tmp_path, "profile.families=[gemm]", "profile.resume=false", "profile.max_points=2"))
    assert len(tables.read(tmp_path / "gemm.parquet")) == 2     # a fresh table replaced the old one


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


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "profiler.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["hw=nope"], "unknown hw 'nope'; choose one of: a100, "),   # the list grows with conf/hw cards
    (["model=llama-9000"], "tiny-llama"),
    (["profile.tp=[3]"], "tp=3 does not divide"),
    (["model.hf_config=/nonexistent/config.json"], "no such file"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, expected):
    r = _cli(*args, f"out_dir={tmp_path}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr
    assert not list(tmp_path.iterdir())


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
    assert len(df) == 4 and "elementwise=4 rows" in r.stdout
    assert json.loads(json.dumps(tables.provenance(tmp_path / "elementwise.parquet")))["tp"] == [1]
