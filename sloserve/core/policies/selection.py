"""SLICE stage 1 as an optimisation: which tasks to serve so that total utility is highest
while decoding each at its required rate still fits the decode cycle.

Tasks of equal rate and utility are interchangeable, so the problem is over counts per
*type*: choose n_g <= N_g to maximise sum n_g u_g subject to
  busy(n) = sum_j v_j (l(j) - l(j-1)) <= capacity   (rates sorted descending, l = step time)
  sum n_g <= limit                                   (seats)
busy grows with every count, so the search is a depth-first branch and bound over types in
order of utility per unit of rate, each count tried from the largest that fits downward,
pruned by a bound that is valid for any step-time curve: adding tasks of rates v_a to a set
adds at least delta * sum v_a to busy, delta being the smallest step of l. Within a node
budget the answer is exact (the tests check it against brute force); past it the best set
found so far is returned, never worse than the greedy-by-density start, which is itself a
1/2-approximation when l is linear (the classic knapsack bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_NODES = 4096


@dataclass(frozen=True)
class TaskType:
    rate: float  # tokens/s each task of this type needs
    utility: float  # of each task
    count: int  # tasks of this type on offer
    urgency: float = 0.0  # among equal utilities, seats go to the lower value first (TTFT)


def busy_time(rates_and_counts: Sequence[tuple[float, int]], steps: Sequence[float]) -> float:
    """Seconds of decoding per second for n tasks at each rate; steps[b] = l(b)."""
    total, position, previous = 0.0, 0, 0.0
    for rate, n in sorted(rates_and_counts, key=lambda rc: -rc[0]):
        if n:
            position += n
            total += rate * (steps[position] - previous)
            previous = steps[position]
    return total


class _Search:
    def __init__(self, types: Sequence[TaskType], steps: Sequence[float], capacity: float,
                 limit: int, max_nodes: int):
        # density order: the branching order, and the order of the fractional bound
        self.order = sorted(range(len(types)),
                            key=lambda i: -types[i].utility / max(types[i].rate, 1e-12))
        self.types, self.steps, self.capacity, self.limit = types, steps, capacity, limit
        self.delta = min((b - a for a, b in zip(steps, steps[1:])), default=0.0)
        self.counts = [0] * len(types)
        self.best_value, self.best = -1.0, [0] * len(types)
        self.nodes, self.max_nodes = 0, max_nodes

    def busy(self) -> float:
        return busy_time([(t.rate, n) for t, n in zip(self.types, self.counts)], self.steps)

    def largest_fit(self, i: int, most: int) -> int:
        """The largest count of type i (others fixed) within capacity: busy is monotone."""
        lo, hi = 0, most
        while lo < hi:
            mid = (lo + hi + 1) // 2
            self.counts[i] = mid
            if self.busy() <= self.capacity:
                lo = mid
            else:
                hi = mid - 1
        self.counts[i] = 0
        return lo

    def bound(self, level: int, value: float, room: float, seats: int) -> float:
        """An upper bound on the value reachable from here: the better-constrained of two
        relaxations over the types after `level` (fractional by room; by seats alone)."""
        rest = [self.types[i] for i in self.order[level + 1:] if self.types[i].count]
        by_room, room_left = value, room
        for t in rest:  # density order
            weight = t.rate * self.delta
            take = t.count if weight <= 0 else min(t.count, room_left / weight)
            by_room += take * t.utility
            room_left -= take * weight
            if room_left <= 0:
                break
        by_seats, seats_left = value, seats
        for t in sorted(rest, key=lambda t: -t.utility):
            take = min(t.count, seats_left)
            by_seats += take * t.utility
            seats_left -= take
        return min(by_room, by_seats)

    def run(self, level: int = 0, value: float = 0.0, seats: int = 0) -> None:
        self.nodes += 1
        if value > self.best_value:
            self.best_value, self.best = value, list(self.counts)
        if level == len(self.order) or self.nodes > self.max_nodes:
            return
        i = self.order[level]
        t = self.types[i]
        most = self.largest_fit(i, min(t.count, self.limit - seats))
        for n in range(most, -1, -1):
            self.counts[i] = n
            room = self.capacity - self.busy()
            if self.bound(level, value + n * t.utility, room, self.limit - seats - n) \
                    <= self.best_value:
                continue
            self.run(level + 1, value + n * t.utility, seats + n)
            if self.nodes > self.max_nodes:
                break
        self.counts[i] = 0


def choose(types: Sequence[TaskType], steps: Sequence[float], capacity: float, limit: int,
           max_nodes: int = MAX_NODES) -> list[int]:
    """How many tasks of each type to serve. `steps[b]` = l(b) for b <= limit."""
    by_seats = _best_by_seats(types, limit)
    if busy_time([(t.rate, n) for t, n in zip(types, by_seats)], steps) <= capacity:
        return by_seats  # optimal for the seats alone, and the cycle fits it
    search = _Search(types, steps, capacity, limit, max_nodes)
    search.run()
    return search.best


def _best_by_seats(types: Sequence[TaskType], limit: int) -> list[int]:
    """The optimum when seats are the only constraint: highest utility first; among equals,
    the more urgent (tighter TTFT), then the cheaper to decode."""
    counts = [0] * len(types)
    seats = limit
    for i in sorted(range(len(types)),
                    key=lambda i: (-types[i].utility, types[i].urgency, types[i].rate)):
        counts[i] = min(types[i].count, seats)
        seats -= counts[i]
    return counts
