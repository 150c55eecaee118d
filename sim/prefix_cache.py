"""Automatic prefix caching as vLLM v1 does it: the replica's KV block manager with reuse.

Every full KV block of a request has a content key chained from the start of its sequence:
equal keys at block i mean equal first i+1 blocks (``Request.hashes``, from the workload, for
the blocks that can be shared; a key private to the request for the others). As vLLM's
``allocate_slots`` does, a prompt block is entered in the cache when the batch that fills it
is scheduled, so a request admitted later in the same step already reuses it (in one forward
pass each layer writes the KV of every token before its attention reads it). A block its
output fills is entered when the request ends (or is preempted): no other request can share
a running request's output here (a session's next turn starts after it), so that is the same.

A finished or preempted request's blocks go back to the free queue - last block first, so a
sequence's tail is evicted before its head - and keep their keys: they are still reusable
(reference count 0) and count as free. An allocation takes never-used blocks first, then
blocks from the head of the queue (least recently freed), and a block taken that still had a
key is evicted then, not before. A new request reuses its longest run of cached blocks from
its start, at most ``prefill tokens - 1`` tokens (vLLM keeps one token to compute the
logits): its prefill starts after them and still attends over the whole context.

Blocks only their own request can reuse (no workload key: its output, an unshared prompt
part) are keyed lazily, when a preemption frees them, since only that request's return can
hit them; a finished request's are plain free blocks. Unkeyed free blocks sit in the queue as
counted runs, so a request without shared prefixes costs O(1) per admission and release.

Simplification: when two requests compute the same block before either is cached, vLLM keeps
both copies under one key; here the second copy stays unkeyed (it is freed like a partial
block), which only changes which copy a later lookup would find.
"""
from __future__ import annotations

from collections import OrderedDict

from sim.schedulers.common import Blocks

# Keys of blocks no other request can share: PRIVATE + (request id << 32) + block index. Above
# every key a workload makes (int64 trace ids, scaled by at most 2**20 when a trace's hash
# blocks are split into simulator blocks), so they never collide.
PRIVATE = 1 << 96
# Free-queue entries for runs of unkeyed blocks: ANON + n -> number of blocks in the run.
ANON = 1 << 120


def private_key(rid: int, block: int) -> int:
    return PRIVATE + (rid << 32) + block


class PrefixCache(Blocks):
    """Blocks (``free`` counts never-used blocks plus the free queue) with vLLM's prefix reuse.

    Counters: ``evictions`` (cached blocks taken for new data), first-admission lookups
    (``query_tokens``/``hit_tokens``, ``query_blocks``/``hit_blocks``, as vLLM's prefix cache
    hit rate counts them), ``saved_tokens`` (prefill tokens not computed, every admission,
    including a preempted request's return)."""

    __slots__ = (
        "_anon",
        "evictions",
        "fresh",
        "hit_blocks",
        "hit_tokens",
        "query_blocks",
        "query_tokens",
        "queue",
        "ref",
        "saved_tokens",
    )
    caching = True

    def __init__(self, capacity: int, block_size: int, watermark: float):
        super().__init__(capacity, block_size, watermark)
        self.ref: dict = {}              # key -> running requests holding the block (0: evictable)
        # Freed blocks, least recently freed first: key -> None (keyed), ANON + n -> run length.
        self.queue: OrderedDict = OrderedDict()
        self.fresh = capacity            # never-used blocks: ahead of every freed one
        self._anon = 0
        self.evictions = self.query_tokens = self.hit_tokens = 0
        self.query_blocks = self.hit_blocks = self.saved_tokens = 0

    @property
    def cached(self) -> int:
        """Blocks holding a key: in use, or free and still reusable."""
        return len(self.ref)

    def lookup(self, req) -> tuple[int, int]:
        """(cached blocks req's prefill can start after, how many of them are free now)."""
        limit = (req.prefill_target - 1) // self.block_size
        h = req.hashes or ()
        ref = self.ref
        counts = list(map(ref.get, h[:limit]))      # reference counts, None: not cached
        n = counts.index(None) if None in counts else len(counts)
        free = counts[:n].count(0)
        if req.preemptions and n == len(counts):    # its own blocks may be cached from before
            while n < limit:
                c = ref.get(private_key(req.id, n))
                if c is None:
                    break
                free += c == 0
                n += 1
        return n, free

    def admit(self, req, hit: int, num_blocks: int, num_tokens: int) -> None:
        """Start req on its first ``hit`` cached blocks, give it ``num_blocks`` new ones and cache
        the shareable blocks its first ``num_tokens`` scheduled tokens fill."""
        bs = self.block_size
        if req.preemptions == 0:
            self.query_tokens += req.prefill_target
            self.query_blocks += req.prefill_target // bs
            self.hit_tokens += hit * bs
            self.hit_blocks += hit
            req.cached_tokens = hit * bs
        if hit:
            h = req.hashes or ()
            keys = h[:hit] if hit <= len(h) else list(h) + [private_key(req.id, i) for i in range(len(h), hit)]
            self._hold(keys)
            req.keys = keys
            req.num_keyed = req.blocks = hit
            req.kv = req.prefilled = hit * bs
            self.saved_tokens += hit * bs
        self.allocate(req, num_blocks)
        self.register(req, req.kv + num_tokens)

    def _hold(self, keys) -> None:
        """One more holder of each cached block in keys (the free ones leave the free queue)."""
        ref, queue = self.ref, self.queue
        counts = list(map(ref.__getitem__, keys))
        for k in [k for k, c in zip(keys, counts) if c == 0]:
            del queue[k]          # reusable but free: it leaves the free queue
            self.free -= 1
        ref.update(zip(keys, [c + 1 for c in counts]))

    def allocate(self, req, num_blocks: int) -> None:
        if num_blocks > self.free:
            raise RuntimeError(f"KV over-allocation: request {req.id} wants {num_blocks}, {self.free} free")
        self.free -= num_blocks
        req.blocks += num_blocks
        if num_blocks <= self.fresh:
            self.fresh -= num_blocks
            return
        self._take(num_blocks - self.fresh)

    def _take(self, take: int) -> None:
        """Take ``take`` blocks from the head of the free queue (fresh ones are used up)."""
        self.fresh = 0
        queue, ref = self.queue, self.ref
        while take:
            k = next(iter(queue))
            run = queue[k]
            if run is None:           # a cached block is overwritten: evicted now, not before
                del queue[k]
                del ref[k]
                self.evictions += 1
                self._evicted(k)
                take -= 1
            elif run > take:
                queue[k] = run - take
                take = 0
            else:
                del queue[k]
                take -= run

    def _evicted(self, key) -> None:
        """A cached block was overwritten (sim.offload keeps a copy in CPU memory)."""

    def trim(self, req, num_blocks: int) -> None:
        """Free req's last num_blocks blocks: unkeyed ones (rejected draft tokens' KV)."""
        self._anon += 1
        self.queue[ANON + self._anon] = num_blocks
        self.free += num_blocks
        req.blocks -= num_blocks

    def register(self, req, num_tokens: int, private: bool = False) -> None:
        """Cache the blocks req's first num_tokens tokens fill, those with a workload key (and,
        ``private``, the others under keys of their own)."""
        h = req.hashes or ()
        full = num_tokens // self.block_size
        end = full if private else min(full, len(h))
        i = req.num_keyed
        if end <= i:
            return
        nh = len(h)
        ref, keys = self.ref, req.keys
        if not keys:
            keys = req.keys = []
        while i < end:
            k = h[i] if i < nh else private_key(req.id, i)
            if k not in ref:          # else the same content is cached in another block
                ref[k] = 1
                keys.append(k)
            i += 1
        req.num_keyed = i

    def commit(self, batch) -> None:
        """Cache the shareable blocks a scheduled batch's prefill chunks fill."""
        for r, n in batch.prefills:
            if r.hashes:
                self.register(r, r.kv + n)

    def release(self, req, private: bool | None = None) -> None:
        """Free req's blocks into the queue, last first, keeping their keys: those its output
        filled get theirs now, and a preempted request's own blocks too (its return may reuse
        them; ``private`` False: it will not, its KV was kept elsewhere)."""
        if req.kv // self.block_size > req.num_keyed:
            self.register(req, req.kv, private=not req.done if private is None else private)
        queue, ref = self.queue, self.ref
        unkeyed = req.blocks - len(req.keys)          # the partial tail, unshared blocks, copies
        if unkeyed:
            self._anon += 1
            queue[ANON + self._anon] = unkeyed
        freed = unkeyed
        for k in reversed(req.keys):
            c = ref[k] - 1
            ref[k] = c
            if c == 0:                # the last holder left: the block is free, still cached
                queue[k] = None
                freed += 1
        self.free += freed
        req.blocks = req.num_keyed = 0
        req.keys = ()
