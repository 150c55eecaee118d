"""Collective profiles: all_reduce (tensor parallel), all_gather (the logits gather at TP > 1),
send_recv (pipeline stages), and vLLM's custom all-reduce where vLLM is installed.

    python -m profiler.collectives hw=cpu profile.world_size=4       # spawns the ranks itself (gloo)
    torchrun --nproc-per-node 8 -m profiler.collectives hw=h100      # one process per GPU (NCCL)

One launch measures every group size of ``profile.collective_world_sizes`` (2, 4, 8) that fits,
each on the subgroup of the first n ranks, plus send/recv between a pair of ranks on one node and,
when the launch spans nodes (LOCAL_WORLD_SIZE < WORLD_SIZE), a pair on two nodes.

A sample is ``profile.collective_iters`` back-to-back ops (or one CUDA graph holding them) between
two events recorded after a real barrier, divided by the op count, so rank skew and launch
overhead do not inflate 10-20 µs NVLink all-reduces; the slowest rank's sample is kept. A
send_recv sample is half a ping-pong (one-way).

Configuration is composed with the compose API, never ``@hydra.main``: under torchrun every rank
would otherwise create its own Hydra output directory. Only rank 0 reads and writes
``<out_dir>/collective.parquet`` (profiler.store: resume, merge by source); it decides which
points are missing and broadcasts them.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import warnings

from omegaconf import OmegaConf

import conf
from conf import ConfigError
from conf.shapes import activation_bytes_per_token
from profiler import grid

OPS = ("all_reduce", "all_gather", "send_recv")
# vLLM's custom all-reduce: op custom_all_reduce (the table contract's name, as the aiconfigurator
# import has it), backend vllm; added next to each all_reduce group it can serve
CUSTOM_AR = "custom_all_reduce"


def plan(cfg) -> dict:
    """Validated, picklable description of the job (what the ranks need)."""
    from conf.files import check_writable
    from profiler.run import graph_mode
    hw, model, p = conf.to_hw(cfg.hw), conf.to_model(cfg.model), cfg.profile
    device = "cuda" if hw.device == "cuda" else "cpu"
    bad = [op for op in p.collective_ops if op not in OPS]
    if bad:
        raise ConfigError(f"profile.collective_ops: unknown {bad}; choose from {', '.join(OPS)}")
    world = int(os.environ.get("WORLD_SIZE", p.world_size))
    if world < 2:
        raise ConfigError(f"profile.world_size={world}: collectives need at least 2 ranks")
    backend = p.collective_backend if p.collective_backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"profile.collective_backend={backend!r}; choose auto, gloo or nccl")
    if backend == "nccl" and device != "cuda":
        raise ConfigError("profile.collective_backend=nccl needs hw with device=cuda")
    if device == "cuda" and "RANK" not in os.environ:
        from kernels.backends import cuda_ok
        count = __import__("torch").cuda.device_count() if cuda_ok() else 0
        if world > count:
            raise ConfigError(f"profile.world_size={world} but this machine has {count} CUDA GPUs")
    sizes = [int(s) for s in p.collective_sizes_bytes] or \
        [t * activation_bytes_per_token(model) for t in grid.axes(p, device).tokens]
    if min(sizes) < 1:
        raise ConfigError(f"profile.collective_sizes_bytes must be positive, got {sizes}")
    groups = sorted({int(n) for n in p.collective_world_sizes if 2 <= int(n) <= world})
    if not groups:
        raise ConfigError(f"profile.collective_world_sizes={list(p.collective_world_sizes)}: none fits "
                          f"{world} ranks (each must be 2..{world})")
    if int(p.collective_iters) < 1:
        raise ConfigError(f"profile.collective_iters={p.collective_iters} must be >= 1")
    custom = str(p.collective_custom_ar).lower()
    if custom not in ("auto", "true", "false"):
        raise ConfigError(f"profile.collective_custom_ar={p.collective_custom_ar!r}; choose auto, true or false")
    if custom == "auto":
        from kernels.backends import probe
        from kernels.collectives import CUSTOM_AR_MODULE
        custom = "true" if backend == "nccl" and probe(CUSTOM_AR_MODULE) else "false"
    check_writable(cfg.out_dir, "out_dir")
    dtype = p.dtype or model.dtype
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", min(world, hw.devices_per_node) or world))
    return {"hw": hw.name, "network": hw.network, "device": device, "backend": backend, "world_size": world,
            "devices_per_node": per_node, "groups": groups, "threads": hw.threads, "dtype": dtype,
            "ops": list(p.collective_ops), "sizes": sorted(set(sizes)), "iters": int(p.collective_iters),
            "warmup": max(2, int(p.warmup)), "repeats": int(p.repeats), "min_repeats": int(p.min_repeats),
            "max_s": float(p.max_seconds_per_point), "custom_ar": custom == "true",
            "graph": graph_mode(p.cuda_graph) if device == "cuda" else "never",
            "graph_max_bytes": int(p.cuda_graph_max_tokens) * activation_bytes_per_token(model),
            "out_dir": str(cfg.out_dir), "resume": bool(p.resume), "progress": bool(p.progress),
            "max_points": int(p.max_points), "config": OmegaConf.to_container(cfg, resolve=True)}


def items(job: dict) -> list[dict]:
    """Every (op, size, ranks) the job measures, with the row's world_size / devices_per_node."""
    from kernels.backends import torch_dtype
    from kernels.collectives import CUSTOM_AR_WORLD_SIZES, all_gather_bytes
    per_node, out = job["devices_per_node"], []
    for op in job["ops"]:
        for size in job["sizes"]:
            if op == "send_recv":
                pairs = ([(0, 1)] if per_node >= 2 else []) + \
                    ([(0, per_node)] if job["world_size"] > per_node else [])
                out += [{"op": op, "size": size, "ranks": pair, "devices_per_node": 2 if pair[1] < per_node else 1,
                         "backend": job["backend"]} for pair in pairs]
                continue
            for n in job["groups"]:
                ranks = tuple(range(n))
                nbytes = all_gather_bytes(size, n, torch_dtype(job["dtype"])) if op == "all_gather" else size
                row = {"op": op, "size": nbytes, "ranks": ranks, "devices_per_node": min(n, per_node)}
                out.append({**row, "backend": job["backend"]})
                if op == "all_reduce" and job["custom_ar"] and n in CUSTOM_AR_WORLD_SIZES and n <= per_node:
                    out.append({**row, "op": CUSTOM_AR, "backend": "vllm"})
    return out


def use_graph(job: dict, item: dict) -> bool:
    """vLLM replays the all-reduces of its model's forward inside CUDA graphs for batches of up to
    cuda_graph_max_tokens tokens (profile.cuda_graph=vllm); send/recv between pipeline stages and
    the logits gather run outside them."""
    if job["graph"] == "never":
        return False
    if job["graph"] == "always":
        return True
    return item["op"] in ("all_reduce", CUSTOM_AR) and item["size"] <= job["graph_max_bytes"]


def _row(job: dict, item: dict) -> dict:
    graph = use_graph(job, item)
    return {"hw": job["hw"], "source": "opcast", "op": item["op"], "dtype": job["dtype"], "backend": item["backend"],
            "timer": ("cuda_graph" if graph else "cuda_event") if job["device"] == "cuda" else "perf_counter",
            "l2_policy": "hot", "cuda_graph": graph, "threads": job["threads_used"], "network": job["network"],
            "size_bytes": item["size"], "world_size": len(item["ranks"]),
            "devices_per_node": item["devices_per_node"]}


def _todo(job: dict, store) -> list[dict]:
    todo = [it for it in items(job) if not store.is_done("collective", _row(job, it))]
    return todo[:job["max_points"]] if job["max_points"] > 0 else todo


def _store(job: dict, nvml=None):
    from profiler.provenance import collect
    from profiler.store import Store
    meta = collect(job["device"], job["threads_used"], job["config"], nvml=nvml)
    meta.update(collective_backend=job["backend"], launch_world_size=job["world_size"], groups=job["groups"],
                devices_per_node=job["devices_per_node"], collective_iters=job["iters"])
    return Store(job["out_dir"], ["collective"], job["hw"], "network", job["network"], meta, resume=job["resume"])


class Clock:
    """Start/stop marks around a sample: CUDA events on the current stream, perf_counter on CPU."""

    def __init__(self, device, torch):
        self.cuda, self.torch = device.type == "cuda", torch

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self):
        if self.cuda:
            self.s = self.torch.cuda.Event(enable_timing=True)
            self.e = self.torch.cuda.Event(enable_timing=True)
            self.s.record()
        else:
            self.t0 = time.perf_counter_ns()

    def stop_us(self) -> float:
        if self.cuda:
            self.e.record()
            self.e.synchronize()
            return self.s.elapsed_time(self.e) * 1e3
        return (time.perf_counter_ns() - self.t0) / 1e3


def back_to_back(job, fn, group, clock, dist, torch, device, graph: bool, per_op: float,
                 capture_ctx=contextlib.nullcontext) -> list[float]:
    """Samples (µs per op, max over the group's ranks) of ``iters`` back-to-back ``fn`` calls, each
    sample timed between two marks recorded right after a barrier of the group. ``per_op``
    divides further (2 for a ping-pong: one-way time). ``capture_ctx`` wraps a graph capture
    (vLLM's custom all-reduce registers its graph buffers when its ``capture()`` ends)."""
    n = job["iters"]

    def many():
        for _ in range(n):
            fn()
    for _ in range(job["warmup"]):          # lazy communicators, NCCL channels, caches
        many()
    clock.sync()
    run = many
    if graph:
        run = _capture(many, group, dist, torch, device, capture_ctx) or many
    times, start, stop = [], time.perf_counter(), False
    barrier_kw = {"device_ids": [device.index]} if job["backend"] == "nccl" else {}
    while True:
        flag = torch.tensor([1.0 if stop else 0.0], device=device)   # all members agree to stop
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item():
            break
        dist.barrier(group=group, **barrier_kw)
        clock.sync()                        # every rank leaves the barrier before its first op
        clock.start()
        run()
        times.append(clock.stop_us() / n / per_op)
        stop = len(times) >= job["repeats"] or (len(times) >= job["min_repeats"]
                                                and time.perf_counter() - start > job["max_s"])
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)     # the slowest rank defines the op time
    return t.cpu().tolist()


def _capture(many, group, dist, torch, device, capture_ctx=contextlib.nullcontext):
    """``many`` captured in one CUDA graph (its replay), or None when any rank of the group fails
    to capture (then all time eagerly: a graph on some ranks only would hang the others)."""
    g = torch.cuda.CUDAGraph()
    ok = 1.0
    try:
        with capture_ctx(), torch.cuda.graph(g):
            many()
    except Exception as exc:
        warnings.warn(f"CUDA-graph capture of a collective failed ({exc}); timed eagerly", stacklevel=2)
        ok, g = 0.0, None
        torch.cuda.synchronize()
    flag = torch.tensor([ok], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if not flag.item():
        return None
    g.replay()
    torch.cuda.synchronize()
    return g.replay


def worker(rank: int, job: dict, init_method: str | None = None) -> None:
    """One rank. ``init_method`` is set when spawned; under torchrun the env provides it."""
    import torch
    import torch.distributed as dist
    from kernels import collectives as kc
    from kernels.backends import torch_dtype
    from profiler.timing import stats
    world = job["world_size"]
    local = int(os.environ.get("LOCAL_RANK", rank))
    if job["device"] == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        if job["threads"] > 0:
            torch.set_num_threads(job["threads"])
    job = {**job, "threads_used": torch.get_num_threads()}
    kw = {"device_id": device} if job["backend"] == "nccl" else {}
    if init_method:
        dist.init_process_group(job["backend"], init_method=init_method, rank=rank, world_size=world, **kw)
    else:
        dist.init_process_group(job["backend"], **kw)
    rank = dist.get_rank()
    nvml = None
    try:
        todo, store = [job.get("todo")], None
        if rank == 0:
            if job["device"] == "cuda":
                from profiler.nvml import open_device
                from profiler.provenance import device_uuid
                nvml = open_device(local, device_uuid(local))
            store = _store(job, nvml)
            if todo[0] is None:
                todo = [_todo(job, store)]
        dist.broadcast_object_list(todo, src=0)
        todo = todo[0]
        # Subgroups: every rank creates every group, in the same order (torch.distributed's rule).
        groups = {r: dist.new_group(list(r)) for r in sorted({it["ranks"] for it in todo})}
        cpu_groups = {r: dist.new_group(list(r), backend="gloo")
                      for r in sorted({it["ranks"] for it in todo if it["op"] == CUSTOM_AR})}
        custom = {r: kc.custom_all_reduce(g, device) if rank in r else None for r, g in cpu_groups.items()}
        dt, clock = torch_dtype(job["dtype"]), Clock(device, torch)
        from tqdm import tqdm
        last = time.monotonic()
        for it in tqdm(todo, desc=f"collectives {job['backend']} x{world}", unit="pt", file=sys.stderr,
                       disable=rank != 0 or not job["progress"]):
            ranks, g = it["ranks"], groups[it["ranks"]]
            samples, status = None, "ok"
            if rank in ranks:
                fn, per_op = _launcher(it, job, kc, dt, device, rank, g, custom)
                ca = custom.get(it["ranks"]) if it["op"] == CUSTOM_AR else None
                if fn is None:
                    status = "skipped"    # vLLM's custom all-reduce does not take this size: vLLM uses NCCL
                else:
                    samples = back_to_back(job, fn, g, clock, dist, torch, device, use_graph(job, it), per_op,
                                           ca.capture if ca is not None else contextlib.nullcontext)
            dist.barrier()                # ranks outside the group wait here
            if rank == 0:
                row = {**_row(job, it), "status": status, "sm_clock_mhz": nvml.sm_clock_mhz() if nvml else None}
                if samples:
                    row.update(stats(samples))
                else:
                    row.update({c: None for c in ("time_us_median", "time_us_mean", "time_us_min",
                                                  "time_us_p10", "time_us_p90", "time_us_std")}, repeats=0)
                store.add("collective", row)
                if time.monotonic() - last > 30:
                    store.flush()
                    last = time.monotonic()
        if rank == 0:
            store.flush()
        dist.barrier()
    finally:
        if nvml is not None:
            nvml.close()
        dist.destroy_process_group()


def _launcher(it, job, kc, dt, device, rank, group, custom):
    """(zero-argument op, divisor to one op's time) for this rank, or (None, _) when the op does not apply."""
    if it["op"] == "send_recv":
        a, b = it["ranks"]
        return kc.build_send_recv(it["size"], dt, device, rank, b if rank == a else a, group), 2.0
    if it["op"] == "all_gather":
        return kc.build_all_gather(it["size"], dt, device, group, len(it["ranks"])), 1.0
    if it["op"] == CUSTOM_AR:
        ca = custom.get(it["ranks"])
        return (kc.build_custom_all_reduce(ca, it["size"], dt, device) if ca is not None else None), 1.0
    return kc.build_all_reduce(it["size"], dt, device, group), 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg) -> None:
    """Measure per ``cfg``: inside torchrun this process is one rank, otherwise spawn world_size ranks."""
    job = plan(cfg)
    if "RANK" in os.environ:
        worker(int(os.environ["RANK"]), job)
        return
    import torch
    job["threads_used"] = job["threads"] if job["threads"] > 0 else torch.get_num_threads()
    job["todo"] = _todo(job, _store(job))      # decided here so that a finished table spawns nothing
    if not job["todo"]:
        print(f"all collective points are already in {job['out_dir']}/collective.parquet; nothing to measure "
              "(profile.resume=false re-measures them)")
        return
    import torch.multiprocessing as mp
    mp.spawn(worker, args=(job, f"tcp://127.0.0.1:{_free_port()}"), nprocs=job["world_size"], join=True)


def main() -> None:
    from conf import user_errors
    from profiler.config import compose
    # Composed directly, not via @hydra.main: under torchrun every rank would own an output dir.
    user_errors(lambda: run(compose(sys.argv[1:])))


if __name__ == "__main__":
    main()
