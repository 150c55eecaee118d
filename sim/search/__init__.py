"""Deployment search: the cheapest deployment that meets latency SLOs, by simulation.

    python -m sim.search model=llama2-70b workload=splitwise_conv slo.ttft_p90_s=2 slo.tbt_p99_s=0.2

Modules: run (the job: space -> capacities -> ranking, outputs, CLI), space (candidates and
their hashes), pools (colocated vs disaggregated prefill/decode candidates), capacity (max QPS
under the SLOs by bracket + bisection over seeds), exec (process pool / serial / Ray
executors), points (the resumable points file), report (ranking, Pareto plot, explanations).
"""
from sim.search.run import (NUM_REQUESTS_KEY, QPS_KEY, SEED_KEY, SearchConf, SearchOutcome, compose,
                            main, run_search, search_conf, summary_table)

__all__ = ["NUM_REQUESTS_KEY", "QPS_KEY", "SEED_KEY", "SearchConf", "SearchOutcome", "compose", "main",
           "run_search", "search_conf", "summary_table"]
