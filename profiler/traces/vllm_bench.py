"""`vllm bench serve --save-result [--save-detailed]` JSON as a trace: the successful requests'
input/output lengths, sent at their recorded times (start_times) or at the times vLLM's client
drew from request_rate, burstiness and seed (sim/vllm_bench.py says how, per vLLM version).
The engine's measured latencies stay in the result file (sim.compare reads them there)."""
from __future__ import annotations

import pandas as pd

from profiler.traces.common import Trace, bad
from sim import vllm_bench

OPTIONS = {"seed": 0, "arrivals": "auto", "input_len": 0, "output_len": 0}


def detect(path, head: str) -> bool:
    return head.lstrip().startswith("{") and ('"mean_ttft_ms"' in head or '"input_lens"' in head
                                              or '"request_throughput"' in head or '"completed"' in head)


def read(path, opts: dict) -> Trace:
    doc = vllm_bench.load(path)
    try:
        req = vllm_bench.requests(doc, path.name, seed=int(opts["seed"]), arrivals=str(opts["arrivals"]),
                                  input_len=int(opts["input_len"]), output_len=int(opts["output_len"]))
    except (TypeError, ValueError) as exc:
        raise bad(path.name, f"unusable values ({exc})") from None
    bad_rows = (req.input_lens < 1) | (req.output_lens < 1)
    if bad_rows.any():
        i = int(bad_rows.argmax())
        raise bad(path.name, f"request {int(req.index[i])}: input_lens={req.input_lens[i]}, output_lens="
                             f"{req.output_lens[i]}; both must be >= 1")
    frame = pd.DataFrame({"arrived_at_s": req.arrivals_s, "num_prefill_tokens": req.input_lens,
                          "num_decode_tokens": req.output_lens})
    meta = {"description": "requests of a `vllm bench serve` result",
            "bench": {k: doc.get(k) for k in ("date", "backend", "model_id", "num_prompts", "request_rate",
                                              "burstiness", "max_concurrency", "completed")},
            "detailed": vllm_bench.is_detailed(doc), "arrival_source": req.arrival_source,
            "failed_requests_left_out": req.num_failed,
            "assumptions": req.assumptions + ["input lengths are the client's counts (vLLM's prompt_len)"]}
    return Trace(frame, meta)
