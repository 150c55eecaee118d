"""Collectives on CPU (gloo): one launch of 4 ranks measures every group size (2, 4) through
subgroups, all_reduce / all_gather / send_recv within and across "nodes", vLLM's custom
all-reduce (through the fake in tests/fakes), back-to-back timing after a barrier, resume and
merge by source."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from profiler import tables
from profiler.config import compose
from tests.fakes import HERE as FAKES, needs_gpu

REPO = Path(__file__).resolve().parents[1]
SIZES = [1000, 4 << 20]   # 1000 B: not a multiple of 16, so vLLM's custom all-reduce declines it


def _cfg(tmp_path, *extra):
    return compose([f"out_dir={tmp_path}", "hw=cpu", "profile.world_size=4", f"profile.collective_sizes_bytes={SIZES}",
                    "profile.collective_iters=3", "profile.warmup=2", "profile.repeats=5", "profile.min_repeats=3",
                    "profile.progress=false", *extra])


def test_one_launch_measures_every_group_size_and_pair(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from profiler.collectives import run
    from profiler.importing import merge_write
    monkeypatch.syspath_prepend(str(FAKES))            # spawned ranks import the fake vLLM too
    path = tmp_path / "collective.parquet"
    shipped = tables.read(REPO / "data" / "profiles" / "a100" / "collective.parquet")
    vidur = shipped[shipped.source == "vidur"].head(4).assign(hw="cpu", network="cpu_gloo")
    merge_write(path, "collective", "vidur", "cpu", vidur, {"commit": "7d47513"}, "network")
    cfg = _cfg(tmp_path, "profile.collective_custom_ar=true")
    run(cfg)
    df = tables.read(path, "collective")
    assert list(df.columns) == tables.schema("collective").names
    assert len(df[df.source == "vidur"]) == 4                          # imported rows untouched
    ours = df[df.source == "opcast"]
    got = {(r.op, r.backend, r.world_size, r.devices_per_node, r.status) for r in ours.itertuples()}
    for n, per_node in ((2, 2), (4, 2)):                               # hw=cpu: 2 "devices" per node
        assert ("all_reduce", "gloo", n, per_node, "ok") in got and ("all_gather", "gloo", n, per_node, "ok") in got
    assert ("send_recv", "gloo", 2, 2, "ok") in got                    # a pair on one node
    assert ("send_recv", "gloo", 2, 1, "ok") in got                    # a pair across nodes (ranks 0 and 2)
    custom = ours[ours.op == "custom_all_reduce"]
    assert set(custom.backend) == {"vllm"}
    assert set(custom.world_size) == {2}                               # one node only, as vLLM
    assert dict(zip(custom.size_bytes, custom.status)) == {1000: "skipped", 4 << 20: "ok"}
    ok = ours[ours.status == "ok"]
    assert (ok.repeats >= 3).all() and (ok.time_us_median > 0).all() and set(ok.network) == {"cpu_gloo"}
    gathers = ours[ours.op == "all_gather"]
    assert all(s % (2 * w) == 0 for s, w in zip(gathers.size_bytes, gathers.world_size))
    # the fastest sample: 4 ranks share 2 loaded cores, so a median can catch a descheduled rank
    best = ok[ok.backend == "gloo"].set_index(["op", "world_size", "devices_per_node", "size_bytes"]).time_us_min
    for key in (("all_reduce", 4, 2), ("all_gather", 4, 2), ("send_recv", 2, 2)):
        assert best[key + (4 << 20,)] > best[key + (1000,)], key
    meta = tables.provenance(path)["sources"]["opcast"]
    assert meta["collective_backend"] == "gloo" and meta["launch_world_size"] == 4 and meta["groups"] == [2, 4]
    run(cfg)                                     # resume: nothing new to measure
    assert tables.read(path, "collective").equals(df)


def test_samples_are_back_to_back_ops_after_a_barrier(monkeypatch):
    """A sample times ``iters`` ops between two marks recorded right after a barrier and divides by
    ``iters``: a 2 ms op reads 2 ms, not 2 ms x iters, and one barrier precedes each sample."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    from profiler.collectives import Clock, _free_port, back_to_back
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        log = []
        real_barrier = dist.barrier
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: log.append("barrier") or real_barrier(*a, **k))

        def op():
            log.append("op")
            time.sleep(0.002)
        job = {"iters": 4, "warmup": 1, "repeats": 3, "min_repeats": 3, "max_s": 10, "backend": "gloo"}
        dev = torch.device("cpu")
        samples = back_to_back(job, op, None, Clock(dev, torch), dist, torch, dev, False, 1.0)
        assert len(samples) == 3 and all(1800 < s < 6000 for s in samples)
        timed = log[log.index("barrier"):]
        assert timed == (["barrier"] + ["op"] * 4) * 3 and log[:4] == ["op"] * 4     # warm-up: one round
        half = back_to_back({**job, "repeats": 1, "min_repeats": 1}, op, None, Clock(dev, torch), dist, torch, dev,
                            False, 2.0)
        assert 900 < half[0] < 3000                                     # a ping-pong counts one way
    finally:
        dist.destroy_process_group()


def test_collectives_cli_bad_world_size_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "profiler.collectives", "profile.world_size=1", f"out_dir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "at least 2 ranks" in lines[0], r.stderr


@pytest.mark.gpu
@needs_gpu
def test_nccl_all_reduce_on_the_gpus_here(tmp_path):
    """Real GPUs (two or more): NCCL rows in graph and eager mode."""
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from profiler.collectives import run
    run(compose([f"out_dir={tmp_path}", "hw=h100", "profile.world_size=2", "profile.collective_sizes_bytes=[65536]",
                 "profile.progress=false"]))
    df = tables.read(tmp_path / "collective.parquet")
    assert (df[df.status == "ok"].time_us_median > 0).all() and "nccl" in set(df.backend)
