# snnTorch Tutorial 5 ("Training Spiking Neural Networks with snnTorch"): the fully connected SNN with
# explicit membranes (`init_hidden=False`; forward carries mem1/mem2 itself) that runs its own time loop over
# a static input.
# Source: https://github.com/jeshraghian/snntorch  commit 634fc22385ec5581998e62787bbe39b53662140f,
#         docs/tutorials/tutorial_5.rst, section 6 "Define the Network" (both code cells, verbatim).
# Changes: the imports (the tutorial's first cells) are reduced to the ones the network needs, and the
# configuration cell's sizes are shrunk, as marked: the tutorial's Net takes no constructor arguments and reads
# these module-level names instead, so they are its constructor arguments. The class is unchanged. The
# tutorial's `net = Net().to(device)` line is left out (the corpus builds the model itself, on the CPU).
# MIT License, Copyright (c) 2021 Jason K. Eshraghian (snnTorch). The full licence text is in
# tests/corpus/README.md ("Licences").
# fmt: off
# ruff: noqa
import snntorch as snn
import torch
import torch.nn as nn

# Network Architecture
num_inputs = 28*28
num_hidden = 32  # tutorial: 1000 (shrunk for the test corpus)
num_outputs = 10

# Temporal Dynamics
num_steps = 4  # tutorial: 25 (shrunk for the test corpus)
beta = 0.95


# Define Network
class Net(nn.Module):
    def __init__(self):
        super().__init__()

        # Initialize layers
        self.fc1 = nn.Linear(num_inputs, num_hidden)
        self.lif1 = snn.Leaky(beta=beta)
        self.fc2 = nn.Linear(num_hidden, num_outputs)
        self.lif2 = snn.Leaky(beta=beta)

    def forward(self, x):

        # Initialize hidden states at t=0
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()

        # Record the final layer
        spk2_rec = []
        mem2_rec = []

        for step in range(num_steps):
            cur1 = self.fc1(x)
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = self.fc2(spk1)
            spk2, mem2 = self.lif2(cur2, mem2)
            spk2_rec.append(spk2)
            mem2_rec.append(mem2)

        return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)
