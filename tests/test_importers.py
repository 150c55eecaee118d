"""Importers of Vidur / aiconfigurator / traces: conversions, merging, determinism, bad input.

Fixtures are real slices of the reference data (tests/fixtures/importers/README.md); malformed
inputs are made inside the tests from them.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conf import ConfigError, shapes
from profiler import tables
from profiler.import_aiconfigurator import import_aiconfigurator
from profiler.import_all import import_all, summary
from profiler.import_traces import import_trace
from profiler.import_vidur import import_vidur, model_cards
from profiler.importing import SourceFormatError

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "importers"
VIDUR, AIC, TRACES = FIX / "vidur", FIX / "aiconfigurator", FIX / "traces"
MLP_70B = VIDUR / "profiling/compute/a100/meta-llama/Llama-2-70b-hf/mlp.csv"
REFERENCE = REPO.parent / "shared" / "reference"


def cards():
    return {c.name: c for c in model_cards().values()}


def files_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.parquet"))}


# ---------------------------------------------------------------- Vidur

def test_vidur_gemm_shapes_follow_conf_shapes_and_ms_become_us(tmp_path):
    import_vidur(VIDUR, "a100", tmp_path)
    g = tables.read(tmp_path / "a100" / "gemm.parquet")
    src = pd.read_csv(MLP_70B)
    for tp in (1, 8):
        got = g[(g.model == "llama2-70b") & (g.tp == tp)]
        expect = {(x.op, x.n, x.k) for x in shapes.layer_gemms(cards()["llama2-70b"], tp)}
        assert set(map(tuple, got[["op", "n", "k"]].drop_duplicates().values.tolist())) == expect
    row = src[(src.num_tokens == 64) & (src.num_tensor_parallel_workers == 8)].iloc[0]
    qkv = g[(g.model == "llama2-70b") & (g.tp == 8) & (g.m == 64) & (g.op == "qkv_proj")].iloc[0]
    assert qkv.n == (64 + 2 * 8) * 128 // 8 and qkv.k == 8192
    assert qkv.time_us_median == pytest.approx(row["time_stats.attn_pre_proj.median"] * 1000)
    assert qkv.time_us_min == pytest.approx(row["time_stats.attn_pre_proj.min"] * 1000)
    assert np.isnan(qkv.time_us_p10) and qkv["source"] == "vidur" and qkv["dtype"] == "float16"
    # phi-2 is not gated: up_proj with n = ffn
    phi = g[g.model == "phi-2"]
    assert set(phi.op) == {"qkv_proj", "o_proj", "up_proj", "down_proj"}
    assert phi[phi.op == "up_proj"].n.unique().tolist() == [10240]


def test_vidur_elementwise_ops_and_widths(tmp_path):
    import_vidur(VIDUR, "a100", tmp_path)
    e = tables.read(tmp_path / "a100" / "elementwise.parquet")
    l70 = e[(e.model == "llama2-70b") & (e.tp == 8) & (e.num_tokens == 64)]
    widths = dict(l70.groupby("op").width.first())
    assert widths == {"add": 8192, "embedding": 8192, "rmsnorm": 8192, "silu_mul": 28672 // 8,
                      "rope": (8 + 1) * 128}
    assert (l70.op == "rmsnorm").sum() == 2            # input and post-attention norm, both measured
    rope = l70[l70.op == "rope"].iloc[0]
    assert (rope.num_heads, rope.num_kv_heads, rope.head_dim) == (8, 1, 128)
    phi = e[e.model == "phi-2"]
    assert {"layernorm", "gelu"} <= set(phi.op) and "rmsnorm" not in set(phi.op)
    assert (phi[(phi.num_tokens == 1)].op == "layernorm").sum() == 1   # parallel block: one norm


def test_vidur_network_rows(tmp_path):
    import_vidur(VIDUR, "a100", tmp_path)
    c = tables.read(tmp_path / "a100" / "collective.parquet")
    src = pd.read_csv(VIDUR / "profiling/network/a100_dgx/all_reduce.csv")
    ar = c[c.op == "all_reduce"]
    assert len(ar) == len(src) and set(c.network) == {"a100_dgx"} and set(c.op) == {"all_reduce", "send_recv"}
    assert sorted(ar.size_bytes) == sorted(src["size"])          # Vidur's size is already bytes
    first = src.iloc[0]
    hit = ar[(ar.size_bytes == first["size"]) & (ar.world_size == first["num_workers"])
             & (ar.devices_per_node == first["devices_per_node"])]
    assert hit.time_us_median.iloc[0] == pytest.approx(first["time_stats.all_reduce.median"] * 1000)
    assert set(c.timer) == {"kineto"}


# ---------------------------------------------------------------- aiconfigurator

def test_aiconfigurator_attention_semantics(tmp_path):
    import_aiconfigurator(AIC, "a100", tmp_path)
    a = tables.read(tmp_path / "a100" / "attention.parquet")
    gen = pd.read_parquet(AIC / "a100_sxm/attention/vllm/0.14.0/generation_attention_perf.parquet")
    ctx = pd.read_parquet(AIC / "a100_sxm/attention/vllm/0.14.0/context_attention_perf.parquet")
    dec, pre = a[a.phase == "decode"], a[a.phase == "prefill"]
    assert len(dec) == len(gen) and len(pre) == len(ctx)
    r = gen.iloc[0]
    # decode: the kernel saw seq_len = step KV tokens (new token included), one query per sequence
    hit = dec[(dec.batch_size == r.batch_size) & (dec.max_kv_len == r.step)
              & (dec.num_heads == r.num_heads) & (dec.num_kv_heads == r.num_key_value_heads)
              & (dec["dtype"] == r.kv_cache_dtype)]
    assert len(hit) == 1
    h = hit.iloc[0]
    assert h.num_q_tokens == r.batch_size and h.num_kv_tokens == r.batch_size * r.step
    assert h.q_kv_product_sum == r.batch_size * r.step and h.max_q_len == 1
    assert h.time_us_mean == pytest.approx(r.latency * 1000) and np.isnan(h.time_us_median)
    assert (pre.q_kv_product_sum == pre.batch_size * pre.max_q_len ** 2).all()
    assert (pre.num_q_tokens == pre.num_kv_tokens).all()
    assert set(a.backend) == {"vllm-0.14.0"} and set(a.block_size) == {64}


def test_aiconfigurator_gemm_collective_moe(tmp_path):
    import_aiconfigurator(AIC, "h100", tmp_path)
    import_aiconfigurator(AIC, "a100", tmp_path)
    g = tables.read(tmp_path / "h100" / "gemm.parquet")
    src = pd.read_parquet(AIC / "h100_sxm/gemm/vllm/0.14.0/gemm_perf.parquet")
    assert set(g.dtype) == {"bfloat16", "fp8"}                    # fp8_block has no opcast dtype
    assert len(g) == src.gemm_dtype.isin(["bfloat16", "fp8"]).sum()
    nccl = tables.read(tmp_path / "h100" / "collective.parquet")
    nsrc = pd.read_parquet(AIC / "h100_sxm/comm/nccl/2.29.2/nccl_perf.parquet")
    nsrc = nsrc[(nsrc.op_name == "all_reduce") & (nsrc.nccl_dtype == "half")]
    assert set(nccl.op) == {"all_reduce"} and set(nccl.backend) == {"nccl-2.29.2"}
    assert sorted(nccl.size_bytes) == sorted(nsrc.message_size * 2)   # elements of fp16 -> bytes
    c = tables.read(tmp_path / "a100" / "collective.parquet")
    csrc = pd.read_parquet(AIC / "a100_sxm/comm/vllm/0.14.0/custom_allreduce_perf.parquet")
    assert set(c.op) == {"custom_all_reduce"} and set(c.network) == {"a100_dgx"}
    eager = csrc[csrc.backend == "vllm_eager"].iloc[0]
    hit = c[(c.size_bytes == eager.message_size * 2) & (c.world_size == eager.num_gpus) & ~c.cuda_graph]
    assert hit.time_us_mean.iloc[0] == pytest.approx(eager.latency * 1000)
    m = tables.read(tmp_path / "a100" / "moe.parquet")
    msrc = pd.read_parquet(AIC / "a100_sxm/moe/vllm/0.14.0/moe_perf.parquet")
    assert sorted(m.op) == sorted("moe_" + msrc.distribution)
    assert sorted(m.ffn_size) == sorted(msrc.inter_size) and sorted(m.ep) == sorted(msrc.moe_ep_size)


# ---------------------------------------------------------------- merging and determinism

def test_merge_is_idempotent_order_free_and_keeps_other_sources(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    import_vidur(VIDUR, "a100", a)
    import_aiconfigurator(AIC, "a100", a)
    first = files_bytes(a)
    import_vidur(VIDUR, "a100", a)                      # re-run replaces, never duplicates
    assert files_bytes(a) == first
    import_aiconfigurator(AIC, "a100", b)
    import_vidur(VIDUR, "a100", b)
    assert files_bytes(b) == first
    gemm = tables.read(a / "a100" / "gemm.parquet")
    assert set(gemm.source) == {"vidur", "aiconfigurator"}
    prov = tables.provenance(a / "a100" / "gemm.parquet")
    assert set(prov["sources"]) == {"vidur", "aiconfigurator"}
    assert prov["sources"]["vidur"]["commit"] == "7d47513"
    assert prov["sources"]["aiconfigurator"]["licence"] == "Apache-2.0"
    text = json.dumps(prov)
    assert not re.search(r"20\d\d-\d\d-\d\d|/tmp|/work", text)   # no dates, no absolute paths
    # a row another tool (the opcast profiler) wrote survives an import
    own = gemm.iloc[:1].copy().assign(source="opcast", backend="torch-test")
    merged = pd.concat([tables.read(a / "a100" / "gemm.parquet"), own], ignore_index=True)
    prov = {**tables.provenance(a / "a100" / "gemm.parquet"), "profiler": {"runs": 1}}
    tables.write(merged, a / "a100" / "gemm.parquet", "gemm", prov)
    import_vidur(VIDUR, "a100", a)
    assert (tables.read(a / "a100" / "gemm.parquet").source == "opcast").sum() == 1
    assert tables.provenance(a / "a100" / "gemm.parquet")["profiler"] == {"runs": 1}


def test_single_file_import_replaces_only_its_scope(tmp_path):
    import_vidur(VIDUR, "a100", tmp_path)
    before = tables.read(tmp_path / "a100" / "gemm.parquet")
    one = tmp_path / "one" / "meta-llama" / "Llama-2-70b-hf" / "mlp.csv"
    one.parent.mkdir(parents=True)
    src = pd.read_csv(MLP_70B)
    src[src.num_tensor_parallel_workers == 8].to_csv(one, index=False)
    import_vidur(one, "a100", tmp_path)                 # one model, fewer rows: replaces llama2-70b only
    after = tables.read(tmp_path / "a100" / "gemm.parquet")
    assert (after.model == "phi-2").sum() == (before.model == "phi-2").sum() > 0
    assert set(after[after.model == "llama2-70b"].tp) == {8}
    files = tables.provenance(tmp_path / "a100" / "gemm.parquet")["sources"]["vidur"]["files"]
    assert sorted(f["model"] for f in files) == ["llama2-70b", "phi-2"]
    import_aiconfigurator(AIC, "h100", tmp_path)
    n = len(tables.read(tmp_path / "h100" / "gemm.parquet"))
    import_aiconfigurator(AIC / "h100_sxm/gemm/vllm/0.14.0/gemm_perf.parquet", "h100", tmp_path)
    assert len(tables.read(tmp_path / "h100" / "gemm.parquet")) == n


def test_rows_without_a_median_are_skipped_not_invented(tmp_path):
    root = tmp_path / "v"
    csv = root / "meta-llama" / "Llama-2-70b-hf" / "mlp.csv"
    csv.parent.mkdir(parents=True)
    src = pd.read_csv(MLP_70B)
    src.loc[0, "time_stats.attn_pre_proj.median"] = np.nan
    src.to_csv(csv, index=False)
    import_vidur(csv, "a100", tmp_path / "out")
    g = tables.read(tmp_path / "out" / "a100" / "gemm.parquet")
    assert (g.op == "qkv_proj").sum() == len(src) - 1 and (g.op == "o_proj").sum() == len(src)
    assert g.time_us_median.notna().all()


# ---------------------------------------------------------------- malformed input

def _copy_vidur(tmp_path) -> Path:
    root = tmp_path / "vidur"
    shutil.copytree(VIDUR, root)
    return root


def test_vidur_missing_column_is_a_clear_error(tmp_path):
    root = _copy_vidur(tmp_path)
    csv = root / "profiling/compute/a100/meta-llama/Llama-2-70b-hf/mlp.csv"
    pd.read_csv(csv).drop(columns=["time_stats.mlp_up_proj.median"]).to_csv(csv, index=False)
    with pytest.raises(SourceFormatError, match=r"Llama-2-70b-hf/mlp.csv.*time_stats\.mlp_up_proj\.median"):
        import_vidur(root, "a100", tmp_path / "out")
    pd.read_csv(MLP_70B).drop(columns=["n_kv_head"]).to_csv(csv, index=False)
    with pytest.raises(SourceFormatError, match="missing column.*n_kv_head"):
        import_vidur(root, "a100", tmp_path / "out")


def test_times_not_in_ms_are_rejected(tmp_path):
    root = _copy_vidur(tmp_path)
    csv = root / "profiling/compute/a100/meta-llama/Llama-2-70b-hf/mlp.csv"
    df = pd.read_csv(MLP_70B)
    stat_cols = [c for c in df.columns if c.startswith("time_stats.")]
    df[stat_cols] = df[stat_cols] * 1e6                     # nanoseconds written where ms belong
    df.to_csv(csv, index=False)
    with pytest.raises(SourceFormatError, match="milliseconds"):
        import_vidur(root, "a100", tmp_path / "out")
    aic = tmp_path / "aic"
    shutil.copytree(AIC, aic)
    p = aic / "a100_sxm/gemm/vllm/0.14.0/gemm_perf.parquet"
    g = pd.read_parquet(p)
    g.rename(columns={"latency": "latency_us"}).to_parquet(p)
    with pytest.raises(SourceFormatError, match="missing column.*latency"):
        import_aiconfigurator(aic, "a100", tmp_path / "out")
    g.assign(latency=-g.latency).to_parquet(p)
    with pytest.raises(SourceFormatError, match="negative"):
        import_aiconfigurator(aic, "a100", tmp_path / "out")


def test_wrong_hw_and_unknown_inputs(tmp_path):
    single = AIC / "a100_sxm/gemm/vllm/0.14.0/gemm_perf.parquet"
    with pytest.raises(SourceFormatError, match="A100.*not hw=h100"):
        import_aiconfigurator(single, "h100", tmp_path)
    with pytest.raises(ConfigError, match="no data for hw='a40'"):
        import_aiconfigurator(AIC, "a40", tmp_path)
    with pytest.raises(ConfigError, match="unknown hw 'b200'"):
        import_vidur(VIDUR, "b200", tmp_path)
    odd = tmp_path / "org" / "Unknown-7b" / "mlp.csv"
    odd.parent.mkdir(parents=True)
    shutil.copy(MLP_70B, odd)
    with pytest.raises(ConfigError, match="no opcast model card.*model=<name>"):
        import_vidur(odd, "a100", tmp_path / "out")
    with pytest.raises(SourceFormatError, match="n_head=64 but model card llama2-7b has 32"):
        import_vidur(odd, "a100", tmp_path / "out", model="llama2-7b")
    import_vidur(odd, "a100", tmp_path / "out", model="llama2-70b")   # the override names the card
    assert set(tables.read(tmp_path / "out/a100/gemm.parquet").model) == {"llama2-70b"}


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "mlp.csv"
    pd.read_csv(MLP_70B).drop(columns=["num_tokens"]).to_csv(bad, index=False)
    r = subprocess.run([sys.executable, "-m", "profiler.import_vidur", str(bad), "hw=a100", "model=llama2-70b",
                        f"out_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "num_tokens" in r.stderr
    r = subprocess.run([sys.executable, "-m", "profiler.import_aiconfigurator", str(AIC)], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 2 and "missing hw=..." in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- traces

def test_traces_convert_and_validate(tmp_path):
    out = import_trace(TRACES / "splitwise_conv.csv", "conv", tmp_path)
    first = out.read_bytes()
    assert import_trace(TRACES / "splitwise_conv.csv", "conv", tmp_path).read_bytes() == first
    df = pd.read_parquet(out)
    src = pd.read_csv(TRACES / "splitwise_conv.csv")
    assert list(df.columns) == ["arrived_at_s", "num_prefill_tokens", "num_decode_tokens"]
    assert df.arrived_at_s.dtype == np.float64 and df.num_decode_tokens.dtype == np.int64
    assert df.arrived_at_s.tolist() == src.arrived_at.tolist() and not df.isna().any().any()
    meta = tables.provenance(out)
    assert "CC-BY" in meta["licence"] and meta["has_arrival_times"] and meta["via"]["commit"] == "7d47513"
    arxiv = pd.read_parquet(import_trace(TRACES / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
                                         "arxiv", tmp_path))
    assert list(arxiv.columns) == ["num_prefill_tokens", "num_decode_tokens"]
    bad = tmp_path / "bad.csv"
    src.assign(arrived_at=src.arrived_at[::-1].to_numpy()).to_csv(bad, index=False)
    with pytest.raises(SourceFormatError, match="decreases"):
        import_trace(bad, "bad", tmp_path)
    src.assign(arrived_at=np.nan).to_csv(bad, index=False)
    with pytest.raises(SourceFormatError, match="finite seconds"):
        import_trace(bad, "bad", tmp_path)
    src.drop(columns=["num_decode_tokens"]).to_csv(bad, index=False)
    with pytest.raises(SourceFormatError, match="num_decode_tokens"):
        import_trace(bad, "bad", tmp_path)


# ---------------------------------------------------------------- shipped data

def test_data_readme_matches_shipped_tables():
    readme = (REPO / "data" / "README.md").read_text()
    block = readme.split("<!-- summary:begin -->\n")[1].split("<!-- summary:end -->")[0]
    assert block == summary(REPO / "data"), "data/README.md is stale: python -m profiler.import_all summary"


@pytest.mark.skipif(not (REFERENCE / "vidur").is_dir(), reason="reference data not on this machine")
def test_shipped_tables_regenerate_byte_for_byte(tmp_path):
    import_all(REFERENCE, tmp_path)
    shipped = REPO / "data"
    for rel, data in files_bytes(tmp_path).items():
        ours = shipped / rel
        assert ours.exists(), rel
        if ours.read_bytes() == data or rel.startswith("traces/"):
            assert ours.read_bytes() == data, f"data/{rel} differs: python -m profiler.import_all"
            continue
        # another tool's rows (e.g. the opcast profiler) may share the file: compare ours only
        fam = ours.stem
        keep = lambda df: df[df.source.isin(["vidur", "aiconfigurator"])].reset_index(drop=True)
        pd.testing.assert_frame_equal(keep(tables.read(ours, fam)), keep(tables.read(tmp_path / rel, fam)))
