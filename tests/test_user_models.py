"""Your own model through recipes and the CLI: ``[model]``/``[data] factory``, ``--model``/``--data``, the
one-line errors of a bad reference, and ``examples/your_own_model.py``.

The user's package is ``tests/user_pkg`` (a spiking net with its own time loop over static 8x8 digits,
``(spikes, membranes)`` outputs), imported as ``tests.user_pkg.mymodel:build`` from the repository root.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import conftest
import pytest
import torch
from typer.testing import CliRunner

from hq_ptq.checkpoint import load_float
from hq_ptq.cli import app
from hq_ptq.pack import load
from hq_ptq.swap import quant_layers

REPO = Path(__file__).resolve().parents[1]
PKG = "tests.user_pkg.mymodel"
runner = CliRunner()

USER_RECIPE = {
    "model": {"factory": f"{PKG}:build", "loss": f"{PKG}:loss", "output_fn": f"{PKG}:scores", "hidden": 32},
    "data": {"factory": f"{PKG}:loaders", "n_train": 256, "n_test": 64},
    "train": {"epochs": 4, "lr": 2e-2},
    "quant": {"budget": 4.0},
    "search": {"metric": "fisher", "calib_batches": 2},
    "qat": {"steps": 2},
}


def write_recipe(path: Path, fp: Path | None, **sections: dict) -> Path:
    """The user recipe at ``path``, each section updated with the same-named keyword."""
    return conftest.write_recipe(path, USER_RECIPE, fp, **sections)


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # where "tests.user_pkg.mymodel" is importable from


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``hq-ptq train`` on a factory recipe: the float checkpoint the other tests start from."""
    root = tmp_path_factory.mktemp("user")
    recipe = write_recipe(root / "mine.toml", root / "fp.safetensors")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        result = cli("train", recipe)
    assert result.exit_code == 0, result.output
    assert f"trained {PKG}:build" in result.output and "test accuracy" in result.output
    return root, recipe


@pytest.fixture(scope="module")
def run_dir(trained):
    """``hq-ptq run`` on the factory recipe, export included."""
    root, recipe = trained
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        result = cli("run", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_train_saves_a_factory_checkpoint(trained):
    root, _ = trained
    with pytest.raises(ValueError, match=f"holds a model built by {PKG}:build"):
        load_float(root / "fp.safetensors")  # the factory is recorded, never imported on load
    from tests.user_pkg.mymodel import build

    model, meta = load_float(root / "fp.safetensors", model=build())
    assert meta["model"]["factory"] == f"{PKG}:build" and meta["test_accuracy"] > 0.3
    assert not model.training
    with pytest.raises(ValueError, match="does not match the model"):
        load_float(root / "fp.safetensors", model=build(hidden=16))


def test_factory_recipe_runs_end_to_end(run_dir):
    for name in ("plan.json", "result.json", "report.md", "model.hqpt.safetensors", "model.qonnx.onnx",
                 "model.ort.onnx", "export_checks.json"):
        assert (run_dir / name).is_file(), name
    result = json.loads((run_dir / "result.json").read_text())
    assert result["fp_accuracy"] > 0.3 and result["avg_bits"] <= 4.0 + 1e-9
    assert result["recipe_config"]["model"]["factory"] == f"{PKG}:build"
    checks = json.loads((run_dir / "export_checks.json").read_text())
    for kind in ("qonnx", "ort"):
        assert checks[kind]["verified_on"] == "another test batch (not the one traced)"
        assert checks[kind]["max_abs_output_error"] < 1e-5 and checks[kind]["spike_mismatches"] == 0


def test_export_batches_take_the_next_batch_of_the_same_layout():
    from hq_ptq.pipeline import export_batches

    a, b = {"x": torch.zeros(4, 3)}, {"x": torch.ones(4, 3)}
    short = {"x": torch.ones(2, 3)}
    example, fresh, how = export_batches([(a, torch.zeros(4)), (short, torch.zeros(2)), (b, torch.zeros(4))])
    assert example is a and fresh is b and how.startswith("another test batch")
    example, fresh, how = export_batches([(a, torch.zeros(4)), (short, torch.zeros(2))])
    assert fresh is a and how.startswith("the traced batch itself")
    with pytest.raises(ValueError, match="yielded no batch"):
        export_batches([])


def test_recipes_lists_a_factory_recipe(tmp_path, monkeypatch):
    write_recipe(tmp_path / "mine-listed.toml", None)
    monkeypatch.setenv("HQ_PTQ_RECIPES", str(tmp_path))
    result = cli("recipes")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("mine-listed"))
    assert f"{PKG}:build" in line and f"{PKG}:loaders" in line


def test_inspect_and_export_a_packed_user_model(run_dir, tmp_path):
    packed = run_dir / "model.hqpt.safetensors"
    plain = cli("inspect", packed)
    assert plain.exit_code == 0, plain.output
    assert "a model outside the zoo" in plain.output
    checked = cli("inspect", packed, "--model", f"{PKG}:build")
    assert checked.exit_code == 0, checked.output
    assert f"loads into {PKG}:build: TinySpikingNet, 4,588 parameters, 3 quantized layers" in checked.output

    onnx_file = tmp_path / "mine.onnx"
    exported = cli("export", packed, "--model", f"{PKG}:build", "--data", f"{PKG}:loaders",
                   "--out", onnx_file, "--runtime", "onnxruntime")
    assert exported.exit_code == 0, exported.output
    text = " ".join(exported.output.split())
    assert onnx_file.is_file() and "on another test batch" in text and "spike mismatches 0 of" in text

    for args, fragment in (
        ((), "holds a model outside the zoo: pass --model"),
        (("--model", f"{PKG}:build"), "needs --data package.module:function"),
        (("--model", f"{PKG}:build", "--data", f"{PKG}:loaders", "--T", "4"), "--T and --batch"),
    ):
        bad = cli("export", packed, *args)
        assert bad.exit_code == 2 and fragment in " ".join(bad.output.split()), bad.output


def test_quantize_a_user_checkpoint(trained, tmp_path):
    root, _ = trained
    from tests.user_pkg.mymodel import build

    # hq-ptq train's file, and a plain torch.save state_dict of the same model
    state = load_float(root / "fp.safetensors", model=build())[0].state_dict()
    torch.save(state, tmp_path / "fp.pt")
    for source, extra in ((root / "fp.safetensors", ("--qat-steps", "1", "--metric", "fisher")),
                          (tmp_path / "fp.pt", ("--qat-steps", "0", "--metric", "data_free"))):
        out = tmp_path / f"{source.stem}.hqpt.safetensors"
        result = cli("quantize", source, "--model", f"{PKG}:build", "--data", f"{PKG}:loaders",
                     "--loss", f"{PKG}:loss", "--output-fn", f"{PKG}:scores", "--budget", "4", "--out", out,
                     *extra)
        assert result.exit_code == 0, result.output
        assert len(quant_layers(load(out, model=build()))) == 3
    missing = cli("quantize", root / "fp.safetensors", "--model", f"{PKG}:build")
    assert missing.exit_code == 2 and "needs --data package.module:function" in missing.output
    zoo_only = cli("quantize", root / "fp.safetensors", "--data", f"{PKG}:loaders", "--metric", "data_free")
    assert zoo_only.exit_code == 2 and f"holds a model built by {PKG}:build" in zoo_only.output


def test_run_model_flag_with_a_factory_that_returns_a_trained_model(trained, tmp_path):
    _, recipe = trained
    # --model replaces the recipe's model (its fp_checkpoint and hidden= go; loss and output_fn stay)
    result = cli("run", recipe, "--model", f"{PKG}:build_trained", "--out", tmp_path / "run", "--no-export",
                 "--set", "qat.steps=0")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["recipe_config"]["model"] == {
        "factory": f"{PKG}:build_trained", "loss": f"{PKG}:loss", "output_fn": f"{PKG}:scores"
    }
    assert saved["recipe_config"]["fp_checkpoint"] is None and saved["fp_accuracy"] > 0.3


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--model", "nosuch_module_xyz:build"), "no module named 'nosuch_module_xyz'"),
        (("--model", "tests.user_pkg.broken:build"), "importing tests.user_pkg.broken failed"),
        (("--model", f"{PKG}:biuld"), "has no attribute 'biuld'; did you mean 'build'?"),
        (("--model", f"{PKG}:NOT_CALLABLE"), "is not callable (a value of type int)"),
        (("--model", "mymodel.build"), "--model must be 'package.module:function'"),
        (("--model", f"{PKG}:loaders"), "must return a torch.nn.Module, got tuple"),
        (("--set", "model.nope=1"), "cannot take ['hidden', 'nope']"),
        (("--set", "data.name=digits"), "takes name (built in) or factory (your own), not both"),
        (("--set", f"model.loss={PKG}:lsos"), "[model] loss 'tests.user_pkg.mymodel:lsos'"),
        (("--set", f"data.factory={PKG}:one_shot"), "its train data must be re-iterable"),
    ],
)
def test_bad_references_are_one_line_errors(tmp_path, args, fragment):
    recipe = write_recipe(tmp_path / "bad.toml", tmp_path / "missing-fp.safetensors")
    result = cli("run", recipe, "--out", tmp_path / "run", *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_module_in_the_current_directory(tmp_path, monkeypatch):
    # the user's own mymodels.py beside them, as `python -m` would import it
    shutil.copy(REPO / "tests" / "user_pkg" / "mymodel.py", tmp_path / "mymodels.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # hq-ptq puts the current directory on it
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    recipe = write_recipe(
        tmp_path / "here.toml",
        None,  # no fp_checkpoint: the factory's model is used as it comes
        model={"factory": "mymodels:build", "loss": "mymodels:loss", "output_fn": "mymodels:scores"},
        data={"factory": "mymodels:loaders"},
        search={"metric": "data_free"},
        qat={"steps": 0},
    )
    result = cli("run", recipe, "--out", tmp_path / "run", "--no-export")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.hqpt.safetensors").is_file()


def test_example_walkthrough_runs(tmp_path, monkeypatch):
    path = REPO / "examples" / "your_own_model.py"
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts examples/ on it, as `cd examples` would
    spec = importlib.util.spec_from_file_location("your_own_model", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "your_own_model", module)
    spec.loader.exec_module(module)
    result = module.main(out_dir=tmp_path, qat_steps=5)
    assert result["fp_accuracy"] > 0.8 and result["avg_bits"] <= 3.5 + 1e-9
    for name in ("fp.pt", "model.hqpt.safetensors", "model.qonnx.onnx", "recipe.toml", "run/result.json",
                 "run/model.ort.onnx"):
        assert (tmp_path / name).is_file(), name
