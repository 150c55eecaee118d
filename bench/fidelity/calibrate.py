"""Split the engine's iteration time into forward and CPU overhead, and fit the simulator's
CPU-overhead terms (sim.cpu_overhead_per_iteration_us / _per_sequence_us / _per_token_us) from it.

Ground truth per engine iteration (parse.iterations_from_log):
  elapsed_ms  model execution + sampling as the engine core waits for the worker;
  gap_ms      time between consecutive iteration log lines = the iteration's period, valid when
              the engine ran back to back (the iteration still had decodes from the previous one).
The simulator's period is predicted_forward(batch) + a + b * sequences + c * tokens; see
decompose() for the two least-squares fits (3-MAD outliers dropped) that give a, b and c, and
elapsed - predicted_forward by iteration kind is the operator-model error.
Attention needs per-sequence KV lengths the log lacks: decodes take the trace's mean decode
context, a prefill chunk's KV is its own length (prompts here fit one 2048-token budget).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.fidelity.compare import iteration_kind


@dataclass
class LinearFit:
    per_iteration_us: float
    per_sequence_us: float
    per_token_us: float
    rmse_us: float
    num_points: int
    num_dropped: int

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def fit_linear(y_us, seqs, tokens=None) -> LinearFit:
    """y = a + b * seqs (+ c * tokens), after dropping points over 3 scaled MADs from a first
    fit. Without ``tokens`` (or when they never differ from seqs) c is 0."""
    y, x = np.asarray(y_us, float), np.asarray(seqs, float)
    t = np.asarray(tokens, float) if tokens is not None else None
    ok = ~np.isnan(y)
    y, x = y[ok], x[ok]
    if len(y) < 3:
        raise ValueError(f"need >= 3 iterations to fit the CPU overhead, got {len(y)}")
    cols = [np.ones_like(x), x]
    if t is not None and (t[ok] != x).any():
        cols.append(t[ok])
    A = np.column_stack(cols)
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    r = y - A @ coef
    mad = 1.4826 * np.median(np.abs(r - np.median(r)))
    keep = np.abs(r - np.median(r)) <= 3 * mad if mad > 0 else np.ones(len(y), bool)
    if keep.sum() >= A.shape[1] + 1 and len(np.unique(x[keep])) >= 2:
        coef = np.linalg.lstsq(A[keep], y[keep], rcond=None)[0]
    elif len(np.unique(x)) < 2:   # one batch size only: a constant
        coef = np.array([np.median(y)] + [0.0] * (A.shape[1] - 1))
    rmse = float(np.sqrt(np.mean((y[keep] - A[keep] @ coef) ** 2)))
    per_token = float(coef[2]) if len(coef) > 2 else 0.0
    return LinearFit(float(coef[0]), float(coef[1]), per_token, rmse, int(keep.sum()), int((~keep).sum()))


def mean_decode_kv(trace: list[dict]) -> float:
    """Mean KV length a decode step attends to over the trace: input + tokens generated so far."""
    total, steps = 0.0, 0
    for r in trace:
        n_in, n_out = r["input_length"], r["output_length"]
        k = n_out - 1                      # decode steps after the prefill's first token
        total += k * n_in + k * (k + 1) / 2
        steps += k
    return total / steps if steps else 0.0


def predicted_forward_ms(iters: pd.DataFrame, batch_cost, decode_kv: float) -> np.ndarray:
    """The simulator's forward time (no CPU overhead) of each logged engine batch.
    ``batch_cost`` is a sim.costs.BatchCost built with zero CPU overheads."""
    out = np.empty(len(iters))
    for i, r in enumerate(iters.itertuples()):
        prefills = []
        if r.ctx_requests:
            q, extra = divmod(r.ctx_tokens, r.ctx_requests)
            prefills = [(q + (1 if j < extra else 0),) * 2 for j in range(r.ctx_requests)]
        kv_sum = int(round(decode_kv * r.gen_requests))
        out[i] = batch_cost.stage_us(r.num_tokens, prefills, r.gen_requests, kv_sum,
                                     r.ctx_requests + r.gen_requests)[0] / 1e3
    return out


def back_to_back(iters: pd.DataFrame) -> np.ndarray:
    """Iterations that started right after the previous one: they continue its decodes."""
    prev_active = (iters["ctx_requests"] + iters["gen_requests"]).shift(1).fillna(0).to_numpy()
    return (iters["gen_requests"].to_numpy() > 0) & (prev_active > 0) & ~np.isnan(iters["gap_ms"].to_numpy())


def decompose(iters: pd.DataFrame, batch_cost, decode_kv: float) -> dict:
    """The simulator's CPU-overhead terms from the engine's iteration log, and the per-kind
    error of the operator model.

    Two fits, each on the iterations that measure it:
      worker  elapsed - predicted_forward = a1 + b1 * seqs + c * tokens   (every iteration:
              input preparation, sampling, and what the engine's forward adds to the isolated
              operators; solo prefills pin the per-token part)
      core    gap - elapsed = a2 + b2 * seqs     (back-to-back iterations: scheduling, output
              processing in the engine core)
    The simulator's per-iteration, per-sequence and per-token overheads are a1 + a2, b1 + b2, c."""
    df = iters.copy()
    df["predicted_ms"] = predicted_forward_ms(df, batch_cost, decode_kv)
    df["kind"] = iteration_kind(df["ctx_requests"], df["gen_requests"])
    df["seqs"] = df["ctx_requests"] + df["gen_requests"]
    b2b = df[back_to_back(df)]
    worker_fit = fit_linear((df["elapsed_ms"] - df["predicted_ms"]).to_numpy() * 1e3, df["seqs"].to_numpy(),
                            df["num_tokens"].to_numpy())
    core_fit = fit_linear((b2b["gap_ms"] - b2b["elapsed_ms"]).to_numpy() * 1e3, b2b["seqs"].to_numpy())
    sim_fit = {"per_iteration_us": worker_fit.per_iteration_us + core_fit.per_iteration_us,
               "per_sequence_us": worker_fit.per_sequence_us + core_fit.per_sequence_us,
               "per_token_us": worker_fit.per_token_us}
    by_kind = {}
    for kind, g in df.groupby("kind"):
        by_kind[kind] = {"count": int(len(g)), "engine_elapsed_ms_mean": float(g["elapsed_ms"].mean()),
                         "sim_forward_ms_mean": float(g["predicted_ms"].mean()),
                         "forward_error_pct": float((g["predicted_ms"].sum() / g["elapsed_ms"].sum() - 1) * 100)}
    return {"cpu_overhead_fit": {k: round(v, 3) for k, v in sim_fit.items()},
            "worker_overhead_fit": worker_fit.as_dict(), "engine_core_overhead_fit": core_fit.as_dict(),
            "forward_by_kind": by_kind, "num_iterations": int(len(df)),
            "num_back_to_back": int(len(b2b)), "decode_kv_mean_tokens": round(decode_kv, 1)}


def isolated_request_overhead(requests: pd.DataFrame, iters: pd.DataFrame, clock_offset_s: float,
                              window_s: float = 0.25) -> dict:
    """Requests whose prefill ran alone in one iteration: TTFT - that iteration's elapsed is all
    the time spent outside the model forward (HTTP + tokenisation in, scheduling, output
    processing, streaming out). Matched on exact prompt length and time: the client's
    first-token time (perf_counter + clock_offset_s = wall clock) vs the iteration's log time."""
    solo = iters[(iters["ctx_requests"] == 1) & (iters["gen_requests"] == 0)]
    if not len(solo) or iters["log_time_s"].isna().all():
        return {"num_matched": 0}
    first_token_wall = requests["start_time_s"] + clock_offset_s + requests["ttft_s"]
    rows = []
    for r, t_first in zip(requests.itertuples(), first_token_wall):
        cand = solo[(solo["ctx_tokens"] == r.input_len) & ((solo["log_time_s"] - t_first).abs() < window_s)]
        if len(cand) == 1:
            it = cand.iloc[0]
            rows.append((r.ttft_s * 1e3 - it["elapsed_ms"], (t_first - it["log_time_s"]) * 1e3))
    if not rows:
        return {"num_matched": 0}
    outside, lag = np.array(rows).T
    return {"num_matched": len(rows), "ttft_minus_forward_ms_median": float(np.median(outside)),
            "ttft_minus_forward_ms_mean": float(np.mean(outside)),
            "client_after_log_ms_median": float(np.median(lag))}


def fit_forward_scale(iters: pd.DataFrame, batch_cost, decode_kv: float) -> float:
    """Least-squares s in elapsed ~= s * predicted_forward over all logged iterations: how far
    the operator model is off as one factor (diagnostic, see simulate.ScaledOpTimes)."""
    pred = predicted_forward_ms(iters, batch_cost, decode_kv)
    el = iters["elapsed_ms"].to_numpy(float)
    return float((pred * el).sum() / (pred * pred).sum())
