"""Batch execution time from the estimator's operator times (``estimator.runtime.OpTimes``).

One iteration on one pipeline stage takes
``layers_on_stage * (token ops + TP all-reduces + attention)`` + the PP send of its hidden
states (all but the last stage) + the LM head (last stage) + the CPU overhead (first stage:
``per_iteration_us + per_sequence_us * sequences + per_token_us * tokens``).

Prefill (and mixed) batches ask the estimator for their attention directly. Decode-only
iterations are the hot loop (tens of thousands per simulation, several per event when
fast-forwarding), so decode attention is read from a memo of the estimator's answers on a
grid (exact below 8, then 4 points per octave) by (batch size, mean KV length), as Vidur does,
interpolated bilinearly; within one grid cell that is a line in the mean KV length, kept
until the batch size or the cell changes. The memo hangs off the OpTimes object, so
repeated simulations with one OpTimes (the search) stay warm.
"""
from __future__ import annotations

import dataclasses
import weakref

from conf import shapes
from conf.schema import ModelConf
from conf.shapes import stage_layers

_MEMOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cell(x: float) -> tuple[int, int, float]:
    """Grid cell (lo, hi, fraction) around x >= 1."""
    xi = int(x)
    if xi < 8:
        return xi, xi + 1, x - xi
    step = 1 << (xi.bit_length() - 3)
    lo = xi - (xi & (step - 1))
    return lo, lo + step, (x - lo) / step


class BatchCost:
    """Stage times (µs) of batches of one replica, from one OpTimes."""

    def __init__(self, op_times, model: ModelConf, pp: int, cpu_per_iteration_us: float,
                 cpu_per_sequence_us: float, cpu_per_token_us: float = 0.0):
        self.op = op_times
        self.pp = pp
        self.layers = stage_layers(model.num_layers, pp)
        self.cpu_iter_us, self.cpu_seq_us = cpu_per_iteration_us, cpu_per_sequence_us
        self.cpu_tok_us = cpu_per_token_us
        self._init_sparse(model, pp)
        try:
            self._dec_memo = _MEMOS.setdefault(op_times, {})
        except TypeError:          # an OpTimes that cannot be weakly referenced: memo per run
            self._dec_memo = {}
        self._dec_const: dict[int, float] = {}
        self._line = (0, 0, 0, 0.0, 0.0)   # (batch, cell lo, cell hi, intercept, slope)

    # --- attention on the memo grid -------------------------------------------------
    def _dec_point(self, b: int, kv: int) -> float:
        v = self._dec_memo.get((b, kv))
        if v is None:
            v = self._dec_memo[(b, kv)] = self.op.layer_attention_us((), (), [kv] * b)
        return v

    def decode_attention_us(self, num_decodes: int, kv_sum: int) -> float:
        """One layer's decode attention over num_decodes sequences holding kv_sum KV tokens."""
        b0, b1, fb = _cell(num_decodes)
        k0, k1, fk = _cell(kv_sum / num_decodes)
        p = self._dec_point
        lo = p(b0, k0) + (p(b0, k1) - p(b0, k0)) * fk
        if fb == 0.0:
            return lo
        hi = p(b1, k0) + (p(b1, k1) - p(b1, k0)) * fk
        return lo + (hi - lo) * fb

    # --- whole batches --------------------------------------------------------------------
    def decode_us(self, num_decodes: int, kv_sum: int) -> float:
        """Time of a decode-only iteration at pp=1 (the hot path, also of fast-forward).

        Within one grid cell the interpolated time is linear in the mean KV length, so the
        line's coefficients are kept until the batch size or the cell changes. The value is a
        pure function of (num_decodes, kv_sum), whatever was cached before."""
        x = kv_sum / num_decodes
        line = self._line
        if num_decodes == line[0] and line[1] <= x < line[2]:
            return line[3] + line[4] * x
        n, L, op = num_decodes, self.layers[0], self.op
        const = self._dec_const.get(n)
        if const is None:
            const = self._dec_const[n] = (L * (op.layer_token_ops_us(n) + op.layer_allreduce_us(n))
                                          + self._mlp_us(0, n)
                                          + op.lm_head_us(n) + self.cpu_iter_us + (self.cpu_seq_us + self.cpu_tok_us) * n)
        b0, b1, fb = _cell(n)
        k0, k1, _ = _cell(x)
        p = self._dec_point
        s0 = (p(b0, k1) - p(b0, k0)) / (k1 - k0)
        a, slope = p(b0, k0) - s0 * k0, s0
        if fb:
            s1 = (p(b1, k1) - p(b1, k0)) / (k1 - k0)
            a = a * (1 - fb) + (p(b1, k0) - s1 * k0) * fb
            slope = slope * (1 - fb) + s1 * fb
        line = self._line = (n, k0, k1, const + L * a, L * slope)
        return line[3] + line[4] * x

    def stage_us(self, num_tokens: int, prefills: list[tuple[int, int]], num_decodes: int,
                 decode_kv_sum: int, num_sampled: int) -> list[float]:
        """Per-stage times of a batch: prefills as (chunk tokens, KV incl. chunk) pairs."""
        op = self.op
        attn = op.layer_attention_us([q for q, _ in prefills], [kv for _, kv in prefills], ()) if prefills else 0.0
        if num_decodes:
            attn += self.decode_attention_us(num_decodes, decode_kv_sum)
        per_layer = op.layer_token_ops_us(num_tokens) + op.layer_allreduce_us(num_tokens) + attn
        seqs = len(prefills) + num_decodes
        last = self.pp - 1
        out = []
        for s, layers in enumerate(self.layers):
            t = layers * per_layer + self._mlp_us(s, num_tokens)
            t += op.lm_head_us(num_sampled) if s == last else self._send_us(s, num_tokens)
            if s == 0:
                t += self.cpu_iter_us + self.cpu_seq_us * seqs + self.cpu_tok_us * num_tokens
            out.append(t)
        return out

    # --- MoE blocks and node boundaries (models helper) --------------------------------------
    def _init_sparse(self, model: ModelConf, pp: int) -> None:
        """An MoE model's stages differ in their dense/MoE layer mix; a pipeline hand-off that
        leaves a node goes over the network (the replica's GPUs fill nodes stage by stage)."""
        self._mix = shapes.stage_mlp_mix(model, pp) if shapes.is_moe(model) else None
        lay, hw = getattr(self.op, "layout", None), getattr(self.op, "hw", None)
        self._cross = (shapes.stages_cross_node(dataclasses.replace(lay, pp=pp), hw.devices_per_node)
                       if lay is not None and hw is not None else [False] * (pp - 1))

    def _mlp_us(self, stage: int, num_tokens: int) -> float:
        """The MLP blocks of an MoE model's stage (a dense model's MLP is in its token ops)."""
        if self._mix is None:
            return 0.0
        dense, moe = self._mix[stage]
        op = self.op
        return dense * op.dense_mlp_us(num_tokens) + moe * op.moe_mlp_us(num_tokens)

    def _send_us(self, stage: int, num_tokens: int) -> float:
        if self._cross[stage]:
            return self.op.send_recv_network_us(num_tokens)
        return self.op.send_recv_us(num_tokens)
