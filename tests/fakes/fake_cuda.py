"""A stand-in for torch.cuda's timing API (synchronize, streams, events, CUDA graphs, empty_cache)
so profiler.timing.CudaTimer runs on a CPU. Events read ``time.perf_counter_ns``; a graph
"captures" nothing and its replay calls the captured function, flagged in the log as a replay.
Everything the timer does is appended to ``FakeCuda.log`` in order."""
from __future__ import annotations

import contextlib
import time


class FakeCuda:
    def __init__(self, monkeypatch, capture_error: BaseException | None = None):
        import torch
        self.log: list[str] = []
        self.capturing = False
        self.capture_error = capture_error
        fake = self

        class Stream:
            def wait_stream(self, other):
                fake.log.append("wait_stream")

            def synchronize(self):
                fake.log.append("stream.synchronize")

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing, "timing events need enable_timing=True"
                self.t = None

            def record(self, stream=None):
                fake.log.append("event.record")
                self.t = time.perf_counter_ns()

            def synchronize(self):
                fake.log.append("event.synchronize")

            def elapsed_time(self, end):      # milliseconds, as CUDA events
                assert self.t is not None and end.t is not None, "elapsed_time of an unrecorded event"
                return (end.t - self.t) / 1e6

        class CUDAGraph:
            def __init__(self):
                self.fn = None

            def replay(self):
                fake.log.append("graph.replay")
                fake.capturing = "replay"
                try:
                    self.fn()
                finally:
                    fake.capturing = False

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None):
            fake.log.append("graph.capture")
            fake.capturing = True
            fake.current_graph = g
            try:
                yield
                if fake.capture_error is not None:
                    raise fake.capture_error
            finally:
                fake.capturing = False

        @contextlib.contextmanager
        def stream(s):
            fake.log.append("stream.enter")
            yield
            fake.log.append("stream.exit")

        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.log.append("synchronize"))
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.log.append("empty_cache"))

    def kernel(self, seconds: float = 0.0):
        """A launcher that logs each call ("call", or "capture" inside a graph capture) and whose
        graph replays re-run it."""
        def fn():
            if self.capturing is True:
                self.current_graph.fn = fn
                self.log.append("kernel.capture")
                return
            self.log.append("kernel.replay" if self.capturing == "replay" else "kernel")
            if seconds:
                time.sleep(seconds)
        return fn
