"""Trace import (python -m profiler.import_traces): every format on a real slice of its source,
the parquet contract, chained prefix ids, provenance, and one-line errors on bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conf import ConfigError
from profiler import tables
from profiler.import_traces import import_trace, read_trace
from profiler.traces.common import token_block_hashes
from profiler.traces.sharegpt import estimate_tokens
from sim import vllm_bench

REPO = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "traces"
BENCH = Path(__file__).parent / "fixtures" / "fidelity" / "bench_result.json"
GROUND = REPO.parent / "shared" / "reference" / "ground_truth"


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "profiler.import_traces", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def test_lmbench_multi_round_sessions_and_shared_prefixes(tmp_path):
    out = import_trace(FIX / "LMBench_long_input_output_0.5.csv", "lmb", tmp_path)
    df, meta = pd.read_parquet(out), tables.provenance(out)
    src = pd.read_csv(FIX / "LMBench_long_input_output_0.5.csv")
    assert list(df.columns) == ["arrived_at_s", "num_prefill_tokens", "num_decode_tokens", "session_id", "turn",
                                "prefix_hashes"]
    assert len(df) == len(src) == meta["num_requests"] and meta["format"] == "lmbench"
    assert df.arrived_at_s.iloc[0] == 0.0 and df.arrived_at_s.is_monotonic_increasing
    assert df.arrived_at_s.iloc[-1] == pytest.approx(src.launch_time.max() - src.launch_time.min())
    assert df.num_prefill_tokens.sum() == src.prompt_tokens.sum() and df.session_id.nunique() == src.user_id.nunique()
    assert meta["hash_block_tokens"] == 16 and set(meta["measured_columns_not_copied"]) == {"ttft", "generation_time",
                                                                                            "finish_time"}
    assert any("previous turn's prompt" in a for a in meta["assumptions"])
    # user 63: question 2 resends question 1's prompt and answer; the blocks they share are equal
    u = df[df.session_id == 63].sort_values("turn")
    first, second = u.iloc[0], u.iloc[1]
    assert len(first.prefix_hashes) == first.num_prefill_tokens // 16
    assert list(second.prefix_hashes[:len(first.prefix_hashes)]) == list(first.prefix_hashes)
    assert len(second.prefix_hashes) > (first.num_prefill_tokens + first.num_decode_tokens) // 16
    # two users share nothing by default, the first block with shared_prefix_tokens
    other = df[df.session_id == 64].iloc[0]
    assert first.prefix_hashes[0] != other.prefix_hashes[0]
    df2 = pd.read_parquet(import_trace(FIX / "LMBench_long_input_output_0.5.csv", "lmb2", tmp_path,
                                       shared_prefix_tokens=1000))
    a, b = df2[df2.session_id == 63].iloc[0], df2[df2.session_id == 64].iloc[0]
    assert list(a.prefix_hashes[:62]) == list(b.prefix_hashes[:62]) and a.prefix_hashes[62] != b.prefix_hashes[62]
    assert out.read_bytes() == import_trace(FIX / "LMBench_long_input_output_0.5.csv", "lmb", tmp_path).read_bytes()


def test_imported_trace_feeds_the_simulator_workload(tmp_path):
    from sim.workload import load_trace
    out = import_trace(FIX / "LMBench_long_input_output_0.5.csv", "lmb", tmp_path)
    arrivals, pre, dec = load_trace(str(out), "data", need_arrivals=True)
    assert len(arrivals) == len(pre) == len(dec) == 52 and (dec == 100).all()


def test_vllm_detailed_result_replays_recorded_send_times(tmp_path):
    doc = json.loads(BENCH.read_text())
    out = import_trace(BENCH, "bench", tmp_path)
    df, meta = pd.read_parquet(out), tables.provenance(out)
    starts = np.array(doc["start_times"])
    order = np.argsort(starts, kind="stable")
    assert meta["format"] == "vllm_bench" and meta["arrival_source"] == "recorded"
    assert df.arrived_at_s.to_numpy() == pytest.approx(starts[order] - starts.min())
    assert list(df.num_prefill_tokens) == list(np.array(doc["input_lens"])[order])
    assert df.num_prefill_tokens.sum() == doc["total_input_tokens"]
    assert df.num_decode_tokens.sum() == doc["total_output_tokens"]
    assert "ttft" not in "".join(df.columns)     # measured latencies stay out of the trace


def test_vllm_aggregate_result_regenerates_vllms_arrivals(tmp_path):
    path = FIX / "exp7_vllm-2replicas_benchmark_2025-05-11_22-45-40.json"
    doc = json.loads(path.read_text())
    df = pd.read_parquet(import_trace(path, "exp7", tmp_path))
    meta = tables.provenance(tmp_path / "exp7.parquet")
    assert len(df) == doc["completed"] == 200
    assert (df.num_prefill_tokens == 8000).all() and (df.num_decode_tokens == 200).all()
    assert meta["arrival_source"] == "legacy"      # this benchmark_serving.py wrote 'request_goodput:'
    # legacy get_request: np.random.seed(0), one gamma draw slept after each send
    np.random.seed(0)
    gaps = [np.random.gamma(50.0, 1.0 / (1.8 * 50.0)) for _ in range(200)]
    assert df.arrived_at_s.to_numpy() == pytest.approx(np.concatenate([[0.0], np.cumsum(gaps[:-1])]))
    # vLLM >= 0.10: the same draws summed, rescaled so the last send is at num_prompts / rate
    t = vllm_bench.vllm_arrivals(200, 1.8, 50.0, 0, "normalised")
    assert t[-1] == pytest.approx(200 / 1.8) and t[0] > 0
    assert np.diff(t) / np.diff(t).mean() == pytest.approx(np.array(gaps[1:]) / np.mean(gaps[1:]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: v for k, v in doc.items() if k != "total_input_tokens"}))
    with pytest.raises(ConfigError, match="missing key 'total_input_tokens'"):
        import_trace(bad, "bad", tmp_path)
    bad.write_text(json.dumps(dict(doc, total_input_tokens=1600001)))
    with pytest.raises(ConfigError, match="per-request lengths are unknown; give input_len"):
        import_trace(bad, "bad", tmp_path)


def test_llmservingsim_prefix_ids_are_exact_from_token_ids(tmp_path):
    src = FIX / "llmservingsim_sharegpt_req300_rate10_llama_head16.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    df = pd.read_parquet(import_trace(src, "lss", tmp_path))
    assert len(df) == 16 and list(df.num_prefill_tokens) == [r["input_toks"] for r in rows]
    assert df.arrived_at_s.to_numpy() == pytest.approx([(r["arrival_time_ns"] - rows[0]["arrival_time_ns"]) / 1e9
                                                        for r in rows])
    assert [list(h) for h in df.prefix_hashes] == [token_block_hashes(r["input_tok_ids"], 16) for r in rows]
    # chained: a copy of request 0 with one token changed in block 1 keeps block 0's id only
    a = rows[0]
    b = dict(a, input_tok_ids=a["input_tok_ids"][:20] + [7] + a["input_tok_ids"][21:])
    pair = tmp_path / "pair.jsonl"
    pair.write_text("\n".join(json.dumps(r) for r in (a, a, b)))
    h = pd.read_parquet(import_trace(pair, "pair", tmp_path)).prefix_hashes
    assert list(h[0]) == list(h[1]) and h[2][0] == h[0][0] and all(x != y for x, y in zip(h[2][1:], h[0][1:]))
    pair.write_text(json.dumps(dict(a, input_tok_ids=a["input_tok_ids"][:-1])))
    with pytest.raises(ConfigError, match=r"line 1: input_toks=85 but input_tok_ids holds 84 ids"):
        import_trace(pair, "pair", tmp_path)
    pair.write_text(json.dumps({k: v for k, v in a.items() if k != "input_tok_ids"}))
    with pytest.raises(ConfigError, match="line 1: missing key.s. input_tok_ids"):
        import_trace(pair, "pair", tmp_path)


@pytest.mark.skipif(not GROUND.is_dir(), reason="ground truth not on this machine")
def test_llmservingsim_whole_dataset_has_shared_prefixes(tmp_path):
    df = pd.read_parquet(import_trace(GROUND / "llmservingsim/dataset/sharegpt_req300_rate10_llama.jsonl", "l", tmp_path))
    firsts = pd.Series([h[0] for h in df.prefix_hashes if len(h)])
    assert len(df) == 300 and firsts.duplicated().sum() >= 3   # repeated ShareGPT prompts share their blocks


def test_mooncake_hash_ids_become_chained_512_token_blocks(tmp_path):
    src = FIX / "mooncake_conversation_trace_head11.jsonl"
    out = import_trace(src, "mc", tmp_path)
    df, meta = pd.read_parquet(out), tables.provenance(out)
    assert meta["format"] == "mooncake" and meta["hash_block_tokens"] == 512 and "Mooncake" in meta["description"]
    assert list(df.arrived_at_s) == [0.0] * 10 + [3.0]          # ms -> s
    assert (df.prefix_hashes.map(len) == df.num_prefill_tokens // 512).all()
    assert df.prefix_hashes.map(lambda h: h[0]).nunique() == 1   # every request starts with hash id 0
    assert df.prefix_hashes.map(lambda h: h[1]).nunique() == 11
    with pytest.raises(ConfigError, match=r"line 1: input_length=6758 needs 423 hash_ids at 16 tokens per block"):
        import_trace(src, "mc", tmp_path, hash_block_tokens=16)
    r = _run_cli(src, "name=mc", f"out_dir={tmp_path}", "hash_block_tokens=16")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "line 1" in r.stderr and "Traceback" not in r.stderr


def test_azure_2023_and_2024_timestamps(tmp_path):
    df = pd.read_parquet(import_trace(FIX / "azure_llm_inference_2023_code_head30.csv", "az", tmp_path))
    assert len(df) == 30 and df.arrived_at_s.iloc[1] == pytest.approx(0.052) and df.num_prefill_tokens.iloc[0] == 4808
    assert "2023" in tables.provenance(tmp_path / "az.parquet")["description"]
    p = tmp_path / "az24.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00.009930+00:00,1200,33\n"
                 "2024-05-10 00:00:01.509930+00:00,80,2\n")
    df = pd.read_parquet(import_trace(p, "az24", tmp_path))
    assert list(df.arrived_at_s) == pytest.approx([0.0, 1.5])
    assert "2024" in tables.provenance(tmp_path / "az24.parquet")["description"]
    p.write_text("TIMESTAMP,ContextTokens\n2024-05-10 00:00:00,1\n")
    with pytest.raises(ConfigError, match="missing column.s. GeneratedTokens"):
        import_trace(p, "az24", tmp_path, fmt="azure")


def test_burstgpt_failures_are_named_or_dropped(tmp_path):
    df = pd.read_parquet(import_trace(FIX / "burstgpt_1_first_rows.csv", "bg", tmp_path))
    assert list(df.arrived_at_s) == [0.0, 40.0, 113.0] and list(df.num_decode_tokens) == [18, 230, 276]
    p = tmp_path / "bg.csv"
    p.write_text((FIX / "burstgpt_1_first_rows.csv").read_text() + "120,GPT-4,300,0,300,API log\n")
    with pytest.raises(ConfigError, match="row 5: 0 output tokens .BurstGPT logs failed requests.*drop_empty=true"):
        import_trace(p, "bg", tmp_path)
    out = import_trace(p, "bg", tmp_path, drop_empty="true")
    assert len(pd.read_parquet(out)) == 3 and tables.provenance(out)["dropped_rows"]["zero_output_tokens"] == 1


def test_sharegpt_first_turn_and_sessions(tmp_path):
    convs = [{"id": "a", "conversations": [{"from": "human", "value": "x" * 40},
                                           {"from": "gpt", "value": "y" * 400},
                                           {"from": "human", "value": "z" * 80},
                                           {"from": "gpt", "value": "w" * 8}]},
             {"id": "b", "conversations": [{"from": "human", "value": "only one"}]},
             {"id": "c", "conversations": [{"from": "human", "token_ids": list(range(40))},
                                           {"from": "gpt", "token_ids": [1, 2, 3]}]}]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(convs))
    first = pd.read_parquet(import_trace(p, "sg", tmp_path))
    assert list(first.num_prefill_tokens) == [10, 40] and list(first.num_decode_tokens) == [100, 3]
    meta = tables.provenance(tmp_path / "sg.parquet")
    assert meta["conversations_skipped_fewer_than_2_messages"] == 1 and "has_arrival_times" in meta
    assert not meta["has_arrival_times"] and meta["length_source"]["exact_messages"] == 2
    every = pd.read_parquet(import_trace(p, "sg", tmp_path, turns="all"))
    assert list(every.num_prefill_tokens) == [10, 130, 40] and list(every.turn) == [0, 1, 0]
    assert list(every.session_id) == [0, 0, 2]
    assert list(every.prefix_hashes[2]) == token_block_hashes(list(range(40)), 16)   # exact from token_ids
    assert len(every.prefix_hashes[1]) == 8 and every.prefix_hashes[1][0] != every.prefix_hashes[2][0]
    assert estimate_tokens("hello world!") == 3 and estimate_tokens("你好世界") == 4 and estimate_tokens(" ") == 0
    convs[0]["conversations"][0]["value"] = ""
    p.write_text(json.dumps(convs))
    with pytest.raises(ConfigError, match=r"conversation 0 \(id 'a'\) message 0/1: empty prompt"):
        import_trace(p, "sg", tmp_path)


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "lmb.csv"
    pd.read_csv(FIX / "LMBench_long_input_output_0.5.csv").drop(columns=["launch_time"]).to_csv(bad, index=False)
    r = _run_cli(bad, "name=x", f"out_dir={tmp_path}", "format=lmbench")
    assert r.returncode == 2 and "launch_time" in r.stderr and r.stderr.count("\n") == 1
    r = _run_cli(FIX / "burstgpt_1_first_rows.csv", "name=x", f"out_dir={tmp_path}", "turns=all")
    assert r.returncode == 2 and "unknown option(s) ['turns'] for format=burstgpt" in r.stderr
    r = _run_cli(FIX / "burstgpt_1_first_rows.csv", "name=x", f"out_dir={tmp_path}", "format=nope")
    assert r.returncode == 2 and "format='nope'" in r.stderr
    odd = tmp_path / "odd.txt"
    odd.write_text("hello\n")
    with pytest.raises(ConfigError, match="format not recognised"):
        read_trace(odd)
