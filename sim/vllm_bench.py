"""`vllm bench serve` result JSON, both ways: its requests in (lengths, arrivals, what the engine
measured) and an opcast run out in the same schema, so vLLM's tooling reads opcast's results.

Schema: the dict ``vllm/benchmarks/serve.py`` (vLLM >= 0.10; ``benchmarks/benchmark_serving.py``
before) dumps with ``--save-result``: run keys (date, backend, model_id, num_prompts,
request_rate ("inf" or a number), burstiness, max_concurrency), totals (duration, completed,
failed, total_input_tokens, total_output_tokens, request_throughput, output_throughput,
total_token_throughput), per metric m in ttft/tpot/itl/e2el ``mean_/median_/std_/p<P>_<m>_ms``,
and with ``--save-detailed`` per-request lists (input_lens, output_lens, ttfts, itls, latencies,
start_times, errors; times in seconds). Definitions (vLLM's calculate_metrics): TTFT = send ->
first token, e2el = send -> last token, TPOT = (e2el - TTFT) / (output tokens - 1) over requests
with > 1 output token, ITL = every gap between consecutive output tokens; percentiles are numpy's
default (linear), std is population std.

Arrivals, in this order of preference:
  1. ``start_times`` (detailed results): the send time of every request, as recorded.
  2. regenerated from request_rate, burstiness and the client's seed exactly as vLLM's
     get_request draws them: ``np.random.seed(seed)`` then one ``np.random.gamma(burstiness,
     1 / (rate * burstiness))`` per request. vLLM >= 0.10 (PR 21108, July 2025) sums them and
     rescales so the last request is sent at num_prompts / rate ("normalised"); older
     benchmark_serving.py sent the first request at 0 and slept each draw after it ("legacy").
     Exact only when nothing else drew from numpy's global RNG before get_request (true for
     vLLM's own datasets from 0.10 on, which use their own Generator; the legacy random dataset
     drew its lengths from the global RNG first, so there the arrivals are the same process with
     other draws). ``request_rate == "inf"`` sends everything at 0.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conf import ConfigError

DETAILED = ("input_lens", "output_lens", "ttfts", "latencies")
METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90.0, 99.0)    # as `vllm bench serve --metric-percentiles 90,99`
ARRIVAL_SCHEMES = ("auto", "recorded", "normalised", "legacy")


class BenchFormatError(ConfigError):
    """A file that is not a usable `vllm bench serve` result; one line says which key."""


@dataclass
class BenchRequests:
    """The successful requests of one benchmark result, in send order."""
    input_lens: np.ndarray                 # int64 prompt tokens (the client's count)
    output_lens: np.ndarray                # int64 output tokens
    arrivals_s: np.ndarray                 # float64, seconds since the first send
    arrival_source: str                    # recorded | normalised | legacy | inf
    index: np.ndarray                      # position of each request in the result's lists
    assumptions: list[str] = field(default_factory=list)
    num_failed: int = 0


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BenchFormatError(f"{path}: not a file; give a `vllm bench serve --save-result` JSON")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchFormatError(f"{path}: not JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise BenchFormatError(f"{path}: a vLLM result is one JSON object, found {type(doc).__name__}")
    if "completed" not in doc or not any(k in doc for k in ("mean_ttft_ms", "input_lens", "total_input_tokens")):
        raise BenchFormatError(f"{path}: no 'completed' / 'mean_ttft_ms' / 'total_input_tokens' keys: not a "
                               f"`vllm bench serve --save-result` JSON")
    return doc


def is_detailed(doc: dict) -> bool:
    return all(k in doc for k in DETAILED)


def _number(doc: dict, key: str, where: str) -> float:
    if key not in doc:
        raise BenchFormatError(f"{where}: missing key {key!r}")
    v = doc[key]
    if v == "inf":
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BenchFormatError(f"{where}: key {key!r} must be a number, found {v!r}")
    return float(v)


def _list(doc: dict, key: str, n: int, where: str) -> list:
    v = doc.get(key)
    if not isinstance(v, list) or len(v) != n:
        raise BenchFormatError(f"{where}: key {key!r} must be a list of {n} values (one per request), found "
                               f"{type(v).__name__}{'' if not isinstance(v, list) else f' of {len(v)}'}")
    return v


def succeeded(doc: dict, where: str) -> np.ndarray:
    """Mask of the requests that succeeded (empty error, output > 0)."""
    n = len(doc["input_lens"])
    errors = doc.get("errors")
    err = np.array([bool(e) for e in _list(doc, "errors", n, where)]) if errors is not None else np.zeros(n, bool)
    out = np.asarray(_list(doc, "output_lens", n, where), dtype=float)
    return ~err & (out > 0)


def vllm_arrivals(n: int, rate: float, burstiness: float, seed: int, scheme: str) -> np.ndarray:
    """Send times (s from the benchmark start) of n requests as vLLM's get_request makes them."""
    if rate == math.inf:
        return np.zeros(n)
    if not rate > 0 or not burstiness > 0:
        raise BenchFormatError(f"request_rate={rate} and burstiness={burstiness} must be > 0")
    if burstiness == math.inf:
        gaps = np.full(n, 1.0 / rate)
    else:
        state = np.random.get_state()           # leave the caller's global RNG as it was
        try:
            np.random.seed(seed)
            gaps = np.array([np.random.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)) for _ in range(n)])
        finally:
            np.random.set_state(state)
    if scheme == "legacy":     # first at 0, each draw slept after a send
        return np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    t = np.cumsum(gaps)
    return t * ((n / rate) / t[-1]) if t[-1] > 0 else t


def requests(doc: dict, where: str, *, seed: int = 0, arrivals: str = "auto",
             input_len: int = 0, output_len: int = 0) -> BenchRequests:
    """The result's successful requests: lengths and send times (module docstring)."""
    if arrivals not in ARRIVAL_SCHEMES:
        raise BenchFormatError(f"arrivals={arrivals!r}; choose one of {list(ARRIVAL_SCHEMES)}")
    notes: list[str] = []
    if is_detailed(doc):
        n = len(_list(doc, "input_lens", len(doc["input_lens"]) if isinstance(doc["input_lens"], list) else -1, where))
        ok = succeeded(doc, where)
        index = np.flatnonzero(ok)
        ins = np.asarray(doc["input_lens"], dtype=float)[ok]
        outs = np.asarray(doc["output_lens"], dtype=float)[ok]
        num_failed = int(n - ok.sum())
        if num_failed:
            notes.append(f"{num_failed} failed requests (non-empty error or 0 output tokens) left out")
        starts = doc.get("start_times")
        has_starts = isinstance(starts, list) and len(starts) == n and all(isinstance(s, (int, float)) for s in starts)
    else:
        completed = int(_number(doc, "completed", where))
        total_in, total_out = _number(doc, "total_input_tokens", where), _number(doc, "total_output_tokens", where)
        if completed < 1:
            raise BenchFormatError(f"{where}: 'completed' is {completed}: no successful request to replay")
        per_in, per_out = input_len or total_in / completed, output_len or total_out / completed
        if per_in != int(per_in) or per_out != int(per_out):
            raise BenchFormatError(
                f"{where}: aggregate-only result (no 'input_lens'; saved without --save-detailed) and "
                f"total_input_tokens / completed = {per_in:g}, total_output_tokens / completed = {per_out:g} are "
                f"not whole: per-request lengths are unknown; give input_len=... output_len=...")
        notes.append(f"aggregate-only result: every request {int(per_in)} prompt / {int(per_out)} output tokens "
                     f"({'given' if input_len or output_len else 'total_*_tokens / completed, which are whole: a fixed-length dataset such as random with range ratio 0 is assumed'})")
        index = np.arange(completed)
        ins, outs = np.full(completed, per_in), np.full(completed, per_out)
        num_failed, has_starts = int(doc.get("failed") or 0), False
    scheme = arrivals
    if scheme == "recorded" and not has_starts:
        raise BenchFormatError(f"{where}: arrivals=recorded needs the 'start_times' list (vLLM >= 0.10 with "
                               f"--save-detailed)")
    if scheme == "auto":
        scheme = "recorded" if has_starts else ("legacy" if "request_goodput:" in doc else "normalised")
    if scheme == "recorded":
        t = np.asarray(doc["start_times"], dtype=float)[index]
        notes.append("arrivals: the recorded send times (start_times)")
    else:
        rate, burst = _number(doc, "request_rate", where), _number(doc, "burstiness", where)
        num_prompts = len(doc["input_lens"]) if is_detailed(doc) else int(doc.get("num_prompts") or len(index))
        t = vllm_arrivals(num_prompts, rate, burst, seed, scheme)[index] if rate != math.inf else np.zeros(len(index))
        scheme = "inf" if rate == math.inf else scheme
        notes.append(f"arrivals: regenerated as vLLM's get_request ({scheme}) from request_rate={doc['request_rate']}, "
                     f"burstiness={burst:g}, seed={seed} (the result does not record the seed; vLLM's default is 0)")
        if doc.get("max_concurrency"):
            notes.append(f"the client capped concurrency at {doc['max_concurrency']}: regenerated times are when "
                         f"requests became ready, not when they were sent")
    order = np.argsort(t, kind="stable")
    t = t[order]
    return BenchRequests(ins[order].astype(np.int64), outs[order].astype(np.int64), t - (t[0] if len(t) else 0.0),
                         scheme, index[order], notes, num_failed)


# --------------------------------------------------------------------------- engine measurements

def measured(doc: dict, where: str):
    """What the engine measured, per successful request in the result's order: DataFrame with
    input_len, output_len, ttft_s, e2e_s, tpot_s, itl_s (list), start_s. Detailed results only."""
    import pandas as pd
    if not is_detailed(doc):
        raise BenchFormatError(f"{where}: per-request metrics need a --save-detailed result (keys {list(DETAILED)})")
    n = len(doc["input_lens"])
    ok = succeeded(doc, where)
    ttft = np.asarray(_list(doc, "ttfts", n, where), dtype=float)
    lat = np.asarray(_list(doc, "latencies", n, where), dtype=float)
    out = np.asarray(doc["output_lens"], dtype=float)
    itls = doc.get("itls") if isinstance(doc.get("itls"), list) and len(doc["itls"]) == n else [[]] * n
    starts = doc.get("start_times") if isinstance(doc.get("start_times"), list) else [math.nan] * n
    df = pd.DataFrame({"input_len": np.asarray(doc["input_lens"], dtype=np.int64), "output_len": out.astype(np.int64),
                       "ttft_s": ttft, "e2e_s": lat, "start_s": np.asarray(starts, dtype=float),
                       "itl_s": [list(x or []) for x in itls]})
    with np.errstate(invalid="ignore", divide="ignore"):
        df["tpot_s"] = np.where(out > 1, (lat - ttft) / (out - 1), np.nan)
    return df[ok].reset_index(drop=True)


def metric_stats(values_s, name: str, percentiles=PERCENTILES) -> dict[str, float]:
    """vLLM's mean_/median_/std_/p<P>_ keys (ms) of one metric; 0 for no values, as vLLM."""
    v = np.asarray([x for x in values_s if x is not None and not math.isnan(x)], dtype=float) * 1e3
    if not len(v):
        v = np.zeros(1)
    out = {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
           f"std_{name}_ms": float(v.std())}
    for p in percentiles:
        out[f"p{int(p) if int(p) == p else p}_{name}_ms"] = float(np.percentile(v, p))
    return out


def engine_stats(doc: dict, where: str) -> dict[str, float]:
    """The engine's ttft/tpot/itl/e2el statistics (ms): recomputed from the per-request lists of a
    detailed result (so every percentile exists), else the keys the result holds."""
    if is_detailed(doc):
        m = measured(doc, where)
        out = {}
        out.update(metric_stats(m.ttft_s, "ttft"))
        out.update(metric_stats(m.tpot_s, "tpot"))
        if m.itl_s.map(len).sum():
            out.update(metric_stats([x for row in m.itl_s for x in row], "itl"))
        out.update(metric_stats(m.e2e_s, "e2el"))
        return out
    return {k: float(v) for k, v in doc.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith("_ms")
            and any(k.endswith(f"_{m}_ms") for m in METRICS)}


# --------------------------------------------------------------------------- opcast -> vLLM schema

def from_simulation(result, cfg, detailed: bool, date: str | None = None) -> dict:
    """An opcast run as a `vllm bench serve` result dict (keys and types as serve.py writes them).

    Exact from the simulation: counts, token totals, duration (simulated time from 0 to the last
    completion, as vLLM's wall time from its start), throughputs, TTFT/TPOT/e2el per request,
    peak concurrency. ITL statistics come from the simulator's ITL histogram (percentiles within
    its 1.2 % bin width; std from its running sums); vLLM's per-request ``itls`` lists,
    ``generated_texts`` and ``max_output_tokens_per_s`` (needs every token's time) are not written.
    Send times are arrival times (an open-loop client has no queue: queue_times are 0)."""
    from datetime import datetime
    s = result.summary
    req = _request_columns(result)
    n = int(s["num_requests"])
    duration = float(s["sim_time_s"])
    wl = cfg.workload
    rate = float(wl.qps) if wl.arrival in ("poisson", "gamma") else "inf"
    burstiness = 1.0 / (wl.cv * wl.cv) if wl.arrival == "gamma" else 1.0
    total_in = int(req.num_prefill_tokens.sum()) if req is not None else int(s.get("prompt_tokens", 0))
    total_out = int(req.num_decode_tokens.sum()) if req is not None else int(round(s["throughput_tok_s"] * duration))
    model_id = cfg.model.get("hf_id") or cfg.model.name
    doc = {"date": date or datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": "opcast", "backend": "opcast",
           "label": "opcast-simulation", "model_id": model_id, "tokenizer_id": model_id, "num_prompts": n,
           "request_rate": rate, "burstiness": burstiness, "max_concurrency": None,
           "duration": duration, "completed": n, "failed": 0,
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": n / duration if duration > 0 else 0.0, "request_goodput": None,
           "output_throughput": total_out / duration if duration > 0 else 0.0,
           "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0}
    if req is not None:
        if detailed:
            doc.update({"input_lens": req.num_prefill_tokens.astype(int).tolist(),
                        "output_lens": req.num_decode_tokens.astype(int).tolist(),
                        "ttfts": req.ttft_s.astype(float).tolist(),
                        "latencies": req.e2e_s.astype(float).tolist(),
                        "start_times": req.arrived_at_s.astype(float).tolist(),
                        "queue_times": [0.0] * n, "errors": [""] * n})
        doc["max_concurrent_requests"] = peak_concurrency(req.arrived_at_s, req.completed_at_s)
    doc["rtfx"] = 0.0
    if req is not None:
        doc.update(metric_stats(req.ttft_s, "ttft"))
        doc.update(metric_stats(req.tpot_s, "tpot"))
    else:
        doc.update(_from_summary(s, "ttft_s", "ttft"))
        doc.update(_from_summary(s, "tpot_s", "tpot"))
    doc.update(_from_summary(s, "itl_s", "itl"))
    doc.update(metric_stats(req.e2e_s, "e2el") if req is not None else _from_summary(s, "e2e_s", "e2el"))
    doc["opcast"] = {"hw": cfg.hw.name, "model": cfg.model.name, "tp": int(cfg.parallel.tp),
                     "pp": int(cfg.parallel.pp), "replicas": int(cfg.parallel.replicas),
                     "scheduler": cfg.scheduler.name, "workload": cfg.workload.name, "seed": int(cfg.seed),
                     "op_source": result.op_source,
                     "note": "simulated by opcast; itl statistics from the simulator's histogram"}
    return doc


def _request_columns(result):
    """The per-request columns as numpy arrays by attribute (``req.ttft_s``), None when not
    kept. From SimResult.columns when there (building the DataFrame would import pandas, 0.15 s
    of a 0.4 s run), else from a ``requests`` DataFrame."""
    from types import SimpleNamespace
    cols = getattr(result, "columns", None)
    if cols is None:
        df = getattr(result, "requests", None)
        cols = None if df is None else {c: df[c].to_numpy() for c in df.columns}
    return None if cols is None else SimpleNamespace(**cols)


def _from_summary(s: dict, key: str, name: str) -> dict[str, float]:
    out = {f"mean_{name}_ms": s[f"{key}_mean"] * 1e3, f"median_{name}_ms": s[f"{key}_p50"] * 1e3}
    if f"{key}_std" in s:
        out[f"std_{name}_ms"] = s[f"{key}_std"] * 1e3
    for p in PERCENTILES:
        out[f"p{int(p)}_{name}_ms"] = s[f"{key}_p{int(p)}"] * 1e3
    return {k: (0.0 if math.isnan(v) else float(v)) for k, v in out.items()}


def peak_concurrency(start_s, end_s) -> int:
    """Most requests in flight at once over half-open [start, end) intervals (vLLM's sweep)."""
    ev = sorted([(float(a), 1) for a in start_s] + [(float(b), -1) for b in end_s])
    cur = peak = 0
    for _, d in ev:
        cur += d
        peak = max(peak, cur)
    return peak
