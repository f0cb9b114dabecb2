"""Re-derive the size and compression fields of saved Pareto results under the one definition of
``hq_ptq.compression``, then re-render their docs blocks. It measures nothing: the packed and torchao file
sizes stay as the benchmark measured them.

Results written before the definition was unified (2026-11-30) took the FP32 size as the bytes of the float
model's safetensors file (header and metadata included) and compared torchao's ``torch.save`` file with a
``torch.save`` of the float state dict. Now every row's compression is FP32 size (4 bytes × every element of
the float model's state dict) / the row's file bytes, and the FP32 row's size is that FP32 size.

    .venv/bin/python benchmarks/unify_compression.py                  # both pareto-*.json, docs re-rendered
    .venv/bin/python benchmarks/unify_compression.py --no-docs FILE.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hq_ptq.bench.render import render_saved
from hq_ptq.compression import file_compression, fp32_bytes
from hq_ptq.files import atomic_write_text
from hq_ptq.pipeline import build_recipe_model
from hq_ptq.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def unify(results: dict) -> dict:
    """``results`` with ``fp32_bytes``, the FP32 row's size and every row's compression re-derived."""
    recipe = load_recipe(results["recipe"], results.get("overrides", []))
    # the architecture alone fixes the FP32 size: an untrained skeleton has the trained model's state shapes
    fp32 = fp32_bytes(build_recipe_model(recipe).state_dict())
    rows = results["rows"]
    if rows[0]["label"] != "FP32":
        raise ValueError("the first row of a Pareto result is the FP32 row")
    rows[0].setdefault("file_bytes", rows[0]["size_bytes"])  # the safetensors file the old runs measured
    rows[0].update(size_bytes=fp32, compression=1.0)
    for r in rows[1:]:
        r["compression"] = file_compression(fp32, r["size_bytes"])
        if r.get("family") == "torchao":
            r["size_note"] = "size: torch.save of the torchao model's state_dict"
    results["fp32_bytes"] = fp32
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path,
                        default=sorted((REPO / "benchmarks" / "results").glob("pareto-*-spikformer.json")))
    parser.add_argument("--no-docs", action="store_true", help="leave docs/BENCHMARKS.md as it is")
    args = parser.parse_args()
    for path in args.paths:
        results = unify(json.loads(path.read_text()))
        atomic_write_text(path, json.dumps(results, indent=2, default=str))
        render_saved(path, docs=None if args.no_docs else REPO / "docs" / "BENCHMARKS.md")
        print(f"{path.name}: FP32 size {results['fp32_bytes']:,} bytes; "
              + ", ".join(f"{r['label']} {r['compression']:.2f}x" for r in results["rows"][1:]))


if __name__ == "__main__":
    main()
