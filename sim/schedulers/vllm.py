"""vLLM v0 default scheduler: prefill-first. New prompts (whole, FCFS) run in a batch of their
own when the token budget, the batch size cap and the KV cache (above the watermark) allow;
otherwise every running request decodes one token, preempting by recompute when KV runs out."""
from sim.schedulers.common import (
    RESERVE_PROMPT,
    Batch,
    Scheduler,
    admit_waiting,
    decode_batch,
)


class VllmScheduler(Scheduler):
    def schedule(self, now, running, waiting, blocks):
        if waiting:
            prefills = admit_waiting(running, waiting, blocks, self.sc.max_tokens_per_batch, self.sc.max_num_seqs,
                                     chunked=False, reserve=RESERVE_PROMPT, use_watermark=True)
            if prefills:
                return Batch(prefills, [])
        return decode_batch(running, waiting, blocks)
