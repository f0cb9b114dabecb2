# snnTorch Tutorial 3, legacy version ("Deep Learning with snnTorch"): a fully connected SNN of two
# second-order `snn.Synaptic` neurons (synaptic current and membrane: two state variables per neuron, carried
# explicitly as `syn1, mem1` / `syn2, mem2`), run by its own time loop over a static [B, 784] input.
# Source: https://github.com/jeshraghian/snntorch  commit 634fc22385ec5581998e62787bbe39b53662140f,
#         docs/tutorials/legacy/tutorial_3_old.rst, section 3 "Define the Network" (verbatim), with the
#         configuration cell of section 2.1.
# Changes: the imports (the tutorial's first cell) are reduced to the ones the network needs; the configuration
# cell keeps its "Network Architecture" and "Temporal Dynamics" names (its training parameters, `dtype` and
# `device` lines are left out) and its sizes are shrunk, as marked: the tutorial's Net takes no constructor
# arguments and reads these module-level names instead, so they are its constructor arguments. The cells are
# dedented by the two spaces of the reStructuredText literal block and trailing blanks are stripped; the class
# is otherwise unchanged. The tutorial's `net = Net().to(device)` line is left out (the corpus builds the
# model itself, on the CPU).
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
num_steps = 6  # tutorial: 25 (shrunk for the test corpus)
alpha = 0.7
beta = 0.8


# Define Network
class Net(nn.Module):
    def __init__(self):
        super().__init__()

        # Initialize layers
        self.fc1 = nn.Linear(num_inputs, num_hidden)
        self.lif1 = snn.Synaptic(alpha=alpha, beta=beta)
        self.fc2 = nn.Linear(num_hidden, num_outputs)
        self.lif2 = snn.Synaptic(alpha=alpha, beta=beta)

    def forward(self, x):

        # Initialize hidden states and outputs at t=0
        syn1, mem1 = self.lif1.init_synaptic()
        syn2, mem2 = self.lif2.init_synaptic()

        # Record the final layer
        spk2_rec = []
        mem2_rec = []

        for step in range(num_steps):
            cur1 = self.fc1(x)
            spk1, syn1, mem1 = self.lif1(cur1, syn1, mem1)
            cur2 = self.fc2(spk1)
            spk2, syn2, mem2 = self.lif2(cur2, syn2, mem2)

            spk2_rec.append(spk2)
            mem2_rec.append(mem2)

        return torch.stack(spk2_rec, dim=0), torch.stack(mem2_rec, dim=0)

