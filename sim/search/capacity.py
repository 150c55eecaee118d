"""Capacity of one deployment: the highest QPS whose simulated latency percentiles meet the SLOs.

Sustainable means two things here. Above the deployment's saturation throughput (what it
completes per second when every request is already waiting) the queue grows without bound,
so that throughput caps the capacity. Below it, a probe at QPS q simulates a fixed number
of requests with Poisson arrivals at rate q and passes when every SLO percentile is within
its limit (judged on TTFT/TBT percentiles, not on a scheduling-delay proxy).

The search per seed brackets geometrically from a guess and then bisects in log space until
hi/lo <= 1 + rel_tol; the answer is the highest QPS that passed. Several seeds give several
capacities, summarised by their mean and a t-based 95% confidence interval.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from conf import ConfigError

# SLO names use "tbt" (time between tokens); the simulator calls it inter-token latency.
SLO_METRICS = {"ttft": "ttft_s", "tbt": "itl_s", "itl": "itl_s", "tpot": "tpot_s", "e2e": "e2e_s",
               "norm_e2e": "norm_e2e_s", "sched_delay": "sched_delay_s"}
SLO_STATS = ("mean", "p50", "p90", "p99")
_SLO_KEY = re.compile(r"^(?P<metric>[a-z0-9_]+?)_(?P<stat>mean|p50|p90|p99)_s$")

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; larger df use 1.96.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def slo_limits(slo: Mapping) -> dict[str, float]:
    """Simulator summary key -> limit (s): ``{"ttft_p90_s": 2}`` -> ``{"ttft_s_p90": 2.0}``.

    Entries set to null are not checked. At least one limit must be set.
    """
    limits = {}
    for name, value in slo.items():
        m = _SLO_KEY.match(str(name))
        if not m or m["metric"] not in SLO_METRICS:
            raise ConfigError(f"slo.{name}: expected <metric>_<stat>_s with metric in "
                              f"{sorted(SLO_METRICS)} and stat in {list(SLO_STATS)}")
        if value is None:
            continue
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"slo.{name}={value!r}: a limit must be a positive number of seconds")
        limits[f"{SLO_METRICS[m['metric']]}_{m['stat']}"] = float(value)
    if not limits:
        raise ConfigError("slo: no limit is set; set e.g. slo.ttft_p90_s=2 slo.tbt_p99_s=0.2")
    return limits


def violation(summary: Mapping, limits: Mapping[str, float]) -> float:
    """Worst ratio of measured latency to its limit: <= 1 meets every SLO; NaN counts as failing."""
    worst = 0.0
    for key, limit in limits.items():
        value = summary.get(key, math.nan)
        ratio = value / limit if value is not None and not math.isnan(value) else math.inf
        worst = max(worst, ratio)
    return worst


@dataclass
class SeedCapacity:
    seed: int
    capacity_qps: float       # highest probed QPS that met the SLOs (0 when none did)
    lo_qps: float             # passing end of the final bracket (0 when none passed)
    hi_qps: float             # failing end (inf when capped by saturation throughput)
    saturation_qps: float     # throughput with every request waiting: the stability bound
    status: str               # ok | throughput_bound | below_floor
    num_probes: int           # simulations run for this seed (the first seed's include saturation)
    min_violation: float = math.nan   # closest any probe came to the SLO (worst ratio, >1 fails)
    probes: list = field(default_factory=list)   # [(qps, violation)] in probe order


def round_qps(qps: float) -> float:
    """Probe rates on a 6-significant-digit grid, so a resumed search hits the same keys."""
    return float(f"{qps:.6g}")


def find_capacity(check: Callable[[float], float], guess: float, ceiling: float, floor: float,
                  step: float, rel_tol: float) -> tuple[float, float, str, list]:
    """Bracket, then close in (interpolated probe pairs alternating with log-bisection).

    ``check(qps)`` returns the SLO violation ratio (<= 1 passes).

    Returns (lo, hi, status, probes): lo is the highest passing QPS (0 if none down to floor),
    hi the lowest failing one above it (inf when the ceiling itself passed).
    """
    if not (step > 1 and 0 < rel_tol and 0 < floor <= ceiling):
        raise ValueError(f"bad capacity search bounds: step={step} rel_tol={rel_tol} "
                         f"floor={floor} ceiling={ceiling}")
    probes: list[tuple[float, float]] = []

    def passes(qps: float) -> bool:
        v = check(qps)
        probes.append((qps, v))
        return v <= 1.0

    lo, hi = 0.0, math.inf
    qps = round_qps(min(max(guess, floor), ceiling))
    if passes(qps):
        lo = qps
    else:
        hi = qps
    while hi == math.inf:                      # climb until a probe fails or the ceiling passes
        if lo >= ceiling:
            return lo, hi, "throughput_bound", probes
        qps = round_qps(min(lo * step, ceiling))
        if passes(qps):
            lo = qps
        else:
            hi = qps
    while lo == 0.0:                           # descend until a probe passes or the floor fails
        if hi <= floor:
            return 0.0, hi, "below_floor", probes
        qps = round_qps(max(hi / step, floor))
        if passes(qps):
            lo = qps
        else:
            hi = qps
    width = 1.0 + rel_tol
    last = {q: v for q, v in probes}
    interpolate = True
    while hi / lo > width:
        qps, aimed = math.sqrt(lo * hi), False
        v_lo, v_hi = last[lo], last[hi]
        if interpolate and math.isfinite(v_hi) and v_hi > v_lo and hi / lo > width ** 2:
            # The violation ratio is smooth in QPS near the limit: aim a pair of probes one
            # tolerance apart around the interpolated crossing, which usually closes the bracket.
            root = lo + (1.0 - v_lo) * (hi - lo) / (v_hi - v_lo)
            qps = min(max(root / math.sqrt(width), lo * math.sqrt(width)), hi / math.sqrt(width))
            aimed = True
        interpolate = not interpolate          # alternate with bisection: robust when it is not
        qps = round_qps(qps)
        if qps in (lo, hi):                    # the rounding grid is finer than any sane tolerance
            break
        ok = passes(qps)
        last[qps] = probes[-1][1]
        lo, hi = (qps, hi) if ok else (lo, qps)
        if hi / lo <= width or not aimed:
            continue
        partner = round_qps(min(qps * width, hi) if ok else max(qps / width, lo))
        if partner in (lo, hi):
            continue
        ok = passes(partner)
        last[partner] = probes[-1][1]
        lo, hi = (partner, hi) if ok else (lo, partner)
    return lo, hi, "ok", probes


def capacity_over_seeds(simulate_at: Callable[[float, int], Mapping], limits: Mapping[str, float],
                        seeds, *, saturation_qps: float, guess_fraction: float = 0.5,
                        step: float = 2.0, reseed_step: float = 1.25, rel_tol: float = 0.05,
                        floor_fraction: float = 0.02) -> list[SeedCapacity]:
    """Capacity per seed. ``simulate_at(qps, seed)`` returns the simulator's summary dict.

    The saturation throughput (the ceiling) is measured on the first seed and shared: it is
    the costliest probe, and seeds move it by a few percent; a later seed that reaches it
    measures its own and continues to that. The first seed starts at
    ``guess_fraction`` of it and steps by ``step``; later seeds start at the mean capacity found
    so far and step by the smaller ``reseed_step``.
    """
    results: list[SeedCapacity] = []
    ceiling = floor = 0.0
    for seed in seeds:
        if not results:
            saturation = float(simulate_at(saturation_qps, seed)["throughput_rps"])
            if not saturation > 0:
                raise RuntimeError(f"seed {seed}: saturation probe completed no requests")
            ceiling = round_qps(saturation)
            floor = round_qps(ceiling * floor_fraction)
        found = [r.capacity_qps for r in results if r.capacity_qps > 0]
        if results and not found:              # earlier seeds met nothing: check the floor only
            guess, this_step = floor, step
        elif found:
            guess, this_step = sum(found) / len(found), reseed_step
        else:
            guess, this_step = ceiling * guess_fraction, step
        check = lambda q: violation(simulate_at(q, seed), limits)  # noqa: E731
        lo, hi, status, probes = find_capacity(check, guess, ceiling, floor, this_step, rel_tol)
        seed_ceiling, extra = ceiling, 0 if results else 1
        if status == "throughput_bound" and results:
            # Capped by the first seed's saturation: this seed's own decides (its requests differ).
            seed_ceiling = round_qps(float(simulate_at(saturation_qps, seed)["throughput_rps"]))
            extra = 1
            if seed_ceiling != ceiling:
                lo, hi, status, more = find_capacity(check, min(ceiling, seed_ceiling),
                                                     seed_ceiling, floor, reseed_step, rel_tol)
                probes += more
        results.append(SeedCapacity(seed=seed, capacity_qps=lo, lo_qps=lo, hi_qps=hi,
                                    saturation_qps=seed_ceiling, status=status,
                                    num_probes=len(probes) + extra,
                                    min_violation=min(v for _, v in probes), probes=probes))
    return results


def mean_ci95(values) -> tuple[float, float, float]:
    """Mean and the two-sided 95% Student-t interval of the mean (NaN bounds for one value)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(xs) / n
    if n == 1:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * sd / math.sqrt(n)
    return mean, mean - half, mean + half
