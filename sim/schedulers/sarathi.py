"""Sarathi-Serve: stall-free batching. Every iteration holds at most ``chunk_size`` tokens:
all running decodes first, then the next chunk of unfinished prompts, then new requests'
first chunks. A new request's blocks for its whole prompt are allocated when it is admitted."""
from sim.schedulers.common import (
    RESERVE_PROMPT,
    Batch,
    Scheduler,
    admit_waiting,
    schedule_running,
)


class SarathiScheduler(Scheduler):
    chunked = True

    def schedule(self, now, running, waiting, blocks):
        decodes, prefills = [], []
        _, preempted = schedule_running(running, waiting, blocks, decodes)
        budget = self.sc.chunk_size - len(decodes)
        for r in running:        # unfinished prompts: their blocks were allocated on admission
            if budget <= 0:
                break
            left = r.prefill_target - r.prefilled
            if left > 0 and not r.busy:
                n = min(left, budget)
                prefills.append((r, n))
                budget -= n
        if not preempted and waiting:
            prefills += admit_waiting(running, waiting, blocks, budget, self.sc.max_num_seqs, chunked=True,
                                      reserve=RESERVE_PROMPT, use_watermark=True)
        return Batch(prefills, decodes) if prefills or decodes else None
