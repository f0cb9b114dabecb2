"""QAT pieces: the learnable-scale check, fine-tuning moves the weights, distillation loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hq_ptq
from hq_ptq.config import QATConfig
from hq_ptq.qat import distillation_loss, finetune


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_finetune_trains_quantized_model_and_checks_scales():
    net = _net()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    teacher = _net().eval()
    hq_ptq.quantize(net, budget=4.0, calib_data=data)
    for p in net[0].weight_quant.parameters():
        p.requires_grad_(False)
    with pytest.raises(RuntimeError, match="no trainable"):
        finetune(net, data, QATConfig(steps=2))
    before = net[3].weight.detach().clone()
    for p in net[0].weight_quant.parameters():
        p.requires_grad_(True)
    result = finetune(net, data, QATConfig(steps=4, lr=1e-2), teacher=teacher)
    assert result.steps == 4 and math.isfinite(result.final_loss) and result.final_loss > 0  # a CE + KD loss
    assert not torch.equal(net[3].weight, before)
    assert not net.training


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
    a = torch.randn(4, 5)
    assert distillation_loss(a, a, 2.0).abs() < 1e-6
    assert distillation_loss(a, a.flip(0), 2.0) > 0
    with pytest.raises(ValueError, match="qat.steps"):
        QATConfig(steps=-1)


def _quantized_net_and_data():
    net = _net()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    hq_ptq.quantize(net, budget=4.0, calib_data=data)
    return net, data


def test_default_keeps_bn_running_statistics_and_keep_bn_statistics_false_updates_them():
    assert QATConfig().keep_bn_statistics is True
    default, unfrozen = QATConfig(steps=3, lr=1e-2), QATConfig(steps=3, lr=1e-2, keep_bn_statistics=False)
    for config, frozen in ((default, True), (unfrozen, False)):
        net, data = _quantized_net_and_data()
        mean, var = net[1].running_mean.clone(), net[1].running_var.clone()
        finetune(net, data, config)
        assert torch.equal(net[1].running_mean, mean) == frozen
        assert torch.equal(net[1].running_var, var) == frozen


def test_ema_weights_are_the_polyak_average_of_the_trajectory():
    # decay d: after one step the average is d * w0 + (1 - d) * w1; check it against a plain run
    plain, data = _quantized_net_and_data()
    w0 = plain[3].weight.detach().clone()
    finetune(plain, data[:1], QATConfig(steps=1, lr=1e-2))
    averaged, _ = _quantized_net_and_data()
    finetune(averaged, data[:1], QATConfig(steps=1, lr=1e-2, ema_decay=0.75))
    assert not torch.allclose(plain[3].weight, w0)  # the step moved the weights
    torch.testing.assert_close(averaged[3].weight, 0.75 * w0 + 0.25 * plain[3].weight)
    with pytest.raises(ValueError, match="ema_decay"):
        QATConfig(ema_decay=1.0)
