"""Request streams: arrival times and prompt/output lengths, generated lazily and seedably.

``requests(wl, seed, max_request_tokens, data_dir)`` yields ``(arrived_at_s, prefill_tokens,
decode_tokens)`` in arrival order, so a million-request run never holds them all. Lengths are
clipped so prompt + output <= ``max_request_tokens`` (the longer side is shortened; each keeps
at least half of the limit if it asked for that much), as a server with that ``max_model_len``
would need.
"""
from __future__ import annotations

import bisect
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np

from conf import ConfigError
from sim.config import ARRIVALS, LENGTHS

REPO = Path(__file__).resolve().parents[1]


def resolve_data_dir(data_dir: str) -> Path:
    """``data_dir`` as given, else relative to the repository (so the CLI works from anywhere)."""
    p = Path(data_dir)
    return p if p.exists() or p.is_absolute() else REPO / data_dir


def trace_path(trace: str, data_dir: str) -> Path:
    if trace.endswith(".parquet"):
        return Path(trace)
    return resolve_data_dir(data_dir) / "traces" / f"{trace}.parquet"


def load_trace(trace: str, data_dir: str, need_arrivals: bool) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(arrived_at_s or None, prefill tokens, decode tokens) of a trace parquet."""
    import pyarrow.parquet as pq
    if not trace:
        raise ConfigError("workload.lengths=trace needs workload.trace=<name in data/traces or a .parquet path>")
    path = trace_path(trace, data_dir)
    if not path.exists():
        avail = sorted(p.stem for p in path.parent.glob("*.parquet")) if path.parent.exists() else []
        raise ConfigError(f"trace file {path} not found; available traces: {avail or 'none'}")
    table = pq.read_table(path)
    cols = set(table.column_names)
    missing = {"num_prefill_tokens", "num_decode_tokens"} - cols
    if missing:
        raise ConfigError(f"trace {path} lacks columns {sorted(missing)}")
    prefill = table["num_prefill_tokens"].to_numpy().astype(np.int64)
    decode = table["num_decode_tokens"].to_numpy().astype(np.int64)
    arrivals = None
    if need_arrivals:
        if "arrived_at_s" not in cols:
            raise ConfigError(f"trace {path} has no arrived_at_s column; use workload.arrival=poisson")
        arrivals = table["arrived_at_s"].to_numpy(zero_copy_only=False).astype(np.float64)
        if np.isnan(arrivals).any():
            raise ConfigError(f"trace {path} has no arrival times (NaN arrived_at_s); "
                              f"use workload.arrival=poisson")
    return arrivals, prefill, decode


def validate(wl) -> None:
    if wl.arrival not in ARRIVALS:
        raise ConfigError(f"workload.arrival={wl.arrival!r}; choose one of {list(ARRIVALS)}")
    if wl.lengths not in LENGTHS:
        raise ConfigError(f"workload.lengths={wl.lengths!r}; choose one of {list(LENGTHS)}")
    if wl.num_requests < 1:
        raise ConfigError(f"workload.num_requests={wl.num_requests} must be >= 1")
    if wl.arrival in ("poisson", "gamma") and not wl.qps > 0:
        raise ConfigError(f"workload.qps={wl.qps} must be > 0 for {wl.arrival} arrivals")
    if wl.arrival == "gamma" and not wl.cv > 0:
        raise ConfigError(f"workload.cv={wl.cv} must be > 0")
    if wl.arrival == "trace" and wl.lengths != "trace":
        raise ConfigError("workload.arrival=trace replays a trace's rows; it needs workload.lengths=trace")
    if wl.lengths in ("uniform", "zipf") and not 2 <= wl.min_tokens <= wl.max_tokens:
        raise ConfigError(f"workload.min_tokens={wl.min_tokens}, max_tokens={wl.max_tokens}: "
                          f"need 2 <= min_tokens <= max_tokens")
    if wl.lengths == "fixed" and (wl.prefill_tokens < 1 or wl.decode_tokens < 1):
        raise ConfigError("workload.prefill_tokens and decode_tokens must be >= 1")


def _arrival_times(wl, rng: random.Random, trace_arrivals) -> Iterator[float]:
    t = 0.0
    if wl.arrival == "static":
        while True:
            yield 0.0
    elif wl.arrival == "poisson":
        while True:
            t += rng.expovariate(wl.qps)
            yield t
    elif wl.arrival == "gamma":
        shape = 1.0 / (wl.cv * wl.cv)
        scale = 1.0 / (wl.qps * shape)
        while True:
            t += rng.gammavariate(shape, scale)
            yield t
    else:  # trace: recorded times from the first row; cycles with the trace's span as offset
        base = trace_arrivals - trace_arrivals[0]
        span = float(base[-1]) + (float(np.diff(base).mean()) if len(base) > 1 else 1.0)
        offset = 0.0
        while True:
            for x in base:
                yield (offset + float(x)) * wl.trace_time_scale
            offset += span


def _lengths(wl, rng: random.Random, trace_prefill, trace_decode, in_order: bool) -> Iterator[tuple[int, int]]:
    if wl.lengths == "fixed":
        while True:
            yield wl.prefill_tokens, wl.decode_tokens
    if wl.lengths == "trace":
        pre, dec = trace_prefill.tolist(), trace_decode.tolist()
        n = len(pre)
        i = 0
        while True:
            j = i % n if in_order else rng.randrange(n)
            i += 1
            yield pre[j], dec[j]
    ratio = wl.prefill_decode_ratio
    if wl.lengths == "uniform":
        draw = lambda: rng.randint(wl.min_tokens, wl.max_tokens)  # noqa: E731
    else:  # zipf over the totals min..max, rank 1 = shortest
        totals = range(wl.min_tokens, wl.max_tokens + 1)
        weights = [1.0 / (r ** wl.zipf_theta) for r in range(1, len(totals) + 1)]
        cdf, acc = [], 0.0
        for w in weights:
            acc += w
            cdf.append(acc)
        draw = lambda: wl.min_tokens + min(bisect.bisect_left(cdf, rng.random() * acc), len(cdf) - 1)  # noqa: E731
    while True:
        total = draw()
        decode = max(1, int(round(total / (1.0 + ratio))))
        yield max(1, total - decode), decode


def requests(wl, seed: int, max_request_tokens: int, data_dir: str = "data") -> Iterator[tuple[float, int, int]]:
    """``wl.num_requests`` (arrived_at_s, prefill_tokens, decode_tokens), arrival-ordered, as a
    lazy iterator; config and trace errors are raised here, before anything is generated."""
    validate(wl)
    trace_arrivals = trace_prefill = trace_decode = None
    if wl.lengths == "trace":
        trace_arrivals, trace_prefill, trace_decode = load_trace(wl.trace, data_dir, wl.arrival == "trace")
    if max_request_tokens < 2:
        raise ConfigError(f"max_request_tokens={max_request_tokens} must be >= 2")
    arrival_rng, length_rng = random.Random(seed * 2 + 1), random.Random(seed * 2 + 2)
    arrivals = _arrival_times(wl, arrival_rng, trace_arrivals)
    lengths = _lengths(wl, length_rng, trace_prefill, trace_decode, in_order=wl.arrival == "trace")
    return _stream(wl.num_requests, arrivals, lengths, max_request_tokens)


def _stream(num_requests, arrivals, lengths, max_request_tokens):
    for _ in range(num_requests):
        t = next(arrivals)
        prefill, decode = next(lengths)
        prefill, decode = max(1, int(prefill)), max(1, int(decode))
        if prefill + decode > max_request_tokens:
            prefill = min(prefill, max_request_tokens - min(decode, max_request_tokens // 2))
            decode = min(decode, max_request_tokens - prefill)
        yield t, prefill, decode


def mean_gap_s(wl) -> float:
    return 1.0 / wl.qps if wl.arrival in ("poisson", "gamma") else math.nan
