"""Request streams: arrival times and prompt/output lengths, generated lazily and seedably.

``requests(wl, seed, max_request_tokens, data_dir)`` yields ``(arrived_at_s, prefill_tokens,
decode_tokens)`` in arrival order, so a million-request run never holds them all. A request
longer than ``max_request_tokens`` (prompt + output) is, per ``workload.too_long``, clipped (the
longer side is shortened; each keeps at least half of the limit if it asked for that much;
counted in ``counts["clipped"]``) or refused before the run starts ("error"), as a server with
that ``max_model_len`` would refuse it.
"""
from __future__ import annotations

import bisect
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np

from conf import ConfigError, warn_once
from sim.config import ARRIVALS, LENGTHS, TOO_LONG

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
    try:   # ParquetFile, not read_table: that imports pyarrow.dataset (0.15 s) for nothing
        table = pq.ParquetFile(path).read()
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ConfigError(f"trace {path} is not a readable parquet file "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    cols = set(table.column_names)
    missing = {"num_prefill_tokens", "num_decode_tokens"} - cols
    if missing:
        raise ConfigError(f"trace {path} lacks columns {sorted(missing)}")
    prefill = column(table, "num_prefill_tokens", np.int64)
    decode = column(table, "num_decode_tokens", np.int64)
    arrivals = None
    if need_arrivals:
        if "arrived_at_s" not in cols:
            raise ConfigError(f"trace {path} has no arrived_at_s column; use workload.arrival=poisson")
        arrivals = column(table, "arrived_at_s", np.float64)
        if np.isnan(arrivals).any():
            raise ConfigError(f"trace {path} has no arrival times (NaN arrived_at_s); "
                              f"use workload.arrival=poisson")
    return arrivals, prefill, decode


def column(table, name: str, dtype) -> np.ndarray:
    """A numeric parquet column as numpy. pyarrow's to_numpy imports pandas (0.15 s), so
    null-free chunks are read from their buffers; nulls (None) become NaN via to_numpy."""
    import pyarrow as pa
    col, want = table[name], pa.from_numpy_dtype(np.dtype(dtype))
    if col.type != want:
        col = col.cast(want)          # imports pyarrow.compute (0.05 s): only when needed
    if col.null_count:
        return col.to_numpy().astype(dtype)
    parts = [np.frombuffer(c.buffers()[1], dtype=dtype)[c.offset:c.offset + len(c)] for c in col.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def validate(wl) -> None:
    if wl.arrival not in ARRIVALS:
        raise ConfigError(f"workload.arrival={wl.arrival!r}; choose one of {list(ARRIVALS)}")
    if wl.lengths not in LENGTHS:
        raise ConfigError(f"workload.lengths={wl.lengths!r}; choose one of {list(LENGTHS)}")
    if wl.too_long not in TOO_LONG:
        raise ConfigError(f"workload.too_long={wl.too_long!r}; choose one of {list(TOO_LONG)}")
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


def requests(wl, seed: int, max_request_tokens: int, data_dir: str = "data",
             counts: dict | None = None) -> Iterator[tuple[float, int, int]]:
    """``wl.num_requests`` (arrived_at_s, prefill_tokens, decode_tokens), arrival-ordered, as a
    lazy iterator; config and trace errors are raised here, before anything is generated.
    ``counts["clipped"]`` (when given) counts the requests clipped to ``max_request_tokens``."""
    validate(wl)
    trace_arrivals = trace_prefill = trace_decode = None
    if wl.lengths == "trace":
        trace_arrivals, trace_prefill, trace_decode = load_trace(wl.trace, data_dir, wl.arrival == "trace")
    if max_request_tokens < 2:
        raise ConfigError(f"max_request_tokens={max_request_tokens} must be >= 2")
    if wl.too_long == "error":
        _refuse_too_long(wl, max_request_tokens, trace_prefill, trace_decode)
    if wl.arrival == "trace" and wl.num_requests > len(trace_prefill):
        passes = -(-wl.num_requests // len(trace_prefill))
        warn_once(("cycled", wl.trace, wl.num_requests),
                  f"workload: trace {wl.trace} has {len(trace_prefill)} rows; workload.num_requests="
                  f"{wl.num_requests} replays it {passes} times, each pass shifted by the trace's span", "sim")
    arrival_rng, length_rng = random.Random(seed * 2 + 1), random.Random(seed * 2 + 2)
    arrivals = _arrival_times(wl, arrival_rng, trace_arrivals)
    lengths = _lengths(wl, length_rng, trace_prefill, trace_decode, in_order=wl.arrival == "trace")
    counts = {} if counts is None else counts
    counts["clipped"] = 0
    return _stream(wl.num_requests, arrivals, lengths, max_request_tokens, counts)


def _refuse_too_long(wl, limit: int, trace_prefill, trace_decode) -> None:
    """workload.too_long=error: ConfigError when any request could exceed ``limit`` tokens."""
    fix = "lower the lengths, raise workload.max_request_tokens, or set workload.too_long=clip"
    if wl.lengths == "fixed" and wl.prefill_tokens + wl.decode_tokens > limit:
        raise ConfigError(f"workload: requests of {wl.prefill_tokens} + {wl.decode_tokens} tokens "
                          f"exceed the {limit}-token request limit; {fix}")
    if wl.lengths in ("uniform", "zipf") and wl.max_tokens > limit:
        raise ConfigError(f"workload.max_tokens={wl.max_tokens} exceeds the {limit}-token request "
                          f"limit; {fix}")
    if wl.lengths == "trace":
        over = int(((trace_prefill + trace_decode) > limit).sum())
        if over:
            raise ConfigError(f"workload: {over} of the {len(trace_prefill)} rows of trace {wl.trace} "
                              f"exceed the {limit}-token request limit; {fix}")


def _stream(num_requests, arrivals, lengths, max_request_tokens, counts):
    for _ in range(num_requests):
        t = next(arrivals)
        prefill, decode = next(lengths)
        prefill, decode = max(1, int(prefill)), max(1, int(decode))
        if prefill + decode > max_request_tokens:
            prefill = min(prefill, max_request_tokens - min(decode, max_request_tokens // 2))
            decode = min(decode, max_request_tokens - prefill)
            counts["clipped"] += 1
        yield t, prefill, decode


def mean_gap_s(wl) -> float:
    return 1.0 / wl.qps if wl.arrival in ("poisson", "gamma") else math.nan
