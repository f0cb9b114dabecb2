"""Quantize your own snnTorch model with the one-liner.

A small convolutional spiking network written the usual snnTorch way (``init_hidden=True`` neurons in an
``nn.Sequential``), trained for a few epochs on the bundled event digits, then quantized to 3.5 average
bits with calibration data and a short fine-tune.

    .venv/bin/python examples/quantize_snntorch_model.py
"""

from __future__ import annotations

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


def main() -> None:
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
    train_float(model, train, config=TrainConfig(epochs=3, lr=3e-3))
    print(f"float accuracy: {100 * evaluate(model, test):.2f}%")

    hq_ptq.quantize(
        model,
        budget=3.5,
        calib_data=train,
        train_data=train,
        config=hq_ptq.QuantConfig(qat=hq_ptq.QATConfig(steps=60)),
    )
    plan = hq_ptq.get_plan(model)
    print(f"quantized accuracy: {100 * evaluate(model, test):.2f}% at {plan.avg_bits:.3f} average bits")
    for layer in plan.layers:
        print(f"  {layer.name:<8} {layer.scheme:<7} {layer.bits} bits  {layer.params:>6} weights")


if __name__ == "__main__":
    main()
