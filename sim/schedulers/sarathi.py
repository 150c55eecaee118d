"""Sarathi-Serve: stall-free batching. Every iteration holds at most ``chunk_size`` tokens:
all running decodes first, then the next chunk of unfinished prompts, then new requests'
first chunks. A new request's blocks for its whole prompt are allocated when it is admitted."""
from sim.schedulers.common import Batch, schedule_decodes


class SarathiScheduler:
    stable_decode = True
    chunked = True

    def __init__(self, sc):
        self.sc = sc

    def schedule(self, now, running, waiting, blocks):
        decodes, prefills = [], []
        preempted = schedule_decodes(running, waiting, blocks, decodes)
        budget = self.sc.chunk_size - len(decodes)
        for r in running:
            if budget <= 0:
                break
            left = r.prefill_target - r.prefilled
            if left > 0 and not r.busy:
                n = min(left, budget)
                prefills.append((r, n))
                budget -= n
        while not preempted and waiting and budget > 0 and len(running) < self.sc.max_num_seqs:
            r = waiting[0]
            nb = blocks.need_total(r.prefill_target, r)
            if not blocks.can_admit(nb):
                break
            waiting.popleft()
            blocks.allocate(r, nb)
            running.append(r)
            n = min(r.prefill_target, budget)
            prefills.append((r, n))
            budget -= n
        return Batch(prefills, decodes) if prefills or decodes else None
