"""Streaming metric accumulation: exact per-request columns when kept, fixed-size log
histograms always (so a million-request run summarises in bounded memory).

Per request (vLLM's names): ttft_s (arrival -> first token), tpot_s ((e2e - ttft) / (output
tokens - 1)), e2e_s, norm_e2e_s (e2e / output tokens), sched_delay_s (arrival -> first
scheduled). Per token: itl_s, the gap between consecutive output tokens of one request
(TBT). Stats: mean, p50, p90, p99; means are exact, percentiles are exact when requests are
kept and within 1.2 % (histogram bin width) otherwise.

Prefix caching (per replica in ``replica_rows``, summed in the summary): prefix_hit_rate
(cached prompt tokens / prompt tokens, over first admissions, as vLLM counts its hit rate),
prefix_block_hit_rate (the same in full blocks), prefill_tokens_saved (prompt tokens not
computed, every admission incl. a preempted request's return), kv_evictions (cached blocks
overwritten); all 0 without caching. Per request: num_cached_tokens (vLLM's name).
"""
from __future__ import annotations

import math
from array import array

import numpy as np

REQUEST_METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s", "norm_e2e_s", "sched_delay_s")
STATS = ("mean", "p50", "p90", "p99")
COLUMNS = ("request_id", "replica", "arrived_at_s", "num_prefill_tokens", "num_decode_tokens",
           "first_scheduled_s", "first_token_s", "completed_at_s", "num_preemptions", "num_generated_tokens",
           "num_cached_tokens")
PREFIX_KEYS = ("prefix_hit_rate", "prefix_block_hit_rate", "prefill_tokens_saved", "kv_evictions")


class LogHistogram:
    """Weighted histogram of positive values on log-spaced bins (200 per decade, 1e-7..1e7 s).

    ``add`` only appends to a buffer (the simulator's hot loop calls it); the buffer is binned
    with numpy every 64k values, so memory stays fixed however long the run."""

    BINS_PER_DECADE = 200
    LO = -7.0
    BUFFER = 1 << 16

    def __init__(self):
        self.counts = np.zeros(int(14 * self.BINS_PER_DECADE) + 2)
        self.count = 0.0
        self.total = 0.0
        self.total_sq = 0.0           # for std (vLLM-format output reports std of ITL)
        self.min = math.inf
        self.max = -math.inf
        self._values = array("d")
        self._weights = array("d")

    def add(self, x: float, weight: float = 1.0) -> None:
        self._values.append(x)
        self._weights.append(weight)
        if len(self._values) >= self.BUFFER:
            self._flush()

    def add_many(self, values: list, weight: float = 1.0) -> None:
        self._values.extend(values)
        self._weights.extend([weight] * len(values))
        if len(self._values) >= self.BUFFER:
            self._flush()

    def _flush(self) -> None:
        if not len(self._values):
            return
        v = np.frombuffer(self._values, dtype=np.float64)
        w = np.frombuffer(self._weights, dtype=np.float64)
        ok = ~np.isnan(v)          # NaN: undefined for this request (TPOT of a 1-token output)
        v, w = v[ok], w[ok]
        if len(v):
            with np.errstate(divide="ignore"):
                idx = np.where(v > 1e-7, ((np.log10(np.maximum(v, 1e-300)) - self.LO)
                                          * self.BINS_PER_DECADE).astype(np.int64) + 1, 0)
            idx = np.clip(idx, 0, len(self.counts) - 1)
            self.counts += np.bincount(idx, weights=w, minlength=len(self.counts))
            self.count += float(w.sum())
            self.total += float((v * w).sum())
            self.total_sq += float((v * v * w).sum())
            self.min = min(self.min, float(v.min()))
            self.max = max(self.max, float(v.max()))
        self._values = array("d")
        self._weights = array("d")

    def mean(self) -> float:
        self._flush()
        return self.total / self.count if self.count else math.nan

    def std(self) -> float:
        """Population standard deviation (exact, from running sums)."""
        m = self.mean()
        return math.sqrt(max(self.total_sq / self.count - m * m, 0.0)) if self.count else math.nan

    def quantile(self, q: float) -> float:
        self._flush()
        if not self.count:
            return math.nan
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, q * self.count, side="left"))
        mid = 10 ** ((i - 0.5) / self.BINS_PER_DECADE + self.LO) if i > 0 else 0.0
        return float(min(max(mid, self.min), self.max))


class Metrics:
    """Collects completed requests and per-iteration figures of one simulation."""

    def __init__(self, keep_requests: bool, client_delay_s: float = 0.0):
        self.keep = keep_requests
        # The serving frontend's per-request latency (engine.frontend_latency_us): the client sees
        # the first and the last token this much later than the engine makes them.
        self.client_delay_s = client_delay_s
        self.cols = {c: array("d") for c in COLUMNS} if keep_requests else None
        self.hist = {m: LogHistogram() for m in REQUEST_METRICS}
        self.num_requests = 0
        self.num_preemptions = 0
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.first_arrival_s = math.inf
        self.last_completion_s = 0.0
        # per-iteration sums (for means, MFU/MBU)
        self.iterations = 0
        self.batch_size_sum = 0
        self.tokens = 0
        self.sampled = 0
        self.attn_pairs = 0
        self.kv_read_tokens = 0

    def add_itl(self, gap_s: float, weight: float = 1.0) -> None:
        self.hist["itl_s"].add(gap_s, weight)

    def complete(self, r, now: float) -> None:
        self.num_requests += 1
        self.num_preemptions += r.preemptions
        self.output_tokens += r.output
        self.prompt_tokens += r.prompt
        self.last_completion_s = max(self.last_completion_s, now)
        self.first_arrival_s = min(self.first_arrival_s, r.arrival_s)
        d = self.client_delay_s
        now += d
        first_token_s = r.first_token_s + d
        e2e = now - r.arrival_s
        ttft = first_token_s - r.arrival_s
        h = self.hist
        h["ttft_s"].add(ttft)
        h["e2e_s"].add(e2e)
        h["norm_e2e_s"].add(e2e / r.output)
        h["sched_delay_s"].add(r.first_sched_s - r.arrival_s)
        if r.output > 1:
            h["tpot_s"].add((now - first_token_s) / (r.output - 1))
        if self.keep:
            c = self.cols
            c["request_id"].append(r.id)
            c["replica"].append(r.replica)
            c["arrived_at_s"].append(r.arrival_s)
            c["num_prefill_tokens"].append(r.prompt)
            c["num_decode_tokens"].append(r.output)
            c["first_scheduled_s"].append(r.first_sched_s)
            c["first_token_s"].append(first_token_s)
            c["completed_at_s"].append(now)
            c["num_preemptions"].append(r.preemptions)
            c["num_generated_tokens"].append(r.decoded)
            c["num_cached_tokens"].append(r.cached_tokens)

    def request_columns(self) -> dict[str, np.ndarray] | None:
        """Per-request columns (numpy, sorted by request id), None when requests are not kept.
        Plain arrays: the CLI writes them to parquet without importing pandas."""
        if not self.keep:
            return None
        cols = {c: np.frombuffer(self.cols[c], dtype=np.float64) for c in COLUMNS}
        for c in ("request_id", "replica", "num_prefill_tokens", "num_decode_tokens", "num_preemptions",
                  "num_generated_tokens", "num_cached_tokens"):
            cols[c] = cols[c].astype(np.int64)
        cols["ttft_s"] = cols["first_token_s"] - cols["arrived_at_s"]
        cols["e2e_s"] = cols["completed_at_s"] - cols["arrived_at_s"]
        with np.errstate(divide="ignore", invalid="ignore"):
            cols["tpot_s"] = np.where(cols["num_decode_tokens"] > 1,
                                      (cols["completed_at_s"] - cols["first_token_s"])
                                      / np.maximum(cols["num_decode_tokens"] - 1, 1), np.nan)
        cols["norm_e2e_s"] = cols["e2e_s"] / cols["num_decode_tokens"]
        cols["sched_delay_s"] = cols["first_scheduled_s"] - cols["arrived_at_s"]
        order = np.argsort(cols["request_id"], kind="stable")
        return {c: v[order] for c, v in cols.items()}

    def requests_frame(self):
        """Per-request DataFrame sorted by request id (None when requests are not kept)."""
        cols = self.request_columns()
        if cols is None:
            return None
        import pandas as pd
        return pd.DataFrame(cols)

    def summary(self, requests=None) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in REQUEST_METRICS:
            h = self.hist[m]
            if requests is not None and m in requests:
                v = np.asarray(requests[m], dtype=np.float64)
                v = v[~np.isnan(v)]
                vals = [float(v.mean()) if len(v) else math.nan] + \
                       [float(np.percentile(v, p)) if len(v) else math.nan for p in (50, 90, 99)]
            else:
                vals = [h.mean(), h.quantile(0.5), h.quantile(0.9), h.quantile(0.99)]
            out.update({f"{m}_{s}": float(v) for s, v in zip(STATS, vals)})
            out[f"{m}_std"] = float(h.std())   # exact (running sums), kept or not
        sim_time = max(self.last_completion_s - min(self.first_arrival_s, self.last_completion_s), 0.0)
        out["num_requests"] = float(self.num_requests)
        out["num_preemptions"] = float(self.num_preemptions)
        out["sim_time_s"] = float(self.last_completion_s)
        out["throughput_rps"] = self.num_requests / sim_time if sim_time > 0 else math.nan
        out["throughput_tok_s"] = self.output_tokens / sim_time if sim_time > 0 else math.nan
        out["batch_size_mean"] = self.batch_size_sum / self.iterations if self.iterations else math.nan
        out["num_iterations"] = float(self.iterations)
        return out


def prefix_stats(caches: list) -> dict[str, float]:
    """The PREFIX_KEYS figures over these replicas' block managers (0 without caching)."""
    def total(name: str) -> int:
        return sum(getattr(c, name, 0) for c in caches)
    queries, query_blocks = total("query_tokens"), total("query_blocks")
    return {"prefix_hit_rate": total("hit_tokens") / queries if queries else 0.0,
            "prefix_block_hit_rate": total("hit_blocks") / query_blocks if query_blocks else 0.0,
            "prefill_tokens_saved": float(total("saved_tokens")),
            "kv_evictions": float(total("evictions"))}


def replica_rows(replicas: list, end_s: float) -> list[dict]:
    """One row per replica: requests routed to it, KV use (time-weighted mean, peak) and its
    prefix cache figures."""
    rows = []
    for r in replicas:
        cap = r.blocks.capacity
        rows.append({"replica": r.idx, "num_requests": r.routed,
                     "kv_util_mean": r.kv_area / (cap * end_s) if end_s > 0 else math.nan,
                     "kv_util_peak": r.peak_blocks / cap, **prefix_stats([r.blocks])})
    return rows
