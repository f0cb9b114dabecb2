"""hq_ptq on a plain (non-spiking) PyTorch CNN: any model with Conv/Linear layers works.

    .venv/bin/python examples/quantize_cnn.py [--out DIR] [--tiny]

Writes ``cnn.hqpt.safetensors`` into ``--out`` (default: a fresh temporary folder, printed).
``--tiny`` trains and fine-tunes for a few steps on a slice of the data: a smoke run of seconds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import hq_ptq
from hq_ptq.train import TrainConfig, evaluate, train_float


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 64):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def main(out_dir: str | Path | None = None, tiny: bool = False) -> dict:
    """Train, quantize to 3 average bits, save; returns accuracies (fractions), bits and the file's path."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="hq_ptq_cnn_"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"output folder: {out}")
    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target)
    n_train, n_test = (256, 128) if tiny else (1400, len(x) - 1400)
    train, test = batches(x[:n_train], y[:n_train]), batches(x[1400 : 1400 + n_test], y[1400 : 1400 + n_test])
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
    train_float(model, train, config=TrainConfig(epochs=2 if tiny else 40, lr=3e-3, label_smoothing=0.0))
    float_acc = evaluate(model, test)
    print(f"float accuracy: {100 * float_acc:.2f}%")
    tiny_search = hq_ptq.SearchConfig(hutchinson_probes=8, hutchinson_rel_tol=0.5)
    search = tiny_search if tiny else hq_ptq.SearchConfig()
    hq_ptq.quantize(
        model,
        budget=3.0,
        calib_data=train,
        train_data=train,
        config=hq_ptq.QuantConfig(search=search, qat=hq_ptq.QATConfig(steps=3 if tiny else 100, lr=1e-3)),
    )
    plan = hq_ptq.get_plan(model)
    quant_acc = evaluate(model, test)
    print(f"quantized accuracy: {100 * quant_acc:.2f}% at {plan.avg_bits:.3f} average bits")
    path = out / "cnn.hqpt.safetensors"
    hq_ptq.save(model, path)
    print(f"saved {path}; reload with hq_ptq.load(path, model=<fresh float CNN>)")
    return {"float_accuracy": float_acc, "quantized_accuracy": quant_acc, "avg_bits": plan.avg_bits,
            "path": path}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="a few-second smoke run on a slice of the data")
    args = parser.parse_args()
    main(args.out, tiny=args.tiny)
