"""Global routers (``router.name``): which replica a new request joins, decided on arrival.

Each takes (replicas, request, state) and returns a replica; ``state`` is the engine's
RouterState (its random generator, a counter, the RouterConf). ``least_outstanding`` counts
requests routed to a replica and not yet complete (ties go to the lowest index).

``prefix_affinity`` is llm-d's precise prefix-cache routing: it asks every replica's KV cache
(the simulator knows them exactly, as llm-d learns them from vLLM's KV events) how many of
the request's leading blocks it holds and sends the request to the replica holding the most
among those with at most ``router.max_imbalance`` outstanding requests above the least-loaded
one (ties: fewer outstanding, then the lower index); when none of those holds any, to the
least-loaded one.
"""
from __future__ import annotations


class RouterState:
    __slots__ = ("conf", "count", "rng")

    def __init__(self, rng, conf=None):
        self.rng, self.count, self.conf = rng, 0, conf


def route_random(replicas, req, state):
    return replicas[state.rng.randrange(len(replicas))]


def route_round_robin(replicas, req, state):
    state.count += 1
    return replicas[(state.count - 1) % len(replicas)]


def route_least_outstanding(replicas, req, state):
    return min(replicas, key=lambda r: r.outstanding)


def route_prefix_affinity(replicas, req, state):
    least = min(replicas, key=lambda r: r.outstanding)
    limit = least.outstanding + state.conf.max_imbalance
    best, best_hit = least, 0
    for rep in replicas:
        if rep.outstanding > limit:
            continue
        hit = rep.blocks.lookup(req)[0] if rep.blocks.caching else 0
        if hit > best_hit or (hit == best_hit and hit and rep.outstanding < best.outstanding):
            best, best_hit = rep, hit
    return best


ROUTERS = {"random": route_random, "round_robin": route_round_robin,
           "least_outstanding": route_least_outstanding, "prefix_affinity": route_prefix_affinity}
