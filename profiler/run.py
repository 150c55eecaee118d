"""``python -m profiler.run hw=<hw> model=<model>``: time every operator shape one layer of the model
runs (for each TP degree) over the token / KV grid; write ``<out_dir>/<family>.parquet``.

Resumable: points already in the output tables (this source, same shape / hw / dtype / backend)
are skipped, and new rows are flushed atomically every ``profile.flush_every_points`` points or
``profile.flush_every_s`` seconds; with ``profile.passes > 1`` every finished pass is kept too
(profiler.store). A shape that runs out of memory becomes a ``status=oom`` row.
``profile.dry_run=true`` prints the points per family and an ETA from a timed sample, and writes
nothing.

On a GPU the timing follows vLLM v1 by default (``profile.cuda_graph=vllm``,
``profile.elementwise_backend=auto``): CUDA graphs where vLLM replays graphs, elementwise ops
compiled by torch.compile as vLLM compiles them (see profiler.config).
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import conf
from conf import ConfigError
from conf.shapes import check_pp
from profiler import grid, tables
from profiler.config import (ATTENTION_BACKENDS, CUDA_GRAPH_MODES, ELEMENTWISE_BACKENDS, GRIDS, ProfileConf,
                             register)
from profiler.store import Store

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
    graph_mode: str = "never"         # vllm | always | never (GPU only)
    vllm_present: bool = False
    device_here: bool = True          # False: a dry run of a GPU grid on a machine without one
    out_dir: Path | None = None
    points: dict[str, list[dict]] = field(default_factory=dict)
    timer: object = None              # profiler.timing.CudaTimer, made once per run on a GPU


def graph_mode(value) -> str:
    v = str(value).strip().lower()
    v = {"true": "always", "false": "never"}.get(v, v)
    if v not in CUDA_GRAPH_MODES:
        raise ConfigError(f"profile.cuda_graph={value!r}; choose one of: {', '.join(CUDA_GRAPH_MODES)}")
    return v


def resolve(cfg: DictConfig, need_device: bool = True) -> Setup:
    """Validate the config and resolve backends and the grid; no measuring. ``need_device=False``
    (dry runs) lets a GPU grid be counted on a machine without that GPU."""
    from kernels import attention as attn_kernels
    from kernels.backends import available, resolve as resolve_backend
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
    if pcfg.repeats < 1 or pcfg.min_repeats < 1 or pcfg.warmup < 0 or pcfg.warmup_ms < 0:
        raise ConfigError("profile.repeats and profile.min_repeats must be >= 1, profile.warmup and "
                          "profile.warmup_ms >= 0")
    if pcfg.block_size < 1:
        raise ConfigError(f"profile.block_size={pcfg.block_size} must be a positive number of tokens")
    mode = graph_mode(pcfg.cuda_graph)
    tps = grid.tp_degrees(model, list(pcfg.tp), DEFAULT_TP)
    device = "cuda" if hw.device == "cuda" else "cpu"
    here = True
    if device == "cuda":
        from kernels.backends import cuda_ok
        here = cuda_ok()
        if not here and need_device:
            raise ConfigError(f"hw={hw.name} is a CUDA device but torch sees no GPU here (use hw=cpu)")
    else:
        from kernels.backends import require
        require("torch", device)
    if here:
        attn = resolve_backend(pcfg.attention_backend, attn_kernels.PREFERRED[device], device)
        # vLLM v1 compiles the torch-native elementwise ops with Inductor on GPUs; on a CPU host
        # compiling every shape costs seconds (Inductor's C++ backend), so eager torch stays the default
        elem = resolve_backend(pcfg.elementwise_backend, ("compile",) if device == "cuda" else ("torch",), device)
    else:   # counting only: the backends this GPU box would pick first
        attn = attn_kernels.PREFERRED[device][0] if pcfg.attention_backend == "auto" else pcfg.attention_backend
        elem = "compile" if pcfg.elementwise_backend == "auto" else pcfg.elementwise_backend
    block = attn_kernels.effective_block_size(attn, int(pcfg.block_size))
    threads = _set_threads(hw, device)
    points = grid.build(model, tps, grid.axes(pcfg, device), list(pcfg.families), block, bool(pcfg.ragged))
    dtype = pcfg.dtype or model.dtype
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"profile.dtype={dtype!r}; choose float16, bfloat16 or float32")
    return Setup(hw, model, pcfg, device, dtype, threads, {"gemm": "torch", "elementwise": elem, "attention": attn},
                 tps, graph_mode=mode if device == "cuda" else "never",
                 vllm_present=here and available("vllm", device), device_here=here, points=points)


def _set_threads(hw: conf.HwConf, device: str) -> int:
    import torch
    if device == "cpu" and hw.threads > 0:
        torch.set_num_threads(hw.threads)
    return torch.get_num_threads()


def op_backend(setup: Setup, family: str, op: str) -> str:
    """The implementation an op runs, as vLLM v1 runs it under the chosen elementwise backend:
    the sampler runs eagerly outside the compiled model; the KV-cache write is vLLM's
    reshape_and_cache_flash wherever vLLM is installed (torch index_copy_ otherwise); add,
    embedding and LayerNorm have no vLLM custom op (torch, or compiled torch)."""
    b = setup.backends[family]
    if family != "elementwise":
        return b
    if op == "sampler":
        return "torch"
    if op == "kv_cache_write":
        return "vllm" if b != "torch" and setup.vllm_present else "torch"
    if b == "vllm" and op in ("add", "embedding", "layernorm"):
        return "torch"
    return b


def build_kernel(setup: Setup, family: str, point: dict):
    """The zero-argument launcher of one point's real kernel."""
    from kernels import activation, attention, elementwise, kv_cache, matmul, norms, rope, sampler
    from kernels.backends import device_of, torch_dtype
    dev, dt = device_of(setup.device), torch_dtype(setup.dtype)
    if family == "gemm":
        return matmul.build(point["m"], point["n"], point["k"], dt, dev)
    if family == "attention":
        return attention.build(setup.backends["attention"], point["_q_lens"], point["_kv_lens"], point["num_heads"],
                               point["num_kv_heads"], point["head_dim"], point["block_size"], dt, dev)
    op, t, w = point["op"], point["num_tokens"], point["width"]
    backend = op_backend(setup, family, op)
    if op in ("rmsnorm", "layernorm", "fused_add_rmsnorm"):
        return norms.build(op, t, w, dt, dev, backend)
    if op in ("silu_mul", "gelu"):
        return activation.build(op, t, w, dt, dev, backend)
    if op == "rope":
        rot = w // (point["num_heads"] + point["num_kv_heads"])
        return rope.build(t, point["num_heads"], point["num_kv_heads"], point["head_dim"],
                          0 if rot == point["head_dim"] else rot, dt, dev, backend, setup.model.max_position,
                          setup.model.rope_theta)
    if op == "add":
        return elementwise.build_add(t, w, dt, dev, backend)
    if op == "embedding":
        return elementwise.build_embedding(t, w, point["_vocab_shard"], dt, dev, int(setup.pcfg.seed), backend)
    if op == "kv_cache_write":
        return kv_cache.build(t, point["num_kv_heads"], point["head_dim"], int(setup.pcfg.block_size), dt, dev,
                              backend, int(setup.pcfg.seed))
    if op == "sampler":
        return sampler.build(t, w, dt, dev)
    raise ValueError(f"no kernel for elementwise op {op!r}")


def use_graph(setup: Setup, family: str, point: dict) -> bool:
    """Whether vLLM v1 replays this point inside a CUDA graph (profile.cuda_graph=vllm): the model's
    forward for batches of up to cuda_graph_max_tokens tokens (piecewise graphs around attention,
    a full graph for decode-only batches); prefill attention, the LM head and the sampler run
    outside graphs."""
    if setup.device != "cuda" or setup.graph_mode == "never":
        return False
    if setup.graph_mode == "always":
        return True
    cap = int(setup.pcfg.cuda_graph_max_tokens)
    if family == "attention":
        return point["phase"] == "decode" and point["batch_size"] <= cap
    if family == "gemm":
        return point["op"] != "lm_head" and point["m"] <= cap
    return point["op"] != "sampler" and point["num_tokens"] <= cap


def common_columns(setup: Setup, family: str, point: dict) -> dict:
    on_gpu = setup.device == "cuda"
    graph = use_graph(setup, family, point)
    return {"hw": setup.hw.name, "source": "opcast", "dtype": setup.dtype,
            "backend": op_backend(setup, family, point["op"]),
            "timer": ("cuda_graph" if graph else "cuda_event") if on_gpu else "perf_counter",
            "l2_policy": "flush" if on_gpu and setup.pcfg.l2_flush else "hot", "cuda_graph": graph,
            "threads": setup.threads}


def point_row(setup: Setup, family: str, point: dict) -> dict:
    """The table columns of a point before it is measured (shape + how it will be measured)."""
    return {**{k: v for k, v in point.items() if not k.startswith("_")}, **common_columns(setup, family, point)}


def cuda_timer(setup: Setup, nvml=None):
    if setup.timer is None:
        from profiler.timing import CudaTimer
        setup.timer = CudaTimer(bool(setup.pcfg.l2_flush), clock=nvml.sm_clock_mhz if nvml else None)
    return setup.timer


def measure(setup: Setup, family: str, point: dict, repeats: int | None = None, earlier=None) -> dict:
    """One row: the point's columns, its timing statistics, SM clock and status (ok | oom).
    ``earlier``: samples (µs) of this point from earlier passes, pooled into the statistics.
    ``_samples`` holds this call's own samples."""
    from profiler.timing import is_oom, stats, time_cpu
    import torch
    p = setup.pcfg
    row = point_row(setup, family, point)
    torch.manual_seed(int(p.seed))
    kw = dict(warmup_ms=float(p.warmup_ms), warmup=int(p.warmup), min_repeats=int(p.min_repeats),
              repeats=int(p.repeats if repeats is None else repeats), max_s=float(p.max_seconds_per_point))
    try:
        fn = build_kernel(setup, family, point)
        if setup.device == "cuda":
            label = f"{family}/{point['op']} " + ",".join(f"{k}={point[k]}" for k in ("m", "num_tokens", "batch_size",
                                                                                     "max_kv_len") if k in point)
            timing = cuda_timer(setup).time(fn, graph=row["cuda_graph"], label=label, **kw)
        else:
            timing = time_cpu(fn, **kw)
    except Exception as exc:
        if not is_oom(exc):
            raise
        fn = None
        if setup.device == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "oom", **{c: math.nan for c in tables.STAT_COLUMNS}, "repeats": 0,
                "sm_clock_mhz": math.nan, "_samples": None}
    row.update(timer=timing.timer, l2_policy=timing.l2_policy, cuda_graph=timing.cuda_graph)
    return {**row, "status": "ok", **stats(list(earlier or []) + timing.samples_us),
            "sm_clock_mhz": timing.sm_clock_mhz, "_samples": timing.samples_us}


def work(family: str, point: dict) -> float:
    """A size proxy that orders points by cost (for the dry run's stratified sample)."""
    if family == "gemm":
        return point["m"] * point["n"] * point["k"]
    if family == "attention":
        return point["q_kv_product_sum"] * point["num_heads"] * point["head_dim"] + \
            point["num_kv_tokens"] * point["num_kv_heads"] * point["head_dim"]
    return point["num_tokens"] * point["width"]


def calibrate(setup: Setup, todo: list[tuple[str, dict]], sample: int, repeats: int | None = None) -> dict:
    """{family: (points timed, mean wall seconds per point)} over a stratified sample of ``todo``:
    each family's points sorted by size and picked at evenly spaced ranks, about ``sample`` in
    all (at least two per family), so the mean is not biased towards small or large shapes."""
    by_family: dict[str, list[dict]] = {}
    for f, pt in todo:
        by_family.setdefault(f, []).append(pt)
    out = {}
    for f, pts in by_family.items():
        pts = sorted(pts, key=lambda p: work(f, p))
        k = min(len(pts), max(2, round(sample * len(pts) / max(1, len(todo)))))
        picked = [pts[round(i * (len(pts) - 1) / max(1, k - 1))] for i in range(k)]
        took = []
        for pt in picked:
            t0 = time.perf_counter()
            measure(setup, f, pt, repeats)
            took.append(time.perf_counter() - t0)
        out[f] = (len(took), sum(took) / len(took))
    return out


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def dry_run(setup: Setup, store: Store, todo: list[tuple[str, dict]], passes: int, per_pass: int) -> None:
    print(f"dry run: hw={setup.hw.name} model={setup.model.name} tp={setup.tps} dtype={setup.dtype} "
          f"backends={setup.backends} cuda_graph={setup.graph_mode} passes={passes}")
    for f, pts in setup.points.items():
        n = sum(1 for fam, _ in todo if fam == f)
        print(f"  {f:12s} {len(pts):6d} points in the grid, {len(pts) - n:6d} already in {setup.out_dir}, "
              f"{n:6d} to measure")
    print(f"  {'total':12s} {sum(map(len, setup.points.values())):6d} points, {len(todo)} to measure")
    if not todo:
        return
    if not setup.device_here:
        print(f"ETA: needs the device (hw={setup.hw.name} is CUDA and torch sees no GPU here)")
        return
    cal = calibrate(setup, todo, int(setup.pcfg.calibration_points), per_pass if passes > 1 else None)
    eta = 0.0
    for f, (k, mean_s) in cal.items():
        n = sum(1 for fam, _ in todo if fam == f)
        eta += mean_s * n * passes
        print(f"  {f:12s} {mean_s * 1e3:9.1f} ms/point (timed {k} points spread over sizes) x {n} x {passes} pass(es)")
    print(f"ETA: {_fmt_s(eta)} for {len(todo)} points ({len(todo) * passes / eta:.2f} points/s)")


def _nothing_to_do_hint(setup: Setup, store: Store, out_dir: Path) -> str:
    prev = store.old_runs[-1] if store.old_runs else {}
    where = ", ".join(str(prev[k]) for k in ("device_name", "host", "date_utc") if prev.get(k))
    return (f"all {sum(map(len, setup.points.values()))} points of this grid are already in {out_dir} "
            f"(source=opcast{', measured on ' + where if where else ''}); nothing to measure. To measure them on "
            f"this machine: profile.resume=false (replaces only {setup.model.name}'s opcast rows there) or "
            f"out_dir=<another directory>")


def run(cfg: DictConfig) -> dict:
    """Profile per ``cfg``; returns {family: rows measured now}. Tests call this with ``compose``."""
    from conf.files import check_writable
    from profiler.provenance import collect, device_uuid
    p = cfg.profile
    out_dir = Path(cfg.out_dir)
    if not p.dry_run:
        check_writable(out_dir, "out_dir")
    setup = resolve(cfg, need_device=not p.dry_run)
    setup.out_dir = out_dir
    nvml = None
    if setup.device == "cuda" and setup.device_here and not p.dry_run:
        from profiler.nvml import open_device
        nvml = open_device(0, device_uuid(0))
    provenance = {} if p.dry_run else \
        collect(setup.device, setup.threads, OmegaConf.to_container(cfg, resolve=True), nvml=nvml)
    provenance.update(model=setup.model.name, backends=setup.backends, tp=setup.tps, cuda_graph=setup.graph_mode)
    store = Store(out_dir, list(setup.points), setup.hw.name, "model", setup.model.name, provenance,
                  resume=bool(p.resume))
    rows = {f: [point_row(setup, f, pt) for pt in pts] for f, pts in setup.points.items()}
    todo = [(f, pt, row) for f, pts in setup.points.items() for pt, row in zip(pts, rows[f])
            if not store.is_done(f, row)]
    random.Random(int(p.seed)).shuffle(todo)   # spreads drift (thermal, neighbours) over shapes
    if p.max_points > 0:
        todo = todo[:int(p.max_points)]
    # A noisy host (shared cores, neighbours) slows whole seconds at a time: with passes > 1 the
    # repeats of every point are split over that many passes through the grid, each in its own
    # shuffled order, so one slow stretch touches few samples of any point.
    passes = max(1, int(p.passes))
    per_pass = max(int(p.min_repeats), -(-int(p.repeats) // passes))
    if p.dry_run:
        dry_run(setup, store, [(f, pt) for f, pt, _ in todo], passes, per_pass)
        return {f: 0 for f in setup.points}
    counts = {f: 0 for f in setup.points}
    if not todo:
        print(_nothing_to_do_hint(setup, store, out_dir))
        return counts
    kept = sum(store.existing(f) for f in setup.points)
    if kept:
        there = (store.old_runs[-1] if store.old_runs else {}).get("device_name")
        here = provenance.get("device_name")
        print(f"resuming: {kept} points already in {out_dir} are kept"
              + (f" (measured on {there}; this machine: {here})" if there and there != here else "")
              + f"; {len(todo)} to measure. profile.resume=false re-measures them all here")
    from tqdm import tqdm
    from profiler.nvml import Monitor
    if setup.device == "cuda":
        cuda_timer(setup, nvml)          # the L2-flush buffer now, before any kernel's inputs
    remaining = sum(passes - len(store.pass_samples(f, row)) for f, _, row in todo)
    bar = tqdm(total=remaining, desc=f"profile {setup.hw.name}/{setup.model.name}", unit="pt",
               disable=not p.progress, file=sys.stderr)
    start = last_flush = time.monotonic()
    n = 0
    try:
        with Monitor(nvml, float(p.monitor_interval_s)) as monitor:
            for pass_no in range(passes):
                order = list(range(len(todo)))
                random.Random(int(p.seed) + pass_no).shuffle(order)
                for i in order:
                    family, point, row0 = todo[i]
                    done = store.pass_samples(family, row0)
                    if store.is_done(family, row0) or len(done) > pass_no:
                        continue                      # final already (an OOM row) or pass kept from before
                    row = measure(setup, family, point, per_pass if passes > 1 else None,
                                  [x for s in done for x in s])
                    samples = row.pop("_samples")
                    bar.update(1)
                    n += 1
                    if row["status"] != "ok" or len(done) + 1 >= passes:
                        store.add(family, row)
                        counts[family] += 1
                    else:
                        store.add_pass(family, row0, samples)
                    if n % int(p.flush_every_points) == 0 or time.monotonic() - last_flush > p.flush_every_s:
                        _note_run(store, setup, monitor)
                        store.flush()
                        last_flush = time.monotonic()
            _note_run(store, setup, monitor)
    finally:
        store.flush()
        bar.close()
        if nvml is not None:
            nvml.close()
    took = time.monotonic() - start
    print(f"measured {sum(counts.values())} new points ({n} measurements over {passes} pass(es)) in {took:.1f} s: "
          f"{n / took:.2f} measurements/s")
    return counts


def _note_run(store: Store, setup: Setup, monitor) -> None:
    """Run-level facts that change while it runs: GPU clocks/thermals, failed graph captures."""
    summary = monitor.summary()
    if summary:
        store.provenance["gpu_monitor"] = summary
    if setup.timer is not None and setup.timer.capture_failures:
        store.provenance["graph_capture_failures"] = setup.timer.capture_failures[:100]


def _main(cfg: DictConfig) -> None:
    counts = run(cfg)
    if cfg.profile.dry_run:
        return
    total = {f: len(tables.read_dir(cfg.out_dir, f)) for f in counts}
    print(f"measured {sum(counts.values())} new points; tables in {cfg.out_dir}: "
          + ", ".join(f"{f}={total[f]} rows" for f in counts))


def main() -> None:
    register()
    conf.cli("profile", _main)


if __name__ == "__main__":
    main()
