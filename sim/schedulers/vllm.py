"""vLLM v0 default scheduler: prefill-first. New prompts (whole, FCFS) run in a batch of their
own when the token budget, the batch size cap and the KV cache (above the watermark) allow;
otherwise every running request decodes one token, preempting by recompute when KV runs out."""
from sim.schedulers.common import Batch, admit_whole_prompts, schedule_decodes


class VllmScheduler:
    stable_decode = True
    chunked = False

    def __init__(self, sc):
        self.sc = sc

    def schedule(self, now, running, waiting, blocks):
        if waiting:
            prefills = admit_whole_prompts(now, running, waiting, blocks, self.sc.max_tokens_per_batch,
                                           self.sc.max_num_seqs, reserve_output=False, use_watermark=True)
            if prefills:
                return Batch(prefills, [])
        decodes = []
        schedule_decodes(running, waiting, blocks, decodes)
        return Batch([], decodes) if decodes else None
