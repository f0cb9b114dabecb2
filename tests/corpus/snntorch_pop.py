# snnTorch tutorial "Population Coding in Spiking Neural Nets": a 2-layer dense spiking network whose output
# layer has 500 neurons for 10 classes (50 per class, in contiguous blocks), run for ONE time step per batch
# (num_steps = 1): the model has no time loop at all, its init_hidden neurons are reset by the *caller*
# (the tutorial's test_accuracy calls utils.reset(net) before every batch; snntorch.backprop.BPTT does the same),
# and it returns (spk, mem) of the output layer, [B, 500] each. The loss is
# SF.mse_count_loss(correct_rate=1.0, incorrect_rate=0.0, population_code=True, num_classes=10) on the spikes
# stacked over the single step, [1, B, 500].
# Source: https://github.com/jeshraghian/snntorch  commit 634fc22385ec5581998e62787bbe39b53662140f,
#         docs/tutorials/tutorial_pop.rst, section "Define Network" (the parameter cell and the
#         "With population coding" cell, verbatim).
# Changes: the imports (the tutorial's first cell and the surrogate import of the parameter cell) are gathered
# at the top; num_hidden 128 -> 32 as marked (the network reads these module-level names, so they are its
# constructor arguments); the cell is wrapped in net_pop() so each build is fresh, and its `.to(device)` is
# left out (the corpus builds on the CPU). The cells are dedented by the four spaces of the reStructuredText
# literal block and trailing blanks are stripped; otherwise unchanged.
# MIT License, Copyright (c) 2021 Jason K. Eshraghian (snnTorch). The full licence text is in
# tests/corpus/README.md ("Licences").
# fmt: off
# ruff: noqa
import torch, torch.nn as nn
import snntorch as snn
from snntorch import surrogate

# network parameters
num_inputs = 28*28
num_hidden = 32  # tutorial: 128 (shrunk for the test corpus)
num_outputs = 10
num_steps = 1

# spiking neuron parameters
beta = 0.9  # neuron decay rate
grad = surrogate.fast_sigmoid()


def net_pop():
    pop_outputs = 500

    net_pop = nn.Sequential(nn.Flatten(),
                            nn.Linear(num_inputs, num_hidden),
                            snn.Leaky(beta=beta, spike_grad=grad, init_hidden=True),
                            nn.Linear(num_hidden, pop_outputs),
                            snn.Leaky(beta=beta, spike_grad=grad, init_hidden=True, output=True)
                            )
    return net_pop
