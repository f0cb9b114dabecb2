"""Devices end to end: ``QuantConfig.device`` / ``[quant] device`` / ``--device``, batches following the
model, one-line errors naming both devices, ``map_location`` on load, and CUDA random states in QAT
checkpoints.

Every test runs on the CPU; those parametrized over ``DEVICES`` run on CUDA too where it is present. A
device mismatch is provoked on the CPU with ``meta`` tensors (they hold no values, so they cannot be moved).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_cnn
from torch import nn
from typer.testing import CliRunner

import hq_ptq
from hq_ptq.checkpoint import load_float, save_float
from hq_ptq.cli import app
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.devices import batch_to, model_device, resolve_device
from hq_ptq.dnas import MixedQuantLayer
from hq_ptq.qat import finetune
from hq_ptq.recipe import load_recipe
from hq_ptq.swap import quant_layers, set_layer_quant, swap_layers, weight_error
from hq_ptq.train import evaluate

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def _data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)  # CPU batches, as a DataLoader gives them
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _on(model: nn.Module, device: torch.device) -> bool:
    return all(t.device == device for t in [*model.parameters(), *model.buffers()])


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_device_runs_analysis_bn_qat_evaluate_and_pack_there(device, tmp_path):
    want = resolve_device(device)
    model, data = _net(), _data()
    config = QuantConfig(
        device=device,
        search=SearchConfig(metric="fisher", calib_batches=2),
        bn_recalibration_batches=2,
        qat=QATConfig(steps=3, lr=1e-2, ema_decay=0.5),  # student, teacher (distillation) and EMA
    )
    out = hq_ptq.quantize(model, budget=6.0, calib_data=data, train_data=data, config=config)
    assert out is model and _on(model, want)
    assert hq_ptq.get_plan(model).avg_bits <= 6.0 + 1e-9
    accuracy = evaluate(model, data)  # CPU batches, model on `device`: inputs and targets follow it
    assert 0 <= accuracy <= 1
    x = data[0][0]
    expected = model(x.to(want)).cpu()
    path = hq_ptq.save(model, tmp_path / "q.hqpt.safetensors")
    loaded = hq_ptq.load(path, model=_net(), map_location=device)
    assert _on(loaded, want)
    assert torch.equal(loaded(x.to(want)).cpu(), expected)
    on_cpu = hq_ptq.load(path, model=_net(), map_location="cpu")
    assert _on(on_cpu, torch.device("cpu"))
    assert torch.allclose(on_cpu(x), expected, atol=1e-5)


def test_auto_keeps_the_model_where_it_is_and_recipes_prefer_cuda():
    assert QuantConfig().device == "auto"
    model = small_cnn()
    assert resolve_device("auto", model) == model_device(model) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "mps", "", 3, None])
def test_invalid_device_settings_are_refused_in_one_line(bad):
    with pytest.raises(ValueError, match="quant.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'") as err:
        QuantConfig(device=bad)
    assert repr(bad) in _one_line_error(err)
    with pytest.raises(ValueError, match="map_location must be"):
        resolve_device(bad if bad is not None else "none", what="map_location")


def test_device_in_recipes_and_on_the_command_line(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tmp_path / "r.toml", quant={"device": "cpu"})
    assert load_recipe(str(recipe)).quant.device == "cpu"
    assert load_recipe(str(recipe), ["quant.device=auto"]).quant.device == "auto"
    with pytest.raises(ValueError, match="quant.device must be") as err:
        load_recipe(str(recipe), ["quant.device=gpu"])
    _one_line_error(err)
    runner = CliRunner()
    for command in (["run", str(recipe)], ["quantize", str(tmp_path / "none.safetensors")]):
        result = runner.invoke(app, [*command, "--device", "gpu"])
        assert result.exit_code == 2, result.output
        assert "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_the_model_is_untouched():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="asks for CUDA but torch .* sees no CUDA device") as err:
        hq_ptq.quantize(model, 4.0, calib_data=[(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))],
                        config=QuantConfig(device="cuda:0"))
    _one_line_error(err)
    assert not quant_layers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@needs_cuda
def test_a_cuda_index_past_the_last_device_is_one_line():
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_calibration_data_that_cannot_reach_the_model_names_both_devices():
    model = small_cnn()
    meta = [(torch.empty(4, 1, 8, 8, device="meta"), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="the model is on cpu but the calibration inputs are on meta") as err:
        hq_ptq.quantize(model, 4.0, calib_data=meta, config=QuantConfig(qat=QATConfig(steps=0)))
    _one_line_error(err)
    assert not quant_layers(model)  # refused before the model was touched
    with pytest.raises(ValueError, match="the model is on cpu but the calibration inputs are on meta"):
        hq_ptq.analyze(small_cnn(), calib_data=meta)


def test_evaluation_bn_and_qat_batches_on_another_device_name_both_devices():
    meta = [(torch.empty(16, 6, device="meta"), torch.zeros(16, dtype=torch.long))]
    with pytest.raises(ValueError, match="the model is on cpu but the evaluation inputs are on meta"):
        evaluate(_net(), meta)
    with pytest.raises(ValueError, match="the model is on cpu but the BatchNorm inputs are on meta"):
        hq_ptq.recalibrate_bn(_net(), meta, 1)
    net = _net()
    with pytest.warns(UserWarning, match="calib_data"):
        hq_ptq.quantize(net, 6.0, config=QuantConfig(qat=QATConfig(steps=0)))
    with pytest.raises(ValueError, match="the model is on cpu but the QAT inputs are on meta"):
        finetune(net, meta, QATConfig(steps=1))


class _MetaBuffer(nn.Module):
    """A model with one buffer left on another device (meta) than its parameters (cpu)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("shift", torch.zeros(3, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.shift


class _MakesMeta(nn.Module):
    """A model on one device whose forward creates a tensor on another."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.zeros(3, device="meta")


def test_a_forward_that_mixes_devices_is_one_line_naming_them():
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    config = QuantConfig(qat=QATConfig(steps=0))
    spread = "the model is on cpu and meta but the calibration inputs are on cpu"
    with pytest.raises(ValueError, match=spread):
        hq_ptq.quantize(_MetaBuffer(), 8.0, calib_data=data, config=config)
    mixes = "the model and the calibration inputs are on cpu but its forward mixes devices"
    with pytest.raises(ValueError, match=mixes) as err:
        hq_ptq.quantize(_MakesMeta(), 8.0, calib_data=data, config=config)
    assert "cannot take calibration inputs of shape" not in _one_line_error(err)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_move_with_their_structure(device):
    want = resolve_device(device)
    batch = ({"x": torch.zeros(2), "rest": [torch.ones(1), 3]}, (torch.arange(2),), "tag")
    moved = batch_to(batch, want)
    assert moved[0]["x"].device == want and moved[0]["rest"][0].device == want
    assert moved[0]["rest"][1] == 3 and isinstance(moved[1], tuple) and moved[2] == "tag"
    with pytest.raises(ValueError, match=f"the model is on {want} but the inputs are on meta"):
        batch_to({"x": torch.empty(2, device="meta")}, want)


@pytest.mark.parametrize("device", DEVICES)
def test_rebuilt_quantizers_and_dnas_logits_live_on_the_weights_device(device):
    want = resolve_device(device)
    holder = nn.Sequential(nn.Linear(6, 4)).to(want)
    swap_layers(holder)
    layer = holder[0]
    set_layer_quant(layer, "pot", 4)
    assert _on(layer, want)
    assert math.isfinite(weight_error(layer, "uniform", 3))
    mixed = MixedQuantLayer(nn.Linear(6, 4).to(want), [("uniform", 4), ("pot", 3)])
    assert mixed.alpha.device == want and mixed.bits.device == want
    assert "bits" in dict(mixed.named_buffers()) and "bits" not in mixed.state_dict()  # moves, not saved
    assert mixed.expected_bits().device == want
    assert mixed.double().bits.dtype == torch.float64  # it follows the module's conversions


def test_load_float_and_pack_load_take_a_map_location(tmp_path):
    model = small_cnn()
    path = save_float(model, tmp_path / "fp.safetensors", factory="conftest:small_cnn")
    loaded, _ = load_float(path, model=small_cnn(), map_location="cpu")
    assert _on(loaded, torch.device("cpu"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    torch.save(model.state_dict(), tmp_path / "fp.pt")
    auto, _ = load_float(tmp_path / "fp.pt", model=small_cnn(), map_location="auto")
    assert _on(auto, resolve_device("auto"))
    with pytest.raises(ValueError, match="map_location must be") as err:
        load_float(path, model=small_cnn(), map_location="gpu")
    _one_line_error(err)
    with pytest.warns(UserWarning, match="calib_data"):
        hq_ptq.quantize(model, 4.0, config=QuantConfig(qat=QATConfig(steps=0)))
    packed = hq_ptq.save(model, tmp_path / "q.hqpt.safetensors")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(hq_ptq.load(packed, model=small_cnn(), map_location="cpu")(x), model(x))
    assert torch.equal(hq_ptq.load(packed, model=small_cnn())(x), model(x))  # default: as before
    with pytest.raises(ValueError, match="map_location must be"):
        hq_ptq.load(packed, model=small_cnn(), map_location="cuda:x")


def test_qat_checkpoints_carry_cuda_random_states_and_old_ones_still_resume(tmp_path, monkeypatch):
    import hq_ptq.qat as qat

    net = _net()
    data = _data()
    with pytest.warns(UserWarning, match="calib_data"):
        hq_ptq.quantize(net, 6.0, config=QuantConfig(qat=QATConfig(steps=0)))
    config = QATConfig(steps=2, checkpoint_every=1)
    start = {k: v.clone() for k, v in net.state_dict().items()}

    # a checkpoint written where CUDA is in use holds every device's state, and resuming restores it
    fake = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    monkeypatch.setattr(qat, "_cuda_rng_states", lambda: [t.clone() for t in fake])
    finetune(net, data, config, checkpoint=tmp_path / "cuda.pt")
    saved = torch.load(tmp_path / "cuda.pt", weights_only=True)["rng"][0]["cuda"]
    assert all(torch.equal(a, b) for a, b in zip(saved, fake, strict=True))
    restored = []
    monkeypatch.setattr(qat, "_set_cuda_rng", lambda states, _path: restored.append(states))
    assert finetune(net, data, config, checkpoint=tmp_path / "cuda.pt", resume=True).start_step == 2
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], fake, strict=True))
    monkeypatch.undo()

    # without CUDA in use (and in checkpoints of earlier versions) there is no "cuda" entry: still resumes
    net.load_state_dict(start)
    if not torch.cuda.is_available():
        finetune(net, data, config, checkpoint=tmp_path / "cpu.pt")
        assert "cuda" not in torch.load(tmp_path / "cpu.pt", weights_only=True)["rng"][0]
        assert finetune(net, data, config, checkpoint=tmp_path / "cpu.pt", resume=True).start_step == 2
        qat._set_cuda_rng(fake, tmp_path / "cuda.pt")  # CUDA states where there is no CUDA: a warning only
    else:
        torch.zeros(1, device="cuda")  # CUDA in use
        assert len(qat._cuda_rng_states()) == torch.cuda.device_count()


@needs_cuda
def test_a_failed_quantize_on_cuda_puts_the_model_back_on_the_cpu():
    model, data = _net(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    empty: list = []  # QAT fails on it after the plan is applied, on the GPU
    with pytest.raises(ValueError, match="yielded no batches"):
        hq_ptq.quantize(model, 6.0, calib_data=data, train_data=empty,
                        config=QuantConfig(device="cuda", qat=QATConfig(steps=2)))
    assert _on(model, torch.device("cpu")) and not quant_layers(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
