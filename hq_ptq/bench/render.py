"""The benchmark's outputs: Markdown section, Pareto plot (matplotlib imported when plotting), JSON, and the
generated block of docs/BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

from hq_ptq.bench.verdicts import claims, pts
from hq_ptq.files import atomic_write, atomic_write_text

BEGIN, END = "<!-- pareto:begin -->", "<!-- pareto:end -->"
FAMILIES = {
    "fp32": ("FP32", "*", "black"),
    "uniform": ("homogeneous uniform", "s", "tab:blue"),
    "pot": ("homogeneous PoT", "D", "tab:cyan"),
    "uniform-mp": ("uniform-only MP (HAWQ-V3 style)", "^", "tab:orange"),
    "torchao": ("torchao weight-only", "v", "tab:gray"),
    "dnas": ("DNAS (Gumbel-softmax)", "P", "tab:purple"),
    "ours-greedy": ("ours: greedy (recipe metric)", "o", "tab:red"),
    "ours-milp": ("ours: MILP (recipe metric)", "X", "tab:green"),
    "ours-fisher": ("ours: Fisher greedy", "h", "tab:brown"),
    "ours-hessian": ("ours: Hessian greedy", "h", "tab:brown"),
}


def _acc_cell(r: dict) -> str:
    if "qat_mean" not in r:
        return "—"
    return f"{pts(r['qat_mean'])} ± {pts(r['qat_std'])} (n={len(r['qat_accuracy'])})"


def _qat_text(results: dict) -> str:
    quant = results.get("recipe_config", {}).get("quant", {})
    qat = quant.get("qat")
    if not qat:
        return ""
    # results written before the renames (RENAMED in config.py) say freeze_bn and recalibrate_bn
    qat = {"keep_bn_statistics": qat["freeze_bn"], **qat} if "freeze_bn" in qat else qat
    keys = ("lr", "distill_weight", "temperature", "keep_bn_statistics", "ema_decay")
    text = " QAT settings: " + ", ".join(f"{k} {qat[k]}" for k in keys if k in qat) + "."
    # runs from before the option existed re-estimated nothing
    batches = quant.get("bn_recalibration_batches", quant.get("recalibrate_bn", 0))
    return text + f" BatchNorm statistics re-estimated after quantization: {batches} batches."


def markdown(results: dict, command: str) -> str:
    """The results as a Markdown section: context, table, claims, notes."""
    ctx, s = results["context"], results["settings"]
    fp = results["fp_accuracy"]
    lines = [
        f"### {results['recipe']} ({results['model']} on {results['data']['name']})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {ctx['machine']}; date {ctx['date']}; load average at start {ctx['load_start']}, "
        f"at end {ctx['load_end']}; wall time {ctx['wall_seconds'] / 60:.1f} min"
        + (f", CPU time of the process {ctx['cpu_seconds'] / 60:.1f} min" if "cpu_seconds" in ctx else "")
        + ".  ",
        f"Settings: QAT {s['qat_steps']} steps for every fine-tuned row, seeds {list(s['seeds'])}; DNAS "
        f"{s['dnas_steps']} search steps; sensitivity metric {results['metric']} "
        f"({results['analysis_seconds']:.1f} s, shared by every {results['metric'].capitalize()} row); "
        "protected layers at uniform 8: "
        f"{', '.join(results['protected'])}; {results['n_test']} test samples "
        f"(one sample = {100 / results['n_test']:.2f} pts)." + _qat_text(results),
        "",
        "| row | avg bits | PTQ acc % | QAT acc % (mean ± std) | Δ vs FP (pts) | size (bytes) | compression "
        "| energy (µJ) | energy ratio | search s | QAT s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        note = " ¹" if r.get("note") else ""
        lines.append(
            f"| {r['label']}{note} | {r['avg_bits']:.3f} | {pts(r['ptq_accuracy'])} | {_acc_cell(r)} "
            f"| {100 * (r['accuracy'] - fp):+.2f} | {r['size_bytes']:,} | {r['compression']:.2f}× "
            f"| {r['energy_uj']:.2f} | {r['energy_ratio']:.2f}× | {r['search_seconds']:.1f} "
            f"| {r['qat_seconds']:.1f} |"
        )
    lines.append("")
    notes = [f"¹ {r['label']}: {r['note']}." for r in results["rows"] if r.get("note")]
    for r in results["rows"]:
        if r["family"] == "torchao" and r.get("torchao_refused"):
            reasons = sorted(set(r["torchao_refused"].values()))
            notes.append(
                f"{r['label']}: torchao quantized {len(r['torchao_layers'])} layers "
                f"({', '.join(sorted(r['torchao_layers']))}) and refused {len(r['torchao_refused'])} "
                f"({', '.join(r['torchao_refused'])}; torchao: \"{'; '.join(reasons)}\"); refused layers "
                f"stay float32 and count 32 bits. {r['size_note']}."
            )
        if r["family"] == "dnas":
            d = r["dnas"]
            notes.append(
                f"{r['label']}: {d['steps']} steps in {d['seconds']:.1f} s "
                f"({d['seconds'] / d['steps']:.2f} s/step), expected bits {d['expected_avg_bits']:.3f}, "
                f"argmax plan {d['argmax_avg_bits']:.3f} bits, "
                f"{d['repair_moves']} repair moves down and {d['fill_moves']} fill moves up to "
                f"{r['avg_bits']:.3f} bits."
            )
    lines += [f"- {n}" for n in notes]
    lines += ["", "Claims, decided by the code from the rows above:", ""]
    for c in results["claims"]:
        # a comparison whose interval holds 0 is a tie, neither holds nor fails
        mark = "**tie**" if c.get("tie") else {True: "**holds**", False: "**fails**", None: "**measured**"}[
            c["holds"]]
        lines.append(f"- {c['claim']}: {mark}. {c['detail']}.")
    return "\n".join(lines) + "\n"


def _all_handles(rows: list[dict]) -> tuple[list, list[str]]:
    from matplotlib.lines import Line2D

    present = list(dict.fromkeys(r["family"] for r in rows))
    handles = [Line2D([], [], ls="none", marker=FAMILIES[f][1], color=FAMILIES[f][2]) for f in present]
    return handles, [FAMILIES[f][0] for f in present]


def plot(results: dict, path: Path) -> Path:
    """Accuracy against average bits, one marker per family (filled: after QAT, hollow: PTQ).

    Left: every row on a log-bits axis. Right: the low-bit region around the searched budgets, with the FP32
    accuracy as a dashed line and each family nudged sideways by a few hundredths of a bit so overlapping
    points stay visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fp = 100 * results["fp_accuracy"]
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    lo_bits, hi_bits = 2.3, 4.3
    in_zoom = [r for r in rows if lo_bits <= r["avg_bits"] <= hi_bits]
    families = list(FAMILIES)
    for ax, zoomed in ((full, False), (zoom, True)):
        seen = set()
        for r in rows:
            if zoomed and r not in in_zoom:
                continue
            name, marker, color = FAMILIES[r["family"]]
            label = name if r["family"] not in seen else None
            seen.add(r["family"])
            x = r["avg_bits"] + (0.02 * (families.index(r["family"]) - 4) if zoomed else 0.0)
            if "qat_mean" in r:
                ax.errorbar(x, 100 * r["qat_mean"], yerr=100 * r["qat_std"], fmt=marker, color=color,
                            label=label, capsize=3, markersize=7)
                ax.plot(x, 100 * r["ptq_accuracy"], marker, mfc="none", color=color, markersize=7)
            else:
                ax.plot(x, 100 * r["ptq_accuracy"], marker, color=color, label=label, markersize=7)
        ax.axhline(fp, color="black", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
        ax.set_xlabel("average weight bits" + ("" if zoomed else " (log scale)"))
    full.set_xscale("log", base=2)
    full.set_xticks([2, 3, 4, 8, 16, 32])
    full.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    full.set_ylim(0, 101)
    full.set_ylabel("test accuracy (%)")
    full.set_title("all rows", fontsize=10)
    full.legend(*_all_handles(rows), fontsize=7, loc="center right")
    accs = [100 * min(r["accuracy"], r["ptq_accuracy"]) for r in in_zoom] or [fp - 5]
    zoom.set_ylim(max(min(accs), fp - 4) - 0.5, fp + 0.8)
    zoom.set_xlim(lo_bits, hi_bits)
    zoom.set_title(f"{lo_bits}-{hi_bits} bits; dashed: FP32", fontsize=10)
    zoom.legend(fontsize=8, loc="lower right")
    s = results["settings"]
    fig.suptitle(f"{results['recipe']}: filled = after QAT ({s['qat_steps']} steps, mean ± std over "
                 f"{len(s['seeds'])} seeds), hollow = PTQ", fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def update_doc(doc: Path, recipe: str, section: str) -> None:
    """Replace (or add) this recipe's block between the pareto markers of ``doc``."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} has no {BEGIN} ... {END} section; add the markers first")
    b, e = f"<!-- pareto:{recipe}:begin -->", f"<!-- pareto:{recipe}:end -->"
    block = f"{b}\n{section}{e}"
    if b in text and e in text:
        text = text[: text.index(b)] + block + text[text.index(e) + len(e):]
    else:
        text = text.replace(END, f"{block}\n\n{END}")
    atomic_write_text(doc, text)


def check_docs(docs: Path, quick: bool) -> None:
    """Raise unless ``docs`` can take a run's block: a full run and an existing file."""
    if quick:
        raise ValueError("--write-docs is for full runs; a --quick run's numbers stay in its output folder")
    if not Path(docs).is_file():
        raise FileNotFoundError(f"--write-docs rewrites {docs}, which is missing; run from a source checkout")


def write_outputs(
    results: dict, out: Path, *, quick: bool = False, docs: Path | None = None
) -> dict[str, Path]:
    """Write the outputs of ``results``; returns ``{kind: path}``.

    Without ``docs``: ``pareto-<recipe>[-quick].{json,md,png}`` in ``out``; nothing else is touched. With
    ``docs`` (the path of a BENCHMARKS.md holding the pareto markers): the JSON in ``out``, the plot as
    ``pareto-<dataset>.png`` beside ``docs`` and the Markdown as this recipe's block of ``docs``. A quick run
    never goes into the docs.
    """
    name, data = results["recipe"], results["data"]["name"]
    if docs is not None:
        check_docs(docs, quick)
    text = markdown(results, results["command"])
    suffix = "-quick" if quick else ""
    folder = Path(out)
    paths = {"json": folder / f"pareto-{name}{suffix}.json"}
    if docs is not None:
        docs = Path(docs)
        paths.update(png=docs.parent / f"pareto-{data}.png", doc=docs)
    else:
        paths.update(png=folder / f"pareto-{name}{suffix}.png", md=folder / f"pareto-{name}{suffix}.md")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths["json"], json.dumps(results, indent=2, default=str))
    plot(results, paths["png"])
    if "doc" in paths:
        update_doc(paths["doc"], name, text + f"\n![accuracy against average bits]({paths['png'].name})\n")
    else:
        atomic_write_text(paths["md"], text)
    return paths


def render_saved(path: Path, out: Path | None = None, *, docs: Path | None = None) -> dict[str, Path]:
    """Re-write every output of a saved results JSON (claims recomputed from its rows); measures nothing.

    ``out`` defaults to the JSON's folder; ``docs`` as in :func:`write_outputs`.
    """
    path = Path(path)
    results = json.loads(path.read_text())
    results["claims"] = claims(results)
    quick = path.stem.endswith("-quick")
    return write_outputs(results, path.parent if out is None else out, quick=quick, docs=docs)
