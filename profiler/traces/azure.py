"""Azure LLM inference traces (Azure/AzurePublicDataset): 2023 (Splitwise; data/
AzureLLMInferenceTrace_{code,conv}.csv) and 2024 (DynamoLLM; AzureLLMInferenceTrace_
{code,conv}_1week.csv), both CSV ``TIMESTAMP,ContextTokens,GeneratedTokens`` with an absolute
invocation time (2024 files may carry a UTC offset)."""
from __future__ import annotations

import pandas as pd

from profiler.traces.common import Trace, bad, check_counts, read_csv, relative_arrivals

REQUIRED = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
OPTIONS = {"drop_empty": False}
UPSTREAM = {"repo": "https://github.com/Azure/AzurePublicDataset",
            "licence": "CC-BY attribution licence (Azure Public Dataset terms)"}
YEARS = {2023: "Azure LLM inference trace 2023 (Splitwise, ISCA'24; AzureLLMInferenceDataset2023.md)",
         2024: "Azure LLM inference trace 2024 (DynamoLLM, arXiv:2408.00741; AzureLLMInferenceDataset2024.md)"}


def detect(path, head: str) -> bool:
    first = head.splitlines()[0] if head else ""
    return all(c in first for c in REQUIRED)


def read(path, opts: dict) -> Trace:
    where = path.name
    df = read_csv(path, REQUIRED, f"an Azure LLM trace has {', '.join(REQUIRED)}", dtype={"TIMESTAMP": str})
    row = lambda i: f"row {int(i) + 2}"   # noqa: E731
    stamps = pd.to_datetime(df["TIMESTAMP"], errors="coerce", utc=True, format="ISO8601")
    if stamps.isna().any():
        i = int(stamps.isna().to_numpy().argmax())
        raise bad(where, f"{row(i)}: TIMESTAMP {df['TIMESTAMP'].iloc[i]!r} is not a date-time")
    year = int(stamps.iloc[0].year)
    meta: dict = {"description": YEARS.get(year, f"Azure LLM inference trace ({year})"), "upstream": UPSTREAM,
                  "assumptions": ["arrivals: TIMESTAMP - first TIMESTAMP (s); a timestamp without offset is UTC"]}
    secs = (stamps - stamps.iloc[0]).dt.total_seconds()
    frame = pd.DataFrame({"t": secs, "num_prefill_tokens": df["ContextTokens"],
                          "num_decode_tokens": df["GeneratedTokens"]})
    frame = check_counts(frame, where, row, opts["drop_empty"], meta)
    arr, _ = relative_arrivals(frame["t"].to_numpy(float), where, lambda i: row(frame.index[i]), sort=False)
    frame = frame.drop(columns="t").reset_index(drop=True)
    frame.insert(0, "arrived_at_s", arr)
    return Trace(frame, meta)
