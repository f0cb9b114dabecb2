from __future__ import annotations

import pytest

from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.recipe import find_recipe, list_recipes, load_recipe, parse_override


def test_shipped_recipe_loads():
    r = load_recipe("digits-spikformer")
    assert r.model_name == "spikformer-tiny"
    assert r.data["name"] == "digits"
    assert r.budget == 3.5
    assert r.quant.search.schemes == ("uniform", "pot")
    assert r.fp_checkpoint is not None and r.fp_checkpoint.name.endswith(".safetensors")
    assert "digits-spikformer" in list_recipes()


def test_overrides_are_parsed_as_toml():
    r = load_recipe("digits-spikformer", ["train.epochs=3", "quant.budget=3.0", "search.schemes=['pot']"])
    assert r.train.epochs == 3 and r.budget == 3.0 and r.quant.search.schemes == ("pot",)
    assert parse_override("data.name=fashion") == (["data", "name"], "fashion")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epoch=3", "did you mean train.epochs"),
        ("search.metrc=fisher", "did you mean search.metric"),
        ("qat.stesp=3", "did you mean qat.steps"),
        ("quant.budgte=3", "did you mean quant.budget"),
        ("trian.epochs=3", "did you mean train"),
        ("search.metric=entropy", "search.metric must be one of"),
    ],
)
def test_bad_keys_name_the_fix(override, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("?", r"\?")):
        load_recipe("digits-spikformer", [override])


def test_unknown_recipe_suggests_name():
    with pytest.raises(FileNotFoundError, match="did you mean 'digits-spikformer'"):
        find_recipe("digits-spikfromer")


def test_recipe_file_path(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('[model]\nname = "spikformer-tiny"\n[data]\nname = "digits"\n')
    r = load_recipe(str(p))
    assert r.name == "mine" and r.fp_checkpoint is None and r.budget == 3.5
    p.write_text("[model\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_recipe(str(p))


def test_config_validation_and_round_trip():
    cfg = QuantConfig(search=SearchConfig(metric="fisher", schemes="uniform"), qat=QATConfig(steps=5))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="qat.steps"):
        QATConfig(steps=-1)
    with pytest.raises(ValueError, match="search.schemes is empty"):
        SearchConfig(schemes=())
