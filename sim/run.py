"""Simulate one serving deployment on a workload and report its latency and throughput.

    python -m sim.run                      # Llama-2-7B on A100, vLLM v1, Splitwise conversation
    python -m sim.run hw=h100 model=llama2-70b parallel.tp=4 scheduler=sarathi \
        workload=splitwise_conv workload.qps=2 [sim.out_dir=DIR] [sim.band=true]

Prints the summary table and writes requests.parquet, summary.json, timeline.parquet,
cdf.png, timeseries.png and trace.json (Perfetto) to sim.out_dir (default: Hydra's run dir
under outputs/sim/). ``sim.band=true`` repeats the run with the estimator's p10 and p90
operator times and reports the band of the headline metrics.
"""
from __future__ import annotations


from omegaconf import DictConfig, open_dict

from conf import cli
from sim.config import register
from sim.core import SimResult, simulate

BAND_METRICS = ("ttft_s_p50", "ttft_s_p90", "tpot_s_p50", "tpot_s_p90", "e2e_s_p50", "e2e_s_p90",
                "throughput_tok_s")


def run(cfg: DictConfig) -> SimResult:
    """Simulate cfg (writing outputs to cfg.sim.out_dir when set); with sim.band, also the band."""
    band = None
    if cfg.sim.band:
        from sim.core import load_op_times_for
        runs = {}
        for q in ("p10", "p90"):
            runs[q] = simulate(cfg, op_times=load_op_times_for(cfg, q), outputs=False).summary
    result = simulate(cfg)
    if cfg.sim.band:
        band = {k: (runs["p10"][k], result.summary[k], runs["p90"][k]) for k in BAND_METRICS}
        result.band = band
        if cfg.sim.out_dir:   # rewrite summary.json with the band
            from sim.outputs import write_outputs
            write_outputs(result, cfg)
    return result


def _main(cfg: DictConfig) -> None:
    if not cfg.sim.out_dir:
        from hydra.core.hydra_config import HydraConfig
        with open_dict(cfg):
            cfg.sim.out_dir = HydraConfig.get().runtime.output_dir
    result = run(cfg)
    from sim.outputs import summary_table
    s = result.summary
    par = cfg.parallel
    sparse = (f" ep={par.ep} dp_attention={str(par.dp_attention).lower()}"
              if par.get("ep", 1) > 1 or par.get("dp_attention", False) else "")
    print(f"{cfg.model.name} on {cfg.hw.name} tp={par.tp} pp={par.pp}{sparse} "
          f"replicas={par.replicas}, scheduler {cfg.scheduler.name}, workload "
          f"{cfg.workload.name} ({int(s['num_requests'])} requests, {cfg.workload.arrival} "
          f"{cfg.workload.qps if cfg.workload.arrival in ('poisson', 'gamma') else ''}), "
          f"KV {result.memory.num_blocks} blocks x {result.memory.block_size}, op times: {result.op_source}")
    print(summary_table(s, result.band))
    print(f"outputs in {cfg.sim.out_dir}")


def main() -> None:
    register()
    cli("sim", _main)


if __name__ == "__main__":
    main()
