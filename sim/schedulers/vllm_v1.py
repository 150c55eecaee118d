"""vLLM v1 style: one token budget per iteration shared by running requests first (decodes and
unfinished prompt chunks, in arrival order) and then new requests, whose prompts are chunked to
fit. KV blocks are allocated per chunk; when they run out the newest running request is
preempted (recompute, or swapped to CPU memory with sim.offload's preempt=swap: those come back
first), and no new request is admitted in that iteration. With speculative decoding (sim.spec)
a decode also runs its draft tokens, counted against the budget."""
from sim.offload import swap_in
from sim.schedulers.common import (
    RESERVE_CHUNK,
    Batch,
    Scheduler,
    admit_waiting,
    schedule_running,
)


class VllmV1Scheduler(Scheduler):
    chunked = True
    spec_decoding = True
    kv_offload = True

    def schedule(self, now, running, waiting, blocks):
        if blocks.swapping and waiting:   # swapped-out requests come back first (vLLM V0's order)
            swap_in(running, waiting, blocks, self.sc.max_num_seqs)
        prefills, decodes = [], []
        budget, preempted = schedule_running(running, waiting, blocks, decodes, prefills,
                                             self.sc.max_tokens_per_batch, self.draft)
        if not preempted and waiting:
            prefills += admit_waiting(running, waiting, blocks, budget, self.sc.max_num_seqs, chunked=True,
                                      reserve=RESERVE_CHUNK, use_watermark=True)
        return Batch(prefills, decodes) if prefills or decodes else None
