"""Import NVIDIA aiconfigurator's collected operator tables (parquet, ``latency`` in ms).

    python -m profiler.import_aiconfigurator PATH hw=h100 [out_dir=data/profiles]

PATH is aiconfigurator's systems data folder (holding ``h100_sxm/``, ``a100_sxm/``), one system
folder, or one ``*_perf.parquet``. Each table lives at ``<system>/<kind>/<framework>/<version>/``
next to a ``collection_meta.yaml`` naming the framework version, which becomes ``backend``
(e.g. ``vllm-0.14.0``), so versions stay apart. Rows get ``source = "aiconfigurator"``.

What the numbers are (read from aiconfigurator's collector/ sources): CUDA-graph replays timed
with CUDA events, averaged over the runs -> ``time_us_mean`` only (median, min, p10/p90 and std
are not in the source and stay NaN). Tables and their mapping:
- gemm_perf: ``m, n, k`` -> gemm rows; dtypes bfloat16/float16/fp8 (others skipped).
- context_attention_perf: ``batch_size`` sequences of ``isl`` new tokens, no cached prefix
  -> prefill rows. generation_attention_perf: one new token per sequence over ``step`` KV
  tokens (collect_attn.py runs seq_lens=[s], query_lens=[1] and logs step=s; its s grid 2^j - 1
  is what the tables hold) -> decode rows. Paged KV in
  vLLM blocks of 64 (the collector's block_size). dtype = KV-cache dtype (bfloat16 or fp8).
  Sliding-window rows (window_size > 0) are skipped: the schema has no window column.
- custom_allreduce_perf: vLLM's custom all-reduce (``message_size`` elements of bf16), op
  custom_all_reduce, cuda_graph from its ``backend`` (vllm_graph/vllm_eager).
- nccl_perf: nccl-tests all_reduce (``message_size`` elements of ``nccl_dtype``), op
  all_reduce; all_gather/reduce_scatter/alltoall are skipped (not opcast ops).
- moe_perf: fused MoE layer; op ``moe_<distribution>`` (balanced / power_law_<a> routing),
  tp/ep = moe_tp_size/moe_ep_size, ffn_size = per-expert inter_size before TP sharding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from omegaconf import OmegaConf

import conf
from profiler import importing as imp, tables

TOOL = "aiconfigurator"
SYSTEMS = {"h100": "h100_sxm", "a100": "a100_sxm"}
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16", "fp16": "float16",
          "fp8": "fp8"}
BLOCK_SIZE = 64
COMMON = {"timer": "cuda_event", "l2_policy": "hot", "cuda_graph": True}
USAGE = "python -m profiler.import_aiconfigurator PATH hw=<h100|a100> [out_dir=data/profiles]"


def _keep_dtypes(df: pd.DataFrame, col: str) -> pd.DataFrame:
    return df[df[col].isin(DTYPES)].assign(dtype=lambda d: d[col].map(DTYPES))


def convert_gemm(df: pd.DataFrame, where: str) -> pd.DataFrame:
    imp.require_columns(df, ["m", "n", "k", "gemm_dtype", "latency"], where)
    df = _keep_dtypes(df, "gemm_dtype")
    imp.positive_ints(df, ["m", "n", "k"], where)
    return pd.DataFrame({"family": "gemm", "op": "gemm", "dtype": df["dtype"], "m": df["m"], "n": df["n"],
                         "k": df["k"], "latency": df["latency"]})


def convert_attention(df: pd.DataFrame, where: str, phase: str) -> pd.DataFrame:
    cols = ["batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim", "kv_cache_dtype", "step",
            "latency"]
    imp.require_columns(df, cols, where)
    if "window_size" in df:
        df = df[df["window_size"] == 0]
    if "beam_width" in df:
        df = df[df["beam_width"] == 1]
    df = _keep_dtypes(df, "kv_cache_dtype")
    imp.positive_ints(df, ["batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim"], where)
    b, isl, step = (df[c].astype("int64") for c in ("batch_size", "isl", "step"))
    if phase == "prefill":
        if (step != 0).any():
            raise imp.SourceFormatError(f"{where}: context attention rows must have step 0")
        q_len, kv_len = isl, isl
    else:
        if (isl != 1).any() or (step < 1).any():
            raise imp.SourceFormatError(f"{where}: generation attention rows must have isl 1 (one new "
                                        f"token) and step >= 1 (sequence length incl. the new token)")
        # The collector runs seq_lens=[step]*b, query_lens=[1]*b and logs isl=1, step=seq_len: the
        # kernel attends over `step` KV tokens, the new one included (not isl + step).
        q_len, kv_len = isl, step
    return pd.DataFrame({"family": "attention", "op": "attention", "phase": phase, "dtype": df["dtype"],
                         "batch_size": b, "num_q_tokens": b * q_len, "num_kv_tokens": b * kv_len,
                         "max_q_len": q_len, "max_kv_len": kv_len, "q_kv_product_sum": b * q_len * kv_len,
                         "num_heads": df["num_heads"], "num_kv_heads": df["num_key_value_heads"],
                         "head_dim": df["head_dim"], "block_size": BLOCK_SIZE, "latency": df["latency"]})


def _collective(df: pd.DataFrame, op: str, hw: str) -> pd.DataFrame:
    bytes_per = df["dtype"].map(conf.DTYPE_BYTES).astype("int64")
    n = df["num_gpus"].astype("int64")
    return pd.DataFrame({"family": "collective", "op": op, "dtype": df["dtype"],
                         "network": conf.to_hw(OmegaConf.load(conf.CONF_DIR / "hw" / f"{hw}.yaml")).network,
                         "size_bytes": df["message_size"].astype("int64") * bytes_per, "world_size": n,
                         "devices_per_node": n, "latency": df["latency"]})


def convert_custom_allreduce(df: pd.DataFrame, where: str, hw: str) -> pd.DataFrame:
    imp.require_columns(df, ["allreduce_dtype", "num_gpus", "message_size", "backend", "latency"], where)
    df = _keep_dtypes(df, "allreduce_dtype")
    imp.positive_ints(df, ["num_gpus", "message_size"], where)
    graph = df["backend"].map({"vllm_graph": True, "vllm_eager": False})
    if graph.isna().any():
        raise imp.SourceFormatError(f"{where}: backend must be vllm_graph or vllm_eager, found "
                                    f"{df['backend'][graph.isna()].iloc[0]!r}")
    return _collective(df, "custom_all_reduce", hw).assign(cuda_graph=graph.to_numpy())


def convert_nccl(df: pd.DataFrame, where: str, hw: str) -> pd.DataFrame:
    imp.require_columns(df, ["op_name", "nccl_dtype", "num_gpus", "message_size", "latency"], where)
    df = _keep_dtypes(df[df["op_name"] == "all_reduce"], "nccl_dtype")
    imp.positive_ints(df, ["num_gpus", "message_size"], where)
    # nccl-tests runs eagerly and reports the mean out-of-place time over its iterations.
    return _collective(df, "all_reduce", hw).assign(cuda_graph=False, timer="nccl_tests")


def convert_moe(df: pd.DataFrame, where: str) -> pd.DataFrame:
    cols = ["moe_dtype", "num_tokens", "hidden_size", "inter_size", "topk", "num_experts", "moe_tp_size",
            "moe_ep_size", "distribution", "latency"]
    imp.require_columns(df, cols, where)
    df = _keep_dtypes(df, "moe_dtype")
    imp.positive_ints(df, cols[1:8], where)
    return pd.DataFrame({"family": "moe", "op": "moe_" + df["distribution"].astype(str), "dtype": df["dtype"],
                         "num_tokens": df["num_tokens"], "hidden_size": df["hidden_size"],
                         "ffn_size": df["inter_size"], "num_experts": df["num_experts"], "top_k": df["topk"],
                         "tp": df["moe_tp_size"], "ep": df["moe_ep_size"], "latency": df["latency"]})


CONVERTERS = {
    "gemm_perf": lambda df, w, hw: convert_gemm(df, w),
    "context_attention_perf": lambda df, w, hw: convert_attention(df, w, "prefill"),
    "generation_attention_perf": lambda df, w, hw: convert_attention(df, w, "decode"),
    "custom_allreduce_perf": convert_custom_allreduce,
    "nccl_perf": convert_nccl,
    "moe_perf": lambda df, w, hw: convert_moe(df, w),
}


def find_tables(path: Path, hw: str) -> tuple[Path, list[Path]]:
    """(base for relative names, the known *_perf.parquet files for this hw)."""
    if path.is_file():
        if path.stem not in CONVERTERS:
            raise conf.ConfigError(f"{path}: not an aiconfigurator table; known: "
                                   f"{', '.join(f'{k}.parquet' for k in CONVERTERS)}")
        return path.parents[4] if len(path.parents) > 4 else path.parent, [path]
    system = SYSTEMS.get(hw)
    if system is None:
        raise conf.ConfigError(f"aiconfigurator has no data for hw={hw}; supported: {', '.join(SYSTEMS)}")
    root = path if path.name == system else path / system
    if not root.is_dir():
        found = sorted(p.name for p in path.glob(f"**/{system}") if p.is_dir())
        if not found:
            raise conf.ConfigError(f"{path}: no aiconfigurator {system}/ folder inside")
        root = next(p for p in sorted(path.glob(f"**/{system}")) if p.is_dir())
    files = sorted(p for p in root.glob("*/*/*/*.parquet") if p.stem in CONVERTERS)
    if not files:
        raise conf.ConfigError(f"{root}: no aiconfigurator *_perf.parquet tables")
    return root.parent, files


def framework_version(table: Path, df: pd.DataFrame, where: str) -> tuple[str, str]:
    """(framework, version) from collection_meta.yaml, checked against the table's own columns."""
    meta_path = table.parent / "collection_meta.yaml"
    if meta_path.exists():
        runtime = OmegaConf.to_container(OmegaConf.load(meta_path)).get("runtime", {})
        fw, ver = str(runtime.get("framework", "")).lower(), str(runtime.get("version", ""))
    else:
        fw, ver = table.parent.parent.name.lower(), table.parent.name
    versions = sorted(str(x) for x in df["version"].unique()) if "version" in df else []
    if versions and versions != [ver]:
        raise imp.SourceFormatError(f"{where}: version column {versions} "
                                    f"disagrees with collection_meta.yaml version {ver!r}")
    if not fw or not ver:
        raise imp.SourceFormatError(f"{where}: no framework/version (collection_meta.yaml or folder names)")
    return fw, ver


def check_device(df: pd.DataFrame, hw: str, where: str) -> None:
    """A table measured on another GPU than hw= is a user mistake, not data for hw."""
    if "device" in df and len(df):
        devices = sorted(str(d) for d in df["device"].unique())
        if any(hw.upper() not in d.upper() for d in devices):
            raise imp.SourceFormatError(f"{where}: measured on {', '.join(devices)}, not hw={hw}")


def read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a non-parquet file
        raise imp.SourceFormatError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None


def import_aiconfigurator(path: Path, hw: str, out_dir: Path) -> dict[str, int]:
    if hw not in SYSTEMS:
        raise conf.ConfigError(f"aiconfigurator has no data for hw={hw!r}; supported: {', '.join(SYSTEMS)}")
    path = Path(path)
    base, files = find_tables(path, hw)
    rows: dict[str, list[pd.DataFrame]] = {}
    metas: dict[str, list[dict]] = {}
    for table in files:
        where = imp.rel(table, base)
        df = read_parquet(table)
        fw, ver = framework_version(table, df, where)
        check_device(df, hw, where)
        out = CONVERTERS[table.stem](df, where, hw)
        imp.check_ms(out["latency"], f"{where} latency")
        kernels = sorted(str(k) for k in df["kernel_source"].unique()) if "kernel_source" in df else []
        fam = out.pop("family").iloc[0] if len(out) else None
        if fam is None:
            continue
        out = out.assign(backend=f"{fw}-{ver}", time_us_mean=imp.ms_to_us(out.pop("latency")))
        out = out.assign(**{k: v for k, v in COMMON.items() if k not in out.columns})
        rows.setdefault(fam, []).append(out)
        metas.setdefault(fam, []).append({"path": where, "sha256": tables.file_sha256(table), "backend": f"{fw}-{ver}",
                                          "kernel_source": kernels, "rows_in": len(df), "rows_kept": len(out)})
    written = {}
    for fam, frames in sorted(rows.items()):
        df = pd.concat(frames, ignore_index=True)
        df = imp.fill_common(df, fam, hw=hw)
        meta = {**imp.UPSTREAM[TOOL], "importer": f"profiler.import_aiconfigurator v{imp.IMPORTER_VERSION}",
                "files": metas[fam], "files_relative_to": "the folder holding <system>_sxm/ (upstream: "
                "aiconfigurator's systems data folder)", "units": "source latency ms x 1000 -> time_us_mean; message_size "
                "elements x dtype bytes -> size_bytes", "stats": "the source gives one mean latency per "
                "point: only time_us_mean is set, other statistics NaN; repeats unknown (0)"}
        written[fam] = imp.merge_write(Path(out_dir) / hw / f"{fam}.parquet", fam, TOOL, hw, df, meta,
                                       scope="backend")
    return written


def main(argv: Sequence[str]) -> None:
    path, opts = imp.parse_cli(argv, USAGE, {"hw": None, "out_dir": "data/profiles"})
    written = import_aiconfigurator(path, opts["hw"], Path(opts["out_dir"]))
    for fam, n in written.items():
        print(f"{Path(opts['out_dir']) / opts['hw'] / (fam + '.parquet')}: {n} aiconfigurator rows")


if __name__ == "__main__":
    imp.cli(main)()
