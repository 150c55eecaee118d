"""Operator times for the simulator's hot loop: one (hw, model, tp) shard, looked up in O(1).

This is the interface the simulator uses. ``OpTimes`` answers per-GPU, per-layer times in
microseconds. The backing predictions come from ``predict_fn`` (family, DataFrame of shapes in
profile-table columns) -> array of µs, which the trained estimator provides; without trained
models it falls back to the roofline prior (and says so in ``self.source``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from conf import shapes
from conf.schema import DTYPE_BYTES, HwConf, ModelConf
from estimator import roofline

PredictFn = Callable[[str, pd.DataFrame], np.ndarray]


def roofline_predict(hw: HwConf) -> PredictFn:
    def predict(family: str, df: pd.DataFrame) -> np.ndarray:
        b = DTYPE_BYTES.get(str(df["dtype"].iloc[0]), 2) if len(df) else 2
        if family == "gemm":
            return roofline.gemm_us(df.m, df.n, df.k, hw, b)
        if family == "elementwise":
            return roofline.elementwise_us(df.num_tokens, df.width, hw, b)
        if family == "attention":
            return roofline.attention_us(df.num_q_tokens, df.num_kv_tokens, df.q_kv_product_sum,
                                         df.num_heads, df.num_kv_heads, df.head_dim, hw, b)
        if family == "collective":
            return np.array([float(roofline.collective_us(s, w, hw, op))
                             for s, w, op in zip(df.size_bytes, df.world_size, df.op)])
        raise ValueError(f"no roofline for family {family!r}")
    return predict


class OpTimes:
    """Tabulated per-layer operator times of one model shard on one hardware card."""

    def __init__(self, hw: HwConf, model: ModelConf, tp: int, predict: PredictFn | None = None,
                 max_tokens: int = 16384, source: str | None = None):
        self.hw, self.model, self.tp = hw, model, tp
        self.predict = predict or roofline_predict(hw)
        self.source = source or ("roofline" if predict is None else "estimator")
        self.max_tokens = max_tokens
        self.dtype = model.dtype
        self.nq, self.nkv = shapes.heads_per_gpu(model, tp)
        tokens = np.arange(1, max_tokens + 1)
        self._token_ops = np.concatenate([[0.0], self._tabulate_token_ops(tokens)])
        self._allreduce = np.concatenate([[0.0], self._tabulate_collective(tokens, "all_reduce", tp)])
        self._send_recv = np.concatenate([[0.0], self._tabulate_collective(tokens, "send_recv", 2)])
        self._lm_head = np.concatenate([[0.0], self._tabulate_lm_head(tokens)])

    # --- tabulation -----------------------------------------------------------------
    def _frame(self, **cols) -> pd.DataFrame:
        n = len(next(iter(cols.values())))
        base = dict(hw=self.hw.name, dtype=self.dtype, model=self.model.name, tp=self.tp)
        return pd.DataFrame({**{k: [v] * n for k, v in base.items()}, **cols})

    def _tabulate_token_ops(self, tokens: np.ndarray) -> np.ndarray:
        total = np.zeros(len(tokens))
        for g in shapes.layer_gemms(self.model, self.tp):
            df = self._frame(op=[g.op] * len(tokens), m=tokens, n=g.n, k=g.k)
            total += self.predict("gemm", df)
        for e in shapes.layer_elementwise(self.model, self.tp):
            df = self._frame(op=[e.op] * len(tokens), num_tokens=tokens, width=e.width,
                             num_heads=e.num_heads, num_kv_heads=e.num_kv_heads, head_dim=e.head_dim)
            total += e.per_layer * self.predict("elementwise", df)
        return total

    def _tabulate_collective(self, tokens: np.ndarray, op: str, world: int) -> np.ndarray:
        if world <= 1:
            return np.zeros(len(tokens))
        size = tokens * shapes.activation_bytes_per_token(self.model)
        df = pd.DataFrame(dict(hw=self.hw.name, op=op, dtype=self.dtype, network=self.hw.network,
                               size_bytes=size, world_size=world,
                               devices_per_node=self.hw.devices_per_node))
        per_call = self.predict("collective", df)
        if op == "all_reduce":
            return per_call * shapes.allreduces_per_layer(self.model, self.tp)
        return per_call

    def _tabulate_lm_head(self, tokens: np.ndarray) -> np.ndarray:
        g = shapes.lm_head_gemm(self.model, self.tp)
        return self.predict("gemm", self._frame(op=["lm_head"] * len(tokens), m=tokens, n=g.n, k=g.k))

    def _clip(self, num_tokens: int) -> int:
        return min(int(num_tokens), self.max_tokens)

    def _scaled(self, table: np.ndarray, num_tokens: int) -> float:
        """Lookup; beyond the table, scale linearly (these ops are linear in tokens at that size)."""
        if num_tokens <= self.max_tokens:
            return float(table[num_tokens])
        return float(table[self.max_tokens]) * num_tokens / self.max_tokens

    # --- the simulator's questions ------------------------------------------------------
    def layer_token_ops_us(self, num_tokens: int) -> float:
        """GEMMs, norms, activation, RoPE and residual adds of one layer over num_tokens tokens."""
        return self._scaled(self._token_ops, num_tokens)

    def layer_allreduce_us(self, num_tokens: int) -> float:
        """All TP all-reduces of one layer (0 at tp=1)."""
        return self._scaled(self._allreduce, num_tokens)

    def send_recv_us(self, num_tokens: int) -> float:
        """One pipeline-stage hand-off of num_tokens hidden states."""
        return self._scaled(self._send_recv, num_tokens)

    def lm_head_us(self, num_sequences: int) -> float:
        """LM head over the last token of each sequence that samples this iteration."""
        return self._scaled(self._lm_head, num_sequences)

    def layer_attention_us(self, prefill_q: Sequence[int], prefill_kv: Sequence[int],
                           decode_kv: Sequence[int]) -> float:
        """Attention of one layer: prefill chunks (q_len, kv_len incl. the chunk) and decodes (kv_len)."""
        total = 0.0
        if len(prefill_q):
            q = np.asarray(prefill_q, dtype=np.int64)
            kv = np.asarray(prefill_kv, dtype=np.int64)
            total += float(self.predict("attention", self._attn_frame("prefill", q, kv))[0])
        if len(decode_kv):
            kv = np.asarray(decode_kv, dtype=np.int64)
            total += float(self.predict("attention", self._attn_frame("decode", np.ones_like(kv), kv))[0])
        return total

    def _attn_frame(self, phase: str, q: np.ndarray, kv: np.ndarray) -> pd.DataFrame:
        pairs = int((q * kv).sum())
        return self._frame(op=["attention"], phase=[phase], batch_size=[len(q)],
                           num_q_tokens=[int(q.sum())], num_kv_tokens=[int(kv.sum())],
                           max_q_len=[int(q.max())], max_kv_len=[int(kv.max())],
                           q_kv_product_sum=[pairs], num_heads=[self.nq], num_kv_heads=[self.nkv],
                           head_dim=[self.model.head_dim], block_size=[16])


def load_op_times(hw: HwConf, model: ModelConf, tp: int, quantile: str = "p50",
                  data_dir: str = "data", max_tokens: int = 16384) -> OpTimes:
    """OpTimes for the simulator from the trained estimator of ``hw`` (data/estimators/<hw>).

    Placeholder until the trained predictors land: uses the roofline prior.
    """
    return OpTimes(hw, model, tp, max_tokens=max_tokens)
