"""Quantize your own snnTorch model with the one-liner.

A small convolutional spiking network written the usual snnTorch way (``init_hidden=True`` neurons in an
``nn.Sequential``), trained for a few epochs on the bundled event digits, then quantized to 3.5 average
bits with calibration data and a short fine-tune.

    .venv/bin/python examples/quantize_snntorch_model.py [--out DIR] [--tiny]

Writes ``snn.hqpt.safetensors`` and ``plan.json`` into ``--out`` (default: a fresh temporary folder,
printed). ``--tiny`` trains and fine-tunes a few steps on a few batches: a smoke run of seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import snntorch as snn
import torch
from torch import nn

import hq_ptq
from hq_ptq.data import make_loaders
from hq_ptq.snn import reset_states
from hq_ptq.train import TrainConfig, evaluate, train_float


class OverTime(nn.Module):
    """Runs a per-step snnTorch network over a time-first input [T, B, ...] and averages the logits."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reset_states(self.body)  # per instance: never through snnTorch's global registry
        return torch.stack([self.body(x_t) for x_t in x]).mean(0)


def main(out_dir: str | Path | None = None, tiny: bool = False) -> dict:
    """Train, quantize to 3.5 average bits, save; returns accuracies (fractions), bits, files written."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="hq_ptq_snn_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"output folder: {out}")
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(2, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.MaxPool2d(2),
        snn.Leaky(0.5, init_hidden=True),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.MaxPool2d(2),
        snn.Leaky(0.5, init_hidden=True),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    model = OverTime(body)
    train, test = make_loaders("digits", batch_size=32, T=4)
    if tiny:  # a few fixed batches: the same code path, a fraction of the work
        train, test = list(itertools.islice(train, 3)), list(itertools.islice(test, 2))
    train_float(model, train, config=TrainConfig(epochs=1 if tiny else 3, lr=3e-3))
    float_acc = evaluate(model, test)
    print(f"float accuracy: {100 * float_acc:.2f}%")

    tiny_search = hq_ptq.SearchConfig(hutchinson_probes=4, hutchinson_rel_tol=0.9, calib_batches=2)
    search = tiny_search if tiny else hq_ptq.SearchConfig()
    hq_ptq.quantize(
        model,
        budget=3.5,
        calib_data=train,
        train_data=train,
        config=hq_ptq.QuantConfig(search=search, qat=hq_ptq.QATConfig(steps=2 if tiny else 60)),
    )
    plan = hq_ptq.get_plan(model)
    quant_acc = evaluate(model, test)
    print(f"quantized accuracy: {100 * quant_acc:.2f}% at {plan.avg_bits:.3f} average bits")
    for layer in plan.layers:
        print(f"  {layer.name:<8} {layer.scheme:<7} {layer.bits} bits  {layer.params:>6} weights")
    model_path, plan_path = out / "snn.hqpt.safetensors", out / "plan.json"
    hq_ptq.save(model, model_path)
    plan_path.write_text(json.dumps(plan.to_dict(), indent=2, default=str))
    print(f"saved {model_path} and {plan_path}")
    return {"float_accuracy": float_acc, "quantized_accuracy": quant_acc, "avg_bits": plan.avg_bits,
            "paths": [model_path, plan_path]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="a few-second smoke run on a few batches")
    args = parser.parse_args()
    main(args.out, tiny=args.tiny)
