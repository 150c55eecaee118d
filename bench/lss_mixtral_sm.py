"""Mixtral-8x7B on one 4 x H100 vLLM instance (LLMServingSim ISPASS'26 reference run "SM") vs opcast.

    python bench/lss_mixtral_sm.py [sim overrides, e.g. parallel.ep=4]

Replays the 300 ShareGPT requests of dataset/sharegpt_req300_rate10_mixtral.jsonl (recorded
arrival_time_ns, input_toks, output_toks) and compares output tokens/s in 1 s bins with the
measured curve evaluation/artifacts/figure_5/H100/reference/SM_throughput.tsv
(github.com/casys-kaist/LLMServingSim, commit f4ab208, MIT; reference root: $OPCAST_REFERENCE,
default /work/shared/reference). The run records only this curve, no per-request latencies.
Assumed (not recorded): TP = 4 (cluster config npu_num 4), no expert parallelism, vLLM V1
defaults of an H100 (max_num_seqs 256, max_num_batched_tokens 8192). opcast spreads each
request's output tokens evenly between its first token and its completion. The case also sits
in the GPU-fidelity benchmark (bench/gpu_fidelity, lss_mixtral_h100_sm) once that lands.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sim  # noqa: E402  (this checkout's simulator)

REF = Path(os.environ.get("OPCAST_REFERENCE", "/work/shared/reference")) / "ground_truth" / "llmservingsim"
SETUP = ["hw=h100", "model=mixtral-8x7b", "parallel.tp=4", "scheduler=vllm_v1", "scheduler.max_num_seqs=256",
         "scheduler.max_tokens_per_batch=8192", "workload=fidelity_trace"]


def main(overrides: list[str]) -> None:
    rows = [json.loads(line) for line in open(REF / "dataset/sharegpt_req300_rate10_mixtral.jsonl")]
    trace = pd.DataFrame({"arrived_at_s": [r["arrival_time_ns"] * 1e-9 for r in rows],
                          "num_prefill_tokens": [int(r["input_toks"]) for r in rows],
                          "num_decode_tokens": [int(r["output_toks"]) for r in rows]})
    curve = pd.read_csv(REF / "evaluation/artifacts/figure_5/H100/reference/SM_throughput.tsv", sep="\t")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mixtral_sm.parquet"
        trace.to_parquet(path)
        res = sim.simulate(sim.compose(SETUP + [f"workload.trace={path}", f"workload.num_requests={len(trace)}",
                                                *overrides]))
    bins = np.zeros(len(curve) + 120)
    for r in res.requests.itertuples():
        n = int(r.num_decode_tokens)
        times = np.linspace(r.first_token_s, r.completed_at_s, n) if n > 1 else np.array([r.first_token_s])
        np.add.at(bins, times.astype(int), 1)
    ours, meas = bins[:len(curve)], curve.throughput.to_numpy()
    steady = ((curve.time_s >= 8) & (curve.time_s <= 28)).to_numpy()
    print(f"overrides: {' '.join(overrides) or '(none)'}; op times {res.op_source}")
    print(f"steady 8-28 s mean output tok/s: measured {meas[steady].mean():.0f}, opcast {ours[steady].mean():.0f} "
          f"({(ours[steady].mean() / meas[steady].mean() - 1) * 100:+.1f} %)")
    print(f"last output token: measured in second {curve.time_s[meas > 0].max()}, opcast in second "
          f"{np.nonzero(bins)[0].max()}")
    print("5 s means, measured:", [round(meas[i:i + 5].mean()) for i in range(0, 45, 5)])
    print("5 s means, opcast:  ", [round(ours[i:i + 5].mean()) for i in range(0, 45, 5)])
    s = res.summary
    print(f"opcast: TPOT p50 {s['tpot_s_p50'] * 1e3:.1f} ms, TTFT p50 {s['ttft_s_p50'] * 1e3:.0f} ms, "
          f"mean batch {s['batch_size_mean']:.1f}, KV {res.memory.num_tokens} tokens")


if __name__ == "__main__":
    main(sys.argv[1:])
