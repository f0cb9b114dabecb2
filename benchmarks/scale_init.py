"""Absmax vs MSE scale init on a recipe's float checkpoint: weight error per layer and PTQ accuracy.

    .venv/bin/python benchmarks/scale_init.py [--recipe fashion-spikformer] [--val 1000] [--threads N]
        [--set section.key=value ...]

For every quantizable layer and candidate (uniform 2/3/4, pot 2/3/4) it prints the weight error
``‖Q(W) − W‖²`` at the absmax init and at the MSE init (``hq_ptq.swap.weight_error``). Then, for fixed
plans (first and last layer at uniform 8, every other layer at one candidate), the accuracy right after
quantization (no QAT), without and with BatchNorm re-estimation on 4 training batches, measured on a
validation split held out of the training data (never the test set: this chooses a default). Results go
to benchmarks/results/scale_init-<recipe>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hq_ptq import progress
from hq_ptq.api import recalibrate_bn
from hq_ptq.files import atomic_write_text
from hq_ptq.pipeline import float_model, recipe_loaders, validation_loader
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.recipe import load_recipe
from hq_ptq.snn import detached_copy
from hq_ptq.state import apply_plan
from hq_ptq.swap import find_layers, quant_layers, set_layer_quant, swap_layers, weight_error
from hq_ptq.train import evaluate

CANDIDATES = [("uniform", 2), ("uniform", 3), ("uniform", 4), ("pot", 2), ("pot", 3), ("pot", 4)]
PLANS = [("pot", 3), ("uniform", 3), ("pot", 2), ("uniform", 2)]


def layer_errors(net) -> dict[str, dict[str, dict[str, float]]]:
    model = detached_copy(net)
    swap_layers(model, scheme="uniform", bits=8)
    out = {}
    for name, layer in quant_layers(model).items():
        out[name] = {
            f"{s}{b}": {init: weight_error(layer, s, b, scale_init=init) for init in ("absmax", "mse")}
            for s, b in CANDIDATES
        }
    return out


def ptq_accuracy(net, scheme: str, bits: int, scale_init: str, train, test) -> dict[str, float]:
    model = detached_copy(net)
    names = find_layers(model)
    plan = Plan(tuple(
        LayerChoice(n, *(("uniform", 8) if n in (names[0], names[-1]) else (scheme, bits)),
                    model.get_submodule(n).weight.numel())
        for n in names
    ))
    apply_plan(model, plan)
    if scale_init != "mse":  # apply_plan fits MSE scales; refit the absmax init layer by layer
        layers = quant_layers(model)
        for choice in plan.layers:
            set_layer_quant(layers[choice.name], choice.scheme, choice.bits, scale_init=scale_init)
    acc = evaluate(model, test)
    recalibrate_bn(model, train, 4)
    return {"ptq": acc, "ptq_bn": evaluate(model, test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion-spikformer")
    parser.add_argument("--val", type=int, default=1000, help="validation samples held out of training data")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. data.T=4")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    progress.set_enabled(False)
    recipe = load_recipe(args.recipe, args.set)
    net = float_model(recipe)
    train, _ = recipe_loaders(recipe)
    test = validation_loader(recipe, args.val)  # named `test` below: the set accuracy is measured on

    t0 = time.perf_counter()
    errors = layer_errors(net)
    print(f"weight errors of {len(errors)} layers x {len(CANDIDATES)} candidates x 2 inits: "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"{'candidate':10} {'total absmax':>13} {'total mse':>11} {'reduction':>9}   "
          "per layer: min / median / max")
    summary = {}
    for s, b in CANDIDATES:
        key = f"{s}{b}"
        a = [errors[n][key]["absmax"] for n in errors]
        m = [errors[n][key]["mse"] for n in errors]
        per_layer = [1 - mi / ai for ai, mi in zip(a, m) if ai > 0]
        summary[key] = {"absmax": sum(a), "mse": sum(m), "reduction": 1 - sum(m) / sum(a),
                        "per_layer_min": min(per_layer), "per_layer_median": statistics.median(per_layer),
                        "per_layer_max": max(per_layer)}
        print(f"{key:10} {sum(a):13.4f} {sum(m):11.4f} {1 - sum(m) / sum(a):9.1%}   "
              f"{min(per_layer):.1%} / {statistics.median(per_layer):.1%} / {max(per_layer):.1%}")

    fp = evaluate(net, test)
    print(f"\nfloat accuracy on {args.val} validation samples {fp:.2%}; PTQ (first/last uniform 8), no QAT:")
    print(f"{'plan':10} {'absmax':>8} {'mse':>8} {'absmax+BN':>10} {'mse+BN':>8}")
    accuracy = {}
    for s, b in PLANS:
        res = {init: ptq_accuracy(net, s, b, init, train, test) for init in ("absmax", "mse")}
        accuracy[f"{s}{b}"] = res
        print(f"{s}{b:<{10 - len(s)}} {res['absmax']['ptq']:8.2%} {res['mse']['ptq']:8.2%} "
              f"{res['absmax']['ptq_bn']:10.2%} {res['mse']['ptq_bn']:8.2%}")

    out = Path(__file__).parent / "results" / f"scale_init-{recipe.name}.json"
    doc = {"command": ".venv/bin/python benchmarks/scale_init.py " + " ".join(sys.argv[1:]),
           "recipe": recipe.name, "evaluated_on": f"{args.val} validation samples held out of training data",
           "float_accuracy": fp, "summary": summary, "accuracy": accuracy, "layers": errors}
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
