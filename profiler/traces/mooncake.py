"""Mooncake traces (kvcache-ai/Mooncake ``FAST25-release/traces/*.jsonl``) and vLLM's
``timed_trace`` JSONL: one request per line with ``timestamp``, ``input_length``,
``output_length`` and ``hash_ids``, one id per ``hash_block_tokens``-token block of the prompt
(Mooncake: 512 tokens, timestamps in ms; timed_trace: vLLM's --timed-trace-chunk-hash-size,
default 16, timestamps in s). The last id may cover a partial block; opcast keeps the ids of
the full blocks. The ids are re-chained (each hashed with its predecessor) so equal ids mean
equal prefixes even if a source reused an id at another position."""
from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.traces.common import Trace, bad, chain_hashes, check_counts, relative_arrivals
from profiler.traces.llmservingsim import read_jsonl

REQUIRED = ("timestamp", "input_length", "output_length", "hash_ids")
OPTIONS = {"hash_block_tokens": 512, "timestamp_unit": "ms", "drop_empty": False}
TIMED_TRACE_OPTIONS = {"hash_block_tokens": 16, "timestamp_unit": "s", "drop_empty": False}
UNITS = {"ms": 1e-3, "s": 1.0, "us": 1e-6, "ns": 1e-9}
UPSTREAM = {"repo": "https://github.com/kvcache-ai/Mooncake", "path": "FAST25-release/traces",
            "licence": "Apache-2.0 (repository licence)"}


def _first(head: str) -> str:
    return head.splitlines()[0] if head else ""


def detect(path, head: str) -> bool:
    """Mooncake: integer timestamps (ms)."""
    import json
    try:
        r = json.loads(_first(head))
    except ValueError:
        return False
    return isinstance(r, dict) and "hash_ids" in r and "input_length" in r and isinstance(r.get("timestamp"), int)


def detect_timed_trace(path, head: str) -> bool:
    """vLLM timed_trace: float timestamps (s)."""
    import json
    try:
        r = json.loads(_first(head))
    except ValueError:
        return False
    return isinstance(r, dict) and "input_length" in r and isinstance(r.get("timestamp"), float)


def read(path, opts: dict) -> Trace:
    where, block = path.name, int(opts["hash_block_tokens"])
    if block < 1:
        raise bad("hash_block_tokens", f"must be >= 1, got {block}")
    if opts["timestamp_unit"] not in UNITS:
        raise bad("timestamp_unit", f"{opts['timestamp_unit']!r}; choose one of {list(UNITS)}")
    rows = read_jsonl(path, where)
    lines = np.array([n for n, _ in rows])
    label = lambda i: f"line {lines[i]}"   # noqa: E731
    pre, dec, t, hashes = [], [], [], []
    for n, r in rows:
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise bad(where, f"line {n}: missing key(s) {', '.join(missing)}; a request has {', '.join(REQUIRED)}")
        ids = r["hash_ids"]
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise bad(where, f"line {n}: hash_ids must be a list of integers")
        length = r["input_length"]
        want = -(-int(length) // block) if isinstance(length, int) else None
        if want is not None and len(ids) != want:
            raise bad(where, f"line {n}: input_length={length} needs {want} hash_ids at {block} tokens per block, "
                             f"found {len(ids)} (wrong hash_block_tokens?)")
        pre.append(length)
        dec.append(r["output_length"])
        t.append(r["timestamp"])
        full = int(length) // block if isinstance(length, int) else 0
        hashes.append(chain_hashes(int(x).to_bytes(8, "little", signed=True) for x in ids[:full]))
    meta = {"description": "request trace with per-block prefix ids (Mooncake / vLLM timed_trace format)",
            "assumptions": [f"prefix ids: the source's hash_ids of the full {block}-token blocks, re-chained",
                            f"arrivals: timestamp in {opts['timestamp_unit']}, from the first request"]}
    frame = pd.DataFrame({"num_prefill_tokens": pre, "num_decode_tokens": dec, "prefix_hashes": hashes})
    frame = check_counts(frame, where, label, opts["drop_empty"], meta)
    secs = pd.to_numeric(pd.Series(t), errors="coerce").to_numpy(float)[frame.index] * UNITS[opts["timestamp_unit"]]
    arr, _ = relative_arrivals(secs, where, lambda i: label(frame.index[i]), sort=False)
    frame = frame.reset_index(drop=True)
    frame.insert(0, "arrived_at_s", arr)
    return Trace(frame, meta, block)


def read_mooncake(path, opts: dict) -> Trace:
    tr = read(path, opts)
    tr.meta.update(description="Mooncake (Kimi) production request trace with 512-token prefix block ids "
                               "(FAST'25)", upstream=UPSTREAM)
    return tr
