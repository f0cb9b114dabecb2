"""TOML recipes: model, dataset, float training, search and QAT settings for one end-to-end run.

A recipe is settings only. Unknown keys fail with the nearest valid key named; ``--set section.key=value``
overrides any value from the command line. ``[quant] device`` says where a run computes: "auto" (the
default: cuda when available, else cpu), "cpu", "cuda" or "cuda:N" (``hq-ptq run --device``), and
``[quant] precision`` what QAT computes in: "fp32" (the default) or "bf16" (``hq-ptq run --precision``).

The model and the data are either built in (``[model] name = "spikformer-tiny"``, ``[data] name = "digits"``)
or the user's own, named as ``"package.module:function"``:

* ``[model] factory = "mymodels:build"``: ``build(**kwargs)`` returns the float ``nn.Module``; every other
  ``[model]`` key is a keyword argument, except ``loss`` and ``output_fn``, themselves
  ``"package.module:function"`` references: ``loss(outputs, targets)`` (default cross-entropy) and
  ``output_fn(outputs) -> [B, classes]`` scores (default: the outputs when they are 2-D).
* ``[data] factory = "mydata:loaders"``: ``loaders(**kwargs)`` returns ``(train, test)``, re-iterable
  collections of ``(inputs, targets)`` batches; every other ``[data]`` key is a keyword argument.

References are imported lazily (:func:`resolve`), with the current directory on ``sys.path`` as
``python -m`` has it, so a ``mymodels.py`` beside the recipe's caller works.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hq_ptq.config import (
    QATConfig,
    QuantConfig,
    SearchConfig,
    check_energy_budget,
    check_renamed,
    section_from_dict,
)
from hq_ptq.errors import first_line
from hq_ptq.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_KEYS = ("description", "fp_checkpoint", "model", "data", "train", "quant", "search", "qat")
# [quant]: the budgets plus QuantConfig's own fields ([search] and [qat] are sections of their own)
QUANT_KEYS = (
    "budget",
    "energy_budget",
    "integer_bits",
    *(f.name for f in fields(QuantConfig) if f.name not in ("search", "qat")),
)
DATA_LOADER_KEYS = ("name", "batch_size", "eval_batch_size")
# [model] keys that are not keyword arguments of the model's builder
MODEL_KEYS = ("name", "factory", "loss", "output_fn")
_REFERENCE = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


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
    # the plan's estimated energy as a fraction of the FP32 model's (hq_ptq.quantize's energy_budget)
    energy_budget: float | None = None
    # membrane widths at which the run also measures the integer-only model (hq_ptq.integerize); () skips it
    integer_bits: tuple[int, ...] = ()

    @property
    def model_factory(self) -> str | None:
        """``"package.module:function"`` building the user's model, or None for a zoo model."""
        return self.model.get("factory")

    @property
    def data_factory(self) -> str | None:
        """``"package.module:function"`` returning the user's ``(train, test)``; None for a dataset name."""
        return self.data.get("factory")

    @property
    def model_name(self) -> str:
        """The zoo model's name, or the factory reference of a user model."""
        return self.model.get("name") or self.model["factory"]

    @property
    def data_name(self) -> str:
        """The built-in dataset's name, or the factory reference of the user's data."""
        return self.data.get("name") or self.data["factory"]

    def model_overrides(self) -> dict[str, Any]:
        """Keyword arguments of ``build_model`` (zoo) or of the model factory."""
        return {k: v for k, v in self.model.items() if k not in MODEL_KEYS}

    def data_options(self) -> dict[str, Any]:
        """Keyword arguments of the data factory (every ``[data]`` key but ``factory``)."""
        return {k: v for k, v in self.data.items() if k != "factory"}

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
            "energy_budget": self.energy_budget,
            "integer_bits": list(self.integer_bits),
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


def check_reference(value: Any, what: str) -> str:
    """``value`` when it reads ``"package.module:function"``, else a one-line ValueError naming ``what``."""
    if not isinstance(value, str) or not _REFERENCE.fullmatch(value.strip()):
        raise ValueError(f"{what} must be 'package.module:function', got {value!r}")
    return value.strip()


def _cwd_on_path() -> None:
    # as `python -m` does: the current directory first, so the user's own mymodels.py is importable
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def resolve(reference: str, what: str = "reference") -> Callable[..., Any]:
    """The callable named by ``"package.module:function"`` (``function`` may be dotted: ``mod:Class.build``).

    The module is imported with the current directory on ``sys.path``. Every failure is one ValueError line
    naming ``what`` (e.g. ``"[model] factory"``): a malformed reference, a module that is not found or fails
    to import, a missing attribute (with the nearest name), or an attribute that is not callable.
    """
    reference = check_reference(reference, what)
    module_name, attr = reference.split(":")
    _cwd_on_path()
    importlib.invalidate_caches()  # a file written since the last import is seen
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        parts = module_name.split(".")
        if err.name in {".".join(parts[: i + 1]) for i in range(len(parts))}:
            raise ValueError(
                f"{what} {reference!r}: no module named {err.name!r} (looked in the current directory "
                f"{os.getcwd()} and sys.path)"
            ) from None
        raise ValueError(f"{what} {reference!r}: importing {module_name} failed ({err})") from None
    except Exception as err:  # the user's module raised while importing: still their error, one line
        detail = first_line(err)
        raise ValueError(
            f"{what} {reference!r}: importing {module_name} failed ({type(err).__name__}: {detail})"
        ) from None
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{what} {reference!r}: {where} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {reference!r} is not callable (a value of type {type(obj).__name__})")
    return obj


def _suggest(key: str, known: tuple[str, ...] | list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {where}{close[0]}?)" if close else f" (known: {', '.join(known)})"
    return ValueError(f"unknown key {where}{key}{hint}")


def load_recipe(
    name_or_path: str, overrides: list[str] | tuple[str, ...] = (), *, model: str | None = None
) -> Recipe:
    """Read, override and validate a recipe; every error is one line naming the bad key.

    ``model`` (``"package.module:function"``, the CLI's ``--model``) replaces the recipe's model: ``[model]``
    becomes ``factory = model`` with the recipe's ``loss`` and ``output_fn`` kept and its other keys (the
    old model's arguments) dropped, and so is ``fp_checkpoint`` (the old model's weights). ``overrides``
    apply after it, so ``--set model.key=value`` adds keyword arguments and ``--set fp_checkpoint=FILE``
    loads weights into the new model.
    """
    path = find_recipe(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML ({err})") from None
    if model is not None:
        kept = {k: v for k, v in dict(raw.get("model") or {}).items() if k in ("loss", "output_fn")}
        raw["model"] = {"factory": check_reference(model, "--model"), **kept}
        raw.pop("fp_checkpoint", None)
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
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {section} must be a [{section}] section")
        if "name" in table and "factory" in table:
            raise ValueError(
                f"{path}: [{section}] takes name (built in) or factory (your own), not both"
            )
        if "name" not in table and "factory" not in table:
            example = "mymodels:build" if section == "model" else "mydata:loaders"
            raise ValueError(
                f"{path}: [{section}] needs a name (built in) or a factory = \"{example}\" (your own)"
            )
        if "factory" in table:
            check_reference(table["factory"], f"[{section}] factory")
    for key in ("loss", "output_fn"):
        if key in raw["model"]:
            check_reference(raw["model"][key], f"[model] {key}")
    quant = dict(raw.get("quant", {}))
    check_renamed("quant", quant)
    for key in quant:
        if key not in QUANT_KEYS:
            raise _suggest(key, QUANT_KEYS, "quant.")
    budget = float(quant.pop("budget", 3.5))
    energy_budget = quant.pop("energy_budget", None)
    try:
        check_energy_budget(energy_budget)
    except ValueError as err:
        raise ValueError(f"{path}: quant.{err}") from None
    integer_bits = quant.pop("integer_bits", [])
    if not (isinstance(integer_bits, list) and all(isinstance(b, int) and b >= 4 for b in integer_bits)):
        raise ValueError(f"{path}: quant.integer_bits must be a list of membrane widths >= 4, e.g. "
                         f"[16, 12, 8], got {integer_bits!r}")
    quant_cfg = QuantConfig(
        search=section_from_dict(SearchConfig, raw.get("search", {}), "search"),
        qat=section_from_dict(QATConfig, raw.get("qat", {}), "qat"),
        **quant,
    )
    ckpt = raw.get("fp_checkpoint")
    if ckpt is not None:
        ckpt = Path(ckpt)
        if not ckpt.is_absolute():
            # a recipe in a recipes/ folder: relative to the repository holding that folder; any other
            # recipe file: relative to its own folder; either way the same from any cwd
            folder = path.resolve().parent
            ckpt = (folder.parent if folder.name == "recipes" else folder) / ckpt
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
        energy_budget=None if energy_budget is None else float(energy_budget),
        integer_bits=tuple(integer_bits),
    )
