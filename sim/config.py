"""Structured configs of the simulate job (``conf/sim.yaml``) and its groups.

Groups: ``scheduler/`` (a replica scheduler and its batching limits), ``workload/`` (arrivals
and request lengths), ``router/`` (how requests are spread over replicas). The ``sim:`` node
holds run options; outputs are off unless asked so that ``simulate`` is cheap for the search.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore

import conf

ARRIVALS = ("poisson", "gamma", "static", "trace")
LENGTHS = ("trace", "fixed", "uniform", "zipf")
QUANTILES = ("p10", "p50", "p90")


@dataclass
class SchedulerConf:
    name: str = "???"                 # a key of sim.schedulers.SCHEDULERS
    max_num_seqs: int = 128           # batch size cap (vLLM max_num_seqs)
    max_tokens_per_batch: int = 4096  # token budget of one iteration (vLLM max_num_batched_tokens)
    chunk_size: int = 512             # sarathi: token budget per iteration (prefill chunks + decodes)
    block_size: int = 16              # paged KV block, tokens
    watermark: float = 0.01           # fraction of KV blocks kept free when admitting (vLLM default)


@dataclass
class WorkloadConf:
    name: str = "???"
    num_requests: int = 300
    arrival: str = "poisson"          # poisson | gamma | static | trace
    qps: float = 2.0                  # poisson/gamma rate, requests per second (whole deployment)
    cv: float = 1.0                   # gamma: coefficient of variation of inter-arrival times
    trace_time_scale: float = 1.0     # trace arrivals: multiply recorded times (0.5 = twice as fast)
    lengths: str = "trace"            # trace | fixed | uniform | zipf
    trace: str = ""                   # data/traces/<trace>.parquet, or a path to a parquet file
    prefill_tokens: int = 512         # fixed
    decode_tokens: int = 128          # fixed
    min_tokens: int = 64              # uniform/zipf: total tokens per request, inclusive range
    max_tokens: int = 4096
    zipf_theta: float = 0.6           # zipf exponent over total length
    prefill_decode_ratio: float = 8.0  # uniform/zipf: how the total splits into prompt : output
    max_request_tokens: int = 0       # clip prompt+output; 0 = the model's max_position


@dataclass
class RouterConf:
    name: str = "round_robin"         # random | round_robin | least_outstanding


@dataclass
class SimConf:
    out_dir: Optional[str] = None     # None: no files (simulate) / Hydra's run dir (python -m sim.run)
    data_dir: str = "data"            # traces in <data_dir>/traces, estimators in <data_dir>/estimators
    keep_requests: bool = True        # keep per-request rows (SimResult.requests); off = streaming only
    fast_forward: bool = True         # batch steady decode iterations into one event (same results)
    trace: bool = True                # Perfetto/Chrome JSON of batches (only when writing outputs)
    plots: bool = True                # CDF and time-series PNGs (only when writing outputs)
    max_trace_events: int = 200000
    op_quantile: str = "p50"          # estimator quantile used for operator times
    band: bool = False                # also run with p10 and p90 operator times; report a band
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int = 0  # >0: use this many KV blocks per replica (as vLLM's option)
    # KV capacity as vLLM computes it (sim/memory.py): gpu_memory_utilization x memory - weights -
    # profile-run activations - NCCL buffers - CUDA graphs. reserved_gib: any further allowance.
    reserved_gib: float = 0.0
    # CUDA-graph pool counted against the KV budget: vLLM >= 0.21 estimates it at start-up
    # (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS); earlier versions capture graphs after sizing
    # the KV cache (0). Not measured here: engine profiles set it.
    cuda_graph_gib: float = 0.0
    # CPU time per iteration (scheduling, input preparation, sampling, output processing) that
    # the GPU waits for. A modelling assumption of the order vLLM v0 shows on GPUs (ms per
    # iteration, Vidur §cpu_overhead); not measured here - the fidelity work calibrates it.
    cpu_overhead_per_iteration_us: float = 1000.0
    cpu_overhead_per_sequence_us: float = 10.0
    # Per scheduled token (input ids/positions/slot mapping, and what the engine's forward adds
    # to the isolated operators per token); 0 by default, fitted by bench/fidelity.
    cpu_overhead_per_token_us: float = 0.0
    print_summary: bool = True
    # vllm_result.json (written beside summary.json, `vllm bench serve --save-result` schema):
    # include the per-request lists as --save-detailed does (needs keep_requests).
    vllm_detailed: bool = True


def register() -> None:
    """Register the shared and the simulator schemas; idempotent."""
    conf.register()
    cs = ConfigStore.instance()
    cs.store(group="scheduler", name="scheduler_schema", node=SchedulerConf)
    cs.store(group="workload", name="workload_schema", node=WorkloadConf)
    cs.store(group="router", name="router_schema", node=RouterConf)
    cs.store(group="sim", name="sim_schema", node=SimConf)


def compose(overrides: Sequence[str] = ()):
    """The composed ``conf/sim.yaml`` with ``overrides`` (what ``python -m sim.run`` would see)."""
    register()
    return conf.compose("sim", overrides)
