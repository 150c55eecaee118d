"""What every replica scheduler shares: the batch, the KV block manager and preemption.

A scheduler is a small class with ``schedule(now, running, waiting, blocks) -> Batch | None``.
It may admit requests (move them from ``waiting`` to ``running`` and allocate their blocks),
preempt them (by recompute: free the blocks, put them back at the head of ``waiting``) and
must allocate the blocks its batch's new tokens need before returning. Requests marked
``busy`` are in flight on a pipeline stage and must be left alone. ``stable_decode = True``
promises: after a decode-only batch of every running request, the next decision is the same
until a request arrives, one finishes, or the KV blocks for the next token run out - the
engine uses it to run steady decode stretches as one event.
"""
from __future__ import annotations

from collections import deque


class Batch:
    __slots__ = ("prefills", "decodes")

    def __init__(self, prefills: list | None = None, decodes: list | None = None):
        self.prefills = prefills if prefills is not None else []   # [(request, chunk tokens)]
        self.decodes = decodes if decodes is not None else []      # [request]

    def __repr__(self) -> str:
        return f"Batch(prefills={[(r.id, n) for r, n in self.prefills]}, decodes={[r.id for r in self.decodes]})"


class Blocks:
    """Paged KV cache of one replica: a free-block count and each request's ``blocks``."""

    __slots__ = ("capacity", "free", "block_size", "watermark", "preemptions")

    def __init__(self, capacity: int, block_size: int, watermark: float):
        self.capacity, self.free, self.block_size = capacity, capacity, block_size
        self.preemptions = 0
        self.watermark = int(watermark * capacity)

    def need(self, req, new_tokens: int) -> int:
        """Blocks req must gain to hold new_tokens more KV tokens."""
        return max(0, -(-(req.kv + new_tokens) // self.block_size) - req.blocks)

    def need_total(self, num_tokens: int, req) -> int:
        return max(0, -(-num_tokens // self.block_size) - req.blocks)

    def can_admit(self, num_blocks: int) -> bool:
        return self.free - num_blocks >= self.watermark

    def allocate(self, req, num_blocks: int) -> None:
        if num_blocks > self.free:
            raise RuntimeError(f"KV over-allocation: request {req.id} wants {num_blocks}, {self.free} free")
        self.free -= num_blocks
        req.blocks += num_blocks

    def release(self, req) -> None:
        self.free += req.blocks
        req.blocks = 0

    @property
    def used(self) -> int:
        return self.capacity - self.free


def preempt(req, running: list, waiting: deque, blocks: Blocks) -> None:
    """Preemption by recompute: the prompt and the output so far will be prefilled again."""
    running.remove(req)
    blocks.release(req)
    req.prefill_target = req.prompt + req.decoded
    req.prefilled = 0
    req.kv = 0
    req.preemptions += 1
    blocks.preemptions += 1
    waiting.appendleft(req)


def victim_after(running: list, i: int):
    """The lowest-priority (last admitted) idle request after position i, or None."""
    for j in range(len(running) - 1, i, -1):
        if not running[j].busy:
            return running[j]
    return None


def make_room(running: list, i: int, num_blocks: int, waiting: deque, blocks: Blocks) -> bool:
    """Preempt from the back until running[i] can take num_blocks; False if it was preempted."""
    while num_blocks > blocks.free:
        victim = victim_after(running, i)
        if victim is None:
            preempt(running[i], running, waiting, blocks)
            return False
        preempt(victim, running, waiting, blocks)
    return True


def schedule_decodes(running: list, waiting: deque, blocks: Blocks, decodes: list) -> bool:
    """Give every idle decoding request one new token slot (FCFS), preempting vLLM-style from
    the back when KV runs out; appends them to ``decodes``. True if it had to preempt."""
    preempted = False
    i = 0
    while i < len(running):
        r = running[i]
        if r.busy or r.prefilled < r.prefill_target:
            i += 1
            continue
        nb = -(-(r.kv + 1) // blocks.block_size) - r.blocks
        if nb > 0:
            if nb > blocks.free:
                preempted = True
                if not make_room(running, i, nb, waiting, blocks):
                    break
            blocks.allocate(r, nb)
        decodes.append(r)
        i += 1
    return preempted


def admit_whole_prompts(now, running: list, waiting: deque, blocks: Blocks, budget: int,
                        max_num_seqs: int, reserve_output: bool, use_watermark: bool) -> list:
    """FCFS: move waiting requests whose whole prompt fits the token budget, the batch size cap
    and the KV cache (prompt, or prompt + output when reserve_output) into running."""
    prefills = []
    while waiting and len(running) < max_num_seqs:
        r = waiting[0]
        n = r.prefill_target - r.prefilled
        if n > budget:
            break
        tokens = r.kv + n + (r.output - r.decoded - 1 if reserve_output else 0)
        nb = blocks.need_total(tokens, r)
        if not (blocks.can_admit(nb) if use_watermark else nb <= blocks.free):
            break
        waiting.popleft()
        blocks.allocate(r, nb)
        running.append(r)
        prefills.append((r, n))
        budget -= n
    return prefills
