"""Prefill/decode disaggregation (``deployment=disaggregated``): prompts run on a prefill pool,
each prompt's KV cache is shipped to a decode replica, which generates every output token
(DistServe, Splitwise; vLLM's NixlConnector as llm-d and NVIDIA Dynamo deploy it).

One request's life, as vLLM P/D runs it:

1. arrival -> the prefill router picks a prefill replica; its scheduler prefills the prompt
   (chunked, prefix-cached, batched with other prompts) as a request with one output token;
2. prefill done -> the decode router picks a decode replica; the request waits there until
   the replica has KV blocks for the prompt and a sequence slot (max_num_seqs counts the
   requests receiving KV) - backpressure when decode memory is full - then its KV moves over
   the link (sim/kv_transfer.py; both replicas' links are busy meanwhile). The prefill replica
   keeps the prompt's blocks until the transfer ends (vLLM's delayed free), then frees them
   (with prefix caching they stay cached);
3. KV arrived -> the request joins the decode replica's queue with prompt - 1 tokens of KV:
   the decode recomputes the last prompt token to get logits (vLLM never serves the last
   token from a cache) and so makes the first output token itself; TTFT therefore includes
   the prefill, the wait for decode memory, the transfer and that first decode step. A
   decode-side preemption recomputes locally, as vLLM's decode instances do.

Assumptions (stated, not measured): prefix caching, a CPU KV tier and speculative decoding
run where they pay (caching and the tier on the prefill pool, drafting on the decode pool);
the decode pool keeps no prefix cache (its hits could only save transfers). The prefill pool's
scheduler runs prompts only, so its fast path never decodes. MFU/MBU are not reported for a
disaggregated run (one counter serves both pools); KV use is reported per pool.
"""
from __future__ import annotations

import copy
import math
import random
import time
from array import array
from collections import deque

import numpy as np
from omegaconf import DictConfig, OmegaConf

from conf import ConfigError, check_fields
from sim import kv_transfer, offload, spec
from sim.config import DeploymentConf, KvTransferConf, PoolConf, RouterConf, option_node
from sim.core import (SimResult, check_op_times, goodput, load_op_times_for, make_replicas, prepare,
                      request_stream, run_loop, warn_clipped)
from sim.engine import KV_READY, Engine, Request
from sim.metrics import Metrics, prefix_stats, replica_rows
from sim.router import ROUTERS, RouterState

PREFILL, DECODE = "prefill", "decode"
POOLS = (PREFILL, DECODE)
STAGES = ("prefill_queue_s", "prefill_s", "kv_wait_s", "kv_transfer_s", "decode_queue_s")


class DisaggRequest(Request):
    """A request in a disaggregated deployment: its prefill leg (output 1 token, on a prefill
    replica) or its decode leg (the real output, on a decode replica; ``leg`` = the prefill
    leg whose blocks are freed when the KV has arrived)."""

    __slots__ = ("final_output", "leg", "prefill_done_s", "kv_start_s", "kv_ready_s")

    def __init__(self, rid, arrival_s, prompt, output, hashes=None, session=None):
        super().__init__(rid, arrival_s, prompt, output, hashes, session)
        self.final_output, self.leg = output, None
        self.prefill_done_s = self.kv_start_s = self.kv_ready_s = -1.0


def deployment_conf(cfg: DictConfig) -> DeploymentConf:
    dep = cfg.deployment
    check_fields(dep, DeploymentConf, "deployment")
    d = OmegaConf.to_container(dep, resolve=True)
    out = DeploymentConf(**{k: v for k, v in d.items() if k not in ("prefill", "decode", "kv_transfer")})
    out.prefill, out.decode = PoolConf(**d["prefill"]), PoolConf(**d["decode"])
    out.kv_transfer = KvTransferConf(**d["kv_transfer"])
    if out.name not in ("colocated", "disaggregated"):
        raise ConfigError(f"deployment.name={out.name!r}; choose colocated or disaggregated")
    for pool in POOLS:
        p = getattr(out, pool)
        for knob in ("tp", "pp"):
            if getattr(p, knob) < 0:
                raise ConfigError(f"deployment.{pool}.{knob}={getattr(p, knob)} must be >= 1 (0 = parallel.{knob})")
        if p.replicas < 1:
            raise ConfigError(f"deployment.{pool}.replicas={p.replicas} must be >= 1")
    for key in ("prefill_router", "decode_router"):
        if getattr(out, key) not in ROUTERS:
            raise ConfigError(f"deployment.{key}={getattr(out, key)!r}; choose one of {sorted(ROUTERS)}")
    if out.decode_router == "prefix_affinity":
        raise ConfigError("deployment.decode_router=prefix_affinity: the decode pool keeps no prefix cache; "
                          "use it as deployment.prefill_router")
    return out


def pool_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """{"prefill": cfg, "decode": cfg}: each pool as an ordinary (colocated) sim config - its
    hw, tp/pp/replicas and scheduler overrides applied on top of cfg's."""
    dep = deployment_conf(cfg)
    base = OmegaConf.to_container(cfg, resolve=True)
    base["deployment"] = {"name": "colocated"}
    sched_keys = set(base["scheduler"])
    out = {}
    for pool in POOLS:
        p = getattr(dep, pool)
        data = copy.deepcopy(base)
        if p.hw and p.hw != base["hw"]["name"]:
            data["hw"] = OmegaConf.to_container(option_node("hw", p.hw, f"deployment.{pool}.hw"), resolve=True)
        data["parallel"] = {**base["parallel"], "tp": p.tp or base["parallel"]["tp"],
                            "pp": p.pp or base["parallel"]["pp"], "replicas": p.replicas}
        overrides = {k: v for k, v in p.scheduler.items() if v is not None}
        unknown = sorted(set(overrides) - sched_keys)
        if unknown:
            raise ConfigError(f"deployment.{pool}.scheduler has no knob {unknown[0]!r}; the scheduler's "
                              f"knobs: {sorted(sched_keys)}")
        sched = {**base["scheduler"], **copy.deepcopy(overrides)}
        if pool == PREFILL:       # one output token: nothing to draft
            sched["spec"] = {**sched["spec"], "method": "none", "draft_model": "", "acceptance": [],
                             "propose_rate": -1.0}
        else:                     # no prefix cache on the decode pool, so no CPU tier under it
            sched["prefix_caching"] = False
            sched["offload"] = {**sched["offload"], "cpu_gib": 0.0, "preempt": "recompute"}
        data["scheduler"] = sched
        router = dep.prefill_router if pool == PREFILL else dep.decode_router
        data["router"] = {**(base["router"] if base["router"]["name"] == router else {}), "name": router}
        out[pool] = OmegaConf.create(data)
    return out


def check_fits(cfg: DictConfig) -> None:
    """ConfigError with the reason when either pool cannot run (memory, shapes, settings)."""
    pools = pool_configs(cfg)
    for pool, pcfg in pools.items():
        try:
            prepare(pcfg)
        except ConfigError as exc:
            raise ConfigError(f"{pool} pool: {exc}") from None


class DisaggEngine(Engine):
    """The event loop over both pools: arrivals go to the prefill pool; a prefill replica's
    completion becomes a KV hand-off to a decode replica (``retire``), and the KV's arrival
    (``handle``, KV_READY) starts the decode leg."""

    def __init__(self, prefill: list, decode: list, dep: DeploymentConf, transfer, layers: int, seed: int,
                 metrics, fast_forward: bool, trace, max_trace_events: int, timeline, routers: dict):
        super().__init__(prefill + decode, dep.prefill_router, seed, metrics, fast_forward, trace,
                         max_trace_events, timeline, routers[PREFILL])
        self.prefill, self.decode, self.entry = prefill, decode, prefill
        self.route_decode = ROUTERS[dep.decode_router]
        self.decode_state = RouterState(random.Random(seed * 2 + 5), routers[DECODE])
        self.transfer, self.overlap, self.layers = transfer, dep.kv_transfer.overlap, layers
        self.request_cls, self.bound_by_others = DisaggRequest, True
        for rep in prefill + decode:
            rep.link_free_s = 0.0
        for rep in prefill:
            rep.pool = PREFILL
        for rep in decode:
            rep.pool, rep.kv_queue, rep.receiving = DECODE, deque(), 0
        self.stages = {name: array("d") for name in STAGES}
        self.kv_bytes = 0
        self.transfers = 0

    def _route(self, req, now: float) -> None:
        req.output = 1                # the prefill leg makes one token (vLLM P/D: max_tokens=1)
        super()._route(req, now)

    def retire(self, rep, r, now: float) -> None:
        if rep.pool == DECODE:
            super().retire(rep, r, now)          # frees the decode blocks, counts the request
            p = r.leg
            for name, value in zip(STAGES, (p.first_sched_s - p.arrival_s, p.prefill_done_s - p.first_sched_s,
                                            r.kv_start_s - p.prefill_done_s, r.kv_ready_s - r.kv_start_s,
                                            r.first_token_s - r.kv_ready_s)):
                self.stages[name].append(value)
            self.admit_kv(rep, now)
            return
        rep.outstanding -= 1                     # prefill done: its blocks stay until the KV has left
        r.prefill_done_s = now
        leg = DisaggRequest(r.id, r.arrival_s, r.prompt, r.final_output, None, r.session)
        leg.first_sched_s, leg.preemptions, leg.cached_tokens, leg.leg = (r.first_sched_s, r.preemptions,
                                                                          r.cached_tokens, r)
        dst = self.route_decode(self.decode, leg, self.decode_state)
        dst.assign(leg)
        dst.kv_queue.append(leg)
        self.admit_kv(dst, now)

    def admit_kv(self, dst, now: float) -> None:
        """Start the KV transfers dst has memory and sequence slots for, first come first served."""
        queue, blocks = dst.kv_queue, dst.blocks
        if not queue:
            return
        slots, extra = dst.scheduler.sc.max_num_seqs, dst.scheduler.reserves_output
        bs, noted = blocks.block_size, False
        while queue and len(dst.running) + len(dst.waiting) + dst.receiving < slots:
            leg = queue[0]
            # the prompt's blocks, and the output's where the scheduler reserves them on admission
            need = -(-(leg.prompt + (leg.output - 1 if extra else 0)) // bs)
            if not blocks.can_admit(need):
                break
            queue.popleft()
            if not noted:
                dst.note_kv(now)
                noted = True
            blocks.allocate(leg, need)
            src = self.replicas[leg.leg.replica]
            t_x = self.transfer.seconds(leg.prompt)
            free_at = max(src.link_free_s, dst.link_free_s)
            start = max(now, free_at)
            if self.overlap and start == now:
                # layer by layer behind the prompt's own prefill: only the last layer's share is left
                end = max(now + t_x / self.layers, max(leg.first_sched_s, free_at) + t_x)
            else:
                end = start + t_x
            src.link_free_s = dst.link_free_s = end
            leg.kv_start_s, leg.kv_ready_s = start, end
            dst.receiving += 1
            self.kv_bytes += self.transfer.total_bytes_per_token * leg.prompt
            self.transfers += 1
            self.due(end, KV_READY, (dst, leg))
        if noted:
            dst.note_kv(now)

    def handle(self, kind: int, payload, now: float) -> None:
        if kind != KV_READY:
            return super().handle(kind, payload, now)
        self._due_done()
        dst, leg = payload
        dst.receiving -= 1
        src = self.replicas[leg.leg.replica]
        src.note_kv(now)
        src.blocks.release(leg.leg)             # vLLM frees the prefill's blocks once they are read
        src.note_kv(now)
        self.wake(src, now)
        leg.prefill_target = leg.prompt          # the last prompt token is recomputed for its logits
        leg.prefilled = leg.kv = leg.prompt - 1
        # Its blocks are held already, so it goes ahead of requests that must recompute (after
        # the ready ones before it): behind a preempted request waiting for blocks that ready
        # requests hold, FCFS admission would wait forever.
        waiting, i = dst.waiting, 0
        while i < len(waiting) and waiting[i].blocks:
            i += 1
        waiting.insert(i, leg)
        self.wake(dst, now)


def simulate(cfg: DictConfig, load_op_times=None, *, outputs: bool | None = None) -> SimResult:
    """Run cfg's disaggregated deployment on cfg's workload. ``load_op_times(pool_cfg)`` may
    supply (cached) operator tables per pool; default: load them."""
    wall0 = time.perf_counter()
    dep = deployment_conf(cfg)
    pools = pool_configs(cfg)
    preps = {}
    for pool, pcfg in pools.items():
        try:
            preps[pool] = prepare(pcfg)
        except ConfigError as exc:
            raise ConfigError(f"{pool} pool: {exc}") from None
    p_prep, d_prep = preps[PREFILL], preps[DECODE]
    total_gpus = sum(preps[p].lay.gpus * pools[p].parallel.replicas for p in POOLS)
    link = kv_transfer.choose_link(dep.kv_transfer, p_prep.hw, d_prep.hw, total_gpus)
    transfer = kv_transfer.transfer_model(p_prep.model, p_prep.lay, d_prep.model, d_prep.lay, link)
    longest = min(p_prep.longest, d_prep.longest)
    block_size = pools[PREFILL].scheduler.block_size
    wl, stream, counts = request_stream(pools[PREFILL], longest, block_size)
    op_times = {}
    for pool, pcfg in pools.items():
        ot = load_op_times(pcfg) if callable(load_op_times) else load_op_times_for(pcfg)
        check_op_times(pcfg, ot, preps[pool])
        op_times[pool] = ot
    writing = bool(cfg.sim.out_dir) if outputs is None else outputs
    trace = [] if writing and cfg.sim.trace else None
    timeline = [] if writing else None
    metrics = Metrics(cfg.sim.keep_requests, d_prep.engine.frontend_latency_us * 1e-6)
    prefill = make_replicas(pools[PREFILL], p_prep, op_times[PREFILL])
    decode = make_replicas(pools[DECODE], d_prep, op_times[DECODE], first_idx=len(prefill))
    routers = {p: RouterConf(**OmegaConf.to_container(pools[p].router, resolve=True)) for p in POOLS}
    loop = DisaggEngine(prefill, decode, dep, transfer, p_prep.model.num_layers, int(cfg.seed), metrics,
                        cfg.sim.fast_forward, trace, cfg.sim.max_trace_events, timeline, routers)
    end_s, loop_s = run_loop(loop, metrics, stream, cfg, wl)
    warn_clipped(counts, metrics.num_requests, wl, longest, p_prep.model, pools[PREFILL].scheduler.name)
    for ot in op_times.values():
        check = getattr(ot, "warn_outside_trained", None)
        if check:
            check()
    if any(r.blocks.used for r in prefill + decode) or any(r.kv_queue or r.receiving for r in decode):
        raise RuntimeError("disaggregated run ended with KV blocks still held or transfers pending")
    columns = metrics.request_columns()
    summary = metrics.summary(columns)
    summary["num_clipped_requests"] = float(counts["clipped"])
    summary.update(mfu=math.nan, mbu=math.nan, gpus=float(total_gpus))
    for pool, reps in ((PREFILL, prefill), (DECODE, decode)):
        plan = preps[pool].plan
        summary[f"{pool}_kv_util_mean"] = (sum(r.kv_area for r in reps) / (plan.num_blocks * len(reps) * end_s)
                                           if end_s > 0 else math.nan)
        summary[f"{pool}_kv_util_peak"] = max(r.peak_blocks for r in reps) / plan.num_blocks
        summary[f"{pool}_gpus"] = float(preps[pool].lay.gpus * len(reps))
    summary["kv_util_mean"], summary["kv_util_peak"] = summary["decode_kv_util_mean"], summary["decode_kv_util_peak"]
    summary["kv_capacity_tokens"] = float(d_prep.plan.num_tokens)          # per decode replica
    summary["prefill_kv_capacity_tokens"] = float(p_prep.plan.num_tokens)
    summary["weight_gib_per_gpu"] = max(p_prep.plan.weight_bytes, d_prep.plan.weight_bytes) / 2 ** 30
    for name, values in loop.stages.items():
        v = np.frombuffer(values, dtype=np.float64)
        summary[f"{name}_mean"] = float(v.mean()) if len(v) else math.nan
        summary[f"{name}_p90"] = float(np.percentile(v, 90)) if len(v) else math.nan
    summary["kv_transfer_bytes"] = float(loop.kv_bytes)
    summary["num_kv_transfers"] = float(loop.transfers)
    summary.update(goodput(columns, summary, cfg.sim, total_gpus))
    summary.update(prefix_stats([r.blocks for r in prefill]))
    summary.update(spec.stats(decode))
    summary.update(offload.stats([r.blocks for r in prefill]))
    summary["wall_s"] = time.perf_counter() - wall0
    summary["loop_wall_s"] = loop_s
    source = " | ".join(f"{p}: {getattr(op_times[p], 'source', '')}" for p in POOLS)
    result = SimResult(summary, columns, d_prep.plan, timeline or [], trace or [], source,
                       replicas=[dict(row, pool=r.pool) for row, r in
                                 zip(replica_rows(prefill + decode, end_s), prefill + decode)])
    result.link = link
    result.plans = {p: preps[p].plan for p in POOLS}
    if writing and cfg.sim.out_dir:
        from sim.outputs import write_outputs
        write_outputs(result, cfg)
    return result


def describe(cfg: DictConfig, result: SimResult) -> str:
    """One line: both pools and the KV link, e.g. "P: h100 tp4 x1, D: h100 tp4 x2, KV over nvlink ..."."""
    pools = pool_configs(cfg)
    parts = [f"{p[0].upper()}: {c.hw.name} tp{c.parallel.tp}{f' pp{c.parallel.pp}' if c.parallel.pp > 1 else ''}"
             f" x{c.parallel.replicas}" for p, c in pools.items()]
    return f"disaggregated {', '.join(parts)}, KV over {result.link.why()}"


__all__ = ["describe", "DisaggEngine", "check_fits", "deployment_conf", "pool_configs", "simulate"]
