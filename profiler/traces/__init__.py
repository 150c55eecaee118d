"""Readers of request traces, one module per source format (a plain dict: name -> reader).

Each reader has ``detect(path, head_text) -> bool``, ``read(path, opts) -> Trace`` and
``OPTIONS`` (its ``key=value`` options with defaults). ``python -m profiler.import_traces``
picks one by ``format=`` or by detection and writes the trace parquet."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from profiler.traces import azure, burstgpt, llmservingsim, lmbench, mooncake, sharegpt, vidur, vllm_bench
from profiler.traces.common import Trace


@dataclass(frozen=True)
class Format:
    detect: Callable
    read: Callable
    options: dict
    about: str


# Detection order: the most specific first (a vLLM result is one JSON object; token-id traces
# before hash-id traces; CSV headers last).
FORMATS: dict[str, Format] = {
    "vllm_bench": Format(vllm_bench.detect, vllm_bench.read, vllm_bench.OPTIONS,
                         "`vllm bench serve --save-result [--save-detailed]` JSON"),
    "llmservingsim": Format(llmservingsim.detect, llmservingsim.read, llmservingsim.OPTIONS,
                            "LLMServingSim JSONL with input_tok_ids"),
    "mooncake": Format(mooncake.detect, mooncake.read_mooncake, mooncake.OPTIONS,
                       "Mooncake JSONL (timestamp ms, hash_ids per 512 tokens)"),
    "timed_trace": Format(mooncake.detect_timed_trace, mooncake.read, mooncake.TIMED_TRACE_OPTIONS,
                          "vLLM timed_trace JSONL (timestamp s, hash_ids per 16 tokens)"),
    "sharegpt": Format(sharegpt.detect, sharegpt.read, sharegpt.OPTIONS, "ShareGPT conversations JSON"),
    "lmbench": Format(lmbench.detect, lmbench.read, lmbench.OPTIONS, "LMBench per-request CSV (llm-d-benchmark)"),
    "burstgpt": Format(burstgpt.detect, burstgpt.read, burstgpt.OPTIONS, "BurstGPT CSV"),
    "azure": Format(azure.detect, azure.read, azure.OPTIONS, "Azure LLM inference trace 2023/2024 CSV"),
    "vidur": Format(vidur.detect, vidur.read, vidur.OPTIONS, "Vidur processed trace CSV"),
}

__all__ = ["FORMATS", "Format", "Trace"]
