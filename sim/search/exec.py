"""Where the capacity searches run: in this process, a local process pool (default), or Ray.

One task is one deployment candidate: its saturation probes, bracketing and bisection over
all seeds (later seeds start from earlier seeds' answers, so they stay in one task). Every
executor is a generator of TaskResults in completion order, so the caller can write the
points file and move the progress bar as results arrive. Workers keep the simulator's
operator tables per (hw, model, tp) in a module-level cache: loaded once per process (for
a disaggregated candidate, per pool). A config's ``deployment.name`` picks the simulator:
sim.simulate, or sim.disagg.simulate for disaggregated ones (no deployment node = colocated).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from conf import ConfigError
from sim.search.capacity import SeedCapacity, capacity_over_seeds
from sim.config import deployment_name

REPO_ROOT = Path(__file__).resolve().parents[2]
SimulateFn = Callable[[object], dict]       # composed sim cfg -> summary dict


@dataclass
class Task:
    index: int
    config_hash: str
    sim_cfg: dict                    # plain container of the candidate's sim config
    seeds: list
    limits: dict                     # summary key -> limit (s)
    params: dict                     # keyword arguments of capacity_over_seeds
    qps_key: str                     # dotted config keys the search sets per probe
    seed_key: str
    cached: dict = field(default_factory=dict)   # (qps, seed) -> summary, from an earlier run
    saturation_only: bool = False    # just the first seed's saturation throughput


@dataclass
class TaskResult:
    index: int
    config_hash: str
    seeds: list = field(default_factory=list)    # SeedCapacity per seed
    points: list = field(default_factory=list)   # new probes: {"qps", "seed", **summary}
    reused: list = field(default_factory=list)   # (qps, seed) answered from the cache
    error: str = ""                              # ConfigError text: the candidate cannot run
    saturation_qps: float = 0.0                  # set by a saturation_only task


def _plain(value):
    """Summary values as plain floats/ints so they pickle small and land in parquet cleanly."""
    if hasattr(value, "item"):
        return value.item()
    return value


def run_task(task: Task, simulate_fn: SimulateFn) -> TaskResult:
    result = TaskResult(task.index, task.config_hash)
    base = OmegaConf.create(task.sim_cfg)

    def simulate_at(qps: float, seed: int) -> dict:
        key = (float(qps), int(seed))
        if key in task.cached:
            result.reused.append(key)
            return task.cached[key]
        # Set in place: copying a DictConfig costs more than a small simulation.
        OmegaConf.update(base, task.qps_key, float(qps), force_add=True)
        OmegaConf.update(base, task.seed_key, int(seed), force_add=True)
        cpu0 = time.process_time()
        summary = {k: _plain(v) for k, v in dict(simulate_fn(base)).items()}
        summary["probe_cpu_s"] = time.process_time() - cpu0   # wall_s counts waiting for a core
        task.cached[key] = summary
        result.points.append({"qps": float(qps), "seed": int(seed), **summary})
        return summary

    try:
        if task.saturation_only:
            summary = simulate_at(task.params["saturation_qps"], task.seeds[0])
            result.saturation_qps = float(summary["throughput_rps"])
        else:
            result.seeds = capacity_over_seeds(simulate_at, task.limits, task.seeds, **task.params)
    except ConfigError as exc:
        result.error = str(exc)
    return result


# --- the real simulator, with operator tables cached per worker process --------------------
_OP_TIMES: dict = {}


def op_times_for(cfg):
    """The OpTimes of cfg's (hw, model, tp, quantile), loaded once per process."""
    from sim.core import load_op_times_for
    layout = {k: v for k, v in OmegaConf.to_container(cfg.parallel, resolve=True).items() if k != "replicas"}
    key = (OmegaConf.to_yaml(cfg.hw), OmegaConf.to_yaml(cfg.model), str(sorted(layout.items())),
           str(cfg.sim.op_quantile), str(cfg.sim.data_dir))
    if key not in _OP_TIMES:
        _OP_TIMES[key] = load_op_times_for(cfg)
    return _OP_TIMES[key]


def simulate_summary(cfg) -> dict:
    """Run the opcast simulator on a composed sim config and return its summary."""
    if deployment_name(cfg) == "disaggregated":
        # each pool's operator tables are cached like a colocated config's (keyed on its hw/tp)
        from sim import disagg
        return dict(disagg.simulate(cfg, load_op_times=op_times_for).summary)
    import sim
    return dict(sim.simulate(cfg, op_times=op_times_for(cfg), outputs=False).summary)


def check_fits(cfg) -> None:
    """ConfigError with the simulator's reason when cfg's deployment cannot run (memory, shapes)."""
    if deployment_name(cfg) == "disaggregated":
        from sim import disagg
        disagg.check_fits(cfg)      # either pool: raises ConfigError with the reason
        return
    import sim
    plan = sim.plan_for(cfg)
    if not plan.fits:
        raise ConfigError(plan.reason)


# --- executors ------------------------------------------------------------------------------
def run_serial(tasks: Iterable[Task], simulate_fn: SimulateFn, workers: int = 1,
               address: str | None = None) -> Iterator[TaskResult]:
    for task in tasks:
        yield run_task(task, simulate_fn)


_WORKER_SIMULATE: SimulateFn | None = None
PARENT_POLL_S = 0.5


def exit_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """End this process once ``parent_pid`` is gone. A search killed with kill -9 cannot shut
    its pool down, and its workers would otherwise finish their candidates, then wait forever
    on a queue nobody writes (orphans, each holding a core and its operator tables)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(simulate_fn: SimulateFn, parent_pid: int) -> None:
    global _WORKER_SIMULATE
    _WORKER_SIMULATE = simulate_fn
    exit_with_parent(parent_pid)


def _pool_task(task: Task) -> TaskResult:
    return run_task(task, _WORKER_SIMULATE)


def run_pool(tasks: Iterable[Task], simulate_fn: SimulateFn, workers: int = 2,
             address: str | None = None) -> Iterator[TaskResult]:
    pool = ProcessPoolExecutor(max_workers=max(1, workers), initializer=_init_worker,
                               initargs=(simulate_fn, os.getpid()))
    futures = [pool.submit(_pool_task, task) for task in tasks]
    finished = False
    try:
        for future in as_completed(futures):
            yield future.result()
        finished = True
    finally:
        if not finished:
            # Interrupted (Ctrl-C, an error): stop our workers now instead of waiting for their
            # current candidates; everything already yielded is in the points file.
            workers_alive = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in workers_alive:
                proc.terminate()
        else:
            pool.shutdown(wait=True)


def _ray_task(task: Task, simulate_fn: SimulateFn) -> TaskResult:
    return run_task(task, simulate_fn)


def run_ray(tasks: Iterable[Task], simulate_fn: SimulateFn, workers: int = 2,
            address: str | None = None) -> Iterator[TaskResult]:
    """The same tasks as Ray remote calls; ``address`` joins a cluster, None starts a local one.

    A cluster's nodes need opcast installed (``pip install 'opcast[ray]'``); a local instance
    gets this checkout on its workers' PYTHONPATH.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("search.executor=ray needs Ray, which is not installed; "
                          "pip install 'opcast[ray]' or use search.executor=process") from None
    started = not ray.is_initialized()
    if started:
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            ray.init(address=address, **kwargs)
        else:
            path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
            ray.init(num_cpus=max(1, workers), runtime_env={"env_vars": {"PYTHONPATH": path}},
                     **kwargs)
    remote = ray.remote(num_cpus=1)(_ray_task)
    pending = [remote.remote(task, simulate_fn) for task in tasks]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


EXECUTORS = {"process": run_pool, "serial": run_serial, "ray": run_ray}


def executor(name: str):
    if name not in EXECUTORS:
        raise ConfigError(f"search.executor={name!r}: choose one of {', '.join(EXECUTORS)}")
    return EXECUTORS[name]


__all__ = ["EXECUTORS", "SeedCapacity", "Task", "TaskResult", "executor", "run_task",
           "simulate_summary"]
