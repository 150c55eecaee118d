"""Operator times for the simulator's hot loop: one (hw, model, tp) shard, looked up in O(1).

This is the interface the simulator uses. ``OpTimes`` answers per-GPU, per-layer times in
microseconds. ``__init__`` asks ``predict(family, DataFrame of shapes in profile-table columns)
-> µs`` once per table, vectorised (token tables for 1..max_tokens, an attention grid), so no
call in the hot loop touches XGBoost or pandas. ``load_op_times`` backs it with the trained
predictors of ``data/estimators/<hw>`` (roofline prior where a family has none) and caches the
tables on disk under ``data/cache/optimes`` keyed by the model files, hw, model, tp and quantile.
A run that finds its tables there loads neither XGBoost nor pandas. The tables cover a grid far
wider than most workloads reach, so range warnings are about what a run looked up
(``warn_outside_trained``, estimator/ranges.py), not about the grid.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from conf import shapes, warn_once
from conf.files import atomic_write
from conf.schema import DTYPE_BYTES, HwConf, ModelConf
from estimator import roofline
from estimator.fingerprint import cache_fingerprint
from estimator.roofline import predict_fn as roofline_predict

if TYPE_CHECKING:    # the simulator's cached path loads neither pandas nor XGBoost
    import pandas as pd

    from estimator.predictors import Predictors

PredictFn = Callable[[str, "pd.DataFrame"], np.ndarray]
KnowsFn = Callable[[str, str], bool]   # (family, op name) -> the predictor has rows for it

# Attention grid: values at 2**(i / STEPS) per axis, interpolated linearly in log-log space.
# Octaves: the profiles measure batches, query and KV lengths at powers of two, and trees are
# step functions between measured points (quarter-octave points gave 8% median / 25% p90 lookup
# error against measured H100 decode rows, octaves follow the model at the measured points).
GRID_STEPS = 1
DECODE_MAX_BATCH_LOG2, PREFILL_MAX_BATCH_LOG2 = 12, 8
MAX_Q_LOG2, MAX_KV_LOG2 = 15, 17
PREFILL_BATCH_STEPS = 1
# bump when the tabulation (or how a model prices, e.g. estimator/anchors.py) changes, so old
# disk caches are not reused
GRID_VERSION = 14

# An MoE model's MLP parts, tabulated apart from the other token ops.
MLP_GEMMS = ("gate_up_proj", "up_proj", "down_proj")
MLP_ACTIVATIONS = ("silu_mul", "gelu")


def network_collective_us(hw: HwConf, op: str, size_bytes, world: int) -> np.ndarray:
    """A collective over GPUs in several nodes, on the inter-node network (the card's
    ``network_bw_gbps`` per GPU, one direction, and ``network_latency_us`` per hop): the
    measured collective tables stop at one node. Ring all-reduce moves 2(n-1)/n of the buffer
    in 2(n-1) hops, all-gather/reduce-scatter (n-1)/n in n-1; an all-to-all sends the share
    bound for other nodes, 1 - devices_per_node/n, at once; send/recv moves it once."""
    size = np.asarray(size_bytes, float)
    n = float(world)
    frac, hops = {"all_reduce": (2 * (n - 1) / n, 2 * (n - 1)),
                  "all_gather": ((n - 1) / n, n - 1), "reduce_scatter": ((n - 1) / n, n - 1),
                  "all_to_all": (max(0.0, 1 - hw.devices_per_node / n), 1.0),
                  "send_recv": (1.0, 1.0)}[op]
    return np.maximum(size * frac / (hw.network_bw_gbps * 1e3) + hops * hw.network_latency_us,
                      roofline.MIN_KERNEL_US)


def monotone(t: np.ndarray, axis: int = -1) -> np.ndarray:
    """``t`` made non-decreasing along ``axis``: halfway between its upper envelope (running
    maximum) and lower envelope (suffix minimum, what padding to a cheaper larger shape gives).

    Why it stays: measured kernels are not monotone (cuBLAS/FlashAttention pick kernels per
    shape: 10% of H100 vLLM GEMM rows are >10% slower than a larger m), so learned tables are not
    either, and XGBoost monotone constraints cost far more accuracy (estimator/README.md). On H100
    (median/p90 APE) GEMM k-fold: raw 3.0/9.7%, this 3.3/10.9%, running max alone 3.7/12.7% (+1.7%
    bias); decode-grid lookups vs measured rows: raw 5.3/23.2%, this 5.9/16.5%, suffix min alone
    6.4/30.9% (it pulls cells down to tree artifacts in unmeasured corners).
    """
    upper = np.maximum.accumulate(t, axis=axis)
    lower = np.flip(np.minimum.accumulate(np.flip(t, axis=axis), axis=axis), axis=axis)
    return 0.5 * (upper + lower)


def _axis(max_log2: int, steps: int) -> np.ndarray:
    return 2.0 ** (np.arange(max_log2 * steps + 1) / steps)


def _pos(x: float, steps: int, n: int) -> tuple[int, float, float]:
    """Grid cell, fraction inside it, and a linear scale factor for x beyond the last point."""
    if x <= 1.0:
        return 0, 0.0, 1.0
    f = math.log2(x) * steps
    if f >= n - 1:
        return n - 2, 1.0, x / 2.0 ** ((n - 1) / steps)
    i = int(f)
    return i, f - i, 1.0


class OpTimes:
    """Tabulated per-layer operator times of one model shard on one hardware card."""

    def __init__(self, hw: HwConf, model: ModelConf, tp: int, predict: PredictFn | None = None,
                 max_tokens: int = 16384, source: str | None = None, cache_path: str | Path | None = None,
                 knows: KnowsFn | None = None, layout: shapes.Layout | None = None,
                 meta: dict | None = None, tables: dict | None = None):
        self.hw, self.model, self.tp = hw, model, tp
        self.layout = layout or shapes.layout(model, tp)
        if self.layout.tp != tp:
            raise ValueError(f"layout {self.layout} is not at tp={tp}")
        self.predict = predict or roofline_predict(hw)
        self.source = source or ("roofline" if predict is None else "estimator")
        # Ops the predictor has no rows for are priced by the roofline prior (elementwise) or by
        # the nearest measured op (custom all-reduce -> NCCL); None: it knows every op.
        self.knows = knows or (lambda family, op: True)
        self.roofline = roofline_predict(hw)
        self.max_tokens = max_tokens
        self.dtype = model.dtype  # activations, norms, collectives, LM head
        self.nq, self.nkv = shapes.heads_per_gpu(model, tp)
        # meta: source, fallback/fleet families and trained shape ranges (load_op_times), plus
        # each family's tabulated column extents; kept in the cache file with the tables.
        self.meta = dict(meta or {})
        # The largest lookups of this object's life: what the workloads actually asked for.
        self.queried = dict.fromkeys(("tokens", "sampled", "send_tokens", "decode_batch", "decode_kv",
                                      "decode_kv_sum", "prefill_batch", "prefill_q", "prefill_q_sum",
                                      "prefill_kv", "prefill_kv_sum", "prefill_pairs"), 0)
        if tables is None and cache_path:
            tables = _load_npz(cache_path)
        if tables is not None and "meta_json" in tables:
            self.meta = json.loads(str(tables["meta_json"]))
            self.source = self.meta.get("source", self.source)
        if tables is None:
            tables = self._tabulate()
            if cache_path:
                try:
                    _save_npz(cache_path, tables)
                except OSError as exc:  # a read-only data dir: work uncached
                    warn_once(("cache", str(cache_path)), f"cannot cache operator tables at {cache_path}: {exc}",
                              "estimator")
        self._token_ops, self._send_recv = tables["token_ops"], tables["send_recv"]
        self._allreduce, self._custom_allreduce = tables["allreduce"], tables["custom_allreduce"]
        self._embed, self._final_norm, self._lm_head = tables["embed"], tables["final_norm"], tables["lm_head"]
        self._send_recv_net = tables["send_recv_network"]
        self._dense_mlp, self._moe_mlp = tables["dense_mlp"], tables["moe_mlp"]
        # Scalar lookups on Python lists are several times faster than on numpy arrays.
        self._decode = tables["decode_log_us"].tolist()
        self._prefill = tables["prefill_log_us"].tolist()

    # --- tabulation -----------------------------------------------------------------
    def _tabulate(self) -> dict[str, np.ndarray]:
        from estimator.ranges import recording
        predict = self.predict
        self.predict, extents = recording(predict)
        try:
            tables = self._tabulate_tables()
        finally:
            self.predict = predict
        self.meta = dict(self.meta, source=self.source, tabulated=extents)
        return dict(tables, meta_json=np.array(json.dumps(self.meta, sort_keys=True)))

    def _tabulate_tables(self) -> dict[str, np.ndarray]:
        # Predict every count up to 1024 and every 16th beyond (profiles step by 8-32 tokens there),
        # then interpolate: 8x fewer model rows at max_tokens=16384, so a cold load stays ~1 s.
        n = self.max_tokens
        tokens = np.unique(np.concatenate([np.arange(1, min(n, 1024) + 1), np.arange(1024, n + 1, 16), [n]]))
        everyone = np.arange(1, n + 1)
        def table(values):  # index = tokens; more tokens never cost less (see monotone)
            return np.concatenate([[0.0], monotone(np.interp(everyone, tokens, values))])
        hidden = self.model.hidden_size
        return dict(token_ops=table(self._tabulate_token_ops(tokens)),
                    allreduce=table(self._tabulate_collective(tokens, "all_reduce", self.tp)),
                    custom_allreduce=table(self._tabulate_collective(tokens, "custom_all_reduce", self.tp)),
                    send_recv=table(self._tabulate_collective(tokens, "send_recv", 2)),
                    embed=table(self._elementwise(shapes.Elementwise("embedding", hidden), tokens)),
                    final_norm=table(self._elementwise(shapes.Elementwise(self.model.norm, hidden), tokens)),
                    lm_head=table(self._tabulate_lm_head(tokens)),
                    decode_log_us=self._tabulate_decode(), prefill_log_us=self._tabulate_prefill(),
                    **self._tabulate_sparse(tokens, table))

    def _frame(self, dtype: str | None = None, **cols) -> "pd.DataFrame":
        import pandas as pd
        n = max(len(v) for v in cols.values() if np.ndim(v))
        base = dict(hw=self.hw.name, dtype=dtype or self.dtype, model=self.model.name, tp=self.tp)
        return pd.DataFrame({**{k: [v] * n for k, v in base.items()}, **cols})

    def _tabulate_token_ops(self, tokens: np.ndarray) -> np.ndarray:
        """Every token op of a layer. An MoE model's MLP blocks are tabulated apart (dense_mlp,
        moe_mlp: the layer mix differs per stage); MLA's projections, RoPE and KV-cache write
        are inside the ``mla`` module priced with attention."""
        m = self.model
        gemms = shapes.layer_gemms(m, self.tp)
        ops = shapes.engine_layer_elementwise(m, self.tp)
        if shapes.is_moe(m):
            gemms = [g for g in gemms if g.op not in MLP_GEMMS]
            ops = [e for e in ops if e.op not in MLP_ACTIVATIONS]
        if shapes.is_mla(m):
            gemms = [g for g in gemms if g.op in MLP_GEMMS]
            ops = [e for e in ops if e.op not in ("rope", "kv_cache_write")]
        return self._gemms_us(tokens, gemms) + sum((e.per_layer * self._elementwise(e, tokens) for e in ops),
                                                   np.zeros(len(tokens)))

    def _gemms_us(self, tokens: np.ndarray, gemms: list) -> np.ndarray:
        if not gemms:
            return np.zeros(len(tokens))
        # fp8 weights (vLLM --quantization fp8) for the layer GEMMs; the router stays 16 bit
        wdt = shapes.weight_dtype(self.model)
        import pandas as pd
        frame = pd.concat([self._frame(dtype=self.dtype if g.op == "router" else wdt, op=[g.op] * len(tokens),
                                       m=tokens, n=g.n, k=g.k) for g in gemms])
        return self.predict("gemm", frame).reshape(len(gemms), len(tokens)).sum(axis=0)

    # --- MoE / MLA / expert parallelism / nodes (models helper) ------------------------------
    def _tabulate_sparse(self, tokens: np.ndarray, table) -> dict[str, np.ndarray]:
        """An MoE model's MLP blocks, and pipeline hand-offs between nodes."""
        zeros = table(np.zeros(len(tokens)))
        sparse = shapes.is_moe(self.model)
        has_dense = sparse and not all(shapes.moe_layer_flags(self.model))
        return dict(dense_mlp=table(self._tabulate_dense_mlp(tokens)) if has_dense else zeros,
                    moe_mlp=table(self._tabulate_moe_mlp(tokens)) if sparse else zeros,
                    send_recv_network=table(self._tabulate_send_recv_network(tokens)))

    def _activation_op(self, width: int) -> shapes.Elementwise:
        m = self.model
        return shapes.Elementwise("silu_mul" if m.gated_mlp else m.activation, width)

    def _tabulate_dense_mlp(self, tokens: np.ndarray) -> np.ndarray:
        """A dense layer's MLP in an MoE model (ffn_size, split over the attention tp); its
        all-reduce is the caller's (sim/costs.py prices the engine's all-reduce)."""
        m, tp = self.model, self.tp
        return self._gemms_us(tokens, shapes.mlp_gemms(m, tp)) + \
            self._elementwise(self._activation_op(m.ffn_size // tp), tokens)

    def _tabulate_moe_mlp(self, tokens: np.ndarray) -> np.ndarray:
        """One MoE block for ``tokens`` tokens on each attention rank: router, shared experts,
        the fused routed experts and the dispatch/combine communication (its TP all-reduce, if
        any, is the caller's, as after a dense MLP).

        The fused-experts kernel is asked as aiconfigurator measures it: ``num_tokens`` = the
        tokens a GPU sees (every DP rank's under DP attention: ranks are assumed equally loaded,
        as vLLM's DP load balancer aims and its lock-step MoE layers require), its share of
        ``num_experts / ep`` experts, each split ``moe_tp`` ways. The busiest EP rank gets
        ``imbalance`` x its balanced share of routed tokens, and the step waits for it."""
        m, lay = self.model, self.layout
        t = self._gemms_us(tokens, shapes.moe_block_gemms(m, self.tp))
        if m.num_shared_experts:
            t += self._elementwise(self._activation_op(shapes.shared_expert_ffn(m) // self.tp), tokens)
        seen = tokens * lay.dp * (lay.imbalance if lay.ep > 1 else 1.0)
        frame = self._frame(op=self._moe_op(), num_tokens=seen, hidden_size=m.hidden_size,
                            ffn_size=shapes.expert_ffn(m), num_experts=m.num_experts,
                            top_k=m.experts_per_token, ep=lay.ep, tp=lay.moe_tp)
        frame["dtype"] = shapes.weight_dtype(m)
        t += self.predict("moe", frame)
        calls = [c for c in shapes.moe_block_collectives(m, lay, tokens) if c.op != "all_reduce"]
        return t + self._collectives_us(calls)

    def _moe_op(self) -> str:
        """The fused-MoE rows of the layout's routing distribution; where this GPU's tables lack
        it, the first one they hold going towards balanced (then any other), said once."""
        want = f"moe_{self.layout.expert_routing}"
        if self.knows("moe", want):
            return want
        order = shapes.EXPERT_ROUTINGS[shapes.EXPERT_ROUTINGS.index(self.layout.expert_routing):] + \
            shapes.EXPERT_ROUTINGS
        have = next((f"moe_{r}" for r in order if self.knows("moe", f"moe_{r}")), want)
        warn_once(("moe-routing", self.hw.name, want), f"hw={self.hw.name}: no {want} rows; the MoE "
                  f"experts are priced from {have} (parallel.expert_routing)", "estimator")
        return have

    def _collectives_us(self, calls: list) -> np.ndarray:
        """Sum of collectives (sizes: one per tabulated token count)."""
        return sum((self._collective(c.op, np.asarray(c.size_bytes, float), c.world_size) for c in calls), 0.0)

    def _tabulate_send_recv_network(self, tokens: np.ndarray) -> np.ndarray:
        """A pipeline hand-off between nodes (InfiniBand/RoCE, the card's network fields)."""
        if self.layout.pp == 1 or self.hw.devices_per_node >= self.layout.gpus:
            return np.zeros(len(tokens))
        if not self._network_known():
            return self._tabulate_collective(tokens, "send_recv", 2)
        size = tokens * shapes.activation_bytes_per_token(self.model)
        return network_collective_us(self.hw, "send_recv", size, 2)

    def _network_known(self) -> bool:
        """Whether the card gives its inter-node network; without it, traffic between nodes is
        priced as within a node (the measured tables), with a warning."""
        if self.hw.network_bw_gbps > 0:
            return True
        warn_once(("no-network", self.hw.name),
                  f"hw {self.hw.name}: network_bw_gbps is not set; a layout of {self.layout.gpus} GPUs spans "
                  f"nodes of {self.hw.devices_per_node}, and its traffic between nodes is priced as within a node",
                  "estimator")
        return False

    def _elementwise(self, e: shapes.Elementwise, tokens: np.ndarray) -> np.ndarray:
        """µs of elementwise op ``e`` at each token count; the roofline prior where the predictor
        has no rows for the op (vLLM's fused and cache ops until they are profiled)."""
        frame = self._frame(op=[e.op] * len(tokens), num_tokens=tokens, width=e.width,
                            num_heads=e.num_heads, num_kv_heads=e.num_kv_heads, head_dim=e.head_dim)
        return (self.predict if self.knows("elementwise", e.op) else self.roofline)("elementwise", frame)

    def _collective(self, op: str, size_bytes: np.ndarray, world: int) -> np.ndarray:
        """µs of one collective per message size. vLLM's custom all-reduce is priced from its own
        CUDA-graph rows where the predictor has them, else from the NCCL all-reduce rows (what
        opcast priced before those rows existed); other unmeasured ops use the roofline prior."""
        if world <= 1:
            return np.zeros(len(size_bytes))
        if world > max(1, self.hw.devices_per_node) and self._network_known():   # spans nodes (models helper)
            return network_collective_us(self.hw, op.replace("custom_", ""), size_bytes, world)
        if op == "custom_all_reduce" and not self.knows("collective", op):
            op = "all_reduce"
        import pandas as pd
        df = pd.DataFrame(dict(hw=self.hw.name, op=op, dtype=self.dtype, network=self.hw.network,
                               size_bytes=size_bytes, world_size=world, cuda_graph=True,
                               devices_per_node=self.hw.devices_per_node))
        return (self.predict if self.knows("collective", op) else self.roofline)("collective", df)

    def _tabulate_collective(self, tokens: np.ndarray, op: str, world: int) -> np.ndarray:
        """One collective of ``tokens`` hidden states (all-reduce, or a pipeline hand-off)."""
        return self._collective(op, tokens * shapes.activation_bytes_per_token(self.model), world)

    def _tabulate_lm_head(self, tokens: np.ndarray) -> np.ndarray:
        """LM head GEMM over the sampled sequences, the all-gather of the vocabulary-sharded logits
        at tp > 1 (vLLM v1's LogitsProcessor; v0 gathers to one rank, the same bytes), and the
        sampler over the full vocabulary."""
        g = shapes.lm_head_gemm(self.model, self.tp)
        t = self.predict("gemm", self._frame(op=["lm_head"] * len(tokens), m=tokens, n=g.n, k=g.k))
        logits_bytes = tokens * self.model.vocab_size * DTYPE_BYTES[self.dtype]
        t = t + self._collective("all_gather", logits_bytes, self.tp)
        return t + self._elementwise(shapes.Elementwise("sampler", self.model.vocab_size), tokens)

    def _attn_grid(self, phase: str, batch: np.ndarray, q: np.ndarray, kv_per_q: np.ndarray) -> np.ndarray:
        """log µs over batch x mean q x (q-weighted mean kv / mean q), for uniform batches.

        The kv/q ratio axis starts at 1 (full prefills, where the profiles are measured) so
        those lookups never interpolate through chunked-prefill corners the data lacks.
        """
        b, qq, rr = (a.ravel() for a in np.meshgrid(batch, q, kv_per_q, indexing="ij"))
        kk = qq * rr
        frame = self._frame(dtype=shapes.kv_dtype(self.model), op=["attention"] * len(b), phase=[phase] * len(b),
                            batch_size=b,
                            num_q_tokens=b * qq, num_kv_tokens=b * kk, max_q_len=qq, max_kv_len=kk,
                            q_kv_product_sum=b * qq * kk, num_heads=self.nq, num_kv_heads=self.nkv,
                            head_dim=self.model.head_dim, block_size=16)
        family = "attention"
        if shapes.is_mla(self.model):   # the whole MLA module (projections + attention), per GPU
            m, family = self.model, "mla"
            # fp8 MLA checkpoints (DeepSeek) are 128x128 block-scaled: the tables' fp8_block rows
            wdt = "fp8_block" if shapes.weight_dtype(m) == "fp8" else shapes.weight_dtype(m)
            frame = frame.assign(op="mla", dtype=shapes.kv_dtype(m), weight_dtype=wdt, attn_dtype=m.dtype,
                                 hidden_size=m.hidden_size, q_lora_rank=m.q_lora_rank,
                                 kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                                 qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, block_size=64)
        t = np.log(np.maximum(self.predict(family, frame), 1e-3)).reshape(len(batch), len(q), len(kv_per_q))
        for axis in range(3):  # more sequences, queries or keys never cost less (each pass keeps the earlier)
            t = monotone(t, axis)
        return t

    def _tabulate_decode(self) -> np.ndarray:
        return self._attn_grid("decode", _axis(DECODE_MAX_BATCH_LOG2, GRID_STEPS), np.ones(1),
                               _axis(MAX_KV_LOG2, GRID_STEPS))[:, 0, :]

    def _tabulate_prefill(self) -> np.ndarray:
        return self._attn_grid("prefill", _axis(PREFILL_MAX_BATCH_LOG2, PREFILL_BATCH_STEPS),
                               _axis(MAX_Q_LOG2, GRID_STEPS), _axis(MAX_KV_LOG2, GRID_STEPS))

    def _scaled(self, table: np.ndarray, num_tokens: int) -> float:
        """Lookup; beyond the table, scale linearly (these ops are linear in tokens at that size)."""
        if num_tokens <= self.max_tokens:
            return float(table[num_tokens])
        return float(table[self.max_tokens]) * num_tokens / self.max_tokens

    # --- the simulator's questions ------------------------------------------------------
    def layer_token_ops_us(self, num_tokens: int) -> float:
        """GEMMs and the elementwise ops vLLM runs in one layer (fused residual-add + norms,
        activation, RoPE, KV-cache write) over num_tokens tokens."""
        if num_tokens > self.queried["tokens"]:
            self.queried["tokens"] = num_tokens
        return self._scaled(self._token_ops, num_tokens)

    def allreduce_us(self, num_tokens: int, custom: bool = False) -> float:
        """One TP all-reduce of num_tokens hidden states (0 at tp=1): NCCL, or the engine's
        custom all-reduce (the caller decides which by message size)."""
        return self._scaled(self._custom_allreduce if custom else self._allreduce, num_tokens)

    def send_recv_us(self, num_tokens: int) -> float:
        """One pipeline-stage hand-off of num_tokens hidden states."""
        if num_tokens > self.queried["send_tokens"]:
            self.queried["send_tokens"] = num_tokens
        return self._scaled(self._send_recv, num_tokens)

    def send_recv_network_us(self, num_tokens: int) -> float:
        """A pipeline hand-off of num_tokens hidden states between nodes."""
        return self._scaled(self._send_recv_net, num_tokens)

    def dense_mlp_us(self, num_tokens: int) -> float:
        """The MLP of one dense layer of an MoE model, without its all-reduce (0 for dense
        models, whose MLP is in layer_token_ops_us)."""
        return self._scaled(self._dense_mlp, num_tokens)

    def moe_mlp_us(self, num_tokens: int) -> float:
        """One MoE block (router, shared and routed experts, dispatch/combine; not a TP
        all-reduce) when num_tokens tokens sit on each attention rank."""
        return self._scaled(self._moe_mlp, num_tokens)

    def embed_us(self, num_tokens: int) -> float:
        """Token embedding lookup of one forward (its all-reduce at tp > 1 is the caller's)."""
        return self._scaled(self._embed, num_tokens)

    def final_norm_us(self, num_tokens: int) -> float:
        """The norm after the last layer, over every token of the forward."""
        return self._scaled(self._final_norm, num_tokens)

    def lm_head_us(self, num_sequences: int) -> float:
        """LM head, logits gather (tp > 1) and sampler over the sequences that sample this iteration."""
        if num_sequences > self.queried["sampled"]:
            self.queried["sampled"] = num_sequences
        return self._scaled(self._lm_head, num_sequences)

    def decode_attention_us(self, batch: float, mean_kv: float) -> float:
        """One layer's attention of ``batch`` decodes whose KV lengths average ``mean_kv``."""
        return self._lookup2(batch, mean_kv)

    def layer_attention_us(self, prefill_q: Sequence[int], prefill_kv: Sequence[int],
                           decode_kv: Sequence[int]) -> float:
        """Attention of one layer: prefill chunks (q_len, kv_len incl. the chunk) and decodes (kv_len).

        A batch is priced as the uniform batch with the same sequences, query tokens and
        query-key pairs (mean q, q-weighted mean kv), read from the precomputed grid.
        Beyond the grid (q > 2^15, kv > 2^17, batch > 2^12 decode / 2^8 prefill) it scales linearly.
        """
        total = 0.0
        n = len(prefill_q)
        if n:
            q_sum = float(sum(prefill_q))
            if q_sum > 0:
                pairs = float(sum(q * kv for q, kv in zip(prefill_q, prefill_kv)))
                q_mean = q_sum / n
                self._see_prefill(n, q_mean, q_sum, pairs)
                total += self._lookup3(n, q_mean, pairs / q_sum / q_mean)
        n = len(decode_kv)
        if n:
            total += self._lookup2(n, float(sum(decode_kv)) / n)
        return total

    def _see_prefill(self, n: int, q_mean: float, q_sum: float, pairs: float) -> None:
        """Record a prefill lookup as the uniform batch it is priced as (see _attn_grid)."""
        seen, kv_mean = self.queried, pairs / q_sum
        for key, value in (("prefill_batch", n), ("prefill_q", q_mean), ("prefill_q_sum", q_sum),
                           ("prefill_kv", kv_mean), ("prefill_kv_sum", n * kv_mean),
                           ("prefill_pairs", pairs)):
            if value > seen[key]:
                seen[key] = value

    def warn_outside_trained(self) -> None:
        """Warn (once per process, family and columns) where this object's lookups so far left
        the shape range its predictors were trained on (estimator/ranges.py)."""
        from estimator.ranges import warn_outside_trained
        warn_outside_trained(self)

    def _lookup2(self, batch: float, kv: float) -> float:
        seen = self.queried          # every decode lookup comes here
        if batch > seen["decode_batch"]:
            seen["decode_batch"] = batch
        if kv > seen["decode_kv"]:
            seen["decode_kv"] = kv
        if batch * kv > seen["decode_kv_sum"]:
            seen["decode_kv_sum"] = batch * kv
        t = self._decode
        i, fi, si = _pos(batch, GRID_STEPS, len(t))
        j, fj, sj = _pos(kv, GRID_STEPS, len(t[0]))
        r0, r1 = t[i], t[i + 1]
        v = ((1 - fi) * ((1 - fj) * r0[j] + fj * r0[j + 1]) + fi * ((1 - fj) * r1[j] + fj * r1[j + 1]))
        return math.exp(v) * si * sj

    def _lookup3(self, batch: float, q: float, kv_per_q: float) -> float:
        t = self._prefill
        i, fi, si = _pos(batch, PREFILL_BATCH_STEPS, len(t))
        j, fj, sj = _pos(q, GRID_STEPS, len(t[0]))
        l, fl, sl = _pos(kv_per_q, GRID_STEPS, len(t[0][0]))
        v = 0.0
        for a, wa in ((i, 1 - fi), (i + 1, fi)):
            for b, wb in ((j, 1 - fj), (j + 1, fj)):
                row = t[a][b]
                v += wa * wb * ((1 - fl) * row[l] + fl * row[l + 1])
        return math.exp(v) * si * sj * sl


def _load_npz(path) -> dict[str, np.ndarray] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError):
        return None  # a torn or foreign file: rebuild it


def _save_npz(path, tables: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a path
            np.savez(fh, **tables)
    atomic_write(path, write)


def cache_key(fingerprint: str, hw: HwConf, model: ModelConf, tp: int, quantile: str, max_tokens: int,
              layout: shapes.Layout | None = None) -> str:
    lay = dataclasses.asdict(layout or shapes.Layout(tp))
    blob = json.dumps([fingerprint, dataclasses.asdict(hw), dataclasses.asdict(model), tp, quantile, max_tokens, lay,
                       GRID_VERSION, GRID_STEPS, DECODE_MAX_BATCH_LOG2, PREFILL_MAX_BATCH_LOG2, MAX_Q_LOG2,
                       MAX_KV_LOG2, PREFILL_BATCH_STEPS], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def check_dtypes(preds: Predictors, model: ModelConf) -> None:
    """model.weight_dtype prices GEMMs and model.kv_dtype attention: each must be a known dtype
    with rows for this GPU (16-bit float16/bfloat16 stand for each other: same width, same kernels)."""
    from estimator.features import EstimatorError
    for family, field, dtype in (("gemm", "model.weight_dtype", shapes.weight_dtype(model)),
                                 ("attention", "model.kv_dtype", shapes.kv_dtype(model))):
        if dtype not in DTYPE_BYTES:
            raise EstimatorError(f"{field}={dtype!r} is not a known dtype; known: {', '.join(DTYPE_BYTES)}")
        if family not in preds.trained or (family == "attention" and shapes.is_mla(model)):
            continue  # roofline prior: any known dtype; MLA attention is the mla family
        have = preds.dtypes(family)
        if DTYPE_BYTES[dtype] not in {DTYPE_BYTES.get(d) for d in have}:
            raise EstimatorError(f"{field}={dtype}: hw={preds.hw.name} has no {dtype} {family} rows; "
                                 f"{family} rows exist for {', '.join(have) or 'no dtype'}")


def load_op_times(hw: HwConf, model: ModelConf, tp: int, quantile: str = "p50",
                  data_dir: str = "data", max_tokens: int = 16384,
                  layout: shapes.Layout | None = None) -> OpTimes:
    """OpTimes for the simulator from the trained estimator of ``hw`` (data/estimators/<hw>).

    Families without a trained model use the roofline prior; with no trained model for ``hw``
    at all, everything does and one warning says so. Tables are cached in data/cache/optimes,
    keyed by the content of every model file that can price ``hw``; a cached table is used
    without loading the predictors (no XGBoost, no pandas: a third of a small run's time).
    """
    shapes.check_tp(model, tp)
    cache_dir = Path(data_dir) / "cache" / "optimes"
    fingerprint = cache_fingerprint(hw, data_dir)
    if fingerprint:   # the warm path: the dtype checks passed when these tables were made
        tables = _load_npz(cache_dir / f"{cache_key(fingerprint, hw, model, tp, quantile, max_tokens, layout)}.npz")
        if tables is not None and "meta_json" in tables:
            ot = OpTimes(hw, model, tp, max_tokens=max_tokens, layout=layout, tables=tables)
            _warn_sources(hw, ot.meta)
            return ot

    from estimator.features import EstimatorError
    from estimator.model import QUANTILES
    from estimator.predictors import Predictors

    if quantile not in QUANTILES:
        raise EstimatorError(f"quantile {quantile!r} is not one of {', '.join(QUANTILES)}")
    try:
        preds = Predictors.load(hw, data_dir)
    except EstimatorError as exc:
        warn_once(("no-estimator", hw.name), f"{exc}; the simulator uses the roofline prior for hw={hw.name}",
                  "estimator")
        key = cache_key("roofline", hw, model, tp, "p50", max_tokens, layout)
        return OpTimes(hw, model, tp, max_tokens=max_tokens, cache_path=cache_dir / f"{key}.npz", layout=layout)
    check_dtypes(preds, model)
    used = families_used(model)     # only what this model queries is worth a word to the user
    meta = {"fleet": sorted(f for f, o in preds.origin.items() if o == "fleet" and f in used),
            "fallback": [f for f in preds.fallback if f in used], "trained_range": {}}
    _warn_sources(hw, meta)
    source = f"estimator:{hw.name}:{quantile}"
    if meta["fleet"]:
        source += f" (fleet: {', '.join(meta['fleet'])})"
    if meta["fallback"]:
        source += f" (roofline: {', '.join(meta['fallback'])})"
    for family in preds.trained:
        fitted = preds.model(family)
        fitted.warn_range = False   # the grid is wider than any workload; runs check their own lookups
        meta["trained_range"][family] = fitted.meta.get("shape_range", {})
    key = cache_key(fingerprint, hw, model, tp, quantile, max_tokens, layout)
    return OpTimes(hw, model, tp, predict=preds.predict_fn(quantile), max_tokens=max_tokens, source=source,
                   cache_path=cache_dir / f"{key}.npz", knows=preds.knows, layout=layout, meta=meta)


def families_used(model: ModelConf) -> set[str]:
    """The operator families a simulation of ``model`` asks the estimator about."""
    used = {"gemm", "elementwise", "collective"}
    used.add("mla" if shapes.is_mla(model) else "attention")   # bmm rows price no query yet
    if model.num_experts:
        used.add("moe")
    return used


def _warn_sources(hw: HwConf, meta: dict) -> None:
    """The families priced by the fleet model or the roofline prior: said once per process,
    on a cached run as on a fresh one."""
    fleet, fallback = meta.get("fleet", []), meta.get("fallback", [])
    if fleet:
        warn_once(("fleet", hw.name, tuple(fleet)), f"hw={hw.name}: no measured rows for {', '.join(fleet)}; "
                  f"priced by the fleet model from the card's numbers", "estimator")
    if fallback:
        warn_once(("fallback", hw.name, tuple(fallback)), f"hw={hw.name}: no trained model for "
                  f"{', '.join(fallback)}; roofline prior used for those", "estimator")
