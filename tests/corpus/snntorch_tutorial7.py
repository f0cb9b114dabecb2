# snnTorch Tutorial 7 ("Neuromorphic Datasets with Tonic + snnTorch"): the convolutional SNN for N-MNIST,
# an nn.Sequential of Conv2d/MaxPool2d/Leaky(init_hidden=True) ending in Leaky(output=True), driven by
# the tutorial's `forward_pass(net, data)` loop over a [T, B, 2, 34, 34] frame tensor with `utils.reset(net)`,
# trained with `SF.mse_count_loss(correct_rate=0.8, incorrect_rate=0.2)`.
# Source: https://github.com/jeshraghian/snntorch  commit 634fc22385ec5581998e62787bbe39b53662140f,
#         docs/tutorials/tutorial_7.rst, section 2.1 "Define our Network" (imports, network, forward_pass)
#         and 2.2 "Training" (loss), verbatim.
# Changes: the network cell is indented into a function `tutorial_net()` so that every build is fresh (the
# tutorial runs it at top level); the cell's `device = ... cuda ... mps ... cpu` line is replaced by
# `device = torch.device("cpu")` (the corpus runs on the CPU; `.to(device)` is kept); `import torch` is added
# (the tutorial imported it in an earlier cell) and the plotting import is dropped. hq_ptq calls
# `model(inputs)`, so the corpus wraps `forward_pass` in a two-line nn.Module (`ForwardPass` in
# tests/corpus/__init__.py); that wrapper is the only code added.
# MIT License, Copyright (c) 2021 Jason K. Eshraghian (snnTorch). The full licence text is in
# tests/corpus/README.md ("Licences").
# fmt: off
# ruff: noqa
import torch
import snntorch as snn
from snntorch import surrogate
from snntorch import functional as SF
# dropped (plotting only): from snntorch import spikeplot as splt
from snntorch import utils
import torch.nn as nn

device = torch.device("cpu")  # tutorial: cuda if available, else mps, else cpu


def tutorial_net():
    # neuron and simulation parameters
    spike_grad = surrogate.atan()
    beta = 0.5

    #  Initialize Network
    net = nn.Sequential(nn.Conv2d(2, 12, 5),
                        nn.MaxPool2d(2),
                        snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True),
                        nn.Conv2d(12, 32, 5),
                        nn.MaxPool2d(2),
                        snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True),
                        nn.Flatten(),
                        nn.Linear(32*5*5, 10),
                        snn.Leaky(beta=beta, spike_grad=spike_grad, init_hidden=True, output=True)
                        ).to(device)
    return net


# this time, we won't return membrane as we don't need it 

def forward_pass(net, data):  
  spk_rec = []
  utils.reset(net)  # resets hidden states for all LIF neurons in net

  for step in range(data.size(0)):  # data.size(0) = number of time steps
      spk_out, mem_out = net(data[step])
      spk_rec.append(spk_out)

  return torch.stack(spk_rec)


loss_fn = SF.mse_count_loss(correct_rate=0.8, incorrect_rate=0.2)
