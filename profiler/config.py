"""Structured config of the profile job (``conf/profile.yaml``'s ``profile:`` node).

Empty grid lists mean "take them from the ``grid`` preset": ``small`` (tests, seconds),
``cpu`` (a CPU host serving a small model), ``gpu`` (the full GPU grid), ``auto`` (cpu or gpu
by ``hw.device``). An explicit list always wins over the preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

FAMILIES = ("gemm", "elementwise", "attention")
ATTENTION_BACKENDS = ("auto", "flash_attn", "vllm", "sdpa")
# torch: eager torch ops; compile: the same torch-native ops under torch.compile (Inductor), which
# is how vLLM v1 runs them by default (custom ops are off when Inductor compiles the model);
# vllm: vLLM's CUDA custom ops (what vLLM runs with enforce_eager or custom_ops=["all"]).
ELEMENTWISE_BACKENDS = ("auto", "torch", "compile", "vllm")
GRIDS = ("auto", "small", "cpu", "gpu")
# vllm: CUDA graphs where vLLM v1 (cudagraph_mode FULL_AND_PIECEWISE) replays them: GEMMs,
# elementwise ops and collectives of batches up to cuda_graph_max_tokens tokens (piecewise
# graphs), decode attention of up to that many sequences (full graphs); prefill attention eager.
CUDA_GRAPH_MODES = ("vllm", "always", "never")
# vLLM's default max_cudagraph_capture_size (vllm/config/compilation.py: min(2 x max_num_seqs,
# 512)); capture sizes 1, 2, 4, 8..248 step 8, 256..512 step 16. Batches are padded up to the
# next capture size at run time: the simulator's business; the profiler measures exact shapes.
VLLM_MAX_CAPTURE_TOKENS = 512


def _steps(limit: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and their 1.5x) up to ``limit``."""
    out, p = [1, 2, 3], 4
    while p <= limit:
        out += [p] + ([p * 3 // 2] if p * 3 // 2 <= limit else [])
        p *= 2
    return [x for x in out if x <= limit]


# Each preset: tokens (GEMM m, elementwise tokens, prefill chunk sizes), kv lengths, decode and
# prefill batch sizes. The GPU grid goes past Vidur's 4k: 16k tokens and 32k KV.
PRESETS: dict[str, dict[str, list[int]]] = {
    "small": {"tokens": [1, 16, 128], "kv_lens": [16, 256], "decode_batch_sizes": [1, 8],
              "prefill_batch_sizes": [1]},
    "cpu": {"tokens": _steps(4096), "kv_lens": [16, 64, 128, 256, 512, 1024, 2048, 3072, 4096],
            "decode_batch_sizes": [1, 2, 4, 8, 16, 32, 48, 64], "prefill_batch_sizes": [1, 4]},
    "gpu": {"tokens": _steps(16384), "kv_lens": _steps(32768)[6:],
            "decode_batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
            "prefill_batch_sizes": [1, 2, 4, 8]},
}


@dataclass
class ProfileConf:
    tp: list[int] = field(default_factory=lambda: [1, 2, 4, 8])   # kept: those dividing the heads
    pp: list[int] = field(default_factory=lambda: [1])             # only changes send/recv placement
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    grid: str = "auto"
    tokens: list[int] = field(default_factory=list)
    kv_lens: list[int] = field(default_factory=list)
    decode_batch_sizes: list[int] = field(default_factory=list)
    prefill_batch_sizes: list[int] = field(default_factory=list)
    max_tokens_per_batch: int = 0     # prefill batch * chunk cap (0 = max of tokens)
    dtype: str = ""                   # "" = the model's dtype
    block_size: int = 16              # paged-KV block size for the paged backends
    attention_backend: str = "auto"
    elementwise_backend: str = "auto"
    warmup: int = 1                   # at least this many warm-up calls ...
    warmup_ms: float = 25.0           # ... and about this much warm-up time (Triton do_bench's 25 ms)
    repeats: int = 20
    min_repeats: int = 3              # a point stops early after max_seconds_per_point ...
    max_seconds_per_point: float = 1.0  # ... once it has min_repeats samples
    passes: int = 1                   # >1: split the repeats over this many passes through the grid
    l2_flush: bool = True             # GPU only; CPU rows are always l2_policy=hot
    cuda_graph: str = "vllm"          # vllm | always | never (GPU only; see CUDA_GRAPH_MODES)
    cuda_graph_max_tokens: int = VLLM_MAX_CAPTURE_TOKENS
    ragged: bool = True               # also time attention batches whose contexts differ
    resume: bool = True               # false: re-measure, replacing this model's opcast rows only
    max_points: int = 0               # stop after this many new measurements (0 = all)
    dry_run: bool = False             # print the points per family and an ETA; measure a sample only
    calibration_points: int = 12      # points the dry run times for its ETA (spread over sizes)
    monitor_interval_s: float = 1.0   # GPU clock / temperature sampling period (NVML)
    flush_every_points: int = 50
    flush_every_s: float = 30.0
    seed: int = 0
    progress: bool = True
    # collectives (python -m profiler.collectives / torchrun)
    world_size: int = 2               # ranks spawned without torchrun (torchrun's WORLD_SIZE wins)
    collective_world_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])  # subgroups, <= ranks
    collective_ops: list[str] = field(default_factory=lambda: ["all_reduce", "all_gather", "send_recv"])
    collective_sizes_bytes: list[int] = field(default_factory=list)   # empty: tokens x hidden bytes
    collective_backend: str = "auto"  # auto | gloo | nccl
    collective_iters: int = 20        # back-to-back ops per sample (one sample = their time / iters)
    collective_custom_ar: str = "auto"  # vLLM's custom all-reduce: auto (nccl + vLLM installed) | true | false


def register() -> None:
    """Register the ``profile`` schema; ``conf/profile.yaml`` names it in its defaults."""
    from conf import register as register_shared
    register_shared()
    ConfigStore.instance().store(group="profile", name="profile_schema", node=ProfileConf)


def compose(overrides=()):
    """The composed profile job config, as ``python -m profiler.run <overrides>`` would see it."""
    import conf
    register()
    return conf.compose("profile", overrides)
