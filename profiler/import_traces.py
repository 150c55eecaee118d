"""Import request-length traces (Vidur's processed Splitwise and arXiv traces) as parquet.

    python -m profiler.import_traces PATH name=splitwise_conv [out_dir=data/traces]

PATH is a CSV with ``num_prefill_tokens``, ``num_decode_tokens`` and, for arrival traces,
``arrived_at`` (seconds since the first request). Output ``<out_dir>/<name>.parquet`` has
``arrived_at_s`` (float64, only when the source has arrival times; non-decreasing, no NaN),
``num_prefill_tokens`` and ``num_decode_tokens`` (int64, > 0 decode, >= 1 prefill), in the source's
order; provenance (upstream, licence, file hash) is in the schema metadata under ``opcast``.
Derived source columns (``num_total_tokens``, ``pd_ratio``) are checked, not copied.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

import conf
from profiler import importing as imp, tables

USAGE = "python -m profiler.import_traces PATH name=NAME [out_dir=data/traces]"

# What we know about the traces Vidur ships (vidur/data/processed_traces at the pinned commit).
KNOWN = {
    "splitwise_conv.csv": {
        "description": "Azure LLM inference trace 2023, conversation service (Splitwise, ISCA'24): "
                       "arrival time and prompt/output token counts per request",
        "upstream_data": "https://github.com/Azure/AzurePublicDataset (AzureLLMInferenceTrace_conv)",
        "licence": "CC-BY attribution licence (Azure Public Dataset terms); cite Splitwise"},
    "splitwise_code.csv": {
        "description": "Azure LLM inference trace 2023, code-completion service (Splitwise, ISCA'24): "
                       "arrival time and prompt/output token counts per request",
        "upstream_data": "https://github.com/Azure/AzurePublicDataset (AzureLLMInferenceTrace_code)",
        "licence": "CC-BY attribution licence (Azure Public Dataset terms); cite Splitwise"},
    "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv": {
        "description": "arXiv summarization (article -> abstract) token counts with the Llama-2 "
                       "tokenizer (Vidur's filtered_v2 file: <= 4096 total tokens per request); no arrival times",
        "upstream_data": "arXiv summarization dataset (Cohan et al. 2018), token counts only",
        "licence": "not stated by Vidur for the dataset; only token counts are redistributed"},
}


def convert_trace(df: pd.DataFrame, where: str) -> pd.DataFrame:
    imp.require_columns(df, ["num_prefill_tokens", "num_decode_tokens"], where)
    if "arrived_at_s" in df.columns or any(c.startswith("arrived_at_") for c in df.columns):
        odd = [c for c in df.columns if c.startswith("arrived_at")]
        raise imp.SourceFormatError(f"{where}: arrival column {odd[0]!r}; expected 'arrived_at' in seconds")
    if len(df) == 0:
        raise imp.SourceFormatError(f"{where}: no requests")
    imp.positive_ints(df, ["num_prefill_tokens", "num_decode_tokens"], where)
    out = pd.DataFrame(index=df.index)
    if "arrived_at" in df.columns:
        t = pd.to_numeric(df["arrived_at"], errors="coerce")
        if t.isna().any() or np.isinf(t).any() or (t < 0).any():
            raise imp.SourceFormatError(f"{where}: arrived_at must be finite seconds >= 0")
        if (t.diff().dropna() < 0).any():
            i = int(np.argmax(t.diff().to_numpy()[1:] < 0)) + 1
            raise imp.SourceFormatError(f"{where}: arrived_at decreases at row {i} ({t.iloc[i - 1]} -> "
                                        f"{t.iloc[i]}); a trace must be in arrival order")
        out["arrived_at_s"] = t.astype("float64")
    out["num_prefill_tokens"] = df["num_prefill_tokens"].astype("int64")
    out["num_decode_tokens"] = df["num_decode_tokens"].astype("int64")
    if "num_total_tokens" in df.columns and \
            (df["num_total_tokens"] != out["num_prefill_tokens"] + out["num_decode_tokens"]).any():
        raise imp.SourceFormatError(f"{where}: num_total_tokens != num_prefill_tokens + num_decode_tokens")
    return out.reset_index(drop=True)


def import_trace(path: Path, name: str, out_dir: Path) -> Path:
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise conf.ConfigError(f"name={name!r}: use lower-case letters, digits and '_' (it names the file)")
    path = Path(path)
    if not path.is_file():
        raise conf.ConfigError(f"{path}: not a file; give one trace CSV")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise imp.SourceFormatError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    out = convert_trace(df, path.name)
    # `licence` is the data's own; `via` is the repository (and its licence) that ships the CSV.
    meta = {"kind": "request_trace", "name": name, "source": "vidur", "via": imp.UPSTREAM["vidur"],
            "licence": "unknown (not one of the traces Vidur ships)",
            "file": {"path": f"data/processed_traces/{path.name}" if path.name in KNOWN else path.name,
                     "sha256": tables.file_sha256(path)},
            **KNOWN.get(path.name, {}), "num_requests": len(out),
            "has_arrival_times": "arrived_at_s" in out.columns,
            "units": ("arrived_at_s: seconds since the first request (source 'arrived_at', s); "
                      if "arrived_at_s" in out.columns else "no arrival times in the source; ") + "token counts",
            "importer": f"profiler.import_traces v{imp.IMPORTER_VERSION}"}
    fields = [pa.field(c, pa.float64() if c == "arrived_at_s" else pa.int64()) for c in out.columns]
    table = pa.Table.from_pandas(out, schema=pa.schema(fields), preserve_index=False)
    return imp.write_table_atomic(table, Path(out_dir) / f"{name}.parquet", meta)


def main(argv: Sequence[str]) -> None:
    path, opts = imp.parse_cli(argv, USAGE, {"name": None, "out_dir": "data/traces"})
    out = import_trace(path, opts["name"], Path(opts["out_dir"]))
    print(f"{out}: {pd.read_parquet(out).shape[0]} requests")


if __name__ == "__main__":
    imp.cli(main)()
