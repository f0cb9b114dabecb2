"""hq_ptq on a plain (non-spiking) PyTorch CNN: any model with Conv/Linear layers works.

.venv/bin/python examples/quantize_cnn.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import hq_ptq
from hq_ptq.train import TrainConfig, evaluate, train_float


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 64):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def main() -> None:
    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target)
    train, test = batches(x[:1400], y[:1400]), batches(x[1400:], y[1400:])
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    train_float(model, train, config=TrainConfig(epochs=40, lr=3e-3, label_smoothing=0.0))
    print(f"float accuracy: {100 * evaluate(model, test):.2f}%")
    hq_ptq.quantize(
        model,
        budget=3.0,
        calib_data=train,
        train_data=train,
        config=hq_ptq.QuantConfig(qat=hq_ptq.QATConfig(steps=100, lr=1e-3)),
    )
    plan = hq_ptq.get_plan(model)
    print(f"quantized accuracy: {100 * evaluate(model, test):.2f}% at {plan.avg_bits:.3f} average bits")
    hq_ptq.save(model, "/tmp/cnn.hqpt.safetensors")
    print("saved /tmp/cnn.hqpt.safetensors; reload with hq_ptq.load(path, model=<fresh float CNN>)")


if __name__ == "__main__":
    main()
