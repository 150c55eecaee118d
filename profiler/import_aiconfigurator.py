"""Import NVIDIA aiconfigurator's collected operator tables (parquet, ``latency`` in ms).

    python -m profiler.import_aiconfigurator PATH hw=h100 [out_dir=data/profiles]

PATH is aiconfigurator's systems data folder (holding ``h100_sxm/``, ``b200_sxm/``, ``gb200/``,
...), one system folder, or one ``*_perf.parquet``. Each table lives at
``<system>/<kind>/<framework>/<version>/`` next to a ``collection_meta.yaml`` naming the framework,
which becomes ``backend`` (e.g. ``vllm-0.24.0``) with the version the collector wrote into the
rows (see ``framework_version``), so versions stay apart. Rows get ``source = "aiconfigurator"``.

What the numbers are (read from aiconfigurator's collector/ sources): CUDA-graph replays timed
with CUDA events, averaged over the runs -> ``time_us_mean`` only (median, min, p10/p90 and std
are not in the source and stay NaN). Tables and their mapping:
- gemm_perf: ``m, n, k`` -> gemm rows; dtypes bfloat16/float16/fp8 (per-tensor) and fp8_block
  (128x128 block-scaled weights, per-token-group activations; DeepSeek's fp8 format); nvfp4 skipped.
- context_attention_perf: ``batch_size`` sequences of ``isl`` new tokens, no cached prefix
  -> prefill rows. generation_attention_perf: one new token per sequence over ``step`` KV
  tokens (collect_attn.py runs seq_lens=[s], query_lens=[1] and logs step=s; its s grid 2^j - 1
  is what the tables hold) -> decode rows. Paged KV in
  vLLM blocks of 64 (the collector's block_size). dtype = KV-cache dtype (bfloat16 or fp8).
  Sliding-window rows (window_size > 0) are skipped: the schema has no window column.
- custom_allreduce_perf: vLLM's custom all-reduce (``message_size`` elements of bf16), op
  custom_all_reduce, cuda_graph from its ``backend`` (vllm_graph/vllm_eager).
- nccl_perf: nccl-tests (``message_size`` = the -b size in bytes // bytes per element of
  ``nccl_dtype``), ops all_reduce, all_gather, reduce_scatter, all_to_all (upstream ``alltoall``);
  the size is nccl-tests' full buffer per rank (see profiler.tables). int8 rows skipped.
- moe_perf: fused MoE layer; op ``moe_<distribution>`` (balanced / power_law_<a> routing),
  tp/ep = moe_tp_size/moe_ep_size, ffn_size = per-expert inter_size before TP sharding.
- mla_context_module_perf / mla_generation_module_perf: vLLM's DeepseekV2MLAAttention module
  (collect_mla_module.py) -> mla rows, same token semantics as attention (context: ``step`` =
  cached prefix, 0 in the shipped tables; generation: ``step`` KV tokens incl. the new one).
- mla_bmm_perf: MLA decode's absorbed per-head torch.bmm (collect_mla_bmm.py) -> bmm rows.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import pandas as pd
from omegaconf import OmegaConf

import conf
from profiler import importing as imp, tables

TOOL = "aiconfigurator"
SYSTEMS = {"h100": "h100_sxm", "a100": "a100_sxm", "b200": "b200_sxm", "gb200": "gb200",
           "b300": "b300_sxm", "l40s": "l40s"}
# Source dtype -> opcast dtype. Kept: the 16-bit types and fp8 (conf.schema.DTYPE_BYTES keys) and
# fp8_block, a well-defined format of its own (fp8 e4m3 weights with one scale per 128x128 block,
# activations scaled per token and 128-channel group: DeepSeek-V3's checkpoints, vLLM's
# Fp8Config(weight_block_size=[128, 128])), kept under its own name for the estimator/simulator to
# use or not. Skipped (no opcast dtype, no FP4 peak on the hw cards): nvfp4, int4_wo (w4a16),
# w4a16_mxfp4, w4a8_mxfp4_mxfp8; NCCL int8.
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "half": "float16", "fp16": "float16",
          "fp8": "fp8", "fp8_block": "fp8_block"}
COLLECTIVE_DTYPES = {"bfloat16": "bfloat16", "half": "float16", "float16": "float16"}
NCCL_OPS = {"all_reduce": "all_reduce", "all_gather": "all_gather", "reduce_scatter": "reduce_scatter",
            "alltoall": "all_to_all"}
# The MLA module tables are DeepSeek-V3's attention block (collect_mla_module.py builds vLLM's
# DeepseekV2MLAAttention from the model's config.json, only num_heads overridden). Its sizes, from
# huggingface.co/deepseek-ai/DeepSeek-V3 config.json, become columns; `model` names the opcast card.
MLA_MODELS = {"deepseek-ai/DeepSeek-V3": {
    "model": "deepseek-v3", "hidden_size": 7168, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}}
# collect_mla_bmm.py: DeepSeek-V3/R1 dims (qk_nope_head_dim 128, kv_lora_rank 512, v_head_dim 128).
# mla_gen_pre: q_nope [heads, tokens, 128] @ W_UK_T [heads, 128, 512]; mla_gen_post: attention
# output [heads, tokens, 512] @ W_UV [heads, 512, 128] -> (k, n) per op.
MLA_BMM_KN = {"mla_gen_pre": (128, 512), "mla_gen_post": (512, 128)}
BLOCK_SIZE = 64
COMMON = {"timer": "cuda_event", "l2_policy": "hot", "cuda_graph": True}
USAGE = f"python -m profiler.import_aiconfigurator PATH hw=<{'|'.join(SYSTEMS)}> [out_dir=data/profiles]"


def _keep_dtypes(df: pd.DataFrame, col: str, dtypes: dict = DTYPES) -> pd.DataFrame:
    return df[df[col].isin(dtypes)].assign(dtype=lambda d: d[col].map(dtypes))


def convert_gemm(df: pd.DataFrame, where: str) -> pd.DataFrame:
    imp.require_columns(df, ["m", "n", "k", "gemm_dtype", "latency"], where)
    df = _keep_dtypes(df, "gemm_dtype")
    imp.positive_ints(df, ["m", "n", "k"], where)
    return pd.DataFrame({"family": "gemm", "op": "gemm", "dtype": df["dtype"], "m": df["m"], "n": df["n"],
                         "k": df["k"], "latency": df["latency"]})


def _token_columns(b: pd.Series, q_len: pd.Series, kv_len: pd.Series) -> dict:
    """The attention family's token columns for b equal sequences of q_len new over kv_len tokens."""
    return {"batch_size": b, "num_q_tokens": b * q_len, "num_kv_tokens": b * kv_len, "max_q_len": q_len,
            "max_kv_len": kv_len, "q_kv_product_sum": b * q_len * kv_len}


def _lengths(df: pd.DataFrame, phase: str, where: str) -> tuple[pd.Series, pd.Series]:
    """(new tokens, KV tokens) per sequence from aiconfigurator's ``isl``/``step`` columns.

    Context rows: ``isl`` new tokens after ``step`` cached ones (collect_mla_module.py logs the
    prefix as step; the attention tables have step 0). Generation rows: the collectors run
    seq_lens=[step]*b, query_lens=[1]*b and log isl=1, step=seq_len, so the kernel attends over
    ``step`` KV tokens, the new one included (not isl + step).
    """
    isl, step = df["isl"].astype("int64"), df["step"].astype("int64")
    if phase == "prefill":
        if (step < 0).any():
            raise imp.SourceFormatError(f"{where}: context rows need step (cached prefix) >= 0")
        return isl, isl + step
    if (isl != 1).any() or (step < 1).any():
        raise imp.SourceFormatError(f"{where}: generation rows must have isl 1 (one new token) and step >= 1 "
                                    f"(sequence length incl. the new token)")
    return isl, step


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
    if phase == "prefill" and (df["step"] != 0).any():
        raise imp.SourceFormatError(f"{where}: context attention rows must have step 0")
    b = df["batch_size"].astype("int64")
    return pd.DataFrame({"family": "attention", "op": "attention", "phase": phase, "dtype": df["dtype"],
                         **_token_columns(b, *_lengths(df, phase, where)),
                         "num_heads": df["num_heads"], "num_kv_heads": df["num_key_value_heads"],
                         "head_dim": df["head_dim"], "block_size": BLOCK_SIZE, "latency": df["latency"]})


def _collective(df: pd.DataFrame, op, hw: str) -> pd.DataFrame:
    bytes_per = df["dtype"].map(conf.DTYPE_BYTES).astype("int64")
    n = df["num_gpus"].astype("int64")
    return pd.DataFrame({"family": "collective", "op": op, "dtype": df["dtype"],
                         "network": conf.to_hw(OmegaConf.load(conf.CONF_DIR / "hw" / f"{hw}.yaml")).network,
                         "size_bytes": df["message_size"].astype("int64") * bytes_per, "world_size": n,
                         "devices_per_node": n, "latency": df["latency"]})


def convert_custom_allreduce(df: pd.DataFrame, where: str, hw: str) -> pd.DataFrame:
    imp.require_columns(df, ["allreduce_dtype", "num_gpus", "message_size", "backend", "latency"], where)
    df = _keep_dtypes(df, "allreduce_dtype", COLLECTIVE_DTYPES)
    imp.positive_ints(df, ["num_gpus", "message_size"], where)
    graph = df["backend"].map({"vllm_graph": True, "vllm_eager": False})
    if graph.isna().any():
        raise imp.SourceFormatError(f"{where}: backend must be vllm_graph or vllm_eager, found "
                                    f"{df['backend'][graph.isna()].iloc[0]!r}")
    return _collective(df, "custom_all_reduce", hw).assign(cuda_graph=graph.to_numpy())


def convert_nccl(df: pd.DataFrame, where: str, hw: str) -> pd.DataFrame:
    imp.require_columns(df, ["op_name", "nccl_dtype", "num_gpus", "message_size", "latency"], where)
    unknown = sorted(set(df["op_name"].astype(str)) - set(NCCL_OPS))
    if unknown:
        raise imp.SourceFormatError(f"{where}: unknown NCCL op(s) {', '.join(unknown)}; known: "
                                    f"{', '.join(NCCL_OPS)}")
    df = _keep_dtypes(df, "nccl_dtype", COLLECTIVE_DTYPES)
    imp.positive_ints(df, ["num_gpus", "message_size"], where)
    # nccl-tests runs eagerly and reports the mean out-of-place time over its iterations.
    return _collective(df, df["op_name"].map(NCCL_OPS), hw).assign(cuda_graph=False, timer="nccl_tests")


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


def convert_mla(df: pd.DataFrame, where: str, phase: str) -> pd.DataFrame:
    cols = ["model", "mla_dtype", "kv_cache_dtype", "gemm_type", "num_heads", "batch_size", "isl", "tp_size",
            "step", "latency"]
    imp.require_columns(df, cols, where)
    unknown = sorted(set(df["model"].astype(str)) - set(MLA_MODELS))
    if unknown:
        raise imp.SourceFormatError(f"{where}: MLA module of unknown model(s) {', '.join(unknown)}; known: "
                                    f"{', '.join(MLA_MODELS)} (add its MLA sizes to MLA_MODELS)")
    if (df["tp_size"] != 1).any():
        raise imp.SourceFormatError(f"{where}: tp_size must be 1 (num_heads are the GPU's heads)")
    df = df[df["gemm_type"].isin(DTYPES) & df["mla_dtype"].isin(DTYPES)]
    df = _keep_dtypes(df, "kv_cache_dtype")
    imp.positive_ints(df, ["num_heads", "batch_size", "isl"], where)
    b = df["batch_size"].astype("int64")
    sizes = pd.DataFrame([MLA_MODELS[m] for m in df["model"]], index=df.index,
                         columns=list(next(iter(MLA_MODELS.values()))))
    return pd.DataFrame({"family": "mla", "op": "mla", "phase": phase, "dtype": df["dtype"],
                         **_token_columns(b, *_lengths(df, phase, where)), "num_heads": df["num_heads"],
                         **{c: sizes[c] for c in sizes.columns}, "tp": 0,
                         "weight_dtype": df["gemm_type"].map(DTYPES), "attn_dtype": df["mla_dtype"].map(DTYPES),
                         "block_size": BLOCK_SIZE, "latency": df["latency"]})


def convert_mla_bmm(df: pd.DataFrame, where: str) -> pd.DataFrame:
    imp.require_columns(df, ["op_name", "bmm_dtype", "num_tokens", "num_heads", "latency"], where)
    unknown = sorted(set(df["op_name"].astype(str)) - set(MLA_BMM_KN))
    if unknown:
        raise imp.SourceFormatError(f"{where}: unknown MLA BMM op(s) {', '.join(unknown)}; known: "
                                    f"{', '.join(MLA_BMM_KN)}")
    df = _keep_dtypes(df, "bmm_dtype")
    imp.positive_ints(df, ["num_tokens", "num_heads"], where)
    k, n = (df["op_name"].map({op: kn[i] for op, kn in MLA_BMM_KN.items()}) for i in (0, 1))
    return pd.DataFrame({"family": "bmm", "op": df["op_name"], "dtype": df["dtype"], "batch": df["num_heads"],
                         "m": df["num_tokens"], "n": n, "k": k, "latency": df["latency"]})


CONVERTERS = {
    "gemm_perf": lambda df, w, hw: convert_gemm(df, w),
    "context_attention_perf": lambda df, w, hw: convert_attention(df, w, "prefill"),
    "generation_attention_perf": lambda df, w, hw: convert_attention(df, w, "decode"),
    "custom_allreduce_perf": convert_custom_allreduce,
    "nccl_perf": convert_nccl,
    "moe_perf": lambda df, w, hw: convert_moe(df, w),
    "mla_context_module_perf": lambda df, w, hw: convert_mla(df, w, "prefill"),
    "mla_generation_module_perf": lambda df, w, hw: convert_mla(df, w, "decode"),
    "mla_bmm_perf": lambda df, w, hw: convert_mla_bmm(df, w),
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


def framework_version(table: Path, where: str) -> tuple[str, str]:
    """(framework, version) that collection_meta.yaml (else the folder names) gives the table."""
    meta_path = table.parent / "collection_meta.yaml"
    if meta_path.exists():
        runtime = OmegaConf.to_container(OmegaConf.load(meta_path)).get("runtime", {})
        fw, ver = str(runtime.get("framework", "")).lower(), str(runtime.get("version", ""))
    else:
        fw, ver = table.parent.parent.name.lower(), table.parent.name
    if not fw or not ver:
        raise imp.SourceFormatError(f"{where}: no framework/version (collection_meta.yaml or folder names)")
    return fw, ver


def rows_version(kept: pd.DataFrame, folder_version: str, where: str) -> str:
    """The runtime version the collector wrote into the kept rows (vllm.__version__ or NCCL's at
    measurement time), which wins over the folder's: upstream files some rows measured with another
    runtime under a newer folder (l40s custom all-reduce: rows 0.14.0 in comm/vllm/0.22.0; b200/b300
    moe: w4a16_mxfp4 rows from a preview build, skipped with their dtype)."""
    versions = sorted({str(v) for v in kept["version"]}) if "version" in kept and len(kept) else []
    if len(versions) > 1:
        raise imp.SourceFormatError(f"{where}: kept rows come from several runtime versions {versions}; "
                                    f"one file must hold one version")
    return versions[0] if versions else folder_version


def check_device(df: pd.DataFrame, hw: str, where: str) -> None:
    """A table measured on another GPU than hw= is a user mistake, not data for hw. The hw name must
    appear as a word of the device name (b200 is in "NVIDIA B200", not in "NVIDIA GB200")."""
    if "device" in df and len(df):
        devices = sorted(str(d) for d in df["device"].unique())
        word = re.compile(rf"(?<![A-Z0-9]){re.escape(hw.upper())}(?![0-9])")
        if not all(word.search(d.upper()) for d in devices):
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
        fw, folder_version = framework_version(table, where)
        check_device(df, hw, where)
        out = CONVERTERS[table.stem](df, where, hw)
        imp.check_ms(out["latency"], f"{where} latency")
        if not len(out):
            continue
        kept = df.loc[out.index]          # converters keep the source's row labels
        backend = f"{fw}-{rows_version(kept, folder_version, where)}"
        fam = out.pop("family").iloc[0]
        out = out.assign(backend=backend, time_us_mean=imp.ms_to_us(out.pop("latency")))
        out = out.assign(**{k: v for k, v in COMMON.items() if k not in out.columns})
        rows.setdefault(fam, []).append(out)
        meta = {"path": where, "sha256": tables.file_sha256(table), "backend": backend,
                "kernel_source": sorted(str(k) for k in kept["kernel_source"].unique()) if "kernel_source" in kept
                else [], "rows_in": len(df), "rows_kept": len(out)}
        if backend != f"{fw}-{folder_version}":
            meta["collection_meta_version"] = folder_version
        metas.setdefault(fam, []).append(meta)
    written = {}
    for fam, frames in sorted(rows.items()):
        df = pd.concat(frames, ignore_index=True)
        df = imp.fill_common(df, fam, hw=hw)
        meta = {**imp.UPSTREAM[TOOL], "importer": f"profiler.import_aiconfigurator v{imp.IMPORTER_VERSION}",
                "files": metas[fam], "files_relative_to": "the folder holding <system>/ (upstream: "
                "aiconfigurator's systems data folder)", "units": "source latency ms x 1000 -> time_us_mean; message_size "
                "elements x dtype bytes -> size_bytes (nccl-tests full buffer per rank)", "stats": "the source gives one mean latency per "
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
