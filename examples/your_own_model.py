"""Quantize your own spiking model: a walkthrough.

A small snnTorch network written the way snnTorch's tutorials write one (a convolution and ``snn.Leaky``
neurons with explicit membranes, its own time loop over a static image), trained here on scikit-learn's
handwritten digits (bundled with scikit-learn: nothing is downloaded). Nothing of it comes from hq_ptq's zoo.

(a) In Python: ``hq_ptq.quantize(model, ..., loss_fn=..., output_fn=...)``, save and load the packed
    checkpoint, export it to QONNX and verify the file against PyTorch.
(b) From the shell: the same model and data through a recipe file (``[model] factory``, ``[data] factory``),
    ``hq-ptq run`` and ``hq-ptq export --model ... --data ...``. The commands run here in-process and are
    printed as you would type them.

    .venv/bin/python examples/your_own_model.py [OUT_DIR]    # about 15 s on a 2-core CPU

OUT_DIR defaults to a new temporary folder. The recipe names this file's functions as
``your_own_model:build_model`` and so on; hq-ptq imports them with the current directory on ``sys.path``
(as ``python -m`` does), so run the printed shell commands from this ``examples/`` folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import snntorch as snn
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# 1. Your model, your data, your loss: plain PyTorch + snnTorch, nothing from hq_ptq


class SpikingDigitsNet(nn.Module):
    """conv → Leaky → pool → linear → Leaky → linear → Leaky, run for ``num_steps`` steps on a static image.

    Takes ``[B, 1, 8, 8]`` images, returns ``(spikes, membranes)`` of the output layer, each
    ``[num_steps, B, 10]``: not logits, hence the ``loss`` and ``class_scores`` below.
    """

    def __init__(self, channels: int = 8, hidden: int = 32, num_steps: int = 4, beta: float = 0.8) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.lif1 = snn.Leaky(beta=beta)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(channels * 4 * 4, hidden)
        self.lif2 = snn.Leaky(beta=beta)
        self.fc2 = nn.Linear(hidden, 10)
        self.lif3 = snn.Leaky(beta=beta)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fresh membranes for every batch (hq_ptq also resets every snnTorch neuron before each forward)
        mem1, mem2, mem3 = self.lif1.reset_mem(), self.lif2.reset_mem(), self.lif3.reset_mem()
        current = self.conv(x)  # a static image: the same input current at every step
        spikes, membranes = [], []
        for _ in range(self.num_steps):
            spk1, mem1 = self.lif1(current, mem1)
            spk2, mem2 = self.lif2(self.fc1(self.pool(spk1).flatten(1)), mem2)
            spk3, mem3 = self.lif3(self.fc2(spk2), mem3)
            spikes.append(spk3)
            membranes.append(mem3)
        return torch.stack(spikes), torch.stack(membranes)


def build_model(channels: int = 8, hidden: int = 32, num_steps: int = 4) -> SpikingDigitsNet:
    """The model factory: keyword arguments come from the recipe's other ``[model]`` keys."""
    torch.manual_seed(0)
    return SpikingDigitsNet(channels, hidden, num_steps)


def class_scores(outputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``output_fn``: ``[B, 10]`` class scores, the output membrane averaged over time."""
    return outputs[1].mean(0)


def loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """``loss_fn(outputs, targets)``: cross-entropy on the averaged output membrane."""
    return F.cross_entropy(class_scores(outputs), targets)


def digits_loaders(batch_size: int = 64, n_train: int = 1200, seed: int = 0):
    """The data factory: ``(train, test)`` lists of ``(images [B, 1, 8, 8], labels [B])`` batches."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]

    def batches(lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ends = [(i, min(i + batch_size, hi)) for i in range(lo, hi, batch_size)]
        return [(x[a:b], y[a:b]) for a, b in ends]

    return batches(0, n_train), batches(n_train, len(y))


def train(model: nn.Module, batches, epochs: int = 4, lr: float = 2e-2) -> None:
    """A plain float training loop (yours: hq_ptq only needs the trained model)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
    model.eval()


# ------------------------------------------------------------------------------------------------
# 2. hq_ptq


def in_python(out: Path, train_data, test_data, budget: float, qat_steps: int) -> dict[str, float]:
    """(a) the one-liner, save/load, export + verify."""
    import hq_ptq
    from hq_ptq.export import verify_export
    from hq_ptq.train import evaluate

    model = build_model()
    train(model, train_data)
    torch.save(model.state_dict(), out / "fp.pt")  # the float weights, for the recipe of part (b)
    fp_acc = evaluate(model, test_data, output_fn=class_scores)
    print(f"(a) float accuracy {100 * fp_acc:.2f}%")

    config = hq_ptq.QuantConfig(
        search=hq_ptq.SearchConfig(metric="hessian", calib_batches=2, hutchinson_probes=16),
        qat=hq_ptq.QATConfig(steps=qat_steps),
    )
    hq_ptq.quantize(  # in place: Conv2d/Linear become Brevitas layers, BN re-estimated, QAT fine-tuned
        model,
        budget=budget,
        calib_data=train_data,
        train_data=train_data,
        loss_fn=loss,
        output_fn=class_scores,
        config=config,
    )
    plan = hq_ptq.get_plan(model)
    q_acc = evaluate(model, test_data, output_fn=class_scores)
    print(f"(a) quantized accuracy {100 * q_acc:.2f}% at {plan.avg_bits:.3f} average bits")
    for layer in plan.layers:
        print(f"      {layer.name:<5} {layer.scheme:<7} {layer.bits} bits  {layer.params:>5} weights")

    packed = hq_ptq.save(model, out / "model.hqpt.safetensors")
    loaded = hq_ptq.load(packed, model=build_model())  # a model outside the zoo: pass a fresh float one
    x, _ = test_data[0]
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(model(x), loaded(x)))
    print(f"(a) {packed.name}: {packed.stat().st_size:,} bytes, reloads bit-identical: {same}")

    # exported on one test batch as the model takes it ([64, 1, 8, 8]: the batch size is baked in),
    # verified on another batch of the same shape
    onnx_file = hq_ptq.export_qonnx(loaded, x, out / "model.qonnx.onnx")
    check = verify_export(loaded, onnx_file, test_data[1][0], backend="qonnx")
    print(f"(a) {onnx_file.name}: max |Δ output| against PyTorch {check['max_abs_output_error']:.2g}, "
          f"spike mismatches {check['spike_mismatches']}")
    return {"fp_accuracy": fp_acc, "q_accuracy": q_acc, "avg_bits": plan.avg_bits}


RECIPE = """\
description = "your own spiking model on scikit-learn digits"
fp_checkpoint = "{fp}"          # a state_dict the factory's model loads (torch.save or safetensors)

[model]
factory = "your_own_model:build_model"      # package.module:function returning the float nn.Module
loss = "your_own_model:loss"                # loss(outputs, targets); default cross-entropy
output_fn = "your_own_model:class_scores"   # outputs -> [B, classes]; default the outputs if 2-D
hidden = 32                                 # any other key is a keyword argument of the factory

[data]
factory = "your_own_model:digits_loaders"   # returns (train, test) iterables of (inputs, targets)
batch_size = 64

[quant]
budget = {budget}

[search]
metric = "hessian"
calib_batches = 2
hutchinson_probes = 16

[qat]
steps = {qat_steps}
"""


def hq_ptq_cli(*args: str) -> None:
    """``hq-ptq ARGS``, run in this process (the same as typing it in examples/)."""
    from hq_ptq.cli import app

    print("$ hq-ptq " + " ".join(args))
    code = app(list(args), standalone_mode=False, prog_name="hq-ptq")
    if code:
        raise SystemExit(f"hq-ptq {args[0]} failed with exit status {code}")


def from_the_shell(out: Path, budget: float, qat_steps: int) -> None:
    """(b) the same through a recipe file, ``hq-ptq run`` and ``hq-ptq export --model``."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # what running from examples/ gives hq-ptq: this file is importable
    recipe = out / "recipe.toml"
    recipe.write_text(RECIPE.format(fp=(out / "fp.pt").as_posix(), budget=budget, qat_steps=qat_steps))
    print(f"(b) wrote {recipe}; from examples/:")
    # search + QAT + packed checkpoint and report (without --no-export it also writes and verifies the
    # QONNX and onnxruntime files, as the export below does)
    hq_ptq_cli("run", str(recipe), "--out", str(out / "run"), "--no-export")
    hq_ptq_cli(
        "export",
        str(out / "run" / "model.hqpt.safetensors"),
        "--model",
        "your_own_model:build_model",
        "--data",
        "your_own_model:digits_loaders",
        "--runtime",
        "onnxruntime",
    )


def main(out_dir: str | Path | None = None, *, budget: float = 3.5, qat_steps: int = 40) -> dict[str, float]:
    """Run (a) and (b), writing every file under ``out_dir`` (default: a new temporary folder)."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="hq_ptq_own_model-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_data, test_data = digits_loaders()
    result = in_python(out, train_data, test_data, budget, qat_steps)
    from_the_shell(out, budget, qat_steps)
    print(f"done in {time.perf_counter() - start:.0f} s; files in {out}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--budget", type=float, default=3.5, help="average weight bits")
    parser.add_argument("--qat-steps", type=int, default=40, help="QAT steps")
    args = parser.parse_args()
    # a network this small computes fastest on one thread: with more, starting them costs more than its
    # tiny matrix products (on a busy 2-core machine, 13 s against 78 s for the whole walkthrough)
    torch.set_num_threads(1)
    main(args.out_dir, budget=args.budget, qat_steps=args.qat_steps)
