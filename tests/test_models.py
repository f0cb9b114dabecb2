from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hq_ptq.models import build_model, list_models, register_model
from hq_ptq.models import registry as registry_module
from hq_ptq.snn import MultiStepLeaky, spiking_neurons

TINY = ["spikformer-tiny", "sdt-tiny"]
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _events(t: int, b: int, side: int, seed: int = 0, rate: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(t, b, 2, side, side, generator=g) < rate).float() * 2


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_zoo() -> None:
    names = list_models()
    assert {"spikformer-2-256", "spikformer-tiny", "sdt-2-256", "sdt-tiny"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", list_models())
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    side = model.hq_config["img_size"]
    t, b = (2, 1) if side >= 128 else (3, 2)
    with torch.no_grad():
        out = model(_events(t, b, side))
    assert out.shape == (b, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_take_34px_frames(name: str) -> None:
    model = build_model(name).eval()
    with torch.no_grad():
        assert model(_events(2, 2, 34)).shape == (2, 10)


def test_spikformer_2_256_has_the_published_size() -> None:
    n = _n_params(build_model("spikformer-2-256"))
    assert abs(n - 2.57e6) / 2.57e6 < 0.02, n


@pytest.mark.parametrize("name", ["sdt-2-256", "spikformer-4-384", *TINY])
def test_parameter_counts(name: str) -> None:
    expected = {"sdt-2-256": 2.57e6, "spikformer-4-384": 9.32e6}
    n = _n_params(build_model(name))
    if name in expected:
        assert abs(n - expected[name]) / expected[name] < 0.02, n
    else:
        assert 100_000 <= n <= 200_000, n


@pytest.mark.parametrize("name", list_models())
def test_weights_only_in_swappable_layers(name: str) -> None:
    # The quantizer swaps Conv1d/Conv2d/Linear by type: no weight may hide anywhere else (BN aside).
    model = build_model(name)
    owners = {id(p): type(m) for m in model.modules() for p in m.parameters(recurse=False)}
    assert set(owners.values()) <= {*WEIGHT_LAYERS, nn.BatchNorm1d, nn.BatchNorm2d}
    assert all(isinstance(m, MultiStepLeaky) for m in model.modules() if "lif" in type(m).__name__.lower())
    assert len(spiking_neurons(model)) > 0


@pytest.mark.parametrize("name", TINY)
def test_deterministic_and_stateless(name: str) -> None:
    torch.manual_seed(0)
    # Train mode: BN normalises with batch statistics, so a fresh model fires (in eval mode its
    # untouched running statistics leave most neurons silent and every output would be 0).
    model = build_model(name).train()
    x = _events(3, 2, 32, seed=1)
    with torch.no_grad():
        first = model(x)
        assert first.abs().sum() > 0
        assert torch.equal(model(x), first)  # no state carried over from the previous call
        torch.manual_seed(1)
        build_model(name)  # a second model does not touch the first one's neurons
        other = model(_events(3, 2, 32, seed=2))
        assert torch.equal(model(x), first)
    assert not torch.equal(other, first)


@pytest.mark.parametrize("name", TINY)
def test_gradient_reaches_every_weight(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).train()
    out = model(_events(3, 4, 32, seed=3))
    nn.functional.cross_entropy(out, torch.arange(4)).backward()
    weight_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
    assert len(weight_layers) >= 10
    for layer_name, module in weight_layers:
        grad = module.weight.grad
        assert grad is not None and grad.abs().sum() > 0, layer_name


@pytest.mark.parametrize("name", list_models())
def test_hq_config_rebuilds_the_model(name: str) -> None:
    model = build_model(name, num_classes=11)
    cfg = json.loads(json.dumps(model.hq_config))
    assert cfg["name"] == name and cfg["num_classes"] == 11
    rest = {k: v for k, v in cfg.items() if k != "name"}
    rebuilt = build_model(cfg["name"], **rest)
    assert rebuilt.hq_config == model.hq_config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())


def test_overrides_change_the_architecture() -> None:
    model = build_model("spikformer-tiny", depth=1, embed_dim=32, num_heads=2, threshold=0.75)
    assert len(model.blocks) == 1 and model.head.in_features == 32
    assert float(model.blocks[0].attn.q_lif.lif.threshold) == 0.75
    assert float(model.blocks[0].attn.attn_lif.lif.threshold) == 0.5
    assert model.hq_config["depth"] == 1


def test_unknown_model_suggests_a_name() -> None:
    with pytest.raises(ValueError, match=r"spikformer-tiny.*Choose from: .*sdt-2-256"):
        build_model("spikformr-tiny")


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("sdt-tiny", num_clases=3)
    with pytest.raises(ValueError, match="num_heads"):
        build_model("spikformer-tiny", num_heads=5)
    with pytest.raises(ValueError, match="pooling_stat"):
        build_model("sdt-tiny", pooling_stat="012")
    with pytest.raises(ValueError, match="time-first"):
        build_model("sdt-tiny")(torch.zeros(2, 2, 32, 32))


def test_register_model_builds_custom_models() -> None:
    name = "test-only-mlp"

    @register_model(name)
    def _build(width: int = 4, tag: object = None) -> nn.Module:
        return nn.Linear(width, 2)

    try:
        model = build_model(name, width=3)
        assert model.hq_config == {"name": name, "width": 3}
        assert name in list_models()
        with pytest.raises(ValueError, match="already registered"):
            register_model(name)(_build)
        with pytest.raises(ValueError, match="JSON"):
            build_model(name, tag=object())
    finally:
        registry_module._REGISTRY.pop(name, None)
