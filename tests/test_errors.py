"""Bad input gets one readable line naming the problem and the fix, never a silently wrong result.

One test per kind of bad input: budget, scheme or bits, a model with nothing to quantize, empty or non-finite
calibration data, NaN/Inf weights, inputs or labels the model cannot take, misspelled recipe keys, checkpoints
of another model or format version (float, QAT), and truncated or altered files; plus a fuzz of the QAT
checkpoint loader (the packed-checkpoint loader is fuzzed in test_pack.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import mutate_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import hq_ptq
from hq_ptq.api import analyze, search_plan
from hq_ptq.checkpoint import load_float, save_float
from hq_ptq.cli import app
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.models import build_model
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.qat import finetune, load_checkpoint, save_checkpoint
from hq_ptq.recipe import load_recipe
from hq_ptq.state import apply_plan

runner = CliRunner()


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))


def _batches(n: int = 2, width: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, width, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value.args[0]) if info.value.args else str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def _fails(match: str, fn, *args, error: type[Exception] = ValueError, **kwargs) -> str:
    with pytest.raises(error, match=match) as info:
        fn(*args, **kwargs)
    return _one_line(info)


# ------------------------------------------------------------------------------------------------
# quantization inputs


def test_budget_out_of_range():
    config = QuantConfig(search=SearchConfig(metric="fisher"))
    analysis = analyze(_net(), calib_data=_batches(), config=config)
    for bad in (0, -1.0, float("nan"), float("inf"), 33, "4"):
        _fails(r"budget must be a number of average weight bits in \(0, 32\]", search_plan, analysis, bad)
    # in range but below what the candidates allow (2 bits, once the first/last protection has yielded)
    _fails(
        r"budget 1.5 average bits is unreachable: schemes \['uniform', 'pot'\] with all their bit widths "
        r"reach \[2, 8\] average bits; raise the budget or change search.bits",
        search_plan,
        analysis,
        1.5,
    )
    _fails("budget must be a number", hq_ptq.quantize, _net(), 40, calib_data=_batches())


def test_unknown_scheme_or_bits():
    def cfg(**search) -> QuantConfig:
        return QuantConfig(search=SearchConfig(metric="data_free", **search))

    _fails("unknown scheme 'log2'; known: uniform, pot", analyze, _net(), config=cfg(schemes="uniform,log2"))
    bits7 = r"search.bits \[7\] not supported by schemes \['uniform', 'pot'\]; choose from \[2, 3, 4, 5, 6, 8"
    _fails(bits7, analyze, _net(), config=cfg(bits=(4, 7)))
    bits8 = r"search.bits \[8\] not supported by schemes \['pot'\]"
    _fails(bits8, analyze, _net(), config=cfg(schemes="pot", bits=8))
    _fails("search.metric must be one of", SearchConfig, metric="hesian")
    net = _net()
    plan = Plan((LayerChoice("0", "pot", 8, 60, 0.0),), method="manual")
    _fails("scheme 'pot' does not support bits=8; choose one of 2, 3, 4, 5, 6", apply_plan, net, plan)


def test_model_without_quantizable_layers():
    none = "no Linear, Conv1d/Conv2d or ConvTranspose1d/2d layer matches"
    _fails(none + r" include=\['\*'\]", analyze, nn.Sequential(nn.ReLU()))
    _fails(none + r" include=\['head\*'\]", analyze, _net(),
           config=QuantConfig(include=("head*",)))


def test_empty_or_non_finite_calibration_data():
    _fails("calib_data yielded no batches", analyze, _net(), calib_data=[])
    for value in (float("nan"), float("inf")):
        data = _batches()
        data[1][0][3, 2] = value
        _fails("calib_data contains NaN or Inf inputs", analyze, _net(), calib_data=data)


def test_nan_or_inf_weights():
    for value in (float("nan"), float("-inf")):
        net = _net()
        with torch.no_grad():
            net[2].weight[1, 1] = value
        _fails("parameter 2.weight has NaN or Inf values; fix the model", analyze, net, calib_data=_batches())


def test_inputs_or_labels_the_model_cannot_take():
    msg = _fails(r"the model cannot take calibration inputs of shape \(8, 7\) \(", analyze, _net(),
                 calib_data=_batches(width=7))
    assert "mat1 and mat2" in msg  # the model's own reason comes along
    # a spiking zoo model fed [B, T, C, H, W] with 3 channels instead of time-first 2-channel events
    model = build_model("spikformer-tiny", num_classes=10, embed_dim=32, num_heads=2, depth=1)
    events = [(torch.zeros(4, 2, 3, 32, 32), torch.zeros(4, dtype=torch.long))]
    _fails(r"cannot take calibration inputs of shape \(4, 2, 3, 32, 32\)", analyze, model, calib_data=events)
    bad_labels = [(x, torch.full_like(y, 9)) for x, y in _batches()]  # 4 classes, label 9
    _fails(r"the loss cannot compare model outputs of shape \(8, 4\) with targets of shape \(8,\)", analyze,
           _net(), calib_data=bad_labels)


def test_misspelled_recipe_keys_suggest_the_right_one():
    for override, fragment in [
        ("qat.stpes=3", "unknown key qat.stpes (did you mean qat.steps?)"),
        ("search.calib_batchs=2", "did you mean search.calib_batches?"),
        ("quant.budgte=3", "did you mean quant.budget?"),
        ("serach.metric=fisher", "unknown key serach (did you mean search?)"),
        ("qat.checkpoint_evry=5", "did you mean qat.checkpoint_every?"),
    ]:
        msg = _fails("unknown key", load_recipe, "digits-spikformer", [override])
        assert fragment in msg, msg
    _fails("qat.checkpoint_every must be >= 0", load_recipe, "digits-spikformer", ["qat.checkpoint_every=-1"])


RENAMES = [  # (old key, value, new key)
    ("search.max_samples", 8, "search.hutchinson_probes"),
    ("search.rel_tol", 0.5, "search.hutchinson_rel_tol"),
    ("quant.recalibrate_bn", 2, "quant.bn_recalibration_batches"),
    ("qat.freeze_bn", False, "qat.keep_bn_statistics"),
]


@pytest.mark.parametrize(("old", "value", "new"), RENAMES)
def test_renamed_keys_name_the_new_key(old, value, new, tmp_path):
    want = f"{old} was renamed {new}"
    section, key = old.split(".")
    toml = str(value).lower() if isinstance(value, bool) else str(value)
    # --set
    assert _fails(re.escape(want), load_recipe, "digits-spikformer", [f"{old}={toml}"]) == want
    # a recipe file
    recipe = tmp_path / "old.toml"
    recipe.write_text(_with_key(load_recipe("digits-spikformer").path.read_text(), section, key, toml))
    assert _fails(re.escape(want), load_recipe, str(recipe)) == want
    # QuantConfig.from_dict
    data = {key: value} if section == "quant" else {section: {key: value}}
    assert _fails(re.escape(want), QuantConfig.from_dict, data) == want
    # keyword arguments to the dataclasses
    cls = {"search": SearchConfig, "qat": QATConfig, "quant": QuantConfig}[section]
    assert _fails(re.escape(want), cls, **{key: value}) == want
    assert dataclasses.replace(cls(), **{new.split(".")[1]: value}) == cls(**{new.split(".")[1]: value})
    # the CLI: exit code 2, the one line, no traceback
    result = runner.invoke(app, ["run", "digits-spikformer", "--out", str(tmp_path / "out"), "--set",
                                 f"{old}={toml}"])
    assert result.exit_code == 2 and want in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_renamed_metric_value_names_the_new_one(tmp_path):
    want = "search.metric 'weight' was renamed 'data_free'"
    assert _fails(re.escape(want), load_recipe, "digits-spikformer", ["search.metric=weight"]) == want
    assert _fails(re.escape(want), SearchConfig, metric="weight") == want
    assert SearchConfig(metric="data_free").metric == "data_free"
    result = runner.invoke(app, ["quantize", "x.pt", "--metric", "weight"])
    assert result.exit_code == 2 and want in " ".join(result.output.split()), result.output


def _with_key(text: str, section: str, key: str, value: str) -> str:
    """``text`` with ``key = value`` added at the top of its ``[section]`` table."""
    header = f"[{section}]\n"
    assert header in text, section
    return text.replace(header, f"{header}{key} = {value}\n", 1)


# ------------------------------------------------------------------------------------------------
# checkpoints of another model or format version, truncated or altered files


def test_float_checkpoint_of_another_model_or_version(tmp_path):
    model = build_model("spikformer-tiny", num_classes=10, embed_dim=32, num_heads=2, depth=1)
    path = save_float(model, tmp_path / "fp.safetensors")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["format_version"] = "2"
    raw = json.dumps(header).encode()
    future = tmp_path / "future.safetensors"
    future.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    _fails("has format version 2, this hq_ptq reads 1", load_float, future)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _fails("is not a readable safetensors checkpoint", load_float, truncated)
    # a recipe whose float checkpoint holds another architecture
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'fp_checkpoint = "{path.as_posix()}"\n[model]\nname = "sdt-tiny"\n[data]\nname = "digits"\n'
    )
    from hq_ptq.pipeline import float_model

    _fails("holds spikformer-tiny, recipe asks sdt-tiny", float_model, load_recipe(str(recipe)))


def test_truncated_or_altered_packed_checkpoint_is_one_cli_line(tmp_path):
    net = _net()
    hq_ptq.quantize(net, 5.0, calib_data=_batches(), config=QuantConfig(search=SearchConfig(metric="fisher")))
    path = hq_ptq.save(net, tmp_path / "m.hqpt.safetensors")
    data = path.read_bytes()
    for name, bad in (("cut", data[:-7]), ("flip", data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])):
        target = tmp_path / f"{name}.hqpt.safetensors"
        target.write_bytes(bad)
        result = runner.invoke(app, ["inspect", str(target)])
        assert result.exit_code == 2, result.output
        assert "checksum mismatch; the file is truncated or altered" in result.output
        assert "Traceback" not in result.output


# QAT checkpoints


def _quantized(width: int = 12) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 4))
    plan = Plan(
        (LayerChoice("0", "uniform", 4, 5 * width, 0.0), LayerChoice("2", "pot", 4, 4 * width, 0.0)),
        method="manual",
    )
    return apply_plan(net, plan)


CFG = QATConfig(steps=4, checkpoint_every=2, lr=1e-2, distill_weight=0.0)
META = {"plan": [["0", "uniform", 4], ["2", "pot", 4]]}


@pytest.fixture(scope="module")
def qat_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qat") / "qat-checkpoint.pt"
    finetune(_quantized(), _batches(4), CFG, checkpoint=path, meta=META)
    return path


def test_qat_checkpoint_of_another_model_plan_setting_or_version(qat_checkpoint, tmp_path):
    def resume(net=None, config=CFG, meta=META, path=qat_checkpoint):
        finetune(net or _quantized(), _batches(4), config, checkpoint=path, resume=True, meta=meta)

    resume()  # the good one resumes (and finishes at once: it holds the last step)
    _fails(r"holds another model \(differs at \['0.weight', '0.bias'", resume, _quantized(width=10))
    _fails("was written for another plan", resume, meta={"plan": [["0", "uniform", 8], ["2", "pot", 4]]})
    other = QATConfig(steps=4, lr=1e-3, distill_weight=0)
    _fails("was written with other QAT settings", resume, config=other)
    doc = torch.load(qat_checkpoint, weights_only=True)
    doc.pop("sha256")
    for change, fragment in [
        ({"format_version": 2}, "has format version 2, this hq_ptq reads 1"),
        ({"format": "hq_ptq.packed"}, "is not an hq_ptq QAT checkpoint"),
        ({"world_size": 2}, "was written by 2 process(es); resume with --nproc 2"),
        ({"step": 99}, "is malformed (step 99)"),
    ]:
        path = tmp_path / "changed.pt"
        save_checkpoint(path, {**doc, **change})  # validly signed, so the field itself is what fails
        _fails(re.escape(fragment), resume, path=path)
    signature = torch.load(qat_checkpoint, weights_only=True)["sha256"]
    torch.save({**doc, "running": doc["running"] + 1.0, "sha256": signature}, tmp_path / "a.pt")
    _fails("checksum mismatch, the file is altered", resume, path=tmp_path / "a.pt")
    del doc["settings"]
    save_checkpoint(tmp_path / "partial.pt", doc)
    _fails(r"is malformed \(no field 'settings'\)", resume, path=tmp_path / "partial.pt")
    for name, data in (("cut.pt", qat_checkpoint.read_bytes()[:-50]), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        _fails("is unreadable", resume, path=tmp_path / name)


class _Payload:
    """Unpickling this would run ``open(marker, "w")``: the loader must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_qat_checkpoint_loader_never_executes_a_pickle(tmp_path):
    marker = tmp_path / "pwned"
    legacy, zipped = tmp_path / "legacy.pt", tmp_path / "zipped.pt"
    legacy.write_bytes(pickle.dumps({"format": "hq_ptq.qat", "model": _Payload(marker)}))
    torch.save({"format": "hq_ptq.qat", "model": _Payload(marker)}, zipped)
    for path in (legacy, zipped):
        _fails("is unreadable", load_checkpoint, path, _quantized(), CFG, meta=META)
    assert not marker.exists()


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=st.binary(max_size=600) | st.binary(max_size=300).map(lambda b: b"PK\x03\x04" + b))
def test_fuzz_qat_checkpoint_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz_qat_random.pt"
    path.write_bytes(data)
    with pytest.raises(ValueError):
        load_checkpoint(path, _quantized(), CFG, meta=META)


@FUZZ
@given(st.data())
def test_fuzz_qat_checkpoint_mutated(qat_checkpoint, tmp_path_factory, data):
    if not _RESUMED:
        _RESUMED.update(_resume_good(qat_checkpoint))
    good = qat_checkpoint.read_bytes()
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "member"]))
    if op == "member":  # rewrite one archive member (the pickle, or a tensor's bytes) with garbage
        src = zipfile.ZipFile(io.BytesIO(good))
        names = src.namelist()
        victim = data.draw(st.sampled_from(names))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for name in names:
                raw = src.read(name)
                if name == victim:
                    cut = data.draw(st.integers(0, len(raw)))
                    raw = raw[:cut] + data.draw(st.binary(min_size=1, max_size=8)) + raw[cut + 1 :]
                dst.writestr(name, raw)
        bad = out.getvalue()
    else:
        bad = mutate_bytes(good, data, op)
    path = tmp_path_factory.getbasetemp() / "fuzz_qat_mutated.pt"
    path.write_bytes(bad)
    net = _quantized()
    try:
        finetune(net, _batches(4), CFG, checkpoint=path, resume=True, meta=META)
    except ValueError as err:
        assert "\n" not in str(err.args[0])
        return
    # it loaded: then the bytes that changed were zip framing or padding, and the content is the original
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), _RESUMED.values(), strict=True))


def _resume_good(path: Path) -> dict:
    net = _quantized()
    finetune(net, _batches(4), CFG, checkpoint=path, resume=True, meta=META)
    return net.state_dict()


_RESUMED: dict = {}


def test_cli_run_reports_a_bad_budget_and_nproc(tmp_path):
    for args, fragment in [
        (["--budget", "64"], "budget must be a number of average weight bits in (0, 32]"),
        (["--nproc", "0"], "--nproc must be >= 1"),
    ]:
        result = runner.invoke(app, ["run", "digits-spikformer", "--out", str(tmp_path), *args])
        assert result.exit_code == 2, result.output
        assert fragment in " ".join(result.output.split()) and "Traceback" not in result.output
