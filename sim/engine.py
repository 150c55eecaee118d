"""The event loop: arrivals, a global router, replicas with a scheduler, a KV block manager
(with prefix caching: sim.prefix_cache) and pipeline stages; one event per batch (per pipeline
stage hand-off at pp > 1). A request that belongs to a multi-turn session brings its session's
next turn when it completes (sim.workload.Session): that turn arrives after the think time.

Steady decode stretches (``stable_decode`` schedulers - ``stable_while_waiting`` ones, or
nothing waiting -, a decode-only batch of every running request, no preemption) run as one event covering k iterations, where k stops at the first
iteration that ends at/after the next arrival, at the first request completion, or before the
KV blocks for the next token run out - and, with multi-turn sessions on several replicas, at
the first that ends at/after another replica's next batch completion (a completion there can
send a session's next turn here). Each iteration's time is still computed one by one in the
same order, so per-request results are bit-identical to ``sim.fast_forward=false``.

Speculative decoding (sim.spec) runs every step as its own event (``_start_spec``: each step
draws its acceptances, so no stretch is steady); KV copied over PCIe in a step (sim.offload)
is priced on the general path (``Blocks.pending``).
"""
from __future__ import annotations

import heapq
import math
import random
from collections import deque

from sim.router import ROUTERS, RouterState
from sim.schedulers.common import Blocks

# Event kinds and their payloads:
#   ARRIVAL     a Request from the workload stream (the next one is pulled when it is handled)
#   NEXT_TURN   a Request of a session's next turn (sent when the previous turn completed)
#   BATCH_DONE  (replica, batch, steps, first_end_s): a batch (or a fast-forwarded stretch of
#               `steps` decode iterations, the first ending at first_end_s) has finished
#   STAGE_FREE  replica: its first pipeline stage can take the next batch (pp > 1)
#   WAKE        replica: schedule it once every arrival of this instant has been routed
#   KV_READY    (decode replica, request): a prompt's KV cache has arrived (sim.disagg)
# The heap orders events by (time, rank, push order): at one instant arrivals come first, then
# batch completions and stage hand-offs (one rank, in push order), then wake-ups.
ARRIVAL, BATCH_DONE, STAGE_FREE, WAKE, NEXT_TURN, KV_READY = range(6)
_RANK = (0, 1, 1, 2, 0, 1)
INF = math.inf


class Request:
    """One request's progress. ``hashes``: content keys of its full KV blocks that other
    requests may share (chained from the start; None: nothing shared); ``keys``/``num_keyed``:
    the cached blocks it holds and how many of its blocks were offered to the cache (prefix
    caching only); ``session``: the multi-turn session it belongs to, or None."""

    __slots__ = ("id", "arrival_s", "prompt", "output", "prefill_target", "prefilled", "decoded",
                 "kv", "blocks", "first_sched_s", "first_token_s", "last_token_s", "preemptions",
                 "busy", "replica", "done", "hashes", "keys", "num_keyed", "cached_tokens", "session",
                 "drafts", "swapped")

    def __init__(self, rid: int, arrival_s: float, prompt: int, output: int, hashes=None,
                 session=None):
        self.id, self.arrival_s, self.prompt, self.output = rid, arrival_s, prompt, output
        self.prefill_target, self.prefilled, self.decoded, self.kv, self.blocks = prompt, 0, 0, 0, 0
        self.first_sched_s = self.first_token_s = self.last_token_s = -1.0
        self.preemptions, self.busy, self.replica, self.done = 0, False, -1, False
        self.hashes, self.keys, self.num_keyed, self.cached_tokens = hashes, (), 0, 0
        self.session = session
        self.drafts = self.swapped = 0    # sim.spec: draft tokens this step; sim.offload: blocks in CPU


class Replica:
    spec = None          # sim.spec.SpecDecoder when the replica decodes speculatively
    pool = ""            # sim.disagg: "prefill" or "decode" ("" = a colocated replica)

    def __init__(self, idx: int, scheduler, blocks: Blocks, cost, pp: int):
        self.idx, self.scheduler, self.blocks, self.cost, self.pp = idx, scheduler, blocks, cost, pp
        self.caching = blocks.caching     # a PrefixCache: cache what prefill chunks fill
        self.running: list = []
        self.waiting: deque = deque()
        self.stage_free_at = [0.0] * pp
        self.stage0_busy = False
        self.in_flight = 0
        self.wake_pending = False
        self.outstanding = 0
        self.routed = 0
        self.done_at = math.inf   # end of its batch in flight (pp = 1)
        self.kv_area = 0.0        # integral of used blocks over time
        self.kv_changed_at = 0.0
        self.peak_blocks = 0

    def assign(self, req) -> None:
        """req is routed here: outstanding (for the routers) until it completes, and counted."""
        req.replica = self.idx
        self.outstanding += 1
        self.routed += 1

    def note_kv(self, now: float) -> None:
        b = self.blocks
        used = b.capacity - b.free
        self.kv_area += used * (now - self.kv_changed_at)
        self.kv_changed_at = now
        if used > self.peak_blocks:
            self.peak_blocks = used


class Engine:
    def __init__(self, replicas: list[Replica], router: str, seed: int, metrics, fast_forward: bool,
                 trace: list | None = None, max_trace_events: int = 0, timeline: list | None = None,
                 router_conf=None):
        self.replicas, self.metrics = replicas, metrics
        self.entry = replicas         # the replicas the router sends new requests to
        self.route = ROUTERS[router]
        self.router_state = RouterState(random.Random(seed * 2 + 3), router_conf)
        self.fast_forward = fast_forward
        self.trace, self.max_trace_events = trace, max_trace_events
        self.timeline, self.timeline_stride, self._tick = timeline, 1, 0
        self.heap: list = []
        self.seq = 0
        self.next_arrival_s = INF     # the earliest pending arrival (stream or next turn)
        self.stream_next_s = INF      # the stream's pending arrival
        self.turns_due: list = []     # arrival times of pending next turns (a heap)
        self.turn_bound = False       # sessions on several replicas: see the module docstring
        self.request_cls = Request
        # sim.disagg: a replica's completions send work to another (KV hand-offs), so steady
        # decode stretches always stop at other replicas' batch completions.
        self.bound_by_others = False

    # --- events ---------------------------------------------------------------------------
    def push(self, t: float, kind: int, payload) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, _RANK[kind], self.seq, kind, payload))

    def run(self, arrivals) -> float:
        """Simulate the (arrival_s, prompt, output) stream to the end; returns the end time."""
        self.arrivals = iter(arrivals)
        self.next_id = 0
        self._pull_arrival()
        first = self.heap[0][4] if self.heap else None     # a stream of sessions, or none
        self.turn_bound = self.bound_by_others or (len(self.replicas) > 1 and first is not None
                                                   and first.session is not None)
        now = 0.0
        heap, pop = self.heap, heapq.heappop
        while heap:
            now, _, _, kind, payload = pop(heap)
            if kind == BATCH_DONE:
                replica, batch, steps, first_end = payload
                replica.done_at = INF
                self.finish(replica, batch, steps, first_end, now)
                self.start(replica, now)
            elif kind == ARRIVAL:
                self._pull_arrival(now)
                self._route(payload, now)
            elif kind == STAGE_FREE:
                payload.stage0_busy = False
                self.start(payload, now)
            elif kind == WAKE:
                payload.wake_pending = False
                self.start(payload, now)
            elif kind == NEXT_TURN:
                self._due_done()
                self._route(payload, now)
            else:
                self.handle(kind, payload, now)
        for r in self.replicas:
            r.note_kv(now)
        return now

    def handle(self, kind: int, payload, now: float) -> None:
        """Events of kinds this loop does not know (sim.disagg's KV arrivals)."""
        raise ValueError(f"unknown event kind {kind}")

    def due(self, t: float, kind: int, payload) -> None:
        """Queue an event that brings work to a replica at t (a session's next turn, a KV
        arrival): steady decode stretches stop there, as at an arrival."""
        self.push(t, kind, payload)
        heapq.heappush(self.turns_due, t)
        self.next_arrival_s = min(self.next_arrival_s, t)

    def _due_done(self) -> None:
        heapq.heappop(self.turns_due)
        self.next_arrival_s = min(self.stream_next_s, self.turns_due[0] if self.turns_due else INF)

    def _pull_arrival(self, now: float = 0.0) -> None:
        """Queue the stream's next request (one pending arrival at a time keeps memory flat)."""
        nxt = next(self.arrivals, None)
        self.stream_next_s = self.next_arrival_s = INF if nxt is None else nxt[0]
        if self.turns_due and self.turns_due[0] < self.next_arrival_s:
            self.next_arrival_s = self.turns_due[0]
        if nxt is None:
            return
        if nxt[0] < now:
            raise ValueError("arrivals must be in time order")
        self.push(nxt[0], ARRIVAL, self.request_cls(self.next_id, *nxt))
        self.next_id += 1

    def _next_turn(self, req: Request, now: float) -> None:
        """Queue the next turn of req's session (sent once req's answer is complete)."""
        nxt = req.session.next_turn(now)
        if nxt is None:
            return
        self.due(nxt[0], NEXT_TURN, self.request_cls(self.next_id, *nxt))
        self.next_id += 1

    def _route(self, req: Request, now: float) -> None:
        replica = self.route(self.entry, req, self.router_state)
        replica.assign(req)
        replica.waiting.append(req)
        self.wake(replica, now)

    def wake(self, rep: Replica, now: float) -> None:
        """Schedule rep at now, after every event of this instant, unless it is busy or due."""
        if not rep.stage0_busy and not rep.wake_pending:
            rep.wake_pending = True
            self.push(now, WAKE, rep)

    # --- one replica ---------------------------------------------------------------------
    def start(self, rep: Replica, now: float) -> None:
        if rep.stage0_busy or rep.in_flight >= rep.pp or not (rep.waiting or rep.running):
            return
        preempted_before = rep.blocks.preemptions
        rep.note_kv(now)
        batch = rep.scheduler.schedule(now, rep.running, rep.waiting, rep.blocks)
        rep.note_kv(now)
        if batch is None:
            return
        m = self.metrics
        decodes, prefills = batch.decodes, batch.prefills
        for r, _ in prefills:
            if r.first_sched_s < 0:
                r.first_sched_s = now
        if rep.spec is not None:
            self._start_spec(rep, batch, now)
            return
        steps, first_end = 1, 0.0
        if rep.pp == 1 and not prefills and not rep.blocks.pending:
            b = len(decodes)
            kv_sum, cap = 0, 1 << 62
            for r in decodes:
                kv_sum += r.kv
                left = r.output - r.decoded
                if left < cap:
                    cap = left          # iterations until the first request finishes
            cost = rep.cost
            dt = cost.decode_us(b, kv_sum + b) * 1e-6
            end = now + dt
            m.iterations += 1
            m.batch_size_sum += b
            m.tokens += b
            m.sampled += b
            m.attn_pairs += kv_sum + b
            m.kv_read_tokens += kv_sum + b
            if self.trace is not None:
                self._trace(rep, 0, now, dt, "decode", b, 0)
            first_end = end
            nxt_s = self.next_arrival_s
            if self.turn_bound:
                nxt_s = min(nxt_s, min(o.done_at for o in self.replicas if o is not rep))
            if (cap > 1 and end < nxt_s and self.fast_forward and b == len(rep.running)
                    and rep.scheduler.stable_decode and rep.blocks.preemptions == preempted_before
                    and (rep.scheduler.stable_while_waiting or not rep.waiting)):
                cap = self._block_cap(rep, decodes, cap)
                tr, decode_us, dts = self.trace, cost.decode_us, []
                while steps < cap and end < nxt_s:
                    steps += 1
                    dt = decode_us(b, kv_sum + steps * b) * 1e-6
                    dts.append(dt)
                    if tr is not None:
                        self._trace(rep, 0, end, dt, "decode", b, 0)
                    end += dt
                m.hist["itl_s"].add_many(dts, b)
                extra = steps - 1     # iterations 2..steps: tokens b each, KV read kv_sum + j*b
                m.iterations += extra
                m.batch_size_sum += b * extra
                m.tokens += b * extra
                m.sampled += b * extra
                kv_read = extra * kv_sum + b * (steps * (steps + 1) // 2 - 1)
                m.attn_pairs += kv_read
                m.kv_read_tokens += kv_read
                if steps > 1:
                    blocks = rep.blocks
                    bs = blocks.block_size
                    for r in decodes:   # the blocks of iterations 2..steps, known to fit
                        nb = -(-(r.kv + steps) // bs) - r.blocks
                        if nb > 0:
                            blocks.allocate(r, nb)
                    rep.note_kv(now)
            rep.stage0_busy = True
            self.push(end, BATCH_DONE, (rep, batch, steps, first_end))
            if self.turn_bound:
                rep.done_at = end
            self._sample(rep, now, b)
            return
        if rep.caching and prefills:
            rep.blocks.commit(batch)
        num_tokens, pre, sampled, pairs = len(decodes), [], len(decodes), 0
        for r, n in prefills:
            kv_after = r.kv + n
            pre.append((n, kv_after))
            num_tokens += n
            pairs += n * kv_after
            if r.prefilled + n == r.prefill_target:
                sampled += 1
        kv_sum = 0
        for r in decodes:
            kv_sum += r.kv + 1
        stage_us = rep.cost.stage_us(num_tokens, pre, len(decodes), kv_sum, sampled)
        if rep.blocks.pending:    # KV copied over PCIe in this step (sim.offload)
            stage_us = rep.blocks.with_transfers(stage_us)
        m.iterations += 1
        m.batch_size_sum += len(prefills) + len(decodes)
        m.tokens += num_tokens
        m.sampled += sampled
        m.attn_pairs += pairs + kv_sum
        m.kv_read_tokens += kv_sum + sum(kv for _, kv in pre)
        name = "mixed" if prefills and decodes else ("prefill" if prefills else "decode")
        t = now
        for s, us in enumerate(stage_us):
            start = max(t, rep.stage_free_at[s])
            t = start + us * 1e-6
            rep.stage_free_at[s] = t
            self._trace(rep, s, start, us * 1e-6, name, len(prefills) + len(decodes), num_tokens)
            if s == 0 and rep.pp > 1:
                self.push(t, STAGE_FREE, rep)
        if rep.pp > 1:
            for r, _ in prefills:
                r.busy = True
            for r in decodes:
                r.busy = True
            rep.in_flight += 1
        rep.stage0_busy = True
        self.push(t, BATCH_DONE, (rep, batch, 1, t))
        if self.turn_bound:
            rep.done_at = t
        self._sample(rep, now, len(prefills) + len(decodes))

    def _start_spec(self, rep: Replica, batch, now: float) -> None:
        """One step of speculative decoding (sim.spec, pp = 1): the target verifies every
        decode's drafts beside any prefill chunks, then the proposer drafts. Never
        fast-forwarded: each step draws its acceptances."""
        if rep.caching and batch.prefills:
            rep.blocks.commit(batch)
        us, tokens, sampled, pairs, kv_read = rep.spec.step(batch)
        if rep.blocks.pending:
            us = rep.blocks.with_transfers([us])[0]
        m, size = self.metrics, len(batch.prefills) + len(batch.decodes)
        m.iterations += 1
        m.batch_size_sum += size
        m.tokens += tokens
        m.sampled += sampled
        m.attn_pairs += pairs
        m.kv_read_tokens += kv_read
        end = now + us * 1e-6
        rep.stage_free_at[0] = end
        self._trace(rep, 0, now, us * 1e-6, "spec", size, tokens)
        rep.stage0_busy = True
        self.push(end, BATCH_DONE, (rep, batch, 1, end))
        if self.turn_bound:
            rep.done_at = end
        self._sample(rep, now, size)

    def _block_cap(self, rep: Replica, decodes: list, cap: int) -> int:
        """Most iterations (<= cap) whose extra KV blocks fit in the free ones."""
        blocks = rep.blocks
        bs, free = blocks.block_size, blocks.free
        total = 0
        for r in decodes:
            nb = -(-(r.kv + cap) // bs) - r.blocks
            if nb > 0:
                total += nb
        if total <= free:
            return cap
        lo, hi = 1, cap        # need(lo) fits (iteration 1 is allocated); need(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if sum(max(0, -(-(r.kv + mid) // bs) - r.blocks) for r in decodes) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def finish(self, rep: Replica, batch, steps: int, first_end: float, now: float) -> None:
        m = self.metrics
        completed = False
        for r, n in batch.prefills:
            r.prefilled += n
            r.kv += n
            r.busy = False
            if r.prefilled == r.prefill_target:
                if r.decoded == 0:
                    r.first_token_s = now
                else:
                    m.add_itl(now - r.last_token_s)
                r.decoded += 1
                r.last_token_s = now
                if r.decoded == r.output:
                    r.done = completed = True
        gaps, decodes = [], batch.decodes
        if rep.spec is not None and decodes:
            completed = rep.spec.advance(rep.blocks, decodes, first_end, now, m) or completed
            decodes = ()
        for r in decodes:
            gaps.append(first_end - r.last_token_s)
            r.decoded += steps
            r.kv += steps
            r.busy = False
            r.last_token_s = now
            if r.decoded == r.output:
                r.done = completed = True
        if gaps:
            m.hist["itl_s"].add_many(gaps)
        if rep.pp > 1:
            rep.in_flight -= 1
        else:
            rep.stage0_busy = False
        if completed:
            rep.note_kv(now)
            keep = []
            done = []
            for r in rep.running:
                (done if r.done else keep).append(r)
            rep.running[:] = keep
            for r in done:
                self.retire(rep, r, now)

    def retire(self, rep: Replica, r: Request, now: float) -> None:
        """A request is complete on rep: free its KV, count it, send its session's next turn."""
        rep.blocks.release(r)
        rep.outstanding -= 1
        self.metrics.complete(r, now)
        if r.session is not None:
            self._next_turn(r, now)

    # --- optional records ----------------------------------------------------------------
    def _trace(self, rep, stage, start_s, dur_s, name, batch_size, num_tokens) -> None:
        tr = self.trace
        if tr is not None and len(tr) < self.max_trace_events:
            tr.append((rep.idx, stage, start_s, dur_s, name, batch_size, num_tokens))

    def _sample(self, rep, now, batch_size) -> None:
        tl = self.timeline
        if tl is None:
            return
        self._tick += 1
        if self._tick % self.timeline_stride:
            return
        b = rep.blocks
        queries = getattr(b, "query_tokens", 0)     # prefix cache: blocks cached, hit rate so far
        tl.append((now, rep.idx, (b.capacity - b.free) / b.capacity, batch_size, len(rep.running),
                   len(rep.waiting), getattr(b, "cached", 0) / b.capacity,
                   b.hit_tokens / queries if queries else 0.0))
        if len(tl) >= 20000:   # keep memory bounded: halve the resolution
            del tl[1::2]
            self.timeline_stride *= 2
