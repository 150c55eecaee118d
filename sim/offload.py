"""KV offload to CPU memory (``scheduler.offload``): vLLM's CPU offloading connector / LMCache.

A second tier below the GPU prefix cache (sim/prefix_cache.py), ``cpu_gib`` per engine (summed
over its GPUs, as vLLM's ``kv_offloading_size``). When the GPU cache overwrites a cached block,
the block goes to the CPU tier (least recently stored dropped first when it is full). A prefix
lookup walks both tiers: a block cached on the GPU is reused in place, one in CPU memory is
loaded back into a free GPU block instead of being recomputed; the lookup stops at the first
block neither tier holds. A key lives in exactly one tier (a load moves it up; a block computed
again on the GPU drops its CPU copy).

Cost: the blocks a step loads (and, with swap preemption, the KV it swaps out) cross each GPU's
PCIe link (``hw.pcie_bw_gbps``, one direction; loads and swap-outs run in opposite directions
at once). ``overlap``: the copies run layer by layer beside the forward, as vLLM's connectors
load per layer (a two-stage pipeline over the stage's L layers: (compute + copy) / L +
(L - 1) / L x max(compute, copy)); else they precede it. Stores of evicted blocks are not on the
critical path: vLLM's connector and LMCache copy every computed block to the CPU asynchronously,
so a block the GPU evicts already has its CPU copy; its bytes are counted, not timed.

Swap preemption (``preempt=swap``, vLLM V0's preemption_mode=swap): a preempted request's KV
is copied to the CPU pool (pinned there, the cached blocks make room) and back when it resumes,
ahead of new requests, without recomputing it; when the pool cannot hold it, it is recomputed.
"""
from __future__ import annotations

from collections import OrderedDict

from conf import ConfigError
from sim.config import PREEMPT_MODES
from sim.prefix_cache import PrefixCache, private_key

GIB = 1024 ** 3


class _Loads:
    """Stand-in holder of the GPU blocks loads take (they go to the requests' keys)."""
    id, blocks = "load", 0


class OffloadCache(PrefixCache):
    """PrefixCache with a CPU tier of ``cpu_blocks`` blocks.

    ``block_bytes``: KV bytes of one block on one GPU (what its PCIe link moves);
    ``replica_block_bytes``: on all the engine's GPUs (what the pool holds, the bytes counted);
    ``layers``: layers per pipeline stage (the overlap's pipeline depth)."""

    __slots__ = ("block_bytes", "bytes_per_us", "cpu", "cpu_capacity", "cpu_evictions", "cpu_first_hit_tokens",
                 "layers", "loaded_blocks", "overlap", "pending", "pending_d2h", "pending_h2d",
                 "replica_block_bytes", "stored_blocks", "swap_in_blocks", "swap_outs", "swapped_blocks", "swapping",
                 "transfer_us")

    def __init__(self, capacity: int, block_size: int, watermark: float, cpu_blocks: int, *, block_bytes: int,
                 replica_block_bytes: int, pcie_bw_gbps: float, layers: list[int], overlap: bool = True,
                 swap: bool = False):
        super().__init__(capacity, block_size, watermark)
        self.cpu: OrderedDict = OrderedDict()     # key -> None, least recently stored first
        self.cpu_capacity = cpu_blocks
        self.block_bytes, self.replica_block_bytes = block_bytes, replica_block_bytes
        self.bytes_per_us = pcie_bw_gbps * 1e3
        self.layers, self.overlap, self.swapping = list(layers), overlap, swap
        self.pending = self.pending_h2d = self.pending_d2h = 0
        self.swapped_blocks = 0                  # pinned: preempted requests' KV
        self.loaded_blocks = self.stored_blocks = self.cpu_evictions = self.cpu_first_hit_tokens = 0
        self.swap_in_blocks = self.swap_outs = 0
        self.transfer_us = 0.0

    # --- the CPU tier ---------------------------------------------------------------------
    def _evicted(self, key) -> None:
        if self.swapped_blocks >= self.cpu_capacity:
            return
        self.cpu[key] = None
        self.stored_blocks += 1
        self._fit_cpu()

    def _fit_cpu(self) -> None:
        cpu = self.cpu
        while len(cpu) + self.swapped_blocks > self.cpu_capacity:
            cpu.popitem(last=False)
            self.cpu_evictions += 1

    def lookup(self, req) -> tuple[int, int]:
        """(blocks req's prefill can start after, how many take a free GPU block): the GPU
        cache's run, continued through blocks of either tier (CPU ones are loaded)."""
        n, free = super().lookup(req)
        cpu = self.cpu
        if not cpu:
            return n, free
        limit = (req.prefill_target - 1) // self.block_size
        h, ref = req.hashes or (), self.ref
        while n < limit:
            if n < len(h):
                k = h[n]
            elif req.preemptions:
                k = private_key(req.id, n)
            else:
                break
            if k in cpu:
                free += 1
            elif k in ref:
                free += ref[k] == 0
            else:
                break
            n += 1
        return n, free

    def _hold(self, keys) -> None:
        cpu = self.cpu
        loads = [k for k in keys if k in cpu]
        if not loads:
            return super()._hold(keys)
        super()._hold([k for k in keys if k not in cpu])   # pinned first: the loads cannot evict them
        for k in loads:
            del cpu[k]
        self.allocate(_Loads, len(loads))                 # GPU blocks for them
        self.ref.update(dict.fromkeys(loads, 1))
        self.loaded_blocks += len(loads)
        self._queue(len(loads), 0)

    def admit(self, req, hit: int, num_blocks: int, num_tokens: int) -> None:
        loaded = self.loaded_blocks
        super().admit(req, hit, num_blocks, num_tokens)
        tokens = (self.loaded_blocks - loaded) * self.block_size
        if tokens and req.preemptions == 0:     # the GPU tier's hit rate counts its own hits (vLLM's)
            self.hit_tokens -= tokens
            self.hit_blocks -= tokens // self.block_size
            self.cpu_first_hit_tokens += tokens

    def register(self, req, num_tokens: int, private: bool = False) -> None:
        before = len(req.keys)
        super().register(req, num_tokens, private)
        cpu = self.cpu
        if cpu:
            for k in req.keys[before:]:           # computed again: the GPU copy is the one kept
                cpu.pop(k, None)

    # --- swap preemption ------------------------------------------------------------------
    def swap_out(self, req) -> bool:
        n = -(-req.kv // self.block_size)
        if not self.swapping or not n or n > self.cpu_capacity - self.swapped_blocks:
            return False
        self.swapped_blocks += n
        self._fit_cpu()
        self.release(req, private=False)
        req.swapped = n
        self.swap_outs += 1
        self.stored_blocks += n
        self._queue(0, n)
        return True

    def swap_back(self, req) -> None:
        """req's swapped KV back into GPU blocks (the caller checked they fit)."""
        n = req.swapped
        self.allocate(req, n)
        self.swapped_blocks -= n
        req.swapped = 0
        self.swap_in_blocks += n
        self._queue(n, 0)

    # --- PCIe time ------------------------------------------------------------------------
    def _queue(self, h2d: int, d2h: int) -> None:
        self.pending_h2d += h2d
        self.pending_d2h += d2h
        self.pending = self.pending_h2d + self.pending_d2h

    def with_transfers(self, stage_us: list) -> list:
        """The step's stage times with the copies queued since the last step."""
        copy_us = max(self.pending_h2d, self.pending_d2h) * self.block_bytes / self.bytes_per_us
        self.pending = self.pending_h2d = self.pending_d2h = 0
        self.transfer_us += copy_us
        if not self.overlap:
            return [us + copy_us for us in stage_us]
        return [(us + copy_us) / n + (n - 1) / n * max(us, copy_us) for us, n in zip(stage_us, self.layers)]


def swap_in(running: list, waiting, blocks, max_num_seqs: int) -> None:
    """Bring swapped-out requests at the head of ``waiting`` back while their KV fits."""
    while waiting and len(running) < max_num_seqs:
        r = waiting[0]
        if not r.swapped or not blocks.can_admit(r.swapped):
            return
        waiting.popleft()
        blocks.swap_back(r)
        running.append(r)


def validate(cfg, hw) -> None:
    """One ConfigError line for an offload setting opcast cannot run as given."""
    from sim.schedulers import require
    sc, off = cfg.scheduler, cfg.scheduler.offload
    if off.preempt not in PREEMPT_MODES:
        raise ConfigError(f"scheduler.offload.preempt={off.preempt!r}; choose one of {list(PREEMPT_MODES)}")
    if off.cpu_gib < 0:
        raise ConfigError(f"scheduler.offload.cpu_gib={off.cpu_gib} must be >= 0 (0 = no CPU tier)")
    if not off.cpu_gib:
        if off.preempt == "swap":
            raise ConfigError("scheduler.offload.preempt=swap swaps KV into the CPU pool: it needs "
                              "scheduler.offload.cpu_gib > 0")
        return
    require(sc.name, "kv_offload", f"scheduler.offload.cpu_gib={off.cpu_gib}", "KV offload")
    if not sc.prefix_caching:
        raise ConfigError(f"scheduler.offload.cpu_gib={off.cpu_gib}: the CPU tier holds blocks the prefix "
                          f"cache evicts; it needs scheduler.prefix_caching=true")
    if hw.pcie_bw_gbps <= 0:
        raise ConfigError(f"scheduler.offload.cpu_gib={off.cpu_gib}: hw {hw.name} has no host link "
                          f"(pcie_bw_gbps={hw.pcie_bw_gbps}) to offload KV over")


def make_cache(sc, plan, lay, hw, layers: list[int]) -> OffloadCache:
    """The KV block manager of one engine with sc.offload's CPU tier."""
    off = sc.offload
    replica_block_bytes = plan.kv_bytes_per_block * lay.tp * lay.pp
    cpu_blocks = int(off.cpu_gib * GIB // replica_block_bytes)
    if cpu_blocks < 1:
        raise ConfigError(f"scheduler.offload.cpu_gib={off.cpu_gib} holds no KV block "
                          f"({replica_block_bytes / 2 ** 20:.1f} MiB each on this engine)")
    return OffloadCache(plan.num_blocks, sc.block_size, sc.watermark, cpu_blocks, block_bytes=plan.kv_bytes_per_block,
                        replica_block_bytes=replica_block_bytes, pcie_bw_gbps=hw.pcie_bw_gbps, layers=layers,
                        overlap=bool(off.overlap), swap=off.preempt == "swap")


def stats(caches: list) -> dict[str, float]:
    """The CPU tier's figures over these engines' block managers (empty without offload)."""
    tiers = [c for c in caches if isinstance(c, OffloadCache)]
    if not tiers:
        return {}
    queries = sum(c.query_tokens for c in tiers)
    return {"prefix_hit_rate_cpu": sum(c.cpu_first_hit_tokens for c in tiers) / queries if queries else 0.0,
            "prefill_tokens_loaded": float(sum(c.loaded_blocks * c.block_size for c in tiers)),
            "offload_bytes_to_gpu": float(sum((c.loaded_blocks + c.swap_in_blocks) * c.replica_block_bytes
                                              for c in tiers)),
            "offload_bytes_to_cpu": float(sum(c.stored_blocks * c.replica_block_bytes for c in tiers)),
            "offload_cpu_evictions": float(sum(c.cpu_evictions for c in tiers)),
            "offload_swap_outs": float(sum(c.swap_outs for c in tiers)),
            "offload_transfer_s": sum(c.transfer_us for c in tiers) * 1e-6}
