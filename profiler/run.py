"""``python -m profiler.run hw=<hw> model=<model>``: time every operator shape one layer of the model
runs (for each TP degree) over the token / KV grid; write ``<out_dir>/<family>.parquet``.

Resumable: points already in the output tables are skipped, and new rows are flushed atomically
every ``profile.flush_every_points`` points or ``profile.flush_every_s`` seconds. A shape that runs
out of memory becomes a ``status=oom`` row.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

import conf
from conf import ConfigError
from conf.shapes import check_pp
from profiler import grid, tables
from profiler.config import ATTENTION_BACKENDS, ELEMENTWISE_BACKENDS, GRIDS, ProfileConf, register

DEFAULT_TP = ProfileConf().tp


@dataclass
class Setup:
    """Everything a measurement needs, resolved once from the config."""
    hw: conf.HwConf
    model: conf.ModelConf
    pcfg: DictConfig
    device: str
    dtype: str
    threads: int
    backends: dict[str, str]          # family -> backend name
    tps: list[int]
    points: dict[str, list[dict]] = field(default_factory=dict)


def resolve(cfg: DictConfig) -> Setup:
    """Validate the config and resolve backends and the grid; no measuring."""
    from kernels import attention as attn_kernels
    from kernels.backends import resolve as resolve_backend
    hw, model, pcfg = conf.to_hw(cfg.hw), conf.to_model(cfg.model), cfg.profile
    if pcfg.attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"profile.attention_backend={pcfg.attention_backend!r}; "
                          f"choose one of: {', '.join(ATTENTION_BACKENDS)}")
    if pcfg.elementwise_backend not in ELEMENTWISE_BACKENDS:
        raise ConfigError(f"profile.elementwise_backend={pcfg.elementwise_backend!r}; "
                          f"choose one of: {', '.join(ELEMENTWISE_BACKENDS)}")
    if pcfg.grid not in GRIDS:
        raise ConfigError(f"profile.grid={pcfg.grid!r}; choose one of: {', '.join(GRIDS)}")
    for pp in pcfg.pp:
        check_pp(model, int(pp))
    if pcfg.repeats < 1 or pcfg.min_repeats < 1:
        raise ConfigError("profile.repeats and profile.min_repeats must be >= 1")
    if pcfg.block_size < 1:
        raise ConfigError(f"profile.block_size={pcfg.block_size} must be a positive number of tokens")
    tps = grid.tp_degrees(model, list(pcfg.tp), DEFAULT_TP)
    device = "cuda" if hw.device == "cuda" else "cpu"
    if device == "cuda":
        from kernels.backends import cuda_ok
        if not cuda_ok():
            raise ConfigError(f"hw={hw.name} is a CUDA device but torch sees no GPU here (use hw=cpu)")
    else:
        from kernels.backends import require
        require("torch", device)
    attn = resolve_backend(pcfg.attention_backend, attn_kernels.PREFERRED[device], device)
    elem = resolve_backend(pcfg.elementwise_backend, ("vllm", "torch") if device == "cuda" else ("torch",), device)
    block = attn_kernels.effective_block_size(attn, int(pcfg.block_size))
    threads = _set_threads(hw, device)
    points = grid.build(model, tps, grid.axes(pcfg, device), list(pcfg.families), block)
    dtype = pcfg.dtype or model.dtype
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"profile.dtype={dtype!r}; choose float16, bfloat16 or float32")
    return Setup(hw, model, pcfg, device, dtype, threads, {"gemm": "torch", "elementwise": elem, "attention": attn},
                 tps, points)


def _set_threads(hw: conf.HwConf, device: str) -> int:
    import torch
    if device == "cpu" and hw.threads > 0:
        torch.set_num_threads(hw.threads)
    return torch.get_num_threads()


def build_kernel(setup: Setup, family: str, point: dict):
    """The zero-argument launcher of one point's real kernel."""
    from kernels import activation, attention, elementwise, matmul, norms, rope
    from kernels.backends import device_of, torch_dtype
    dev, dt, backend = device_of(setup.device), torch_dtype(setup.dtype), setup.backends[family]
    if family == "gemm":
        return matmul.build(point["m"], point["n"], point["k"], dt, dev)
    if family == "attention":
        return attention.build(backend, point["batch_size"], point["max_q_len"], point["max_kv_len"],
                               point["num_heads"], point["num_kv_heads"], point["head_dim"], point["block_size"],
                               dt, dev)
    op, t, w = point["op"], point["num_tokens"], point["width"]
    if op in ("rmsnorm", "layernorm"):
        return norms.build(op, t, w, dt, dev, backend)
    if op in ("silu_mul", "gelu"):
        return activation.build(op, t, w, dt, dev, backend)
    if op == "rope":
        rot = w // (point["num_heads"] + point["num_kv_heads"])
        return rope.build(t, point["num_heads"], point["num_kv_heads"], point["head_dim"],
                          0 if rot == point["head_dim"] else rot, dt, dev, backend, setup.model.max_position,
                          setup.model.rope_theta)
    if op == "add":
        return elementwise.build_add(t, w, dt, dev)
    if op == "embedding":
        return elementwise.build_embedding(t, w, point["_vocab_shard"], dt, dev, seed=int(setup.pcfg.seed))
    raise ValueError(f"no kernel for elementwise op {op!r}")


TORCH_ONLY_OPS = ("add", "embedding", "layernorm")   # engines (vLLM too) run these through torch


def backend_of(setup: Setup, family: str, op: str) -> str:
    b = setup.backends[family]
    return "torch" if family == "elementwise" and op in TORCH_ONLY_OPS else b


def common_columns(setup: Setup, family: str, op: str) -> dict:
    p = setup.pcfg
    on_gpu = setup.device == "cuda"
    return {"hw": setup.hw.name, "source": "opcast", "dtype": setup.dtype, "backend": backend_of(setup, family, op),
            "timer": ("cuda_graph" if p.cuda_graph else "cuda_event") if on_gpu else "perf_counter",
            "l2_policy": "flush" if on_gpu and p.l2_flush else "hot", "cuda_graph": bool(on_gpu and p.cuda_graph),
            "threads": setup.threads}


def measure(setup: Setup, family: str, point: dict, repeats: int | None = None, earlier=None) -> dict:
    """One row: the point's columns, its timing statistics and status (ok | oom).
    ``earlier``: samples (µs) of this point from earlier passes, pooled into the statistics."""
    from profiler.timing import is_oom, stats, time_cpu, time_cuda
    import torch
    p = setup.pcfg
    row = {**{k: v for k, v in point.items() if not k.startswith("_")}, **common_columns(setup, family, point["op"])}
    torch.manual_seed(int(p.seed))
    kw = dict(warmup=int(p.warmup), repeats=int(p.repeats if repeats is None else repeats),
              min_repeats=int(p.min_repeats), max_s=float(p.max_seconds_per_point))
    try:
        fn = build_kernel(setup, family, point)
        if setup.device == "cuda":
            timing = time_cuda(fn, l2_flush=bool(p.l2_flush), cuda_graph=bool(p.cuda_graph), **kw)
        else:
            timing = time_cpu(fn, **kw)
    except Exception as exc:
        if not is_oom(exc):
            raise
        if setup.device == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "oom", **{c: float("nan") for c in tables.STAT_COLUMNS}, "repeats": 0}
    row.update(timer=timing.timer, l2_policy=timing.l2_policy, cuda_graph=timing.cuda_graph)
    samples = list(earlier or []) + timing.samples_us
    return {**row, "status": "ok", **stats(samples), "_samples": samples}


def key(row: dict, family: str) -> tuple:
    return tuple(str(row[c]) for c in tables.identity_columns(family))


class Store:
    """The output tables of one run: existing rows + new ones, flushed atomically."""

    def __init__(self, out_dir: Path, families, provenance: dict, resume: bool = True):
        self.out_dir, self.provenance = out_dir, provenance
        self.frames: dict[str, pd.DataFrame] = {}
        self.new: dict[str, list[dict]] = {f: [] for f in families}
        self.done: dict[str, set] = {}
        for f in families:
            path = out_dir / f"{f}.parquet"
            exists = resume and path.exists()     # without resume the first flush replaces the table
            try:
                df = tables.read(path, f) if exists else tables.schema(f).empty_table().to_pandas()
            except (tables.TableError, OSError, ValueError) as exc:
                raise ConfigError(f"cannot resume from {path}: {exc}; move it away or set profile.resume=false") \
                    from None
            self.frames[f] = df
            self.done[f] = {key(r, f) for r in df.to_dict("records")}
            if exists:
                prev = tables.provenance(path)
                runs = prev.pop("previous_runs", [])
                prev.pop("config", None)
                self.provenance.setdefault("previous_runs", runs + [prev])

    def add(self, family: str, row: dict) -> None:
        self.new[family].append(row)
        self.done[family].add(key(row, family))

    def flush(self) -> None:
        for f, rows in self.new.items():
            if not rows:
                continue
            df = pd.concat([self.frames[f], pd.DataFrame(rows)], ignore_index=True) if len(self.frames[f]) \
                else pd.DataFrame(rows)
            for col in [n for n, _ in tables.COMMON + tables.FAMILIES[f] if n not in df.columns]:
                df[col] = None
            tables.write(df, self.out_dir / f"{f}.parquet", f, {**self.provenance, "family": f})
            self.frames[f] = tables.read(self.out_dir / f"{f}.parquet", f)
            self.new[f] = []


def run(cfg: DictConfig) -> dict:
    """Profile per ``cfg``; returns {family: rows measured now}. Tests call this with ``compose``."""
    from profiler.provenance import collect
    setup = resolve(cfg)
    out_dir = Path(cfg.out_dir)
    provenance = collect(setup.device, setup.threads, OmegaConf.to_container(cfg, resolve=True))
    provenance.update(model=setup.model.name, backends=setup.backends, tp=setup.tps)
    store = Store(out_dir, list(setup.points), provenance, resume=bool(setup.pcfg.resume))
    todo = [(f, pt) for f, pts in setup.points.items() for pt in pts
            if key({**pt, **common_columns(setup, f, pt["op"])}, f) not in store.done[f]]
    random.Random(int(setup.pcfg.seed)).shuffle(todo)   # spreads drift (thermal, neighbours) over shapes
    if setup.pcfg.max_points > 0:
        todo = todo[:int(setup.pcfg.max_points)]
    counts = {f: 0 for f in setup.points}
    # A noisy host (shared cores, neighbours) slows whole seconds at a time: with passes > 1 the
    # repeats of every point are split over that many passes through the grid, each in its own
    # shuffled order, so one slow stretch touches few samples of any point. Rows are written in
    # the last pass (an interrupted run resumes from the points finished there).
    passes = max(1, int(setup.pcfg.passes))
    per_pass = max(int(setup.pcfg.min_repeats), -(-int(setup.pcfg.repeats) // passes))
    earlier: dict[int, list[float]] = {}
    last_flush = time.monotonic()
    from tqdm import tqdm
    bar = tqdm(total=len(todo) * passes, desc=f"profile {setup.hw.name}/{setup.model.name}", unit="pt",
               disable=not setup.pcfg.progress, file=sys.stderr)
    try:
        n = 0
        for pass_no in range(passes):
            order = list(range(len(todo)))
            if pass_no:
                random.Random(int(setup.pcfg.seed) + pass_no).shuffle(order)
            for i in order:
                family, point = todo[i]
                row = measure(setup, family, point, per_pass if passes > 1 else None, earlier.get(i))
                samples = row.pop("_samples", None)
                bar.update(1)
                if pass_no < passes - 1:
                    if samples is not None:
                        earlier[i] = samples
                    continue
                store.add(family, row)
                counts[family] += 1
                n += 1
                if n % int(setup.pcfg.flush_every_points) == 0 or time.monotonic() - last_flush > setup.pcfg.flush_every_s:
                    store.flush()
                    last_flush = time.monotonic()
    finally:
        store.flush()
        bar.close()
    return counts


def _main(cfg: DictConfig) -> None:
    counts = run(cfg)
    total = {f: len(tables.read_dir(cfg.out_dir, f)) for f in counts}
    print(f"measured {sum(counts.values())} new points; tables in {cfg.out_dir}: "
          + ", ".join(f"{f}={total[f]} rows" for f in counts))


def main() -> None:
    register()
    conf.cli("profile", _main)


if __name__ == "__main__":
    main()
