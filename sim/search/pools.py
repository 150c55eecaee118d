"""Deployment families of the search: colocated replicas, or disaggregated prefill/decode pools.

A disaggregated candidate is a prefill pool (hw, tp, x replicas) plus a decode pool (hw, tp,
y replicas) that together use the whole GPU budget: x * tp_p + y * tp_d == gpu_budget with at
least one replica per pool, tp_p and tp_d from ``search.tp``. Both pools run pp=1: a config
may give a pool pipeline stages (``deployment.prefill.pp``), but the search does not explore
them. The decode pool runs on the prefill pool's hw unless ``search.disagg_mixed_hw`` is true,
then on every ordered pair of ``search.hw``. Both pools run the candidate's scheduler and knob
values, and its weight/KV precision; the router, prefix caching, speculative decoding and
offload dimensions are searched for colocated candidates only (disaggregated ones keep the
config's own settings, and ``deployment.*`` sets their routers and KV transfer).
"""
from __future__ import annotations

import itertools

from omegaconf import DictConfig, OmegaConf

from conf import ConfigError

DEPLOYMENTS = ("colocated", "disaggregated")


def deployments(space) -> list[str]:
    """The validated ``search.deployments`` list, each family once, in the given order."""
    value = space.get("deployments", ["colocated"])
    names = [value] if isinstance(value, str) else list(value or [])
    bad = [n for n in names if n not in DEPLOYMENTS]
    if bad or not names:
        raise ConfigError(f"search.deployments={names}: choose one or more of {', '.join(DEPLOYMENTS)}")
    return list(dict.fromkeys(str(n) for n in names))


def disagg_splits(tps, budget: int) -> list[tuple[int, int, int, int, str]]:
    """(tp_p, x, tp_d, y, reason) for every ordered tp pair: one row per split that fills the
    budget (reason ""), and one row with x = y = 0 and the reason for a pair with none."""
    out = []
    for tp_p, tp_d in itertools.product(tps, repeat=2):
        splits = [(tp_p, x, tp_d, (budget - x * tp_p) // tp_d, "")
                  for x in range(1, budget // tp_p + 1)
                  if budget - x * tp_p >= tp_d and (budget - x * tp_p) % tp_d == 0]
        reason = f"no x prefill tp{tp_p} + y decode tp{tp_d} replicas (x, y >= 1) fill the {budget}-GPU budget"
        out += splits or [(tp_p, 0, tp_d, 0, reason)]
    return out


def hw_pairs(hws: list[str], mixed: bool) -> list[tuple[str, str]]:
    """(prefill hw, decode hw): the same SKU, or every ordered pair when mixing is searched."""
    return list(itertools.product(hws, repeat=2)) if mixed else [(h, h) for h in hws]


def deployment_nodes(cfg: DictConfig, names: list[str], group_nodes) -> dict[str, dict]:
    """Base deployment node per family: the one the search config selected keeps the user's
    overrides (e.g. ``deployment.kv_transfer.link=nvlink``); others are composed fresh."""
    nodes = group_nodes(cfg, "deployment", names)
    return {n: OmegaConf.to_container(node, resolve=True) for n, node in nodes.items()}


def disagg_node(base: dict, cand) -> dict:
    """The deployment node of a disaggregated candidate. The prefill pool's hw is the config's
    top-level hw ("" = that); the candidate's scheduler (the top-level node) is the base of
    both pools, so pool scheduler overrides are cleared."""
    def pool(which: str, hw: str, tp: int, replicas: int) -> dict:
        return {**(base.get(which) or {}), "hw": hw, "tp": tp, "pp": 1, "replicas": replicas,
                "scheduler": {}}
    return {**base, "name": "disaggregated",
            "prefill": pool("prefill", "", cand.tp, cand.replicas),
            "decode": pool("decode", "" if cand.decode_hw == cand.hw else cand.decode_hw,
                           cand.decode_tp, cand.decode_replicas)}
