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


def write_recipe(path: Path, base: dict[str, dict], fp: Path | None, **sections: dict) -> Path:
    """Write the recipe ``base`` to ``path`` (``fp_checkpoint = fp`` when given), each section updated with
    the same-named keyword, e.g. ``qat={"steps": 6}``."""
    lines = [f'fp_checkpoint = "{fp.as_posix()}"'] if fp is not None else []
    for name in dict.fromkeys([*base, *sections]):
        lines.append(f"\n[{name}]")
        merged = {**base.get(name, {}), **sections.get(name, {})}
        lines += [f"{key} = {_toml_value(value)}" for key, value in merged.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tiny_recipe(path: Path, **sections: dict) -> Path:
    """The tiny recipe at ``path``, its float checkpoint beside it (``fp.safetensors``)."""
    return write_recipe(path, TINY_RECIPE, path.parent / "fp.safetensors", **sections)


def step_leaky(lif, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for the multi-step neurons: a plain snnTorch ``Leaky`` driven by hand, one step per call."""
    mem = torch.zeros_like(x[0])
    spikes, mems = [], []
    for t in range(x.shape[0]):
        spk, mem = lif(x[t], mem)
        spikes.append(spk)
        mems.append(mem)
    return torch.stack(spikes), torch.stack(mems)


def calibrate_bn(model, shape: tuple[int, ...], events) -> object:
    """``model`` in eval mode with BatchNorm statistics measured on three batches ``events(shape, seed)``: an
    untrained model's BN sits at init and its LIFs stay silent; real statistics make it spike."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(events(shape, 100 + i))
    return model.eval()


def small_cnn():
    """A seeded plain CNN for [B, 1, 8, 8] inputs and 4 classes: two Conv2d, two Linear."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4),
    )


def mutate_bytes(good: bytes, data, op: str, span: int | None = None) -> bytes:
    """``good`` with one hypothesis-drawn change at a position below ``span`` (default: anywhere): ``flip``
    one byte, ``truncate`` there, or ``insert`` 1-16 random bytes. The fuzz tests of every file format."""
    from hypothesis import strategies as st

    pos = data.draw(st.integers(0, (len(good) if span is None else span) - 1))
    if op == "flip":
        return good[:pos] + bytes([good[pos] ^ data.draw(st.integers(1, 255))]) + good[pos + 1 :]
    if op == "truncate":
        return good[:pos]
    if op == "insert":
        return good[:pos] + data.draw(st.binary(min_size=1, max_size=16)) + good[pos:]
    raise ValueError(f"unknown mutation {op!r}")


@pytest.fixture(scope="session")
def tiny_recipe():
    """:func:`write_tiny_recipe`, for tests to write their variant of the tiny recipe."""
    return write_tiny_recipe


@pytest.fixture(scope="session")
def trained_tiny_recipe():
    """``(path, **sections)`` -> path: a variant of the tiny recipe with its float model already trained."""
    from hq_ptq.pipeline import train_recipe
    from hq_ptq.recipe import load_recipe

    def write_and_train(path: Path, **sections: dict) -> Path:
        train_recipe(load_recipe(str(write_tiny_recipe(path, **sections))))
        return path

    return write_and_train
