"""Regenerate every shipped table under data/ from the reference measurements.

    python -m profiler.import_all [reference=../shared/reference] [out=data]
    python -m profiler.import_all summary [data]     # the tables in data/README.md

Runs the Vidur and aiconfigurator importers for each hw they cover and the trace importer
for the three traces. Deterministic: the output bytes depend only on the input files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from profiler import importing as imp
from profiler.import_aiconfigurator import import_aiconfigurator
from profiler.import_traces import import_trace
from profiler.import_vidur import import_vidur

VIDUR_HW = ["h100", "a100", "a40"]
AICONFIGURATOR_HW = ["h100", "a100", "b200", "gb200", "b300", "l40s"]
TRACES = {"splitwise_conv": "splitwise_conv.csv", "splitwise_code": "splitwise_code.csv",
          "arxiv_summarization": "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"}
# ../shared/reference beside the checkout (/work/main) or beside the folder of worktrees (/work/wt/x)
_REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = next((p / "shared" / "reference" for p in _REPO.parents[:2]
                          if (p / "shared" / "reference").is_dir()), _REPO.parent / "shared" / "reference")
USAGE = "python -m profiler.import_all [reference=PATH] [out=data]"


def import_all(reference: Path, out: Path) -> None:
    from conf import ConfigError
    reference, out = Path(reference), Path(out)
    if not (reference / "vidur").is_dir() or not (reference / "aiconfigurator").is_dir():
        raise ConfigError(f"{reference}: expected vidur/ and aiconfigurator/ folders (the reference data)")
    for hw in VIDUR_HW:
        for fam, n in import_vidur(reference / "vidur", hw, out / "profiles").items():
            print(f"{out / 'profiles' / hw / fam}.parquet: {n} vidur rows")
    for hw in AICONFIGURATOR_HW:
        for fam, n in import_aiconfigurator(reference / "aiconfigurator", hw, out / "profiles").items():
            print(f"{out / 'profiles' / hw / fam}.parquet: {n} aiconfigurator rows")
    for name, csv in TRACES.items():
        path = import_trace(reference / "vidur" / "processed_traces" / csv, name, out / "traces")
        print(f"{path}")


# Shape columns whose range the data README lists, per family.
SUMMARY_COLUMNS = {
    "gemm": ["m", "n", "k"],
    "elementwise": ["num_tokens", "width"],
    "attention": ["batch_size", "max_q_len", "max_kv_len", "num_heads", "num_kv_heads", "head_dim"],
    "collective": ["size_bytes", "world_size"],
    "moe": ["num_tokens", "hidden_size", "ffn_size", "num_experts", "top_k", "tp", "ep"],
    "mla": ["batch_size", "max_q_len", "max_kv_len", "num_heads", "hidden_size", "kv_lora_rank"],
    "bmm": ["batch", "m", "n", "k"],
}

# Categorical columns besides op/dtype whose values the data README lists.
EXTRA_COLUMNS = {"attention": ["phase"], "mla": ["phase", "weight_dtype", "attn_dtype"]}


def _values(series) -> str:
    vals = sorted(set(series.astype(str)))
    return ", ".join(vals) if len(vals) <= 8 else f"{len(vals)} values"


def summary(data_dir: Path) -> str:
    """Markdown tables: per hw and family, imported rows by source/backend with the shape ranges."""
    from profiler import tables
    lines = []
    for hw in sorted(set(VIDUR_HW) | set(AICONFIGURATOR_HW)):
        hw_dir = Path(data_dir) / "profiles" / hw
        lines += [f"### {hw_dir.name}", "", "| family | source | backend | rows | ops | dtypes | models/networks "
                  "| shape ranges |", "|---|---|---|---|---|---|---|---|"]
        for fam in tables.FAMILIES:
            path = hw_dir / f"{fam}.parquet"
            if not path.exists():
                continue
            df = tables.read(path, fam)
            df = df[df["source"].isin(["vidur", "aiconfigurator"])]  # rows other tools wrote are theirs
            group = "network" if fam == "collective" else "model"
            for (src, backend), g in df.groupby(["source", "backend"], sort=True):
                extra = [f"{c} {_values(g[c])}" for c in EXTRA_COLUMNS.get(fam, [])]
                ranges = "; ".join(extra + [f"{c} {g[c].min()}-{g[c].max()}" for c in SUMMARY_COLUMNS[fam]])
                where = _values(g[group].replace("", "(generic)"))
                lines.append(f"| {fam} | {src} | {backend} | {len(g)} | {_values(g['op'])} | "
                             f"{_values(g['dtype'])} | {where} | {ranges} |")
        lines.append("")
    lines += ["### traces", "", "| file | requests | arrival times | prefill tokens | decode tokens |",
              "|---|---|---|---|---|"]
    import pandas as pd
    for path in sorted((Path(data_dir) / "traces").glob("*.parquet")):
        df = pd.read_parquet(path)
        span = (f"{df['arrived_at_s'].max():.0f} s span" if "arrived_at_s" in df else "none")
        lines.append(f"| {path.name} | {len(df)} | {span} | {df['num_prefill_tokens'].min()}-"
                     f"{df['num_prefill_tokens'].max()} | {df['num_decode_tokens'].min()}-"
                     f"{df['num_decode_tokens'].max()} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
    if list(argv[:1]) == ["summary"]:
        print(summary(Path(argv[1] if len(argv) > 1 else "data")), end="")
        return
    opts = {"reference": str(DEFAULT_REFERENCE), "out": "data"}
    for a in argv:
        k, _, v = a.partition("=")
        if k not in opts or not v:
            from conf import ConfigError
            raise ConfigError(f"unknown argument {a!r}; usage: {USAGE}")
        opts[k] = v
    import_all(Path(opts["reference"]), Path(opts["out"]))


if __name__ == "__main__":
    imp.cli(main)()
