"""Suite-wide settings: no progress bars, one torch thread (fast and stable on a shared 2-core box), and a
private data cache so tests never read or write the user's ~/.cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hq_ptq import progress


def pytest_configure(config: pytest.Config) -> None:
    progress.set_enabled(False)
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    old = os.environ.get("HQ_PTQ_CACHE")
    os.environ["HQ_PTQ_CACHE"] = str(tmp_path_factory.mktemp("hq_cache"))
    yield
    if old is None:
        os.environ.pop("HQ_PTQ_CACHE", None)
    else:
        os.environ["HQ_PTQ_CACHE"] = old


# The tiny recipe the CLI, pipeline, resume, determinism, distributed and benchmark tests run end to end:
# a 1-block spikformer-tiny (dim 32) on 128/40 digits samples at T = 2, trained for a few seconds.
TINY_RECIPE = {
    "model": {"name": "spikformer-tiny", "embed_dim": 32, "num_heads": 2, "depth": 1},
    "data": {"name": "digits", "T": 2, "batch_size": 16, "train_subset": 128, "test_subset": 40},
    "train": {"epochs": 3, "lr": 5e-3},
    "quant": {"budget": 4.0},
    "search": {"metric": "fisher", "calib_batches": 1},
    "qat": {"steps": 2},
}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the plain ASCII used here
    return repr(value)


def write_tiny_recipe(path: Path, **sections: dict) -> Path:
    """Write the tiny recipe to ``path`` (its float checkpoint beside it, ``fp.safetensors``), each section
    of ``TINY_RECIPE`` updated with the same-named keyword, e.g. ``qat={"steps": 6}``."""
    lines = [f'fp_checkpoint = "{(path.parent / "fp.safetensors").as_posix()}"']
    for name in dict.fromkeys([*TINY_RECIPE, *sections]):
        lines.append(f"\n[{name}]")
        merged = {**TINY_RECIPE.get(name, {}), **sections.get(name, {})}
        lines += [f"{key} = {_toml_value(value)}" for key, value in merged.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_recipe():
    """:func:`write_tiny_recipe`, for tests to write their variant of the tiny recipe."""
    return write_tiny_recipe
