"""Fake nvidia-ml-py (``import pynvml``): the calls opcast makes, with the real names and
arguments (nvidia-ml-py's pynvml.py: handle first, then the clock / sensor type; power in mW;
clock-event reasons a bitmask). ``STATE`` sets what the "GPU" reports; ``STATE["library"] =
False`` makes nvmlInit raise NVMLError_LibraryNotFound as on a host without libnvidia-ml."""
from __future__ import annotations

from tests.fakes import CALLS

NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2
NVML_TEMPERATURE_GPU = 0
NVML_ERROR_LIBRARY_NOT_FOUND, NVML_ERROR_NOT_SUPPORTED = 12, 3

STATE = {"library": True, "uuid": "GPU-1234abcd", "sm_clock": 1980, "mem_clock": 2619, "temp": 41,
         "power_mw": 310_500, "limit_mw": 700_000, "reasons": 0, "power_supported": True, "initialised": 0}


class NVMLError(Exception):
    def __init__(self, value):
        self.value = value
        super().__init__({12: "NVML Shared Library Not Found", 3: "Not Supported"}.get(value, f"NVML error {value}"))


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801  (the real name)
    def __init__(self):
        super().__init__(NVML_ERROR_LIBRARY_NOT_FOUND)


def _log(name, *args):
    CALLS.append({"name": f"pynvml.{name}", "args": args})


def _need():
    if STATE["initialised"] <= 0:
        raise NVMLError(1)      # NVML_ERROR_UNINITIALIZED


def nvmlInit():
    _log("nvmlInit")
    if not STATE["library"]:
        raise NVMLError_LibraryNotFound()
    STATE["initialised"] += 1


def nvmlShutdown():
    _log("nvmlShutdown")
    _need()
    STATE["initialised"] -= 1


def nvmlDeviceGetHandleByUUID(uuid):
    _log("nvmlDeviceGetHandleByUUID", uuid)
    _need()
    if uuid != STATE["uuid"]:
        raise NVMLError(13)     # NVML_ERROR_NOT_FOUND
    return ("handle", uuid)


def nvmlDeviceGetHandleByIndex(index):
    _log("nvmlDeviceGetHandleByIndex", index)
    _need()
    return ("handle", index)


def nvmlDeviceGetName(handle):
    _need()
    return b"NVIDIA H100 80GB HBM3"      # older versions return bytes


def nvmlDeviceGetUUID(handle):
    _need()
    return STATE["uuid"]


def nvmlSystemGetDriverVersion():
    _need()
    return "570.86.15"


def nvmlSystemGetCudaDriverVersion():
    _need()
    return 12080


def nvmlDeviceGetClockInfo(handle, type):
    _log("nvmlDeviceGetClockInfo", type)
    _need()
    return STATE["sm_clock"] if type == NVML_CLOCK_SM else STATE["mem_clock"]


def nvmlDeviceGetMaxClockInfo(handle, type):
    _need()
    return 1980 if type == NVML_CLOCK_SM else 2619


def nvmlDeviceGetTemperature(handle, sensor):
    _need()
    return STATE["temp"]


def nvmlDeviceGetPowerUsage(handle):
    _need()
    if not STATE["power_supported"]:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return STATE["power_mw"]


def nvmlDeviceGetEnforcedPowerLimit(handle):
    _need()
    return STATE["limit_mw"]


def nvmlDeviceGetCurrentClocksEventReasons(handle):
    _need()
    return STATE["reasons"]
