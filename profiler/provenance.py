"""Where and how a profile was measured: stored as JSON in every table's parquet metadata."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"git_commit": git("rev-parse", "HEAD") or "unknown", "git_dirty": bool(git("status", "--porcelain"))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_metadata(index: int = 0, nvml=None) -> dict:
    """torch's and NVML's facts of the GPU torch calls ``cuda:index``; the NVML part is empty
    when NVML is missing (see profiler.nvml)."""
    import torch
    out = {"device_name": torch.cuda.get_device_name(index), "cuda": torch.version.cuda,
           "compute_capability": "%d.%d" % torch.cuda.get_device_capability(index)}
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        pass
    if nvml is None:
        out["nvml"] = "unavailable"
        return out
    return {**out, **nvml.facts()}


def device_uuid(index: int = 0) -> str:
    import torch
    return str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")


def collect(device: str, threads: int, config: dict | None = None, nvml=None) -> dict:
    from kernels.backends import versions
    meta = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "versions": versions(),
            "device": device, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
            **git_commit()}
    if device == "cuda":
        meta.update(gpu_metadata(nvml=nvml))
    else:
        meta["device_name"] = meta["cpu_model"]
    if config is not None:
        meta["config"] = config
    return meta
