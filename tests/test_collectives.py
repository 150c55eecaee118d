"""Two gloo ranks on CPU: all_reduce and send_recv rows, bigger messages take longer, and resume."""
import subprocess
import sys
from pathlib import Path

import pytest

from profiler import tables
from profiler.config import compose

REPO = Path(__file__).resolve().parents[1]
SIZES = [1024, 32 << 20]   # 32 MiB: well above the scheduling noise of a loaded 2-core box


def test_two_process_gloo_all_reduce_and_send_recv(tmp_path):
    pytest.importorskip("torch")
    from profiler.collectives import run
    cfg = compose([f"out_dir={tmp_path}", "hw=cpu", "profile.world_size=2", f"profile.collective_sizes_bytes={SIZES}",
                   "profile.warmup=2", "profile.repeats=9", "profile.min_repeats=5", "profile.progress=false"])
    run(cfg)
    path = tmp_path / "collective.parquet"
    df = tables.read(path, "collective")
    assert list(df.columns) == tables.schema("collective").names
    assert sorted(zip(df.op, df.size_bytes)) == sorted((op, s) for op in ("all_reduce", "send_recv") for s in SIZES)
    assert (df.status == "ok").all() and set(df.backend) == {"gloo"} and set(df.world_size) == {2}
    assert set(df.network) == {"cpu_gloo"} and (df.repeats >= 5).all() and (df.time_us_median > 0).all()
    med = df.set_index(["op", "size_bytes"]).time_us_median
    for op in ("all_reduce", "send_recv"):
        assert med[(op, SIZES[1])] > med[(op, SIZES[0])], op
    meta = tables.provenance(path)
    assert meta["collective_backend"] == "gloo" and meta["world_size"] == 2 and meta["git_commit"]
    run(cfg)                                     # resume: nothing new to measure
    assert tables.read(path, "collective").equals(df)


def test_collectives_cli_bad_world_size_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "profiler.collectives", "profile.world_size=1", f"out_dir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "at least 2 ranks" in lines[0], r.stderr
