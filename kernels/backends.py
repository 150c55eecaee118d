"""Which kernel libraries this machine has, detected at run time (never at import time)."""
from __future__ import annotations

import functools
import importlib
import importlib.util

from conf import ConfigError

# backend name -> (module to import, what to install)
MODULES = {
    "torch": ("torch", "pip install torch"),
    "compile": ("torch", "pip install torch (torch.compile needs a C/C++ compiler on CPU, triton on GPU)"),
    "sdpa": ("torch", "pip install torch"),
    "flash_attn": ("flash_attn", "pip install flash-attn (CUDA; needs a wheel matching your torch)"),
    "vllm": ("vllm", "pip install vllm (CUDA; brings its own torch and flash-attention)"),
}
CUDA_ONLY = {"flash_attn", "vllm"}


@functools.cache
def probe(module: str) -> bool:
    """True when ``module`` imports; a broken install (ABI mismatch, no libcudart) counts as absent."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    try:
        importlib.import_module(module)
        return True
    except (ImportError, OSError, RuntimeError):
        return False


@functools.cache
def cuda_ok() -> bool:
    return probe("torch") and __import__("torch").cuda.is_available()


def available(backend: str, device: str) -> bool:
    if backend in CUDA_ONLY and device != "cuda":
        return False
    return probe(MODULES[backend][0])


def require(backend: str, device: str) -> None:
    """Raise one clear line when ``backend`` cannot run on ``device`` here."""
    if backend not in MODULES:
        raise ConfigError(f"unknown backend {backend!r}; known: {', '.join(MODULES)}")
    if backend in CUDA_ONLY and device != "cuda":
        raise ConfigError(f"backend {backend} runs only on CUDA GPUs (device={device}); use sdpa/torch on CPU")
    if not probe(MODULES[backend][0]):
        raise ConfigError(f"backend {backend} is not installed: {MODULES[backend][1]}")


def resolve(requested: str, preferred: tuple[str, ...], device: str) -> str:
    """``auto`` picks the first available of ``preferred``; a named backend must be available."""
    if requested != "auto":
        require(requested, device)
        return requested
    for name in preferred:
        if available(name, device):
            return name
    raise ConfigError(f"none of the backends {', '.join(preferred)} is available; install torch")


def versions() -> dict:
    """Versions of the kernel libraries present (for provenance)."""
    out = {}
    for mod in ("torch", "flash_attn", "vllm", "triton"):
        if importlib.util.find_spec(mod) is not None:
            try:
                from importlib.metadata import version
                out[mod] = version({"flash_attn": "flash-attn"}.get(mod, mod))
            except Exception:
                out[mod] = "unknown"
    return out


def torch_dtype(name: str):
    import torch
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def device_of(hw_device: str):
    import torch
    return torch.device("cuda" if hw_device == "cuda" else "cpu")


def randn(shape, dtype, device, scale: float = 1.0):
    """Normal values made directly in ``dtype`` (no fp32 copy: KV caches can fill a GPU)."""
    import torch
    x = torch.randn(shape, dtype=dtype, device=device)
    return x.mul_(scale) if scale != 1.0 else x


# torch.compile backend of the "compile" kernels: Inductor, as vLLM's default compilation
# (CompilationMode.VLLM_COMPILE with backend "inductor"). Tests swap in "eager" to stay fast.
COMPILE_BACKEND = "inductor"
_COMPILED: dict = {}


def compiled(fn):
    """``fn`` under torch.compile with dynamic shapes, once per function and backend: vLLM
    compiles one graph for all token counts (compile_sizes unset), so every shape of an op
    reuses one compilation here too."""
    import torch
    key = (fn, COMPILE_BACKEND)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True, backend=COMPILE_BACKEND)
    return _COMPILED[key]


def torch_version() -> tuple[int, int]:
    import torch
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def has_enable_gqa() -> bool:
    """scaled_dot_product_attention's ``enable_gqa`` arrived in torch 2.5."""
    return torch_version() >= (2, 5)
