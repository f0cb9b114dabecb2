"""A user's own spiking model and data, outside hq_ptq's zoo: what a recipe's factories point at.

The model runs its own time loop over a static ``[B, 1, 8, 8]`` image (scikit-learn's digits, bundled: no
download) with explicit-membrane snnTorch ``Leaky`` neurons, and returns ``(spikes, membranes)``, each
``[T, B, 10]``: a loss and an output_fn are needed to read it.
"""

from __future__ import annotations

import snntorch as snn
import torch
import torch.nn.functional as F
from torch import nn


class TinySpikingNet(nn.Module):
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


def build(channels: int = 8, hidden: int = 32, num_steps: int = 4) -> TinySpikingNet:
    torch.manual_seed(0)
    return TinySpikingNet(channels, hidden, num_steps)


def scores(outputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[B, 10] class scores: the output membrane averaged over time."""
    return outputs[1].mean(0)


def loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(scores(outputs), targets)


def loaders(n_train: int = 256, n_test: int = 64, batch_size: int = 32, seed: int = 0):
    """(train, test): lists of (images [B, 1, 8, 8], labels [B]) batches of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]

    def batches(lo: int, hi: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ends = [(i, min(i + batch_size, hi)) for i in range(lo, hi, batch_size)]
        return [(x[a:b], y[a:b]) for a, b in ends]

    return batches(0, n_train), batches(n_train, n_train + n_test)



def build_trained(epochs: int = 2) -> TinySpikingNet:
    """A factory that returns a trained model (a recipe without fp_checkpoint uses it as it comes)."""
    model = build()
    train, _ = loaders()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
    return model.eval()


def one_shot(**options):
    """A data factory that gets the contract wrong: a generator is exhausted after one pass."""
    train, test = loaders(**options)
    return (b for b in train), test


NOT_CALLABLE = 3  # a reference to it is not a function
