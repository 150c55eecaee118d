"""Global routers (``router.name``): which replica a new request joins, decided on arrival.

Each takes (replicas, rng, state) and returns a replica; ``state`` is a one-element list the
router may keep a counter in. ``least_outstanding`` counts requests routed to a replica and
not yet complete (ties go to the lowest index).
"""


def route_random(replicas, rng, state):
    return replicas[rng.randrange(len(replicas))]


def route_round_robin(replicas, rng, state):
    state[0] += 1
    return replicas[(state[0] - 1) % len(replicas)]


def route_least_outstanding(replicas, rng, state):
    return min(replicas, key=lambda r: r.outstanding)


ROUTERS = {"random": route_random, "round_robin": route_round_robin,
           "least_outstanding": route_least_outstanding}
