"""Collective profiles: all_reduce (tensor parallel) and send_recv (pipeline stages).

    python -m profiler.collectives hw=cpu profile.world_size=2        # spawns the ranks itself
    torchrun --nproc-per-node 8 -m profiler.collectives hw=h100       # one process per GPU

Configuration is composed with the compose API, never ``@hydra.main``: under torchrun every rank
would otherwise create its own Hydra output directory. Only rank 0 reads and writes
``<out_dir>/collective.parquet``; it decides which points are missing (resume) and broadcasts them.
Each sample is the slowest rank's time (all_reduce) or half a ping-pong between ranks 0 and 1
(send_recv). Sizes default to tokens x hidden x dtype bytes over the token grid.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

import conf
from conf import ConfigError
from conf.shapes import activation_bytes_per_token
from profiler import grid, tables

OPS = ("all_reduce", "send_recv")


def plan(cfg) -> dict:
    """Validated, picklable description of the job (what the ranks need)."""
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
    return {"hw": hw.name, "network": hw.network, "device": device, "backend": backend, "world_size": world,
            "devices_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", min(world, hw.devices_per_node) or world)),
            "threads": hw.threads, "dtype": p.dtype or model.dtype, "ops": list(p.collective_ops),
            "sizes": sorted(set(sizes)), "warmup": int(p.warmup), "repeats": int(p.repeats),
            "min_repeats": int(p.min_repeats), "max_s": float(p.max_seconds_per_point),
            "out_dir": str(cfg.out_dir), "resume": bool(p.resume), "progress": bool(p.progress),
            "max_points": int(p.max_points),
            "config": OmegaConf.to_container(cfg, resolve=True)}


def _row(job: dict, op: str, size: int) -> dict:
    return {"hw": job["hw"], "source": "opcast", "op": op, "dtype": job["dtype"], "backend": job["backend"],
            "timer": "cuda_event" if job["device"] == "cuda" else "perf_counter", "l2_policy": "hot",
            "cuda_graph": False, "threads": job["threads_used"], "network": job["network"], "size_bytes": size,
            "world_size": job["world_size"], "devices_per_node": job["devices_per_node"]}


def _samples(job, fn, rank, device, dist, torch, divide: float) -> list[float]:
    """Per-rep µs, each the max over ranks; the rep count is agreed on by all ranks."""
    for _ in range(max(1, job["warmup"])):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times, start, stop = [], time.perf_counter(), False
    while True:
        # The stop vote doubles as the barrier that lines the ranks up before each timed rep.
        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            break
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3 / divide)
        else:
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) / 1e3 / divide)
        stop = len(times) >= job["repeats"] or (len(times) >= job["min_repeats"]
                                                and time.perf_counter() - start > job["max_s"])
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


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
    try:
        todo, store = [job.get("todo")], None
        if rank == 0:
            store = _store(job)
            if todo[0] is None:
                todo = [_todo(job, store)]
        dist.broadcast_object_list(todo, src=0)
        dt = torch_dtype(job["dtype"])
        from tqdm import tqdm
        last = time.monotonic()
        for op, size in tqdm(todo[0], desc=f"collectives {job['backend']} x{world}", unit="pt", file=sys.stderr,
                             disable=rank != 0 or not job["progress"]):
            if op == "all_reduce":
                fn, divide = kc.build_all_reduce(size, dt, device), 1.0
            elif rank in (0, 1):
                fn, divide = kc.build_send_recv(size, dt, device, rank, 1 - rank), 2.0
            else:
                fn, divide = (lambda: None), 2.0   # ranks beyond the pair only join the barriers
            samples = _samples(job, fn, rank, device, dist, torch, divide)
            if rank == 0:
                store["rows"].append({**_row(job, op, size), "status": "ok", **stats(samples)})
                if time.monotonic() - last > 30:
                    _flush(job, store)
                    last = time.monotonic()
        if rank == 0:
            _flush(job, store)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _key(row: dict) -> tuple:
    return tuple(str(row[c]) for c in tables.identity_columns("collective"))


def _todo(job: dict, store: dict) -> list[tuple[str, int]]:
    todo = [(op, s) for op in job["ops"] for s in job["sizes"] if _key(_row(job, op, s)) not in store["done"]]
    return todo[:job["max_points"]] if job["max_points"] > 0 else todo


def _store(job: dict) -> dict:
    path = Path(job["out_dir"]) / "collective.parquet"
    if path.exists() and job["resume"]:
        df = tables.read(path, "collective")
    else:
        df = tables.schema("collective").empty_table().to_pandas()
    return {"path": path, "old": df, "done": {_key(r) for r in df.to_dict("records")}, "rows": []}


def _flush(job: dict, store: dict) -> None:
    import pandas as pd
    from profiler.provenance import collect
    if not store["rows"]:
        return
    new = pd.DataFrame(store["rows"])
    df = pd.concat([store["old"], new], ignore_index=True) if len(store["old"]) else new
    meta = collect(job["device"], store["rows"][0]["threads"], job["config"])
    meta.update(collective_backend=job["backend"], world_size=job["world_size"])
    tables.write(df, store["path"], "collective", meta)


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
