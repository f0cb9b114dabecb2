# NeHAR spiking CNN (SCNN) for human activity recognition on WISDM smartwatch signals (Fra et al.,
# "Human activity recognition: suitability of a neuromorphic approach for on-edge AIoT applications",
# Neuromorph. Comput. Eng. 2022), as shipped in NeuroBench's examples.
# Source: https://github.com/NeuroBench/neurobench  commit e521c28f5798cb40bb9423758bf066dad53fe070,
#         file examples/nehar/SCNN.py (copied whole, verbatim, unchanged; the file has no imports to change).
# Input: a [B, L=40, 6] window of accelerometer+gyroscope samples; forward loops over L itself
# (`input[:, step, :]`), with Conv1d/MaxPool1d, init_hidden=True neurons, `utils.reset(self)`, and returns the
# [T, B, 7] output spike record. The authors train with CrossEntropyLoss on the spike count (training.py).
# examples/nehar/LICENSE.rst of that commit:
#
# BSD-License (3-clause)
# ======================
#
# | Copyright (c) 2022-2023, Gianvito Urgese, Politecnico di Torino
# | Copyright (c) 2022-2023, Vittorio Fra, Politecnico di Torino
# | Copyright (c) 2022-2023, Benedetto Leto, Politecnico di Torino
# | All rights reserved.
#
# Redistribution and use in source and binary forms, with or without
# modification, are permitted provided that the following conditions are met:
#
# * Redistributions of source code must retain the above copyright
# notice, this list of conditions and the following disclaimer.
# * Redistributions in binary form must reproduce the above copyright
# notice, this list of conditions and the following disclaimer in the
# documentation and/or other materials provided with the distribution.
# * Neither the name of Gianvito Urgese, Vittorio Fra, Evelina Forno,
# the Politecnico di Torino nor the names of its contributors may be used
# to endorse or promote products derived from this software without
# specific prior written permission.
#
# THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
# AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
# IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE
# ARE DISCLAIMED. IN NO EVENT SHALL GIANVITO URGESE OR THE POLITECNICO DI
# TORINO BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY,
# OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
# SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
# INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN
# CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE)
# ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
# POSSIBILITY OF SUCH DAMAGE.
# fmt: off
# ruff: noqa
import snntorch as snn
from snntorch import utils

import torch
import torch.nn as nn



class SCNN(nn.Module):
    def __init__(self):
        super().__init__()

        self.conv1 = nn.Conv1d(6, 200, 2, padding=4)
        self.max1 = nn.MaxPool1d(2)
        self.leaky1 = snn.Leaky(beta=0.4, init_hidden=True, threshold=0.002)
        self.conv2 = nn.Conv1d(200, 256, kernel_size=1)
        self.max2 = nn.MaxPool1d(2)
        self.leaky2 = snn.Leaky(beta=0.3, init_hidden=True, threshold=0.001)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512, 7)
        self.leaky3 = snn.Leaky(beta=0.5, output=True, init_hidden=True, threshold=0.001)
        self.num_steps = 40

    def single_forward(self, input):
        x = self.conv1(input.reshape(input.shape[0], input.shape[1], 1))
        x = self.max1(x)
        x = self.leaky1(x)
        x = self.conv2(x)
        x = self.max2(x)
        x = self.leaky2(x)
        x = self.flatten(x)
        x = self.linear(x)
        spk_out, mem_out = self.leaky3(x)
        return spk_out, mem_out

    def forward(self, input):
        # Initialize hidden states and outputs at t=0
        mem_rec = []
        spk_rec = []

        self.leaky1.init_leaky()
        self.leaky2.init_leaky()
        self.leaky3.init_leaky()
        utils.reset(self)
        for step in range(self.num_steps):
            new_input = input[:, step, :]
            x = self.conv1(new_input.reshape(new_input.shape[0], new_input.shape[1], 1))
            x = self.max1(x)
            x = self.leaky1(x)
            x = self.conv2(x)
            x = self.max2(x)
            x = self.leaky2(x)
            x = self.flatten(x)
            x = self.linear(x)
            spk_out, mem_out = self.leaky3(x)

            spk_rec.append(spk_out)
            mem_rec.append(mem_out)

        return torch.stack(spk_rec)
