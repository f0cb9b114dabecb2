"""Benchmark of the digits recipe on this machine: float training time and accuracy, the demo's wall time,
and the quality bar (accuracy drop after QAT at 3.5 and 3.0 average bits).

    .venv/bin/python benchmarks/digits.py [--skip-train] [--threads N] [--out benchmarks/results/digits.json]

Training writes a fresh checkpoint to a temporary path (the shipped one is left alone) and the quality bar
is measured from the shipped checkpoint, like `make demo`. Timings are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from hq_ptq import progress
from hq_ptq.files import atomic_write_text
from hq_ptq.pipeline import run_recipe, sweep_recipe, train_recipe
from hq_ptq.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits-spikformer")
    parser.add_argument("--skip-train", action="store_true", help="only the demo and the quality bar")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress.set_enabled(False)
    recipe = load_recipe(args.recipe)
    results: dict = {
        "recipe": recipe.name,
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
        t0 = time.perf_counter()
        run = run_recipe(recipe, out_dir=Path(tmp) / "run")
        results["demo"] = {
            "seconds": time.perf_counter() - t0,
            **{
                k: v
                for k, v in run.to_dict().items()
                if k in ("fp_accuracy", "ptq_accuracy", "q_accuracy", "avg_bits")
            },
            "stages": run.seconds,
        }
        print(f"demo: {results['demo']}")
        t0 = time.perf_counter()
        entries = sweep_recipe(recipe, [3.5, 3.0], Path(tmp) / "sweep", baselines=())
        results["quality_bar"] = {"seconds": time.perf_counter() - t0, "points": entries}
    for e in entries:
        drop = 100 * (e["fp_accuracy"] - e["accuracy"])
        print(
            f"budget {e['budget']}: {e['avg_bits']:.3f} bits, float {100 * e['fp_accuracy']:.2f}%, "
            f"PTQ {100 * e['ptq_accuracy']:.2f}%, QAT {100 * e['accuracy']:.2f}% (drop {drop:+.2f} pts)"
        )
    atomic_write_text(args.out, json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
