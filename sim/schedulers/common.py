"""What every replica scheduler shares: the batch, the KV block manager, preemption, the loop
over running requests (``schedule_running``) and FCFS admission (``admit_waiting``).

A scheduler is a small ``Scheduler`` subclass with one method,
``schedule(now, running, waiting, blocks) -> Batch | None``.
It may admit requests (move them from ``waiting`` to ``running`` and allocate their blocks),
preempt them (by recompute: free the blocks, put them back at the head of ``waiting``) and
must allocate the blocks its batch's new tokens need before returning. Requests marked
``busy`` are in flight on a pipeline stage and must be left alone. ``stable_decode = True``
promises: after a decode-only batch of every running request, the next decision is the same
until a request arrives, one finishes, or the KV blocks for the next token run out - the
engine uses it to run steady decode stretches as one event. ``stable_while_waiting = False``
limits that promise to when no request waits (a policy whose admission test can come to pass
while the running requests decode, without an arrival or a completion).
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
    caching = False          # sim.prefix_cache.PrefixCache: True (lookup, admit, commit)
    pending = 0              # sim.offload.OffloadCache: blocks to move over PCIe this step
    swapping = False         # sim.offload.OffloadCache: preemption swaps KV to CPU memory

    def __init__(self, capacity: int, block_size: int, watermark: float):
        self.capacity, self.free, self.block_size = capacity, capacity, block_size
        self.preemptions = 0
        self.watermark = int(watermark * capacity)

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

    def trim(self, req, num_blocks: int) -> None:
        """Free req's last num_blocks blocks (unkeyed: those only rejected drafts filled)."""
        self.free += num_blocks
        req.blocks -= num_blocks

    def swap_out(self, req) -> bool:
        """Keep a preempted request's KV in CPU memory (sim.offload); False: recompute it."""
        return False

    @property
    def used(self) -> int:
        return self.capacity - self.free


def preempt(req, running: list, waiting: deque, blocks: Blocks) -> None:
    """Preemption by recompute: the prompt and the output so far will be prefilled again (or,
    with sim.offload's swap preemption, by swapping its KV out to CPU memory)."""
    running.remove(req)
    if not blocks.swap_out(req):
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


class Scheduler:
    """The shared header of every policy: its SchedulerConf and the flags the engine reads.

    ``chunked``: prompts may be split over iterations (else a whole prompt must fit one
    iteration's token budget). ``reserves_output``: admission holds KV blocks for the whole
    output (sim.disagg reserves them with the arriving KV, so admission cannot wait on them). ``stable_decode``, ``stable_while_waiting``: see the module
    docstring. ``spec_decoding`` / ``kv_offload``: the policy runs sim.spec's draft tokens
    (``draft(request) -> tokens``, set on the instance) / sim.offload's CPU tier."""

    stable_decode = True
    stable_while_waiting = True
    chunked = False
    reserves_output = False     # admission reserves KV for the whole output (RESERVE_OUTPUT)
    spec_decoding = False
    kv_offload = False
    draft = None

    def __init__(self, sc):
        self.sc = sc

    def schedule(self, now, running: list, waiting: deque, blocks: Blocks) -> Batch | None:
        raise NotImplementedError


NO_BUDGET = 1 << 62


def schedule_running(running: list, waiting: deque, blocks: Blocks, decodes: list,
                     prefills: list | None = None, budget: int = NO_BUDGET, draft=None) -> tuple[int, bool]:
    """Give the idle running requests, in order, their next tokens within ``budget``: one for a
    decoding request (appended to ``decodes``), the next chunk of an unfinished prompt when
    ``prefills`` is given (appended as (request, tokens); skipped otherwise). Blocks run out ->
    preempt vLLM-style from the back. Returns (budget left, whether it had to preempt).
    ``draft(request)``: speculative decoding (sim.spec): a decode also runs the draft tokens
    it returns, as far as the budget allows (``request.drafts``)."""
    preempted = False
    bs = blocks.block_size
    for i, r in enumerate(running):   # (preemption only removes requests after i, or i and stops)
        if budget <= 0:
            break
        if r.busy:
            continue
        left = r.prefill_target - r.prefilled
        if left:
            if prefills is None:
                continue
            n = min(left, budget)
        else:
            n = 1
            if draft is not None:
                n = min(1 + draft(r), budget)
                r.drafts = n - 1
        nb = -(-(r.kv + n) // bs) - r.blocks
        if nb > 0:
            if nb > blocks.free:
                preempted = True
                if not make_room(running, i, nb, waiting, blocks):
                    break
            blocks.allocate(r, nb)
        if left:
            prefills.append((r, n))
        else:
            decodes.append(r)
        budget -= n
    return budget, preempted


def decode_batch(running: list, waiting: deque, blocks: Blocks) -> Batch | None:
    """A decode-only batch of every idle decoding request (None if there is none)."""
    decodes = []
    schedule_running(running, waiting, blocks, decodes)
    return Batch([], decodes) if decodes else None


# What a scheduler reserves KV blocks for when it admits a request: the tokens of its first
# chunk, its whole prompt, or its prompt and its whole output (so it can never be preempted).
RESERVE_CHUNK, RESERVE_PROMPT, RESERVE_OUTPUT = "chunk", "prompt", "output"


def admit_waiting(running: list, waiting: deque, blocks: Blocks, budget: int, max_num_seqs: int, *,
                  chunked: bool, reserve: str, use_watermark: bool, accept=None) -> list:
    """FCFS admission: move waiting requests into running while the token budget, the batch size
    cap and the KV cache allow; returns their first chunks as [(request, tokens)].

    chunked: the first chunk may be cut to the budget (else the whole prompt must fit it);
    reserve: RESERVE_*; use_watermark: keep the watermark free (else any free block will do);
    accept(request, tokens): a policy's last say (called only when all else fits). With prefix
    caching a request starts on its cached blocks and only the rest of its prompt is prefilled
    (and counted against the budget)."""
    prefills = []
    bs, caching = blocks.block_size, blocks.caching
    hit = hit_free = 0
    while waiting and budget > 0 and len(running) < max_num_seqs:
        r = waiting[0]
        if r.swapped:                         # its KV is in CPU memory: sim.offload.swap_in
            break
        if caching:
            hit, hit_free = blocks.lookup(r)  # prefix-cached blocks it starts on
        cached = hit * bs
        left = r.prefill_target - r.prefilled - cached
        if left > budget and not chunked:
            break
        n = min(left, budget)
        hold = r.kv + cached + (n if reserve == RESERVE_CHUNK else left)
        if reserve == RESERVE_OUTPUT:
            hold += r.output - r.decoded - 1
        new = max(0, -(-hold // bs) - r.blocks - hit)
        nb = new + hit_free                   # reusing a free cached block takes it too
        if not (blocks.can_admit(nb) if use_watermark else nb <= blocks.free):
            break
        if accept is not None and not accept(r, n):
            break
        waiting.popleft()
        if caching:
            blocks.admit(r, hit, new, n)
        else:
            blocks.allocate(r, new)
        running.append(r)
        prefills.append((r, n))
        budget -= n
    return prefills
