"""``hq-ptq``: the command line. Parses, loads recipes, calls the library, shows progress and tables.

User errors (bad recipe key, missing file, unreachable budget) exit with status 2 and one readable line.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hq_ptq import progress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Heterogeneous uniform/power-of-two quantization for spiking vision transformers.",
)
console = Console()
err_console = Console(stderr=True)

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def user_errors(fn):
    """Turn library errors about the user's input into one red line and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            msg = err.args[0] if err.args else str(err)
            # escaped: a message naming [model] or [data] must not read as rich markup
            err_console.print(f"[red]error:[/red] {escape(str(msg))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library steps.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe value: section.key=value")
]
EnergyBudgetOption = Annotated[
    float | None,
    typer.Option(
        "--energy-budget",
        help="Also keep the estimated energy per inference at most this fraction of the FP32 model's, e.g. "
        "0.1 (45 nm model, docs/ENERGY.md; measured on the calibration data)",
    ),
]
DeviceOption = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="Where to compute: auto (cuda when available, else cpu), cpu, cuda or cuda:N (default: the "
        "recipe's [quant] device, else auto)",
    ),
]
PrecisionOption = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="What QAT computes in: fp32, or bf16 (bfloat16 autocast; weights, optimizer and checkpoints "
        "stay fp32; the sensitivity analysis is fp32 either way) (default: the recipe's [quant] precision, "
        "else fp32)",
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Your own model: package.module:function returning the float nn.Module (imported with the "
        "current directory on sys.path)",
    ),
]


@app.command("recipes")
def recipes_cmd() -> None:
    """List the recipes, one line each."""
    from hq_ptq.recipe import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        line = f"{name:<24} {r.model_name:<18} {r.data_name:<10} {r.description}"
        console.print(line, highlight=False, soft_wrap=True)


@app.command("train")
@user_errors
def train_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe name or .toml path")],
    out: Annotated[
        Path | None, typer.Option(help="Checkpoint path (default: the recipe's fp_checkpoint)")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Train the recipe's float model and save a safetensors checkpoint."""
    from hq_ptq.pipeline import train_recipe
    from hq_ptq.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    model, result, path = train_recipe(r, out)
    if result.resumed_after:
        console.print(f"resumed: training continued after epoch {result.resumed_after} of {result.epochs}")
    n = sum(p.numel() for p in model.parameters())
    console.print(f"trained {r.model_name} ({n:,} parameters) on {r.data_name} in {result.seconds:.0f}s")
    console.print(f"test accuracy: [bold]{100 * result.test_accuracy:.2f}%[/bold]   checkpoint: {path}")


def energy_line(plan) -> str | None:
    """The plan's estimated energy as a share of FP32 (the search's figure), or None when unknown."""
    fraction = plan.meta.get("energy_fraction")
    if fraction is None:
        return None
    budget = plan.meta.get("energy_budget")
    wanted = f" (energy budget {100 * budget:.4g}%)" if budget is not None else ""
    return f"estimated energy: {100 * fraction:.2f}% of FP32 on the calibration data{wanted}"


def plan_table(plan) -> Table:
    table = Table(title=f"plan: {plan.avg_bits:.3f} average bits (budget {plan.budget})")
    for col in ("layer", "scheme", "bits", "params", "sensitivity Ω"):
        table.add_column(col, justify="left" if col in ("layer", "scheme") else "right")
    for c in plan.layers:
        table.add_row(c.name, c.scheme, str(c.bits), f"{c.params:,}", f"{c.sensitivity:.3g}")
    return table


@app.command("run")
@user_errors
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe name or .toml path")],
    budget: Annotated[float | None, typer.Option(help="Average weight bits (default: the recipe's)")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/RECIPE)")] = None,
    set_: SetOption = None,
    resume: Annotated[
        bool, typer.Option(help="Continue a killed run from OUT's QAT checkpoint and sensitivity cache")
    ] = False,
    nproc: Annotated[
        int, typer.Option(help="Data-parallel processes (gloo on CPU, NCCL on CUDA); or launch with torchrun")
    ] = 1,
    export: Annotated[bool, typer.Option(help="Write and verify the QONNX and onnxruntime files")] = True,
    model: ModelOption = None,
    energy_budget: EnergyBudgetOption = None,
    device: DeviceOption = None,
    precision: PrecisionOption = None,
) -> None:
    """Float checkpoint → calibrate → search → QAT → evaluate, with a summary table.

    --model replaces the recipe's model by your factory (the recipe's [model] loss and output_fn stay; its
    other [model] keys and fp_checkpoint go: the factory returns the trained model, or --set
    fp_checkpoint=FILE loads weights into it).
    """
    result = _run_recipe(
        recipe, budget, out, set_ or [], resume=resume, nproc=nproc, export=export, model=model,
        energy_budget=energy_budget, device=device, precision=precision,
    )
    if result is None:
        return  # a rank other than 0 under torchrun: rank 0 reports
    r, result, out = result
    console.print(plan_table(result.plan))
    if energy_line(result.plan):
        console.print(energy_line(result.plan), highlight=False)
    summary = Table(title=f"{r.name}: {r.model_name} on {r.data_name}")
    for col in ("model", "avg bits", "accuracy", "Δ vs float"):
        summary.add_column(col, justify="right")
    summary.add_row("float32", "32", f"{100 * result.fp_accuracy:.2f}%", "")
    rows = [("PTQ (search only)", result.ptq_accuracy)]
    if r.quant.qat.steps > 0:
        rows.append((f"PTQ + QAT ({r.quant.qat.steps} steps)", result.q_accuracy))
    for label, acc in rows:
        summary.add_row(
            label,
            f"{result.plan.avg_bits:.3f}",
            f"{100 * acc:.2f}%",
            f"{100 * (acc - result.fp_accuracy):+.2f} pts",
        )
    console.print(summary)
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    console.print(f"time: {secs}   files: {out}/")
    if result.qat_resumed_from:
        console.print(f"resumed: QAT continued from step {result.qat_resumed_from} of its checkpoint")


def _run_recipe(
    recipe: str, budget, out, overrides, *, resume: bool, nproc: int, export: bool, model=None,
    energy_budget=None, device=None, precision=None,
):
    """Load the recipe and run it here, under torchrun's process group, or in ``nproc`` spawned processes.

    ``energy_budget`` (``--energy-budget``) replaces the recipe's ``[quant] energy_budget``, ``device``
    (``--device``) its ``[quant] device`` and ``precision`` (``--precision``) its ``[quant] precision``.
    Returns ``(recipe, result, out)``, or None on a torchrun rank other than 0.
    """
    import os
    from dataclasses import replace

    from hq_ptq import distributed
    from hq_ptq.config import check_device, check_energy_budget, check_precision
    from hq_ptq.pipeline import ensure_float_checkpoint, launched_run, run_recipe
    from hq_ptq.recipe import load_recipe

    r = load_recipe(recipe, overrides, model=model)
    if energy_budget is not None:
        check_energy_budget(energy_budget)
        r = replace(r, energy_budget=energy_budget)
    if device is not None:
        r = replace(r, quant=replace(r.quant, device=check_device(device, "--device")))
    if precision is not None:
        r = replace(r, quant=replace(r.quant, precision=check_precision(precision, "--precision")))
    out = out or Path("runs") / r.name
    torchrun_world = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if torchrun_world > 1 and nproc not in (1, torchrun_world):
        raise ValueError(f"--nproc {nproc} contradicts torchrun's WORLD_SIZE={torchrun_world}; drop --nproc")
    if nproc > 1 and torchrun_world == 1:
        r = ensure_float_checkpoint(r)  # once, before the workers all load it
        result = distributed.launch(launched_run, nproc, r, budget, out, resume, export)
        return r, result, out
    joined = distributed.init_from_env()
    main = distributed.is_main()
    if not main:
        progress.set_enabled(False)
    try:
        result = run_recipe(r, budget, out, resume=resume, export=export)
    finally:
        if joined:
            distributed.shutdown()
    return (r, result, out) if main else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


@app.command("sweep")
@user_errors
def sweep_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe name or .toml path")],
    budgets: Annotated[str, typer.Option(help="Comma-separated average-bit budgets")] = "4,3.5,3,2.5",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/RECIPE-sweep)")] = None,
    baselines: Annotated[bool, typer.Option(help="Also run the homogeneous baselines")] = True,
    set_: SetOption = None,
) -> None:
    """Search + QAT at several budgets and the homogeneous baselines; writes sweep.json and pareto.png."""
    from hq_ptq.pipeline import BASELINES, sweep_recipe
    from hq_ptq.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    try:
        values = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--budgets must be numbers separated by commas, got {budgets!r}") from None
    out = out or Path("runs") / f"{r.name}-sweep"
    entries = sweep_recipe(r, values, out, baselines=BASELINES if baselines else ())
    table = Table(title=f"{r.name}: accuracy against average bits (float {_pct(entries[0]['fp_accuracy'])})")
    for col in ("point", "avg bits", "PTQ", "PTQ + QAT", "Δ vs float"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for e in entries:
        table.add_row(
            e["label"],
            f"{e['avg_bits']:.3f}",
            _pct(e["ptq_accuracy"]),
            _pct(e["accuracy"]),
            f"{100 * (e['accuracy'] - e['fp_accuracy']):+.2f} pts",
        )
    console.print(table)
    console.print(f"files: {out}/")


@app.command("quantize")
@user_errors
def quantize_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Float checkpoint: made by hq-ptq train, or with --model any state_dict file of that model "
            "(safetensors or torch.save)"
        ),
    ],
    budget: Annotated[float, typer.Option(help="Average weight bits")] = 3.5,
    out: Annotated[Path | None, typer.Option(help="Packed checkpoint to write")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Dataset name (default: the one it was trained on), or package.module:function returning "
            "(train, test) batches (required with --model)"
        ),
    ] = None,
    qat_steps: Annotated[int, typer.Option(help="QAT steps (0: post-training only)")] = 150,
    metric: Annotated[str, typer.Option(help="fisher, hessian, data_free or loss")] = "fisher",
    model: ModelOption = None,
    energy_budget: EnergyBudgetOption = None,
    loss: Annotated[
        str | None,
        typer.Option(help="package.module:function, loss(outputs, targets) (default cross-entropy)"),
    ] = None,
    output_fn: Annotated[
        str | None,
        typer.Option(help="package.module:function, output_fn(outputs) -> [B, classes] class scores"),
    ] = None,
    device: Annotated[
        str,
        typer.Option(help="Where to compute: auto (cuda when available, else cpu), cpu, cuda or cuda:N"),
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="What QAT computes in: fp32, or bf16 (bfloat16 autocast; weights, optimizer and the packed "
            "checkpoint stay fp32; the sensitivity analysis is fp32 either way)"
        ),
    ] = "fp32",
) -> None:
    """Quantize a float checkpoint under a bit budget and write a packed checkpoint."""
    from hq_ptq.config import QATConfig, QuantConfig, SearchConfig, check_device, check_precision
    from hq_ptq.pipeline import quantize_checkpoint

    config = QuantConfig(
        search=SearchConfig(metric=metric), qat=QATConfig(steps=qat_steps),
        device=check_device(device, "--device"), precision=check_precision(precision, "--precision"),
    )
    plan, fp_acc, q_acc, out = quantize_checkpoint(
        checkpoint, budget, out, data=data, config=config, model=model, loss=loss, output_fn=output_fn,
        energy_budget=energy_budget,
    )
    console.print(plan_table(plan))
    if energy_line(plan):
        console.print(energy_line(plan), highlight=False)
    console.print(f"float {_pct(fp_acc)} → quantized {_pct(q_acc)} at {plan.avg_bits:.3f} bits; wrote {out}")


@app.command("inspect")
@user_errors
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Packed checkpoint (.hqpt.safetensors)")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="package.module:function building the model the file was saved from: also check that it "
            "loads into it",
        ),
    ] = None,
) -> None:
    """Show the plan and sizes of a packed checkpoint."""
    from hq_ptq.pack import inspect
    from hq_ptq.plan import Plan

    info = inspect(path)
    console.print(plan_table(Plan.from_dict(info["plan"])))
    b, comp = info["bytes"], info["compression"]
    sizes = Table(title=f"{path.name}: {b['file']:,} bytes")
    sizes.add_column("part")
    sizes.add_column("bytes", justify="right")
    for part in ("codes", "scales", "biases", "float", "metadata", "overhead"):
        sizes.add_row(part, f"{b[part]:,}")
    console.print(sizes)
    console.print(
        f"compression vs FP32 ({info['fp32_bytes']:,} bytes): {comp['file']:.2f}x (file), "
        f"{comp['weights']:.2f}x (weights, 32 / average bits); "
        f"{info['stored_bits_per_weight']:.3f} stored bits per weight"
    )
    if model is not None:
        from hq_ptq.pack import load
        from hq_ptq.pipeline import user_model
        from hq_ptq.swap import quant_layers

        net = load(path, model=user_model(model, what="--model"))
        n = sum(p.numel() for p in net.parameters())
        console.print(
            f"loads into {model}: {type(net).__name__}, {n:,} parameters, "
            f"{len(quant_layers(net))} quantized layers",
            highlight=False,
            soft_wrap=True,
        )
    elif info.get("model_config") is None:
        console.print(
            "a model outside the zoo: load it with hq_ptq.load(path, model=...) or pass --model "
            "package.module:function",
            highlight=False,
            soft_wrap=True,
        )


def _count(value) -> str:
    return "n/a" if value is None else f"{value:,}"


@app.command("export")
@user_errors
def export_cmd(
    path: Annotated[Path, typer.Argument(help="Packed checkpoint (.hqpt.safetensors)")],
    out: Annotated[
        Path | None, typer.Option(help="ONNX file to write (default: next to the checkpoint)")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="unrolled (whole time loop) or step (one step, state as I/O)")
    ] = "unrolled",
    time_steps: Annotated[
        int | None, typer.Option("--T", help="Time steps of a zoo model's random example input (default 8)")
    ] = None,
    batch: Annotated[
        int | None, typer.Option(help="Batch size baked into a zoo model's graph (default 1)")
    ] = None,
    runtime: Annotated[
        str, typer.Option(help="qonnx (integer weight codes behind Quant nodes) or onnxruntime (QCDQ)")
    ] = "qonnx",
    model: ModelOption = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="package.module:function returning (train, test) batches: the model is traced on a test "
            "batch as it takes it and verified on another (required with --model)"
        ),
    ] = None,
    time_dim: Annotated[
        int | None, typer.Option(help="--mode step: the axis of the input tensors that is time (default 0)")
    ] = None,
    integer: Annotated[
        bool,
        typer.Option(
            "--integer",
            help="write the integer-only program (integer weights, requantization multipliers and shifts, "
            "LIF thresholds; .int.safetensors) instead of ONNX, verified against the NumPy int64 reference",
        ),
    ] = False,
    membrane_bits: Annotated[int, typer.Option(help="--integer: signed width of every membrane")] = 16,
    provider: Annotated[
        str,
        typer.Option(
            help="onnxruntime execution provider that verifies the file: auto (the CPU: the model is loaded "
            "there), cpu, cuda or an onnxruntime provider name such as CUDAExecutionProvider"
        ),
    ] = "auto",
) -> None:
    """Export a packed checkpoint to QONNX or to an onnxruntime-runnable ONNX file, and verify it.

    A zoo model is traced on a random spike input [T, batch, C, H, W]; your own model (--model, with --data)
    on one test batch of --data, and verified on the next batch of the same shape. With --integer, that
    batch also calibrates the integer model (membrane ranges, fixed-point formats).
    """
    import torch

    from hq_ptq.export import export_onnxruntime, export_qonnx, resolve_providers, verify_export
    from hq_ptq.pack import inspect, load
    from hq_ptq.pipeline import export_batches, is_reference, user_loaders, user_model

    if runtime not in ("qonnx", "onnxruntime"):
        raise ValueError(f"--runtime must be qonnx or onnxruntime, got {runtime!r}")
    resolve_providers(provider)  # a provider onnxruntime does not have fails before the export
    if data is not None and not is_reference(data):
        raise ValueError(f"--data takes package.module:function returning (train, test), got {data!r}")
    if data is not None and (time_steps is not None or batch is not None):
        raise ValueError(
            "--T and --batch shape the random zoo example; with --data the example is a test batch"
        )
    if model is None and inspect(path)["model_config"] is None:
        raise ValueError(
            f"{path} holds a model outside the zoo: pass --model package.module:function that builds it "
            "and --data package.module:function for its example batches"
        )
    if model is not None and data is None:
        raise ValueError(
            "exporting your own model needs --data package.module:function: the model is traced on one of "
            "its test batches"
        )
    net = load(path, model=user_model(model, what="--model") if model is not None else None)
    if data is not None:
        _, test = user_loaders(data, what="--data")
        example, fresh, verified_on = export_batches(test)
    else:
        cfg = net.hq_config
        t, b = time_steps or 8, batch or 1
        shape = (t, b, cfg.get("in_channels", 2), cfg["img_size"], cfg["img_size"])
        gen = torch.Generator().manual_seed(0)
        example = (torch.rand(shape, generator=gen) < 0.2).float()
        fresh = (torch.rand(shape, generator=gen) < 0.2).float()
        verified_on = "a fresh random input"
    if integer:
        _export_integer(net, example, fresh, verified_on, path, out, membrane_bits)
        return
    suffix = ".qonnx.onnx" if runtime == "qonnx" else ".ort.onnx"
    out = out or path.with_name(path.name.split(".")[0] + suffix)
    fn = export_qonnx if runtime == "qonnx" else export_onnxruntime
    options = {"time_dim": time_dim} if time_dim is not None else {}
    with progress.task(f"export {mode} ({runtime})", total=None):
        fn(net, example, out, mode=mode, **options)
    with progress.task(f"verify with {runtime}", total=None):
        check = verify_export(net, out, fresh, backend=runtime, provider=provider)
    console.print(f"wrote {out} ({out.stat().st_size:,} bytes, {mode})")
    console.print(
        f"verified with {runtime} on {verified_on}: max |Δ {'output' if data else 'logit'}| "
        f"{check.get('max_abs_output_error', check['max_abs_logit_error']):.2g}, "
        f"spike mismatches {_count(check['spike_mismatches'])} of {_count(check['spikes_compared'])}",
        highlight=False,
        soft_wrap=True,
    )


def _export_integer(net, example, fresh, verified_on: str, path: Path, out: Path | None, bits: int) -> None:
    import torch

    from hq_ptq.integer import integerize, reference_mode, save_integer
    from hq_ptq.model_io import call, tensors

    with progress.task("integerize", total=None):
        integer, report = integerize(net, [(example, None)], membrane_bits=bits)
    out = save_integer(integer, report, out or path.with_name(path.name.split(".")[0] + ".int.safetensors"))
    with torch.no_grad():
        got = list(tensors(call(integer, fresh)))
        with reference_mode(integer):
            want = list(tensors(call(integer, fresh)))
    if not all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
        raise ValueError("the integer model and its NumPy int64 reference disagree; please report this")
    console.print(f"wrote {out} ({out.stat().st_size:,} bytes, {len(report.synapses)} integer synapses, "
                  f"{len(report.neurons)} LIFs at {bits}-bit membranes)")
    console.print(f"verified on {verified_on}: the NumPy int64 reference reproduces every output bit for bit",
                  highlight=False, soft_wrap=True)
    if not isinstance(example, (torch.Tensor, tuple, list)):
        console.print("no integer graph: it takes a tensor or a tuple of tensors as input", highlight=False)
        return
    from hq_ptq.integer_graph import export_integer_qonnx, run_integer_graph

    with progress.task("integer graph", total=None):
        graph = export_integer_qonnx(integer, example, out.with_name(out.name.split(".")[0] + ".int.onnx"))
    args = [fresh] if isinstance(fresh, torch.Tensor) else list(fresh)
    ran = run_integer_graph(graph, [t.detach().cpu().numpy() for t in args])
    if not all(torch.equal(torch.from_numpy(r), g.double()) for r, g in zip(ran.values(), got, strict=False)):
        raise ValueError("the integer graph and the integer model disagree; please report this")
    console.print(f"wrote {graph} ({graph.stat().st_size:,} bytes): integer QONNX graph, checked in "
                  "onnxruntime and in the pure-integer NumPy runner, bit for bit on both inputs",
                  highlight=False, soft_wrap=True)


@app.command("bench")
@user_errors
def bench_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe name or .toml path")],
    quick: Annotated[bool, typer.Option(help="1 seed, 10 QAT steps, 20 DNAS steps (a smoke run)")] = False,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated QAT seeds (default 0,1,2)")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for JSON, Markdown, PNG (default: ./benchmarks/results)"),
    ] = None,
    qat_steps: Annotated[int | None, typer.Option(help="Common QAT steps of every row (default 40)")] = None,
    dnas_steps: Annotated[int | None, typer.Option(help="Differentiable-search steps (default 150)")] = None,
    set_: SetOption = None,
    write_docs: Annotated[
        bool,
        typer.Option(help="Also rewrite the recipe's block of --docs and the plot beside it (full runs)"),
    ] = False,
    docs: Annotated[
        Path, typer.Option(help="The BENCHMARKS.md that --write-docs rewrites")
    ] = Path("docs/BENCHMARKS.md"),
) -> None:
    """Pareto benchmark: our search vs homogeneous, uniform-only MP, torchao and DNAS; same QAT and seeds.

    Writes JSON, Markdown and PNG to --out only; docs/BENCHMARKS.md is rewritten only with --write-docs.
    """
    import hq_ptq.bench as bench

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
    except ValueError:
        raise ValueError(f"--seeds must be integers separated by commas, got {seeds!r}") from None
    results, paths = bench.bench(
        recipe, quick=quick, seeds=seed_list, out=out, qat_steps=qat_steps, dnas_steps=dnas_steps,
        overrides=set_ or [], write_docs=write_docs, docs=docs,
    )
    fp = results["fp_accuracy"]
    table = Table(title=f"{results['recipe']}: accuracy against average bits (float {_pct(fp)})")
    for col in ("row", "avg bits", "PTQ", "QAT mean ± std", "size", "energy ×", "search s"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in results["rows"]:
        qat = f"{_pct(r['qat_mean'])} ± {100 * r['qat_std']:.2f}" if "qat_mean" in r else "—"
        table.add_row(
            r["label"], f"{r['avg_bits']:.3f}", _pct(r["ptq_accuracy"]), qat, f"{r['size_bytes']:,}",
            f"{r['energy_ratio']:.2f}", f"{r['search_seconds']:.1f}",
        )
    console.print(table)
    for c in results["claims"]:
        mark = {True: "[green]holds[/green]", False: "[red]fails[/red]", None: "measured"}[c["holds"]]
        console.print(f"{c['claim']}: {mark}. {c['detail']}", highlight=False)
    console.print("files: " + ", ".join(str(p) for p in paths.values()), highlight=False, soft_wrap=True)
    if "doc" not in paths:
        console.print(f"{docs} left alone (pass --write-docs to rewrite its block)", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
