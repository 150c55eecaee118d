"""LMBench per-request CSV (LMCache's serving benchmark as llm-d-benchmark runs it): one row per
request with ``prompt_tokens``, ``generation_tokens``, ``launch_time`` (unix s) and, for the
multi-round QA workload, ``user_id`` and ``question_id``. The measured columns (``ttft``,
``generation_time``, ``finish_time``) are not copied: they are the engine's answer.

Multi-round QA (LMCache's multi-round-qa benchmark): every user is one session; question k of a
user resends the whole conversation so far. From the columns alone:
  - session_id = user_id, turn = question_id - 1;
  - assumed: a turn's prompt starts with the previous turn's prompt followed by its answer
    (prompt_k >= prompt_{k-1} + generation_{k-1}; in the llm-d logs prompt_k = prompt_{k-1} +
    generation_{k-1} + 29 for every turn), so block i of a user's prompts is the same content
    in every turn: the prefix ids are the user's token stream cut into ``hash_block_tokens``
    blocks. A turn that breaks the inequality starts a new stream (counted in provenance);
  - assumed: users share nothing with each other, unless ``shared_prefix_tokens=N`` says the
    first N tokens (LMBench's shared system prompt) are common to all;
  - arrivals are the recorded launch times, replayed open loop: a later turn is sent when the
    recorded user sent it, not when the simulated answer to the previous one arrives.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.traces.common import (Trace, bad, chain_hashes, check_counts, read_csv, relative_arrivals,
                                    stream_block_hashes)

REQUIRED = ("prompt_tokens", "generation_tokens", "launch_time")
MEASURED = ("ttft", "generation_time", "finish_time")
OPTIONS = {"hash_block_tokens": 16, "shared_prefix_tokens": 0, "drop_empty": False}


def detect(path, head: str) -> bool:
    first = head.splitlines()[0] if head else ""
    return all(c in first for c in ("prompt_tokens", "generation_tokens", "launch_time"))


def read(path, opts: dict) -> Trace:
    where = path.name
    df = read_csv(path, REQUIRED, f"an LMBench CSV has {', '.join(REQUIRED)} [, user_id, question_id]")
    if ("user_id" in df.columns) != ("question_id" in df.columns):
        raise bad(where, "has one of user_id / question_id but not the other; multi-round QA needs both")
    row = lambda i: f"row {int(i) + 2}"   # noqa: E731  (1-based, after the header)
    meta: dict = {"description": "LMBench per-request results (prompt/output tokens, launch time)",
                  "measured_columns_not_copied": [c for c in MEASURED if c in df.columns], "assumptions": []}
    frame = pd.DataFrame({"num_prefill_tokens": df["prompt_tokens"], "num_decode_tokens": df["generation_tokens"],
                          "launch": pd.to_numeric(df["launch_time"], errors="coerce")})
    multi = "user_id" in df.columns
    if multi:
        for c in ("user_id", "question_id"):
            v = pd.to_numeric(df[c], errors="coerce")
            wrong = v.isna() | (v != np.floor(v)) | (v < (1 if c == "question_id" else 0))
            if wrong.any():
                i = int(np.argmax(wrong.to_numpy()))
                raise bad(where, f"{row(i)}: {c} must be a whole number{' >= 1' if c == 'question_id' else ' >= 0'}, "
                                 f"found {df[c].iloc[i]!r}")
        frame["session_id"] = df["user_id"].astype(np.int64)
        frame["turn"] = (df["question_id"].astype(np.int64) - 1).astype(np.int32)
        dup = frame.duplicated(["session_id", "turn"])
        if dup.any():
            raise bad(where, f"{row(np.argmax(dup.to_numpy()))}: user {frame.session_id[dup].iloc[0]} asks question "
                             f"{frame.turn[dup].iloc[0] + 1} twice")
    frame = check_counts(frame, where, row, opts["drop_empty"], meta)
    t, order = relative_arrivals(frame["launch"].to_numpy(float), where, lambda i: row(frame.index[i]), sort=True)
    frame = frame.iloc[order].drop(columns="launch").reset_index(drop=True)
    frame.insert(0, "arrived_at_s", t)
    meta["assumptions"].append("arrivals: launch_time - first launch_time, rows sorted by it (the CSV is "
                               "grouped by user); replayed open loop")
    block = 0
    if multi:
        block = int(opts["hash_block_tokens"])
        frame["prefix_hashes"], broken = _session_hashes(frame, block, int(opts["shared_prefix_tokens"]))
        meta["assumptions"] += [
            "sessions: session_id = user_id, turn = question_id - 1",
            ("prefix: a turn's prompt = the previous turn's prompt + its answer + the new question (checked: "
             f"prompt_k >= prompt_(k-1) + generation_(k-1); {broken} turns break it and start a new stream)"),
            f"prefix: users share the first {opts['shared_prefix_tokens']} tokens (shared_prefix_tokens) and nothing else",
            f"prefix ids: one per full {block}-token block, chained"]
        meta["sessions"] = int(frame.session_id.nunique())
    return Trace(frame, meta, block)


def _session_hashes(frame: pd.DataFrame, block: int, shared_tokens: int) -> tuple[list, int]:
    if block < 1:
        raise bad("hash_block_tokens", f"must be >= 1, got {block}")
    shared = chain_hashes(f"lmbench-shared/{i}".encode() for i in range(shared_tokens // block))
    hashes: list = [None] * len(frame)
    broken = 0
    by_user = frame.sort_values(["session_id", "turn"], kind="stable")
    prev_user, prev_end, segment = None, 0, 0
    for i, user, turn, prompt, gen in zip(by_user.index, by_user.session_id, by_user.turn,
                                          by_user.num_prefill_tokens, by_user.num_decode_tokens):
        if user != prev_user:
            segment = 0
        elif prompt < prev_end:     # this turn does not resend the previous conversation
            segment += 1
            broken += 1
        hashes[i] = stream_block_hashes(f"lmbench-user/{user}/{segment}", int(prompt) // block, shared)
        prev_user, prev_end = user, int(prompt) + int(gen)
    return hashes, broken
