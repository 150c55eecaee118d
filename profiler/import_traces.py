"""Import a request trace into opcast's trace parquet (data/traces/<name>.parquet).

    python -m profiler.import_traces PATH name=NAME [format=auto] [out_dir=data/traces]
        [licence=TEXT] [source=TEXT] [format options, e.g. hash_block_tokens=16 drop_empty=true]

Formats (``format=`` or detected from the file; profiler/traces/<format>.py says what each
reads and assumes): vllm_bench (`vllm bench serve` result JSON: options seed=0,
arrivals=auto|recorded|normalised|legacy, input_len=, output_len=), llmservingsim (JSONL with
token ids), mooncake (JSONL, hash_ids per 512 tokens), timed_trace (vLLM's JSONL), sharegpt
(turns=first|all), lmbench (CSV; shared_prefix_tokens=), burstgpt (CSV; model=), azure (2023 and
2024 CSV), vidur (processed CSV).

Output columns (the contract in COORDINATION.md): ``arrived_at_s`` float64 seconds since the
first request (only when the source has times), ``num_prefill_tokens`` / ``num_decode_tokens``
int64 >= 1, and where the source has them ``session_id`` int64 / ``turn`` int32 and
``prefix_hashes`` list<int64> (chained ids of full blocks; block size in the metadata as
``hash_block_tokens``). Provenance (format, file sha256, upstream, licence, every assumption) is
in the parquet metadata under ``opcast``. Same input and options -> byte-identical output.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

import conf
from profiler import importing as imp, tables
from profiler.traces import FORMATS, Trace

USAGE = ("python -m profiler.import_traces PATH name=NAME [format=auto|" + "|".join(FORMATS)
         + "] [out_dir=data/traces] [licence=...] [source=...] [format options]")
COMMON = {"name": None, "out_dir": "data/traces", "format": "auto", "licence": "", "source": ""}
TYPES = {"arrived_at_s": pa.float64(), "num_prefill_tokens": pa.int64(), "num_decode_tokens": pa.int64(),
         "session_id": pa.int64(), "turn": pa.int32(), "prefix_hashes": pa.list_(pa.int64())}


def detect(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8192).decode("utf-8", errors="replace")
    for name, fmt in FORMATS.items():
        if fmt.detect(path, head):
            return name
    raise conf.ConfigError(f"{path}: format not recognised from its first bytes; give format=one of {list(FORMATS)}")


def _coerce(key: str, value, default):
    """A CLI string as the type of the option's default."""
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false"):
            raise conf.ConfigError(f"{key}={value!r}: expected true or false")
        return value.lower() == "true"
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise conf.ConfigError(f"{key}={value!r}: expected a whole number") from None
    return value


def read_trace(path: Path, fmt: str = "auto", **options) -> tuple[str, Trace]:
    """(format name, Trace) of one source file; options are the format's ``key=value`` options."""
    path = Path(path)
    if not path.is_file():
        raise conf.ConfigError(f"{path}: not a file; give one trace file")
    fmt = detect(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise conf.ConfigError(f"format={fmt!r}; choose one of {['auto', *FORMATS]}")
    spec = FORMATS[fmt]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise conf.ConfigError(f"unknown option(s) {unknown} for format={fmt}; it takes "
                               f"{sorted(spec.options) or 'no options'}")
    opts = {k: _coerce(k, options.get(k, d), d) for k, d in spec.options.items()}
    trace = spec.read(path, opts)
    _check_contract(trace, path.name)
    trace.meta["options"] = {k: v for k, v in opts.items() if v != spec.options[k]}
    return fmt, trace


def _check_contract(trace: Trace, where: str) -> None:
    """What every reader promises (a reader bug, not bad input, if it fails)."""
    f = trace.frame
    assert list(f.columns) == [c for c in TYPES if c in f.columns], f"{where}: column order {list(f.columns)}"
    if not len(f):
        raise imp.SourceFormatError(f"{where}: no requests left")
    assert (f.num_prefill_tokens >= 1).all() and (f.num_decode_tokens >= 1).all()
    if "arrived_at_s" in f:
        assert (np.diff(f.arrived_at_s.to_numpy()) >= 0).all() and f.arrived_at_s.iloc[0] == 0.0
    if "prefix_hashes" in f:
        assert trace.hash_block_tokens > 0
        assert (f.prefix_hashes.map(len) == f.num_prefill_tokens // trace.hash_block_tokens).all()


def import_trace(path: Path, name: str, out_dir: Path, fmt: str = "auto", licence: str = "",
                 source: str = "", **options) -> Path:
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise conf.ConfigError(f"name={name!r}: use lower-case letters, digits and '_' (it names the file)")
    path = Path(path)
    fmt, trace = read_trace(path, fmt, **options)
    out = trace.frame
    meta = dict(trace.meta)
    file_path = meta.pop("file_path", path.name)
    has_t = "arrived_at_s" in out.columns
    meta = {"kind": "request_trace", "name": name, "format": fmt,
            "file": {"path": file_path, "sha256": tables.file_sha256(path)}, **meta,
            "num_requests": len(out), "has_arrival_times": has_t,
            "units": ("arrived_at_s: seconds since the first request; " if has_t else
                      "no arrival times in the source; ") + "token counts",
            "importer": f"profiler.import_traces v{imp.IMPORTER_VERSION}"}
    if trace.hash_block_tokens:
        meta["hash_block_tokens"] = trace.hash_block_tokens
    if licence:
        meta["licence"] = licence
    if source:
        meta["source_given"] = source
    meta.setdefault("licence", (meta.get("upstream") or {}).get("licence", "unknown (give licence=...)"))
    schema = pa.schema([pa.field(c, TYPES[c]) for c in out.columns])
    table = pa.Table.from_pandas(out, schema=schema, preserve_index=False)
    return imp.write_table_atomic(table, Path(out_dir) / f"{name}.parquet", meta)


def main(argv: Sequence[str]) -> None:
    paths = [a for a in argv if "=" not in a]
    if len(paths) != 1:
        raise conf.ConfigError(f"expected exactly one input PATH; usage: {USAGE}")
    opts = {}
    for a in argv:
        if "=" in a:
            k, v = a.split("=", 1)
            opts[k.lstrip("-+")] = v
    common = {k: opts.pop(k, d) for k, d in COMMON.items()}
    if common["name"] is None:
        raise conf.ConfigError(f"missing name=...; usage: {USAGE}")
    path = Path(paths[0])
    if not path.exists():
        raise conf.ConfigError(f"input path {path} does not exist")
    out = import_trace(path, common["name"], Path(common["out_dir"]), common["format"], common["licence"],
                       common["source"], **opts)
    meta = tables.provenance(out)
    extra = f", prefix ids per {meta['hash_block_tokens']} tokens" if "hash_block_tokens" in meta else ""
    print(f"{out}: {meta['num_requests']} requests ({meta['format']}"
          f"{', arrival times' if meta['has_arrival_times'] else ', no arrival times'}{extra})")


if __name__ == "__main__":
    imp.cli(main)()
