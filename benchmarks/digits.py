"""Benchmark of the digits recipe on this machine: float training time and accuracy, the demo's wall time,
and the quality bar (accuracy drop after QAT at 3.5 and 3.0 average bits, over several seeds).

    .venv/bin/python benchmarks/digits.py [--skip-train] [--skip-demo] [--seeds 0,1,2] [--threads N]

Training writes a fresh checkpoint to a temporary path (the shipped one is left alone); the demo and the
quality bar start from the shipped checkpoint, like `make demo`. For the quality bar one sensitivity
analysis serves each budget, then QAT runs once per seed s (train.seed = quant.seed = s: shuffle order,
random shifts, QAT RNG). Timings are wall-clock seconds. Results go to benchmarks/results/digits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hq_ptq import progress
from hq_ptq.api import analyze, search_plan
from hq_ptq.files import atomic_write_text
from hq_ptq.pipeline import float_model, quantize_and_finetune, recipe_loaders, run_recipe, train_recipe
from hq_ptq.recipe import load_recipe
from hq_ptq.snn import detached_copy
from hq_ptq.train import evaluate


def quality_bar(recipe, budgets: list[float], seeds: list[int], overrides: list[str]) -> list[dict]:
    float_net = float_model(recipe)
    train, test = recipe_loaders(recipe)
    fp_acc = evaluate(float_net, test)
    analysis = analyze(detached_copy(float_net), calib_data=train, config=recipe.quant)
    points = []
    for budget in budgets:
        plan = search_plan(analysis, budget, recipe.quant)
        runs = []
        for seed in seeds:
            r = load_recipe(recipe.name, [*overrides, f"train.seed={seed}", f"quant.seed={seed}"])
            seeded_train, _ = recipe_loaders(r)
            t0 = time.perf_counter()
            tuned = quantize_and_finetune(detached_copy(float_net), plan, r, seeded_train, test, float_net)
            runs.append({"seed": seed, "ptq_accuracy": tuned.ptq_accuracy, "accuracy": tuned.accuracy,
                         "seconds": time.perf_counter() - t0})
        accs = [x["accuracy"] for x in runs]
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        points.append(
            {
                "budget": budget,
                "avg_bits": plan.avg_bits,
                "fp_accuracy": fp_acc,
                "runs": runs,
                "mean": mean,
                "std": std,
                "mean_drop_points": 100 * (fp_acc - mean),
            }
        )
        print(
            f"budget {budget}: {plan.avg_bits:.3f} bits, float {100 * fp_acc:.2f}%, PTQ "
            f"{100 * runs[0]['ptq_accuracy']:.2f}%, QAT {', '.join(f'{100 * a:.2f}' for a in accs)} "
            f"-> {100 * mean:.2f} ± {100 * std:.2f}% (drop {100 * (fp_acc - mean):+.2f} pts)",
            flush=True,
        )
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits-spikformer")
    parser.add_argument("--skip-train", action="store_true", help="do not time float training")
    parser.add_argument("--skip-demo", action="store_true", help="do not time the demo run")
    parser.add_argument("--seeds", default="0,1,2", help="QAT seeds of the quality bar")
    parser.add_argument("--budgets", default="3.5,3.0", help="budgets of the quality bar")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. qat.steps=100")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress.set_enabled(False)
    recipe = load_recipe(args.recipe, args.set)
    results: dict = {
        "recipe": recipe.name,
        "overrides": args.set,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_train:
            t0 = time.perf_counter()
            _, trained, _ = train_recipe(recipe, Path(tmp) / "fp.safetensors")
            results["train"] = {
                "seconds": time.perf_counter() - t0,
                "test_accuracy": trained.test_accuracy,
                "epochs": recipe.train.epochs,
            }
            print(f"train: {trained.test_accuracy:.4f} in {results['train']['seconds']:.0f}s")
        if not args.skip_demo:
            t0 = time.perf_counter()
            run = run_recipe(recipe, out_dir=Path(tmp) / "run")
            keep = ("fp_accuracy", "ptq_accuracy", "q_accuracy", "avg_bits")
            results["demo"] = {
                "seconds": time.perf_counter() - t0,
                **{k: v for k, v in run.to_dict().items() if k in keep},
                "stages": run.seconds,
            }
            print(f"demo: {results['demo']}")
    results["quality_bar"] = quality_bar(
        recipe, [float(b) for b in args.budgets.split(",")], [int(s) for s in args.seeds.split(",")], args.set
    )
    atomic_write_text(args.out, json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
