"""The tidy-table contract between the profiler (and importers) and the estimator.

One parquet file per operator family: ``<dir>/<family>.parquet``. One row per measured point,
one column per variable, units in column names, provenance as JSON in the schema metadata
under the key ``opcast``. This module needs only pyarrow/pandas (no torch).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from conf import ConfigError
from conf.files import atomic_write

META_KEY = b"opcast"
SCHEMA_VERSION = 1

STAT_COLUMNS = ["time_us_median", "time_us_mean", "time_us_min", "time_us_p10", "time_us_p90",
                "time_us_std"]

# Columns every family has. `status` is ok | oom | error | skipped; non-ok rows keep NaN times.
COMMON = [
    ("hw", pa.string()), ("source", pa.string()), ("op", pa.string()), ("dtype", pa.string()),
    ("backend", pa.string()), ("timer", pa.string()), ("l2_policy", pa.string()),
    ("cuda_graph", pa.bool_()), ("threads", pa.int32()), ("status", pa.string()),
    *[(c, pa.float64()) for c in STAT_COLUMNS], ("repeats", pa.int32()),
]

# Shape columns per family. `model`/`tp` say which model shard a shape came from ("" / 0 when generic).
FAMILIES: dict[str, list[tuple[str, pa.DataType]]] = {
    "gemm": [("model", pa.string()), ("tp", pa.int32()), ("m", pa.int64()), ("n", pa.int64()),
             ("k", pa.int64())],
    # norms, activations, rope, residual add, embedding; width = elements per token per GPU
    "elementwise": [("model", pa.string()), ("tp", pa.int32()), ("num_tokens", pa.int64()),
                    ("width", pa.int64()), ("num_heads", pa.int32()), ("num_kv_heads", pa.int32()),
                    ("head_dim", pa.int32())],
    # phase prefill|decode; per-GPU heads; q/kv token sums over the batch; block_size 0 = not paged
    "attention": [("model", pa.string()), ("tp", pa.int32()), ("phase", pa.string()),
                  ("batch_size", pa.int64()), ("num_q_tokens", pa.int64()), ("num_kv_tokens", pa.int64()),
                  ("max_q_len", pa.int64()), ("max_kv_len", pa.int64()), ("q_kv_product_sum", pa.int64()),
                  ("num_heads", pa.int32()), ("num_kv_heads", pa.int32()), ("head_dim", pa.int32()),
                  ("block_size", pa.int32())],
    # op all_reduce|custom_all_reduce|send_recv|all_gather|reduce_scatter|all_to_all; size_bytes =
    # the full buffer per rank (all_gather: the gathered output, reduce_scatter: the input,
    # all_to_all: the send buffer, i.e. world_size x the piece one rank sends to one peer)
    "collective": [("network", pa.string()), ("size_bytes", pa.int64()), ("world_size", pa.int32()),
                   ("devices_per_node", pa.int32())],
    # fused MoE layer: tokens routed through num_experts experts, top-k each
    "moe": [("model", pa.string()), ("tp", pa.int32()), ("num_tokens", pa.int64()),
            ("hidden_size", pa.int64()), ("ffn_size", pa.int64()), ("num_experts", pa.int32()),
            ("top_k", pa.int32()), ("ep", pa.int32())],
    # Multi-head latent attention module (DeepSeek-V2/V3): the whole attention block of one layer on
    # one GPU (q/kv down- and up-projections, norms, rope, KV-cache write, attention, o_proj), with
    # num_heads query heads on that GPU; the MLA sizes are columns so the rows say which model shape
    # they are. Token columns as in "attention"; dtype = KV-cache dtype, weight_dtype = the
    # projections' GEMM precision, attn_dtype = the attention's query/compute precision.
    "mla": [("model", pa.string()), ("tp", pa.int32()), ("phase", pa.string()),
            ("batch_size", pa.int64()), ("num_q_tokens", pa.int64()), ("num_kv_tokens", pa.int64()),
            ("max_q_len", pa.int64()), ("max_kv_len", pa.int64()), ("q_kv_product_sum", pa.int64()),
            ("num_heads", pa.int32()), ("hidden_size", pa.int64()), ("q_lora_rank", pa.int32()),
            ("kv_lora_rank", pa.int32()), ("qk_nope_head_dim", pa.int32()), ("qk_rope_head_dim", pa.int32()),
            ("v_head_dim", pa.int32()), ("weight_dtype", pa.string()), ("attn_dtype", pa.string()),
            ("block_size", pa.int32())],
    # batched GEMM (torch.bmm): `batch` independent (m x k) @ (k x n) products; m = tokens
    # (MLA decode's absorbed per-head projections: batch = heads on the GPU)
    "bmm": [("model", pa.string()), ("tp", pa.int32()), ("batch", pa.int64()), ("m", pa.int64()),
            ("n", pa.int64()), ("k", pa.int64())],
}


# Optional measurement columns: written by the profiler, NaN where a source does not have them
# (old files and importers get them filled on read / write). sm_clock_mhz: the GPU's SM clock
# read right after the point's samples (NVML), to spot throttled points.
OPTIONAL = [("sm_clock_mhz", pa.float64())]


class TableError(ConfigError):
    """A profile table that does not follow the contract; the message names what is wrong."""


def schema(family: str) -> pa.Schema:
    if family not in FAMILIES:
        raise TableError(f"unknown operator family {family!r}; known: {', '.join(FAMILIES)}")
    return pa.schema([pa.field(n, t) for n, t in COMMON + FAMILIES[family] + OPTIONAL])


def identity_columns(family: str) -> list[str]:
    """Columns that identify a measured point (for resume and de-duplication)."""
    skip = set(STAT_COLUMNS) | {"repeats", "status"}
    return [n for n, _ in COMMON + FAMILIES[family] if n not in skip]


def to_arrow(df: pd.DataFrame, family: str, provenance: dict | None = None) -> pa.Table:
    sch = schema(family)
    df = _with_optional(df)
    missing = [f.name for f in sch if f.name not in df.columns]
    if missing:
        raise TableError(f"{family} table lacks columns: {', '.join(missing)}")
    table = pa.Table.from_pandas(df[[f.name for f in sch]], schema=sch, preserve_index=False)
    meta = {"schema_version": SCHEMA_VERSION, "family": family, **(provenance or {})}
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True, default=str)})


def write(df: pd.DataFrame, path: str | Path, family: str, provenance: dict | None = None) -> Path:
    """Write atomically (temp file + rename) so an interrupted run never leaves a torn file."""
    table = to_arrow(df, family, provenance)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read(path: str | Path, family: str | None = None) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"no profile table at {path}")
    family = family or path.stem
    table = pq.read_table(path)
    optional = {n for n, _ in OPTIONAL}
    missing = [f.name for f in schema(family) if f.name not in table.column_names and f.name not in optional]
    if missing:
        raise TableError(f"{path}: not an opcast {family} table, lacks {', '.join(missing)}")
    return _with_optional(table.to_pandas())


def _with_optional(df: pd.DataFrame) -> pd.DataFrame:
    missing = [n for n, _ in OPTIONAL if n not in df.columns]
    if missing:
        df = df.copy()
        for n in missing:
            df[n] = float("nan")
    return df


def provenance(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}"))


def read_dir(directory: str | Path, family: str) -> pd.DataFrame:
    """The family's table in a profile directory (``data/profiles/<hw>``), or an empty frame."""
    p = Path(directory) / f"{family}.parquet"
    if not p.exists():
        return schema(family).empty_table().to_pandas()
    return read(p, family)


def file_sha256(path: str | Path) -> str:
    """Content hash of a file (inputs' provenance, trained models' data fingerprint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
