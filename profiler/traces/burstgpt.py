"""BurstGPT (HPMLL/BurstGPT, Azure OpenAI GPT-3.5/GPT-4 traffic): CSV with ``Timestamp``
(s from 0:00 of the first day), ``Model``, ``Request tokens``, ``Response tokens``,
``Total tokens``, ``Log Type`` and, in the v2 release files, ``Session ID`` and ``Elapsed time``
(the source's own latency: not copied). BurstGPT logs failed requests with 0 response tokens;
they are an error naming the row unless drop_empty=true drops (and counts) them."""
from __future__ import annotations

import numpy as np
import pandas as pd

from profiler.traces.common import Trace, bad, check_counts, ordered_ints, read_csv, relative_arrivals

REQUIRED = ("Timestamp", "Request tokens", "Response tokens")
OPTIONS = {"drop_empty": False, "model": ""}
UPSTREAM = {"repo": "https://github.com/HPMLL/BurstGPT",
            "licence": "not stated in HPMLL/BurstGPT's README (released 'for the research and academic "
                       "community'); cite Wang et al., BurstGPT, arXiv:2401.17644"}


def detect(path, head: str) -> bool:
    first = head.splitlines()[0] if head else ""
    return "Request tokens" in first and "Response tokens" in first


def read(path, opts: dict) -> Trace:
    where = path.name
    df = read_csv(path, REQUIRED, "a BurstGPT CSV has Timestamp, Model, Request tokens, Response tokens, Total "
                  "tokens, Log Type [, Session ID, Elapsed time]", dtype={"Session ID": str})
    meta: dict = {"description": "BurstGPT: Azure OpenAI GPT-3.5/GPT-4 request arrivals and token counts",
                  "upstream": UPSTREAM, "assumptions": ["arrivals: Timestamp - first Timestamp (s)"]}
    if opts["model"]:
        if "Model" not in df.columns:
            raise bad(where, "model=... filters on the Model column, which this file lacks")
        df = df[df["Model"] == opts["model"]].reset_index(drop=True)
        meta["filter"] = f"Model == {opts['model']!r}"
        if not len(df):
            raise bad(where, f"no rows with Model == {opts['model']!r}")
    row = lambda i: f"row {int(i) + 2}"   # noqa: E731
    frame = pd.DataFrame({"t": pd.to_numeric(df["Timestamp"], errors="coerce"),
                          "num_prefill_tokens": df["Request tokens"], "num_decode_tokens": df["Response tokens"]})
    if "Session ID" in df.columns:
        sid = df["Session ID"].fillna("")
        frame["session_id"] = np.where(sid != "", ordered_ints(sid.where(sid != "")), -1).astype(np.int64)
    frame = check_counts(frame, where, row, opts["drop_empty"], meta,
                         " (BurstGPT logs failed requests with 0 response tokens)")
    arr, _ = relative_arrivals(frame["t"].to_numpy(float), where, lambda i: row(frame.index[i]), sort=False)
    frame = frame.drop(columns="t").reset_index(drop=True)
    frame.insert(0, "arrived_at_s", arr)
    if "session_id" in frame.columns:
        turn = frame.groupby("session_id").cumcount().astype(np.int32)
        frame["turn"] = np.where(frame.session_id >= 0, turn, 0).astype(np.int32)
        meta["assumptions"].append("sessions: Session ID (empty = none), turn = order of arrival within it; "
                                   "no prefix ids (the trace has no content)")
        meta["sessions"] = int((frame.session_id.unique() >= 0).sum())
    if "Elapsed time" in df.columns:
        meta["measured_columns_not_copied"] = ["Elapsed time"]
    return Trace(frame, meta)
