"""``simulate(cfg) -> SimResult``: build the replicas of one deployment and run a workload."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from conf import ConfigError, check_fields, shapes, to_hw, to_model, warn_once
from conf.schema import ParallelConf
from sim.config import (MIXED_ATTENTION, QUANTILES, EngineConf, RouterConf, SchedulerConf, SimConf, WorkloadConf,
                        deployment_name)
from sim.costs import BatchCost
from sim.engine import Engine, Replica
from sim.router import ROUTERS
from sim.memory import MemoryPlan, memory_plan
from sim.metrics import Metrics, prefix_stats, replica_rows
from sim.prefix_cache import PrefixCache
from sim.schedulers import SCHEDULERS
from sim.schedulers.common import Blocks
from sim import offload, spec
from sim import workload as workloads


@dataclass
class SimResult:
    summary: dict[str, float]
    columns: dict | None = None        # per-request numpy columns, when sim.keep_requests
    memory: MemoryPlan | None = None
    timeline: list = field(default_factory=list)   # (t_s, replica, kv_used_frac, batch, running, waiting,
    #                                                 kv_cached_frac, prefix_hit_rate so far)
    trace: list = field(default_factory=list)      # (replica, stage, start_s, dur_s, kind, batch, tokens)
    op_source: str = ""
    band: dict | None = None           # metric -> (low, p50 run, high) over the sim.band runs
    band_runs: dict | None = None      # metric -> {"p10": ..., "p50": ..., "p90": ...} per op-time run
    replicas: list = field(default_factory=list)   # per replica: requests, KV use, prefix cache
    _frame: object = field(default=None, repr=False)

    @property
    def requests(self):
        """One row per request (pandas DataFrame, built on first use), None when not kept."""
        if self._frame is None and self.columns is not None:
            import pandas as pd
            self._frame = pd.DataFrame(self.columns)
        return self._frame


def _validate(cfg: DictConfig) -> None:
    sc, wl = cfg.scheduler, cfg.workload
    if sc.name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name={sc.name!r}; choose one of {sorted(SCHEDULERS)}")
    if cfg.router.name not in ROUTERS:
        raise ConfigError(f"router.name={cfg.router.name!r}; choose one of {sorted(ROUTERS)}")
    if cfg.sim.op_quantile not in QUANTILES:
        raise ConfigError(f"sim.op_quantile={cfg.sim.op_quantile!r}; choose one of {list(QUANTILES)}")
    for name in ("max_num_seqs", "max_tokens_per_batch", "chunk_size", "block_size"):
        if sc[name] < 1:
            raise ConfigError(f"scheduler.{name}={sc[name]} must be >= 1")
    if not 0 <= sc.watermark < 1:
        raise ConfigError(f"scheduler.watermark={sc.watermark} must be in [0, 1)")
    if cfg.parallel.replicas < 1:
        raise ConfigError(f"parallel.replicas={cfg.parallel.replicas} must be >= 1")
    if cfg.router.name == "prefix_affinity" and not sc.get("prefix_caching", False):
        raise ConfigError("router.name=prefix_affinity routes by cached prefixes; it needs "
                          "scheduler.prefix_caching=true")
    if cfg.router.get("max_imbalance", 0) < 0:
        raise ConfigError(f"router.max_imbalance={cfg.router.max_imbalance} must be >= 0")
    for name, schema in (("workload", WorkloadConf), ("scheduler", SchedulerConf), ("router", RouterConf),
                         ("sim", SimConf), ("parallel", ParallelConf)):
        check_fields(cfg[name], schema, name)
    workloads.validate(wl)


def engine_profile(cfg: DictConfig) -> EngineConf:
    """The engine profile of cfg (``engine=<name>``), with the former ``sim.cpu_overhead_*``
    overrides applied on top when given; checked."""
    eng = EngineConf(**OmegaConf.to_container(cfg.engine, resolve=True))
    for old, new in (("cpu_overhead_per_iteration_us", "cpu_per_iteration_us"),
                     ("cpu_overhead_per_sequence_us", "cpu_per_sequence_us"),
                     ("cpu_overhead_per_token_us", "cpu_per_token_us")):
        value = cfg.sim.get(old)
        if value is not None:
            setattr(eng, new, float(value))
    for name in ("cpu_per_iteration_us", "cpu_per_sequence_us", "cpu_per_token_us", "frontend_latency_us",
                 "custom_allreduce_max_bytes"):
        if getattr(eng, name) < 0:
            raise ConfigError(f"engine.{name}={getattr(eng, name)} must be >= 0")
    if any(s < 1 for s in eng.cuda_graph_sizes):
        raise ConfigError(f"engine.cuda_graph_sizes={list(eng.cuda_graph_sizes)} must hold sizes >= 1")
    if eng.mixed_attention not in MIXED_ATTENTION:
        raise ConfigError(f"engine.mixed_attention={eng.mixed_attention!r}; choose one of {list(MIXED_ATTENTION)}")
    return eng


def max_request_tokens(cfg: DictConfig, model) -> int:
    """Longest request (prompt + output) the deployment serves: workload.max_request_tokens, or
    the model's max_position - capped at the token budget for schedulers without chunking
    (a whole prompt must fit one iteration, as vLLM v0 requires)."""
    sc, wl = cfg.scheduler, cfg.workload
    chunked = SCHEDULERS[sc.name].chunked
    if wl.max_request_tokens:
        limit = wl.max_request_tokens
        if limit > model.max_position:
            raise ConfigError(f"workload.max_request_tokens={limit} exceeds {model.name}'s "
                              f"max_position {model.max_position}")
        if not chunked and limit > sc.max_tokens_per_batch:
            raise ConfigError(f"workload.max_request_tokens={limit} exceeds scheduler.max_tokens_per_batch="
                              f"{sc.max_tokens_per_batch}; {sc.name} runs whole prompts in one iteration")
        return limit
    return model.max_position if chunked else min(model.max_position, sc.max_tokens_per_batch)


def plan_for(cfg: DictConfig, hw=None, model=None) -> MemoryPlan:
    """The memory plan of cfg's deployment (see ``sim.memory.memory_plan``): per replica, or per
    DP-attention rank under ``parallel.dp_attention``."""
    hw, model = hw or to_hw(cfg.hw), model or to_model(cfg.model)
    sc = cfg.scheduler
    spec.validate(cfg)          # speculative decoding and KV offload: settings the scheduler runs
    offload.validate(cfg, hw)
    budget = sc.chunk_size if sc.name == "sarathi" else sc.max_tokens_per_batch
    lay = shapes.layout_of(model, cfg.parallel)
    plan = memory_plan(hw, model, block_size=sc.block_size, layout=lay,
                       gpu_memory_utilization=cfg.sim.gpu_memory_utilization,
                       reserved_gib=cfg.sim.reserved_gib, cuda_graph_gib=cfg.sim.get("cuda_graph_gib", 0.0),
                       max_tokens_per_batch=budget, max_num_seqs=sc.max_num_seqs,
                       max_model_len=max_request_tokens(cfg, model))
    if spec.enabled(sc):        # a draft model or head takes its weights and KV from the cache
        plan = spec.plan_with_proposer(plan, cfg, model, lay, max_request_tokens(cfg, model))
    return plan


def load_op_times_for(cfg: DictConfig, quantile: str | None = None):
    """The OpTimes of cfg's hw, model and parallel layout (``estimator.runtime.load_op_times``)."""
    from estimator.runtime import load_op_times
    hw, model = to_hw(cfg.hw), to_model(cfg.model)
    return load_op_times(hw, model, int(cfg.parallel.tp), quantile=quantile or cfg.sim.op_quantile,
                         data_dir=str(workloads.resolve_data_dir(cfg.sim.data_dir)),
                         layout=shapes.layout_of(model, cfg.parallel))


def warn_layout(hw, lay: shapes.Layout) -> None:
    """Tensor parallelism across nodes works but is slow (every layer all-reduces over the
    network); vLLM's and SGLang's guides put TP within a node and PP (or EP) across nodes."""
    if lay.tp > hw.devices_per_node:
        from estimator.model import warn_once
        warn_once(("tp-across-nodes", hw.name, lay.tp),
                  f"parallel.tp={lay.tp} spans nodes of {hw.devices_per_node} GPUs ({hw.name}): its all-reduces "
                  f"run over the network; keep tp <= {hw.devices_per_node} and use pp across nodes")


@dataclass
class Prepared:
    """What one (colocated) deployment config resolves to before it runs."""
    hw: object
    model: object
    lay: shapes.Layout
    plan: MemoryPlan
    engine: EngineConf
    sched: SchedulerConf
    longest: int               # longest request (prompt + output), tokens


def prepare(cfg: DictConfig) -> Prepared:
    """Check cfg and size its replicas' KV cache; ConfigError when it cannot run."""
    _validate(cfg)
    engine = engine_profile(cfg)   # checked before the (slow) operator tables are built
    hw, model = to_hw(cfg.hw), to_model(cfg.model)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    lay = shapes.layout_of(model, cfg.parallel)
    warn_layout(hw, lay)
    plan = plan_for(cfg, hw, model)
    if not plan.fits:
        raise ConfigError(plan.reason)
    if cfg.sim.num_gpu_blocks_override > 0:
        plan = dataclasses.replace(plan, num_blocks=int(cfg.sim.num_gpu_blocks_override))
    sc = cfg.scheduler
    longest = max_request_tokens(cfg, model)
    free_blocks = plan.num_blocks - int(sc.watermark * plan.num_blocks)
    if -(-(longest + spec.lookahead(sc)) // sc.block_size) + 1 > free_blocks:
        raise ConfigError(f"{model.name} does not fit on {hw.name} at tp={tp} pp={pp}: "
                          f"{plan.num_blocks} KV blocks minus the watermark cannot hold one "
                          f"{longest}-token request")
    sched = SchedulerConf(**OmegaConf.to_container(sc, resolve=True))  # plain attrs: fast
    return Prepared(hw, model, lay, plan, engine, sched, longest)


def check_op_times(cfg: DictConfig, op_times, prep: Prepared) -> None:
    tp, model, lay = cfg.parallel.tp, prep.model, prep.lay
    if getattr(op_times, "tp", tp) != tp or getattr(getattr(op_times, "model", model), "name", model.name) != model.name:
        raise ConfigError("op_times was loaded for another model/tp than cfg asks for")
    if getattr(op_times, "layout", lay).ep != lay.ep or getattr(op_times, "layout", lay).dp != lay.dp:
        raise ConfigError("op_times was loaded for another expert/data-parallel layout than cfg asks for")


def make_replicas(cfg: DictConfig, prep: Prepared, op_times, first_idx: int = 0) -> list[Replica]:
    """The engine cores of cfg's deployment (each DP-attention rank is its own, as in vLLM),
    numbered from first_idx."""
    sc, sched_conf, plan, hw = cfg.scheduler, prep.sched, prep.plan, prep.hw
    draft = spec.draft_cost(cfg, prep.engine, hw) if sched_conf.spec.method == "draft" else None
    replicas = []
    for i in range(cfg.parallel.replicas * prep.lay.dp):
        cost = BatchCost(op_times, prep.model, cfg.parallel.pp, engine=prep.engine,
                         interconnect=hw.interconnect, graphs=hw.device == "cuda")
        if sched_conf.offload.cpu_gib > 0:
            blocks = offload.make_cache(sched_conf, plan, prep.lay, hw, cost.layers)
        else:
            blocks = (PrefixCache if sched_conf.prefix_caching else Blocks)(plan.num_blocks, sc.block_size,
                                                                             sc.watermark)
        replicas.append(Replica(first_idx + i, SCHEDULERS[sc.name](sched_conf), blocks, cost, cfg.parallel.pp))
        if spec.enabled(sched_conf):
            spec.attach(replicas[-1], sched_conf, int(cfg.seed), draft)
    return replicas


def request_stream(cfg: DictConfig, longest: int, block_size: int):
    """(WorkloadConf, the request stream, counts): the trace is checked here."""
    wl = WorkloadConf(**OmegaConf.to_container(cfg.workload, resolve=True))
    counts: dict = {}
    stream = workloads.requests(wl, int(cfg.seed), longest, cfg.sim.data_dir, block_size, counts)
    return wl, stream, counts


def run_loop(loop: Engine, metrics: Metrics, stream, cfg: DictConfig, wl: WorkloadConf) -> tuple[float, float]:
    """Run the event loop over the stream; (simulated end time, loop wall seconds)."""
    t_loop = time.perf_counter()
    with Progress(metrics, wl.num_requests, enabled=bool(cfg.sim.progress)):
        end_s = loop.run(stream)
    loop_s = time.perf_counter() - t_loop
    if metrics.num_requests != cfg.workload.num_requests:
        raise RuntimeError(f"simulation ended with {metrics.num_requests} of "
                           f"{cfg.workload.num_requests} requests complete")
    return end_s, loop_s


def warn_clipped(counts: dict, n: int, wl: WorkloadConf, longest: int, model, sched_name: str) -> None:
    if counts["clipped"]:   # once per process: a search would say it for every probe
        warn_once(("clipped", wl.name, longest),
                  f"{counts['clipped']} of {n} requests were longer than the "
                  f"{longest}-token request limit (prompt + output; workload.max_request_tokens, else "
                  f"{model.name}'s max_position"
                  f"{'' if SCHEDULERS[sched_name].chunked else ', capped by the token budget of an unchunked scheduler'}"
                  f") and were clipped to it; workload.too_long=error refuses such runs instead", "sim")


def simulate(cfg: DictConfig, op_times=None, *, outputs: bool | None = None) -> SimResult:
    """Run cfg's deployment on cfg's workload; ``op_times`` reuses a loaded OpTimes (same hw,
    model, tp). Writes files to ``cfg.sim.out_dir`` only when it is set (or outputs=True).
    ``deployment=disaggregated`` runs sim.disagg (op_times: a function pool cfg -> OpTimes)."""
    if deployment_name(cfg) != "colocated":
        from sim import disagg
        return disagg.simulate(cfg, load_op_times=op_times, outputs=outputs)
    wall0 = time.perf_counter()
    prep = prepare(cfg)
    hw, model, lay, plan, engine = prep.hw, prep.model, prep.lay, prep.plan, prep.engine
    n_rep, sc = cfg.parallel.replicas, cfg.scheduler
    wl, stream, counts = request_stream(cfg, prep.longest, sc.block_size)
    if op_times is None:
        op_times = load_op_times_for(cfg)
    else:
        check_op_times(cfg, op_times, prep)
    writing = bool(cfg.sim.out_dir) if outputs is None else outputs
    trace = [] if writing and cfg.sim.trace else None
    timeline = [] if writing else None
    metrics = Metrics(cfg.sim.keep_requests, engine.frontend_latency_us * 1e-6)
    replicas = make_replicas(cfg, prep, op_times)
    router_conf = RouterConf(**OmegaConf.to_container(cfg.router, resolve=True))
    loop = Engine(replicas, cfg.router.name, int(cfg.seed), metrics, cfg.sim.fast_forward,
                  trace, cfg.sim.max_trace_events, timeline, router_conf)
    end_s, loop_s = run_loop(loop, metrics, stream, cfg, wl)
    warn_clipped(counts, metrics.num_requests, wl, prep.longest, model, sc.name)
    check_queries = getattr(op_times, "warn_outside_trained", None)
    if check_queries:
        check_queries()
    columns = metrics.request_columns()
    summary = metrics.summary(columns)
    summary["num_clipped_requests"] = float(counts["clipped"])
    summary.update(_utilisation(metrics, hw, model, lay, n_rep, end_s))
    summary["kv_util_mean"] = (sum(r.kv_area for r in replicas)
                               / (plan.num_blocks * len(replicas) * end_s)) if end_s > 0 else math.nan
    summary["kv_util_peak"] = max(r.peak_blocks for r in replicas) / plan.num_blocks
    # what the layout buys in memory (the search explains its winner with these)
    summary["kv_capacity_tokens"] = float(plan.num_tokens * lay.dp)     # per replica, all DP ranks
    summary["weight_gib_per_gpu"] = plan.weight_bytes / 2 ** 30
    summary["gpus"] = float(lay.gpus * n_rep)
    summary.update(goodput(columns, summary, cfg.sim, lay.gpus * n_rep))
    summary.update(prefix_stats([r.blocks for r in replicas]))
    summary.update(spec.stats(replicas))                      # only when the feature is on
    summary.update(offload.stats([r.blocks for r in replicas]))
    summary["wall_s"] = time.perf_counter() - wall0
    summary["loop_wall_s"] = loop_s
    result = SimResult(summary, columns, plan, timeline or [], trace or [],
                       getattr(op_times, "source", ""), replicas=replica_rows(replicas, end_s))
    if writing and cfg.sim.out_dir:
        from sim.outputs import write_outputs
        write_outputs(result, cfg)
    return result


def goodput(columns, summary: dict, simc, gpus: int) -> dict[str, float]:
    """DistServe's goodput: requests meeting both their TTFT and TPOT limits (sim.goodput_*_s),
    per second of the run and per GPU, and the share of requests that met them. A one-token
    answer has no TPOT and is judged on its TTFT. Empty without kept requests or limits."""
    ttft_s, tpot_s = float(simc.get("goodput_ttft_s", 0)), float(simc.get("goodput_tpot_s", 0))
    if columns is None or ttft_s <= 0 or tpot_s <= 0 or not len(columns["ttft_s"]):
        return {}
    import numpy as np
    tpot = columns["tpot_s"]
    met = (columns["ttft_s"] <= ttft_s) & (np.isnan(tpot) | (tpot <= tpot_s))
    share = float(met.mean())
    rps = summary["throughput_rps"] * share
    return {"slo_attainment": share, "goodput_rps": rps, "goodput_rps_per_gpu": rps / gpus}


PROGRESS_DELAY_S = 2.0


class Progress:
    """A progress bar with ETA (tqdm, on stderr) over completed requests, for runs that take
    longer than PROGRESS_DELAY_S: short runs (and the search's probes) print nothing and pay
    only a counter check per 1024 completions."""

    def __init__(self, metrics, total: int, enabled: bool = True):
        self.metrics, self.total, self.enabled, self.delay_s = metrics, total, enabled, PROGRESS_DELAY_S
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return self
        self.t0 = time.perf_counter()
        m, complete = self.metrics, self.metrics.complete

        def counted(r, now):
            complete(r, now)
            if not m.num_requests & 1023:
                self.tick()
        m.complete = counted          # instance attribute: the engine's m.complete finds it
        return self

    def tick(self) -> None:
        done = self.metrics.num_requests
        if self.bar is None:
            if time.perf_counter() - self.t0 < self.delay_s:
                return
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=done, desc="simulate", unit="req", file=sys.stderr,
                            mininterval=0.5, dynamic_ncols=True, smoothing=0)
            # rate and ETA: every completion since the start of the run, on tqdm's clock (time.time)
            self.bar.initial = 0
            self.bar.start_t -= time.perf_counter() - self.t0
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc):
        if self.enabled:
            del self.metrics.complete
        if self.bar is not None:
            self.bar.update(self.metrics.num_requests - self.bar.n)
            self.bar.close()
        return False


def _utilisation(m: Metrics, hw, model, lay: shapes.Layout, n_rep: int, end_s: float) -> dict[str, float]:
    """MFU and MBU of the whole deployment over the simulated time.

    FLOPs: 2 per active weight per token (an MoE layer counts its router, shared and top-k
    routed experts, not all experts), 2 per LM-head weight per sampled token, and per (q, kv)
    pair 4 x heads x head_dim (MLA: 2 x heads x (qk + v head dims), as prefill runs it).
    Bytes: the weights of an engine rank once per iteration (every local expert: an upper
    bound for MoE at small batches) plus the KV read."""
    if end_s <= 0:
        return {"mfu": math.nan, "mbu": math.nan}
    L = model.num_layers
    per_pair = (2 * model.num_heads * (model.qk_nope_head_dim + model.qk_rope_head_dim + model.v_head_dim)
                if shapes.is_mla(model) else 4 * model.num_heads * model.head_dim)
    flops = (2 * shapes.active_params_per_token(model) * m.tokens
             + 2 * model.vocab_size * model.hidden_size * m.sampled
             + L * per_pair * m.attn_pairs)
    kv_per_token = shapes.kv_bytes_per_token(model, 1)
    # one iteration of one engine rank reads the weights on its tp x pp GPUs
    weights = sum(shapes.stage_weight_bytes(model, lay)) * lay.tp
    bytes_ = m.iterations * weights + m.kv_read_tokens * kv_per_token
    gpus = lay.gpus * n_rep
    return {"mfu": flops / (end_s * hw.peak_tflops * 1e12 * gpus),
            "mbu": bytes_ / (end_s * hw.mem_bw_gbps * 1e9 * gpus)}
