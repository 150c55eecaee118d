"""The fidelity workload: Poisson arrivals with seeded uniform prompt/output lengths.

One list of requests feeds both sides: it is written as the JSONL that `vllm bench serve
--dataset-name timed_trace` replays (timestamp s, input_length, output_length, hash_ids), and the
simulator reads the same file. hash_ids are unique per 16-token chunk so no prefix is shared.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from conf.files import write_text

HASH_CHUNK_TOKENS = 16  # vllm bench serve's default --timed-trace-chunk-hash-size


@dataclass(frozen=True)
class TraceSpec:
    num_requests: int = 60
    rate_qps: float = 1.0
    # Short requests: this host has AVX2 but no AVX-512/AMX, so bf16 GEMMs (aten::mm, in the
    # engine as in the profiler) cost milliseconds per token row on one core and the guide's
    # 32-512 / 16-128 lengths would saturate the engine well below 1 QPS.
    input_min: int = 16
    input_max: int = 64
    output_min: int = 8
    output_max: int = 32
    seed: int = 0


def make_trace(spec: TraceSpec) -> list[dict]:
    """Requests sorted by arrival; the first arrives at t=0. Same spec -> same list."""
    if spec.num_requests < 1 or spec.rate_qps <= 0:
        raise ValueError(f"trace needs num_requests >= 1 and rate_qps > 0, got {spec}")
    if not (1 <= spec.input_min <= spec.input_max and 2 <= spec.output_min <= spec.output_max):
        raise ValueError(f"trace lengths need 1 <= input_min <= input_max and 2 <= output_min <= output_max, got {spec}")
    rng = random.Random(spec.seed)
    arrival_s, next_hash, requests = 0.0, 0, []
    for _ in range(spec.num_requests):
        input_len = rng.randint(spec.input_min, spec.input_max)
        output_len = rng.randint(spec.output_min, spec.output_max)
        num_chunks = -(-input_len // HASH_CHUNK_TOKENS)
        requests.append({"timestamp": round(arrival_s, 6), "input_length": input_len,
                         "output_length": output_len,
                         "hash_ids": list(range(next_hash, next_hash + num_chunks))})
        next_hash += num_chunks
        arrival_s += rng.expovariate(spec.rate_qps)
    return requests


def write_jsonl(requests: list[dict], path: str | Path) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in requests))


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"timestamp", "input_length", "output_length"} - set(row)
        if missing:
            raise ValueError(f"{path}:{n}: trace line lacks {sorted(missing)}")
        rows.append(row)
    return rows
