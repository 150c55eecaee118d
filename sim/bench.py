"""Simulator speed benchmark (figures, not a test).

    python -m sim.bench [--repeats 5] [--million] [--million-sessions] [--data-dir data]
    python -m sim.bench --whole-process [--repeats 7]

Scenario (the issue's): Llama-2-7B, A100, TP1, one replica, vLLM (v0) scheduler, 1000 requests
with Splitwise-conversation lengths, Poisson 3 QPS. Reports the cold run (first use of an
OpTimes fills the attention memo from the estimator) and warm runs (what a search sees),
as wall and CPU seconds, against Vidur's 5.5 s for the same scenario on this machine.
Prefix caching: the same scenario with scheduler.prefix_caching=true (its bookkeeping, nothing
shared; target within 1.5x of off), and a multi-turn workload (conf/workload/multi_turn.yaml,
vLLM v1 scheduler) with caching on and off (what caching saves, what it costs to simulate).
Speculative decoding and KV offload (issue 22): the scenario's workload on the vLLM v1 scheduler
without speculative decoding (fast-forward on, and off: what switching it off costs), with an
EAGLE head at its published acceptance (never fast-forwarded: each step draws its acceptances),
and the multi-turn workload on a GPU cache of 600 blocks with and without a 64 GiB CPU tier.
``--million`` also runs 1M requests of the scenario's workload with streaming metrics
(sim.keep_requests=false) and reports its time and the process's peak memory;
``--million-sessions`` runs 1M multi-turn requests with caching on in a child process and
reports its time and that process's peak memory (target < 2 GiB).

``--whole-process`` times what a user waits for: ``python -m sim.run`` (the README main job:
no arguments, default outputs, written under a temporary working directory; operator tables
and composition cached by a first run) from process start to exit, in fresh processes,
interleaved with a fixed pure-Python reference loop timed in this process. The figure is the
ratio of the two medians, so it compares across machines and loads: the target, 0.5 s on the
2-core box this project is developed on, is WHOLE_PROCESS_TARGET_REFS reference loops there.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VIDUR_S = 5.5   # Vidur on this machine, same scenario (the figure)
TARGET_S = 0.3
SCENARIO = ["hw=a100", "model=llama2-7b", "parallel.tp=1", "parallel.replicas=1", "scheduler=vllm",
            "workload=splitwise_conv", "workload.num_requests=1000", "workload.qps=3", "seed=0"]
CACHING_TARGET = 1.5      # caching on / off, simulator time on the scenario
MULTI_TURN = ["hw=a100", "model=llama2-7b", "parallel.tp=1", "scheduler=vllm_v1", "workload=multi_turn",
              "seed=0"]


# The reference loop takes 0.08 s on one core of the development box (median wall and CPU time
# of 50 runs at load ~2 on its 2 cores; 0.072-0.081 s over the day): the 0.5 s target is 6.25 loops.
WHOLE_PROCESS_TARGET_S = 0.5
REFERENCE_S_DEV_BOX = 0.08
WHOLE_PROCESS_TARGET_REFS = WHOLE_PROCESS_TARGET_S / REFERENCE_S_DEV_BOX


def reference_loop(n: int = 600_000) -> int:
    """Fixed pure-Python work (dict, integer and attribute traffic like the simulator's)."""
    acc, d = 0, {}
    for i in range(n):
        k = i & 1023
        d[k] = d.get(k, 0) + i
        acc = (acc * 31 + d[k]) % 1_000_003
    return acc


def whole_process(repeats: int) -> None:
    """Median wall (and CPU) of ``python -m sim.run`` as a multiple of the reference loop."""
    repo = Path(__file__).resolve().parents[1]
    refs, ref_cpus, walls, cpus = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(repo), os.environ.get("PYTHONPATH")) if p))

        def one(i: int) -> tuple[float, float]:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "sim.run"], cwd=tmp, env=env,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode:
                raise SystemExit(f"error: python -m sim.run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
            return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        one(0)                       # warms the operator-table cache and the OS file cache
        for i in range(1, repeats + 1):
            t, c = time.perf_counter(), time.process_time()
            reference_loop()
            refs.append(time.perf_counter() - t)
            ref_cpus.append(time.process_time() - c)
            wall, cpu = one(i)
            walls.append(wall)
            cpus.append(cpu)
    ref, ref_cpu, wall, cpu = (statistics.median(v) for v in (refs, ref_cpus, walls, cpus))
    ratio, cpu_ratio = wall / ref, cpu / ref_cpu
    print(f"whole process: python -m sim.run (README main job, default outputs, warm caches), "
          f"{repeats} runs, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"  median wall {wall:.3f} s (CPU {cpu:.3f} s); reference loop median wall {ref:.3f} s "
          f"(CPU {ref_cpu:.3f} s, min wall {min(refs):.3f} s)")
    print(f"  whole process = {ratio:.2f} reference loops of wall time ({cpu_ratio:.2f} of CPU time); "
          f"target < {WHOLE_PROCESS_TARGET_REFS:.1f} (= {WHOLE_PROCESS_TARGET_S} s on the development "
          f"box): {'PASS' if ratio < WHOLE_PROCESS_TARGET_REFS else 'FAIL'}")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print("  (the machine is loaded: a fresh process waits for a core more than the loop in a running one,"
              " so the CPU ratio is the fairer figure)")


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _interleaved(runs: dict, repeats: int) -> dict:
    """Median CPU seconds of each named zero-argument run, alternating them to share the noise."""
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(_timed(fn)[2])
    return {name: statistics.median(v) for name, v in times.items()}


def _million_sessions(data_dir: str) -> None:
    """In a child process (so the peak memory is its own): 1M multi-turn requests, caching on."""
    code = ("import time, sim; t = time.perf_counter(); c = time.process_time(); "
            f"r = sim.simulate(sim.compose({MULTI_TURN!r} + ['workload.num_requests=1000000', "
            f"'sim.keep_requests=false', 'sim.data_dir={data_dir}'])); s = r.summary; "
            "print(time.perf_counter() - t, time.process_time() - c, s['num_iterations'], s['sim_time_s'], "
            "s['prefix_hit_rate'], s['kv_evictions'], s['ttft_s_p50'], s['e2e_s_p99'])")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"error: the 1M-session run failed (status {status})")
    wall, cpu, iters, sim_s, hit, evictions, ttft, e2e = (float(x) for x in out.split()[-8:])
    peak_gib = usage.ru_maxrss / 2 ** 20
    print(f"1M multi-turn requests, prefix caching on (streaming metrics, child process): wall {wall:.1f} s, "
          f"cpu {cpu:.1f} s, {int(iters)} iterations, {sim_s:.0f} s simulated; prefix hit rate {hit:.3f}, "
          f"{int(evictions)} evictions; ttft p50 {ttft:.3f} s, e2e p99 {e2e:.3f} s; peak RSS {peak_gib:.2f} GiB "
          f"(target < 2 GiB: {'PASS' if peak_gib < 2 else 'FAIL'})")


SPEC = ["scheduler=vllm_v1"]
SPEC_ON = ["scheduler.spec.method=eagle", "scheduler.spec.num_tokens=3"]
OFFLOAD = ["sim.num_gpu_blocks_override=600"]    # 9,600 tokens: the sessions' prefixes no longer fit
OFFLOAD_ON = ["scheduler.offload.cpu_gib=64"]


def features(data_dir: str, ot, repeats: int) -> None:
    """Speculative decoding and KV offload: what they change and what they cost to simulate."""
    import sim
    base = [a for a in SCENARIO if not a.startswith("scheduler=")] + SPEC + [f"sim.data_dir={data_dir}"]
    cfgs = {"v1": sim.compose(base), "v1, no fast-forward": sim.compose(base + ["sim.fast_forward=false"]),
            "v1 + EAGLE k=3": sim.compose(base + SPEC_ON)}
    res = {name: sim.simulate(c, op_times=ot).summary for name, c in cfgs.items()}
    cpu = _interleaved({name: (lambda c=c: sim.simulate(c, op_times=ot)) for name, c in cfgs.items()}, repeats)
    print(f"speculative decoding: {' '.join(base[:-1])} {' '.join(SPEC_ON)}")
    for name, s in res.items():
        spec = (f", acceptance length {s['spec_acceptance_length_mean']:.2f}" if "spec_acceptance_length_mean" in s
                else "")
        print(f"  {name:20s} {int(s['num_iterations']):6d} iterations, tpot p50 {s['tpot_s_p50'] * 1e3:.2f} ms, "
              f"itl p50 {s['itl_s_p50'] * 1e3:.2f} ms, e2e p50 {s['e2e_s_p50']:.3f} s{spec}; simulate cpu "
              f"{cpu[name]:.3f} s")
    print(f"  speculative decoding runs without fast-forward: {cpu['v1 + EAGLE k=3'] / cpu['v1']:.1f}x the cpu of "
          f"v1 with it ({cpu['v1, no fast-forward'] / cpu['v1']:.1f}x for v1 with fast-forward off alone)")
    turns = [*MULTI_TURN, *OFFLOAD, f"sim.data_dir={data_dir}"]
    cfgs = {"GPU cache only": sim.compose(turns), "+ 64 GiB CPU tier": sim.compose(turns + OFFLOAD_ON)}
    res = {name: sim.simulate(c, op_times=ot).summary for name, c in cfgs.items()}
    cpu = _interleaved({name: (lambda c=c: sim.simulate(c, op_times=ot)) for name, c in cfgs.items()}, repeats)
    print(f"KV offload: {' '.join(turns[:-1])}")
    for name, s in res.items():
        tier = (f", CPU-tier hit rate {s['prefix_hit_rate_cpu']:.3f}, prefill tokens loaded "
                f"{int(s['prefill_tokens_loaded'])} ({s['offload_bytes_to_gpu'] / 2 ** 30:.1f} GiB over PCIe)"
                if "prefix_hit_rate_cpu" in s else "")
        print(f"  {name:18s} ttft p50 {s['ttft_s_p50']:.3f} s p90 {s['ttft_s_p90']:.3f} s, GPU hit rate "
              f"{s['prefix_hit_rate']:.3f}, prefill tokens saved {int(s['prefill_tokens_saved'])}{tier}; "
              f"simulate cpu {cpu[name]:.3f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sim.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--million", action="store_true", help="also run 1M requests (minutes)")
    ap.add_argument("--million-sessions", action="store_true",
                    help="also run 1M multi-turn requests with prefix caching (minutes)")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--whole-process", action="store_true",
                    help="time python -m sim.run end to end against a reference loop")
    args = ap.parse_args(argv)
    if args.whole_process:
        whole_process(args.repeats)
        return

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
    cached = sim.compose(SCENARIO + ["scheduler.prefix_caching=true", f"sim.data_dir={args.data_dir}"])
    res_on = sim.simulate(cached, op_times=ot)
    same = all(res_on.summary[k] == s[k] for k in ("e2e_s_p50", "ttft_s_p90", "num_iterations"))
    cpu = _interleaved({"off": lambda: sim.simulate(cfg, op_times=ot),
                        "on": lambda: sim.simulate(cached, op_times=ot)}, args.repeats)
    ratio = cpu["on"] / cpu["off"]
    print(f"  prefix caching on (nothing shared here{', same results' if same else ', RESULTS DIFFER'}): "
          f"cpu {cpu['on']:.3f} s vs {cpu['off']:.3f} s off (medians of {args.repeats}, interleaved) = "
          f"{ratio:.2f}x, target <= {CACHING_TARGET}x: {'PASS' if ratio <= CACHING_TARGET else 'FAIL'}")
    turns = {pc: sim.compose(MULTI_TURN + [f"scheduler.prefix_caching={pc}", f"sim.data_dir={args.data_dir}"])
             for pc in ("true", "false")}
    results = {pc: sim.simulate(c, op_times=ot).summary for pc, c in turns.items()}
    cpu = _interleaved({pc: (lambda c=c: sim.simulate(c, op_times=ot)) for pc, c in turns.items()},
                       args.repeats)
    print(f"multi-turn: {' '.join(MULTI_TURN)} ({int(results['true']['num_requests'])} requests)")
    for pc, label in (("true", "caching on "), ("false", "caching off")):
        r = results[pc]
        print(f"  {label}  ttft p50 {r['ttft_s_p50']:.3f} s p90 {r['ttft_s_p90']:.3f} s, e2e p50 "
              f"{r['e2e_s_p50']:.3f} s, prefix hit rate {r['prefix_hit_rate']:.3f}, prefill tokens saved "
              f"{int(r['prefill_tokens_saved'])}, evictions {int(r['kv_evictions'])}; simulate cpu {cpu[pc]:.3f} s")
    print(f"  simulating with caching costs {cpu['true'] / cpu['false']:.2f}x (its block bookkeeping, and "
          f"{int(results['true']['num_iterations'])} vs {int(results['false']['num_iterations'])} iterations)")
    features(args.data_dir, ot, args.repeats)
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
    if args.million_sessions:
        _million_sessions(args.data_dir)


if __name__ == "__main__":
    main()
