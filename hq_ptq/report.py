"""A run's report: ``report.json`` (everything, machine readable), ``report.md`` (for people) and PNG plots.

Plots are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas), never through ``pyplot``, so writing a
report neither needs a display nor changes the caller's matplotlib backend. Every file is written
atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hq_ptq.compression import FP_BITS, weight_compression
from hq_ptq.energy import EnergyReport
from hq_ptq.files import atomic_write
from hq_ptq.plan import Plan

__all__ = ["BOTTLENECK_BITS", "REPORT_VERSION", "bottleneck_layers", "pot_saving_layers", "write_report"]

log = logging.getLogger(__name__)

REPORT_VERSION = 1
# The seed paper calls the layers its search leaves at high precision "bottleneck layers that require
# high-precision weights"; 6 bits is the smallest width above every candidate of the low-bit regime.
BOTTLENECK_BITS = 6

# results keys read for the summary, first match wins (pipeline.RunResult uses the first of each)
_FP_KEYS = ("fp_accuracy", "fp32_accuracy")
_Q_KEYS = ("q_accuracy", "quant_accuracy", "accuracy")
_SCHEME_COLOURS = {"uniform": "#1f77b4", "pot": "#ff7f0e"}
_OTHER_COLOUR = "#7f7f7f"
_KIND_STYLE = {
    "hetero": dict(color="#d62728", marker="o"),
    "uniform": dict(color=_SCHEME_COLOURS["uniform"], marker="s"),
    "pot": dict(color=_SCHEME_COLOURS["pot"], marker="^"),
}


def bottleneck_layers(plan: Plan, min_bits: int = BOTTLENECK_BITS) -> list[str]:
    """Names of the layers the plan keeps at ``min_bits`` or more, in model order."""
    return [c.name for c in plan.layers if c.bits >= min_bits]


def pot_saving_layers(energy: EnergyReport) -> list[str]:
    """Layers quantized power-of-two whose inputs are not binary spikes: where PoT saves energy (a multiply
    becomes a shift or an exponent add, docs/ENERGY.md §2), in model order."""
    return [e.name for e in energy.layers if e.scheme == "pot" and e.kind != "spike"]


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    plan: Plan,
    results: Mapping[str, Any],
    sweep: Iterable[Mapping[str, Any]] | None = None,
    energy: EnergyReport | None = None,
    sizes: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``allocation.png`` and (with a sweep) ``pareto.png``.

    Args:
        out_dir: Folder to write into (created if missing).
        plan: The quantization plan of the run.
        results: Run results; ``fp_accuracy`` and ``q_accuracy`` (fractions in [0, 1]) feed the summary,
            ``ptq_accuracy``, ``recipe``, ``budget`` and anything else JSON-able are kept as given.
        sweep: Accuracy-vs-bits points, each ``{"label", "kind": "hetero"|"uniform"|"pot"|...,
            "avg_bits", "accuracy", ...}``; an ``energy_fraction`` (estimated energy / FP32) adds the
            accuracy-energy column.
        energy: From :func:`hq_ptq.energy.estimate_energy`.
        sizes: File or storage sizes, e.g. ``{"fp32_bytes": ..., "packed_bytes": ...}``.

    Returns:
        File kind (``"json"``, ``"md"``, ``"allocation"``, ``"pareto"``) → path written.

    Raises:
        ValueError: ``plan`` is not a Plan, ``results`` is not a dict, or a sweep entry lacks a key.
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be an hq_ptq Plan, got {type(plan).__name__}")
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    points = _check_sweep(sweep)
    summary = _summary(plan, results, energy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bottlenecks = bottleneck_layers(plan)
    paths: dict[str, Path] = {}
    paths["allocation"] = _write_png(out / "allocation.png", lambda: _allocation_figure(plan))
    if points:
        paths["pareto"] = _write_png(out / "pareto.png", lambda: _pareto_figure(points, summary, plan))
    files = {k: p.name for k, p in paths.items()}
    files.update(json="report.json", md="report.md")

    doc = {
        "version": REPORT_VERSION,
        "summary": summary,
        "bottleneck_bits": BOTTLENECK_BITS,
        "bottlenecks": bottlenecks,
        "plan": plan.to_dict(),
        "results": dict(results),
        "sweep": points,
        "energy": energy.to_dict() if energy is not None else None,
        "sizes": dict(sizes) if sizes is not None else None,
        "files": files,
    }
    text = json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n"
    paths["json"] = _write_text(out / "report.json", text)
    md = _markdown(plan, results, summary, bottlenecks, points, energy, sizes, files)
    paths["md"] = _write_text(out / "report.md", md)
    log.info("wrote report to %s (%s)", out, ", ".join(sorted(files.values())))
    return paths


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def _first(results: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = results.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return _fraction(value, key)
    return None


def _fraction(value: float, what: str) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"{what} must be an accuracy fraction in [0, 1], got {value}; "
                         "divide percentages by 100")
    return float(value)


def _summary(plan: Plan, results: Mapping[str, Any], energy: EnergyReport | None) -> dict[str, Any]:
    fp_acc, q_acc = _first(results, _FP_KEYS), _first(results, _Q_KEYS)
    schemes: dict[str, int] = {}
    for c in plan.layers:
        schemes[c.scheme] = schemes.get(c.scheme, 0) + 1
    summary: dict[str, Any] = {
        "fp_accuracy": fp_acc,
        "q_accuracy": q_acc,
        "accuracy_drop": fp_acc - q_acc if fp_acc is not None and q_acc is not None else None,
        "avg_bits": plan.avg_bits,
        "budget": plan.budget,
        "method": plan.method,
        # weight compression (hq_ptq.compression): SpikeHQ's 32 / average bits, codes only
        "compression": weight_compression(plan.avg_bits),
        "weight_bits": plan.size_bits,
        "fp32_weight_bits": FP_BITS * plan.total_params,
        "total_params": plan.total_params,
        "layers": len(plan),
        "layers_per_scheme": schemes,
    }
    if energy is not None:
        t = energy.totals()
        summary.update(energy_fp32_uj=t["fp32_pj"] / 1e6, energy_quant_uj=t["quant_pj"] / 1e6,
                       energy_ratio=t["ratio"], pot_saving_layers=pot_saving_layers(energy))
    return summary


def _check_sweep(sweep: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if sweep is None:
        return []
    points = []
    for i, entry in enumerate(sweep):
        if not isinstance(entry, Mapping):
            raise ValueError(f"sweep entry {i} must be a dict, got {type(entry).__name__}")
        missing = [k for k in ("label", "kind", "avg_bits", "accuracy") if k not in entry]
        if missing:
            raise ValueError(f"sweep entry {i} ({entry.get('label', '?')!r}) lacks key {missing[0]!r}; "
                             "each needs label, kind, avg_bits and accuracy")
        acc = _float(entry["accuracy"])
        if acc is not None:
            _fraction(acc, f"sweep entry {i} ({entry['label']!r}) accuracy")
        points.append(dict(entry))
    return points


def _jsonable(value: Any) -> Any:
    """Builtins only, NaN/inf → None, so report.json is strict JSON that any parser reads."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x: Any, fmt: str = ".3g") -> str:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return format(x, fmt) if math.isfinite(x) else "n/a"
    return "n/a" if x is None else _cell(x)


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _integer_facts(integer: Mapping[str, Any] | None) -> list[str]:
    """The integer-only model's line per membrane width (``results["integer"]``, from
    :func:`hq_ptq.pipeline.integer_check`)."""
    if not integer:
        return []
    if "refused" in integer:
        return [f"- integer-only model: not built ({_cell(integer['refused'])})"]
    out = []
    for row in integer["widths"]:
        out.append(
            f"- integer-only, {row['membrane_bits']}-bit membranes: "
            f"accuracy {_pct(row['integer_accuracy'])} "
            f"(fake-quant {_pct(row['fake_accuracy'])}), spikes differing {100 * row['spike_mismatch']:.2f}%"
        )
    width = integer.get("smallest_width_within_0.1pt")
    out.append(f"- smallest membrane width within 0.1 point of fake-quant: {width or 'none of those tried'}")
    return out


def _markdown(
    plan: Plan,
    results: Mapping[str, Any],
    summary: Mapping[str, Any],
    bottlenecks: list[str],
    sweep: list[dict[str, Any]],
    energy: EnergyReport | None,
    sizes: Mapping[str, Any] | None,
    files: Mapping[str, str],
) -> str:
    title = results.get("recipe") or results.get("model") or "run"
    lines = [f"# hq_ptq report: {_cell(title)}", ""]
    drop = summary["accuracy_drop"]
    lines += [
        "| | FP32 | quantized |",
        "|---|---|---|",
        f"| accuracy | {_pct(summary['fp_accuracy'])} | {_pct(summary['q_accuracy'])} |",
        f"| average weight bits | {FP_BITS} | {summary['avg_bits']:.3f} |",
        f"| weight storage (Mbit) | {summary['fp32_weight_bits'] / 1e6:.3f} | "
        f"{summary['weight_bits'] / 1e6:.3f} |",
    ]
    if energy is not None:
        t = energy.totals()
        lines.append(f"| energy per inference (µJ) | {t['fp32_pj'] / 1e6:.4g} | {t['quant_pj'] / 1e6:.4g} |")
    lines.append("")
    facts = [
        f"- accuracy drop: {'n/a' if drop is None else f'{100 * drop:.2f} points'}",
        f"- compression (32 / average bits, weights only): {summary['compression']:.2f}×",
        f"- plan: {len(plan)} layers, {plan.total_params:,} weights, method `{plan.method}`, budget "
        f"{_num(plan.budget)}; schemes "
        + ", ".join(f"{k}: {v}" for k, v in summary["layers_per_scheme"].items()),
    ]
    if "ptq_accuracy" in results:
        facts.append(f"- accuracy before fine-tuning (PTQ only): {_pct(_first(results, ('ptq_accuracy',)))}")
    facts += _integer_facts(results.get("integer"))
    meta = plan.meta if isinstance(plan.meta, Mapping) else {}
    if meta.get("dead_layers"):
        facts.append(
            "- dead layers (trace zero on the calibration data, ranked least sensitive): "
            + ", ".join(f"`{_cell(n)}`" for n in meta["dead_layers"])
        )
    if meta.get("float_layers"):
        left = meta["float_layers"]
        facts.append(
            "- left float32 (a layer type hq_ptq does not quantize; not in the average bits): "
            + ", ".join(f"`{_cell(n)}` ({v['type']}, {v['weights']:,} weights)" for n, v in left.items())
        )
    if meta.get("released"):
        facts.append(
            "- protection released to reach the budget (searched like the other layers): "
            + ", ".join(f"`{_cell(n)}`" for n in meta["released"])
        )
    if energy is not None:
        t = energy.totals()
        facts.append(
            f"- energy ratio FP32 / quantized: {t['ratio']:.2f}× (compute {t['fp32_compute_pj'] / 1e6:.4g} → "
            f"{t['quant_compute_pj'] / 1e6:.4g} µJ, weight reads {t['fp32_memory_pj'] / 1e6:.4g} → "
            f"{t['quant_memory_pj'] / 1e6:.4g} µJ; 45 nm model, T={energy.time_steps}, see docs/ENERGY.md)"
        )
        saving = pot_saving_layers(energy)
        facts.append(
            "- power-of-two where it saves energy (inputs not binary spikes, multiply → shift or exponent "
            "add): " + (", ".join(f"`{_cell(n)}`" for n in saving) if saving else "none")
        )
    if isinstance(meta.get("energy_fraction"), (int, float)):
        wanted = meta.get("energy_budget")
        facts.append(
            f"- search's energy estimate (calibration data): {100 * meta['energy_fraction']:.2f}% of FP32"
            + (f", energy budget {100 * wanted:.4g}%" if isinstance(wanted, (int, float)) else "")
        )
    lines += facts + [""]

    if energy is not None:
        lines += _operations_table(energy)

    lines += [f"## Bottleneck layers (≥ {BOTTLENECK_BITS} bits)", ""]
    protected = set(plan.meta.get("protected") or ()) if isinstance(plan.meta, Mapping) else set()
    if bottlenecks:
        for name in bottlenecks:
            c = plan[name]
            note = " (protected, not searched)" if name in protected else ""
            lines.append(f"- `{_cell(name)}`: {c.scheme} {c.bits} bits, {c.params:,} weights{note}")
    else:
        lines.append(f"None: the search put every layer below {BOTTLENECK_BITS} bits.")
    lines.append("")

    per_layer = {e.name: e for e in energy.layers} if energy is not None else {}
    lines += ["## Per-layer plan", ""]
    head = "| # | layer | scheme | bits | weights | sensitivity |"
    rule = "|---|---|---|---|---|---|"
    if per_layer:
        head += " kind | energy FP32 (nJ) | energy quant (nJ) |"
        rule += "---|---|---|"
    lines += [head, rule]
    for i, c in enumerate(plan.layers):
        row = f"| {i} | `{_cell(c.name)}` | {c.scheme} | {c.bits} | {c.params:,} | {_num(c.sensitivity)} |"
        if per_layer:
            e = per_layer.get(c.name)
            row += (f" {e.kind} | {e.fp32_pj / 1e3:.4g} | {e.quant_pj / 1e3:.4g} |" if e is not None
                    else " n/a | n/a | n/a |")
        lines.append(row)
    lines.append("")

    if sweep:
        # the accuracy-energy points, when the sweep knows each plan's energy
        with_energy = any(_float(p.get("energy_fraction")) is not None for p in sweep)
        head = "| label | kind | avg bits | accuracy |" + (" energy (% of FP32) |" if with_energy else "")
        title = "## Accuracy against average bits" + (" and energy" if with_energy else "")
        lines += [title, "", head, "|---|---|---|---|" + ("---|" if with_energy else "")]
        for p in sorted(sweep, key=lambda p: (str(p["kind"]), _float(p["avg_bits"]))):
            row = (f"| {_cell(p['label'])} | {_cell(p['kind'])} | {_num(p['avg_bits'], '.3f')} | "
                   f"{_pct(_float(p['accuracy']))} |")
            if with_energy:
                row += f" {_pct(_float(p.get('energy_fraction')))} |"
            lines.append(row)
        if with_energy:
            lines.append("")
            lines.append("Energy: the search's 45 nm estimate on the calibration data (docs/ENERGY.md).")
        lines.append("")
    if sizes:
        lines += ["## Sizes", "", "| item | value |", "|---|---|"]
        for key, value in sizes.items():
            lines.append(f"| {_cell(key)} | {_num(value, ',') if isinstance(value, int) else _num(value)} |")
        lines.append("")

    lines += ["## Plots", "", f"![bit allocation]({files['allocation']})", ""]
    if "pareto" in files:
        lines += [f"![accuracy against average bits]({files['pareto']})", ""]
    return "\n".join(lines)


def _operations_table(energy: EnergyReport) -> list[str]:
    """Synaptic operations and memory per inference, FP32 against quantized (NeuroBench's names)."""
    ops = energy.operations()
    fp, q = ops["fp32"], ops["quantized"]
    weights = ops["weight_memory_bits"]
    state = ops["neuron_state_memory_bits"]
    lines = [
        "## Operations and memory per inference",
        "",
        "| | FP32 | quantized |",
        "|---|---|---|",
        *(f"| {label} | {_num(fp[key], '.4g')} | {_num(q[key], '.4g')} |" for label, key in (
            ("accumulates (Effective_ACs)", "Effective_ACs"),
            ("shift-and-adds (power-of-two weights)", "shifts"),
            ("multiply-accumulates (Effective_MACs)", "Effective_MACs"),
        )),
        f"| dense MACs (Dense) | {_num(ops['Dense'], '.4g')} | {_num(ops['Dense'], '.4g')} |",
        f"| weight memory (kbit) | {weights['fp32'] / 1e3:.4g} | {weights['quantized'] / 1e3:.4g} |",
    ]
    if state is None:
        lines.append("| neuron-state memory (kbit) | n/a | n/a |")
    else:
        lines.append(f"| neuron-state memory (kbit) | {state['fp32_bits'] / 1e3:.4g} | "
                     f"{state['quant_bits'] / 1e3:.4g} |")
    lines.append("")
    note = (f"Per inference (one sample, T={energy.time_steps}). The compute energy above is these counts "
            "times the 45 nm energy per operation; weight reads are priced from the weight bits "
            "(docs/ENERGY.md §8).")
    if state is not None:
        note += (f" Neuron state: {state['elements']:,} membrane elements × 32 bits (FP32) / "
                 f"× {state['membrane_bits']} bits (quantized).")
    return lines + [note, ""]


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _write_png(path: Path, make_figure: Any) -> Path:
    fig = make_figure()
    # The temp name ends in .tmp, so the format must be explicit.
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _allocation_figure(plan: Plan):
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layers = plan.layers
    n = len(layers)
    fig = Figure(figsize=(8.5, 1.4 + 0.3 * n))
    ax = fig.subplots()
    ys = list(range(n))
    colours = [_SCHEME_COLOURS.get(c.scheme, _OTHER_COLOUR) for c in layers]
    ax.barh(ys, [c.bits for c in layers], color=colours, height=0.7)
    ax.set_yticks(ys, [c.name for c in layers], fontsize=8)
    ax.invert_yaxis()  # model order top to bottom
    ax.set_xlabel("weight bits")
    ax.set_xlim(0, max(c.bits for c in layers) + 1)
    ax.axvline(plan.avg_bits, color="k", linestyle=":", linewidth=1)
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=col, label=s) for s, col in _SCHEME_COLOURS.items()
               if any(c.scheme == s for c in layers)]
    handles += [Patch(color=_OTHER_COLOUR, label=s) for s in dict.fromkeys(c.scheme for c in layers)
                if s not in _SCHEME_COLOURS]
    sens = [(y, c.sensitivity) for y, c in zip(ys, layers)
            if c.sensitivity is not None and math.isfinite(c.sensitivity) and c.sensitivity > 0]
    if sens:
        top = ax.twiny()
        top.plot([s for _, s in sens], [y for y, _ in sens], "kD", markersize=4, label="sensitivity Ω")
        top.set_xscale("log")
        top.set_xlabel("sensitivity Ω of the chosen candidate (log)")
        top.set_ylim(ax.get_ylim())
        handles += top.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    ax.set_title(f"bit allocation: average {plan.avg_bits:.2f} bits (dotted)", fontsize=10,
                 pad=24 if sens else 6)
    return fig


def _pareto_figure(points: list[dict[str, Any]], summary: Mapping[str, Any], plan: Plan):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    kinds = list(dict.fromkeys(str(p["kind"]) for p in points))
    for kind in kinds:
        pts = sorted(
            ((_float(p["avg_bits"]), _float(p["accuracy"])) for p in points if str(p["kind"]) == kind),
            key=lambda xy: xy[0] if xy[0] is not None else math.inf,
        )
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        if not pts:
            continue
        style = _KIND_STYLE.get(kind, dict(color=_OTHER_COLOUR, marker="x"))
        ax.plot([x for x, _ in pts], [100 * y for _, y in pts], linestyle="-", label=kind, **style)
    fp = summary.get("fp_accuracy")
    if fp is not None:
        ax.axhline(100 * fp, color="k", linestyle="--", linewidth=1, label="FP32")
    q = summary.get("q_accuracy")
    if q is not None:
        ax.plot([plan.avg_bits], [100 * q], marker="*", markersize=14, color="#2ca02c", linestyle="none",
                label="this run")
    ax.set_xlabel("average weight bits (parameter-weighted)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy against average bits", fontsize=10)
    return fig
