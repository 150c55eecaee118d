"""Residual add and token embedding lookup: torch, or torch under torch.compile (``compile``):
vLLM runs both inside its compiled model (no custom op exists for them)."""
from __future__ import annotations

from kernels.backends import compiled, randn


def add_native(x, residual):
    return x + residual


def embedding_native(ids, weight):
    import torch.nn.functional as F
    return F.embedding(ids, weight)


def build_add(num_tokens: int, width: int, dtype, device, backend: str = "torch"):
    import torch
    x, residual = randn((num_tokens, width), dtype, device), randn((num_tokens, width), dtype, device)
    if backend == "compile":
        fn = compiled(add_native)
        return lambda: fn(x, residual)
    out = torch.empty_like(x)
    return lambda: torch.add(x, residual, out=out)


def build_embedding(num_tokens: int, width: int, vocab_shard: int, dtype, device, seed: int = 0,
                    backend: str = "torch"):
    """Rows of a vocabulary shard (at TP > 1 the engine then all-reduces [tokens, width]: that is
    the collective profile's all_reduce of tokens x width x dtype bytes)."""
    import torch
    weight = randn((vocab_shard, width), dtype, device)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_shard, (num_tokens,), generator=gen).to(device)
    fn = compiled(embedding_native) if backend == "compile" else embedding_native
    return lambda: fn(ids, weight)
