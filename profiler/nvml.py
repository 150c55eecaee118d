"""GPU facts and clocks from NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

Never fatal: without nvidia-ml-py, or with it but no libnvidia-ml (containers, MIG slices, CPU
hosts), ``open_device`` warns once and returns None, and the run goes on with empty GPU
metadata. Every single query may also fail (NOT_SUPPORTED on some SKUs and VMs): it is then None.

``Monitor`` samples the SM clock, temperature, power and clock-event reasons on a background
thread while a run lasts (as aiconfigurator's PowerMonitor does every 100 ms); the summary goes
into the table metadata, so throttled stretches are visible after the fact.
"""
from __future__ import annotations

import math
import threading
import time
import warnings

# nvmlClocksEventReasons bits that mean the clock was pulled down (not idle / app clocks):
# SW power cap 0x4, HW slowdown 0x8, SW thermal 0x20, HW thermal 0x40, HW power brake 0x80.
THROTTLE_BITS = 0x4 | 0x8 | 0x20 | 0x40 | 0x80


def _s(x):
    return x.decode() if isinstance(x, bytes) else x


class Nvml:
    """One GPU's NVML handle."""

    def __init__(self, nv, handle):
        self.nv, self.handle = nv, handle

    def _try(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except Exception:       # NVMLError (NOT_SUPPORTED, GPU_IS_LOST, ...): no value
            return None

    def facts(self) -> dict:
        nv = self.nv
        limit_mw = self._try(nv.nvmlDeviceGetEnforcedPowerLimit)

        def system(fn):
            try:
                return _s(fn())
            except Exception:
                return None
        return {"gpu_name": _s(self._try(nv.nvmlDeviceGetName)), "gpu_uuid": _s(self._try(nv.nvmlDeviceGetUUID)),
                "driver": system(nv.nvmlSystemGetDriverVersion),
                "cuda_driver": system(nv.nvmlSystemGetCudaDriverVersion),
                "sm_clock_max_mhz": self._try(nv.nvmlDeviceGetMaxClockInfo, nv.NVML_CLOCK_SM),
                "power_limit_w": None if limit_mw is None else limit_mw / 1e3, **self.read()}

    def read(self) -> dict:
        """The clocks and thermals now."""
        nv = self.nv
        reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        power_mw = self._try(nv.nvmlDeviceGetPowerUsage)
        return {"sm_clock_mhz": self._try(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM),
                "mem_clock_mhz": self._try(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_MEM),
                "temp_c": self._try(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU),
                "power_w": None if power_mw is None else power_mw / 1e3,
                "clocks_event_reasons": self._try(reasons) if reasons else None}

    def sm_clock_mhz(self) -> float:
        v = self._try(self.nv.nvmlDeviceGetClockInfo, self.nv.NVML_CLOCK_SM)
        return math.nan if v is None else float(v)

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:
            pass


def open_device(index: int = 0, uuid: str = "") -> Nvml | None:
    """NVML for the GPU torch calls ``cuda:index``, matched by ``uuid`` when given (NVML counts
    devices in PCI order and ignores CUDA_VISIBLE_DEVICES); None, with a warning, without NVML."""
    try:
        import pynvml as nv
    except ImportError:
        warnings.warn("nvidia-ml-py is not installed (pip install nvidia-ml-py): no GPU clocks or "
                      "temperatures in the profile metadata", stacklevel=2)
        return None
    try:
        nv.nvmlInit()
    except Exception as exc:     # NVMLError_LibraryNotFound / _DriverNotLoaded, OSError
        warnings.warn(f"NVML is not usable here ({exc}): no GPU clocks or temperatures in the profile "
                      "metadata", stacklevel=2)
        return None
    handle = None
    if uuid:
        try:
            handle = nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception:
            handle = None
    if handle is None:
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            warnings.warn(f"NVML has no device {index} ({exc}): no GPU clocks in the profile metadata",
                          stacklevel=2)
            Nvml(nv, None).close()
            return None
    return Nvml(nv, handle)


class Monitor:
    """Samples ``nvml.read()`` every ``interval_s`` seconds on a daemon thread."""

    def __init__(self, nvml: Nvml | None, interval_s: float = 1.0):
        self.nvml, self.interval_s = nvml, max(0.01, float(interval_s))
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Monitor":
        if self.nvml is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            self.samples.append({"t_s": round(time.monotonic() - t0, 3), **self.nvml.read()})
            self._stop.wait(self.interval_s)

    def summary(self) -> dict:
        """Clock / temperature / power range over the run and the share of throttled samples."""
        if not self.samples:
            return {}

        def rng(key):
            v = [s[key] for s in self.samples if s.get(key) is not None]
            return {"min": min(v), "mean": round(sum(v) / len(v), 1), "max": max(v)} if v else None
        reasons = [s["clocks_event_reasons"] for s in self.samples if s.get("clocks_event_reasons") is not None]
        seen = 0
        for r in reasons:
            seen |= int(r)
        return {"samples": len(self.samples), "interval_s": self.interval_s, "sm_clock_mhz": rng("sm_clock_mhz"),
                "temp_c": rng("temp_c"), "power_w": rng("power_w"), "clocks_event_reasons_seen": seen,
                "throttled_fraction": round(sum(1 for r in reasons if int(r) & THROTTLE_BITS) / len(reasons), 4)
                if reasons else None}
