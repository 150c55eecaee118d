"""Collectives on an initialised process group (NCCL on GPU, gloo on CPU), each a zero-argument
launcher over a subgroup: all_reduce (tensor parallel), all_gather (the logits gather at TP > 1),
send/recv ping-pong (pipeline stages), and vLLM's custom all-reduce where vLLM is installed.

Signature of vLLM's custom all-reduce as read (vllm/distributed/device_communicators/
custom_all_reduce.py @00d618aa): ``CustomAllreduce(group, device, max_size=8192 * 1024)`` on a
non-NCCL (gloo) group of one node; ``finalize_p2p()`` completes it collectively in newer versions;
``custom_all_reduce(input)`` returns None for inputs it does not take (size >= max_size, not a
multiple of 16 bytes), where vLLM falls back to NCCL; ``capture()`` wraps CUDA-graph capture.
"""
from __future__ import annotations

CUSTOM_AR_MODULE = "vllm.distributed.device_communicators.custom_all_reduce"
CUSTOM_AR_WORLD_SIZES = (2, 4, 6, 8)     # CustomAllreduce._SUPPORTED_WORLD_SIZES


def itemsize(dtype) -> int:
    import torch
    return torch.empty((), dtype=dtype).element_size()


def buffer(size_bytes: int, dtype, device):
    import torch
    return torch.ones(max(1, size_bytes // itemsize(dtype)), dtype=dtype, device=device)


def build_all_reduce(size_bytes: int, dtype, device, group=None):
    import torch.distributed as dist
    x = buffer(size_bytes, dtype, device)
    return lambda: dist.all_reduce(x, group=group)


def all_gather_bytes(size_bytes: int, group_size: int, dtype) -> int:
    """Output bytes of an all_gather of ``size_bytes`` (nccl-tests' size convention: the gathered
    tensor), rounded down so every rank contributes whole elements."""
    per_rank = max(1, size_bytes // group_size // itemsize(dtype))
    return per_rank * group_size * itemsize(dtype)


def build_all_gather(size_bytes: int, dtype, device, group=None, group_size: int = 2):
    import torch
    import torch.distributed as dist
    total = all_gather_bytes(size_bytes, group_size, dtype) // itemsize(dtype)
    out = torch.empty(total, dtype=dtype, device=device)
    inp = torch.ones(total // group_size, dtype=dtype, device=device)
    # all_gather_single is the current name (torch 2.13) of all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return lambda: gather(out, inp, group=group)


def build_send_recv(size_bytes: int, dtype, device, rank: int, peer: int, group=None):
    """One ping-pong between global ranks ``rank`` and ``peer``: the lower sends first.
    Time / 2 = one-way."""
    import torch.distributed as dist
    x = buffer(size_bytes, dtype, device)
    if rank < peer:
        def step():
            dist.send(x, peer, group=group)
            dist.recv(x, peer, group=group)
    else:
        def step():
            dist.recv(x, peer, group=group)
            dist.send(x, peer, group=group)
    return step


def custom_all_reduce(cpu_group, device):
    """vLLM's CustomAllreduce on ``cpu_group`` (a gloo group of the same ranks), or None when vLLM
    disables it here (no NVLink/P2P, unsupported size, several nodes)."""
    import importlib
    import warnings
    try:
        ca = importlib.import_module(CUSTOM_AR_MODULE).CustomAllreduce(group=cpu_group, device=device)
        if hasattr(ca, "finalize_p2p"):
            ca.finalize_p2p()
    except Exception as exc:     # a vLLM version whose constructor wants more of vLLM's state
        warnings.warn(f"vLLM's custom all-reduce could not be set up here ({exc}); its rows are skipped",
                      stacklevel=2)
        return None
    return None if ca.disabled else ca


def build_custom_all_reduce(ca, size_bytes: int, dtype, device):
    """The launcher, or None when vLLM's kernel does not take this size (vLLM uses NCCL there)."""
    x = buffer(size_bytes, dtype, device)
    if ca.custom_all_reduce(x) is None:
        return None
    return lambda: ca.custom_all_reduce(x)
