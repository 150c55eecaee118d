"""Import Vidur's profiling CSVs (per-operator ``mlp.csv`` and NCCL ``all_reduce``/``send_recv``).

    python -m profiler.import_vidur PATH hw=a100 [out_dir=data/profiles] [model=llama2-7b]

PATH is a Vidur ``profiling`` tree (or a folder above it), one ``mlp.csv`` or one network CSV.
From a tree, hw=<sku> takes ``compute/<sku>/<org>/<model>/mlp.csv`` and ``network/<sku>_*/``.
Vidur times are milliseconds (``time_stats.<op>.{min,max,mean,median,std}``); rows come out in µs
as gemm, elementwise and collective rows with ``source = "vidur"``.

Shapes, from Vidur's own profiling code (vidur/profiling/mlp/mlp_impl.py at the commit above): one
GPU of a ``num_tensor_parallel_workers``-way Megatron shard, head_dim = n_embd / n_head, fp16,
rotary over the whole head_dim, no KV-head replication (Vidur asserts n_kv_head % tp == 0).
Network ``size`` is bytes: Vidur's collectives_wrapper logs ``size * 2`` of an fp16 buffer.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import pandas as pd

import conf
from profiler import importing as imp, tables

TOOL = "vidur"
STATS = {"median": "time_us_median", "mean": "time_us_mean", "min": "time_us_min", "std": "time_us_std"}
SHAPE_COLUMNS = ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "use_gated_mlp", "num_tokens",
                 "num_tensor_parallel_workers"]
NETWORK_COLUMNS = ["num_workers", "size", "devices_per_node"]
ELEMENTWISE_OPS = ["emb", "input_layernorm", "post_attention_layernorm", "mlp_act", "attn_rope", "add"]
COMMON = {"dtype": "float16", "backend": "torch", "timer": "record_function", "l2_policy": "hot",
          "cuda_graph": False}
USAGE = "python -m profiler.import_vidur PATH hw=<h100|a100|a40> [out_dir=data/profiles] [model=NAME]"


@functools.lru_cache(maxsize=1)
def model_cards() -> dict[str, conf.ModelConf]:
    """opcast model cards by Hugging Face id (Vidur names its folders by that id)."""
    from omegaconf import OmegaConf
    out = {}
    for name in conf.choices("model"):
        node = OmegaConf.load(conf.CONF_DIR / "model" / f"{name}.yaml")
        node.pop("defaults", None)
        card = conf.to_model(node)
        out[card.hf_id] = card
    return out


def resolve_model(csv: Path, override: str | None) -> conf.ModelConf:
    cards = model_cards()
    if override:
        by_name = {c.name: c for c in cards.values()}
        if override not in by_name:
            raise conf.ConfigError(f"unknown model {override!r}; choose one of: {', '.join(sorted(by_name))}")
        return by_name[override]
    hf_id = f"{csv.parent.parent.name}/{csv.parent.name}"
    if hf_id not in cards:
        raise conf.ConfigError(f"{csv}: Vidur model {hf_id!r} has no opcast model card (conf/model/*.yaml "
                               f"hf_id); pass model=<name> to say which card it is")
    return cards[hf_id]


def _stats(df: pd.DataFrame, op: str, where: str) -> pd.DataFrame:
    cols = [f"time_stats.{op}.{s}" for s in ("min", "max", "mean", "median", "std")]
    imp.require_columns(df, cols, where)
    out = pd.DataFrame(index=df.index)
    for s, col in STATS.items():
        imp.check_ms(df[f"time_stats.{op}.{s}"], f"{where} time_stats.{op}.{s}")
        out[col] = imp.ms_to_us(df[f"time_stats.{op}.{s}"])
    return out


def convert_mlp(df: pd.DataFrame, model: conf.ModelConf, where: str) -> dict[str, pd.DataFrame]:
    """One Vidur mlp.csv frame -> {"gemm": rows, "elementwise": rows} (µs, per-GPU shard shapes)."""
    imp.require_columns(df, SHAPE_COLUMNS, where)
    imp.positive_ints(df, [c for c in SHAPE_COLUMNS if c != "use_gated_mlp"], where)
    tp = df["num_tensor_parallel_workers"].astype("int64")
    heads, kv_heads, h, ffn = (df[c].astype("int64") for c in ("n_head", "n_kv_head", "n_embd",
                                                                 "n_expanded_embd"))
    if ((h % heads) != 0).any() or ((heads % tp) != 0).any() or ((kv_heads % tp) != 0).any() \
            or ((ffn % tp) != 0).any():
        raise imp.SourceFormatError(f"{where}: n_embd/n_head/n_kv_head/n_expanded_embd do not divide by "
                                    f"num_tensor_parallel_workers as Vidur's sharding requires")
    gated = df["use_gated_mlp"].astype(str).str.lower().map({"true": True, "false": False, "1": True,
                                                             "0": False})
    if gated.isna().any():
        raise imp.SourceFormatError(f"{where}: use_gated_mlp must be True/False")
    card = {"n_head": model.num_heads, "n_kv_head": model.num_kv_heads, "n_embd": model.hidden_size,
            "n_expanded_embd": model.ffn_size, "use_gated_mlp": model.gated_mlp}
    for col, want in card.items():
        got = gated if col == "use_gated_mlp" else df[col]
        if (got != want).any():
            raise imp.SourceFormatError(f"{where}: {col}={got[got != want].iloc[0]} but model card "
                                        f"{model.name} has {want}; pass the matching model=<name>")
    d = h // heads
    nq, nkv = heads // tp, kv_heads // tp
    base = pd.DataFrame({"model": model.name, "tp": tp, "m": df["num_tokens"].astype("int64")})
    gemm_shapes = {
        "attn_pre_proj": ("qkv_proj", (nq + 2 * nkv) * d, h),
        "attn_post_proj": ("o_proj", h, nq * d),
        "mlp_up_proj": (gated.map({True: "gate_up_proj", False: "up_proj"}),
                        (ffn // tp) * gated.map({True: 2, False: 1}).astype("int64"), h),
        "mlp_down_proj": ("down_proj", h, ffn // tp),
    }
    gemms = []
    for vop, (op, n, k) in gemm_shapes.items():
        rows = base.assign(op=op, n=n, k=k).join(_stats(df, vop, where))
        gemms.append(rows)
    width = {"emb": h, "input_layernorm": h, "post_attention_layernorm": h, "add": h,
             "mlp_act": ffn // tp, "attn_rope": (nq + nkv) * d}
    ops = {"emb": "embedding", "input_layernorm": model.norm, "post_attention_layernorm": model.norm,
           "add": "add", "mlp_act": gated.map({True: "silu_mul", False: model.activation}),
           "attn_rope": "rope"}
    elementwise = []
    for vop in ELEMENTWISE_OPS:
        if vop == "post_attention_layernorm" and model.parallel_block:
            continue  # parallel-block models (phi-2) have a single norm per layer
        rows = pd.DataFrame({"model": model.name, "tp": tp, "num_tokens": df["num_tokens"].astype("int64"),
                             "op": ops[vop], "width": width[vop], "num_heads": 0, "num_kv_heads": 0,
                             "head_dim": 0})
        if vop == "attn_rope":
            rows = rows.assign(num_heads=nq, num_kv_heads=nkv, head_dim=d)
        elementwise.append(rows.join(_stats(df, vop, where)))
    out = {"gemm": pd.concat(gemms, ignore_index=True), "elementwise": pd.concat(elementwise, ignore_index=True)}
    # Skip, never invent: a row whose median is missing in the source is not a measurement.
    return {fam: rows[rows["time_us_median"].notna()].reset_index(drop=True) for fam, rows in out.items()}


def convert_network(df: pd.DataFrame, network: str, collective: str, where: str) -> pd.DataFrame:
    imp.require_columns(df, NETWORK_COLUMNS, where)
    imp.positive_ints(df, NETWORK_COLUMNS, where)
    rows = pd.DataFrame({"op": collective, "network": network, "size_bytes": df["size"].astype("int64"),
                         "world_size": df["num_workers"].astype("int64"),
                         "devices_per_node": df["devices_per_node"].astype("int64")})
    rows = rows.join(_stats(df, collective, where))
    return rows[rows["time_us_median"].notna()].reset_index(drop=True)


def find_inputs(path: Path, hw: str) -> tuple[Path, list[Path], list[Path]]:
    """(base for relative names, mlp.csv files, network CSVs) for this hw under PATH (or PATH itself)."""
    if path.is_file():
        # relative names keep the folders that carry meaning: <org>/<model>/ and <network>/
        if path.name == "mlp.csv":
            return path.resolve().parents[2], [path], []
        if path.stem in ("all_reduce", "send_recv"):
            return path.resolve().parents[1], [], [path]
        raise conf.ConfigError(f"{path}: not a Vidur mlp.csv, all_reduce.csv or send_recv.csv")
    roots = [p for p in [path, path / "profiling", *path.glob("**/profiling")] if (p / "compute").is_dir()
             or (p / "network").is_dir()]
    if not roots:
        raise conf.ConfigError(f"{path}: no Vidur profiling/compute or profiling/network folder inside")
    root = roots[0]
    mlps = sorted((root / "compute" / hw).glob("*/*/mlp.csv"))
    nets = sorted(p for d in sorted((root / "network").glob(f"{hw}_*")) for p in d.glob("*.csv")
                  if p.stem in ("all_reduce", "send_recv"))
    if not mlps and not nets:
        raise conf.ConfigError(f"{root}: no Vidur data for hw={hw} (looked for compute/{hw}/*/*/mlp.csv "
                               f"and network/{hw}_*/)")
    return root.parent, mlps, nets


def read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise imp.SourceFormatError(f"{path}: not a readable CSV ({type(exc).__name__})") from None


def import_vidur(path: Path, hw: str, out_dir: Path, model: str | None = None) -> dict[str, int]:
    """Convert and merge; returns rows written per family."""
    if hw not in conf.choices("hw") or hw == "cpu":
        raise conf.ConfigError(f"unknown hw {hw!r}; choose one of: "
                               f"{', '.join(h for h in conf.choices('hw') if h != 'cpu')}")
    path = Path(path)
    base, mlps, nets = find_inputs(path, hw)
    rows: dict[str, list[pd.DataFrame]] = {"gemm": [], "elementwise": [], "collective": []}
    files = []
    for csv in mlps:
        where = imp.rel(csv, base)
        card = resolve_model(csv, model)
        for fam, fr in convert_mlp(read_csv(csv), card, where).items():
            rows[fam].append(fr)
        files.append({"path": where, "sha256": tables.file_sha256(csv), "model": card.name})
    for csv in nets:
        where = imp.rel(csv, base)
        network = csv.parent.name
        fr = convert_network(read_csv(csv), network, csv.stem, where)
        rows["collective"].append(fr.assign(timer="kineto"))
        files.append({"path": where, "sha256": tables.file_sha256(csv), "network": network})
    meta = {**imp.UPSTREAM[TOOL], "importer": f"profiler.import_vidur v{imp.IMPORTER_VERSION}",
            "files_relative_to": "the folder holding profiling/ (upstream: vidur's data/)",
            "units": "source ms x 1000 -> time_us_*; Vidur network size is bytes",
            "stats": "min/mean/median/std from the source; p10/p90 not in the source (NaN); "
                     "repeats unknown (0)"}
    written = {}
    for fam, frames in rows.items():
        if not frames:
            continue
        df = pd.concat(frames, ignore_index=True)
        timer = df.pop("timer") if "timer" in df else COMMON["timer"]
        df = imp.fill_common(df, fam, hw=hw, **{**COMMON, "timer": timer})
        kind = "network" if fam == "collective" else "model"
        fam_meta = {**meta, "files": [f for f in files if kind in f]}
        written[fam] = imp.merge_write(Path(out_dir) / hw / f"{fam}.parquet", fam, TOOL, hw, df, fam_meta,
                                       scope=kind)
    return written


def main(argv: Sequence[str]) -> None:
    path, opts = imp.parse_cli(argv, USAGE, {"hw": None, "out_dir": "data/profiles", "model": ""})
    written = import_vidur(path, opts["hw"], Path(opts["out_dir"]), opts["model"] or None)
    for fam, n in written.items():
        print(f"{Path(opts['out_dir']) / opts['hw'] / (fam + '.parquet')}: {n} vidur rows")


if __name__ == "__main__":
    imp.cli(main)()
