"""LightLLM: prefill-first like vLLM v0, but a new request is admitted only if the projected
peak KV use - every running request and the candidate grown to its full output, finishing in
order of remaining output - fits the cache, so decodes never run out of blocks."""
from sim.schedulers.common import Batch, schedule_decodes


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


class LightLLMScheduler:
    stable_decode = True
    chunked = False

    def __init__(self, sc):
        self.sc = sc

    def schedule(self, now, running, waiting, blocks):
        if waiting:
            items = [future_kv(r) for r in running]
            budget, prefills = self.sc.max_tokens_per_batch, []
            while waiting and len(running) < self.sc.max_num_seqs:
                r = waiting[0]
                n = r.prefill_target - r.prefilled
                if n > budget:
                    break
                cand = items + [future_kv(r)]
                nb = blocks.need(r, n)
                if projected_peak_blocks(cand, blocks.block_size) > blocks.capacity or nb > blocks.free:
                    break
                items = cand
                waiting.popleft()
                blocks.allocate(r, nb)
                running.append(r)
                prefills.append((r, n))
                budget -= n
            if prefills:
                return Batch(prefills, [])
        decodes = []
        schedule_decodes(running, waiting, blocks, decodes)
        return Batch([], decodes) if decodes else None
