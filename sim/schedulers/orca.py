"""Orca: iteration-level scheduling. Each iteration runs every running request's next token
together with whole new prompts (FCFS) that fit the token budget and batch size cap; a new
request's KV for its prompt and its full output is reserved on admission, so nothing is
ever preempted."""
from sim.schedulers.common import (
    RESERVE_OUTPUT,
    Batch,
    Scheduler,
    admit_waiting,
    schedule_running,
)


class OrcaScheduler(Scheduler):
    reserves_output = True

    def schedule(self, now, running, waiting, blocks):
        decodes = []
        schedule_running(running, waiting, blocks, decodes)
        prefills = admit_waiting(running, waiting, blocks, self.sc.max_tokens_per_batch - len(decodes),
                                 self.sc.max_num_seqs, chunked=False, reserve=RESERVE_OUTPUT,
                                 use_watermark=False) if waiting else []
        return Batch(prefills, decodes) if prefills or decodes else None
