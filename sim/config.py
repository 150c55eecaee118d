"""Structured configs of the simulate job (``conf/sim.yaml``) and its groups.

Groups: ``scheduler/`` (a replica scheduler and its batching limits), ``engine/`` (the serving
engine's CPU-side costs and execution choices), ``workload/`` (arrivals and request lengths),
``router/`` (how requests are spread over replicas). The ``sim:`` node holds run options; outputs
are off unless asked so that ``simulate`` is cheap for the search.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import conf

ARRIVALS = ("poisson", "gamma", "static", "trace")
LENGTHS = ("trace", "fixed", "uniform", "zipf")
PREFIXES = ("none", "shared", "tree", "sessions")
TOO_LONG = ("clip", "error")
QUANTILES = ("p10", "p50", "p90")
MIXED_ATTENTION = ("one_call", "split")
SPEC_METHODS = ("none", "draft", "eagle", "mtp", "ngram")
PREEMPT_MODES = ("recompute", "swap")


@dataclass
class SpecConf:
    """Speculative decoding (sim/spec.py; vLLM ``--speculative-config``)."""
    # none | draft (a smaller model, draft_model) | eagle (an EAGLE/EAGLE-3 head) | mtp (a
    # DeepSeek-style multi-token-prediction module) | ngram (prompt lookup on the CPU)
    method: str = "none"
    num_tokens: int = 3               # k: draft tokens per sequence and step (num_speculative_tokens)
    draft_model: str = ""             # method=draft: a conf/model name with the target's vocabulary
    # Per-position acceptance, as vLLM reports and its synthetic rejection sampler takes it
    # (synthetic_acceptance_rates): entry i = share of drafts whose first i+1 tokens were all
    # accepted; non-increasing, in [0, 1], at least num_tokens entries (the first num_tokens are
    # used: a position's rate does not depend on how many follow it). [] = the method's published
    # profile (sim/spec.py DEFAULTS; method=draft has none: its acceptance depends on the pair).
    acceptance: list = field(default_factory=list)
    # Share of decode steps a sequence gets a draft at all (ngram: the lookup finds a match);
    # < 0 = the method's default (1 for model proposers; ngram: measured with its profile).
    propose_rate: float = -1.0


@dataclass
class OffloadConf:
    """KV offload to CPU memory (sim/offload.py; vLLM's CPU offloading connector, LMCache)."""
    # CPU pool per engine (replica, or DP-attention rank), summed over its GPUs as vLLM's
    # kv_offloading_size is; 0 = off. Evicted cached prefix blocks go there; a later prefix
    # hit loads them back over PCIe (hw.pcie_bw_gbps) instead of recomputing them.
    cpu_gib: float = 0.0
    overlap: bool = True              # loads overlap the forward layer by layer (else they precede it)
    # recompute: a preempted request's KV is dropped (vLLM V1); swap: it is copied to the CPU
    # pool and back when the request resumes (vLLM V0's preemption_mode=swap)
    preempt: str = "recompute"


@dataclass
class SchedulerConf:
    name: str = "???"                 # a key of sim.schedulers.SCHEDULERS
    max_num_seqs: int = 128           # batch size cap (vLLM max_num_seqs)
    max_tokens_per_batch: int = 4096  # token budget of one iteration (vLLM max_num_batched_tokens)
    chunk_size: int = 512             # sarathi: token budget per iteration (prefill chunks + decodes)
    block_size: int = 16              # paged KV block, tokens
    watermark: float = 0.01           # fraction of KV blocks kept free when admitting (vLLM default)
    # Automatic prefix caching (sim/prefix_cache.py): full KV blocks stay cached after their
    # request ends and a new request reuses its longest cached prefix. vLLM v1 has it on by
    # default (conf/scheduler/vllm_v1.yaml sets true); off here for the other policies.
    prefix_caching: bool = False
    spec: SpecConf = field(default_factory=SpecConf)          # speculative decoding (off)
    offload: OffloadConf = field(default_factory=OffloadConf)  # KV offload to CPU (off)

    def __post_init__(self):   # from a plain dict (OmegaConf.to_container of the node)
        if isinstance(self.spec, dict):
            self.spec = SpecConf(**self.spec)
        if isinstance(self.offload, dict):
            self.offload = OffloadConf(**self.offload)


@dataclass
class EngineConf:
    """What the serving engine adds to the operators' GPU time, and how it runs them
    (``conf/engine/<name>.yaml``; each value there names its source)."""
    name: str = "???"
    version: str = ""                 # engine release the values describe
    # CPU time per iteration the accelerator waits for (scheduling, input preparation, sampling
    # sync, output processing): per_iteration + per_sequence x scheduled sequences + per_token x
    # scheduled tokens, on the first pipeline stage.
    cpu_per_iteration_us: float = 0.0
    cpu_per_sequence_us: float = 0.0
    cpu_per_token_us: float = 0.0
    # Per request, outside the GPU's critical path: HTTP, tokenization, hand-off to the engine
    # process, detokenization and streaming. Added to each request's TTFT and e2e.
    frontend_latency_us: float = 0.0
    # CUDA graphs (GPU cards only): batches of at most max(cuda_graph_sizes) tokens run a captured
    # graph padded to the next captured size; [] = eager. graph_mixed_batches: the graph also
    # runs batches with prefill tokens (vLLM v1's piecewise graphs), else decode-only batches.
    cuda_graph_sizes: list[int] = field(default_factory=list)
    graph_mixed_batches: bool = False
    # Tensor-parallel all-reduce: the engine's custom all-reduce for messages below this many
    # bytes, NCCL above (0 = NCCL always).
    custom_allreduce_max_bytes: int = 0
    # one_call: the prefill and decode attention of a mixed batch run as one kernel call (vLLM
    # v1); split: two calls.
    mixed_attention: str = "one_call"
    sources: dict[str, str] = field(default_factory=dict)   # field -> where its value comes from


@dataclass
class WorkloadConf:
    name: str = "???"
    num_requests: int = 300
    arrival: str = "poisson"          # poisson | gamma | static | trace
    qps: float = 2.0                  # poisson/gamma rate, requests per second (whole deployment;
    #                                   prefix=sessions: new sessions per second)
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
    # Prefix structure (what prefix caching can reuse; traces: their prefix_hashes column):
    #   none: no shared prefixes; shared: every prompt starts with one of num_system_prompts
    #   system prompts; tree: a system prompt, then one path down a tree of tree_depth levels,
    #   tree_branching children per node, tree_segment_tokens each (agents sharing tool/task
    #   context); sessions: multi-turn chats - each turn's prompt is the system prompt, every
    #   earlier question and answer, and a new question; the next turn is sent think_time_s
    #   (exponential mean) after the answer. The lengths above give each request's own part
    #   (sessions: each turn's question and answer); prompt = shared prefix + own part.
    prefix: str = "none"              # none | shared | tree | sessions
    system_prompt_tokens: int = 0     # shared/tree/sessions: tokens of the system prompt
    num_system_prompts: int = 1       # shared: distinct system prompts (one drawn per request)
    tree_depth: int = 2               # tree: levels below the system prompt
    tree_branching: int = 4           # tree: children per node (drawn uniformly per request)
    tree_segment_tokens: int = 256    # tree: tokens per tree level
    turns: int = 5                    # sessions: turns per session; num_requests counts turns
    think_time_s: float = 10.0        # sessions: mean pause between an answer and the next turn
    # A request longer than max_request_tokens (prompt + output): "clip" shortens it (the longer
    # side first) and the run reports how many were clipped; "error" refuses the run before it
    # starts, as a server with that max_model_len refuses such requests.
    too_long: str = "clip"


@dataclass
class RouterConf:
    name: str = "round_robin"         # random | round_robin | least_outstanding | prefix_affinity
    # prefix_affinity: the replica caching the longest prefix among those with at most this
    # many outstanding requests above the least-loaded one. A modelling choice (llm-d weighs a
    # prefix scorer against load scorers instead; SGLang's router uses such a threshold).
    max_imbalance: int = 16


@dataclass
class PoolConf:
    """One pool of a disaggregated deployment: its GPU, layout and scheduler overrides."""
    hw: str = ""                      # a conf/hw name; "" = the config's hw
    tp: int = 0                       # 0 = parallel.tp
    pp: int = 0                       # 0 = parallel.pp
    replicas: int = 1
    scheduler: Dict[str, Any] = field(default_factory=dict)   # overrides of the scheduler node for this pool


@dataclass
class KvTransferConf:
    """How the KV cache moves from a prefill to a decode replica (sim/kv_transfer.py)."""
    link: str = "auto"                # auto | nvlink | network
    # true: the KV of each layer is sent as soon as the prefill computed it (LMCache, Mooncake,
    # DistServe), so the transfer hides behind the prompt's own prefill; false: it starts once
    # the prefill is done (vLLM's NixlConnector pulls the finished request's blocks)
    overlap: bool = False
    bw_gbps: float = 0.0              # > 0: per-GPU bandwidth, GB/s, instead of the hw cards'
    latency_us: float = -1.0          # >= 0: per-transfer latency instead of the cards' network latency


@dataclass
class DeploymentConf:
    """colocated: every replica prefills and decodes (parallel.*). disaggregated (sim/disagg.py):
    a prefill pool and a decode pool, the KV cache handed over between them."""
    name: str = "colocated"           # colocated | disaggregated
    prefill: PoolConf = field(default_factory=PoolConf)
    decode: PoolConf = field(default_factory=PoolConf)
    prefill_router: str = "least_outstanding"   # a sim.router name, over the prefill replicas
    decode_router: str = "least_outstanding"    # over the decode replicas (no prefix cache there)
    kv_transfer: KvTransferConf = field(default_factory=KvTransferConf)


def deployment_name(cfg) -> str:
    """The deployment family of a sim config (colocated | disaggregated); a config without a
    deployment node (stored before there were families) is colocated."""
    node = cfg.get("deployment") if hasattr(cfg, "get") else None
    return str(node.get("name", "colocated")) if node else "colocated"


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
    # (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS); earlier versions (engine=vllm_v1 is 0.8)
    # capture graphs after sizing the KV cache: 0. Not measured here.
    cuda_graph_gib: float = 0.0
    # Former names of engine.cpu_per_{iteration,sequence,token}_us: when set they override the
    # engine profile's value (kept so existing overrides and bench/fidelity keep working).
    cpu_overhead_per_iteration_us: Optional[float] = None
    cpu_overhead_per_sequence_us: Optional[float] = None
    cpu_overhead_per_token_us: Optional[float] = None
    print_summary: bool = True
    # vllm_result.json (written beside summary.json, `vllm bench serve --save-result` schema):
    # include the per-request lists as --save-detailed does (needs keep_requests).
    vllm_detailed: bool = True
    progress: bool = True             # progress bar with ETA on stderr for runs longer than ~2 s
    # Goodput (DistServe): requests whose own TTFT and TPOT are both within these limits, per
    # second and per GPU (summary goodput_rps, goodput_rps_per_gpu, slo_attainment). Your SLOs,
    # not measurements; 0 = not judged. Needs keep_requests.
    goodput_ttft_s: float = 2.0
    goodput_tpot_s: float = 0.1


def register() -> None:
    """Register the shared and the simulator schemas; idempotent."""
    from hydra.core.config_store import ConfigStore   # here: importing hydra costs 0.1 s
    conf.register()
    cs = ConfigStore.instance()
    cs.store(group="scheduler", name="scheduler_schema", node=SchedulerConf)
    cs.store(group="workload", name="workload_schema", node=WorkloadConf)
    cs.store(group="router", name="router_schema", node=RouterConf)
    cs.store(group="engine", name="engine_schema", node=EngineConf)
    cs.store(group="sim", name="sim_schema", node=SimConf)
    cs.store(group="deployment", name="deployment_schema", node=DeploymentConf)


def compose(overrides: Sequence[str] = ()):
    """The composed ``conf/sim.yaml`` with ``overrides`` (what ``python -m sim.run`` would see)."""
    register()
    return conf.compose("sim", overrides)


def option_node(group: str, name: str, where: str = ""):
    """The composed node of one option of a config group (``hw``, ``scheduler``, ...) as Hydra
    composes it for ``group=name``: what a disaggregated pool naming another GPU and the search
    comparing GPUs both price with. An unknown name fails with the group's options, prefixed by
    ``where`` (the setting that named it)."""
    if name not in conf.choices(group):
        raise conf.ConfigError(f"{where + ': ' if where else ''}unknown {group} {name!r}; "
                               f"choose one of {', '.join(conf.choices(group))}")
    return _compose_cached((f"{group}={name}",))[group].copy()   # a copy: callers may not share edits


@functools.lru_cache(maxsize=64)
def _compose_cached(overrides: tuple):
    # Cached: a composition depends only on the YAML files and these overrides, and the search
    # asks for each GPU of its space once per candidate.
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():    # inside a Hydra app (python -m sim.run / sim.search)
        return hydra_compose("sim", list(overrides))
    return compose(list(overrides))


conf.add_registrar(register)
