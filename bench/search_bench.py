"""Benchmark: wall time of the full default deployment search (issue 6 target: < 5 min on 2 cores).

    python bench/search_bench.py [--workers 2] [--out DIR] [hydra overrides ...]

Runs ``python -m sim.search``'s default space for Llama-2-70B on splitwise_conv (A100 and
H100, TP 1-8, PP 1-4, three schedulers x three batch caps, 8-GPU budget, 3 seeds) into a
fresh directory, then runs it again to show that a finished search resumes without simulating.
Prints wall time, candidates, probes, the best config and the ratio to the 5-minute target.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim import search  # noqa: E402

TARGET_S = 300.0
SCENARIO = ["model=llama2-70b", "workload=splitwise_conv", "slo.ttft_p90_s=2", "slo.tbt_p99_s=0.2"]


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="output dir (default: a fresh temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="search_bench_"))
    overrides = [*SCENARIO, f"search.workers={args.workers}", f"search.out_dir={out}",
                 *args.overrides]
    cfg = search.compose(overrides)
    print(f"scenario: {' '.join(overrides)}  (cpus: {os.cpu_count()})")
    t0, c0 = time.perf_counter(), cpu_s()
    first = search.run_search(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    ranked = first.ranked
    counts = ranked["status"].value_counts().to_dict()
    print(search.summary_table(ranked, rows=10))
    print(first.message)
    print(f"candidates: {len(ranked)} ({counts}); probes simulated: {first.simulated}, "
          f"reused: {first.reused}; CPU per probe "
          f"{first.probe_cpu_s / max(first.simulated, 1):.3f} s "
          f"(probes alone: {first.probe_cpu_s:.0f} CPU s)")
    print(f"full default search: wall {wall:.1f} s with {args.workers} workers "
          f"= {wall / TARGET_S:.2f} x the {TARGET_S:.0f} s target")
    # On a shared machine wall time includes waiting for other jobs; CPU seconds do not.
    print(f"cpu {cpu:.1f} s in total -> {cpu / args.workers:.1f} s of wall on {args.workers} idle "
          f"cores = {cpu / args.workers / TARGET_S:.2f} x target; load average now "
          f"{os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    again = search.run_search(cfg)
    print(f"re-run (resume): {again.simulated} probes simulated, {again.reused} reused, "
          f"wall {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
