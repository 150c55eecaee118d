"""Convert the real-engine logs of bench/gpu_fidelity/cases.yaml into data/fidelity/gpu/.

    python bench/gpu_fidelity/convert.py [--reference /work/shared/reference/ground_truth]

Needs the reference files (not in this repository); run.py needs only what this writes:
- ``traces/<case>_<load>.parquet``: the requests, by ``profiler.import_traces`` (arrivals, token
  counts, sessions and prefix ids where the source has them; provenance in the metadata);
- ``engine/<case>_<load>.parquet``: what the engine measured per request, in the trace's order
  (ttft_s, tpot_s, e2e_s and the token counts they belong to), provenance in the metadata;
- ``index.json``: per case its loads with those files, aggregates (``vllm bench serve``
  summaries) and throughput curves inline, and each source file's path, sha256, repository,
  commit and licence.
Same reference files -> same output.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.gpu_fidelity.run import DATA, load_cases  # noqa: E402
from conf.files import atomic_write, write_text  # noqa: E402
from profiler.tables import file_sha256  # noqa: E402

DEFAULT_REFERENCE = os.environ.get("OPCAST_REFERENCE", "/work/shared/reference") + "/ground_truth"


def load_name(case: str, load: float) -> str:
    return f"{case}_{load:g}".replace(".", "_")


def provenance(path: Path, reference: Path, case) -> dict:
    return {"path": str(path.relative_to(reference)), "sha256": file_sha256(path), **case.extra["upstream"]}


def lmbench_measured(path: Path) -> pd.DataFrame:
    """Per-request engine results of an LMBench CSV, in launch order (the importer's order):
    TTFT as recorded, e2e = TTFT + generation time (first to last token), TPOT = generation
    time / (tokens - 1) as vLLM's benchmark defines it (NaN for one-token outputs)."""
    df = pd.read_csv(path)
    df = df.iloc[np.argsort(df["launch_time"].to_numpy(float), kind="stable")].reset_index(drop=True)
    gen = df["generation_tokens"].astype(np.int64)
    return pd.DataFrame({
        "num_prefill_tokens": df["prompt_tokens"].astype(np.int64), "num_decode_tokens": gen,
        "ttft_s": df["ttft"].astype(float), "e2e_s": (df["ttft"] + df["generation_time"]).astype(float),
        "tpot_s": np.where(gen > 1, df["generation_time"] / (gen - 1).clip(lower=1), np.nan)})


def write_measured(df: pd.DataFrame, out: Path, meta: dict) -> Path:
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"opcast": json.dumps(meta, sort_keys=True).encode()})
    return atomic_write(out, lambda tmp: pq.write_table(table, tmp))


def bench_aggregates(doc: dict) -> dict[str, float]:
    """The engine's summary in seconds (vLLM's *_ms keys)."""
    out = {}
    for m, key in (("ttft_s", "ttft"), ("tpot_s", "tpot")):
        for st, src in (("mean", "mean"), ("p50", "median"), ("p99", "p99")):
            if f"{src}_{key}_ms" in doc:
                out[f"{m}_{st}"] = doc[f"{src}_{key}_ms"] / 1e3
    return out


def convert_case(case, reference: Path) -> dict:
    from profiler.import_traces import import_trace
    files = sorted(Path(p) for p in glob.glob(str(reference / case.source)))
    if not files:
        raise FileNotFoundError(f"{case.name}: no files match {reference / case.source}")
    opts = dict(case.extra.get("import", {}))
    fmt = opts.pop("format")
    loads = []
    for path in files:
        prov = provenance(path, reference, case)
        if case.kind == "replay":
            load = float(re.search(case.extra["load_pattern"], path.name).group(1))
            name = load_name(case.name, load)
            trace = import_trace(path, name, DATA / "traces", fmt=fmt, licence=prov["licence"],
                                 source=prov["repo"], **opts)
            measured = lmbench_measured(path)
            got = pq.read_table(trace, columns=["num_prefill_tokens", "num_decode_tokens"]).to_pandas()
            if not (got.to_numpy() == measured[["num_prefill_tokens", "num_decode_tokens"]].to_numpy()).all():
                raise RuntimeError(f"{path}: the imported trace's order or lengths differ from the measured rows")
            write_measured(measured, DATA / "engine" / f"{name}.parquet", {"source": prov})
            loads.append({"load": load, "trace": f"traces/{name}.parquet", "engine": f"engine/{name}.parquet",
                          "source": prov})
        elif case.kind == "aggregate":
            doc = json.loads(path.read_text())
            n = int(doc["completed"])
            reps = int(re.search(case.extra["replicas_from"], str(path)).group(1))
            name = load_name(case.name, float(doc["request_rate"])) + f"_{reps}rep_{path.stem.split('_', 1)[1].replace('-', '_')}"
            # random prompts of one length (total / count): the summary has no per-request lists
            trace = import_trace(path, name, DATA / "traces", fmt=fmt, licence=prov["licence"], source=prov["repo"],
                                 input_len=doc["total_input_tokens"] // n, output_len=doc["total_output_tokens"] // n, **opts)
            loads.append({"load": float(doc["request_rate"]), "label": f"{reps} replicas, {doc['request_rate']} QPS, "
                          f"{path.name}", "replicas": reps, "num_requests": n, "trace": f"traces/{trace.name}",
                          "engine": bench_aggregates(doc), "source": prov})
        else:   # throughput: requests from the workload file, the curve from the reference TSV
            curve_path = reference / case.extra["curve"]
            curve = pd.read_csv(curve_path, sep="\t")
            trace = import_trace(path, case.name, DATA / "traces", fmt=fmt, licence=prov["licence"],
                                 source=prov["repo"], **opts)
            n = pq.read_metadata(trace).num_rows
            loads.append({"load": None, "num_requests": n, "trace": f"traces/{trace.name}",
                          "engine": {"throughput_tok_s": [float(x) for x in curve["throughput"]]},
                          "source": prov, "curve_source": provenance(curve_path, reference, case)})
    return {"loads": loads}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", default=DEFAULT_REFERENCE, help="the ground_truth folder of the reference data")
    args = ap.parse_args(argv)
    reference = Path(args.reference)
    cases, _ = load_cases()
    index = {}
    for case in cases:
        if case.blocked:
            continue
        index[case.name] = convert_case(case, reference)
        print(f"{case.name}: {len(index[case.name]['loads'])} file(s)", flush=True)
    write_text(DATA / "index.json", json.dumps(index, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
