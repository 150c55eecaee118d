"""Discrete-event simulator of LLM serving deployments; runs on CPU from the shipped data.

API (what ``python -m sim.run`` and the search build on)::

    import sim
    cfg = sim.compose(["hw=h100", "model=llama2-70b", "parallel.tp=4", "workload.qps=2"])
    result = sim.simulate(cfg)                    # outputs only if cfg.sim.out_dir is set
    result.summary["ttft_s_p90"], result.requests  # dict[str, float], DataFrame or None

- ``compose(overrides)``: the composed ``conf/sim.yaml`` (groups hw, model, scheduler,
  workload, router; nodes parallel {tp, pp, replicas}, seed, sim {out_dir, keep_requests, ...}).
- ``simulate(cfg, op_times=None) -> SimResult``. Pass ``op_times`` (from
  ``estimator.runtime.load_op_times(hw, model, tp, quantile)``) to reuse one across calls with
  other QPS/seeds; its attention memo stays warm. Raises ``conf.ConfigError("... does not fit
  ...")`` when the model does not fit at that tp/pp, and ConfigError for other bad input.
- ``SimResult.summary`` keys: ``<metric>_<stat>`` for metric in ttft_s, tpot_s, itl_s, e2e_s,
  norm_e2e_s, sched_delay_s and stat in mean, p50, p90, p99; throughput_rps,
  throughput_tok_s (output tokens/s), num_requests, num_preemptions, num_iterations, mfu, mbu
  (whole deployment over the simulated time), kv_util_mean (time-weighted), kv_util_peak,
  batch_size_mean (per iteration), sim_time_s (simulated end time), prefix_hit_rate,
  prefix_block_hit_rate, prefill_tokens_saved, kv_evictions (prefix caching; 0 without),
  wall_s, loop_wall_s; with speculative decoding spec_num_drafts, spec_num_draft_tokens,
  spec_num_accepted_tokens, spec_acceptance_length_mean, spec_acceptance_rate and
  spec_acceptance_rate_pos<i>; with KV offload prefix_hit_rate_cpu, prefill_tokens_loaded,
  offload_bytes_to_gpu, offload_bytes_to_cpu, offload_cpu_evictions, offload_swap_outs,
  offload_transfer_s; goodput_rps, goodput_rps_per_gpu, slo_attainment (sim.goodput_*_s), gpus;
  with ``deployment=disaggregated`` (sim.disagg) prefill_queue_s, prefill_s, kv_wait_s,
  kv_transfer_s, decode_queue_s (_mean, _p90), {prefill,decode}_kv_util_{mean,peak},
  kv_transfer_bytes, num_kv_transfers. ``.requests``: one row per request (ids, times, lengths,
  num_cached_tokens, ttft_s, tpot_s, e2e_s, ...) when ``sim.keep_requests`` (default);
  ``.replicas``: per replica, requests routed, KV use and prefix cache figures;
  ``.memory``: the MemoryPlan.
- ``memory_plan(hw, model, tp, pp, block_size=16, gpu_memory_utilization=0.9, ...) ->
  MemoryPlan`` (``.fits``, ``.num_blocks``, ``.reason``) and ``plan_for(cfg)``: whether and how a
  deployment fits, without simulating - the search skips configs with ``.reason``.
- ``SCHEDULERS`` (name -> class with ``schedule(now, running, waiting, blocks)``), ``ROUTERS``.

Modules: engine (event loop, fast-forward of steady decodes), disagg (prefill/decode pools and
the KV hand-off), kv_transfer (its link and time), costs (batch time from OpTimes),
memory (KV capacity), prefix_cache (vLLM v1's automatic prefix caching), spec (speculative
decoding), offload (a CPU tier below the prefix cache, swap preemption), workload (arrivals,
lengths, traces, shared prefixes, multi-turn sessions), router, metrics (streaming stats),
outputs (parquet, plots, Perfetto), schedulers/ (one file per policy), run (CLI), bench.
"""
from sim.config import compose, register
from sim.core import SimResult, max_request_tokens, plan_for, simulate
from sim.router import ROUTERS
from sim.memory import MemoryPlan, memory_plan
from sim.schedulers import SCHEDULERS

__all__ = ["compose", "simulate", "SimResult", "memory_plan", "MemoryPlan", "plan_for",
           "max_request_tokens", "SCHEDULERS", "ROUTERS", "register"]
