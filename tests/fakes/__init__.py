"""Stand-ins for the GPU-only libraries (flash-attn, vLLM's kernels and custom all-reduce, NVML)
so the GPU code paths run, and are checked, on a CPU.

Each fake has the real function's signature (parameter names, order and defaults, cited in its
module docstring), checks what the real kernel checks or silently requires (dtypes, shapes,
strides, int32 block tables and sequence lengths, int64 slot mappings, page sizes), and records
every call in its module's ``CALLS`` list (name, shapes, dtypes, strides, arguments). Outputs are
computed where that is cheap (the elementwise ops), so tests can also check results.

The ``fakes`` fixture puts this folder (and ``nvml/``, kept apart because torch.cuda itself
imports pynvml when present) first on sys.path for one test (and forgets the fake
modules afterwards); ``tests/fakes/fake_cuda.py`` stands in for torch.cuda's timing API.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MODULES = ("flash_attn", "vllm", "pynvml")
CALLS: list[dict] = []       # every fake's calls, in order (tests clear it)


def _drop_imported() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in MODULES:
            del sys.modules[name]
    from kernels import backends
    backends.probe.cache_clear()


@pytest.fixture
def fakes(monkeypatch):
    """The fakes importable as the real modules for one test; yields the call log."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.syspath_prepend(str(HERE / "nvml"))   # apart: torch.cuda imports pynvml when it can
    _drop_imported()
    CALLS.clear()
    yield CALLS
    _drop_imported()


def describe(t) -> dict:
    """What a call record keeps of a tensor argument."""
    return {"shape": tuple(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "stride": tuple(t.stride()),
            "device": str(t.device)}


def record(calls: list, name: str, **args) -> None:
    import torch
    calls.append({"name": name, **{k: describe(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}})


def require(cond: bool, msg: str) -> None:
    """The check a real kernel makes (a TORCH_CHECK / assert), raised as its RuntimeError."""
    if not cond:
        raise RuntimeError(msg)


# Real-GPU tests: @pytest.mark.gpu @needs_gpu; skipped without CUDA, run when a GPU is lent
# (python -m pytest -m gpu).
def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


needs_gpu = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")    # use with @pytest.mark.gpu
