"""The search space of a configuration: which (scheme, bits) candidates the search may choose, and which
layers are held outside it (protection), including the rule by which default protection yields to a budget.

Shared by the Hessian-guided search (:mod:`hq_ptq.api`) and the Gumbel-softmax baseline (:mod:`hq_ptq.dnas`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from hq_ptq.config import QuantConfig
from hq_ptq.schemes import SCHEMES

__all__ = ["Candidate", "candidates", "protected_layers", "settle_protection", "yielding_layers"]

Candidate = tuple[str, int]


def candidates(config: QuantConfig) -> list[tuple[str, int]]:
    """Every (scheme, bits) the search may choose, from the allowed schemes and bit widths."""
    out = []
    for name in config.search.schemes:
        if name not in SCHEMES:
            raise ValueError(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}")
        for b in SCHEMES[name].bits:
            if not config.search.bits or b in config.search.bits:
                out.append((name, b))
    supported = sorted({b for name in config.search.schemes for b in SCHEMES[name].bits})
    unknown = [b for b in config.search.bits if b not in supported]
    if unknown:
        raise ValueError(
            f"search.bits {unknown} not supported by schemes {list(config.search.schemes)}; "
            f"choose from {supported}"
        )
    if not out:
        raise ValueError(
            f"no candidate left: schemes {config.search.schemes} allow none of bits {config.search.bits}"
        )
    return out


def protected_layers(names: list[str], config: QuantConfig) -> dict[str, Candidate]:
    """Layers held at ``protect_scheme``/``protect_bits``: the globs in ``protect`` plus first and last."""
    s = config.search
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in s.protect)]
    if s.protect_first_last and len(names) > 2:
        chosen += [names[0], names[-1]]
    return {n: (s.protect_scheme, s.protect_bits) for n in dict.fromkeys(chosen)}


def yielding_layers(names: list[str], config: QuantConfig) -> tuple[str, ...]:
    """The protected layers that may be released into the search (see :func:`settle_protection`): the
    default first/last layers. Layers named by ``search.protect`` globs never yield: the user asked."""
    s = config.search
    if not (s.protect_first_last and len(names) > 2):
        return ()
    asked = {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in s.protect)}
    return tuple(n for n in dict.fromkeys([names[0], names[-1]]) if n not in asked)


def settle_protection(
    protected: dict[str, Candidate],
    yielding: Iterable[str],
    sizes: dict[str, int],
    budget: float,
    config: QuantConfig,
) -> tuple[dict[str, Candidate], list[str]]:
    """The layers protected at ``budget`` and those released into the search: ``(protected, released)``.

    Rule: protection never makes a budget unreachable on its own. While the smallest reachable average
    (protected layers at their bits, every other layer at the fewest allowed bits) is above the budget,
    the largest still-protected layer among ``yielding`` (the default first/last layers) is released and
    searched like any other layer (:func:`search_plan` warns naming it). Layers protected by
    ``search.protect`` are kept.

    Raises:
        ValueError: the budget is unreachable even so; the message gives the reachable range and the knobs.
    """
    kept = dict(protected)
    released: list[str] = []
    total = sum(sizes.values())
    bits = [b for _, b in candidates(config)]

    def reach() -> tuple[float, float]:
        fixed = sum(sizes[n] * b for n, (_, b) in kept.items())
        free = sum(n for name, n in sizes.items() if name not in kept)
        return (fixed + free * min(bits)) / total, (fixed + free * max(bits)) / total

    for name in sorted(yielding, key=lambda n: -sizes[n]):
        if reach()[0] <= budget + 1e-9:
            break
        del kept[name]
        released.append(name)
    lo, hi = reach()
    if lo > budget + 1e-9:
        s = config.search
        held = f" with {sorted(kept)} held at {s.protect_scheme} {s.protect_bits} bits" if kept else ""
        raise ValueError(
            f"budget {budget:g} average bits is unreachable: schemes {list(s.schemes)} with "
            f"{'bits ' + str(list(s.bits)) if s.bits else 'all their bit widths'}{held} reach "
            f"[{lo:.4g}, {hi:.4g}] average bits; raise the budget or change search.bits, search.schemes, "
            "search.protect, search.protect_first_last or search.protect_bits"
        )
    return kept, released
