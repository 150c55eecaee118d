"""Simulate one serving deployment on a workload and report its latency and throughput.

    python -m sim.run                      # Llama-2-7B on A100, vLLM v1, Splitwise conversation
    python -m sim.run hw=h100 model=llama2-70b parallel.tp=4 scheduler=sarathi \
        workload=splitwise_conv workload.qps=2 [sim.out_dir=DIR] [sim.band=true]

Prints the summary table and writes requests.parquet, summary.json, timeline.parquet,
cdf.svg, timeseries.svg and trace.json (Perfetto) to sim.out_dir (default: a new directory
outputs/sim/<hw>-<model>-<scheduler>-<workload>/<time>, claimed before the run starts; a
directory that holds a run is never written over). ``sim.band=true`` repeats the run with the
estimator's p10 and p90 operator times and reports each metric in the three runs and its band
over them.

Exit codes: 0 done, 2 bad input (one ``error:`` line), 1 an unexpected failure (traceback).
"""
from __future__ import annotations

from omegaconf import DictConfig, open_dict

from conf import cli, resolve_model
from sim.core import SimResult, simulate

BAND_METRICS = ("ttft_s_p50", "ttft_s_p90", "tpot_s_p50", "tpot_s_p90", "e2e_s_p50", "e2e_s_p90",
                "throughput_tok_s")


def run(cfg: DictConfig) -> SimResult:
    """Simulate cfg (writing outputs to cfg.sim.out_dir when set); with sim.band, also the band:
    each metric of the runs with the estimator's p10, p50 and p90 operator times, and its
    (low, p50 run, high) over those runs."""
    runs = {}
    if cfg.sim.band:
        from sim.core import load_op_times_for
        for q in ("p10", "p90"):
            runs[q] = simulate(cfg, op_times=load_op_times_for(cfg, q), outputs=False).summary
    result = simulate(cfg)
    if cfg.sim.band:
        runs["p50"] = result.summary
        result.band_runs = {k: {q: runs[q][k] for q in ("p10", "p50", "p90")} for k in BAND_METRICS}
        result.band = {k: (min(v.values()), v["p50"], max(v.values())) for k, v in result.band_runs.items()}
        if cfg.sim.out_dir:   # rewrite summary.json with the band
            from sim.outputs import write_outputs
            write_outputs(result, cfg)
    return result


def layer_split(num_layers: int, pp: int) -> str:
    """How pipeline stages share the layers, e.g. "32 layers as 7+7+6+6+6"."""
    from conf.shapes import stage_layers
    return f"{num_layers} layers as {'+'.join(map(str, stage_layers(num_layers, pp)))}"


def _main(cfg: DictConfig) -> None:
    from sim.outputs import claim_run_dir, run_dir_name, summary_table
    model = resolve_model(cfg)           # model.hf_config: name the config.json's model
    out = claim_run_dir(cfg.sim.out_dir, run_dir_name(cfg, model.name))
    with open_dict(cfg):
        cfg.sim.out_dir = str(out)
    result = run(cfg)
    s, par = result.summary, cfg.parallel
    stages = f" ({layer_split(model.num_layers, par.pp)})" if par.pp > 1 else ""
    sparse = (f" ep={par.ep} dp_attention={str(par.dp_attention).lower()}"
              if par.get("ep", 1) > 1 or par.get("dp_attention", False) else "")
    if cfg.deployment.name == "disaggregated":
        from sim.disagg import describe
        where = describe(cfg, result)
    else:
        where = f"{cfg.hw.name} tp={par.tp} pp={par.pp}{stages}{sparse} replicas={par.replicas}"
    print(f"{model.name} on {where}, scheduler {cfg.scheduler.name}, workload "
          f"{cfg.workload.name} ({int(s['num_requests'])} requests, {cfg.workload.arrival} "
          f"{cfg.workload.qps if cfg.workload.arrival in ('poisson', 'gamma') else ''}), "
          f"KV {result.memory.num_blocks} blocks x {result.memory.block_size}"
          f"{' per decode replica' if cfg.deployment.name == 'disaggregated' else ''}, op times: {result.op_source}")
    print(summary_table(s, result.band, result.band_runs))
    print(f"outputs in {cfg.sim.out_dir}")


def main() -> None:
    cli("sim", _main)


if __name__ == "__main__":
    main()
