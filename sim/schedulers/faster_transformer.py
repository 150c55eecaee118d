"""FasterTransformer: request-level batching. When nothing is running, admit up to the batch
size cap of waiting requests (FCFS, whole prompts within the token budget, KV for prompt and
full output reserved) and prefill them together; then decode until every one has finished,
admitting nothing new in between."""
from sim.schedulers.common import (
    RESERVE_OUTPUT,
    Batch,
    Scheduler,
    admit_waiting,
    decode_batch,
)


class FasterTransformerScheduler(Scheduler):
    reserves_output = True

    def schedule(self, now, running, waiting, blocks):
        if running:
            return decode_batch(running, waiting, blocks)
        prefills = admit_waiting(running, waiting, blocks, self.sc.max_tokens_per_batch, self.sc.max_num_seqs,
                                 chunked=False, reserve=RESERVE_OUTPUT, use_watermark=False)
        return Batch(prefills, []) if prefills else None
