"""Batch execution time from the estimator's operator times and the serving engine's profile.

One iteration on one pipeline stage takes ``layers_on_stage * (token ops + all-reduces +
attention)``; the first stage adds the embedding (and its all-reduce at tp > 1) and the
engine's CPU time the GPU waits for (``cpu_per_iteration_us + cpu_per_sequence_us * sequences
+ cpu_per_token_us * tokens``); the last adds the final norm and the LM head, logits gather and
sampler of the sampling sequences; every other stage adds the PP send of its hidden states.

How the engine (``conf/engine``) runs a batch:
- CUDA graphs: a batch that fits a captured graph runs its token ops (GEMMs, norms, activation,
  all-reduces, embedding) at the padded size the graph was captured for; attention runs outside
  vLLM v1's piecewise graphs, on the real tokens. Graphs exist only on GPU cards.
- Tensor-parallel all-reduce: the engine's custom all-reduce below its message-size limit (world
  sizes 2, 4, 6, 8, and all GPUs on one NVLink switch unless tp = 2, as vLLM requires), NCCL above.
- Mixed batches: vLLM v1 runs the prefill and decode attention of a batch in one kernel call, so
  the fixed cost of a call (the attention table at one token) is paid once, not twice.

Decode-only iterations are the hot loop (tens of thousands per simulation, several per event
when fast-forwarding). Their time is linear in the mean KV length inside one cell of a grid over
it (exact below 8, then 4 points per octave), so each (batch size, cell) line is computed once
from the estimator's tables and kept in one memo that hangs off the OpTimes object: repeated
simulations with one OpTimes (the search) stay warm.
"""
from __future__ import annotations

import bisect
import dataclasses
import weakref

from conf import shapes
from conf.schema import DTYPE_BYTES, ModelConf
from conf.shapes import stage_layers

_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CUSTOM_ALLREDUCE_WORLD_SIZES = (2, 4, 6, 8)   # vLLM CustomAllreduce._SUPPORTED_WORLD_SIZES


def _cell(x: float) -> tuple[int, int]:
    """Grid cell (lo, hi) around x >= 1: unit cells below 8, then 4 per octave."""
    xi = int(x)
    if xi < 8:
        return xi, xi + 1
    step = 1 << (xi.bit_length() - 3)
    lo = xi - (xi & (step - 1))
    return lo, lo + step


class BatchCost:
    """Stage times (µs) of batches of one replica, from one OpTimes and one engine profile.

    ``engine`` is a ``sim.config.EngineConf`` (or anything with its fields); without one the
    batch runs eagerly with NCCL all-reduces, split mixed attention and the CPU terms given
    positionally (the pre-profile signature, kept for callers that price forward time only).
    ``graphs`` False turns CUDA graphs off (a CPU card)."""

    def __init__(self, op_times, model: ModelConf, pp: int, cpu_per_iteration_us: float = 0.0,
                 cpu_per_sequence_us: float = 0.0, cpu_per_token_us: float = 0.0, *, engine=None,
                 interconnect: str = "nvswitch", graphs: bool = True):
        self.op = op_times
        self.pp = pp
        self.layers = stage_layers(model.num_layers, pp)
        tp = getattr(op_times, "tp", 1)
        if engine is not None:
            cpu_per_iteration_us = engine.cpu_per_iteration_us
            cpu_per_sequence_us = engine.cpu_per_sequence_us
            cpu_per_token_us = engine.cpu_per_token_us
        self.cpu_iter_us, self.cpu_seq_us, self.cpu_tok_us = cpu_per_iteration_us, cpu_per_sequence_us, cpu_per_token_us
        sizes = sorted(set(engine.cuda_graph_sizes)) if engine is not None and graphs else []
        self.graph_sizes = sizes
        self.graph_max = sizes[-1] if sizes else 0
        self.graph_mixed = bool(engine is not None and engine.graph_mixed_batches)
        self.one_call = engine is not None and engine.mixed_attention == "one_call"
        custom_ok = tp in CUSTOM_ALLREDUCE_WORLD_SIZES and (tp == 2 or interconnect == "nvswitch")
        max_bytes = engine.custom_allreduce_max_bytes if engine is not None and custom_ok else 0
        # custom all-reduce for messages of fewer tokens than this (vLLM: bytes < max_size)
        self.custom_below_tokens = -(-max_bytes // (model.hidden_size * DTYPE_BYTES[model.dtype]))
        self.ar_layer = shapes.allreduces_per_layer(model, tp)
        self._init_sparse(model, pp)
        self.ar_forward = shapes.allreduces_per_forward(model, tp)
        if self.one_call:   # the fixed cost of one attention call: its table value at one token
            self.attn_call_floor_us = min(op_times.decode_attention_us(1, 1),
                                          op_times.layer_attention_us([1], [1], ()))
        key = (tuple(self.layers), tuple(sizes), self.graph_mixed, self.custom_below_tokens,
               self.cpu_iter_us, self.cpu_seq_us, self.cpu_tok_us)
        try:
            memo = _MEMOS.setdefault(op_times, {})
        except TypeError:          # an OpTimes that cannot be weakly referenced: memo per run
            memo = {}
        self._lines: dict[int, tuple[float, float]] = memo.setdefault(key, {})
        self._head_lines: dict[int, tuple[float, float]] = memo.setdefault(key + ("head",), {})

    # --- pieces -------------------------------------------------------------------------
    def padded(self, num_tokens: int, decode_only: bool) -> int:
        """Tokens the token ops run at: the captured graph size a batch is padded to, when the
        engine runs it in a CUDA graph; else the batch's own count."""
        if num_tokens > self.graph_max or not (decode_only or self.graph_mixed):
            return num_tokens
        return self.graph_sizes[bisect.bisect_left(self.graph_sizes, num_tokens)]

    def allreduce_us(self, num_tokens: int) -> float:
        """One TP all-reduce of num_tokens hidden states as the engine runs it."""
        return self.op.allreduce_us(num_tokens, num_tokens < self.custom_below_tokens)

    def attention_us(self, prefills: list[tuple[int, int]], num_decodes: int, decode_kv_sum: int) -> float:
        """One layer's attention: prefill chunks (tokens, KV incl. chunk) and decodes."""
        op = self.op
        t = op.layer_attention_us([q for q, _ in prefills], [kv for _, kv in prefills], ()) if prefills else 0.0
        if num_decodes:
            t += op.decode_attention_us(num_decodes, decode_kv_sum / num_decodes)
            if prefills and self.one_call:
                t -= self.attn_call_floor_us
        return t

    def _ends_us(self, padded: int, num_tokens: int, seqs: int, num_sampled: int, ar_us: float) -> tuple[float, float]:
        """What the first and the last pipeline stage add to their layers: the embedding, its
        all-reduce and the engine's CPU time; the final norm, LM head, logits gather and sampler."""
        op = self.op
        first = (op.embed_us(padded) + self.ar_forward * ar_us + self.cpu_iter_us + self.cpu_seq_us * seqs
                 + self.cpu_tok_us * num_tokens)
        return first, op.final_norm_us(padded) + op.lm_head_us(num_sampled)

    # --- whole batches --------------------------------------------------------------------
    def decode_us(self, num_decodes: int, kv_sum: int) -> float:
        """Time of a decode-only iteration at pp=1 (the hot path, also of fast-forward): the
        memoised line of (batch size, KV cell) at the mean KV length. A pure function of
        (num_decodes, kv_sum), whatever the memo held before."""
        n = num_decodes
        x = kv_sum / n
        k0, k1 = _cell(x)
        key = (n << 32) | k0
        line = self._lines.get(key)
        if line is None:
            op, L = self.op, self.layers[0]
            p = self.padded(n, True)
            ar = self.allreduce_us(p)
            const = (L * (op.layer_token_ops_us(p) + self.ar_layer * ar) + self._mlp_us(0, p, ar)
                     + sum(self._ends_us(p, n, n, n, ar)))
            a0, a1 = op.decode_attention_us(n, k0), op.decode_attention_us(n, k1)
            slope = (a1 - a0) / (k1 - k0)
            line = self._lines[key] = (const + L * (a0 - slope * k0), L * slope)
        return line[0] + line[1] * x

    def stage_us(self, num_tokens: int, prefills: list[tuple[int, int]], num_decodes: int,
                 decode_kv_sum: int, num_sampled: int) -> list[float]:
        """Per-stage times of a batch: prefills as (chunk tokens, KV incl. chunk) pairs."""
        op = self.op
        p = self.padded(num_tokens, not prefills)
        ar = self.allreduce_us(p)
        per_layer = op.layer_token_ops_us(p) + self.ar_layer * ar + self.attention_us(prefills, num_decodes,
                                                                                      decode_kv_sum)
        first, last = self._ends_us(p, num_tokens, len(prefills) + num_decodes, num_sampled, ar)
        out = [layers * per_layer + self._mlp_us(s, p, ar) for s, layers in enumerate(self.layers)]
        out[0] += first
        out[-1] += last
        for s in range(self.pp - 1):
            out[s] += self._send_us(s, num_tokens)
        return out

    def head_us(self, num_tokens: int, prefills: list[tuple[int, int]], num_decodes: int,
                decode_kv_sum: int, num_sampled: int) -> float:
        """One pass of a speculative-decoding head (sim/spec.py: EAGLE, MTP) on the first GPU:
        one decoder layer of this model (its last layer's kind: MoE for an MoE model, as
        DeepSeek's MTP module) between the embedding and the final norm, LM head and sampler."""
        op = self.op
        p = self.padded(num_tokens, not prefills)
        ar = self.allreduce_us(p)
        layer = op.layer_token_ops_us(p) + self.ar_layer * ar + self.attention_us(prefills, num_decodes,
                                                                                  decode_kv_sum)
        if self._mix is not None:
            moe = self._mix[-1][1]
            layer += op.moe_mlp_us(p) + self._moe_ar_delta * ar if moe else op.dense_mlp_us(p)
        return layer + op.embed_us(p) + self.ar_forward * ar + op.final_norm_us(p) + op.lm_head_us(num_sampled)

    def head_decode_us(self, num_decodes: int, kv_sum: int) -> float:
        """head_us of a one-token-per-sequence pass (a proposer's 2nd..k-th), memoised per
        (batch size, KV cell) as decode_us is: exact at the cell's ends, linear between."""
        n = num_decodes
        x = kv_sum / n
        k0, k1 = _cell(x)
        key = (n << 32) | k0
        line = self._head_lines.get(key)
        if line is None:
            a0, a1 = self.head_us(n, [], n, k0 * n, n), self.head_us(n, [], n, k1 * n, n)
            slope = (a1 - a0) / (k1 - k0)
            line = self._head_lines[key] = (a0 - slope * k0, slope)
        return line[0] + line[1] * x

    # --- MoE blocks and node boundaries (models helper) --------------------------------------
    def _init_sparse(self, model: ModelConf, pp: int) -> None:
        """An MoE model's stages differ in their dense/MoE layer mix (priced from the MLP
        tables); a pipeline hand-off that leaves a node goes over the network (the replica's
        GPUs fill nodes stage by stage)."""
        self._mix = shapes.stage_mlp_mix(model, pp) if shapes.is_moe(model) else None
        lay, hw = getattr(self.op, "layout", None), getattr(self.op, "hw", None)
        self._cross = (shapes.stages_cross_node(dataclasses.replace(lay, pp=pp), hw.devices_per_node)
                       if lay is not None and hw is not None else [False] * (pp - 1))
        # ar_layer counts one all-reduce after every MLP; an MoE block without one (DP attention
        # with all-to-all dispatch) gives it back, its own communication is in moe_mlp_us
        self._moe_ar_delta = 0
        if self._mix is not None and lay is not None and self.ar_layer:
            moe_ar = sum(c.op == "all_reduce" for c in shapes.moe_block_collectives(model, lay, 1))
            self._moe_ar_delta = moe_ar - 1

    def _mlp_us(self, stage: int, num_tokens: int, ar_us: float) -> float:
        """The MLP blocks of an MoE model's stage (a dense model's MLP is in its token ops)."""
        if self._mix is None:
            return 0.0
        dense, moe = self._mix[stage]
        op = self.op
        return dense * op.dense_mlp_us(num_tokens) + moe * (op.moe_mlp_us(num_tokens) + self._moe_ar_delta * ar_us)

    def _send_us(self, stage: int, num_tokens: int) -> float:
        if self._cross[stage]:
            return self.op.send_recv_network_us(num_tokens)
        return self.op.send_recv_us(num_tokens)
