"""Mixed-precision bit allocation: a pure function over a sensitivity table.

Given, for every layer, a score Ω ≥ 0 per candidate ``(scheme, bits)`` (lower is better) and the
layer's parameter count n_l, choose one candidate per layer so that the parameter-weighted
average weight bits Σ n_l·b_l / Σ n_l stays within the budget while Σ Ω is as small as
possible. This is a multiple-choice knapsack problem. Two solvers:

* ``"greedy"``: start every layer at its best candidate, demote by the smallest ΔΩ per saved
  bit until the budget holds, then spend the slack on the best upgrades that still fit.
* ``"milp"``: the optimum with ``scipy.optimize.milp`` (HiGHS), exact up to the solver's
  tolerances (~1e-7 of the largest score); it falls back to the greedy plan on the rare table
  where that is better, so it is never worse than greedy.

Budget arithmetic is done in integers (parameter-bits) so the achieved average can never exceed
the budget: the capacity is ``floor((budget + 1e-9) * Σn)`` and every plan is checked against it.

Energy budget (optional): with ``energy`` (layer → {candidate: cost}, any unit, e.g. pJ per inference
from :func:`hq_ptq.energy.candidate_energy`) and ``energy_budget`` in the same unit, the plan also keeps
Σ cost ≤ energy_budget (relative slack 1e-9 for round-off). Each layer's candidates are then filtered
to the Pareto set in (bits, energy, Ω) instead of (bits, Ω). Both solvers handle both constraints:

* greedy: start every layer at its lowest Ω; while a constraint is violated, make the move with the
  smallest ΔΩ per unit saved of the violated resources (each normalised by its current total), never
  raising a violated resource nor pushing a satisfied one over its cap; then spend what is left of both
  capacities on the best Ω reductions per unit used. If the demotions get stuck the MILP finds a
  feasible plan when one exists; if none does, a one-line ValueError names the reachable energy range.
* milp: both constraints as rows of the same multiple-choice knapsack.

Score monotonicity: for a fixed scheme, more bits must never score worse. As in ModelOpt's
``auto_quantize``, each scheme's scores are walked from fewest to most bits and replaced by the
running minimum, ``Ω'(s, b) = min_{b' ≤ b} Ω(s, b')``. A higher-bit candidate that measured worse
than a lower-bit one is treated as noise and given the lower score; on a tie the search prefers
fewer bits, so such a candidate is then never picked over its cheaper sibling. Reported
sensitivities (``LayerChoice.sensitivity``) are these monotone scores.

No torch here: the module is trivially testable and cheap to import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from hq_ptq.config import METHODS
from hq_ptq.plan import LayerChoice, Plan

__all__ = ["allocate", "homogeneous_plan", "monotone_table"]

logger = logging.getLogger(__name__)


Candidate = tuple[str, int]
Table = Mapping[str, Mapping[Candidate, float]]

# Slack allowed on the average-bit budget for float round-off in ``budget * Σn``.
_BUDGET_TOL = 1e-9
# Relative slack on the energy budget: costs are floats (pJ), so the check cannot be exact.
_ENERGY_TOL = 1e-9
# Denominator floor for the relative greedy-vs-MILP gap when the optimum is Ω = 0.
_TINY = 1e-12
# The multiple-choice knapsacks we meet (≤ a few hundred layers × ~11 candidates) solve in well
# under a second; the limit only stops a pathological table from hanging a run.
_MILP_TIME_LIMIT_S = 60.0


@dataclass(frozen=True)
class _Frontier:
    """Pareto-optimal candidates of one free layer, bits ascending and Ω strictly descending."""

    name: str
    params: int
    schemes: tuple[str, ...]
    bits: tuple[int, ...]
    omega: tuple[float, ...]
    # cost of each candidate under an energy budget; empty without one
    energy: tuple[float, ...] = ()


class _Infeasible(RuntimeError):
    """The MILP proved that no plan meets both budgets."""


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def monotone_table(table: Table) -> dict[str, dict[Candidate, float]]:
    """Validate a score table and make each scheme's scores non-increasing in bits.

    Args:
        table: Layer name → {(scheme, bits): Ω ≥ 0}.

    Returns:
        A new table, same order, with ``Ω'(s, b) = min_{b' ≤ b} Ω(s, b')``.

    Raises:
        ValueError: On a malformed candidate key or a negative / non-finite score.
    """
    out: dict[str, dict[Candidate, float]] = {}
    for name, cands in table.items():
        if not isinstance(cands, Mapping):
            raise ValueError(f"table[{name!r}] must be a dict {{(scheme, bits): score}}, "
                             f"got {type(cands).__name__}")
        clean: dict[Candidate, float] = {}
        for key, score in cands.items():
            cand = _check_candidate(name, key)
            try:
                value = float(score)
            except (TypeError, ValueError):
                raise ValueError(f"layer {name!r} candidate {cand}: score must be a number, "
                                 f"got {score!r}") from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"layer {name!r} candidate {cand}: score must be finite and "
                                 f">= 0, got {value}")
            clean[cand] = value
        best: dict[str, float] = {}
        mono: dict[Candidate, float] = {}
        for cand in sorted(clean, key=lambda c: (c[0], c[1])):
            value = min(clean[cand], best.get(cand[0], math.inf))
            best[cand[0]] = value
            mono[cand] = value
        out[name] = {cand: mono[cand] for cand in clean}
    return out


def allocate(
    table: Table,
    sizes: Mapping[str, int],
    budget: float | None,
    *,
    method: str = "greedy",
    protected: Mapping[str, Candidate] | None = None,
    schemes: Iterable[str] | str | None = None,
    bits: Iterable[int] | int | None = None,
    check_milp: bool = True,
    energy: Table | None = None,
    energy_budget: float | None = None,
) -> Plan:
    """Choose one (scheme, bits) per layer under an average-bit budget and/or an energy budget.

    Args:
        table: Layer name → {(scheme, bits): Ω ≥ 0}; lower Ω is better. Its order is the plan's
            layer order. Scores are made monotone per scheme (see module docstring).
        sizes: Layer name → number of weight parameters (extra names are ignored).
        budget: Maximum Σ n_l·b_l / Σ n_l over all layers, protected ones included; ``None``
            for no bit budget (then ``energy_budget`` is required).
        method: ``"greedy"`` (fast heuristic) or ``"milp"`` (exact up to solver tolerance,
            never worse than greedy).
        protected: Layer name → fixed (scheme, bits), e.g. first/last layer at ("uniform", 8).
            The candidate must be in the layer's table row; ``schemes``/``bits`` do not apply.
        schemes: If given, only these schemes are allowed for unprotected layers.
        bits: If given, only these bit widths are allowed for unprotected layers.
        check_milp: With ``method="greedy"``, also solve the MILP and record the optimality gap.
        energy: Layer name → {(scheme, bits): cost ≥ 0} for every candidate of the table, in any
            unit (pJ, a fraction of the FP32 energy, ...); required with ``energy_budget``.
        energy_budget: Maximum Σ cost of the chosen candidates, protected layers included, in the
            unit of ``energy``.

    Returns:
        A :class:`Plan` with ``avg_bits <= budget`` (and Σ energy ≤ energy_budget). ``plan.meta``
        holds ``omega_total`` and timings (and ``energy_total``, ``energy_budget``); for greedy
        with ``check_milp`` also ``omega_milp`` and
        ``gap = (Ω_greedy − Ω_milp) / max(Ω_milp, 1e-12)``.

    Raises:
        ValueError: On bad input, a layer left without candidates, or a budget below the
            cheapest reachable average or energy (the message gives the reachable range).
        RuntimeError: If the MILP solver fails with ``method="milp"`` (with ``"greedy"`` the
            failure is logged and kept in ``meta["milp_error"]``; the greedy plan is returned).

    Example:
        >>> table = {"a": {("uniform", 8): 0.0, ("uniform", 4): 1.0},
        ...          "b": {("uniform", 8): 0.0, ("pot", 4): 0.2}}
        >>> plan = allocate(table, {"a": 10, "b": 10}, 6.0)
        >>> [(c.scheme, c.bits) for c in plan]
        [('uniform', 8), ('pot', 4)]
    """
    if method not in METHODS:
        raise ValueError(f"unknown allocation method {method!r}; use one of {METHODS}")
    if budget is None and energy_budget is None:
        raise ValueError("allocate needs a budget (average bits), an energy_budget, or both")
    budget_f = None if budget is None else _check_budget(budget)
    mono = monotone_table(table)
    if not mono:
        raise ValueError("the sensitivity table is empty; score at least one layer")
    params = _check_sizes(mono, sizes)
    fixed = _check_protected(mono, protected)
    scheme_set = _as_set(schemes, str, "schemes")
    bits_set = _as_set(bits, int, "bits")
    costs = _check_energy(mono, energy, energy_budget)

    frontiers = [
        _frontier(name, params[name], mono[name], scheme_set, bits_set,
                  None if costs is None else costs[name])
        for name in mono
        if name not in fixed
    ]
    total = sum(params.values())
    fixed_size = sum(params[n] * b for n, (_, b) in fixed.items())
    lo = fixed_size + sum(f.params * min(f.bits) for f in frontiers)
    hi = fixed_size + sum(f.params * _max_bits(mono[f.name], scheme_set, bits_set)
                          for f in frontiers)
    cap = hi if budget_f is None else math.floor((budget_f + _BUDGET_TOL) * total)
    free_cap = cap - fixed_size
    if lo > cap:
        raise ValueError(f"budget {budget_f:g} average bits is unreachable: these candidates "
                         f"allow [{lo / total:.6g}, {hi / total:.6g}] average bits; raise the "
                         "budget or allow fewer bits")
    free_e_cap = None
    if costs is not None:
        energy_fixed = math.fsum(costs[n][c] for n, c in fixed.items())
        free_e_cap = energy_budget * (1 + _ENERGY_TOL) - energy_fixed
        e_lo = energy_fixed + math.fsum(min(f.energy) for f in frontiers)
        e_hi = energy_fixed + math.fsum(
            max(v for c, v in costs[f.name].items() if _allowed(c, scheme_set, bits_set))
            for f in frontiers)
        if e_lo > energy_budget * (1 + _ENERGY_TOL):
            raise ValueError(f"energy_budget {energy_budget:.6g} is unreachable: these candidates "
                             f"reach [{e_lo:.6g}, {e_hi:.6g}] in its unit; raise energy_budget or "
                             "allow cheaper candidates")

    meta: dict = {}
    omega_fixed = _fixed_omega(mono, fixed)
    # Greedy costs milliseconds and also backs up the MILP (see _exact), so it always runs.
    t0 = time.perf_counter()
    if free_e_cap is None:
        greedy_picks = _greedy(frontiers, free_cap)
    else:
        greedy_picks = _greedy_two(frontiers, free_cap, free_e_cap)
        if greedy_picks is None:
            # the demotions got stuck: the MILP finds a feasible plan if any exists
            greedy_picks = _feasible_or_raise(frontiers, free_cap, free_e_cap, budget_f,
                                              energy_budget, energy_fixed, e_lo, e_hi)
    meta["greedy_seconds"] = time.perf_counter() - t0
    omega_greedy = _omega(frontiers, greedy_picks) + omega_fixed
    if method == "greedy":
        picks = greedy_picks
        meta["omega_total"] = omega_greedy
        if check_milp:
            _record_milp_check(meta, frontiers, free_cap, greedy_picks, omega_fixed, free_e_cap)
    else:
        t0 = time.perf_counter()
        picks, status = _exact(frontiers, free_cap, greedy_picks, free_e_cap)
        meta["milp_seconds"] = time.perf_counter() - t0
        meta["milp_status"] = status
        meta["omega_total"] = _omega(frontiers, picks) + omega_fixed
    if costs is not None:
        meta["energy_total"] = energy_fixed + math.fsum(f.energy[k] for f, k in zip(frontiers, picks))
        meta["energy_budget"] = float(energy_budget)

    plan = _build_plan(mono, params, fixed, frontiers, picks, budget_f, method, meta)
    # The integer capacity makes this impossible; keep the promise explicit all the same.
    if plan.size_bits > cap:
        raise RuntimeError(f"internal error: plan uses {plan.avg_bits} average bits over the "
                           f"budget {budget_f}")
    if costs is not None and meta["energy_total"] > energy_budget * (1 + _ENERGY_TOL):
        raise RuntimeError(f"internal error: plan costs {meta['energy_total']} over the energy "
                           f"budget {energy_budget}")
    logger.info("allocate(%s): budget %s -> %.4g avg bits, Ω=%.6g%s", method, budget_f,
                plan.avg_bits, meta["omega_total"],
                f", gap to MILP {meta['gap']:.3%}" if "gap" in meta else "")
    return plan


def homogeneous_plan(
    table: Table,
    sizes: Mapping[str, int],
    scheme: str,
    bits: int,
    protected: Mapping[str, Candidate] | None = None,
) -> Plan:
    """Give every unprotected layer the same (scheme, bits): the baseline to beat.

    Args:
        table: As for :func:`allocate`; every unprotected layer must have ``(scheme, bits)``.
        sizes: Layer name → number of weight parameters.
        scheme: The scheme for all unprotected layers.
        bits: The bit width for all unprotected layers.
        protected: Layer name → fixed (scheme, bits).

    Returns:
        A plan with ``method="homogeneous"``, ``budget=None`` and ``meta["omega_total"]``
        (scores made monotone exactly as in :func:`allocate`, so totals are comparable).

    Raises:
        ValueError: If a layer has no score for ``(scheme, bits)``.
    """
    cand = _check_candidate("<homogeneous_plan>", (scheme, bits))
    mono = monotone_table(table)
    if not mono:
        raise ValueError("the sensitivity table is empty; score at least one layer")
    params = _check_sizes(mono, sizes)
    fixed = _check_protected(mono, protected)
    layers = []
    for name, cands in mono.items():
        choice = fixed.get(name, cand)
        if choice not in cands:
            raise ValueError(f"layer {name!r} has no score for {choice}; its candidates are "
                             f"{sorted(cands)}")
        layers.append(LayerChoice(name, choice[0], choice[1], params[name], cands[choice]))
    meta = {"omega_total": math.fsum(layer.sensitivity for layer in layers)}
    return Plan(tuple(layers), budget=None, method="homogeneous", meta=meta)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------
def _check_candidate(name: str, key: object) -> Candidate:
    if (not isinstance(key, tuple) or len(key) != 2 or not isinstance(key[0], str)
            or isinstance(key[1], bool) or not isinstance(key[1], (int, np.integer))):
        raise ValueError(f"layer {name!r}: candidate {key!r} must be a (scheme: str, bits: int) "
                         "tuple")
    if key[1] < 1:
        raise ValueError(f"layer {name!r}: candidate {key!r} has bits < 1")
    return (key[0], int(key[1]))


def _check_budget(budget: float) -> float:
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number of average bits, got {budget!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget must be a positive finite number of average bits, got {value}")
    return value


def _check_sizes(table: Mapping[str, object], sizes: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for name in table:
        if name not in sizes:
            raise ValueError(f"sizes has no parameter count for layer {name!r}; pass one per "
                             "table row")
        n = sizes[name]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"sizes[{name!r}] must be a positive integer, got {n!r}")
        out[name] = int(n)
    return out


def _check_protected(
    table: Mapping[str, Mapping[Candidate, float]], protected: Mapping[str, Candidate] | None
) -> dict[str, Candidate]:
    out: dict[str, Candidate] = {}
    for name, key in (protected or {}).items():
        if name not in table:
            raise ValueError(f"protected layer {name!r} is not in the sensitivity table; "
                             "check the name")
        cand = _check_candidate(name, tuple(key) if isinstance(key, list) else key)
        if cand not in table[name]:
            raise ValueError(f"protected layer {name!r}: candidate {cand} has no score; its "
                             f"candidates are {sorted(table[name])}")
        out[name] = cand
    return out


def _as_set(values: Iterable | None, kind: type, what: str) -> frozenset | None:
    if values is None:
        return None
    if isinstance(values, (str, int, np.integer)):
        values = [values]
    out = set()
    for v in values:
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{what} must hold integers, got {v!r}")
            out.add(int(v))
        else:
            if not isinstance(v, str):
                raise ValueError(f"{what} must hold strings, got {v!r}")
            out.add(v)
    if not out:
        raise ValueError(f"{what} is empty; pass None to allow all")
    return frozenset(out)


def _allowed(cand: Candidate, schemes: frozenset | None, bits: frozenset | None) -> bool:
    return (schemes is None or cand[0] in schemes) and (bits is None or cand[1] in bits)


def _max_bits(cands: Mapping[Candidate, float], schemes: frozenset | None,
              bits: frozenset | None) -> int:
    return max(c[1] for c in cands if _allowed(c, schemes, bits))


def _frontier(
    name: str,
    params: int,
    cands: Mapping[Candidate, float],
    schemes: frozenset | None,
    bits: frozenset | None,
    energy: Mapping[Candidate, float] | None = None,
) -> _Frontier:
    allowed = [(c, s) for c, s in cands.items() if _allowed(c, schemes, bits)]
    if not allowed:
        raise ValueError(f"layer {name!r} has no candidate left after restricting to "
                         f"schemes={_fmt(schemes)} bits={_fmt(bits)}; its candidates are "
                         f"{sorted(cands)}")
    if energy is not None:
        return _frontier_with_energy(name, params, allowed, energy)
    # Keep only Pareto-optimal candidates: some optimal plan uses only these, and it lets both
    # solvers treat a layer as a ladder (more bits ⇔ strictly lower Ω). Ties go to fewer bits,
    # then to the scheme name, so results do not depend on dict order.
    allowed.sort(key=lambda cs: (cs[0][1], cs[1], cs[0][0]))
    keep: list[tuple[Candidate, float]] = []
    for cand, score in allowed:
        if not keep or score < keep[-1][1]:
            keep.append((cand, score))
    return _Frontier(
        name=name,
        params=params,
        schemes=tuple(c[0] for c, _ in keep),
        bits=tuple(c[1] for c, _ in keep),
        omega=tuple(s for _, s in keep),
    )


def _frontier_with_energy(
    name: str, params: int, allowed: list[tuple[Candidate, float]], energy: Mapping[Candidate, float]
) -> _Frontier:
    """The candidates no other beats on all of (bits, energy, Ω); bits ascending, Ω not monotone."""
    # Sorted so that a candidate's dominators (and its exact ties, by scheme name) come first; a
    # candidate dropped was dominated by a kept one, which then dominates whatever it dominated.
    allowed = sorted(allowed, key=lambda cs: (cs[0][1], cs[1], energy[cs[0]], cs[0][0]))
    keep: list[tuple[Candidate, float, float]] = []
    for cand, score in allowed:
        e = energy[cand]
        if not any(c[1] <= cand[1] and s <= score and ke <= e for c, s, ke in keep):
            keep.append((cand, score, e))
    return _Frontier(
        name=name,
        params=params,
        schemes=tuple(c[0] for c, _, _ in keep),
        bits=tuple(c[1] for c, _, _ in keep),
        omega=tuple(s for _, s, _ in keep),
        energy=tuple(e for _, _, e in keep),
    )


def _check_energy(table: Mapping[str, Mapping[Candidate, float]], energy: Table | None,
                  energy_budget: float | None) -> dict[str, dict[Candidate, float]] | None:
    if energy is None and energy_budget is None:
        return None
    if energy is None or energy_budget is None:
        raise ValueError("pass energy (per-candidate costs) and energy_budget together")
    try:
        cap = float(energy_budget)
    except (TypeError, ValueError):
        raise ValueError(f"energy_budget must be a number, got {energy_budget!r}") from None
    if isinstance(energy_budget, bool) or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"energy_budget must be a positive finite number, got {energy_budget!r}")
    out: dict[str, dict[Candidate, float]] = {}
    for name, cands in table.items():
        row = energy.get(name)
        if not isinstance(row, Mapping):
            raise ValueError(f"energy has no costs for layer {name!r}; pass one per table row")
        out[name] = {}
        for cand in cands:
            value = row.get(cand)
            if (value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"energy[{name!r}][{cand}] must be a finite cost >= 0, got {value!r}")
            out[name][cand] = float(value)
    return out


def _fmt(values: frozenset | None) -> str:
    return "all" if values is None else str(sorted(values))


# ---------------------------------------------------------------------------------------------
# Solvers: both return, per frontier, the index of the chosen candidate.
# ---------------------------------------------------------------------------------------------
def _greedy(frontiers: list[_Frontier], cap: int) -> list[int]:
    picks = [len(f.bits) - 1 for f in frontiers]
    size = sum(f.params * f.bits[-1] for f in frontiers)

    # Phase 1, demote: a min-heap of each layer's cheapest ΔΩ per saved parameter-bit. Entries go
    # stale when their layer moves; a per-layer version number lets us skip them lazily.
    version = [0] * len(frontiers)
    heap: list[tuple[float, int, int, int, int]] = []

    def push_demotion(i: int) -> None:
        f, k = frontiers[i], picks[i]
        best = None
        for j in range(k):
            saved = (f.bits[k] - f.bits[j]) * f.params
            key = ((f.omega[j] - f.omega[k]) / saved, -saved)
            if best is None or key < best[0]:
                best = (key, j)
        if best is not None:
            heapq.heappush(heap, (best[0][0], best[0][1], i, best[1], version[i]))

    for i in range(len(frontiers)):
        push_demotion(i)
    while size > cap:
        # Reachability was checked by the caller, so the heap cannot run dry here.
        _, neg_saved, i, j, ver = heapq.heappop(heap)
        if ver != version[i]:
            continue
        picks[i] = j
        size += neg_saved
        version[i] += 1
        push_demotion(i)

    return _upgrade(frontiers, picks, cap - size)


def _upgrade(frontiers: list[_Frontier], picks: list[int], slack: int) -> list[int]:
    """Spend ``slack`` parameter-bits on the best Ω reduction per extra bit, until nothing fits.

    Updates ``picks`` in place and returns it. Only ever lowers Σ Ω.
    """
    # Slack only shrinks, so a layer's best fitting upgrade can only get worse: a popped entry
    # that no longer fits is recomputed and pushed back (lazy re-evaluation).
    version = [0] * len(frontiers)
    heap: list[tuple[float, float, int, int, int, int]] = []

    def push_upgrade(i: int) -> None:
        f, k = frontiers[i], picks[i]
        best = None
        for j in range(k + 1, len(f.bits)):
            extra = (f.bits[j] - f.bits[k]) * f.params
            if extra > slack:
                break  # bits ascend along the frontier, so nothing further fits either
            gain = f.omega[k] - f.omega[j]
            key = (-gain / extra, -gain)
            if best is None or key < best[0]:
                best = (key, j, extra)
        if best is not None:
            heapq.heappush(heap, (best[0][0], best[0][1], i, best[1], best[2], version[i]))

    for i in range(len(frontiers)):
        push_upgrade(i)
    while heap:
        _, _, i, j, extra, ver = heapq.heappop(heap)
        if ver != version[i]:
            continue
        if extra > slack:
            version[i] += 1
            push_upgrade(i)
            continue
        picks[i] = j
        slack -= extra
        version[i] += 1
        push_upgrade(i)
    return picks


def _greedy_two(frontiers: list[_Frontier], cap: int, e_cap: float) -> list[int] | None:
    """Greedy under the bit capacity ``cap`` and the energy capacity ``e_cap`` (free layers only).

    Returns the picks, or None when the demotions get stuck before both constraints hold.
    """
    picks = [min(range(len(f.bits)), key=lambda k, f=f: (f.omega[k], f.bits[k], f.energy[k]))
             for f in frontiers]
    size = sum(f.params * f.bits[k] for f, k in zip(frontiers, picks))
    used = math.fsum(f.energy[k] for f, k in zip(frontiers, picks))
    while size > cap or used > e_cap:
        over_size, over_energy = size > cap, used > e_cap
        # each violated resource in units of its current total, so neither dominates by its unit
        size_unit, energy_unit = max(size, 1), max(used, _TINY)
        best = None
        for i, f in enumerate(frontiers):
            k = picks[i]
            for j in range(len(f.bits)):
                d_size = f.params * (f.bits[k] - f.bits[j])  # saved
                d_energy = f.energy[k] - f.energy[j]  # saved
                # never raise a violated resource, never push a satisfied one over its cap: then the
                # excesses only shrink and the loop ends
                if (over_size and d_size < 0) or (over_energy and d_energy < 0):
                    continue
                if (not over_size and size - d_size > cap) or (not over_energy and used - d_energy > e_cap):
                    continue
                saved = (d_size / size_unit if over_size else 0.0) + (
                    d_energy / energy_unit if over_energy else 0.0)
                if saved <= 0:
                    continue
                key = ((f.omega[j] - f.omega[k]) / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, i, j, d_size, d_energy)
        if best is None:
            return None
        _, i, j, d_size, d_energy = best
        picks[i] = j
        size -= d_size
        used -= d_energy
    return _upgrade_two(frontiers, picks, cap, e_cap)


def _upgrade_two(frontiers: list[_Frontier], picks: list[int], cap: int, e_cap: float) -> list[int]:
    """Take the best Ω reduction per unit of capacity used while both capacities hold; in place.

    Only ever lowers Σ Ω (each move strictly), so it ends.
    """
    size = sum(f.params * f.bits[k] for f, k in zip(frontiers, picks))
    used = math.fsum(f.energy[k] for f, k in zip(frontiers, picks))
    size_unit, energy_unit = max(cap, 1), max(e_cap, _TINY)
    while True:
        best = None
        for i, f in enumerate(frontiers):
            k = picks[i]
            for j in range(len(f.bits)):
                gain = f.omega[k] - f.omega[j]
                if gain <= 0:
                    continue
                d_size = f.params * (f.bits[j] - f.bits[k])
                d_energy = f.energy[j] - f.energy[k]
                if size + d_size > cap or used + d_energy > e_cap:
                    continue
                cost = max(d_size, 0) / size_unit + max(d_energy, 0.0) / energy_unit
                key = (-gain / cost if cost > 0 else -math.inf, -gain)
                if best is None or key < best[0]:
                    best = (key, i, j, d_size, d_energy)
        if best is None:
            return picks
        _, i, j, d_size, d_energy = best
        picks[i] = j
        size += d_size
        used += d_energy


def _feasible_or_raise(frontiers: list[_Frontier], cap: int, e_cap: float, budget: float | None,
                       energy_budget: float, energy_fixed: float, e_lo: float,
                       e_hi: float) -> list[int]:
    """A plan meeting both capacities (the MILP's), or a ValueError naming the reachable energy."""
    try:
        picks, _ = _milp(frontiers, cap, e_cap)
        return picks
    except _Infeasible:
        pass
    # the lowest energy within the bit budget, for the message
    lowest = None
    with contextlib.suppress(RuntimeError):
        energy_frontiers = [dataclasses.replace(f, omega=f.energy) for f in frontiers]
        picks, _ = _milp(energy_frontiers, cap, None)
        lowest = energy_fixed + math.fsum(f.energy[k] for f, k in zip(frontiers, picks))
    within = "" if lowest is None else f"; the lowest within {budget:g} average bits is {lowest:.6g}"
    raise ValueError(f"energy_budget {energy_budget:.6g} is unreachable together with budget "
                     f"{budget:g} average bits: these candidates reach [{e_lo:.6g}, {e_hi:.6g}] in "
                     f"its unit{within}; raise either budget")


def _milp(frontiers: list[_Frontier], cap: int, e_cap: float | None = None) -> tuple[list[int], str]:
    """Exact multiple-choice knapsack via HiGHS, with an energy row when ``e_cap`` is given.

    Returns (picks, solver status text). Raises :class:`_Infeasible` when no plan fits.
    """
    from scipy.optimize import LinearConstraint, milp
    from scipy.sparse import csr_array

    if not frontiers:
        return [], "no free layers"
    counts = [len(f.bits) for f in frontiers]
    starts = np.concatenate([[0], np.cumsum(counts)])
    n_var = int(starts[-1])
    cost = np.array([f.params * b for f in frontiers for b in f.bits], dtype=np.int64)
    omega = np.array([s for f in frontiers for s in f.omega], dtype=np.float64)

    # Divide the size row by its gcd: smaller exact integers, same feasible set.
    g = int(np.gcd.reduce(cost))
    row_cost = cost // g
    row_cap = cap // g
    # Scale Ω to O(1): HiGHS tolerances are absolute, and Hessian scores can be 1e-8 or 1e6.
    scale = float(omega.max()) or 1.0
    c = omega / scale

    rows = np.repeat(np.arange(len(frontiers)), counts)
    one_hot = csr_array((np.ones(n_var), (rows, np.arange(n_var))), shape=(len(frontiers), n_var))
    choose_one = LinearConstraint(one_hot, 1, 1)

    last_msg = ""
    # If HiGHS's feasibility tolerance lets a plan exceed the exact integer capacity, tighten the
    # right-hand side by half a unit, which excludes that plan and no plan that truly fits. The
    # energy row is in floats: it is scaled to a capacity of 1 and tightened by 1e-6 on the retry.
    energy = None if e_cap is None else np.array([e for f in frontiers for e in f.energy])
    for margin in (0.0, 0.5):
        size_row = LinearConstraint(row_cost.astype(np.float64)[None, :], -np.inf,
                                    row_cap - margin)
        rows_needed = [choose_one, size_row]
        if energy is not None:
            unit = max(abs(e_cap), _TINY)
            rows_needed.append(LinearConstraint((energy / unit)[None, :], -np.inf,
                                                e_cap / unit - 2e-6 * margin))
        with _quiet_c_stdout(), warnings.catch_warnings():
            # HiGHS stops at a 1e-4 relative or 1e-6 absolute gap by default; the gap we report
            # must be exact. scipy only knows mip_rel_gap and passes the rest on with a warning.
            warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
            res = milp(
                c,
                integrality=np.ones(n_var),
                bounds=(0, 1),
                constraints=rows_needed,
                options={"time_limit": _MILP_TIME_LIMIT_S, "mip_rel_gap": 0.0,
                         "mip_abs_gap": 0.0},
            )
        last_msg = f"status {res.status}: {res.message}"
        if res.status == 2:
            raise _Infeasible(last_msg)
        if res.x is None or res.status not in (0, 1):
            raise RuntimeError(f"MILP bit allocation failed ({last_msg}); use method='greedy'")
        picks = [int(np.argmax(res.x[starts[i]:starts[i + 1]])) for i in range(len(frontiers))]
        size = sum(f.params * f.bits[k] for f, k in zip(frontiers, picks))
        used = 0.0 if energy is None else math.fsum(f.energy[k] for f, k in zip(frontiers, picks))
        if size <= cap and (e_cap is None or used <= e_cap):
            # Scores far below the largest one sit inside HiGHS's absolute tolerances; a cheap
            # upgrade pass picks up whatever those let slip (it never makes the plan worse).
            if e_cap is None:
                _upgrade(frontiers, picks, cap - size)
            else:
                _upgrade_two(frontiers, picks, cap, e_cap)
            if res.status == 1:
                logger.warning("MILP hit its %.0f s limit; the plan is feasible but may not be "
                               "optimal (%s)", _MILP_TIME_LIMIT_S, res.message)
            return picks, "optimal" if res.status == 0 else "time_limit"
    raise RuntimeError(f"MILP returned a plan over the budget twice ({last_msg}); use "
                       "method='greedy'")


@contextlib.contextmanager
def _quiet_c_stdout() -> Iterator[None]:
    """Send C-level stdout to /dev/null for the duration of the block.

    HiGHS 1.12 (bundled with scipy 1.17) prints a stray debug line,
    "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();", from C++ straight
    to fd 1 on some problems whatever the ``disp`` option says (ERGO-Code/HiGHS#2783). It is
    harmless but reads like an error in the CLI, so we mute fd 1 around the solve only.
    """
    # C code writes to fd 1 whatever Python's sys.stdout points at.
    try:
        saved = os.dup(1)
    except OSError:
        yield  # fd 1 is closed: nothing to mute
        return
    with contextlib.suppress(Exception):
        sys.stdout.flush()  # pending Python output must not land in /dev/null
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _exact(frontiers: list[_Frontier], cap: int, greedy_picks: list[int],
           e_cap: float | None = None) -> tuple[list[int], str]:
    """MILP optimum, never worse than the greedy plan.

    HiGHS is exact only up to its tolerances, about 1e-7 of the largest score after our scaling;
    on tables whose scores span more than that it can settle for a plan a hair worse than the
    greedy one. Keeping the better of the two makes ``method="milp"`` dominate ``"greedy"``.

    Raises:
        RuntimeError: If the solver fails.
    """
    try:
        picks, status = _milp(frontiers, cap, e_cap)
    except _Infeasible:
        # greedy's plan is feasible, so this is the solver's tolerance talking
        return list(greedy_picks), "greedy (MILP reported infeasible)"
    if _omega(frontiers, greedy_picks) < _omega(frontiers, picks):
        logger.debug("MILP plan worse than greedy by %.3g (solver tolerance); using greedy's",
                     _omega(frontiers, picks) - _omega(frontiers, greedy_picks))
        return list(greedy_picks), status
    return picks, status


def _record_milp_check(meta: dict, frontiers: list[_Frontier], cap: int, greedy_picks: list[int],
                       omega_fixed: float, e_cap: float | None = None) -> None:
    t0 = time.perf_counter()
    try:
        picks, status = _exact(frontiers, cap, greedy_picks, e_cap)
    except RuntimeError as exc:
        # The greedy plan is valid on its own; a failed cross-check must not lose it.
        logger.warning("MILP cross-check skipped: %s", exc)
        meta["milp_error"] = str(exc)
        return
    meta["milp_seconds"] = time.perf_counter() - t0
    meta["milp_status"] = status
    omega_milp = _omega(frontiers, picks) + omega_fixed
    omega_greedy = _omega(frontiers, greedy_picks) + omega_fixed
    meta["omega_milp"] = omega_milp
    # _exact never returns worse than greedy, so the gap is ≥ 0 up to round-off in the sums.
    meta["gap"] = max((omega_greedy - omega_milp) / max(omega_milp, _TINY), 0.0)


def _omega(frontiers: list[_Frontier], picks: list[int]) -> float:
    return math.fsum(f.omega[k] for f, k in zip(frontiers, picks))


def _fixed_omega(table: Mapping[str, Mapping[Candidate, float]],
                 fixed: Mapping[str, Candidate]) -> float:
    return math.fsum(table[n][c] for n, c in fixed.items())


def _build_plan(
    table: Mapping[str, Mapping[Candidate, float]],
    params: Mapping[str, int],
    fixed: Mapping[str, Candidate],
    frontiers: list[_Frontier],
    picks: list[int],
    budget: float,
    method: str,
    meta: dict,
) -> Plan:
    chosen = {f.name: (f.schemes[k], f.bits[k], f.omega[k]) for f, k in zip(frontiers, picks)}
    for name, (scheme, b) in fixed.items():
        chosen[name] = (scheme, b, table[name][(scheme, b)])
    layers = tuple(LayerChoice(name, *chosen[name][:2], params[name], chosen[name][2])
                   for name in table)
    meta = dict(meta, n_protected=len(fixed))
    return Plan(layers, budget=budget, method=method, meta=meta)
