"""Replica schedulers on tiny hand-built states, with hand-computed batches."""
from collections import deque

import pytest

from sim.config import SchedulerConf
from sim.engine import Engine, Replica, Request
from sim.metrics import Metrics
from sim.schedulers import SCHEDULERS
from sim.schedulers.common import Blocks
from sim.schedulers.lightllm import projected_peak_blocks


def make(name, capacity=1000, block_size=16, watermark=0.0, **knobs):
    sc = SchedulerConf(name=name, watermark=watermark, block_size=block_size, **knobs)
    blocks = Blocks(capacity, block_size, watermark)
    rep = Replica(0, SCHEDULERS[name](sc), blocks, cost=None, pp=1)
    engine = Engine([rep], "round_robin", 0, Metrics(True), fast_forward=False)
    return rep, engine


def decoding(rid, prompt, output, decoded, blocks, block_size=16):
    """A running request that finished its prompt and produced `decoded` tokens."""
    r = Request(rid, 0.0, prompt, output)
    r.prefilled, r.decoded, r.kv = prompt, decoded, prompt + decoded - 1
    need = -(-r.kv // block_size)
    blocks.allocate(r, need)
    r.first_sched_s = r.first_token_s = r.last_token_s = 0.0
    return r


def schedule(rep, now=0.0):
    return rep.scheduler.schedule(now, rep.running, rep.waiting, rep.blocks)


def ids(batch):
    return [(r.id, n) for r, n in batch.prefills], [r.id for r in batch.decodes]


def test_every_config_name_has_a_scheduler_and_yaml():
    from conf import choices
    assert set(SCHEDULERS) <= set(choices("scheduler"))


def test_vllm_runs_new_prompts_alone_but_orca_mixes_them_with_decodes():
    for name, expected in (("vllm", ([(3, 100)], [])), ("orca", ([(3, 100)], [1, 2]))):
        rep, _ = make(name)
        rep.running += [decoding(1, 50, 10, 2, rep.blocks), decoding(2, 60, 10, 3, rep.blocks)]
        rep.waiting.append(Request(3, 0.0, 100, 5))
        assert ids(schedule(rep)) == expected, name


def test_orca_reserves_prompt_and_output_blocks_vllm_only_the_prompt():
    for name, blocks in (("vllm", 7), ("orca", 7 + 2)):   # ceil(100/16)=7; ceil((100+30-1)/16)=9
        rep, _ = make(name)
        r = Request(0, 0.0, 100, 30)
        rep.waiting.append(r)
        schedule(rep)
        assert r.blocks == blocks, name


def test_sarathi_chunks_prompts_to_the_token_budget_after_the_decodes():
    rep, engine = make("sarathi", chunk_size=512)
    rep.running += [decoding(1, 50, 100, 2, rep.blocks), decoding(2, 60, 100, 3, rep.blocks)]
    new = Request(3, 0.0, 1200, 5)
    rep.waiting.append(new)
    chunks = []
    for t in range(3):
        batch = schedule(rep, float(t))
        pre, dec = ids(batch)
        assert dec == [1, 2]
        chunks += [n for rid, n in pre if rid == 3]
        engine.finish(rep, batch, 1, t + 1.0, t + 1.0)
    assert chunks == [510, 510, 180]          # 512 minus the two decodes each time
    assert new.blocks == 75 and new.first_token_s == 3.0 and new.decoded == 1  # 1200/16 at admission
    assert ids(schedule(rep, 3.0)) == ([], [1, 2, 3])


def test_vllm_v1_shares_the_budget_between_chunks_and_decodes():
    rep, engine = make("vllm_v1", max_tokens_per_batch=2048)
    rep.waiting += [Request(1, 0.0, 1500, 5), Request(2, 0.0, 1000, 5)]
    b1 = schedule(rep)
    assert ids(b1) == ([(1, 1500), (2, 548)], [])
    engine.finish(rep, b1, 1, 1.0, 1.0)
    b2 = schedule(rep, 1.0)
    assert ids(b2) == ([(2, 452)], [1])


def test_vllm_preempts_the_newest_request_by_recompute_when_blocks_run_out():
    rep, _ = make("vllm", capacity=5, block_size=4)
    r1 = decoding(1, 8, 10, 1, rep.blocks, block_size=4)   # kv 8 = 2 full blocks each
    r2 = decoding(2, 8, 10, 1, rep.blocks, block_size=4)
    rep.running += [r1, r2]
    assert rep.blocks.free == 1
    batch = schedule(rep)
    assert ids(batch) == ([], [1])
    assert list(rep.waiting) == [r2] and rep.running == [r1]
    assert (r2.preemptions, r2.blocks, r2.kv, r2.prefill_target, r2.prefilled) == (1, 0, 0, 9, 0)
    assert rep.blocks.free == 2 and r1.blocks == 3


def test_faster_transformer_admits_nothing_until_its_batch_finishes():
    rep, engine = make("faster_transformer", max_num_seqs=2)
    rep.waiting += [Request(1, 0.0, 10, 2), Request(2, 0.0, 10, 4), Request(3, 0.0, 10, 2)]
    b = schedule(rep)
    assert ids(b) == ([(1, 10), (2, 10)], [])
    engine.finish(rep, b, 1, 1.0, 1.0)
    b = schedule(rep, 1.0)
    assert ids(b) == ([], [1, 2])
    engine.finish(rep, b, 1, 2.0, 2.0)           # request 1 has its 2 tokens and leaves
    assert [r.id for r in rep.running] == [2]
    b = schedule(rep, 2.0)
    assert ids(b) == ([], [2])                   # 3 still waits for the whole batch
    engine.finish(rep, b, 1, 3.0, 3.0)
    engine.finish(rep, schedule(rep, 3.0), 1, 4.0, 4.0)
    assert ids(schedule(rep, 4.0)) == ([(3, 10)], [])


def test_lightllm_refuses_what_would_overflow_later_where_vllm_admits():
    # 10 blocks of 4 tokens. Running: kv 8, 10 tokens to go. Candidate: prompt 8, 12 output.
    # Projected: both alive for 10 more steps -> 8+10 + 8+10 tokens (+3 rounding each) = 42 > 40.
    assert projected_peak_blocks([(8, 10), (8, 11)], 4) == 11
    for name, admitted in (("lightllm", False), ("vllm", True)):
        rep, _ = make(name, capacity=10, block_size=4)
        rep.running.append(decoding(1, 8, 11, 1, rep.blocks, block_size=4))
        rep.waiting.append(Request(2, 0.0, 8, 12))
        pre, _ = ids(schedule(rep))
        assert (pre == [(2, 8)]) is admitted, name


def test_vllm_keeps_the_watermark_free_when_admitting():
    rep, _ = make("vllm", capacity=100, block_size=16, watermark=0.05)   # 5 blocks kept free
    rep.waiting += [Request(1, 0.0, 16 * 90, 5), Request(2, 0.0, 16 * 6, 5)]
    pre, _ = ids(schedule(rep))
    assert pre == [(1, 1440)]        # 90 + 6 blocks would leave 4 < 5
    assert isinstance(rep.waiting, deque) and rep.waiting[0].id == 2


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedulers_return_none_when_idle(name):
    rep, _ = make(name)
    assert schedule(rep) is None
