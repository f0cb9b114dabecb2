"""The Pareto benchmark (hq_ptq.bench: `hq-ptq bench`, benchmarks/pareto.py) end to end on a tiny recipe."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hq_ptq.bench as pareto
from hq_ptq.bench.render import BEGIN, END, _qat_text, update_doc
from hq_ptq.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

COLUMNS = ("avg_bits", "ptq_accuracy", "accuracy", "size_bytes", "compression", "energy_uj", "energy_ratio",
           "search_seconds", "qat_seconds")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_recipe):
    """One tiny benchmark; ``docs`` points at a copy of docs/BENCHMARKS.md (and its plots), never written."""
    root = tmp_path_factory.mktemp("pareto")
    docs = root / "docs"
    shutil.copytree(REPO / "docs", docs)
    recipe = tiny_recipe(root / "tiny.toml", train={"epochs": 4}, quant={"budget": 3.5}, qat={"steps": 150})
    # no float checkpoint yet: the benchmark trains one (pipeline.float_model)
    # fewer homogeneous rows and budgets than a real run (time); every family and column is there
    settings = pareto.BenchSettings(seeds=(0, 1), qat_steps=2, dnas_steps=2, budgets=(3.5, 3.0),
                                    homogeneous=(("uniform", 8), ("uniform", 4), ("pot", 4), ("uniform", 2)))
    results, paths = pareto.bench(str(recipe), out=root / "out", command="pytest", settings=settings,
                                  docs=docs / "BENCHMARKS.md")
    return results, paths, docs


def test_every_row_and_column(run):
    results, _, _ = run
    rows = {r["label"]: r for r in results["rows"]}
    expected = {"FP32", "uniform 8-bit", "uniform 4-bit", "pot 4-bit", "uniform 2-bit",
                "uniform-only MP @ 3.5", "ours greedy @ 3.5", "ours greedy @ 3", "ours MILP @ 3.5",
                "DNAS @ 3.5", "torchao int8", "torchao int4", "ours Hessian greedy @ 3.5"}
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
                  "ours Hessian greedy @ 3.5"):
        assert rows[label]["avg_bits"] <= rows[label]["budget"] + 1e-9
    assert all(b.startswith("uniform") for b in rows["uniform-only MP @ 3.5"]["plan"])
    # one shared analysis: every recipe-metric row's search time includes it
    for label in ("ours greedy @ 3.5", "ours MILP @ 3.5", "uniform-only MP @ 3.5"):
        assert rows[label]["search_seconds"] >= results["analysis_seconds"]
    assert rows["DNAS @ 3.5"]["search_seconds"] > 0 and rows["DNAS @ 3.5"]["dnas"]["steps"] == 2
    # file compression against the FP32 size (hq_ptq.compression): quantized rows are smaller
    assert rows["FP32"]["size_bytes"] == results["fp32_bytes"]
    for r in results["rows"][1:]:
        assert r["compression"] == pytest.approx(results["fp32_bytes"] / r["size_bytes"]), r["label"]
    assert rows["ours greedy @ 3"]["compression"] > rows["uniform 8-bit"]["compression"] > 1


def test_torchao_rows_quantize_every_layer(run):
    results, _, _ = run
    rows = {r["label"]: r for r in results["rows"]}
    for bits in (8, 4):
        r = rows[f"torchao int{bits}"]
        # the pointwise Conv1d token projections are offered as their equivalent Linear: none stays float
        assert r["torchao_refused"] == {}
        assert any(".conv" in n for n in r["torchao_layers"]) and "head" in r["torchao_layers"]
        assert len(r["torchao_layers"]) == len(rows["ours greedy @ 3.5"]["plan"])
        assert (r["avg_bits"] == 8) if bits == 8 else (4 < r["avg_bits"] < 8)
    # protected layers stay at int8 in the int4 row
    assert all(rows["torchao int4"]["torchao_layers"][n] == 8 for n in results["protected"]
               if n in rows["torchao int4"]["torchao_layers"])


def test_claims_and_files(run):
    results, paths, _ = run
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
    again = pareto.render_saved(paths["json"], out=paths["json"].parent / "again")
    assert again["md"].read_text() == text


def test_without_write_docs_the_docs_are_left_alone(run):
    _, paths, docs = run
    for name in ("BENCHMARKS.md", "pareto-digits.png", "pareto-fashion.png"):
        assert (docs / name).read_bytes() == (REPO / "docs" / name).read_bytes(), name
    assert sorted(p.name for p in docs.iterdir()) == sorted(p.name for p in (REPO / "docs").iterdir())
    assert all(p.parent == paths["json"].parent for p in paths.values())


def test_write_docs_replaces_the_generated_block(run, tmp_path):
    results, paths, docs = run
    name, data = results["recipe"], results["data"]["name"]
    doc = shutil.copy(docs / "BENCHMARKS.md", tmp_path / "BENCHMARKS.md")
    before = doc.read_text()
    # a stale block of this recipe, as a previous run would have left it
    update_doc(doc, name, "stale numbers\n")
    assert "stale numbers" in doc.read_text()
    # re-rendering the fixture's JSON with the docs writes what a --write-docs run writes, without measuring
    written = pareto.render_saved(paths["json"], out=tmp_path / "out", docs=doc)
    assert set(written) == {"json", "png", "doc"} and written["doc"] == doc
    assert written["png"] == tmp_path / f"pareto-{data}.png" and written["png"].read_bytes()[:4] == b"\x89PNG"
    text = doc.read_text()
    b, e = f"<!-- pareto:{name}:begin -->", f"<!-- pareto:{name}:end -->"
    block = text[text.index(b):text.index(e)]
    assert "stale numbers" not in text and text.count(b) == 1
    assert "| row | avg bits |" in block and f"![accuracy against average bits](pareto-{data}.png)" in block
    # everything outside this recipe's block is as it was
    assert text[:text.index(b)] + text[text.index(e) + len(e):] == before.replace(END, "\n\n" + END, 1)
    with pytest.raises(ValueError, match="full runs"):
        pareto.write_outputs(results, tmp_path / "q", quick=True, docs=doc)
    with pytest.raises(FileNotFoundError, match="source checkout"):
        pareto.bench("digits-spikformer", write_docs=True, docs=tmp_path / "missing.md")


def test_script_renders_into_its_out_folder(run, tmp_path):
    # benchmarks/pareto.py is a front end of hq_ptq.bench: --render re-writes a saved run, docs untouched
    _, paths, _ = run
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pareto.py"), "--render", str(paths["json"]), "--out",
         str(tmp_path)], capture_output=True, text=True, check=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    assert "left alone (pass --write-docs" in proc.stdout
    assert (tmp_path / paths["md"].name).read_text() == paths["md"].read_text()


def test_update_doc_replaces_only_its_block(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text(f"# B\n\nother\n\n{BEGIN}\nintro\n{END}\n\ntail\n")
    update_doc(doc, "r1", "one\n")
    update_doc(doc, "r2", "two\n")
    update_doc(doc, "r1", "ONE\n")
    text = doc.read_text()
    assert text.count("<!-- pareto:r1:begin -->") == 1 and "ONE" in text and "one" not in text
    assert text.index("intro") < text.index("ONE") < text.index("two") < text.index(END)
    assert text.startswith("# B\n\nother") and text.endswith("tail\n")
    with pytest.raises(ValueError, match="markers"):
        (tmp_path / "C.md").write_text("no markers")
        update_doc(tmp_path / "C.md", "r1", "x")


def test_bench_help_and_bad_seeds():
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "--quick" in result.output and "--seeds" in result.output
    assert "--write-docs" in result.output
    result = runner.invoke(app, ["bench", "digits-spikformer", "--seeds", "a,b"])
    assert result.exit_code == 2 and "--seeds" in result.output


def test_qat_settings_read_results_written_before_the_renames():
    # committed results say freeze_bn / recalibrate_bn; they render with today's names
    old = {"recipe_config": {"quant": {"qat": {"lr": 2e-4, "freeze_bn": True}, "recalibrate_bn": 8}}}
    new = {"recipe_config": {"quant": {"qat": {"lr": 2e-4, "keep_bn_statistics": True},
                                       "bn_recalibration_batches": 8}}}
    want = " QAT settings: lr 0.0002, keep_bn_statistics True. BatchNorm statistics re-estimated after " \
           "quantization: 8 batches."
    assert _qat_text(old) == _qat_text(new) == want


def test_paired_interval_verdicts():
    from hq_ptq.bench.verdicts import paired_interval

    # differences 1.0, 1.0, 0.5: mean 0.8333, sd 0.2887, t(0.975, 2) = 4.3027 -> half width 0.7171
    res = paired_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.5])
    assert res["mean"] == pytest.approx(0.83333333) and res["half_width"] == pytest.approx(0.71711, abs=1e-4)
    assert res["verdict"] == "better"
    assert paired_interval([0.0, 1.0, 2.5], [1.0, 2.0, 3.0])["verdict"] == "worse"
    # a mean gain of 6 points whose interval still holds 0 is a tie, not a win
    assert paired_interval([0.9, 0.91, 0.92], [0.8, 0.85, 0.9])["verdict"] == "tie"
    assert paired_interval([0.9], [0.8])["verdict"] == "tie"  # one seed: no interval
    with pytest.raises(ValueError, match="same seeds on both sides"):
        paired_interval([0.9, 0.8], [0.8])


def test_pointwise_conv1d_as_linear_is_the_same_layer():
    import torch
    from torch import nn

    from hq_ptq.baselines import PointwiseConv1dAsLinear, _is_pointwise_conv1d

    torch.manual_seed(0)
    conv = nn.Conv1d(6, 5, kernel_size=1)
    x = torch.randn(3, 6, 7)
    assert torch.allclose(PointwiseConv1dAsLinear(conv)(x), conv(x), atol=1e-6)
    assert not _is_pointwise_conv1d(nn.Conv1d(6, 5, kernel_size=3))
    assert not _is_pointwise_conv1d(nn.Conv1d(6, 6, kernel_size=1, groups=2))


def test_claims_are_decided_by_paired_intervals():
    from hq_ptq.bench.verdicts import claims

    def row(label, family, accs, budget=None, bits=3.0):
        return {"label": label, "family": family, "avg_bits": bits, "budget": budget,
                "accuracy": sum(accs) / len(accs), "ptq_accuracy": accs[0], "qat_accuracy": accs}

    homo = row("uniform 3-bit", "uniform", [0.80, 0.81, 0.82])
    for ours_accs, holds in (([0.85, 0.86, 0.87], True),    # every seed +5 points: better
                             ([0.75, 0.76, 0.77], False),   # every seed -5 points: worse
                             ([0.90, 0.78, 0.80], None)):   # mean +1.7 points, interval holds 0: a tie
        ours = row("ours greedy @ 3", "ours-greedy", ours_accs, budget=3.0)
        got = claims({"rows": [homo, ours], "fp_accuracy": 0.9, "n_test": 1000})
        claim = next(c for c in got if "best homogeneous" in c["claim"])
        assert claim["holds"] is holds and claim["tie"] is (holds is None), claim
    single = row("ours greedy @ 3", "ours-greedy", [0.95], budget=3.0)  # one seed decides nothing
    got = claims({"rows": [row("uniform 3-bit", "uniform", [0.80]), single], "fp_accuracy": 0.9,
                  "n_test": 1000})
    assert next(c for c in got if "best homogeneous" in c["claim"])["holds"] is None
