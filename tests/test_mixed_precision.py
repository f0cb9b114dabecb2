"""Mixed precision and onnxruntime providers: ``QuantConfig.precision`` / ``[quant] precision`` /
``--precision`` (bfloat16 autocast for QAT, float32 everywhere it is kept), and the execution providers
export verification runs on.

Everything runs for real on the CPU: ``torch.autocast("cpu", dtype=torch.bfloat16)`` drives real Brevitas
quantizers and the fused LIF, and every onnxruntime session really runs on the CPU provider. Only
``onnxruntime.get_available_providers`` is replaced, to test which providers would be chosen on a machine with
CUDA.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import small_cnn
from torch import nn
from typer.testing import CliRunner

import hq_ptq
from hq_ptq.cli import app
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.devices import analysis_autocast, autocast_context
from hq_ptq.models import build_model
from hq_ptq.qat import _settings, finetune
from hq_ptq.recipe import load_recipe
from hq_ptq.snn import MultiStepLeaky
from hq_ptq.swap import quant_layers, set_layer_quant, swap_layers

runner = CliRunner()


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def _spikformer() -> nn.Module:
    torch.manual_seed(0)
    return build_model("spikformer-tiny", num_classes=4, img_size=16, embed_dim=32, num_heads=2, depth=1)


def _events(n: int = 2, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        ((torch.rand(2, batch, 2, 16, 16, generator=g) < 0.3).float(),
         torch.randint(0, 4, (batch,), generator=g))
        for _ in range(n)
    ]


def _quantized_spikformer() -> nn.Module:
    model = _spikformer()
    swap_layers(model, scheme="uniform", bits=4)
    for i, layer in enumerate(quant_layers(model).values()):
        if i % 2:
            set_layer_quant(layer, "pot", 3)
    return model


def _images(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _quantized_cnn() -> nn.Module:
    model = small_cnn()
    swap_layers(model, scheme="uniform", bits=4)
    return model


def _conv_dtypes(model: nn.Module) -> tuple[list[torch.dtype], list[torch.utils.hooks.RemovableHandle]]:
    """The output dtypes of every Conv/Linear call of ``model``, recorded from now on."""
    seen: list[torch.dtype] = []

    def hook(_module, _args, out):
        seen.append(out.dtype)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]
    return seen, [m.register_forward_hook(hook) for m in layers]


# ------------------------------------------------------------------------------------------------
# QAT in bfloat16


def test_bf16_qat_trains_the_spiking_model_in_bf16_with_float32_weights():
    model, teacher = _quantized_spikformer(), _spikformer().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    student_dtypes, handles = _conv_dtypes(model)
    teacher_dtypes, more = _conv_dtypes(teacher)
    lifs: list[tuple[str, torch.dtype, torch.dtype]] = []

    def lif_hook(module, args, out):
        lifs.append((module.resolved_backend(), args[0].dtype, out.dtype))

    more += [m.register_forward_hook(lif_hook) for m in model.modules() if isinstance(m, MultiStepLeaky)]
    try:
        result = finetune(model, _events(), QATConfig(steps=3, lr=1e-2, ema_decay=0.5), teacher=teacher,
                          precision="bf16")
    finally:
        for h in handles + more:
            h.remove()
    # the student's and the teacher's Brevitas Conv/Linear layers ran in bfloat16 ...
    assert student_dtypes and set(student_dtypes) == {torch.bfloat16}
    assert teacher_dtypes and set(teacher_dtypes) == {torch.bfloat16}
    # the fused LIF took bfloat16 currents and kept float32 membranes and spikes (its float32 reset)
    assert lifs and set(lifs) == {("fused", torch.bfloat16, torch.float32)}
    # ... while every parameter (weights, Brevitas scales, BN, LIF) stayed float32 and trained
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("scaling_impl" in n for n in moved) and any(n.endswith("conv.weight") for n in moved)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.final_loss))
    # the trained model still runs in float32 afterwards (no autocast left on)
    x, _ = _events(1)[0]
    assert model(x).dtype == torch.float32


def test_bf16_qat_follows_fp32_qat_closely_on_a_plain_model():
    """bf16 QAT is a rounding of fp32 QAT: same data and seed, the weight updates point the same way."""
    data = _images()
    runs = {}
    for precision in ("fp32", "bf16"):
        model = _quantized_cnn()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        finetune(model, data, QATConfig(steps=4, lr=1e-2), seed=0, precision=precision)
        runs[precision] = {n: p.detach() - start[n] for n, p in model.named_parameters()}
    for name, update in runs["fp32"].items():
        other = runs["bf16"][name]
        cosine = torch.nn.functional.cosine_similarity(update.flatten(), other.flatten(), dim=0)
        assert cosine > 0.95, (name, float(cosine))


def test_bf16_is_deterministic_and_its_checkpoints_stay_float32_and_resume_bit_identically(tmp_path):
    data = _images(4)
    config = QATConfig(steps=4, lr=1e-2, ema_decay=0.5, checkpoint_every=2)
    straight = _quantized_cnn()
    finetune(straight, data, config, precision="bf16")
    again = _quantized_cnn()
    finetune(again, data, config, precision="bf16")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), again.state_dict().values()))

    # a run killed right after its checkpoint at step 2 ...
    path = tmp_path / "qat.pt"
    _run_until(_quantized_cnn(), data, config, path, stop_at=2)
    doc = torch.load(path, weights_only=True)
    assert doc["step"] == 2 and '"precision": "bf16"' in doc["settings"]
    floats = [
        *doc["model"].values(),
        *doc["ema"].values(),
        *(t for state in doc["optimizer"]["state"].values() for t in state.values() if t.dim() > 0),
    ]
    assert doc["ema"] and {t.dtype for t in floats if t.is_floating_point()} == {torch.float32}
    # ... resumed in bf16 ends exactly where the straight run ended
    resumed = _quantized_cnn()
    out = finetune(resumed, data, config, precision="bf16", checkpoint=path, resume=True)
    assert out.start_step == 2
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(),
                                                 resumed.state_dict().values()))
    # resuming it in float32 is refused: another precision is another run
    with pytest.raises(ValueError, match="other QAT settings") as err:
        finetune(_quantized_cnn(), data, config, precision="fp32", checkpoint=path, resume=True)
    _one_line(err)


class _Stop(Exception):
    pass


def _run_until(model, data, config, path, stop_at: int) -> None:
    """Fine-tune in bf16 with checkpoints, interrupted right after the checkpoint of step ``stop_at``."""
    import hq_ptq.qat as qat

    original = qat.save_checkpoint

    def save_then_stop(where, state):
        original(where, state)
        if state["step"] >= stop_at:
            raise _Stop

    qat.save_checkpoint = save_then_stop
    try:
        with pytest.raises(_Stop):
            finetune(model, data, config, precision="bf16", checkpoint=path)
    finally:
        qat.save_checkpoint = original


def test_fp32_checkpoint_settings_are_those_written_before_precision_existed():
    config = QATConfig(steps=3)
    assert _settings(config, 0) == _settings(config, 0, "fp32")
    assert "precision" not in _settings(config, 0)
    assert '"precision": "bf16"' in _settings(config, 0, "bf16")


def test_quantize_with_bf16_trains_in_bf16_and_returns_a_float32_model():
    model, data = small_cnn(), _images()
    config = QuantConfig(precision="bf16", search=SearchConfig(metric="fisher", calib_batches=2),
                         qat=QATConfig(steps=2, lr=1e-2))
    dtypes, handles = _conv_dtypes(model)
    try:
        hq_ptq.quantize(model, budget=4.0, calib_data=data, train_data=data, config=config)
    finally:
        for h in handles:
            h.remove()
    assert torch.bfloat16 in dtypes  # QAT's forwards
    assert torch.float32 in dtypes  # the analysis', BN re-estimation's
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert hq_ptq.get_plan(model).avg_bits <= 4.0 + 1e-9
    assert model(data[0][0]).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# the analysis stays in float32


@pytest.mark.parametrize("metric", ["fisher", "hessian"])
def test_the_analysis_stays_float32_under_bf16_and_says_so_once(metric, caplog):
    data = _images(2)
    search = SearchConfig(metric=metric, calib_batches=2, hutchinson_probes=4)
    fp32 = hq_ptq.analyze(small_cnn(), calib_data=data, config=QuantConfig(search=search))
    with caplog.at_level(logging.INFO, logger="hq_ptq.devices"):
        # even inside an autocast of the caller's: the analysis switches it off
        with torch.autocast("cpu", dtype=torch.bfloat16):
            config = QuantConfig(search=search, precision="bf16")
            bf16 = hq_ptq.analyze(small_cnn(), calib_data=data, config=config)
    assert bf16.traces == fp32.traces  # bit for bit: float32 arithmetic both times
    lines = [r.getMessage() for r in caplog.records if "runs in fp32, not bf16" in r.getMessage()]
    assert len(lines) == 1 and f"({metric})" in lines[0], lines
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "hq_ptq.devices")


def test_analysis_autocast_is_silent_in_fp32(caplog):
    with caplog.at_level(logging.INFO, logger="hq_ptq.devices"):
        with analysis_autocast("fp32", "fisher", torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
    assert not [r for r in caplog.records if r.name == "hq_ptq.devices"]


def test_autocast_context():
    with autocast_context("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert nn.Linear(3, 2)(torch.randn(1, 3)).dtype == torch.bfloat16
    with autocast_context("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="quant.precision must be one of fp32, bf16, got 'fp16'") as err:
        autocast_context("fp16", "cpu")
    _one_line(err)
    with pytest.raises(ValueError, match="runs on cpu or cuda, not on meta"):
        autocast_context("bf16", "meta")


# ------------------------------------------------------------------------------------------------
# settings: config, recipe, command line


@pytest.mark.parametrize("bad", ["fp16", "BF16x", "half", "", 16, None])
def test_a_bad_precision_is_one_line_naming_the_allowed_values(bad):
    with pytest.raises(ValueError, match="quant.precision must be one of fp32, bf16, got") as err:
        QuantConfig(precision=bad)
    assert repr(bad) in _one_line(err)
    with pytest.raises(ValueError, match="quant.precision must be one of fp32, bf16"):
        QuantConfig.from_dict({"precision": bad})
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16") as err:
        finetune(_quantized_cnn(), _images(1), QATConfig(steps=1), precision=bad)
    _one_line(err)


def test_precision_defaults_to_fp32_and_round_trips():
    assert QuantConfig().precision == "fp32"
    config = QuantConfig(precision=" bf16 ")
    assert config.precision == "bf16"
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_precision_in_recipes_and_on_the_command_line(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tmp_path / "r.toml", quant={"precision": "bf16"})
    assert load_recipe(str(recipe)).quant.precision == "bf16"
    assert load_recipe(str(recipe), ["quant.precision=fp32"]).quant.precision == "fp32"
    assert load_recipe(str(tiny_recipe(tmp_path / "plain.toml"))).quant.precision == "fp32"
    with pytest.raises(ValueError, match="quant.precision must be one of fp32, bf16, got 'fp16'") as err:
        load_recipe(str(recipe), ["quant.precision=fp16"])
    _one_line(err)
    with pytest.raises(ValueError, match="did you mean quant.precision"):
        load_recipe(str(recipe), ["quant.precison=bf16"])
    for command in (["run", str(recipe)], ["quantize", str(tmp_path / "none.safetensors")]):
        result = runner.invoke(app, [*command, "--precision", "fp16"])
        assert result.exit_code == 2, result.output
        assert "--precision must be one of fp32, bf16, got 'fp16'" in " ".join(result.output.split())
        assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------
# onnxruntime execution providers

ort = pytest.importorskip("onnxruntime")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@pytest.fixture
def with_cuda(monkeypatch):
    """onnxruntime reporting a CUDA provider (selection only: no session is created on it)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", CPU])


def test_auto_picks_cuda_only_for_a_model_on_cuda_where_onnxruntime_has_it(with_cuda):
    from hq_ptq.export import resolve_providers

    assert resolve_providers("auto", on_cuda=True) == [CUDA, CPU]
    assert resolve_providers("auto", on_cuda=False) == [CPU]
    assert resolve_providers() == [CPU]
    assert resolve_providers("cuda") == resolve_providers(CUDA) == [CUDA, CPU]
    assert resolve_providers("cpu") == resolve_providers(" CPU ") == [CPU]
    assert resolve_providers([CUDA, CPU]) == [CUDA, CPU]


def test_auto_is_the_cpu_without_cuda_and_asking_for_cuda_is_one_line(cpu_only):
    from hq_ptq.export import resolve_providers

    assert resolve_providers("auto", on_cuda=True) == [CPU]
    for asked in ("cuda", CUDA, ["TensorrtExecutionProvider", CPU]):
        with pytest.raises(ValueError, match="is not available here") as err:
            resolve_providers(asked)
        message = _one_line(err)
        assert "AzureExecutionProvider, CPUExecutionProvider" in message
    with pytest.raises(ValueError, match="provider must be 'auto'"):
        resolve_providers([])


def _exported(tmp_path):
    from hq_ptq.export import export_onnxruntime

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    swap_layers(model, scheme="uniform", bits=4)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    return model, export_onnxruntime(model, x, tmp_path / "m.ort.onnx", allow_float=True), x


def test_verification_runs_on_the_cpu_provider_for_a_cpu_model(tmp_path, with_cuda):
    from hq_ptq.export import run_export, verify_export

    model, path, x = _exported(tmp_path)
    fresh = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    for backend in ("onnxruntime", "qonnx"):
        report = verify_export(model, path, fresh, backend=backend)  # "auto": the model is on the CPU
        assert report["providers"] == [CPU]
        assert report["max_abs_output_error"] < 1e-5
        assert verify_export(model, path, fresh, backend=backend, provider="cpu")["providers"] == [CPU]
    assert run_export(path, x, backend="onnxruntime")["providers"] == [CPU]


def test_verification_asking_for_a_missing_provider_is_one_line(tmp_path, cpu_only):
    from hq_ptq.export import run_export, verify_export

    model, path, x = _exported(tmp_path)
    with pytest.raises(ValueError, match="provider CUDAExecutionProvider is not available") as err:
        verify_export(model, path, x, backend="onnxruntime", provider="cuda")
    assert "CPUExecutionProvider" in _one_line(err)
    with pytest.raises(ValueError, match="is not available here"):
        run_export(path, x, provider="cuda")


def test_analysis_turns_cudnn_tf32_off_on_cuda_and_restores_it():
    """cuDNN runs float32 convolutions as TF32 by default on CUDA; the analysis block switches that off (the
    flags are plain settings, so this holds on a CPU-only build too) and restores it after, autocast off."""
    before = torch.backends.cudnn.allow_tf32
    with analysis_autocast("fp32", "fisher", "cuda"):
        assert torch.backends.cudnn.allow_tf32 is False
        assert not torch.is_autocast_enabled("cuda")
    assert torch.backends.cudnn.allow_tf32 == before
    with analysis_autocast("fp32", "fisher", "cpu"):
        assert torch.backends.cudnn.allow_tf32 == before
