"""TOML recipes: model, dataset, float training, search and QAT settings for one end-to-end run.

A recipe is settings only. Unknown keys fail with the nearest valid key named; ``--set section.key=value``
overrides any value from the command line.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hq_ptq.config import QATConfig, QuantConfig, SearchConfig, section_from_dict
from hq_ptq.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_KEYS = ("description", "fp_checkpoint", "model", "data", "train", "quant", "search", "qat")
# [quant]: the budget plus QuantConfig's own fields ([search] and [qat] are sections of their own)
QUANT_KEYS = ("budget", *(f.name for f in fields(QuantConfig) if f.name not in ("search", "qat")))
DATA_LOADER_KEYS = ("name", "batch_size", "eval_batch_size")


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    model: dict[str, Any]
    data: dict[str, Any]
    train: TrainConfig
    quant: QuantConfig
    budget: float
    fp_checkpoint: Path | None

    @property
    def model_name(self) -> str:
        return self.model["name"]

    def model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "name": self.name,
            "description": self.description,
            "fp_checkpoint": str(self.fp_checkpoint) if self.fp_checkpoint else None,
            "model": self.model,
            "data": self.data,
            "train": asdict(self.train),
            "budget": self.budget,
            "quant": self.quant.to_dict(),
        }


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: ``$HQ_PTQ_RECIPES``, ./recipes, then the repository's recipes/."""
    dirs = [Path(p) for p in os.environ.get("HQ_PTQ_RECIPES", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "recipes", Path(__file__).resolve().parents[1] / "recipes"]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def list_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        return p
    known = list_recipes()
    if name_or_path in known:
        return known[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise FileNotFoundError(
        f"no recipe named {name_or_path!r}: {hint}known recipes: {', '.join(known) or 'none'}"
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'train.epochs=3'`` -> (['train', 'epochs'], 3); the value is read as TOML, else as a string."""
    if "=" not in item:
        raise ValueError(f"--set expects section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _suggest(key: str, known: tuple[str, ...] | list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {where}{close[0]}?)" if close else f" (known: {', '.join(known)})"
    return ValueError(f"unknown key {where}{key}{hint}")


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every error is one line naming the bad key."""
    path = find_recipe(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML ({err})") from None
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item}: {k} is not a section")
        node[keys[-1]] = value
    for key in raw:
        if key not in TOP_KEYS:
            raise _suggest(key, TOP_KEYS, "")
    for section in ("model", "data"):
        if "name" not in raw.get(section, {}):
            raise ValueError(f"{path}: [{section}] needs a name")
    quant = dict(raw.get("quant", {}))
    for key in quant:
        if key not in QUANT_KEYS:
            raise _suggest(key, QUANT_KEYS, "quant.")
    budget = float(quant.pop("budget", 3.5))
    quant_cfg = QuantConfig(
        search=section_from_dict(SearchConfig, raw.get("search", {}), "search"),
        qat=section_from_dict(QATConfig, raw.get("qat", {}), "qat"),
        **quant,
    )
    ckpt = raw.get("fp_checkpoint")
    if ckpt is not None:
        ckpt = Path(ckpt)
        if not ckpt.is_absolute():
            # relative to the repository that holds the recipes folder, so it works from any cwd
            ckpt = path.resolve().parent.parent / ckpt
    return Recipe(
        name=path.stem,
        path=path,
        description=raw.get("description", ""),
        model=dict(raw["model"]),
        data=dict(raw["data"]),
        train=section_from_dict(TrainConfig, raw.get("train", {}), "train"),
        quant=quant_cfg,
        budget=budget,
        fp_checkpoint=ckpt,
    )
