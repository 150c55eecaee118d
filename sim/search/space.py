"""The deployment configurations a search visits, from the ``search`` node of conf/search.yaml.

A candidate is one hardware SKU, one parallel layout with as many replicas as the GPU budget
holds, one storage precision and one scheduler with one value per knob, and - when
``search.routers`` / ``search.prefix_caching`` list several - one router and prefix caching on
or off (so a search can compare cache-aware routing and caching for a workload with shared
prefixes), and - when ``search.spec_num_tokens`` / ``search.offload_cpu_gib`` list values -
speculative decoding with k draft tokens (0 = off; the method is ``scheduler.spec.method``) and
a CPU KV tier of that many GiB (0 = off), so the search says when they pay. Layouts are tp x pp
and, for mixture-of-experts models, x ep x dp_attention (conf/shapes.py Layout: a replica is
tp x pp GPUs, or ep GPUs of dp_attention ranks); dense models only take ep=1 without DP
attention. Splits that cannot run are recorded with the reason (budget not divisible, heads
not divisible by tp, an expert layout the engines cannot run, model does not fit in memory)
instead of silently dropped.

With ``search.deployments: [colocated, disaggregated]`` the space also holds disaggregated
candidates: a prefill pool and a decode pool splitting the budget (sim/search/pools.py says
which dimensions they take).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from conf import ConfigError, shapes, to_model
from sim.config import option_node
from sim.search.pools import (
    deployment_nodes,
    deployments,
    disagg_node,
    disagg_splits,
    hw_pairs,
)

# Keys of the search's composed config that are not part of one simulation.
SEARCH_ONLY_KEYS = ("search", "slo")


@dataclass(frozen=True)
class Candidate:
    hw: str
    tp: int
    pp: int
    replicas: int
    scheduler: str
    knobs: tuple = ()          # ((knob name, value), ...) in config order
    ep: int = 1                # expert parallelism (MoE models)
    dp_attention: bool = False
    weight_dtype: str = ""     # "" = the model's
    kv_dtype: str = ""
    router: str = ""           # "": the config's router
    prefix_caching: bool | None = None   # None: the scheduler config's own setting
    spec_tokens: int | None = None       # draft tokens (0 = no speculative decoding); None: the config's
    offload_gib: float | None = None     # CPU KV tier (0 = none); None: the config's
    # Disaggregated candidates: hw/tp/pp/replicas above are the prefill pool's, these the decode pool's.
    deployment: str = "colocated"        # colocated | disaggregated
    decode_hw: str = ""
    decode_tp: int = 0
    decode_replicas: int = 0

    @property
    def disaggregated(self) -> bool:
        return self.deployment == "disaggregated"

    @property
    def width(self) -> int:
        """GPUs of one pipeline stage: ep under DP attention, else tp."""
        return self.ep if self.dp_attention else self.tp

    @property
    def pool_gpus(self) -> dict[str, int]:
        """GPUs per hw SKU (two SKUs when a disaggregated candidate mixes them)."""
        gpus = {self.hw: self.width * self.pp * self.replicas}
        if self.disaggregated:
            gpus[self.decode_hw] = gpus.get(self.decode_hw, 0) + self.decode_tp * self.decode_replicas
        return gpus

    @property
    def gpus(self) -> int:
        return sum(self.pool_gpus.values())

    def cost_usd_per_hour(self, prices: dict) -> float:
        """What the candidate's GPUs cost per hour, each pool at its own hw's price (NaN when a
        price is unknown)."""
        return sum(n * prices.get(hw, math.nan) for hw, n in self.pool_gpus.items())

    @property
    def label(self) -> str:
        knobs = " ".join(f"{k}={v}" for k, v in self.knobs)
        replicas = f"x{self.replicas}" if self.replicas else "x-"   # x- : the split misses the budget
        sparse = (f" ep{self.ep}" if self.ep > 1 else "") + (" dp-attn" if self.dp_attention else "")
        dtypes = "".join(f" {name}:{v}" for name, v in (("w", self.weight_dtype), ("kv", self.kv_dtype)) if v)
        if self.disaggregated:
            decode = f"x{self.decode_replicas}" if self.decode_replicas else "x-"
            return (f"disagg P:{self.hw} tp{self.tp}{replicas} D:{self.decode_hw} tp{self.decode_tp}"
                    f"{decode}{dtypes} {self.scheduler} {knobs}").strip()
        extra = [self.router] if self.router else []
        if self.prefix_caching is not None:
            extra.append("prefix-cache" if self.prefix_caching else "no-prefix-cache")
        if self.spec_tokens is not None:
            extra.append(f"spec-k{self.spec_tokens}" if self.spec_tokens else "no-spec")
        if self.offload_gib is not None:
            extra.append(f"offload-{self.offload_gib:g}GiB" if self.offload_gib else "no-offload")
        return " ".join([f"{self.hw} tp{self.tp} pp{self.pp}{sparse}{dtypes} {replicas} {self.scheduler} "
                         f"{knobs}".strip(), *extra])

    def columns(self) -> dict:
        cols = dict(config=self.label, hw=self.hw, tp=self.tp, pp=self.pp, ep=self.ep,
                    dp_attention=self.dp_attention, weight_dtype=self.weight_dtype,
                    kv_dtype=self.kv_dtype, replicas=self.replicas, gpus=self.gpus,
                    scheduler=self.scheduler, knobs=json.dumps(dict(self.knobs), sort_keys=True),
                    router=self.router,
                    prefix_caching="" if self.prefix_caching is None else str(self.prefix_caching).lower())
        if self.spec_tokens is not None:      # only when searched: other tables keep their columns
            cols["spec_num_tokens"] = self.spec_tokens
        if self.offload_gib is not None:
            cols["offload_cpu_gib"] = self.offload_gib
        cols["deployment"] = self.deployment
        if self.disaggregated:                # colocated rows keep their columns (NaN here)
            cols.update(decode_hw=self.decode_hw, decode_tp=self.decode_tp,
                        decode_replicas=self.decode_replicas)
        return cols


@dataclass
class Skipped:
    candidate: Candidate
    reason: str


def _as_list(value, name: str) -> list:
    if isinstance(value, (int, float, str)):
        return [value]
    if value is None or len(value) == 0:
        raise ConfigError(f"search.{name} is empty; give at least one value")
    return list(value)


def knob_grid(knob_lists: dict) -> list[tuple]:
    """Every combination of knob values: {"a": [1, 2], "b": [3]} -> [(("a", 1), ("b", 3)), ...]."""
    names = list(knob_lists)
    values = [_as_list(knob_lists[n], f"knobs.*.{n}") for n in names]
    return [tuple(zip(names, combo)) for combo in itertools.product(*values)]


def group_nodes(cfg: DictConfig, group: str, names: list[str]) -> dict[str, DictConfig]:
    """The composed node of each named option of a group (hw, scheduler).

    The option the search config itself selected keeps the user's command-line overrides
    (e.g. ``hw.price_per_gpu_hour_usd=2``); other options are composed fresh.
    """
    nodes = {}
    for name in names:
        if (cfg.get(group) or {}).get("name") == name:
            nodes[name] = cfg[group]
        else:
            nodes[name] = option_node(group, name, "search")
    return nodes


def hw_prices(cfg: DictConfig) -> dict[str, float]:
    """USD per GPU-hour of each hw of ``search.hw`` (with the user's overrides for the selected one)."""
    nodes = group_nodes(cfg, "hw", [str(h) for h in _as_list(cfg.search.hw, "hw")])
    return {name: float(node.get("price_per_gpu_hour_usd", 0.0) or 0.0) for name, node in nodes.items()}


def sim_config(cfg: DictConfig, hw_node: DictConfig, sched_node: DictConfig,
               cand: Candidate, router_node: DictConfig | None = None,
               deployment_node: dict | None = None) -> DictConfig:
    """The simulator's config for one candidate: the search config minus its own keys.

    ``deployment_node``: the base node of the candidate's family (pools.deployment_nodes);
    None leaves the config's own (a colocated search as before there were families).
    """
    data = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in SEARCH_ONLY_KEYS}
    data["hw"] = OmegaConf.to_container(hw_node, resolve=True)
    sched = OmegaConf.to_container(sched_node, resolve=True)
    for knob, value in cand.knobs:
        if knob not in sched:
            raise ConfigError(f"search.knobs.{cand.scheduler}.{knob}: scheduler "
                              f"{cand.scheduler!r} has no knob {knob!r}; its knobs: "
                              f"{sorted(sched)}")
        sched[knob] = value
    if cand.prefix_caching is not None:
        sched["prefix_caching"] = cand.prefix_caching
    # the searched features start from the config's own settings (cfg.scheduler: a scheduler
    # option other than the selected one is composed fresh, without the user's overrides)
    if cand.spec_tokens is not None:
        spec = sched["spec"] = OmegaConf.to_container(cfg.scheduler.spec, resolve=True)
        if not cand.spec_tokens:
            spec.update(method="none", draft_model="", acceptance=[], propose_rate=-1.0)
        elif spec["method"] == "none":
            raise ConfigError(f"search.spec_num_tokens lists {cand.spec_tokens}: set scheduler.spec.method "
                              f"(draft, eagle, mtp, ngram) for the candidates that draft")
        else:
            spec["num_tokens"] = cand.spec_tokens
    if cand.offload_gib is not None:
        sched["offload"] = dict(OmegaConf.to_container(cfg.scheduler.offload, resolve=True), cpu_gib=cand.offload_gib)
        if not cand.offload_gib:
            sched["offload"]["preempt"] = "recompute"
    data["scheduler"] = sched
    if router_node is not None:
        data["router"] = OmegaConf.to_container(router_node, resolve=True)
    data["parallel"] = {**data.get("parallel", {}), "tp": cand.tp, "pp": cand.pp,
                        "replicas": cand.replicas, "ep": cand.ep, "dp_attention": cand.dp_attention}
    for field in ("weight_dtype", "kv_dtype"):
        if getattr(cand, field):
            data["model"] = {**data["model"], field: getattr(cand, field)}
    if cand.disaggregated:
        # top-level hw/parallel are the prefill pool's: the simulator's defaults for the pools
        data["deployment"] = disagg_node(deployment_node or {}, cand)
    elif deployment_node is not None:
        data["deployment"] = deployment_node
    return OmegaConf.create(data)


def estimator_fingerprint(estimators_dir: Path) -> str:
    """Content hash of a hardware's trained predictors ("roofline" when there are none): a
    retrained estimator changes every operator time, so stored probes must not be reused."""
    files = sorted(p for p in Path(estimators_dir).glob("*") if p.is_file()
                   and not p.name.startswith("."))
    if not files:
        return "roofline"
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha1(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def code_fingerprint() -> str:
    """Content hash of the code that turns a config into numbers (simulator, estimator, shard
    shapes), so stored probes are not reused after that code changes. The search's own
    modules are left out: changing how the search runs does not change a probe's result."""
    root = Path(__file__).resolve().parents[2]
    # Entry points that only run, train, time or write things do not change a probe's numbers.
    entry_points = {"capacity.py", "bench.py", "run.py", "outputs.py", "train.py", "predict.py",
                    "evaluate.py"}
    sources = sorted((root / "sim").rglob("*.py")) + sorted((root / "estimator").rglob("*.py"))
    files = [p for p in sources
             if p.parent.name != "search" and p.name not in entry_points]
    files.append(root / "conf" / "shapes.py")
    digest = hashlib.sha1()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hashlib.sha1(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def config_hash(sim_cfg: DictConfig | dict, volatile_keys=(), extra: dict | None = None) -> str:
    """Stable 16-hex-digit identity of a simulation config (plus ``extra`` inputs), ignoring
    per-probe keys (seed, qps)."""
    data = OmegaConf.to_container(sim_cfg, resolve=True) if isinstance(sim_cfg, DictConfig) \
        else json.loads(json.dumps(sim_cfg))
    data = {**data, "_extra": extra or {}}
    for dotted in volatile_keys:
        *path, last = dotted.split(".")
        parent = data
        for part in path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(last, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def parallel_splits(space, budget: int, moe: bool = False,
                    all2all: str = "allgather_reducescatter") -> list[tuple[int, int, int, bool, int, str]]:
    """(tp, pp, ep, dp_attention, replicas, reason) for every tp x pp (x ep x dp_attention for
    an MoE model); reason is empty when the budget divides the replica's GPUs."""
    eps = [int(e) for e in _as_list(space.get("ep", [1]), "ep")] if moe else [1]
    dps = [bool(d) for d in _as_list(space.get("dp_attention", [False]), "dp_attention")] if moe else [False]
    out = []
    for tp, pp, ep, dp in itertools.product(_as_list(space.tp, "tp"), _as_list(space.pp, "pp"), eps, dps):
        tp, pp = int(tp), int(pp)
        if tp < 1 or pp < 1 or ep < 1:
            raise ConfigError(f"search: tp, pp and ep must be >= 1, got tp={tp} pp={pp} ep={ep}")
        per_replica = (ep if dp else tp) * pp
        what = f"ep*pp={per_replica}" if dp else f"tp*pp={per_replica}"
        reason = "" if budget % per_replica == 0 else f"{what} does not divide the {budget}-GPU budget"
        if dp and ep == tp and all2all != "deepep":
            reason = f"dp_attention with ep=tp={tp} is one DP rank: the same deployment as tp{tp} ep{ep}"
        out.append((tp, pp, ep, dp, budget // per_replica if not reason else 0, reason))
    return out


def enumerate_space(cfg: DictConfig, fits=None) -> tuple[list[tuple[Candidate, DictConfig]],
                                                        list[Skipped]]:
    """All candidates of ``cfg.search`` with their sim configs, and those skipped with why.

    ``fits(sim_cfg)`` raises ConfigError when a candidate cannot run (memory, shapes).
    """
    space = cfg.search
    budget = int(space.gpu_budget)
    if budget < 1:
        raise ConfigError(f"search.gpu_budget={budget}: must be at least 1 GPU")
    families = deployments(space)
    hw_nodes = group_nodes(cfg, "hw", [str(h) for h in _as_list(space.hw, "hw")])
    deploy_nodes = deployment_nodes(cfg, families, group_nodes)
    schedulers = [str(s) for s in _as_list(space.schedulers, "schedulers")]
    sched_nodes = group_nodes(cfg, "scheduler", schedulers)
    knobs = OmegaConf.to_container(space.get("knobs") or {}, resolve=True)
    moe = shapes.is_moe(to_model(cfg.model))
    dtypes = list(itertools.product(*(_as_list(space.get(f, [""]), f) for f in ("weight_dtype", "kv_dtype"))))
    routers = [str(r) for r in space.get("routers") or []]
    router_nodes = group_nodes(cfg, "router", routers)
    caching = list(space.get("prefix_caching") or []) or [None]
    if any(c is not None and not isinstance(c, bool) for c in caching):
        raise ConfigError(f"search.prefix_caching={caching}: give true and/or false")
    spec_ks = list(space.get("spec_num_tokens") or []) or [None]
    if any(k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0) for k in spec_ks):
        raise ConfigError(f"search.spec_num_tokens={spec_ks}: give draft token counts >= 0 (0 = off)")
    offloads = list(space.get("offload_cpu_gib") or []) or [None]
    if any(g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0) for g in offloads):
        raise ConfigError(f"search.offload_cpu_gib={offloads}: give CPU pool sizes in GiB >= 0 (0 = off)")
    runnable, skipped = [], []

    def add(cand: Candidate, reason: str, hw: str, sched: str, router: str = "") -> None:
        """The candidate as runnable with its sim config, or skipped with why."""
        if reason:
            skipped.append(Skipped(cand, reason))
            return
        sim_cfg = sim_config(cfg, hw_nodes[hw], sched_nodes[sched], cand, router_nodes.get(router),
                             deploy_nodes[cand.deployment])
        try:
            if fits is not None:
                fits(sim_cfg)
        except ConfigError as exc:
            skipped.append(Skipped(cand, str(exc)))
            return
        runnable.append((cand, sim_cfg))

    for hw in hw_nodes if "colocated" in families else ():
        for (tp, pp, ep, dp, replicas, reason), (wdt, kvdt) in itertools.product(
                parallel_splits(space, budget, moe, str(cfg.parallel.get("all2all_backend", ""))), dtypes):
            for sched in schedulers:
                for knob_values, router, cache, k, gib in itertools.product(
                        knob_grid(knobs.get(sched) or {}), routers or [""], caching, spec_ks, offloads):
                    cand = Candidate(hw, tp, pp, replicas, sched, knob_values, ep, dp, str(wdt or ""),
                                     str(kvdt or ""), router, cache, k, None if gib is None else float(gib))
                    on = sched_nodes[sched].get("prefix_caching", False) if cache is None else cache
                    if not reason and (router or cfg.router.name) == "prefix_affinity" and not on:
                        reason = "router prefix_affinity needs prefix caching"
                    add(cand, reason, hw, sched, router)
    if "disaggregated" in families:
        # Only the scheduler knobs and precisions apply to the pools (sim/search/pools.py).
        tps = [int(t) for t in _as_list(space.tp, "tp")]
        if min(tps) < 1:
            raise ConfigError(f"search.tp={tps}: tp must be >= 1")
        for (hw, decode_hw), (tp_p, x, tp_d, y, reason), (wdt, kvdt) in itertools.product(
                hw_pairs(list(hw_nodes), bool(space.get("disagg_mixed_hw", False))),
                disagg_splits(tps, budget), dtypes):
            for sched in schedulers:
                for knob_values in knob_grid(knobs.get(sched) or {}):
                    cand = Candidate(hw, tp_p, 1, x, sched, knob_values, weight_dtype=str(wdt or ""),
                                     kv_dtype=str(kvdt or ""), deployment="disaggregated",
                                     decode_hw=decode_hw, decode_tp=tp_d, decode_replicas=y)
                    add(cand, reason, hw, sched)
    if not runnable and not skipped:
        raise ConfigError("search: the space is empty")
    return runnable, skipped
