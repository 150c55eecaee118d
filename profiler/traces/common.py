"""What every trace reader returns, and the checks and hashes they share.

A reader turns one source file into a ``Trace``: a DataFrame in the trace-parquet contract
(COORDINATION.md) - ``arrived_at_s`` float64 seconds since the first request (omitted when the
source has no times), ``num_prefill_tokens`` / ``num_decode_tokens`` int64 >= 1, optional
``session_id`` int64 (-1 = none) / ``turn`` int32 (0 = a session's first request), optional
``prefix_hashes`` list<int64> (one id per FULL block of ``hash_block_tokens`` prompt tokens,
chained: equal id at index i <=> identical first i + 1 blocks) - plus the provenance that the
source alone can tell (what it is, its upstream and licence, every assumption the reader made).
Measured latencies never enter a trace: they are the engine's answer, not the workload.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

from profiler.importing import SourceFormatError

COLUMNS = ("arrived_at_s", "num_prefill_tokens", "num_decode_tokens", "session_id", "turn", "prefix_hashes")


@dataclass
class Trace:
    frame: pd.DataFrame                      # contract columns, arrival order
    meta: dict = field(default_factory=dict)  # description, upstream, licence, assumptions, ...
    hash_block_tokens: int = 0               # > 0 when the frame has prefix_hashes


def bad(where: str, msg: str) -> SourceFormatError:
    return SourceFormatError(f"{where}: {msg}")


def read_csv(path, required, expected: str, **kw) -> pd.DataFrame:
    """A source CSV with its required columns, or one line naming what is missing."""
    try:
        df = pd.read_csv(path, **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise bad(path.name, f"not a readable CSV ({type(exc).__name__})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise bad(path.name, f"missing column(s) {', '.join(missing)}; {expected}")
    if not len(df):
        raise bad(path.name, "no requests")
    return df


def chain_hashes(keys: Iterable[bytes], parent: bytes = b"") -> list[int]:
    """One signed 64-bit id per key, each hashing its parent's digest with its own key, so an id
    names the whole prefix up to its block (vLLM's block-hash chaining; blake2b, stable across
    runs and machines, unlike Python's salted hash())."""
    out = []
    for k in keys:
        parent = hashlib.blake2b(parent + k, digest_size=8).digest()
        out.append(int.from_bytes(parent, "little", signed=True))
    return out


def token_block_hashes(token_ids, block_tokens: int) -> list[int]:
    """Chained ids of the full ``block_tokens``-token blocks of a prompt, from its token ids."""
    ids = np.asarray(token_ids, dtype="<i8")
    n = len(ids) // block_tokens
    return chain_hashes(ids[i * block_tokens:(i + 1) * block_tokens].tobytes() for i in range(n))


def stream_block_hashes(stream_key: str, num_blocks: int, shared: list[int] | None = None) -> list[int]:
    """Chained ids of the first ``num_blocks`` blocks of a token stream known only by name (a
    conversation whose turns each resend the previous ones): block i of stream s is the same
    content in every request of s. ``shared`` ids, when given, are the stream's common start
    (a system prompt every stream begins with); the stream's own blocks chain on from them."""
    shared = shared or []
    own = num_blocks - min(num_blocks, len(shared))
    parent = int(shared[-1]).to_bytes(8, "little", signed=True) if shared else b""
    tail = chain_hashes((f"{stream_key}/{i}".encode() for i in range(own)), parent)
    return shared[:num_blocks] + tail


def ordered_ints(values: pd.Series) -> np.ndarray:
    """Dense ids 0, 1, ... in order of first appearance (session keys of any type)."""
    codes, _ = pd.factorize(values, sort=False)
    return codes.astype(np.int64)


def check_counts(frame: pd.DataFrame, where: str, row_label, drop_empty: bool, meta: dict,
                 why_zero: str = "") -> pd.DataFrame:
    """Token counts must be whole numbers >= 0; rows with a 0 prompt or 0 output are an error
    naming the row, or dropped and counted in ``meta['dropped_rows']`` with drop_empty=true."""
    for col in ("num_prefill_tokens", "num_decode_tokens"):
        v = pd.to_numeric(frame[col], errors="coerce")
        wrong = v.isna() | (v < 0) | (v != np.floor(v))
        if wrong.any():
            i = int(np.argmax(wrong.to_numpy()))
            raise bad(where, f"{row_label(i)}: {col} must be a whole number >= 0, found {frame[col].iloc[i]!r}")
        frame[col] = v.astype(np.int64)
    zero = (frame["num_prefill_tokens"] == 0) | (frame["num_decode_tokens"] == 0)
    if zero.any() and not drop_empty:
        i = int(np.argmax(zero.to_numpy()))
        what = "empty prompt (0 tokens)" if frame["num_prefill_tokens"].iloc[i] == 0 else "0 output tokens"
        raise bad(where, f"{row_label(i)}: {what}{why_zero}; pass drop_empty=true to drop such rows")
    if zero.any():
        meta["dropped_rows"] = {"zero_prompt_tokens": int((frame["num_prefill_tokens"] == 0).sum()),
                                "zero_output_tokens": int((frame["num_decode_tokens"] == 0).sum()),
                                "rule": "drop_empty=true: rows with 0 prompt or 0 output tokens dropped"}
        frame = frame[~zero]
    return frame


def relative_arrivals(t: np.ndarray, where: str, row_label, sort: bool) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since the first request, row order). Unsorted times are an error naming the row,
    unless ``sort`` (a source written in another order, e.g. by user): then a stable sort."""
    t = np.asarray(t, dtype=np.float64)
    if np.isnan(t).any() or np.isinf(t).any():
        i = int(np.argmax(~np.isfinite(t)))
        raise bad(where, f"{row_label(i)}: arrival time is not a finite number")
    order = np.argsort(t, kind="stable") if sort else np.arange(len(t))
    if not sort and len(t) > 1 and (np.diff(t) < 0).any():
        i = int(np.argmax(np.diff(t) < 0)) + 1
        raise bad(where, f"{row_label(i)}: arrival time decreases ({t[i - 1]} -> {t[i]}); a trace must be "
                         f"in arrival order")
    t = t[order]
    return (t - t[0] if len(t) else t), order
