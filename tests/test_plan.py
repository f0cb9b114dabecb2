"""Tests for hq_ptq.plan: derived sizes, lookup, validation and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from hq_ptq.plan import PLAN_VERSION, LayerChoice, Plan


def _plan() -> Plan:
    return Plan(
        layers=(
            LayerChoice("patch_embed.proj", "uniform", 8, 300, 0.0),
            LayerChoice("blocks.0.attn.qkv", "pot", 4, 1000, 0.25),
            LayerChoice("head", "uniform", 2, 700, 1.5),
        ),
        budget=4.0,
        method="greedy",
        meta={"omega_total": 1.75, "gap": 0.0},
    )


def test_derived_quantities() -> None:
    plan = _plan()
    assert plan.total_params == 2000
    assert plan.size_bits == 300 * 8 + 1000 * 4 + 700 * 2
    assert plan.avg_bits == pytest.approx(7800 / 2000)
    assert plan.omega_total == pytest.approx(1.75)
    assert len(plan) == 3
    assert [c.name for c in plan] == ["patch_embed.proj", "blocks.0.attn.qkv", "head"]


def test_lookup_by_name() -> None:
    plan = _plan()
    assert plan["blocks.0.attn.qkv"].bits == 4
    assert plan.layer("head").scheme == "uniform"
    assert plan.by_name["patch_embed.proj"] is plan.layers[0]
    assert "head" in plan and "nope" not in plan
    with pytest.raises(KeyError, match="no layer 'nope' in plan"):
        plan["nope"]
    with pytest.raises(TypeError):
        plan.by_name["x"] = plan.layers[0]  # read-only view


def test_frozen_and_hashable() -> None:
    plan = _plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.budget = 3.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layers[0].bits = 3  # type: ignore[misc]
    assert hash(plan) == hash(_plan())


def test_layers_list_is_normalised_to_tuple() -> None:
    plan = Plan([LayerChoice("a", "pot", 3, 10, 0.1)])  # type: ignore[arg-type]
    assert isinstance(plan.layers, tuple)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 4.5}, "bits must be an integer"),
        ({"bits": True}, "bits must be an integer"),
        ({"bits": 0}, "bits must be >= 1"),
        ({"params": 0}, "params must be >= 1"),
        ({"name": ""}, "non-empty string"),
        ({"scheme": ""}, "scheme must be"),
        ({"sensitivity": "high"}, "sensitivity must be a number"),
    ],
    ids=["float-bits", "bool-bits", "zero-bits", "zero-params", "empty-name", "empty-scheme",
         "text-sensitivity"],
)
def test_layer_choice_validation(kwargs: dict, match: str) -> None:
    args = {"name": "fc", "scheme": "uniform", "bits": 4, "params": 10, "sensitivity": 0.1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LayerChoice(**args)


def test_plan_validation() -> None:
    a = LayerChoice("a", "pot", 3, 10, 0.1)
    with pytest.raises(ValueError, match="at least one layer"):
        Plan(())
    with pytest.raises(ValueError, match="duplicate layer name 'a'"):
        Plan((a, a))
    with pytest.raises(ValueError, match="must be a LayerChoice"):
        Plan((("a", "pot", 3),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget"):
        Plan((a,), budget=float("nan"))


def test_numpy_scalars_are_normalised_for_json() -> None:
    choice = LayerChoice("fc", "pot", np.int64(4), np.int32(9), np.float32(0.5))
    assert type(choice.bits) is int and type(choice.params) is int
    assert type(choice.sensitivity) is float
    json.dumps(Plan((choice,)).to_dict())


def test_dict_round_trip() -> None:
    plan = _plan()
    d = plan.to_dict()
    assert d["version"] == PLAN_VERSION == 1
    assert d["avg_bits"] == plan.avg_bits
    back = Plan.from_dict(json.loads(json.dumps(d)))
    assert back == plan
    assert back.meta == plan.meta


def test_from_dict_optional_fields_default() -> None:
    d = {"version": 1, "layers": [{"name": "fc", "scheme": "pot", "bits": 3, "params": 5,
                                    "sensitivity": 0.0}]}
    plan = Plan.from_dict(d)
    assert plan.budget is None and plan.method == "greedy" and plan.meta == {}


@pytest.mark.parametrize("version", [2, 0, "1", None], ids=["2", "0", "str", "none"])
def test_from_dict_rejects_unknown_version(version: object) -> None:
    d = _plan().to_dict()
    d["version"] = version
    with pytest.raises(ValueError, match="unsupported plan version"):
        Plan.from_dict(d)


@pytest.mark.parametrize("key", ["version", "layers"])
def test_from_dict_rejects_missing_key(key: str) -> None:
    d = _plan().to_dict()
    del d[key]
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        Plan.from_dict(d)


def test_from_dict_rejects_missing_layer_key() -> None:
    d = _plan().to_dict()
    del d["layers"][1]["bits"]
    with pytest.raises(ValueError, match=r"plan layer 1 \('blocks.0.attn.qkv'\) is missing key 'bits'"):
        Plan.from_dict(d)


def test_json_round_trip_and_atomic_overwrite(tmp_path) -> None:
    path = tmp_path / "sub" / "plan.json"
    plan = _plan()
    assert plan.to_json(path) == path
    assert Plan.from_json(path) == plan
    assert json.loads(path.read_text())["version"] == 1

    other = dataclasses.replace(plan, budget=5.0)
    other.to_json(path)
    assert Plan.from_json(path).budget == 5.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path) -> None:
    path = tmp_path / "plan.json"
    _plan().to_json(path)
    before = path.read_text()
    bad = dataclasses.replace(_plan(), meta={"oops": object()})
    with pytest.raises(TypeError):
        bad.to_json(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_from_json_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Plan.from_json(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.from_json(broken)


def test_interrupted_replace_cleans_up_temp(tmp_path, monkeypatch) -> None:
    path = tmp_path / "plan.json"
    _plan().to_json(path)
    before = path.read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("hq_ptq.plan.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        dataclasses.replace(_plan(), budget=2.0).to_json(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_plan_pickles_after_its_name_index_was_used():
    import pickle

    plan = Plan(layers=(LayerChoice("a", "uniform", 4, 10, 0.5), LayerChoice("b", "pot", 3, 20, 0.1)))
    assert plan["b"].bits == 3  # builds the cached read-only index
    copy = pickle.loads(pickle.dumps(plan))
    assert copy == plan and copy["a"].scheme == "uniform"
