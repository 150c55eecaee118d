"""Time a zero-argument kernel launcher: CUDA events on GPU (optionally replaying a CUDA graph,
with an L2 flush before every rep), ``time.perf_counter_ns`` on CPU. Returns per-rep microseconds.

Warm-up is by time, as Triton's ``do_bench`` does: one call (compilation, autotuning, workspace
allocation), five timed calls to estimate the runtime, then as many calls as fill ``warmup_ms``.
A count would warm a 5 µs decode kernel for 15 µs and a 50 ms prefill for 150 ms.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass

L2_FLUSH_BYTES = 256 << 20    # Triton's flush buffer: > 2x the L2 of A100/H100/H200
ESTIMATE_CALLS = 5            # calls that estimate the runtime before the timed warm-up
WARN_CAPTURE_FAILURES = 3     # failed graph captures warned about; all are listed in the metadata


@dataclass
class Timing:
    samples_us: list[float]
    timer: str                 # cuda_event | cuda_graph | perf_counter
    l2_policy: str             # flush | hot
    cuda_graph: bool
    sm_clock_mhz: float = math.nan   # SM clock read right after the samples (NVML; NaN without)


class GraphCaptureOOM(RuntimeError):
    """Capturing the CUDA graph ran out of memory: a row with status oom, not an eager fallback
    (vLLM would fail to capture the same graph)."""


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


def warm_up(fn, sync, *, warmup_ms: float, min_calls: int, max_s: float) -> int:
    """Call ``fn`` for about ``warmup_ms`` (at least ``min_calls`` times, at most ``max_s / 2``
    seconds); ``sync`` waits for the device. Returns the number of calls."""
    start = time.perf_counter()
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(ESTIMATE_CALLS):
        fn()
    sync()
    per_call_s = max((time.perf_counter() - t0) / ESTIMATE_CALLS, 1e-7)
    budget_s = max(0.0, max_s / 2 - (time.perf_counter() - start))
    n = max(min_calls, math.ceil(warmup_ms / 1e3 / per_call_s))
    n = max(1, min(n, int(budget_s / per_call_s)))
    for _ in range(n):
        fn()
    sync()
    return 1 + ESTIMATE_CALLS + n


def sample(step, repeats: int, min_repeats: int, max_s: float) -> list[float]:
    """Up to ``repeats`` samples of ``step()``; stops early once ``max_s`` of wall time has passed
    with ``min_repeats`` taken (big shapes cost seconds each on a CPU)."""
    out: list[float] = []
    start = time.perf_counter()
    while len(out) < repeats:
        out.append(step())
        if len(out) >= min_repeats and time.perf_counter() - start > max_s:
            break
    return out


def time_cpu(fn, *, warmup_ms: float = 25.0, warmup: int = 1, repeats: int = 20, min_repeats: int = 3,
             max_s: float = 2.0) -> Timing:
    warm_up(fn, lambda: None, warmup_ms=warmup_ms, min_calls=warmup, max_s=max_s)

    def step():
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e3
    return Timing(sample(step, repeats, min_repeats, max_s), "perf_counter", "hot", False)


class CudaTimer:
    """Times kernels on one GPU. Created once per run: the 256 MB L2-flush buffer is allocated
    here, before any kernel's inputs, so it can never be the allocation that turns a big shape
    into an OOM row. ``clock`` (optional) returns the current SM clock in MHz (NVML)."""

    def __init__(self, l2_flush: bool = True, device="cuda", flush_bytes: int = L2_FLUSH_BYTES, clock=None):
        import torch
        self.flush = torch.empty(flush_bytes, dtype=torch.uint8, device=device) if l2_flush else None
        self.clock = clock
        self.capture_failures: list[str] = []     # ops that fell back to eager timing (and why)

    def time(self, fn, *, graph: bool, warmup_ms: float = 25.0, warmup: int = 1, repeats: int = 20,
             min_repeats: int = 3, max_s: float = 2.0, label: str = "") -> Timing:
        import torch
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # autotuning, workspaces, JIT happen before any capture
            warm_up(fn, side.synchronize, warmup_ms=warmup_ms, min_calls=warmup, max_s=max_s)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = self._capture(fn, label) if graph else None
        run, used = (g.replay, True) if g is not None else (fn, False)
        if g is not None:
            g.replay()                  # the first replay uploads the graph: not a sample
            torch.cuda.synchronize()
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush = self.flush

        def step():
            if flush is not None:
                flush.zero_()           # cold L2, and the CPU runs ahead of the GPU while it clears
            start_ev.record()
            run()
            end_ev.record()
            end_ev.synchronize()
            return start_ev.elapsed_time(end_ev) * 1e3
        try:
            samples = sample(step, repeats, min_repeats, max_s)
        finally:
            run = g = None              # graph pools leak GiBs across shapes otherwise
            torch.cuda.empty_cache()
        clock = self.clock() if self.clock else math.nan
        return Timing(samples, "cuda_graph" if used else "cuda_event", "flush" if flush is not None else "hot",
                      used, clock)

    def _capture(self, fn, label: str):
        """The captured graph, or None when this kernel cannot be captured (timed eagerly, with a
        warning). An out-of-memory during capture raises GraphCaptureOOM instead."""
        import torch
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                fn()
            return g
        except Exception as exc:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            if is_oom(exc):
                raise GraphCaptureOOM(f"out of memory capturing the CUDA graph of {label}: {exc}") from exc
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.capture_failures.append(f"{label}: {reason}")
            if len(self.capture_failures) <= WARN_CAPTURE_FAILURES:
                more = "" if len(self.capture_failures) < WARN_CAPTURE_FAILURES else \
                    " (further failures: only in the table metadata, graph_capture_failures)"
                warnings.warn(f"CUDA-graph capture failed for {label} ({reason}); timed eagerly "
                              f"(timer=cuda_event){more}", stacklevel=2)
            return None


def is_oom(exc: BaseException | None) -> bool:
    """CUDA OOM, or the CPU allocator refusing a tensor, anywhere in the exception's chain (a
    failed graph capture re-raises its own error with the OOM as context)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GraphCaptureOOM):
            return True
        try:
            import torch
            if isinstance(exc, torch.OutOfMemoryError):
                return True
        except (ImportError, AttributeError):
            pass
        msg = str(exc)
        if isinstance(exc, (MemoryError, RuntimeError)) and (
                "out of memory" in msg.lower() or "can't allocate memory" in msg or "DefaultCPUAllocator" in msg):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
