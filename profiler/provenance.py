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


def gpu_metadata(index: int = 0) -> dict:
    """nvidia-ml-py facts of the GPU torch calls ``cuda:index`` (matched by UUID, not NVML order)."""
    import torch
    out = {"device_name": torch.cuda.get_device_name(index), "cuda": torch.version.cuda,
           "compute_capability": "%d.%d" % torch.cuda.get_device_capability(index)}
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        pass
    try:
        import pynvml as nv
    except ImportError:
        out["nvml"] = "nvidia-ml-py not installed"
        return out

    def s(x):
        return x.decode() if isinstance(x, bytes) else x

    def tryit(f, *a):
        try:
            return f(*a)
        except nv.NVMLError:
            return None
    nv.nvmlInit()
    try:
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
        handle = None
        if uuid:
            handle = tryit(nv.nvmlDeviceGetHandleByUUID, uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        handle = handle or nv.nvmlDeviceGetHandleByIndex(index)
        reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nv.nvmlDeviceGetCurrentClocksThrottleReasons
        power_limit_mw = tryit(nv.nvmlDeviceGetEnforcedPowerLimit, handle)
        out.update({
            "gpu_name": s(nv.nvmlDeviceGetName(handle)), "gpu_uuid": s(nv.nvmlDeviceGetUUID(handle)),
            "driver": s(nv.nvmlSystemGetDriverVersion()), "cuda_driver": nv.nvmlSystemGetCudaDriverVersion(),
            "sm_clock_mhz": tryit(nv.nvmlDeviceGetClockInfo, handle, nv.NVML_CLOCK_SM),
            "sm_clock_max_mhz": tryit(nv.nvmlDeviceGetMaxClockInfo, handle, nv.NVML_CLOCK_SM),
            "mem_clock_mhz": tryit(nv.nvmlDeviceGetClockInfo, handle, nv.NVML_CLOCK_MEM),
            "power_limit_w": None if power_limit_mw is None else power_limit_mw / 1e3,
            "temp_c": tryit(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
            "clocks_event_reasons": tryit(reasons, handle),
        })
    finally:
        nv.nvmlShutdown()
    return out


def collect(device: str, threads: int, config: dict | None = None) -> dict:
    from kernels.backends import versions
    meta = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "versions": versions(),
            "device": device, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
            **git_commit()}
    if device == "cuda":
        meta.update(gpu_metadata())
    else:
        meta["device_name"] = meta["cpu_model"]
    if config is not None:
        meta["config"] = config
    return meta
