"""The Pareto benchmark (benchmarks/pareto.py, `hq-ptq bench`) end to end on a tiny recipe, and its pieces."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from typer.testing import CliRunner

from hq_ptq.cli import _pareto_module, app

pareto = _pareto_module()
runner = CliRunner()

COLUMNS = ("avg_bits", "ptq_accuracy", "accuracy", "size_bytes", "compression", "energy_uj", "energy_ratio",
           "search_seconds", "qat_seconds")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_recipe):
    root = tmp_path_factory.mktemp("pareto")
    recipe = tiny_recipe(root / "tiny.toml", train={"epochs": 4}, quant={"budget": 3.5}, qat={"steps": 150})
    # no float checkpoint yet: the benchmark trains one (pipeline.float_model)
    # fewer homogeneous rows and budgets than a real run (time); every family and column is there
    settings = pareto.BenchSettings(seeds=(0, 1), qat_steps=2, dnas_steps=2, budgets=(3.5, 3.0),
                                    homogeneous=(("uniform", 8), ("uniform", 4), ("pot", 4), ("uniform", 2)))
    results, paths = pareto.bench(str(recipe), out=root / "out", command="pytest", settings=settings)
    return results, paths


def test_every_row_and_column(run):
    results, _ = run
    rows = {r["label"]: r for r in results["rows"]}
    expected = {"FP32", "uniform 8-bit", "uniform 4-bit", "pot 4-bit", "uniform 2-bit",
                "uniform-only MP @ 3.5", "ours greedy @ 3.5", "ours greedy @ 3", "ours MILP @ 3.5",
                "DNAS @ 3.5", "torchao int8", "torchao int4", "ours Fisher greedy @ 3.5"}
    assert set(rows) == expected
    for r in results["rows"]:
        for col in COLUMNS:
            assert isinstance(r[col], int | float) and math.isfinite(r[col]), (r["label"], col)
        assert 0 <= r["accuracy"] <= 1 and r["size_bytes"] > 0 and r["energy_uj"] > 0
    assert rows["FP32"]["avg_bits"] == 32 and rows["FP32"]["compression"] == 1.0
    # fine-tuned rows: one accuracy per seed, mean and std; the same QAT step count everywhere
    for label in expected - {"FP32", "uniform 8-bit", "torchao int8", "torchao int4"}:
        r = rows[label]
        assert len(r["qat_accuracy"]) == 2 and r["seeds"] == [0, 1], label
        # mean ± sample std over the seeds' accuracies, and the row's accuracy is that mean
        assert r["qat_mean"] == pytest.approx(statistics.mean(r["qat_accuracy"]), abs=1e-12), label
        assert r["qat_std"] == pytest.approx(statistics.stdev(r["qat_accuracy"]), abs=1e-12), label
        assert r["accuracy"] == r["qat_mean"], label
        assert math.isfinite(r["qat_seconds"]) and r["qat_seconds"] > 0, label
        # protected first/last layers at uniform 8 for every hq_ptq row
        assert r["plan"][0] == "uniform8" and r["plan"][-1] == "uniform8", label
    assert "qat_accuracy" not in rows["uniform 8-bit"]
    for label in ("uniform-only MP @ 3.5", "ours greedy @ 3", "ours MILP @ 3.5", "DNAS @ 3.5",
                  "ours Fisher greedy @ 3.5"):
        assert rows[label]["avg_bits"] <= rows[label]["budget"] + 1e-9
    assert all(b.startswith("uniform") for b in rows["uniform-only MP @ 3.5"]["plan"])
    # one shared analysis: every Hessian row's search time includes it
    for label in ("ours greedy @ 3.5", "ours MILP @ 3.5", "uniform-only MP @ 3.5"):
        assert rows[label]["search_seconds"] >= results["analysis_seconds"]
    assert rows["DNAS @ 3.5"]["search_seconds"] > 0 and rows["DNAS @ 3.5"]["dnas"]["steps"] == 2
    # compression against the float file: quantized rows are smaller
    assert rows["ours greedy @ 3"]["compression"] > rows["uniform 8-bit"]["compression"] > 1


def test_torchao_rows_name_the_layers_it_refuses(run):
    results, _ = run
    rows = {r["label"]: r for r in results["rows"]}
    for bits in (8, 4):
        r = rows[f"torchao int{bits}"]
        assert r["torchao_refused"], "Conv1d layers must be reported as refused"
        assert all(".conv" in n for n in r["torchao_refused"])
        assert "head" in r["torchao_layers"]
        # every layer is accounted for: taken or refused
        assert len(r["torchao_layers"]) + len(r["torchao_refused"]) == len(rows["ours greedy @ 3.5"]["plan"])
        assert 8 < r["avg_bits"] < 32
    # protected layers stay at int8 in the int4 row
    assert all(rows["torchao int4"]["torchao_layers"][n] == 8 for n in results["protected"]
               if n in rows["torchao int4"]["torchao_layers"])


def test_claims_and_files(run):
    results, paths = run
    kinds = [c["claim"] for c in results["claims"]]
    assert any("best homogeneous" in k for k in kinds)
    assert any("uniform-only MP" in k for k in kinds)
    assert any("10x faster than DNAS" in k for k in kinds)
    assert any("drop against FP at 3.5" in k for k in kinds)
    assert any("drop against FP at 3 " in k for k in kinds)
    assert all(c["holds"] in (True, False, None) and c["detail"] for c in results["claims"])
    assert set(paths) == {"json", "png", "md"}
    saved = json.loads(paths["json"].read_text())
    assert saved["rows"][0]["label"] == "FP32" and saved["command"] == "pytest"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["md"].read_text()
    assert "| row | avg bits |" in text and "DNAS @ 3.5" in text and "torchao refused" not in text
    assert "Command: `pytest`" in text and "CPU time of the process" in text
    assert saved["recipe_config"]["quant"]["qat"]["steps"] == 2 and "QAT settings: lr" in text
    # re-rendering the saved JSON reproduces the Markdown without measuring anything
    again = pareto.render(paths["json"], out=paths["json"].parent / "again")
    assert again["md"].read_text() == text


def test_update_doc_replaces_only_its_block(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text(f"# B\n\nother\n\n{pareto.BEGIN}\nintro\n{pareto.END}\n\ntail\n")
    pareto.update_doc(doc, "r1", "one\n")
    pareto.update_doc(doc, "r2", "two\n")
    pareto.update_doc(doc, "r1", "ONE\n")
    text = doc.read_text()
    assert text.count("<!-- pareto:r1:begin -->") == 1 and "ONE" in text and "one" not in text
    assert text.index("intro") < text.index("ONE") < text.index("two") < text.index(pareto.END)
    assert text.startswith("# B\n\nother") and text.endswith("tail\n")
    with pytest.raises(ValueError, match="markers"):
        (tmp_path / "C.md").write_text("no markers")
        pareto.update_doc(tmp_path / "C.md", "r1", "x")


def test_bench_help_and_bad_seeds():
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "--quick" in result.output and "--seeds" in result.output
    result = runner.invoke(app, ["bench", "digits-spikformer", "--seeds", "a,b"])
    assert result.exit_code == 2 and "--seeds" in result.output
