"""Residual add and token embedding lookup (torch on every backend: engines run these eagerly)."""
from __future__ import annotations

from kernels.backends import randn


def build_add(num_tokens: int, width: int, dtype, device):
    import torch
    x, residual = randn((num_tokens, width), dtype, device), randn((num_tokens, width), dtype, device)
    out = torch.empty_like(x)
    return lambda: torch.add(x, residual, out=out)


def build_embedding(num_tokens: int, width: int, vocab_shard: int, dtype, device, seed: int = 0):
    import torch
    import torch.nn.functional as F
    weight = randn((vocab_shard, width), dtype, device)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_shard, (num_tokens,), generator=gen).to(device)
    return lambda: F.embedding(ids, weight)
