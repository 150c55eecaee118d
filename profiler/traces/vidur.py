"""Vidur's processed traces (Splitwise conversation/code, arXiv summarization): CSV with
``num_prefill_tokens``, ``num_decode_tokens`` and, for arrival traces, ``arrived_at`` (seconds
since the first request). Derived columns (``num_total_tokens``) are checked, not copied."""
from __future__ import annotations

import numpy as np
import pandas as pd

from profiler import importing as imp
from profiler.traces.common import Trace, bad

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
OPTIONS: dict = {}


def detect(path, head: str) -> bool:
    first = head.splitlines()[0] if head else ""
    return "num_prefill_tokens" in first or "num_decode_tokens" in first


def convert_trace(df: pd.DataFrame, where: str) -> pd.DataFrame:
    imp.require_columns(df, ["num_prefill_tokens", "num_decode_tokens"], where)
    if "arrived_at_s" in df.columns or any(c.startswith("arrived_at_") for c in df.columns):
        odd = [c for c in df.columns if c.startswith("arrived_at")]
        raise bad(where, f"arrival column {odd[0]!r}; expected 'arrived_at' in seconds")
    if len(df) == 0:
        raise bad(where, "no requests")
    imp.positive_ints(df, ["num_prefill_tokens", "num_decode_tokens"], where)
    out = pd.DataFrame(index=df.index)
    if "arrived_at" in df.columns:
        t = pd.to_numeric(df["arrived_at"], errors="coerce")
        if t.isna().any() or np.isinf(t).any() or (t < 0).any():
            raise bad(where, "arrived_at must be finite seconds >= 0")
        if (t.diff().dropna() < 0).any():
            i = int(np.argmax(t.diff().to_numpy()[1:] < 0)) + 1
            raise bad(where, f"arrived_at decreases at row {i} ({t.iloc[i - 1]} -> {t.iloc[i]}); a trace must be "
                             f"in arrival order")
        out["arrived_at_s"] = t.astype("float64")
    out["num_prefill_tokens"] = df["num_prefill_tokens"].astype("int64")
    out["num_decode_tokens"] = df["num_decode_tokens"].astype("int64")
    if "num_total_tokens" in df.columns and \
            (df["num_total_tokens"] != out["num_prefill_tokens"] + out["num_decode_tokens"]).any():
        raise bad(where, "num_total_tokens != num_prefill_tokens + num_decode_tokens")
    return out.reset_index(drop=True)


def read(path, opts: dict) -> Trace:
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise bad(str(path), f"not a readable CSV ({type(exc).__name__})") from None
    out = convert_trace(df, path.name)
    known = KNOWN.get(path.name, {})
    # `licence` is the data's own; `via` is the repository (and its licence) that ships the CSV.
    meta = {"source": "vidur", "via": imp.UPSTREAM["vidur"],
            "licence": "unknown (not one of the traces Vidur ships)",
            "file_path": f"data/processed_traces/{path.name}" if known else path.name, **known}
    return Trace(out, meta)
