"""Time a zero-argument kernel launcher: CUDA events on GPU (optionally inside a CUDA graph, with an
L2 flush before every rep), ``time.perf_counter_ns`` on CPU. Returns per-rep microseconds."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

L2_FLUSH_BYTES = 256 << 20    # Triton's flush buffer: > 2x the L2 of A100/H100/H200


@dataclass
class Timing:
    samples_us: list[float]
    timer: str                 # cuda_event | cuda_graph | perf_counter
    l2_policy: str             # flush | hot
    cuda_graph: bool
    extra: dict = field(default_factory=dict)


def stats(samples_us: list[float]) -> dict:
    """The stat columns of a profile row (see profiler.tables.STAT_COLUMNS)."""
    s = sorted(samples_us)
    n = len(s)

    def q(p):   # linear-interpolated quantile
        x = p * (n - 1)
        lo = math.floor(x)
        return s[lo] + (s[min(lo + 1, n - 1)] - s[lo]) * (x - lo)
    return {"time_us_median": statistics.median(s), "time_us_mean": statistics.fmean(s), "time_us_min": s[0],
            "time_us_p10": q(0.1), "time_us_p90": q(0.9), "time_us_std": statistics.pstdev(s) if n > 1 else 0.0,
            "repeats": n}


def _run_budget(step, warmup: int, repeats: int, min_repeats: int, max_s: float) -> list[float]:
    """Warm up, then take up to ``repeats`` samples, stopping early once ``max_s`` of wall time has
    passed with ``min_repeats`` taken (big shapes cost seconds each on a CPU)."""
    start = time.perf_counter()
    for i in range(max(1, warmup)):
        step()
        if time.perf_counter() - start > max_s / 2:
            break
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < repeats:
        out.append(step())
        if len(out) >= min_repeats and time.perf_counter() - start > max_s:
            break
    return out


def time_cpu(fn, *, warmup: int = 3, repeats: int = 20, min_repeats: int = 3, max_s: float = 2.0) -> Timing:
    def step():
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e3
    return Timing(_run_budget(step, warmup, repeats, min_repeats, max_s), "perf_counter", "hot", False)


def time_cuda(fn, *, warmup: int = 3, repeats: int = 20, min_repeats: int = 3, max_s: float = 2.0,
              l2_flush: bool = True, cuda_graph: bool = False) -> Timing:
    import torch
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):       # absorbs cuBLAS workspaces, autotuning, JIT before capture
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run, graph, used_graph = fn, None, False
    if cuda_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run, used_graph = graph.replay, True
        except RuntimeError:            # some kernels cannot be captured: time them eagerly
            graph = None
            torch.cuda.synchronize()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if l2_flush else None
    start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def step():
        if flush is not None:
            flush.zero_()               # cold L2, and the CPU runs ahead of the GPU while it clears
        start_ev.record()
        run()
        end_ev.record()
        end_ev.synchronize()
        return start_ev.elapsed_time(end_ev) * 1e3
    try:
        samples = _run_budget(step, 1, repeats, min_repeats, max_s)
    finally:
        graph = flush = None            # graph pools leak GiBs across shapes otherwise
        torch.cuda.empty_cache()
    return Timing(samples, "cuda_graph" if used_graph else "cuda_event", "flush" if l2_flush else "hot", used_graph)


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM, or the CPU allocator refusing a tensor."""
    try:
        import torch
        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    msg = str(exc)
    return isinstance(exc, (MemoryError, RuntimeError)) and (
        "out of memory" in msg.lower() or "can't allocate memory" in msg or "DefaultCPUAllocator" in msg)
