"""FasterTransformer: request-level batching. When nothing is running, admit up to the batch
size cap of waiting requests (FCFS, whole prompts within the token budget, KV for prompt and
full output reserved) and prefill them together; then decode until every one has finished,
admitting nothing new in between."""
from sim.schedulers.common import Batch, admit_whole_prompts, schedule_decodes


class FasterTransformerScheduler:
    stable_decode = True
    chunked = False

    def __init__(self, sc):
        self.sc = sc

    def schedule(self, now, running, waiting, blocks):
        if running:
            decodes = []
            schedule_decodes(running, waiting, blocks, decodes)
            return Batch([], decodes) if decodes else None
        prefills = admit_whole_prompts(now, running, waiting, blocks, self.sc.max_tokens_per_batch,
                                       self.sc.max_num_seqs, reserve_output=True, use_watermark=False)
        return Batch(prefills, []) if prefills else None
