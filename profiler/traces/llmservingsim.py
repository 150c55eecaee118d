"""LLMServingSim workload JSONL (casys-kaist/LLMServingSim ``dataset/*.jsonl``): one request per
line with ``input_toks``, ``output_toks``, ``arrival_time_ns`` and the prompt's ``input_tok_ids``.
The prefix ids are computed exactly from the token ids: one chained id per full block of
``hash_block_tokens`` (default 16, vLLM's default block size) prompt tokens, so two requests
get the same id at block i exactly when their first i + 1 blocks hold the same tokens."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from profiler.traces.common import Trace, bad, check_counts, relative_arrivals, token_block_hashes

REQUIRED = ("input_toks", "output_toks", "arrival_time_ns", "input_tok_ids")
OPTIONS = {"hash_block_tokens": 16, "drop_empty": False}
UPSTREAM = {"repo": "https://github.com/casys-kaist/LLMServingSim", "licence": "MIT"}


def detect(path, head: str) -> bool:
    return '"input_tok_ids"' in head or ('"arrival_time_ns"' in head and '"input_toks"' in head)


def read_jsonl(path, where: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise bad(where, f"line {n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise bad(where, f"line {n}: expected a JSON object per line, found {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        raise bad(where, "no requests")
    return rows


def read(path, opts: dict) -> Trace:
    where, block = path.name, int(opts["hash_block_tokens"])
    if block < 1:
        raise bad("hash_block_tokens", f"must be >= 1, got {block}")
    rows = read_jsonl(path, where)
    lines = np.array([n for n, _ in rows])
    label = lambda i: f"line {lines[i]}"   # noqa: E731
    hashes, pre, dec, t = [], [], [], []
    for i, (n, r) in enumerate(rows):
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise bad(where, f"line {n}: missing key(s) {', '.join(missing)}; an LLMServingSim request has "
                             f"{', '.join(REQUIRED)}")
        ids = r["input_tok_ids"]
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise bad(where, f"line {n}: input_tok_ids must be a list of integer token ids")
        if len(ids) != r["input_toks"]:
            raise bad(where, f"line {n}: input_toks={r['input_toks']} but input_tok_ids holds {len(ids)} ids "
                             f"(missing token ids)")
        pre.append(r["input_toks"])
        dec.append(r["output_toks"])
        t.append(r["arrival_time_ns"])
        hashes.append(token_block_hashes(ids, block))
    meta = {"description": "LLMServingSim request trace with prompt token ids", "upstream": UPSTREAM,
            "assumptions": [f"prefix ids: exact, from input_tok_ids, one per full {block}-token block, chained"]}
    frame = pd.DataFrame({"num_prefill_tokens": pre, "num_decode_tokens": dec, "prefix_hashes": hashes})
    frame = check_counts(frame, where, label, opts["drop_empty"], meta)
    secs = pd.to_numeric(pd.Series(t), errors="coerce").to_numpy(float)[frame.index] / 1e9
    arr, _ = relative_arrivals(secs, where, lambda i: label(frame.index[i]), sort=False)
    frame = frame.reset_index(drop=True)
    frame.insert(0, "arrived_at_s", arr)
    meta["assumptions"].append("arrivals: arrival_time_ns / 1e9, from the first request")
    return Trace(frame, meta, block)
