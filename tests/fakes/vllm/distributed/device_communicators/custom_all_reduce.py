"""Fake ``CustomAllreduce`` with the constructor and methods of vLLM's
vllm/distributed/device_communicators/custom_all_reduce.py (vllm-project/vllm @00d618aa, read for
this fake): built on a non-NCCL group of one node, world sizes 2/4/6/8, ``finalize_p2p()``,
``custom_all_reduce(input)`` -> None for inputs it does not take (not a multiple of 16 bytes, not
below max_size), ``capture()``. It all-reduces over the (gloo) group it was given, so a CPU run
exercises the same collective pattern."""
from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist

from tests.fakes import CALLS, record, require


class CustomAllreduce:
    _SUPPORTED_WORLD_SIZES = [2, 4, 6, 8]

    def __init__(self, group, device, max_size=8192 * 1024, symm_mem_enabled=False):
        assert dist.get_backend(group) != dist.Backend.NCCL, "CustomAllreduce should be attached to a non-NCCL group."
        self.group, self.device, self.max_size = group, device, max_size
        self.world_size = dist.get_world_size(group=group)
        require(self.world_size in self._SUPPORTED_WORLD_SIZES, f"unsupported world size {self.world_size}")
        self.disabled = False
        self._p2p_pending = True
        self._IS_CAPTURING = False

    def finalize_p2p(self):
        self._p2p_pending = False

    @contextmanager
    def capture(self):
        self._IS_CAPTURING = True
        try:
            yield
        finally:
            self._IS_CAPTURING = False

    def should_custom_ar(self, inp):
        size = inp.numel() * inp.element_size()
        return not self.disabled and size % 16 == 0 and inp.is_contiguous() and size < self.max_size

    def custom_all_reduce(self, input):
        require(not self._p2p_pending, "finalize_p2p() must run before the first all-reduce")
        if not self.should_custom_ar(input):
            return None
        record(CALLS, "custom_all_reduce", input=input)
        out = input.clone()
        dist.all_reduce(out, group=self.group)
        return out
