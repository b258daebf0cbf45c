"""The budget allocator: a multiple-choice knapsack (pure math, no model).

Given units ``i`` (a group of matrices that must share one scheme) with options ``j`` (a candidate scheme) of cost
``c_ij`` (bits) and error ``e_ij`` (measured output error), choose exactly one option per unit so that
``sum_i c_i,j(i) <= budget`` and ``sum_i e_i,j(i)`` is least.

:func:`allocate` solves it exactly by dynamic programming over Pareto fronts: after unit i the front holds every
(cost, error) of a choice for units 0..i that no other choice beats in both (cheaper or equal and no worse), among
those that still leave room for the cheapest options of the remaining units. The last front's least error is the
optimum. Fronts stay small in practice (costs repeat: every unit of one shape costs the same per option), but are
exponential in the worst case, so a front larger than ``max_states`` is thinned: its cost range is cut into
``max_states`` buckets and the least-error choice of each kept; the result is then feasible but may be
suboptimal (``Allocation.exact`` is False), the greedy Lagrangian choice (:func:`greedy`) is computed too and the
better of the two returned, and :func:`lower_bound` says how far from optimal it can be at most.

:func:`lower_bound` is the LP relaxation's optimum (each unit's options reduced to their lower convex hull,
increments taken in order of error saved per bit, the last one fractionally): no choice within the budget has a
smaller error. The plain twin is :func:`moequant.ref.allocate_ref` (enumeration).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["Allocation", "allocate", "greedy", "lower_bound", "min_cost", "Option"]

Option = Optional[tuple]  # (cost, error), or None where the candidate does not apply to the unit


@dataclass(frozen=True)
class Allocation:
    """The chosen option per unit (``choice[i]`` indexes ``options[i]``), its total cost and error, the LP lower
    bound on the error at this budget, and whether the solve was exact (no front was thinned)."""

    choice: tuple
    cost: float
    error: float
    bound: float
    exact: bool


def _check(options: Sequence[Sequence[Option]], budget: float) -> list[list[tuple[int, float, float]]]:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget: expected a finite number of bits, got {budget!r}")
    out = []
    for i, opts in enumerate(options):
        valid = []
        for j, o in enumerate(opts):
            if o is None:
                continue
            c, e = o
            if not (math.isfinite(c) and math.isfinite(e)) or c < 0 or e < 0:
                raise ValueError(f"options[{i}][{j}]: expected a finite (cost >= 0, error >= 0), got {o!r}")
            valid.append((j, float(c), float(e)))
        if not valid:
            raise ValueError(f"options[{i}]: no candidate applies to this unit; add a candidate that fits it")
        out.append(valid)
    return out


def min_cost(options: Sequence[Sequence[Option]]) -> float:
    """The least total cost: every unit at its cheapest applicable option."""
    return sum(min(c for _, c, _ in opts) for opts in _check(options, 0.0))


def _hulls(units: list) -> list[list[tuple[int, float, float]]]:
    """Per unit the lower convex hull of its non-dominated options, ``(option, cost, error)`` by increasing cost."""
    out = []
    for opts in units:
        hull: list[tuple[int, float, float]] = []
        for j, c, e in sorted(opts, key=lambda o: (o[1], o[2])):
            if hull and c == hull[-1][1]:
                continue  # same cost: the first (least error) is kept
            if hull and e >= hull[-1][2]:
                continue  # dominated: costs more, saves nothing
            while len(hull) >= 2:
                (_, c1, e1), (_, c2, e2) = hull[-2], hull[-1]
                if (e2 - e1) * (c - c1) >= (e - e1) * (c2 - c1):  # hull[-1] on or above the chord: not convex
                    hull.pop()
                else:
                    break
            hull.append((j, c, e))
        out.append(hull)
    return out


def _steps(hulls: list) -> list[tuple[float, int, int]]:
    """Every hull increment ``(error saved per bit, unit, position)``, most saved per bit first; within a unit the
    slopes decrease along its hull, so this order keeps each unit's increments in sequence."""
    steps = [((h[k][2] - h[k + 1][2]) / (h[k + 1][1] - h[k][1]), u, k)
             for u, h in enumerate(hulls) for k in range(len(h) - 1)]
    return sorted(steps, key=lambda s: (-s[0], s[1], s[2]))


def lower_bound(options: Sequence[Sequence[Option]], budget: float) -> float:
    """The LP relaxation's optimal error at ``budget`` (a lower bound of :func:`allocate`'s error); ``inf`` when
    even the cheapest choice exceeds the budget."""
    hulls = _hulls(_check(options, budget))
    room = budget - sum(h[0][1] for h in hulls)
    if room < 0:
        return math.inf
    err = sum(h[0][2] for h in hulls)
    for _, u, k in _steps(hulls):
        (_, c1, e1), (_, c2, e2) = hulls[u][k], hulls[u][k + 1]
        if c2 - c1 <= room:
            room -= c2 - c1
            err += e2 - e1
        else:
            err += (e2 - e1) * room / (c2 - c1)
            break
    return max(err, 0.0)


def greedy(options: Sequence[Sequence[Option]], budget: float) -> tuple:
    """The greedy Lagrangian choice: every unit at its hull's cheapest option, then hull increments in order of error
    saved per bit while they fit (a unit whose next increment does not fit takes no later one). Near the LP bound
    when units are many and small against the budget; not always optimal. Returns the option index per unit."""
    hulls = _hulls(_check(options, budget))
    room = budget - sum(h[0][1] for h in hulls)
    if room < 0:
        raise ValueError(f"budget: {budget:.6g} bits is below the cheapest choice")
    pos, stuck = [0] * len(hulls), set()
    for _, u, k in _steps(hulls):
        if u in stuck or pos[u] != k:
            continue
        dc = hulls[u][k + 1][1] - hulls[u][k][1]
        if dc <= room:
            room -= dc
            pos[u] = k + 1
        else:
            stuck.add(u)
    return tuple(h[p][0] for h, p in zip(hulls, pos))


def allocate(options: Sequence[Sequence[Option]], budget: float, *, max_states: Optional[int] = None) -> Allocation:
    """The least-error choice of one option per unit within ``budget`` (module docstring).

    Args:
        options: per unit, per candidate ``(cost, error)`` or None (the candidate does not apply to that unit).
        budget: the most total cost allowed.
        max_states: the largest Pareto front kept exactly (beyond it the front is thinned, ``exact`` False); None:
            200,000, fewer for many units (about 2e8 state-option pairs in all, at least 2,000 states).
    Ties in error go to the cheaper choice. Raises ValueError when even the cheapest choice exceeds the budget,
    naming that cost.
    """
    units = _check(options, budget)
    if max_states is None:
        pairs = max(1, sum(len(o) for o in units))
        max_states = int(min(200_000, max(2_000, 2e8 // pairs)))
    if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 1:
        raise ValueError(f"max_states: expected a positive integer, got {max_states!r}")
    mins = [min(c for _, c, _ in opts) for opts in units]
    need = float(sum(mins))
    if need > budget:
        raise ValueError(f"budget: {budget:.6g} bits is below the cheapest choice, {need:.6g} bits (every unit at "
                         f"its cheapest candidate); raise the budget or add cheaper candidates")
    rest = np.concatenate([np.cumsum(np.asarray(mins[::-1], dtype=np.float64))[::-1][1:], [0.0]])
    slack = 1e-9 * max(1.0, abs(budget))  # summation order differs between ``rest`` and the fronts' costs
    cost = np.zeros(1)
    err = np.zeros(1)
    back = []  # per unit: (index into the previous front, option index) of every state of its front
    exact = True
    for i, opts in enumerate(units):
        js = np.array([j for j, _, _ in opts])
        cs = np.array([c for _, c, _ in opts])
        es = np.array([e for _, _, e in opts])
        n, m = cost.size, js.size
        cc = (cost[:, None] + cs[None, :]).ravel()
        ce = (err[:, None] + es[None, :]).ravel()
        prev = np.repeat(np.arange(n), m)
        opt = np.tile(js, n)
        ok = cc <= budget - rest[i] + (slack if i < len(units) - 1 else 0.0)
        cc, ce, prev, opt = cc[ok], ce[ok], prev[ok], opt[ok]
        order = np.lexsort((ce, cc))  # by cost, then error
        cc, ce, prev, opt = cc[order], ce[order], prev[order], opt[order]
        best = np.minimum.accumulate(ce)
        keep = np.ones(cc.size, dtype=bool)
        keep[1:] = ce[1:] < best[:-1]  # strictly better than every cheaper (or equally cheap, earlier) state
        cc, ce, prev, opt = cc[keep], ce[keep], prev[keep], opt[keep]
        if cc.size > max_states:
            exact = False
            span = max(float(cc[-1] - cc[0]), 1e-300)  # buckets over this front's own cost range
            bucket = np.floor((cc - cc[0]) / span * (max_states - 1)).astype(np.int64)
            last = np.ones(cc.size, dtype=bool)
            last[:-1] = bucket[1:] != bucket[:-1]  # the last (least-error) state of each bucket
            cc, ce, prev, opt = cc[last], ce[last], prev[last], opt[last]
        back.append((prev, opt))
        cost, err = cc, ce
    k = int(np.argmin(err))  # errors decrease along the front: the last state; argmin keeps ties cheapest
    total_cost, total_err = float(cost[k]), float(err[k])
    choice = []
    for prev, opt in reversed(back):
        choice.append(int(opt[k]))
        k = int(prev[k])
    choice = tuple(reversed(choice))
    if not exact:  # a thinned front: the greedy Lagrangian choice may be better
        g = greedy(options, budget)
        g_err = sum(options[i][j][1] for i, j in enumerate(g))
        if g_err < total_err:
            choice, total_err = g, float(g_err)
            total_cost = float(sum(options[i][j][0] for i, j in enumerate(g)))
    return Allocation(choice, total_cost, total_err, lower_bound(options, budget), exact)
