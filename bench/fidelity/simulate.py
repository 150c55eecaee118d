"""Simulate a fidelity trace with opcast: same requests, same scheduler limits as the engine."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from conf.files import atomic_write

# The engine's setup as sim overrides: CPU card, the tiny model, the V1 scheduler mirror, no
# GPU-style reserved memory. Overheads are appended by the caller (calibrated or the defaults).
BASE_OVERRIDES = ["hw=cpu", "model=tiny-llama", "scheduler=vllm_v1_cpu", "workload=fidelity_trace",
                  "parallel.tp=1", "parallel.pp=1", "parallel.replicas=1", "seed=0",
                  "sim.out_dir=null", "sim.keep_requests=true", "sim.reserved_gib=0",
                  "sim.print_summary=false",
                  "engine.frontend_latency_us=0"]   # the harness adds its own measured frontend latency


def write_trace_parquet(requests: list[dict], path: str | Path) -> Path:
    """The trace in the simulator's workload format (arrived_at_s, prefill/decode tokens)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"arrived_at_s": pa.array([float(r["timestamp"]) for r in requests], pa.float64()),
                      "num_prefill_tokens": pa.array([int(r["input_length"]) for r in requests], pa.int64()),
                      "num_decode_tokens": pa.array([int(r["output_length"]) for r in requests], pa.int64())})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def overhead_overrides(per_iteration_us: float, per_sequence_us: float, per_token_us: float = 0.0) -> list[str]:
    return [f"sim.cpu_overhead_per_iteration_us={per_iteration_us:.3f}",
            f"sim.cpu_overhead_per_sequence_us={per_sequence_us:.3f}",
            f"sim.cpu_overhead_per_token_us={per_token_us:.3f}"]


def simulate_trace(trace_parquet: str | Path, num_requests: int, overrides=(), op_times=None):
    """(per-request DataFrame in trace order, per-iteration DataFrame, summary dict)."""
    import sim
    cfg = sim.compose(BASE_OVERRIDES + [f"workload.trace={Path(trace_parquet).resolve()}",
                                        f"workload.num_requests={num_requests}", *overrides])
    result = sim.simulate(cfg, op_times=op_times, outputs=True)   # outputs=True: keep the batch trace, no files
    req = result.requests.sort_values("request_id").reset_index(drop=True)
    req = req.rename(columns={"num_prefill_tokens": "input_len", "num_decode_tokens": "output_len"})
    from sim.core import engine_profile
    engine = engine_profile(cfg)   # the engine profile with the overrides above applied
    per_iter, per_seq, per_tok = engine.cpu_per_iteration_us, engine.cpu_per_sequence_us, engine.cpu_per_token_us
    rows = [(kind, batch, tokens if kind != "decode" else batch, dur_s * 1e3)
            for _, stage, _, dur_s, kind, batch, tokens in result.trace if stage == 0]
    iters = pd.DataFrame(rows, columns=["kind", "seqs", "num_tokens", "period_ms"])
    iters["forward_ms"] = iters["period_ms"] - (per_iter + per_seq * iters["seqs"] + per_tok * iters["num_tokens"]) / 1e3
    if len(result.trace) >= cfg.sim.max_trace_events:
        iters = iters.iloc[0:0]   # truncated trace: no per-iteration comparison
    summary = dict(result.summary, op_source=result.op_source)
    return req, iters, summary


def engine_iterations_view(iters: pd.DataFrame) -> pd.DataFrame:
    """Engine iteration log in the simulator's per-iteration columns."""
    from sim.calibrate import back_to_back, iteration_kind
    out = pd.DataFrame({"kind": iteration_kind(iters["ctx_requests"], iters["gen_requests"]),
                        "seqs": iters["ctx_requests"] + iters["gen_requests"],
                        "num_tokens": iters["num_tokens"], "forward_ms": iters["elapsed_ms"]})
    out["period_ms"] = np.where(back_to_back(iters), iters["gap_ms"], np.nan)
    return out


class ScaledOpTimes:
    """Diagnostic only: an OpTimes whose every operator time is multiplied by ``scale``. With
    the scale fitted to the engine's iteration log it answers "what error is left once the
    operator times are right" - i.e. how much of the error is scheduling and CPU overhead."""

    def __init__(self, op_times, scale: float):
        self.op, self.scale = op_times, float(scale)
        self.tp, self.model, self.source = op_times.tp, op_times.model, f"{op_times.source} x{scale:.3f}"

    def __getattr__(self, name):
        """Every ``*_us`` question of the OpTimes, scaled."""
        attr = getattr(self.op, name)
        if name.endswith("_us") and callable(attr):
            return lambda *args, **kwargs: self.scale * attr(*args, **kwargs)
        return attr
