"""Fit the simulator's CPU-overhead terms (sim.cpu_overhead_per_iteration_us / _per_sequence_us
/ _per_token_us) from what a real engine recorded: its iteration log (``decompose``, the exact
split) or, when only a `vllm bench serve` result is at hand, the client's token timestamps
(``from_client_timings``). Used by ``python -m sim.compare +calibrate=true`` and bench/fidelity.

Ground truth per engine iteration (iterations_from_log):
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

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd


# Optional leading epoch timestamp comes from engine.LOGGING_CONFIG; the guide's default log
# format (1 s resolution) parses too, without log_time_s.
ITERATION_RE = re.compile(
    r"^(?:(?P<log_time_s>\d+\.\d+) )?.*Iteration\((?P<iteration>\d+)\): (?P<ctx_requests>\d+) context requests, "
    r"(?P<ctx_tokens>\d+) context tokens, (?P<gen_requests>\d+) generation requests, "
    r"(?P<gen_tokens>\d+) generation tokens, iteration elapsed time: (?P<elapsed_ms>[\d.]+) ms"
    r"(?P<dummy> \(dummy\))?(?:, \S+ KV cache usage: (?P<kv_usage_pct>[\d.]+)%)?")

ITERATION_COLUMNS = ["iteration", "log_time_s", "ctx_requests", "ctx_tokens", "gen_requests",
                     "gen_tokens", "elapsed_ms", "kv_usage_pct"]


def iterations_from_log(lines) -> pd.DataFrame:
    """Engine iterations in order. elapsed_ms is model execution + sampling only (vLLM's
    capture_iteration_details); log_time_s is when the frontend logged it (NaN without timestamps)."""
    rows = []
    for line in lines:
        m = ITERATION_RE.search(line)
        if not m or m.group("dummy"):
            continue
        g = m.groupdict()
        rows.append({"iteration": int(g["iteration"]),
                     "log_time_s": float(g["log_time_s"]) if g["log_time_s"] else np.nan,
                     "ctx_requests": int(g["ctx_requests"]), "ctx_tokens": int(g["ctx_tokens"]),
                     "gen_requests": int(g["gen_requests"]), "gen_tokens": int(g["gen_tokens"]),
                     "elapsed_ms": float(g["elapsed_ms"]),
                     "kv_usage_pct": float(g["kv_usage_pct"]) if g["kv_usage_pct"] else np.nan})
    df = pd.DataFrame(rows, columns=ITERATION_COLUMNS)
    df["num_tokens"] = df["ctx_tokens"] + df["gen_tokens"]
    # The gap to the previous log line is this iteration's period (forward + engine overhead)
    # only when the engine ran back to back; gap_ms keeps it, the caller decides when it applies.
    df["gap_ms"] = df["log_time_s"].diff() * 1e3
    return df


def iteration_kind(ctx_requests, gen_requests) -> np.ndarray:
    ctx, gen = np.asarray(ctx_requests), np.asarray(gen_requests)
    return np.where(ctx == 0, "decode", np.where(gen == 0, "prefill", "mixed"))


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


# --------------------------------------------------------------------------- from client timings

def _prefill_forward_us(batch_cost, n: int, budget: int) -> tuple[float, int]:
    """(forward µs, iterations) of an n-token prompt prefilled alone in chunks of ``budget``."""
    total, done, iters = 0.0, 0, 0
    while done < n:
        q = min(budget, n - done)
        done += q
        iters += 1
        total += batch_cost.stage_us(q, [(q, done)], 0, 0, 1)[0]
    return total, iters


def from_client_timings(measured: pd.DataFrame, batch_cost, budget: int) -> dict:
    """The simulator's CPU-overhead terms from a `vllm bench serve --save-detailed` result alone
    (no server log): the iterations are reconstructed from the client's token timestamps.

    Decode: every inter-token gap of a request whose stream has one gap per token (no bundled
    chunks) is one engine iteration; its batch is the number of requests between their first
    and last token at the gap's end, their KV the prompt plus the tokens they had received. Fit
    (gap - predicted decode forward) = a + b * batch (3-MAD outliers - iterations that also ran
    a prefill chunk - dropped). Gaps are weighted by the requests that saw them (every request in
    a step reports it). Prefill: requests that ran alone (no other request in flight from their
    send to their first token): (TTFT - predicted forward - iterations * (a + b)) = f + c * prompt
    tokens, f being the time outside the engine loop (HTTP, tokenisation, streaming), c the
    per-token overhead. ``batch_cost`` is a sim.costs.BatchCost with zero CPU overheads;
    ``budget`` the scheduler's token budget per iteration (long prompts prefill in chunks)."""
    m = measured[measured["start_s"].notna()].reset_index(drop=True)
    if not len(m):
        raise ValueError("the result has no start_times: client-side calibration needs a --save-detailed "
                         "result of vLLM >= 0.10")
    first = (m.start_s + m.ttft_s).to_numpy()
    last = (m.start_s + m.e2e_s).to_numpy()
    whole = (m.itl_s.map(len) == m.output_len - 1).to_numpy() & (m.output_len > 1).to_numpy()
    times = [f + np.concatenate([[0.0], np.cumsum(itl)]) for f, itl in zip(first, m.itl_s)]
    ends = np.concatenate([times[i][1:] for i in np.flatnonzero(whole)]) if whole.any() else np.zeros(0)
    gaps = np.concatenate([np.asarray(m.itl_s[i], float) for i in np.flatnonzero(whole)]) if whole.any() else ends
    batch = np.zeros(len(ends), np.int64)
    kv = np.zeros(len(ends), np.int64)
    for i in range(len(m)):
        active = (first[i] < ends) & (ends <= last[i] + 1e-9)
        batch += active
        kv += np.where(active, int(m.input_len[i]) + np.searchsorted(times[i], ends, side="left"), 0)
    memo: dict = {}

    def decode_us(b: int, k: int) -> float:
        key = (b, k // 64)
        if key not in memo:
            memo[key] = batch_cost.stage_us(b, [], b, k, b)[0]
        return memo[key]
    ok = batch > 0
    fwd = np.array([decode_us(int(b), int(k)) for b, k in zip(batch[ok], kv[ok])])
    out: dict = {"num_decode_gaps": int(ok.sum()), "num_requests_used": int(whole.sum())}
    if ok.sum() < 3:
        raise ValueError(f"only {int(ok.sum())} usable inter-token gaps (streams with one gap per token): "
                         "too few to fit the per-iteration overhead")
    y, x = gaps[ok] * 1e6 - fwd, batch[ok].astype(float)
    dec = fit_linear(y, x)
    a, b = dec.per_iteration_us, dec.per_sequence_us
    if b < 0:      # overheads are not negative: refit with the per-sequence term at 0
        a, b = float(np.median(y)), 0.0
    out["decode_fit"] = dec.as_dict()
    out.update(solo_prefill_fit(m, batch_cost, budget, a, b))
    out.update({"cpu_overhead_per_iteration_us": round(max(a, 0.0), 1),
                "cpu_overhead_per_sequence_us": round(b, 1)})
    return out


def solo_prefill_fit(m: pd.DataFrame, batch_cost, budget: int, a: float, b: float) -> dict:
    """Per-token overhead c and frontend latency f from the requests that ran alone from send to
    first token: TTFT - predicted forward - iterations * (a + b) = f + c * prompt tokens."""
    first = (m.start_s + m.ttft_s).to_numpy()
    last = (m.start_s + m.e2e_s).to_numpy()
    out: dict = {}
    solo = [i for i in range(len(m))
            if not any(j != i and m.start_s[j] < first[i] and last[j] > m.start_s[i] for j in range(len(m)))]
    rows = []
    for i in solo:
        n = int(m.input_len[i])
        f_us, iters = _prefill_forward_us(batch_cost, n, budget)
        rows.append((m.ttft_s[i] * 1e6 - f_us - iters * (a + b), n))
    out["num_solo_requests"] = len(rows)
    per_token, frontend_us = 0.0, 0.0
    if len(rows) >= 3 and len({n for _, n in rows}) >= 2:
        pf = fit_linear([y for y, _ in rows], [n for _, n in rows])
        per_token, frontend_us = max(pf.per_sequence_us, 0.0), max(pf.per_iteration_us, 0.0)
        out["prefill_fit"] = pf.as_dict()
    elif rows:
        frontend_us = max(float(np.median([y for y, _ in rows])), 0.0)
        out["prefill_fit"] = "fewer than 3 solo requests of 2+ prompt lengths: per-token overhead 0, frontend = median"
    out.update({"cpu_overhead_per_token_us": round(per_token, 3), "frontend_latency_ms": round(frontend_us / 1e3, 3)})
    return out


def from_server_log(measured: pd.DataFrame, iters: pd.DataFrame, batch_cost, budget: int) -> dict:
    """The exact split (``decompose``) from the server's --enable-logging-iteration-details lines
    of the same run, plus the frontend latency from the client's solo requests."""
    rows = [{"input_length": int(i), "output_length": int(o)} for i, o in zip(measured.input_len, measured.output_len)]
    if len(iters) < 3:
        raise ValueError(f"the server log has {len(iters)} iteration lines; start vLLM with "
                         "--enable-logging-iteration-details")
    dec = decompose(iters, batch_cost, mean_decode_kv(rows))
    fit = dec["cpu_overhead_fit"]
    a, b, c = (max(fit[k], 0.0) for k in ("per_iteration_us", "per_sequence_us", "per_token_us"))
    m = measured[measured["start_s"].notna()].reset_index(drop=True)
    out = {"source": "server iteration log", "decomposition": dec, **(solo_prefill_fit(m, batch_cost, budget, a, b)
                                                                      if len(m) else {"frontend_latency_ms": 0.0})}
    out.update({"cpu_overhead_per_iteration_us": round(a, 1), "cpu_overhead_per_sequence_us": round(b, 1),
                "cpu_overhead_per_token_us": round(c, 3)})
    return out
