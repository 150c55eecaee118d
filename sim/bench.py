"""Simulator speed benchmark (figures, not a test).

    python -m sim.bench [--repeats 5] [--million] [--data-dir data]

Scenario (the issue's): Llama-2-7B, A100, TP1, one replica, vLLM (v0) scheduler, 1000 requests
with Splitwise-conversation lengths, Poisson 3 QPS. Reports the cold run (first use of an
OpTimes fills the attention memo from the estimator) and warm runs (what a search sees),
as wall and CPU seconds, against Vidur's 5.5 s for the same scenario on this machine.
``--million`` also runs 1M requests of that workload with streaming metrics
(sim.keep_requests=false) and reports its time and the process's peak memory.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

VIDUR_S = 5.5   # Vidur on this machine, same scenario (the figure)
TARGET_S = 0.3
SCENARIO = ["hw=a100", "model=llama2-7b", "parallel.tp=1", "parallel.replicas=1", "scheduler=vllm",
            "workload=splitwise_conv", "workload.num_requests=1000", "workload.qps=3", "seed=0"]


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--million", action="store_true", help="also run 1M requests (minutes)")
    ap.add_argument("--data-dir", default="data")
    args = ap.parse_args(argv)

    import sim
    from conf import ConfigError, to_hw, to_model
    from estimator.runtime import load_op_times
    try:
        cfg = sim.compose(SCENARIO + [f"sim.data_dir={args.data_dir}"])
        ot, load_w, load_c = _timed(lambda: load_op_times(to_hw(cfg.hw), to_model(cfg.model), 1,
                                                          data_dir=args.data_dir))
        res, cold_w, cold_c = _timed(lambda: sim.simulate(cfg, op_times=ot))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}")
    warm = [_timed(lambda: sim.simulate(cfg, op_times=ot))[1:] for _ in range(args.repeats)]
    warm_w = statistics.median(w for w, _ in warm)
    warm_c = statistics.median(c for _, c in warm)
    s = res.summary
    print(f"scenario: {' '.join(SCENARIO)}  (op times: {getattr(ot, 'source', '?')})")
    print(f"  {int(s['num_requests'])} requests, {int(s['num_iterations'])} iterations, "
          f"{s['sim_time_s']:.1f} s simulated; e2e p50 {s['e2e_s_p50']:.3f} s, ttft p90 {s['ttft_s_p90']:.3f} s")
    print(f"  load_op_times           wall {load_w:7.3f} s   cpu {load_c:7.3f} s")
    print(f"  simulate, cold memo     wall {cold_w:7.3f} s   cpu {cold_c:7.3f} s")
    print(f"  simulate, warm (median of {args.repeats})  wall {warm_w:7.3f} s   cpu {warm_c:7.3f} s   "
          f"target < {TARGET_S} s: {'PASS' if warm_w < TARGET_S else 'FAIL'}"
          f"{'' if warm_w < TARGET_S or warm_c >= TARGET_S else ' (cpu time passes: machine is loaded)'}")
    print(f"  vs Vidur {VIDUR_S} s: {VIDUR_S / warm_w:.1f}x faster (wall), {VIDUR_S / warm_c:.1f}x (cpu)")
    print(f"  per 1000 simulated iterations: {1e3 * warm_w / s['num_iterations'] * 1e3:.2f} ms wall")
    if args.million:
        big = sim.compose(SCENARIO[:-3] + ["workload.num_requests=1000000", "workload.qps=3", "seed=0",
                                           "sim.keep_requests=false", f"sim.data_dir={args.data_dir}"])
        res, w, c = _timed(lambda: sim.simulate(big, op_times=ot))
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        s = res.summary
        print(f"1M requests (streaming metrics): wall {w:.1f} s, cpu {c:.1f} s, "
              f"{int(s['num_iterations'])} iterations, {s['sim_time_s']:.0f} s simulated; "
              f"process peak RSS {peak_gib:.2f} GiB (target < 2 GiB: {'PASS' if peak_gib < 2 else 'FAIL'}); "
              f"e2e p50 {s['e2e_s_p50']:.3f} s p99 {s['e2e_s_p99']:.3f} s")


if __name__ == "__main__":
    main()
