"""vLLM v1 style: one token budget per iteration shared by running requests first (decodes and
unfinished prompt chunks, in arrival order) and then new requests, whose prompts are chunked to
fit. KV blocks are allocated per chunk; when they run out the newest running request is
preempted (recompute), and no new request is admitted in that iteration."""
from sim.schedulers.common import Batch, make_room


class VllmV1Scheduler:
    stable_decode = True
    chunked = True

    def __init__(self, sc):
        self.sc = sc

    def schedule(self, now, running, waiting, blocks):
        budget = self.sc.max_tokens_per_batch
        prefills, decodes = [], []
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            if r.busy:
                i += 1
                continue
            left = r.prefill_target - r.prefilled
            n = min(left, budget) if left > 0 else 1
            nb = blocks.need(r, n)
            if nb > blocks.free:
                preempted = True
                if not make_room(running, i, nb, waiting, blocks):
                    break
            blocks.allocate(r, nb)
            (prefills.append((r, n)) if left > 0 else decodes.append(r))
            budget -= n
            i += 1
        while not preempted and waiting and budget > 0 and len(running) < self.sc.max_num_seqs:
            r = waiting[0]
            n = min(r.prefill_target - r.prefilled, budget)
            nb = blocks.need(r, n)
            if not blocks.can_admit(nb):
                break
            waiting.popleft()
            blocks.allocate(r, nb)
            running.append(r)
            prefills.append((r, n))
            budget -= n
        return Batch(prefills, decodes) if prefills or decodes else None
