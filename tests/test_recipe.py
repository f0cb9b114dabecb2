from __future__ import annotations

import pytest

from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.recipe import find_recipe, list_recipes, load_recipe, parse_override, resolve


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


# --- your own model: [model] factory, [data] factory, --model -------------------------------------------

USER_TOML = """\
fp_checkpoint = "fp.pt"
[model]
factory = "mymodels:build"
loss = "mymodels:loss"
output_fn = "mymodels:scores"
hidden = 32
[data]
factory = "mymodels:loaders"
batch_size = 16
"""


def test_factory_recipe_loads(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text(USER_TOML)
    r = load_recipe(str(p))
    assert r.model_factory == "mymodels:build" and r.model_name == "mymodels:build"
    assert r.model_overrides() == {"hidden": 32}  # loss and output_fn are not the factory's arguments
    assert r.data_factory == "mymodels:loaders" and r.data_name == "mymodels:loaders"
    assert r.data_options() == {"batch_size": 16}
    # a relative fp_checkpoint: beside a recipe file outside a recipes/ folder, else beside that folder
    assert r.fp_checkpoint == tmp_path / "fp.pt"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.toml").write_text(USER_TOML)
    assert load_recipe(str(tmp_path / "recipes" / "mine.toml")).fp_checkpoint == tmp_path / "fp.pt"
    shipped = load_recipe("digits-spikformer")
    assert shipped.model_factory is None and shipped.data_name == "digits"


def test_model_flag_replaces_the_model(tmp_path):
    r = load_recipe("digits-spikformer", ["model.width=8"], model="mymodels:build")
    # the zoo model's arguments and float checkpoint go; --set after --model adds arguments
    assert r.model == {"factory": "mymodels:build", "width": 8} and r.fp_checkpoint is None
    assert r.data == load_recipe("digits-spikformer").data
    p = tmp_path / "mine.toml"
    p.write_text(USER_TOML)
    mine = load_recipe(str(p), model="other:build")
    assert mine.model == {"factory": "other:build", "loss": "mymodels:loss", "output_fn": "mymodels:scores"}
    with pytest.raises(ValueError, match="--model must be 'package.module:function', got 'mymodels.build'"):
        load_recipe(str(p), model="mymodels.build")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[model]\nname = "spikformer-tiny"\nfactory = "m:f"\n[data]\nname = "digits"\n', "not both"),
        ('[model]\nhidden = 3\n[data]\nname = "digits"\n', '[model] needs a name (built in) or a factory'),
        ('[model]\nfactory = "m:f"\n[data]\nbatch_size = 3\n', "[data] needs a name (built in) or a factory"),
        ('[model]\nfactory = "m.f"\n[data]\nname = "digits"\n', "[model] factory must be 'package.module:"),
        ('[model]\nfactory = "m:f"\n[data]\nfactory = "d:"\n', "[data] factory must be 'package.module:"),
        ('[model]\nname = "sdt-tiny"\nloss = 3\n[data]\nname = "digits"\n', "[model] loss must be"),
        ('[model]\nfactory = "m:f"\noutput_fn = "x y:z"\n[data]\nname = "d"\n', "[model] output_fn must"),
    ],
)
def test_model_and_data_sections_name_the_fix(tmp_path, text, fragment):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError) as info:
        load_recipe(str(p))
    assert fragment in str(info.value)


def test_resolve_imports_from_the_current_directory(tmp_path, monkeypatch):
    import json
    import sys

    assert resolve("json:dumps", "x") is json.dumps
    assert resolve("json.decoder:JSONDecoder.decode", "x") is json.decoder.JSONDecoder.decode
    (tmp_path / "resolve_me_here.py").write_text("def build(n=1):\n    return n * 2\nVALUE = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert resolve("resolve_me_here:build", "[model] factory")(n=4) == 8
    for ref, fragment in (
        ("resolve_me_here:buidl", "[model] factory 'resolve_me_here:buidl': resolve_me_here has no attribute "
                                  "'buidl'; did you mean 'build'?"),
        ("resolve_me_here:VALUE", "is not callable (a value of type int)"),
        ("not_here_at_all:build", "no module named 'not_here_at_all' (looked in the current directory"),
        ("resolve_me_here", "must be 'package.module:function'"),
    ):
        with pytest.raises(ValueError) as info:
            resolve(ref, "[model] factory")
        assert fragment in str(info.value) and "\n" not in str(info.value)
