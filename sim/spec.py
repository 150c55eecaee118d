"""Speculative decoding as vLLM's V1 engine runs it (``scheduler.spec``; vLLM ``--speculative-config``).

Every decode step, a decoding sequence carries the ``k`` draft tokens its proposer made after
the previous step: the target model runs its last sampled token and the drafts as one query of
``1 + k`` tokens over its context (a prefill-like chunk in the step's batch, beside any prefill
chunks), computes logits at every position, and the rejection sampler keeps the longest
accepted run of drafts plus one token of its own (the correction, or the bonus token when all
were accepted): ``1 + a`` output tokens, ``a`` in 0..k. Then the proposer drafts the next
step's tokens for every sequence that will decode next:

- ``draft``: a smaller model (``draft_model``, a conf/model with the target's vocabulary, at the
  target's tp, priced by its own operator tables): one forward over the step's tokens (it keeps
  its own KV cache of every sequence, prompt included), then k - 1 single-token decodes.
- ``eagle`` / ``mtp``: an EAGLE(-3) head or a DeepSeek MTP module, priced as one decoder layer
  of the target (an MoE layer for an MoE target) with the embedding before it and the final
  norm, LM head and sampler after it: one pass over the step's tokens, then k - 1 single-token
  passes (vLLM's EagleProposer). Its fc projection ([embedding; hidden] -> hidden) is not priced.
- ``ngram``: prompt lookup on the CPU, serial with the GPU: NGRAM_NS_PER_TOKEN per context
  token of every sequence looked up. A sequence whose lookup finds no match gets no draft and
  decodes one token (``propose_rate``: the share of steps with a match).

Acceptance: entry i of the per-position profile is the share of drafts whose first i + 1 tokens
were all accepted (vLLM's ``spec_decode_num_accepted_tokens_per_pos`` / drafts, and the
definition of its synthetic rejection sampler's ``synthetic_acceptance_rates``), so it must not
increase. One uniform draw u per draft gives ``a = #{i < k: u < rate_i}``, which reproduces the
profile exactly; draws come from a generator seeded by ``seed`` and the replica, so a run is
deterministic. A request's last step emits only the tokens it still needs (vLLM discards the
rest); the acceptance counters count what the sampler accepted, as vLLM's do.

KV: a step allocates blocks for all ``1 + k`` query tokens (as vLLM's allocate_slots does); the
blocks only rejected drafts filled are freed when the step ends (vLLM keeps them for the next
step's slots; here they return to the pool and are allocated again). A draft model's or head's
weights and its KV (its layers' share of every block, as vLLM sizes one block pool for all
layers) come out of the GPU memory the KV cache gets (``plan_with_proposer``).

Metrics keep vLLM's definitions: ITL is per step (the gap between a request's consecutive
output chunks), TPOT per output token; the summary adds drafts, draft and accepted tokens, the
mean acceptance length (1 + accepted / drafts) and the acceptance rate per position.
Not modelled: pipeline parallelism with speculative decoding, the draft KV lookahead slots,
EAGLE-3's reduced draft vocabulary (its LM head is priced at the target's), tree drafts.
"""
from __future__ import annotations

import dataclasses
import itertools
import random

from conf import ConfigError, choices, shapes, to_model
from conf.schema import DTYPE_BYTES
from sim.config import SPEC_METHODS

# Published per-position acceptance (vLLM's definition above), with the share of steps that get
# a draft. Each is one measurement on one workload: a run on another workload should give its own.
DEFAULTS = {
    # vLLM CI baseline (tests/v1/spec_decode/test_acceptance_length.py, vllm-project/vllm commit
    # 029ba37503c59160eacf163dd50b3bb1a6cfe982, Apache-2.0): EAGLE-3 head
    # RedHatAI/Llama-3.1-8B-Instruct-speculator.eagle3 on meta-llama/Llama-3.1-8B-Instruct,
    # MT-Bench (80 prompts, 256 output tokens, greedy), k = 3: mean acceptance length 2.60.
    "eagle": ((0.7296, 0.5208, 0.3545), 1.0,
              "vLLM CI EAGLE-3 baseline, Llama-3.1-8B-Instruct, MT-Bench, greedy (3 positions)"),
    # vLLM CI baseline (same file, its MTP_MODEL_CONFIGS): deepseek-ai/DeepSeek-V3 with its MTP
    # module, MT-Bench, greedy, k = 1: mean acceptance length 1.882; DeepSeek-V3 technical report
    # (arXiv:2412.19437, section 5.4.3): "the acceptance rate of the second token prediction
    # ranges between 85% and 90%". One module: one measured position.
    "mtp": ((0.882,), 1.0, "vLLM CI DeepSeek-V3 MTP baseline, MT-Bench, greedy (1 position)"),
    # vLLM PR #24344 (the ngram run in its description): ngram, prompt_lookup_min 2, max 5, k = 5,
    # Llama-3.1-8B-Instruct on vdaita/edit_5k_char (code editing: much of the output repeats
    # the prompt, a favourable case), 5376 output tokens = 993 drafts + 3562 accepted + 821
    # tokens of steps without a match: 993 / (993 + 821) of the steps had a draft.
    "ngram": ((0.81, 0.74, 0.70, 0.68, 0.66), 993 / (993 + 821),
              "vLLM PR #24344 ngram on blazedit code edits (5 positions; 993 of 1814 steps drafted)"),
}

# CPU time of vLLM's n-gram lookup (numba KMP, one thread per rank) per context token scanned:
# vLLM PR #56732's microbenchmark, arm "main": 70.28 ms for a batch of 512 x 129,536 tokens.
NGRAM_NS_PER_TOKEN = 70.28e6 / (512 * 129_536)

_DRAFT_TIMES: dict = {}   # (hw, draft model, tp, quantile, data dir) -> OpTimes, kept across runs


def enabled(sc) -> bool:
    return sc.spec.method != "none"


def lookahead(sc) -> int:
    """Tokens a step may add to a sequence's KV beyond its next one (its drafts)."""
    return int(sc.spec.num_tokens) if enabled(sc) else 0


def profile(spec) -> tuple[list[float], float]:
    """(per-position acceptance rates, share of steps with a draft) of a checked SpecConf."""
    k = int(spec.num_tokens)
    rates, rate, _ = DEFAULTS.get(spec.method, ((), 1.0, ""))
    rates = list(spec.acceptance if len(spec.acceptance) else rates)[:k]
    return [float(r) for r in rates], (float(spec.propose_rate) if spec.propose_rate >= 0 else rate)


def validate(cfg) -> None:
    """One ConfigError line for a speculative-decoding setting opcast cannot run as given."""
    from sim.schedulers import require
    sc, spec = cfg.scheduler, cfg.scheduler.spec
    method = spec.method
    if method not in SPEC_METHODS:
        raise ConfigError(f"scheduler.spec.method={method!r}; choose one of {list(SPEC_METHODS)}")
    if method != "draft" and spec.draft_model:
        raise ConfigError(f"scheduler.spec.draft_model={spec.draft_model} is used by method=draft only "
                          f"(scheduler.spec.method={method})")
    if method == "none":
        if len(spec.acceptance) or spec.propose_rate >= 0:
            raise ConfigError("scheduler.spec.acceptance/propose_rate are set but scheduler.spec.method=none; "
                              "choose a method (draft, eagle, mtp, ngram)")
        return
    require(sc.name, "spec_decoding", f"scheduler.spec.method={method}", "speculative decoding")
    if cfg.parallel.pp > 1:
        raise ConfigError(f"scheduler.spec.method={method} with parallel.pp={cfg.parallel.pp}: opcast does "
                          f"not model speculative decoding with pipeline parallelism")
    k = spec.num_tokens
    if k < 1:
        raise ConfigError(f"scheduler.spec.num_tokens={k} must be >= 1")
    if len(spec.acceptance):
        rates = list(spec.acceptance)
        if len(rates) < k or any(not 0 <= float(r) <= 1 for r in rates) or \
                any(float(b) > float(a) for a, b in itertools.pairwise(rates)):
            raise ConfigError(f"scheduler.spec.acceptance={rates}: give at least {k} rates (one per draft "
                              f"position, scheduler.spec.num_tokens={k}) in [0, 1], non-increasing (share of "
                              f"drafts whose first i+1 tokens were accepted)")
    elif method not in DEFAULTS:
        raise ConfigError(f"scheduler.spec.method={method} has no published acceptance profile (it depends on "
                          f"the draft/target pair); give scheduler.spec.acceptance with {k} rates")
    elif len(DEFAULTS[method][0]) < k:
        rates, _, source = DEFAULTS[method]
        raise ConfigError(f"scheduler.spec.num_tokens={k}: the {method} default acceptance ({source}) has "
                          f"{len(rates)} position(s); give scheduler.spec.acceptance with {k} rates")
    if spec.propose_rate >= 0 and not 0 < spec.propose_rate <= 1:
        raise ConfigError(f"scheduler.spec.propose_rate={spec.propose_rate} must be in (0, 1] (< 0: the method's)")
    if method == "draft":
        draft_model(cfg)


def draft_model(cfg):
    """The checked ModelConf of scheduler.spec.draft_model."""
    from conf import compose
    name, target = cfg.scheduler.spec.draft_model, to_model(cfg.model)
    if not name:
        raise ConfigError("scheduler.spec.method=draft needs scheduler.spec.draft_model=<a conf/model name>")
    if name not in choices("model"):
        raise ConfigError(f"scheduler.spec.draft_model={name!r}; choose one of {', '.join(choices('model'))}")
    draft = to_model(compose("sim", [f"model={name}"]).model)
    if draft.vocab_size != target.vocab_size:
        raise ConfigError(f"scheduler.spec.draft_model={name} has vocab_size {draft.vocab_size}, {target.name} "
                          f"{target.vocab_size}: a draft model must share the target's vocabulary")
    shapes.check_tp(draft, int(cfg.parallel.tp), "parallel.tp (the draft model runs at the target's tp)")
    return draft


# --- memory ----------------------------------------------------------------------------------
def proposer_bytes(cfg, model, lay) -> tuple[int, int]:
    """(weight bytes per GPU, KV bytes per token per GPU) the proposer adds to the target's."""
    method = cfg.scheduler.spec.method
    if method == "draft":
        draft = draft_model(cfg)
        return shapes.weight_bytes_per_gpu(draft, lay.tp), shapes.kv_bytes_per_token(draft, lay.tp)
    if method in ("eagle", "mtp"):
        moe = shapes.moe_layer_flags(model)[-1]
        # one target layer and the 2h -> h projection of [embedding; hidden state]; embedding
        # and LM head shared with the target (DeepSeek's MTP design; vLLM shares them with EAGLE
        # heads that ship none)
        fc = 2 * model.hidden_size * model.hidden_size // lay.tp * DTYPE_BYTES[shapes.weight_dtype(model)]
        return (shapes._layer_weight_bytes(model, lay, moe) + fc,
                shapes.kv_bytes_per_token_per_layer(model, lay.tp))
    return 0, 0


def plan_with_proposer(plan, cfg, model, lay, max_model_len: int):
    """The memory plan with the proposer's weights and KV taken from the KV cache's memory."""
    weights, kv_token = proposer_bytes(cfg, model, lay)
    if not plan.fits or not (weights or kv_token):
        return plan
    kv_block = plan.kv_bytes_per_block + kv_token * plan.block_size
    free = (plan.usable_bytes - plan.weight_bytes - weights - plan.activation_bytes - plan.nccl_bytes
            - plan.cuda_graph_bytes)
    blocks = max(0, free // kv_block)
    out = dataclasses.replace(plan, num_blocks=int(blocks), kv_bytes_per_block=kv_block,
                              weight_bytes=plan.weight_bytes + weights)
    if blocks * plan.block_size < max_model_len:
        what = f"the {cfg.scheduler.spec.method} proposer ({weights / 2 ** 30:.2f} GiB of weights per GPU"
        return dataclasses.replace(out, fits=False, num_blocks=0, reason=(
            f"{model.name} with {what} and its KV) leaves {blocks * plan.block_size} KV tokens, less than one "
            f"{max_model_len}-token sequence"))
    return out


# --- the proposer's cost ---------------------------------------------------------------------
def draft_cost(cfg, engine, hw):
    """BatchCost of the draft model at the target's tp, without the engine's CPU time (the
    draft runs inside the target's step)."""
    from estimator.runtime import load_op_times
    from sim import workload as workloads
    from sim.costs import BatchCost
    draft = draft_model(cfg)
    tp, quantile = int(cfg.parallel.tp), cfg.sim.op_quantile
    data_dir = str(workloads.resolve_data_dir(cfg.sim.data_dir))
    key = (hw.name, draft.name, tp, quantile, data_dir)
    if key not in _DRAFT_TIMES:
        _DRAFT_TIMES[key] = load_op_times(hw, draft, tp, quantile=quantile, data_dir=data_dir,
                                          layout=shapes.layout(draft, tp))
    quiet = dataclasses.replace(engine, cpu_per_iteration_us=0.0, cpu_per_sequence_us=0.0, cpu_per_token_us=0.0)
    return BatchCost(_DRAFT_TIMES[key], draft, 1, engine=quiet, interconnect=hw.interconnect,
                     graphs=hw.device == "cuda")


class SpecDecoder:
    """One replica's speculative decoding: the drafts each sequence gets, a step's time, the
    acceptance draws and vLLM's counters."""

    def __init__(self, spec, cost, seed: int, replica: int, draft=None):
        self.method, self.k = spec.method, int(spec.num_tokens)
        self.rates, self.propose_rate = profile(spec)
        self.cost, self.draft = cost, draft
        self.rng = random.Random(seed * 1_000_003 + 7919 * replica + 17)
        self.num_drafts = self.draft_tokens = self.accepted = 0
        self.accepted_per_pos = [0] * self.k

    def drafts(self, r) -> int:
        """Draft tokens the proposer made for r's next step (called when it is scheduled)."""
        if self.propose_rate >= 1.0 or self.rng.random() < self.propose_rate:
            return self.k
        return 0

    def step(self, batch) -> tuple[float, int, int, int, int]:
        """(µs, tokens, sampled positions, attention pairs, KV tokens read) of one step: the
        target's forward (prefill chunks, decodes with their drafts as (1 + d)-token queries)
        and the proposer's drafts for every sequence that decodes next."""
        pre, tokens, sampled, pairs, kv_read = [], 0, 0, 0, 0
        drafting = draft_kv = plain = plain_kv = 0
        for r, n in batch.prefills:
            kv = r.kv + n
            pre.append((n, kv))
            tokens += n
            pairs += n * kv
            kv_read += kv
            if r.prefilled + n == r.prefill_target:
                sampled += 1
                drafting += 1
                draft_kv += kv
        for r in batch.decodes:
            q = 1 + r.drafts
            kv = r.kv + q
            tokens += q
            sampled += q
            kv_read += kv
            drafting += 1
            draft_kv += kv
            if q > 1:
                pre.append((q, kv))
                pairs += q * kv
            else:
                plain += 1
                plain_kv += kv
                pairs += kv
        us = self.cost.stage_us(tokens, pre, plain, plain_kv, sampled)[0]
        return us + self.propose_us(tokens, pre, plain, plain_kv, drafting, draft_kv), tokens, sampled, pairs, kv_read

    def propose_us(self, tokens: int, pre: list, plain: int, plain_kv: int, drafting: int, draft_kv: int) -> float:
        """The proposer after a step: a pass over the step's tokens that drafts the first token
        of ``drafting`` sequences (context ``draft_kv`` tokens in all), then k - 1 passes of one
        token each (ngram: its CPU lookup over those contexts)."""
        if self.method == "ngram":
            return NGRAM_NS_PER_TOKEN * draft_kv * 1e-3
        if self.method == "draft":
            us = self.draft.stage_us(tokens, pre, plain, plain_kv, drafting)[0]
            if drafting:
                decode = self.draft.decode_us
                us += sum(decode(drafting, draft_kv + j * drafting) for j in range(1, self.k))
            return us
        us = self.cost.head_us(tokens, pre, plain, plain_kv, drafting)
        if drafting:
            head = self.cost.head_decode_us
            us += sum(head(drafting, draft_kv + j * drafting) for j in range(1, self.k))
        return us

    def advance(self, blocks, decodes: list, first_end: float, now: float, metrics) -> bool:
        """Apply a finished step to its decodes: draw each draft's accepted run, emit 1 + a
        tokens (at most what the request still needs), keep the KV of the fed token and the
        accepted drafts, free the blocks of rejected ones. True when a request completed."""
        rates, rng, per_pos, bs = self.rates, self.rng, self.accepted_per_pos, blocks.block_size
        completed, gaps = False, []
        for r in decodes:
            d, a = r.drafts, 0
            if d:
                u = rng.random()
                while a < d and u < rates[a]:
                    per_pos[a] += 1
                    a += 1
                self.num_drafts += 1
                self.draft_tokens += d
                self.accepted += a
            gaps.append(first_end - r.last_token_s)
            r.decoded += min(a + 1, r.output - r.decoded)
            r.kv += 1 + a
            r.busy = False
            r.last_token_s = now
            if r.decoded == r.output:
                r.done = completed = True
            elif r.blocks * bs - r.kv >= bs:
                blocks.trim(r, r.blocks - -(-r.kv // bs))
        if gaps:
            metrics.hist["itl_s"].add_many(gaps)
        return completed


def attach(rep, sc, seed: int, draft=None) -> None:
    """Give a replica speculative decoding: its SpecDecoder, and its scheduler the drafts."""
    rep.spec = SpecDecoder(sc.spec, rep.cost, seed, rep.idx, draft)
    rep.scheduler.draft = rep.spec.drafts


def stats(replicas: list) -> dict[str, float]:
    """vLLM's speculative-decoding figures over these replicas (empty without it)."""
    decoders = [r.spec for r in replicas if r.spec is not None]
    if not decoders:
        return {}
    drafts = sum(d.num_drafts for d in decoders)
    draft_tokens = sum(d.draft_tokens for d in decoders)
    accepted = sum(d.accepted for d in decoders)
    out = {"spec_num_drafts": float(drafts), "spec_num_draft_tokens": float(draft_tokens),
           "spec_num_accepted_tokens": float(accepted),
           "spec_acceptance_length_mean": 1 + accepted / drafts if drafts else 1.0,
           "spec_acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0}
    for i in range(decoders[0].k):
        hits = sum(d.accepted_per_pos[i] for d in decoders)
        out[f"spec_acceptance_rate_pos{i}"] = hits / drafts if drafts else 0.0
    return out
