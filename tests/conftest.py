"""Suite-wide settings: no progress bars, one torch thread (fast and stable on a shared 2-core box), and a
private data cache so tests never read or write the user's ~/.cache."""

from __future__ import annotations

import os

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
