"""Replay a `vllm bench serve` result in opcast and compare, side by side; optionally calibrate.

    python -m sim.compare +bench=RESULT.json hw=a100 model=llama3-8b parallel.tp=1 [scheduler=vllm_v1]
        [+calibrate=true [+server_log=VLLM_SERVER.log]] [+engine_profile=PROFILE.yaml] [+bench_seed=0]
        [+arrivals=auto|recorded|normalised|legacy] [+out=DIR]

The result's successful requests (lengths, and send times: recorded ``start_times``, else
regenerated from request_rate / burstiness / seed as vLLM's client draws them - see
sim/vllm_bench.py) become a trace that the configured deployment serves. Printed: engine vs
opcast TTFT, TPOT, ITL and e2e (mean, median, p99; ms) with the error in %, and the round trip
(request count and token totals on both sides, which must be equal).

``+calibrate=true`` (needs a --save-detailed result with start_times): fits the engine's CPU-side
costs (sim/calibrate.py) - from the server's iteration log of the same run when given
(``+server_log``: vLLM started with --enable-logging-iteration-details; the exact split the
CPU fidelity benchmark uses), else from the client's token timestamps - re-simulates
with them and writes ``engine_profile.yaml``: an engine profile (conf/engine, sim/config.py
EngineConf) on top of the configured one with the fitted CPU costs per iteration, sequence and
token and the frontend latency (time outside the engine loop, added to TTFT and e2e). Copy it to
conf/engine/<name>.yaml and run with ``engine=<name>``, or pass it to later comparisons with
``+engine_profile=PATH``.
Outputs (``+out=DIR``, default Hydra's run dir): compare.json, bench_trace.parquet,
vllm_result.json (the simulation in vLLM's schema) and engine_profile.yaml.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from conf import ConfigError, cli, to_model
from conf.files import atomic_write, write_text
from sim import calibrate, vllm_bench
from sim.config import register

METRICS = (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("itl", "itl_s"), ("e2el", "e2e_s"))
STATS = (("mean", "mean"), ("median", "p50"), ("p99", "p99"))
# The calibration's fitted terms (sim/calibrate.py) -> the engine profile's fields.
FIT_TO_ENGINE = {"cpu_overhead_per_iteration_us": "cpu_per_iteration_us",
                 "cpu_overhead_per_sequence_us": "cpu_per_sequence_us",
                 "cpu_overhead_per_token_us": "cpu_per_token_us"}
ENGINE_COSTS = (*FIT_TO_ENGINE.values(), "frontend_latency_us")


def engine_costs(fit: dict) -> dict[str, float]:
    """A calibration's fit as engine-profile fields (µs)."""
    return {**{new: float(fit[old]) for old, new in FIT_TO_ENGINE.items()},
            "frontend_latency_us": float(fit["frontend_latency_ms"]) * 1e3}


def write_trace(req: vllm_bench.BenchRequests, path: Path, source: Path) -> Path:
    """The benchmark's requests as a trace parquet (the contract sim/workload.py reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"arrived_at_s": pa.array(req.arrivals_s, pa.float64()),
                      "num_prefill_tokens": pa.array(req.input_lens, pa.int64()),
                      "num_decode_tokens": pa.array(req.output_lens, pa.int64())})
    meta = {"kind": "request_trace", "format": "vllm_bench", "file": {"path": source.name,
            "sha256": hashlib.sha256(source.read_bytes()).hexdigest()},
            "arrival_source": req.arrival_source, "assumptions": req.assumptions, "num_requests": len(req.input_lens)}
    table = table.replace_schema_metadata({b"opcast": json.dumps(meta, sort_keys=True)})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def sim_stats(result) -> dict[str, float]:
    """opcast's numbers under vLLM's key names (ms; TTFT and e2e include the engine profile's
    frontend latency, as the simulator reports them)."""
    r = result.requests
    out = {}
    out.update(vllm_bench.metric_stats(r.ttft_s, "ttft"))
    out.update(vllm_bench.metric_stats(r.tpot_s, "tpot"))
    out.update(vllm_bench.metric_stats(r.e2e_s, "e2el"))
    s = result.summary
    out.update({"mean_itl_ms": s["itl_s_mean"] * 1e3, "median_itl_ms": s["itl_s_p50"] * 1e3,
                "p99_itl_ms": s["itl_s_p99"] * 1e3})
    return out


def table(engine: dict, sims: dict[str, dict]) -> list[dict]:
    rows = []
    for name, _ in METRICS:
        for stat, _ in STATS:
            key = f"{stat}_{name}_ms"
            e = engine.get(key)
            row = {"metric": name, "stat": stat, "engine_ms": e}
            for label, s in sims.items():
                v = s.get(key)
                row[f"{label}_ms"] = v
                row[f"{label}_error_pct"] = ((v - e) / e * 100.0) if e and v is not None else None
            rows.append(row)
    return rows


def format_table(rows: list[dict], labels: list[str]) -> str:
    head = f"{'metric':<7}{'stat':<8}{'engine ms':>12}" + "".join(f"{lab + ' ms':>18}{'err %':>9}" for lab in labels)
    lines = [head]
    for r in rows:
        if r["engine_ms"] is None and all(r[f"{lab}_ms"] is None for lab in labels):
            continue
        cell = lambda v, w, p: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"   # noqa: E731
        lines.append(f"{r['metric']:<7}{r['stat']:<8}{cell(r['engine_ms'], 12, 2)}"
                     + "".join(cell(r[f'{lab}_ms'], 18, 2) + cell(r[f'{lab}_error_pct'], 9, 1) for lab in labels))
    return "\n".join(lines)


def _apply_engine_profile(cfg: DictConfig, path: str) -> None:
    """Set the CPU costs and frontend latency of an engine_profile.yaml on cfg.engine (profiles
    written before the engine group, with sim.cpu_overhead_* names and frontend_latency_ms, too)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"+engine_profile={path}: not a file (an engine_profile.yaml written by +calibrate=true)")
    prof = OmegaConf.to_container(OmegaConf.load(p))
    if all(k in prof for k in FIT_TO_ENGINE) and "frontend_latency_ms" in prof:
        prof = engine_costs(prof)
    missing = [k for k in ENGINE_COSTS if k not in prof]
    if missing:
        raise ConfigError(f"+engine_profile={path}: missing key(s) {missing}")
    with open_dict(cfg):
        for k in ENGINE_COSTS:
            cfg.engine[k] = float(prof[k])


def _round_trip(doc: dict, req: vllm_bench.BenchRequests, result) -> dict:
    r = result.requests
    engine = {"requests": len(req.input_lens), "input_tokens": int(req.input_lens.sum()),
              "output_tokens": int(req.output_lens.sum())}
    if "total_input_tokens" in doc and not req.num_failed:
        engine.update(input_tokens_in_result=int(doc["total_input_tokens"]),
                      output_tokens_in_result=int(doc["total_output_tokens"]))
    opcast = {"requests": len(r), "input_tokens": int(r.num_prefill_tokens.sum()),
              "output_tokens": int(r.num_decode_tokens.sum())}
    same = all(engine[k] == opcast[k] for k in opcast) and \
        engine.get("input_tokens_in_result", engine["input_tokens"]) == engine["input_tokens"] and \
        engine.get("output_tokens_in_result", engine["output_tokens"]) == engine["output_tokens"]
    if not same:
        raise RuntimeError(f"round trip lost requests or tokens: engine {engine}, opcast {opcast}")
    return {"engine": engine, "opcast": opcast, "equal": same}


def run(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    """Compare (and calibrate) as the module docstring says; returns what compare.json holds."""
    import sim
    from sim.core import load_op_times_for
    from sim.costs import BatchCost

    bench = cfg.get("bench")
    if not bench:
        raise ConfigError("missing +bench=RESULT.json (a `vllm bench serve --save-result` file)")
    bench = Path(str(bench))
    doc = vllm_bench.load(bench)
    if cfg.get("calibrate") and not vllm_bench.is_detailed(doc):
        raise ConfigError(f"+calibrate=true needs per-request timings: {bench.name} was saved without "
                          f"--save-detailed (no {list(vllm_bench.DETAILED)})")
    req = vllm_bench.requests(doc, bench.name, seed=int(cfg.get("bench_seed", 0)), arrivals=str(cfg.get("arrivals", "auto")))
    out_dir = Path(str(cfg.get("out") or out_dir or cfg.sim.out_dir or "outputs/compare"))
    if cfg.get("engine_profile"):
        _apply_engine_profile(cfg, str(cfg.engine_profile))
    trace = write_trace(req, out_dir / "bench_trace.parquet", bench)
    model = to_model(cfg.model)
    with open_dict(cfg):
        cfg.workload.arrival, cfg.workload.lengths, cfg.workload.trace = "trace", "trace", str(trace.resolve())
        cfg.workload.num_requests, cfg.workload.trace_time_scale = len(req.input_lens), 1.0
        cfg.sim.keep_requests, cfg.sim.out_dir = True, None
    longest = sim.max_request_tokens(cfg, model)
    total = req.input_lens + req.output_lens
    if (total > longest).any():
        i = int(np.argmax(total > longest))
        raise ConfigError(f"request {int(req.index[i])} of {bench.name} has {int(total[i])} tokens; {model.name} with "
                          f"scheduler {cfg.scheduler.name} serves at most {longest} (model/scheduler the benchmark "
                          f"did not use?)")
    op_times = load_op_times_for(cfg)     # the cfg's parallel layout (tp, pp, ep, dp_attention)
    result = sim.simulate(cfg, op_times=op_times, outputs=False)
    engine = vllm_bench.engine_stats(doc, bench.name)
    sims = {"opcast": sim_stats(result)}
    report: dict = {"bench": {"file": str(bench), "model_id": doc.get("model_id"), "request_rate": doc.get("request_rate"),
                              "burstiness": doc.get("burstiness"), "detailed": vllm_bench.is_detailed(doc),
                              "arrival_source": req.arrival_source, "assumptions": req.assumptions},
                    "deployment": {"hw": cfg.hw.name, "model": cfg.model.name, "tp": int(cfg.parallel.tp),
                                   "pp": int(cfg.parallel.pp), "replicas": int(cfg.parallel.replicas),
                                   "scheduler": cfg.scheduler.name, "op_source": result.op_source,
                                   "engine": cfg.engine.name, **{k: float(cfg.engine[k]) for k in ENGINE_COSTS}},
                    "round_trip": _round_trip(doc, req, result)}
    final = result
    if cfg.get("calibrate"):
        cost = BatchCost(op_times, model, cfg.parallel.pp, 0.0, 0.0, 0.0)
        budget = cfg.scheduler.chunk_size if cfg.scheduler.name == "sarathi" else cfg.scheduler.max_tokens_per_batch
        measured = vllm_bench.measured(doc, bench.name)
        try:
            if cfg.get("server_log"):
                log = Path(str(cfg.server_log))
                if not log.is_file():
                    raise ConfigError(f"+server_log={log}: not a file")
                iters = calibrate.iterations_from_log(log.read_text(errors="replace").splitlines())
                fit = calibrate.from_server_log(measured, iters, cost, int(budget))
            else:
                fit = calibrate.from_client_timings(measured, cost, int(budget))
        except ValueError as exc:
            raise ConfigError(f"+calibrate=true: {exc}") from None
        with open_dict(cfg):
            for k, v in engine_costs(fit).items():
                cfg.engine[k] = v
        final = sim.simulate(cfg, op_times=op_times, outputs=False)
        sims["calibrated"] = sim_stats(final)
        report["calibration"] = fit
        report["engine_profile"] = str(write_engine_profile(out_dir / "engine_profile.yaml", fit, bench, cfg))
    report["table"] = table(engine, sims)
    write_text(out_dir / "vllm_result.json", json.dumps(vllm_bench.from_simulation(final, cfg, detailed=True)))
    write_text(out_dir / "compare.json", json.dumps(report, indent=1, default=_json_default))
    report["_labels"] = list(sims)
    return report


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if math.isnan(x) else float(x)
    return str(x)


def write_engine_profile(path: Path, fit: dict, bench: Path, cfg: DictConfig) -> Path:
    """The fitted CPU-side costs as an engine profile (conf/engine) on top of the configured
    one: copy it to conf/engine/<name>.yaml and use engine=<name>, or pass +engine_profile=PATH
    here. Every value says where it came from."""
    sha = hashlib.sha256(bench.read_bytes()).hexdigest()
    src = (f"fitted by python -m sim.compare +calibrate=true on {bench.name} (sha256 {sha[:16]}) with hw="
           f"{cfg.hw.name} model={cfg.model.name} tp={cfg.parallel.tp} scheduler={cfg.scheduler.name}")
    name = f"calibrated_{bench.stem}".replace("-", "_").replace(".", "_")
    costs = engine_costs(fit)
    prof = {"defaults": [str(cfg.engine.name), "_self_"], "name": name, **costs,
            "sources": {"cpu_per_iteration_us": f"{src}: decode-gap fit intercept",
                        "cpu_per_sequence_us": f"{src}: decode-gap fit slope per sequence",
                        "cpu_per_token_us": f"{src}: solo-prefill fit slope per prompt token",
                        "frontend_latency_us": f"{src}: solo-prefill fit intercept (outside the engine loop); "
                                               f"the fit's details are in compare.json"}}
    text = (f"# Engine profile: {cfg.engine.name} with CPU-side costs fitted to a real run. Use:\n"
            f"#   cp {path} conf/engine/{name}.yaml; python -m sim.run engine={name} ...\n"
            f"#   python -m sim.compare +engine_profile={path} ...\n"
            "#   python -m sim.run ... " + " ".join(f"engine.{k}={v}" for k, v in costs.items()) + "\n"
            + OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(prof, default=_json_default)))))
    return write_text(path, text)


def _main(cfg: DictConfig) -> None:
    out_dir = None
    if not cfg.get("out") and not cfg.sim.out_dir:
        from hydra.core.hydra_config import HydraConfig
        out_dir = Path(HydraConfig.get().runtime.output_dir)
    rep = run(cfg, out_dir)
    b, d, rt = rep["bench"], rep["deployment"], rep["round_trip"]
    print(f"vLLM result {b['file']}: model {b['model_id']}, request_rate {b['request_rate']}, arrivals "
          f"{b['arrival_source']}")
    print(f"opcast: {d['model']} on {d['hw']} tp={d['tp']} pp={d['pp']} replicas={d['replicas']}, scheduler "
          f"{d['scheduler']}, op times {d['op_source']}")
    print(f"round trip: {rt['opcast']['requests']} requests, {rt['opcast']['input_tokens']} prompt + "
          f"{rt['opcast']['output_tokens']} output tokens on both sides")
    print(format_table(rep["table"], rep["_labels"]))
    if "calibration" in rep:
        c = rep["calibration"]
        print(f"calibrated: {c['cpu_overhead_per_iteration_us']} us/iteration + {c['cpu_overhead_per_sequence_us']} "
              f"us/sequence + {c['cpu_overhead_per_token_us']} us/token, frontend {c['frontend_latency_ms']} ms "
              f"({c.get('source', 'client token timestamps')}: {c.get('num_decode_gaps', c.get('decomposition', {}).get('num_iterations'))} "
              f"iterations, {c.get('num_solo_requests', 0)} solo prefills); profile "
              f"{rep['engine_profile']}")


def main() -> None:
    register()
    cli("sim", _main)


if __name__ == "__main__":
    main()
