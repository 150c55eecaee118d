"""Issue 14's checks as a user runs them: the new GPU cards answer offline on the shipped data,
what fits at which TP in fp8 vs bf16 per card (hand-derived), and a dtype without rows is one
clear line naming what exists."""
from __future__ import annotations

import pytest

from conf import choices, compose, to_hw, to_model
from sim import memory
from tests.test_cli import SMALL, cli

GIB = 2 ** 30

# Smallest TP (1, 2, 4, 8) at which Llama-3-70B with an 8192-token context fits, as vLLM's memory
# check: 0.9 x card memory - weights - activations - NCCL buffers must hold one 8192-token
# request's KV (2.5 GiB / tp in bf16). Weights: 131.4 GiB bf16, 67.7 GiB fp8 (the linear layers'
# 68.45 G parameters at 1 byte, embedding + LM head 2 x 1.05 G at 2 bytes), per GPU / tp.
#   h100/h100-pcie/a100 (80 GiB -> 72.0 usable): bf16 tp1 131.4 > 72; tp2 65.7 + 0.5 act + 0.3 NCCL
#     leaves 5.4 >= 1.25 -> 2.  fp8 tp1: 72.0 - 67.7 - 0.5 = 3.5 >= 2.5 -> 1 (barely: a 16k context would not).
#   h200 (140.4 GiB -> 126.4): bf16 tp1 131.4 > 126.4 -> 2; fp8 -> 1.
#   b200/gb200/b300 (180/185/268.6 GiB): bf16 131.4 < 162 -> 1; fp8 -> 1.
#   a100-40gb (40 -> 36.0): bf16 tp2 65.7 > 36, tp4 32.9 + 0.8 leaves 2.4 >= 0.63 -> 4; fp8 tp2 33.8 + 0.8
#     leaves 1.3 >= 1.25 -> 2.
#   l40s (44.99 -> 40.5) and a40 (48 -> 43.2): bf16 tp2 65.7 > 43 -> 4; fp8 tp2 leaves 5.8 / 8.5 -> 2.
MIN_TP_70B_8K = {   # card: (bf16, fp8 weights)
    "h100": (2, 1), "h100-pcie": (2, 1), "a100": (2, 1), "h200": (2, 1), "b200": (1, 1), "gb200": (1, 1),
    "b300": (1, 1), "a100-40gb": (4, 2), "l40s": (4, 2), "a40": (4, 2), "cpu": (None, 8),
}


def min_tp(hw, weight_dtype: str, kv_dtype: str = "") -> int | None:
    m = to_model(compose("sim", ["model=llama3-70b", f"model.weight_dtype={weight_dtype}",
                                 f"model.kv_dtype={kv_dtype}"]).model)
    return next((tp for tp in (1, 2, 4, 8) if memory.memory_plan(hw, m, tp, 1, max_model_len=8192).fits), None)


def test_every_card_has_a_hand_derived_fit_table():
    assert set(MIN_TP_70B_8K) == set(choices("hw"))


@pytest.mark.parametrize("hw_name", sorted(MIN_TP_70B_8K))
def test_what_fits_at_which_tp_in_bf16_and_fp8(hw_name):
    hw = to_hw(compose("sim", [f"hw={hw_name}"]).hw)
    assert (min_tp(hw, ""), min_tp(hw, "fp8")) == MIN_TP_70B_8K[hw_name]
    assert min_tp(hw, "fp8", "fp8") == MIN_TP_70B_8K[hw_name][1]   # KV dtype never needs more GPUs


def test_fp8_kv_doubles_the_cache_and_fp8_weights_free_their_half():
    hw = to_hw(compose("sim", ["hw=h200"]).hw)
    plans = {}
    for wdt, kvdt in (("", ""), ("", "fp8"), ("fp8", "")):
        m = to_model(compose("sim", ["model=llama3-70b", f"model.weight_dtype={wdt}", f"model.kv_dtype={kvdt}"]).model)
        plans[wdt, kvdt] = memory.memory_plan(hw, m, 2, 1)
    bf16, kv8, w8 = plans["", ""], plans["", "fp8"], plans["fp8", ""]
    # same free bytes, half the bytes per block: twice the blocks (floor of each)
    assert kv8.kv_bytes_per_block * 2 == bf16.kv_bytes_per_block == 2 * 8 // 2 * 128 * 2 * 80 * 16
    assert kv8.num_blocks in (2 * bf16.num_blocks, 2 * bf16.num_blocks + 1)
    # fp8 weights: the linear layers' 68,451,041,280 bytes / tp=2 freed, in blocks of 2.5 MiB
    freed = 68_451_041_280 // 2
    assert w8.weight_bytes == bf16.weight_bytes - freed
    assert w8.num_blocks - bf16.num_blocks in (freed // bf16.kv_bytes_per_block, freed // bf16.kv_bytes_per_block + 1)


@pytest.mark.parametrize("args, first", [
    (["hw=b200", "model=llama3-70b", "parallel.tp=2", "model.weight_dtype=fp8"], "llama3-70b on b200 tp=2"),
    (["hw=h200"], "llama2-7b on h200 tp=1"),
])
def test_new_cards_run_offline_on_the_shipped_data(tmp_path, args, first):
    p = cli(tmp_path, "sim.run", *args, *SMALL)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(first), p.stdout[:200]
    assert "num_requests                  8.0000" in p.stdout


@pytest.mark.parametrize("args, line", [
    (["hw=b200", "model=llama3-70b", "model.weight_dtype=int4"],
     "error: model llama3-70b: weight_dtype='int4' is not one of ['bfloat16', 'float16', 'float32', 'fp8']"),
    (["hw=a40", "model=llama3-8b", "model.weight_dtype=fp8"],
     "error: model.weight_dtype=fp8: hw=a40 has no fp8 gemm rows; gemm rows exist for float16"),
    (["hw=a100", "model=llama3-8b", "model.kv_dtype=fp8"],
     "error: model.kv_dtype=fp8: hw=a100 has no fp8 attention rows; attention rows exist for bfloat16"),
])
def test_a_dtype_without_rows_is_one_line_naming_what_exists(tmp_path, args, line):
    p = cli(tmp_path, "sim.run", *args, *SMALL)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith(line), p.stderr
