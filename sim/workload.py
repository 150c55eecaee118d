"""Request streams: arrival times and prompt/output lengths, generated lazily and seedably.

``requests(wl, seed, max_request_tokens, data_dir, block_size, counts)`` yields
``(arrived_at_s, prefill_tokens, decode_tokens)`` in arrival order, so a million-request run
never holds them all. A request longer than ``max_request_tokens`` (prompt + output) is, per
``workload.too_long``, clipped (the longer side is shortened; each keeps at least half of the
limit if it asked for that much; counted in ``counts["clipped"]``) or refused before the run
starts ("error"), as a server with that ``max_model_len`` would refuse it.

Prefix structure (``workload.prefix``, or a trace's ``prefix_hashes`` column) adds a fourth
item: the content keys of the prompt's full KV blocks (of ``block_size`` tokens) that other
requests can share, chained from the start (equal key at block i <=> equal first i+1 blocks),
never token lists. Synthetic keys are ``segment << 24 | block``: a segment is a run of tokens
shared as a whole (a system prompt, a tree node, a session's conversation), and a block's key
is that of the segment holding its last token - chained because a segment implies the ones
before it. Sessions yield their first turn with a fifth item, the ``Session``, which makes
each next turn when the engine reports the previous one complete.
"""
from __future__ import annotations

import bisect
import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np

from conf import ConfigError, warn_once
from sim.config import ARRIVALS, LENGTHS, PREFIXES, TOO_LONG

REPO = Path(__file__).resolve().parents[1]
KEY_BITS = 24            # synthetic keys: segment << KEY_BITS | block index (< 16M blocks)
MAX_SPLIT = 1 << 20      # largest trace hash block / simulator block ratio (keys stay distinct)


def resolve_data_dir(data_dir: str) -> Path:
    """``data_dir`` as given, else relative to the repository (so the CLI works from anywhere)."""
    p = Path(data_dir)
    return p if p.exists() or p.is_absolute() else REPO / data_dir


def trace_path(trace: str, data_dir: str) -> Path:
    if trace.endswith(".parquet"):
        return Path(trace)
    return resolve_data_dir(data_dir) / "traces" / f"{trace}.parquet"


def load_trace(trace: str, data_dir: str, need_arrivals: bool) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(arrived_at_s or None, prefill tokens, decode tokens) of a trace parquet."""
    return load_trace_keyed(trace, data_dir, need_arrivals)[:3]


def load_trace_keyed(trace: str, data_dir: str, need_arrivals: bool, block_size: int = 16
                     ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, list | None]:
    """``load_trace`` and the per-row block keys (None without a ``prefix_hashes`` column; see
    ``block_keys``), checked row by row."""
    import pyarrow.parquet as pq
    if not trace:
        raise ConfigError("workload.lengths=trace needs workload.trace=<name in data/traces or a .parquet path>")
    path = trace_path(trace, data_dir)
    if not path.exists():
        avail = sorted(p.stem for p in path.parent.glob("*.parquet")) if path.parent.exists() else []
        raise ConfigError(f"trace file {path} not found; available traces: {avail or 'none'}")
    try:   # ParquetFile, not read_table: that imports pyarrow.dataset (0.15 s) for nothing
        table = pq.ParquetFile(path).read()
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ConfigError(f"trace {path} is not a readable parquet file "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    cols = set(table.column_names)
    missing = {"num_prefill_tokens", "num_decode_tokens"} - cols
    if missing:
        raise ConfigError(f"trace {path} lacks columns {sorted(missing)}")
    prefill = column(table, "num_prefill_tokens", np.int64)
    decode = column(table, "num_decode_tokens", np.int64)
    arrivals = None
    if need_arrivals:
        if "arrived_at_s" not in cols:
            raise ConfigError(f"trace {path} has no arrived_at_s column; use workload.arrival=poisson")
        arrivals = column(table, "arrived_at_s", np.float64)
        if np.isnan(arrivals).any():
            raise ConfigError(f"trace {path} has no arrival times (NaN arrived_at_s); "
                              f"use workload.arrival=poisson")
    keys = None
    if "prefix_hashes" in cols:
        keys = _trace_keys(path, table, prefill, block_size)
    return arrivals, prefill, decode, keys


def _trace_keys(path: Path, table, prefill: np.ndarray, block_size: int) -> list:
    """Per-row simulator block keys from a trace's prefix_hashes (one id per full block of
    ``hash_block_tokens`` tokens, in the file's ``opcast`` metadata), checked row by row."""
    import json
    meta = json.loads((table.schema.metadata or {}).get(b"opcast", b"{}"))
    hash_block = meta.get("hash_block_tokens")
    if not isinstance(hash_block, int) or hash_block < 1:
        raise ConfigError(f"trace {path} has prefix_hashes but no hash_block_tokens (>= 1) in its "
                          f"'opcast' metadata; got {hash_block!r}")
    rows = table["prefix_hashes"].to_pylist()
    for row, (ids, tokens) in enumerate(zip(rows, prefill.tolist())):
        if tokens < 1:
            raise ConfigError(f"trace {path} row {row}: empty prompt (num_prefill_tokens={tokens})")
        if ids is None:
            raise ConfigError(f"trace {path} row {row}: prefix_hashes is missing (null)")
        if len(ids) != tokens // hash_block:
            raise ConfigError(f"trace {path} row {row}: {len(ids)} prefix_hashes for a {tokens}-token "
                              f"prompt, which has {tokens // hash_block} full {hash_block}-token blocks")
        if None in ids:
            raise ConfigError(f"trace {path} row {row}: prefix_hashes has a missing id (null) at "
                              f"block {ids.index(None)}")
    return [block_keys(ids, hash_block, block_size) for ids in rows]


def block_keys(hashes: list, hash_block_tokens: int, block_size: int) -> list:
    """Keys of the simulator's full blocks from chained ids of ``hash_block_tokens``-token
    blocks. Larger simulator blocks take the id of the last hash block inside them; smaller
    ones split a hash block (id * k + part); a simulator block inside the prompt's partial
    last hash block gets no key (its content is unknown here), so it is never shared."""
    if hash_block_tokens == block_size:
        return list(hashes)
    if block_size % hash_block_tokens == 0:
        k = block_size // hash_block_tokens
        return list(hashes[k - 1::k])
    if hash_block_tokens % block_size == 0 and hash_block_tokens // block_size <= MAX_SPLIT:
        k = hash_block_tokens // block_size
        return [h * k + j for h in hashes for j in range(k)]
    raise ConfigError(f"trace hash blocks of {hash_block_tokens} tokens and scheduler.block_size="
                      f"{block_size}: one must divide the other")


def column(table, name: str, dtype) -> np.ndarray:
    """A numeric parquet column as numpy. pyarrow's to_numpy imports pandas (0.15 s), so
    null-free chunks are read from their buffers; nulls (None) become NaN via to_numpy."""
    import pyarrow as pa
    col, want = table[name], pa.from_numpy_dtype(np.dtype(dtype))
    if col.type != want:
        col = col.cast(want)          # imports pyarrow.compute (0.05 s): only when needed
    if col.null_count:
        return col.to_numpy().astype(dtype)
    parts = [np.frombuffer(c.buffers()[1], dtype=dtype)[c.offset:c.offset + len(c)] for c in col.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def validate(wl) -> None:
    if wl.arrival not in ARRIVALS:
        raise ConfigError(f"workload.arrival={wl.arrival!r}; choose one of {list(ARRIVALS)}")
    if wl.lengths not in LENGTHS:
        raise ConfigError(f"workload.lengths={wl.lengths!r}; choose one of {list(LENGTHS)}")
    if wl.too_long not in TOO_LONG:
        raise ConfigError(f"workload.too_long={wl.too_long!r}; choose one of {list(TOO_LONG)}")
    if wl.num_requests < 1:
        raise ConfigError(f"workload.num_requests={wl.num_requests} must be >= 1")
    if wl.arrival in ("poisson", "gamma") and not wl.qps > 0:
        raise ConfigError(f"workload.qps={wl.qps} must be > 0 for {wl.arrival} arrivals")
    if wl.arrival == "gamma" and not wl.cv > 0:
        raise ConfigError(f"workload.cv={wl.cv} must be > 0")
    if wl.arrival == "trace" and wl.lengths != "trace":
        raise ConfigError("workload.arrival=trace replays a trace's rows; it needs workload.lengths=trace")
    if wl.lengths in ("uniform", "zipf") and not 2 <= wl.min_tokens <= wl.max_tokens:
        raise ConfigError(f"workload.min_tokens={wl.min_tokens}, max_tokens={wl.max_tokens}: "
                          f"need 2 <= min_tokens <= max_tokens")
    if wl.lengths == "fixed" and (wl.prefill_tokens < 1 or wl.decode_tokens < 1):
        raise ConfigError("workload.prefill_tokens and decode_tokens must be >= 1")
    if wl.prefix not in PREFIXES:
        raise ConfigError(f"workload.prefix={wl.prefix!r}; choose one of {list(PREFIXES)}")
    if wl.prefix == "none":
        return
    for name, low in (("system_prompt_tokens", 0), ("num_system_prompts", 1), ("tree_depth", 1),
                      ("tree_branching", 1), ("tree_segment_tokens", 1), ("turns", 1)):
        if getattr(wl, name) < low:
            raise ConfigError(f"workload.{name}={getattr(wl, name)} must be >= {low}")
    if wl.think_time_s < 0:
        raise ConfigError(f"workload.think_time_s={wl.think_time_s} must be >= 0")
    if wl.arrival == "trace":
        raise ConfigError(f"workload.prefix={wl.prefix} builds prompts around drawn lengths; a trace "
                          f"replay (arrival=trace) keeps its own (its prefix_hashes carry the sharing): "
                          f"use workload.prefix=none")


def _arrival_times(wl, rng: random.Random, trace_arrivals) -> Iterator[float]:
    t = 0.0
    if wl.arrival == "static":
        while True:
            yield 0.0
    elif wl.arrival == "poisson":
        while True:
            t += rng.expovariate(wl.qps)
            yield t
    elif wl.arrival == "gamma":
        shape = 1.0 / (wl.cv * wl.cv)
        scale = 1.0 / (wl.qps * shape)
        while True:
            t += rng.gammavariate(shape, scale)
            yield t
    else:  # trace: recorded times from the first row; cycles with the trace's span as offset
        base = trace_arrivals - trace_arrivals[0]
        span = float(base[-1]) + (float(np.diff(base).mean()) if len(base) > 1 else 1.0)
        offset = 0.0
        while True:
            for x in base:
                yield (offset + float(x)) * wl.trace_time_scale
            offset += span


def _lengths(wl, rng: random.Random, trace_prefill, trace_decode, in_order: bool,
             trace_keys=None) -> Iterator[tuple]:
    """(prefill, decode) per request; trace rows with block keys: (prefill, decode, keys)."""
    if wl.lengths == "fixed":
        while True:
            yield wl.prefill_tokens, wl.decode_tokens
    if wl.lengths == "trace":
        pre, dec = trace_prefill.tolist(), trace_decode.tolist()
        n = len(pre)
        i = 0
        while True:
            j = i % n if in_order else rng.randrange(n)
            i += 1
            yield (pre[j], dec[j]) if trace_keys is None else (pre[j], dec[j], trace_keys[j])
    ratio = wl.prefill_decode_ratio
    if wl.lengths == "uniform":
        draw = lambda: rng.randint(wl.min_tokens, wl.max_tokens)  # noqa: E731
    else:  # zipf over the totals min..max, rank 1 = shortest
        totals = range(wl.min_tokens, wl.max_tokens + 1)
        weights = [1.0 / (r ** wl.zipf_theta) for r in range(1, len(totals) + 1)]
        cdf, acc = [], 0.0
        for w in weights:
            acc += w
            cdf.append(acc)
        draw = lambda: wl.min_tokens + min(bisect.bisect_left(cdf, rng.random() * acc), len(cdf) - 1)  # noqa: E731
    while True:
        total = draw()
        decode = max(1, int(round(total / (1.0 + ratio))))
        yield max(1, total - decode), decode


def requests(wl, seed: int, max_request_tokens: int, data_dir: str = "data",
             block_size: int = 16, counts: dict | None = None) -> Iterator[tuple]:
    """``wl.num_requests`` (arrived_at_s, prefill_tokens, decode_tokens[, block keys[, session]]),
    arrival-ordered, as a lazy iterator (sessions: their first turns; the engine asks each
    Session for the next); config and trace errors are raised here, before anything is
    generated - except a session longer than the context, found when it is drawn.
    ``counts["clipped"]`` (when given) counts the requests clipped to ``max_request_tokens``."""
    validate(wl)
    trace_arrivals = trace_prefill = trace_decode = trace_keys = None
    if wl.lengths == "trace":
        trace_arrivals, trace_prefill, trace_decode, trace_keys = load_trace_keyed(
            wl.trace, data_dir, wl.arrival == "trace", block_size)
    if max_request_tokens < 2:
        raise ConfigError(f"max_request_tokens={max_request_tokens} must be >= 2")
    if wl.too_long == "error":
        _refuse_too_long(wl, max_request_tokens, trace_prefill, trace_decode)
    if wl.arrival == "trace" and wl.num_requests > len(trace_prefill):
        passes = -(-wl.num_requests // len(trace_prefill))
        warn_once(("cycled", wl.trace, wl.num_requests),
                  f"workload: trace {wl.trace} has {len(trace_prefill)} rows; workload.num_requests="
                  f"{wl.num_requests} replays it {passes} times, each pass shifted by the trace's span", "sim")
    arrival_rng, length_rng = random.Random(seed * 2 + 1), random.Random(seed * 2 + 2)
    prefix_rng = random.Random(f"prefix:{seed}")     # its own stream: lengths stay as without
    arrivals = _arrival_times(wl, arrival_rng, trace_arrivals)
    keyed = trace_keys if wl.prefix == "none" else None
    lengths = _lengths(wl, length_rng, trace_prefill, trace_decode, wl.arrival == "trace", keyed)
    counts = {} if counts is None else counts
    counts["clipped"] = 0
    if wl.prefix == "sessions":
        return _sessions(wl, arrivals, lengths, max_request_tokens, block_size, prefix_rng)
    if wl.prefix in ("shared", "tree"):
        prefixes = (_shared_prefixes if wl.prefix == "shared" else _tree_prefixes)(wl, prefix_rng, block_size)
        return _stream_keyed(wl.num_requests, arrivals, lengths, max_request_tokens, block_size, counts, prefixes)
    if keyed is not None:
        return _stream_keyed(wl.num_requests, arrivals, lengths, max_request_tokens, block_size, counts)
    return _stream(wl.num_requests, arrivals, lengths, max_request_tokens, counts)


def _refuse_too_long(wl, limit: int, trace_prefill, trace_decode) -> None:
    """workload.too_long=error: ConfigError when any request could exceed ``limit`` tokens."""
    fix = "lower the lengths, raise workload.max_request_tokens, or set workload.too_long=clip"
    if wl.lengths == "fixed" and wl.prefill_tokens + wl.decode_tokens > limit:
        raise ConfigError(f"workload: requests of {wl.prefill_tokens} + {wl.decode_tokens} tokens "
                          f"exceed the {limit}-token request limit; {fix}")
    if wl.lengths in ("uniform", "zipf") and wl.max_tokens > limit:
        raise ConfigError(f"workload.max_tokens={wl.max_tokens} exceeds the {limit}-token request "
                          f"limit; {fix}")
    if wl.lengths == "trace":
        over = int(((trace_prefill + trace_decode) > limit).sum())
        if over:
            raise ConfigError(f"workload: {over} of the {len(trace_prefill)} rows of trace {wl.trace} "
                              f"exceed the {limit}-token request limit; {fix}")


def _clip(prefill: int, decode: int, max_request_tokens: int, counts: dict) -> tuple[int, int]:
    prefill, decode = max(1, int(prefill)), max(1, int(decode))
    if prefill + decode > max_request_tokens:
        prefill = min(prefill, max_request_tokens - min(decode, max_request_tokens // 2))
        decode = min(decode, max_request_tokens - prefill)
        counts["clipped"] += 1
    return prefill, decode


def _stream(num_requests, arrivals, lengths, max_request_tokens, counts):
    for _ in range(num_requests):      # (_clip inlined: this is every plain request's path)
        t = next(arrivals)
        prefill, decode = next(lengths)
        prefill, decode = max(1, int(prefill)), max(1, int(decode))
        if prefill + decode > max_request_tokens:
            prefill = min(prefill, max_request_tokens - min(decode, max_request_tokens // 2))
            decode = min(decode, max_request_tokens - prefill)
            counts["clipped"] += 1
        yield t, prefill, decode


def _stream_keyed(num_requests, arrivals, lengths, max_request_tokens, block_size, counts, prefixes=None):
    """Requests with block keys: from trace rows (prefixes None) or a shared prefix each
    (prefixes yields (prefix tokens, keys); the drawn prompt length comes after it)."""
    for _ in range(num_requests):
        t = next(arrivals)
        if prefixes is None:
            prefill, decode, keys = next(lengths)
        else:
            own, decode = next(lengths)
            prefix, keys = next(prefixes)
            prefill = prefix + max(1, int(own))
        prefill, decode = _clip(prefill, decode, max_request_tokens, counts)
        if len(keys) > prefill // block_size:       # clipped into the shared part
            keys = keys[:prefill // block_size]
        yield t, prefill, decode, keys


def _segment_keys(segment: int, first_block: int, end_block: int) -> list[int]:
    base = segment << KEY_BITS
    return list(range(base + first_block, base + end_block))


def _system_prompts(wl, block_size: int) -> list[list[int]]:
    """Block keys of each system prompt (segments 1..num_system_prompts)."""
    n = wl.num_system_prompts if wl.prefix in ("shared", "sessions") else 1
    return [_segment_keys(1 + j, 0, wl.system_prompt_tokens // block_size) for j in range(n)]


def _shared_prefixes(wl, rng: random.Random, block_size: int):
    """Every request starts with one of the system prompts, drawn uniformly."""
    prompts = _system_prompts(wl, block_size)
    while True:
        yield wl.system_prompt_tokens, prompts[rng.randrange(len(prompts))] if len(prompts) > 1 else prompts[0]


def _tree_prefixes(wl, rng: random.Random, block_size: int):
    """The system prompt, then one path down a tree (a child drawn uniformly per level) of
    tree_segment_tokens per level: requests share the prefix down to where their paths part."""
    sys_tokens, depth, branching, seg = (wl.system_prompt_tokens, wl.tree_depth, wl.tree_branching,
                                         wl.tree_segment_tokens)
    total = sys_tokens + depth * seg
    first_node = [2]                     # segment id of level l's first node (1: the system prompt)
    for level in range(1, depth):
        first_node.append(first_node[-1] + branching ** level)
    paths: dict = {}
    while True:
        path = tuple(rng.randrange(branching) for _ in range(depth))
        keys = paths.get(path)
        if keys is None:
            keys = []
            for i in range(total // block_size):
                last = (i + 1) * block_size - 1          # the block's last token names its segment
                if last < sys_tokens:
                    segment = 1
                else:
                    level = (last - sys_tokens) // seg   # 0-based level below the system prompt
                    node = 0
                    for choice in path[:level + 1]:
                        node = node * branching + choice
                    segment = first_node[level] + node
                keys.append(segment << KEY_BITS | i)
            paths[path] = keys
        yield total, keys


class Session:
    """A multi-turn chat. Turn k's prompt is the system prompt, every earlier question and
    answer, and question k; its blocks are keyed by the conversation (segment ``1 +
    num_system_prompts + id``, the system prompt's own keys below it), so each turn can reuse
    the blocks of the turns before it, answers included, as vLLM caches generated tokens too.
    ``turns``: [(question tokens, answer tokens, think time after the answer s)]."""

    __slots__ = ("base", "block_size", "context", "id", "k", "sys_keys", "turns")

    def __init__(self, sid: int, sys_tokens: int, sys_keys: list, segment: int, turns: list,
                 block_size: int):
        self.id, self.sys_keys, self.base, self.turns = sid, sys_keys, segment << KEY_BITS, turns
        self.k, self.context, self.block_size = 0, sys_tokens, block_size

    def turn(self, arrival_s: float) -> tuple:
        """The request of the current turn, arriving at arrival_s."""
        question, answer, _ = self.turns[self.k]
        prompt = self.context + question
        n = (prompt + answer) // self.block_size
        m = min(n, len(self.sys_keys))
        keys = self.sys_keys[:m] + list(range(self.base + m, self.base + n))
        return arrival_s, prompt, answer, keys, self

    def next_turn(self, done_s: float) -> tuple | None:
        """The next turn once the current one completed at done_s, or None at the end."""
        question, answer, think_s = self.turns[self.k]
        self.context += question + answer
        self.k += 1
        return self.turn(done_s + think_s) if self.k < len(self.turns) else None


def _sessions(wl, arrivals, lengths, max_request_tokens: int, block_size: int, rng: random.Random):
    """First turns of ceil(num_requests / turns) sessions (the last one may be shorter); each
    session's questions and answers are drawn from the lengths when it starts."""
    prompts = _system_prompts(wl, block_size)
    left, sid = wl.num_requests, 0
    while left > 0:
        t = next(arrivals)
        turns = []
        for _ in range(min(wl.turns, left)):
            question, answer = next(lengths)
            think = rng.expovariate(1.0 / wl.think_time_s) if wl.think_time_s > 0 else 0.0
            turns.append((max(1, int(question)), max(1, int(answer)), think))
        left -= len(turns)
        sys_keys = prompts[rng.randrange(len(prompts))] if len(prompts) > 1 else prompts[0]
        total = wl.system_prompt_tokens + sum(q + a for q, a, _ in turns)
        if total > max_request_tokens:
            raise ConfigError(
                f"workload session {sid}: its {len(turns)} turns reach {total} tokens (system prompt "
                f"{wl.system_prompt_tokens} + questions + answers), {total - max_request_tokens} more "
                f"than the {max_request_tokens}-token context; lower workload.turns or the lengths")
        yield Session(sid, wl.system_prompt_tokens, sys_keys, 1 + len(prompts) + sid, turns,
                      block_size).turn(t)
        sid += 1


def mean_gap_s(wl) -> float:
    return 1.0 / wl.qps if wl.arrival in ("poisson", "gamma") else math.nan
