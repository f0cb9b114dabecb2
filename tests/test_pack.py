"""Packed checkpoints: exact bit packing, bit-identical reloads, true-bit-width sizes, and hostile files."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from conftest import mutate_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from torch import nn

from hq_ptq.checkpoint import save_float
from hq_ptq.compression import fp32_bytes
from hq_ptq.models import build_model
from hq_ptq.pack import CheckpointError, inspect, load, pack_bits, save, unpack_bits
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.state import apply_plan, get_plan
from hq_ptq.swap import find_layers, quant_layers

UNIFORM_BITS = (2, 3, 4, 5, 6, 8)
POT_BITS = (2, 3, 4, 5, 6)
# derandomized: the suite must be deterministic; a local run with more examples found nothing further
FUZZ = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# ---------------------------------------------------------------------------------------------
# bit packing


@settings(max_examples=150, deadline=None, derandomize=True)
@given(bits=st.integers(1, 8), n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_every_width(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8)  # exactly b bits per code, padding < 1 byte
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    used = n * bits - 8 * (packed.numel() - 1)
    if n and used < 8:
        assert int(packed[-1]) >> used == 0  # padding bits are zero, so files are deterministic


@given(bits=st.integers(1, 8), shape=st.lists(st.integers(1, 9), min_size=1, max_size=4))
@settings(max_examples=40, deadline=None, derandomize=True)
def test_pack_flattens_any_shape(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, codes.numel()), codes.reshape(-1))


def test_pack_layout_is_lsb_first_stream():
    # 3-bit 1, 2, 3 -> stream 100 010 110 (LSB first) -> bytes 0b11010001, 0b0
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 3).tolist() == [0b11010001, 0]
    assert pack_bits(torch.tensor([255, 7], dtype=torch.uint8), 8).tolist() == [255, 7]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.tensor([1], dtype=torch.int8), 3)
    for bad in (0, 9, 2.5):
        with pytest.raises(ValueError, match="1..8"):
            pack_bits(torch.zeros(4, dtype=torch.uint8), bad)
    with pytest.raises(ValueError, match="need 2 uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)


# ---------------------------------------------------------------------------------------------
# models


def _calibrate_bn(model: nn.Module, inputs) -> None:
    # untrained BN running stats make a spiking model silent; real stats make the comparison meaningful
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
    model.eval()


def _learn_scales(model: nn.Module, seed: int) -> None:
    # a "learned" scale differs from the absmax init, so a reload that re-initialised it would show
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quant_layers(model).values():
            for p in layer.weight_quant.parameters():
                p.mul_(0.7 + 0.4 * torch.rand(p.shape, generator=g))


def _plan(model: nn.Module, kind: str) -> Plan:
    choices = []
    for i, name in enumerate(find_layers(model)):
        n = model.get_submodule(name).weight.numel()
        scheme = {"uniform": "uniform", "pot": "pot", "mixed": ("uniform", "pot")[i % 2]}[kind]
        bits = (UNIFORM_BITS if scheme == "uniform" else POT_BITS)[i % (6 if scheme == "uniform" else 5)]
        choices.append(LayerChoice(name, scheme, bits, n, 0.0))
    return Plan(tuple(choices), method="manual")


def _spikes(seed: int, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, b, 2, 32, 32, generator=g).round()


@pytest.fixture(scope="module")
def zoo_float_state():
    torch.manual_seed(0)
    model = build_model("spikformer-tiny", num_classes=10, depth=1)
    _calibrate_bn(model, [_spikes(s, 8) for s in range(3)])
    return model.state_dict()


def _zoo(state, kind: str) -> nn.Module:
    model = build_model("spikformer-tiny", num_classes=10, depth=1)
    model.load_state_dict(state)
    apply_plan(model, _plan(model, kind))
    _learn_scales(model, seed=1)
    return model.eval()


class _CNN(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.features(x))))


def _quant_cnn(kind: str = "mixed") -> nn.Module:
    torch.manual_seed(3)
    model = _CNN()
    _calibrate_bn(model, [torch.randn(8, 3, 8, 8) for _ in range(3)])
    apply_plan(model, _plan(model, kind))
    _learn_scales(model, seed=2)
    return model.eval()


def _assert_same_outputs(a: nn.Module, b: nn.Module, inputs) -> None:
    with torch.no_grad():
        for x in inputs:
            ya, yb = a(x), b(x)
            assert ya.abs().sum() > 0 and not torch.equal(ya[0], ya[1])  # a live, input-dependent model
            assert torch.equal(ya, yb)


# ---------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("kind", ["uniform", "pot", "mixed"])
def test_zoo_round_trip_is_bit_identical(zoo_float_state, kind, tmp_path):
    model = _zoo(zoo_float_state, kind)
    path = save(model, tmp_path / "m.safetensors")
    loaded = load(path)
    assert not loaded.training
    assert loaded.hq_config == model.hq_config
    assert [(c.name, c.scheme, c.bits) for c in get_plan(loaded)] == [
        (c.name, c.scheme, c.bits) for c in get_plan(model)
    ]
    ref, new = model.state_dict(), loaded.state_dict()
    for key in ref:
        if ".weight_quant." in key:  # the learned scales come back exactly
            assert torch.equal(ref[key], new[key]), key
    _assert_same_outputs(model, loaded, [_spikes(100), _spikes(101)])


def test_plain_cnn_round_trip_needs_a_skeleton(tmp_path):
    model = _quant_cnn("mixed")
    path = save(model, tmp_path / "cnn.safetensors")
    with pytest.raises(CheckpointError, match="non-zoo model; pass load\\(path, model="):
        load(path)
    torch.manual_seed(99)  # a different init: everything must come from the file
    loaded = load(path, model=_CNN())
    _assert_same_outputs(model, loaded, [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(7))])


@pytest.mark.parametrize("kind", ["uniform", "pot"])
def test_transposed_conv_round_trip_is_bit_identical(kind, tmp_path):
    # output channels in the weight's second dimension: scales, codes and dequantization follow them there
    def decoder() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
                             nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                             nn.Flatten(2), nn.ConvTranspose1d(4, 2, 3, stride=2, bias=False))

    torch.manual_seed(5)
    model = decoder()
    apply_plan(model, _plan(model, kind))
    _learn_scales(model, seed=4)
    model.eval()
    path = save(model, tmp_path / "decoder.safetensors")
    torch.manual_seed(6)
    loaded = load(path, model=decoder())
    assert type(loaded[2]).__name__ == "QuantConvTranspose2d"
    _assert_same_outputs(model, loaded, [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))])


def test_size_is_the_sum_of_its_parts(zoo_float_state, tmp_path):
    model = _zoo(zoo_float_state, "mixed")
    path = save(model, tmp_path / "m.safetensors")
    info = inspect(path)
    b = info["bytes"]
    assert b["file"] == path.stat().st_size
    parts = b["codes"] + b["scales"] + b["biases"] + b["float"] + b["metadata"]
    assert parts <= b["file"] <= 1.03 * parts
    plan = get_plan(model)
    assert b["codes"] == sum(math.ceil(c.params * c.bits / 8) for c in plan)
    for row, c in zip(info["layers"], plan, strict=True):
        assert [row[k] for k in ("name", "scheme", "bits", "params")] == [c.name, c.scheme, c.bits, c.params]
        assert row["code_bytes"] == math.ceil(c.params * c.bits / 8)
        assert row["bytes"] == row["code_bytes"] + row["scale_bytes"] + row["bias_bytes"]
    assert sum(row["bytes"] for row in info["layers"]) == b["codes"] + b["scales"] + b["biases"]
    float_model = build_model("spikformer-tiny", num_classes=10, depth=1)
    fp32 = 4 * sum(t.numel() for t in float_model.state_dict().values())
    # the one definition (hq_ptq.compression), computed from the packed file without the float model
    assert info["fp32_bytes"] == fp32 == fp32_bytes(float_model.state_dict())
    assert info["compression"]["file"] == pytest.approx(fp32 / b["file"])
    assert info["compression"]["weights"] == pytest.approx(32 / plan.avg_bits)
    assert info["stored_bits_per_weight"] == pytest.approx(plan.avg_bits, abs=0.01)
    assert info["model_config"] == model.hq_config
    assert info["plan"]["layers"][0]["name"] == plan.layers[0].name


# ---------------------------------------------------------------------------------------------
# errors


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory) -> tuple[Path, bytes]:
    path = save(_quant_cnn("mixed"), tmp_path_factory.mktemp("pack") / "cnn.safetensors")
    return path, path.read_bytes()


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_fp32_size_of_a_layer_registered_under_two_names(tmp_path):
    """A module under two names (e.g. a tied or re-exported layer) is in the float state_dict once per name:
    inspect's FP32 size counts its weight for each, and none of its scales, and the file still loads."""
    def tied() -> nn.Module:
        model = _CNN()
        model.again = model.fc
        return model

    torch.manual_seed(3)
    float_model = tied()
    fp32 = fp32_bytes(float_model.state_dict())
    apply_plan(float_model, _plan(float_model, "mixed"))
    path = save(float_model.eval(), tmp_path / "tied.safetensors")
    info = inspect(path)
    assert info["fp32_bytes"] == fp32
    names = [row["name"] for row in info["layers"]]
    assert names.count("fc") == 1 and "again" not in names
    loaded = load(path, model=tied())
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    _assert_same_outputs(float_model, loaded, [x])


def test_checksum_catches_a_flipped_byte_and_truncation(cnn_file, tmp_path):
    _, data = cnn_file
    bad = tmp_path / "bad.safetensors"
    for pos in (_header_end(data) + 3, len(data) - 1):  # in the codes and in the float state
        bad.write_bytes(data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1 :])
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load(bad, model=_CNN())
    bad.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated or altered"):
        load(bad, model=_CNN())
    bad.write_bytes(data[:50])  # cut inside the header
    with pytest.raises(CheckpointError, match="not an hq_ptq packed checkpoint"):
        inspect(bad)


def test_wrong_files_raise_one_line_errors(tmp_path, zoo_float_state):
    with pytest.raises(CheckpointError, match="is not a file"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="is not a file"):
        load(tmp_path)
    model = build_model("spikformer-tiny", num_classes=10, depth=1)
    model.load_state_dict(zoo_float_state)
    with pytest.raises(CheckpointError, match="float checkpoint, use hq_ptq.checkpoint.load_float"):
        load(save_float(model, tmp_path / "float.safetensors"))
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(st_save({"w": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="no hq_ptq metadata"):
        load(plain)
    future = {"format": "hq_ptq.packed", "format_version": "2"}
    plain.write_bytes(st_save({"w": torch.zeros(3)}, metadata=future))
    with pytest.raises(CheckpointError, match="unsupported format version '2'"):
        load(plain)
    with pytest.raises(ValueError, match="no hq_ptq-quantized layers"):
        save(model, tmp_path / "float.hqp")
    for err in _errors_of(load, plain), _errors_of(load, tmp_path / "missing"):
        assert "\n" not in err


def _errors_of(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_model_mismatch_is_reported(cnn_file):
    path, _ = cnn_file

    class Renamed(_CNN):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = self.head
            del self.head

    with pytest.raises(CheckpointError, match="does not match the model: it has no layers head"):
        load(path, model=Renamed())
    with pytest.raises(CheckpointError, match="does not match the model"):
        load(path, model=_CNN(width=4))  # same names, other shapes

    class Extra(_CNN):
        def __init__(self) -> None:
            super().__init__()
            self.aux = nn.BatchNorm1d(5)

    with pytest.raises(CheckpointError, match="file lacks state of aux.bias, aux.running_mean"):
        load(path, model=Extra())


# ---------------------------------------------------------------------------------------------
# fuzz: hostile bytes never escape as anything but CheckpointError, and nothing is unpickled


def _no_pickle(*_a, **_k):
    raise AssertionError("packed checkpoints must never be unpickled")


def _load_hostile(path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        for name in ("load", "loads", "Unpickler"):
            mp.setattr(pickle, name, _no_pickle)
        with pytest.raises(CheckpointError):
            load(path, model=_CNN())


def test_sentinel_does_not_block_a_good_file(cnn_file):
    with pytest.MonkeyPatch.context() as mp:
        for name in ("load", "loads", "Unpickler"):
            mp.setattr(pickle, name, _no_pickle)
        load(cnn_file[0], model=_CNN())


@FUZZ
@given(data=st.binary(max_size=400) | st.binary(max_size=400).map(lambda b: (30).to_bytes(8, "little") + b))
def test_fuzz_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz_random.safetensors"
    path.write_bytes(data)
    _load_hostile(path)


@FUZZ
@given(st.data())
def test_fuzz_mutated_file(cnn_file, tmp_path_factory, data):
    _, good = cnn_file
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
    if op == "header":  # focus on the JSON header, where parsing happens before the checksum
        bad = mutate_bytes(good, data, "flip", span=_header_end(good))
    else:
        bad = mutate_bytes(good, data, op)
    path = tmp_path_factory.getbasetemp() / "fuzz_mutated.safetensors"
    path.write_bytes(bad)
    _load_hostile(path)


def _signed(tensors: dict, metadata: dict) -> bytes:
    # an independent writer of the documented checksum: sha256 of the file with the digest blanked
    blank = '"sha256":"' + "0" * 64 + '"'
    raw = st_save(tensors, metadata={**metadata, "sha256": "0" * 64})
    digest = hashlib.sha256(raw).hexdigest()
    return raw.replace(blank.encode(), f'"sha256":"{digest}"'.encode())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(key=st.sampled_from(["plan", "layers", "state", "model_config"]), value=_JSON)
def test_fuzz_validly_signed_garbage_metadata(cnn_file, tmp_path_factory, key, value):
    # a file whose checksum is right but whose metadata is hostile must still fail cleanly
    from safetensors.torch import load as st_load

    _, good = cnn_file
    n = int.from_bytes(good[:8], "little")
    meta = json.loads(good[8 : 8 + n])["__metadata__"]
    meta.pop("sha256")
    meta[key] = json.dumps(value)
    path = tmp_path_factory.getbasetemp() / "fuzz_meta.safetensors"
    path.write_bytes(_signed(st_load(good), meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load_hostile(path)


def test_signed_writer_matches_the_format(cnn_file, tmp_path):
    # guards the fuzz test above: re-signing the untouched content must give a loadable file
    from safetensors.torch import load as st_load

    _, good = cnn_file
    n = int.from_bytes(good[:8], "little")
    meta = json.loads(good[8 : 8 + n])["__metadata__"]
    meta.pop("sha256")
    path = tmp_path / "resigned.safetensors"
    path.write_bytes(_signed(st_load(good), meta))
    load(path, model=_CNN())
