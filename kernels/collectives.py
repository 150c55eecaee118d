"""torch.distributed collectives on an initialised process group (NCCL on GPU, gloo on CPU)."""
from __future__ import annotations


def buffer(size_bytes: int, dtype, device):
    import torch
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.ones(max(1, size_bytes // itemsize), dtype=dtype, device=device)


def build_all_reduce(size_bytes: int, dtype, device):
    import torch.distributed as dist
    x = buffer(size_bytes, dtype, device)
    return lambda: dist.all_reduce(x)


def build_send_recv(size_bytes: int, dtype, device, rank: int, peer: int):
    """One ping-pong between ``rank`` and ``peer``: the lower rank sends first. Time / 2 = one-way."""
    import torch.distributed as dist
    x = buffer(size_bytes, dtype, device)
    if rank < peer:
        def step():
            dist.send(x, peer)
            dist.recv(x, peer)
    else:
        def step():
            dist.recv(x, peer)
            dist.send(x, peer)
    return step
