"""The benchmark's claims, decided by code from the measured rows (``holds`` is True, False or None)."""

from __future__ import annotations

import math
from typing import Any

HETERO = ("ours-greedy", "ours-milp")
# a homogeneous and a heterogeneous row count as "equal average bits" within this many bits
EQUAL_BITS_TOL = 0.1


def pts(x: float) -> str:
    return f"{100 * x:.2f}"


def paired_interval(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of ``a[i] - b[i]`` over paired seeds with its 95% Student-t interval, and the verdict.

    ``"better"`` (a above b) or ``"worse"`` only when the interval excludes 0, else ``"tie"``; with one
    seed there is no interval and the verdict is ``"tie"``.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_interval needs the same seeds on both sides, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    if n < 2:
        return {"mean": mean, "half_width": math.inf, "n": n, "verdict": "tie"}
    from scipy.stats import t

    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    verdict = "better" if mean - half > 0 else "worse" if mean + half < 0 else "tie"
    return {"mean": mean, "half_width": half, "n": n, "verdict": verdict}


def claims(results: dict) -> list[dict[str, Any]]:
    """The issue's three claims, decided from the measured rows (``holds`` is True, False or None)."""
    rows = results["rows"]
    fp = results["fp_accuracy"]
    sample = 1 / results["n_test"]
    hetero = [r for r in rows if r["family"] in HETERO]
    out = []

    def compare(a: dict, b: dict) -> tuple[bool | None, str]:
        """``holds`` for "a >= b" and the detail: with per-seed QAT accuracies on both rows, their paired 95%
        interval decides (better: holds, worse: fails, tie: None); a single measurement decides nothing."""
        d = a["accuracy"] - b["accuracy"]
        head = f"{'+' if d >= 0 else ''}{pts(d)} pts ({d / sample:+.0f} test samples)"
        seeds_a, seeds_b = a.get("qat_accuracy"), b.get("qat_accuracy")
        if not seeds_a or not seeds_b or len(seeds_a) != len(seeds_b) or len(seeds_a) < 2:
            return None, f"{head}; one measurement per row, no interval: undecided"
        res = paired_interval(seeds_a, seeds_b)
        holds = {"better": True, "worse": False, "tie": None}[res["verdict"]]
        return holds, (f"{head}; paired over {res['n']} seeds {'+' if res['mean'] >= 0 else ''}"
                       f"{pts(res['mean'])} ± {pts(res['half_width'])} pts (95%): {res['verdict']}")

    # 1a. heterogeneous vs the best homogeneous row at (about) equal average bits
    levels: dict[float, list[dict]] = {}
    for r in rows:
        if r["family"] in ("uniform", "pot"):
            levels.setdefault(round(r["avg_bits"], 6), []).append(r)
    for level, group in sorted(levels.items(), reverse=True):
        best = max(group, key=lambda r: r["accuracy"])
        near = [h for h in hetero if level - EQUAL_BITS_TOL <= h["avg_bits"] <= level + 1e-9]
        claim = f"at {level:.3f} bits, heterogeneous >= best homogeneous ({best['label']})"
        if not near:
            out.append({"claim": claim, "holds": None,
                        "detail": f"no heterogeneous row within {EQUAL_BITS_TOL} bits below {level:.3f}; "
                                  "not measured at equal bits"})
            continue
        h = max(near, key=lambda r: (r["avg_bits"], r["accuracy"]))
        holds, detail = compare(h, best)
        out.append({"claim": claim, "holds": holds, "tie": holds is None,
                    "detail": f"{h['label']} ({h['avg_bits']:.3f} bits) {pts(h['accuracy'])}% vs "
                              f"{best['label']} {pts(best['accuracy'])}%: {detail}"})

    # 1b. heterogeneous vs uniform-only mixed precision at the compare budget
    mp = next((r for r in rows if r["family"] == "uniform-mp"), None)
    if mp is not None:
        for h in [r for r in hetero if r["budget"] == mp["budget"]]:
            holds, detail = compare(h, mp)
            out.append({"claim": f"{h['label']} >= uniform-only MP at {mp['budget']:g}",
                        "holds": holds, "tie": holds is None,
                        "detail": f"{pts(h['accuracy'])}% ({h['avg_bits']:.3f} bits) vs "
                                  f"{pts(mp['accuracy'])}% ({mp['avg_bits']:.3f} bits): {detail}"})

    # 2. search speed against the differentiable search, at equal or better accuracy
    dn = next((r for r in rows if r["family"] == "dnas"), None)
    searched = [r for r in rows if dn and r["family"] in ("ours-greedy", "ours-fisher", "ours-hessian")
                and r["budget"] == dn["budget"]]
    for ours in searched:
        speed = dn["search_seconds"] / ours["search_seconds"]
        acc_holds, acc_detail = compare(ours, dn)
        acc_ok = acc_holds is not False  # "equal or better": a tie counts as equal
        per_step = dn["dnas"]["seconds"] / dn["dnas"]["steps"]
        out.append({"claim": f"our search ({ours['label']}) >= 10x faster than DNAS at equal or better "
                             "accuracy",
                    "holds": speed >= 10 and acc_ok,
                    "detail": f"ours {ours['search_seconds']:.1f} s vs DNAS {dn['search_seconds']:.1f} s "
                              f"({dn['dnas']['steps']} steps): {speed:.1f}x; accuracy "
                              f"{pts(ours['accuracy'])}% vs {pts(dn['accuracy'])}%: {acc_detail}; "
                              f"at {per_step:.2f} s/step DNAS would reach 10x our search time after "
                              f"{10 * ours['search_seconds'] / per_step:.0f} steps"})

    # 3. drop against FP at 3.5 and 3.0 bits
    for b in (3.5, 3.0):
        r = next((r for r in rows if r["family"] == "ours-greedy" and r["budget"] == b), None)
        if r is not None:
            out.append({"claim": f"drop against FP at {b:g} bits (ours greedy)", "holds": None,
                        "detail": f"{pts(fp)}% -> {pts(r['accuracy'])}% after QAT "
                                  f"(drop {pts(fp - r['accuracy'])} pts; PTQ alone drop "
                                  f"{pts(fp - r['ptq_accuracy'])} pts)"})
    return out


