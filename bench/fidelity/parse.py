"""Read what the real engine recorded: `vllm bench serve --save-detailed` JSON and the server's
`--enable-logging-iteration-details` lines.

Per-request metrics follow vllm bench serve's definitions so both sides are measured alike:
ttft_s (send -> first token), e2e_s (send -> last token), tpot_s = (e2e - ttft) / (output_len - 1).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

# The iteration-log parser lives in the product (sim.calibrate); re-exported for the harness.
from sim.calibrate import iterations_from_log  # noqa: E402,F401


def requests_from_bench(result: dict, trace: list[dict] | None = None) -> pd.DataFrame:
    """One row per request, in trace order. With ``trace``, checks that lengths match it."""
    need = ["input_lens", "output_lens", "ttfts", "latencies", "errors"]
    missing = [k for k in need if k not in result]
    if missing:
        raise ValueError(f"bench result lacks {missing}: was it saved with --save-result --save-detailed?")
    n = len(result["input_lens"])
    df = pd.DataFrame({
        "request_id": np.arange(n),
        "input_len": np.asarray(result["input_lens"], dtype=np.int64),
        "output_len": np.asarray(result["output_lens"], dtype=np.int64),
        "ttft_s": np.asarray(result["ttfts"], dtype=float),
        "e2e_s": np.asarray(result["latencies"], dtype=float),
        "start_time_s": np.asarray(result.get("start_times", [np.nan] * n), dtype=float),
        "error": [e or "" for e in result["errors"]],
    })
    itls = result.get("itls") or [[]] * n
    df["num_itls"] = [len(x) for x in itls]
    df["itl_mean_s"] = [float(np.mean(x)) if len(x) else np.nan for x in itls]
    df["tpot_s"] = tpot_s(df["ttft_s"], df["e2e_s"], df["output_len"])
    failed = df[df["error"] != ""]
    if len(failed):
        raise ValueError(f"{len(failed)} of {n} engine requests failed, first: {failed['error'].iloc[0][:200]}")
    if trace is not None:
        want_in = np.array([r["input_length"] for r in trace[:n]])
        want_out = np.array([r["output_length"] for r in trace[:n]])
        if len(trace) < n or (df["input_len"].to_numpy() != want_in).any() \
                or (df["output_len"].to_numpy() != want_out).any():
            raise ValueError("engine request lengths differ from the trace (was --ignore-eos set, same trace file?)")
    return df


def tpot_s(ttft_s, e2e_s, output_len) -> np.ndarray:
    """Mean time per output token after the first; NaN for single-token outputs (as vLLM)."""
    out = np.asarray(output_len, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(out > 1, (np.asarray(e2e_s, float) - np.asarray(ttft_s, float)) / (out - 1), np.nan)


def read_bench_result(path: str | Path, trace: list[dict] | None = None) -> pd.DataFrame:
    return requests_from_bench(json.loads(Path(path).read_text()), trace)


def read_iteration_log(path: str | Path, start_byte: int = 0) -> pd.DataFrame:
    """Iterations logged after ``start_byte`` (the log size when a replay began)."""
    with open(path, "rb") as f:
        f.seek(start_byte)
        text = f.read().decode("utf-8", errors="replace")
    return iterations_from_log(text.splitlines())
