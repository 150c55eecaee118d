"""LightLLM: prefill-first like vLLM v0, but a new request is admitted only if the projected
peak KV use - every running request and the candidate grown to its full output, finishing in
order of remaining output - fits the cache, so decodes never run out of blocks."""
from sim.schedulers.common import (
    RESERVE_PROMPT,
    Batch,
    Scheduler,
    admit_waiting,
    decode_batch,
)


def projected_peak_blocks(items: list[tuple[int, int]], block_size: int) -> int:
    """items: (KV tokens now, tokens still to add). Peak of the total KV over future steps,
    rounded up per request (each request's own rounding is bounded by block_size - 1)."""
    items = sorted(items, key=lambda x: x[1])
    suffix_kv, peak = 0, 0
    for k in range(len(items) - 1, -1, -1):
        suffix_kv += items[k][0]
        alive = len(items) - k
        tokens = suffix_kv + alive * items[k][1] + alive * (block_size - 1)
        peak = max(peak, tokens)
    return -(-peak // block_size)


def future_kv(r) -> tuple[int, int]:
    """(KV tokens once its pending prompt is in, tokens its decodes will still add)."""
    left = r.prefill_target - r.prefilled
    return r.kv + left, r.output - r.decoded - (1 if left > 0 else 0)


class LightLLMScheduler(Scheduler):
    # A waiting request's projected peak falls as the running requests decode (they near their
    # end, it has not started), so it may be admitted in the middle of a decode stretch.
    stable_while_waiting = False

    def schedule(self, now, running, waiting, blocks):
        if waiting:
            items = [future_kv(r) for r in running]

            def peak_fits(r, n):
                kv = future_kv(r)
                if projected_peak_blocks(items + [kv], blocks.block_size) > blocks.capacity:
                    return False
                items.append(kv)
                return True

            prefills = admit_waiting(running, waiting, blocks, self.sc.max_tokens_per_batch, self.sc.max_num_seqs,
                                     chunked=False, reserve=RESERVE_PROMPT, use_watermark=False, accept=peak_fits)
            if prefills:
                return Batch(prefills, [])
        return decode_batch(running, waiting, blocks)
