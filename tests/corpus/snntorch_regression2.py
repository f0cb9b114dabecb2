# snnTorch regression tutorial, part II ("Regression-based Classification with Recurrent Leaky
# Integrate-and-Fire Neurons"): an MNIST classifier built from snn.RLeaky with all-to-all linear feedback
# (`linear_features=...`, i.e. an nn.Linear *inside* the neuron), run over its own time loop on a static
# flattened image, returning the [T, B, 10] spike record; trained with SF.mse_count_loss.
# Source: https://github.com/jeshraghian/snntorch  commit 634fc22385ec5581998e62787bbe39b53662140f,
#         docs/tutorials/tutorial_regression_2.rst, section 3 "Construct Model" (the Net class, verbatim).
# Changes: imports only (the tutorial's import cell, reduced to what Net needs).
# MIT License, Copyright (c) 2021 Jason K. Eshraghian (snnTorch). The full licence text is in
# tests/corpus/README.md ("Licences").
# fmt: off
# ruff: noqa
import snntorch as snn
import torch

class Net(torch.nn.Module):
    """Simple spiking neural network in snntorch."""

    def __init__(self, timesteps, hidden, beta):
        super().__init__()

        self.timesteps = timesteps
        self.hidden = hidden
        self.beta = beta

        # layer 1
        self.fc1 = torch.nn.Linear(in_features=784, out_features=self.hidden)
        self.rlif1 = snn.RLeaky(beta=self.beta, linear_features=self.hidden)

        # layer 2
        self.fc2 = torch.nn.Linear(in_features=self.hidden, out_features=10)
        self.rlif2 = snn.RLeaky(beta=self.beta, linear_features=10)

    def forward(self, x):
        """Forward pass for several time steps."""

        # Initalize membrane potential
        spk1, mem1 = self.rlif1.init_rleaky()
        spk2, mem2 = self.rlif2.init_rleaky()

        # Empty lists to record outputs
        spk_recording = []

        for step in range(self.timesteps):
            spk1, mem1 = self.rlif1(self.fc1(x), spk1, mem1)
            spk2, mem2 = self.rlif2(self.fc2(spk1), spk2, mem2)
            spk_recording.append(spk2)

        return torch.stack(spk_recording)
