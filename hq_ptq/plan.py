"""Per-layer quantization plan: plain data with a versioned JSON round trip.

A :class:`Plan` is what the search produces and what ``apply_plan`` consumes: one
:class:`LayerChoice` (scheme, weight bits) per layer, keyed by the layer's fully qualified
module name. It knows nothing of torch, so it can be written, diffed and edited by hand.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hq_ptq.files import atomic_write_text

__all__ = ["PLAN_VERSION", "LayerChoice", "LayerQuant", "Plan"]

PLAN_VERSION = 1

_LAYER_KEYS = ("name", "scheme", "bits", "params", "sensitivity")


def _as_int(value: Any, what: str) -> int:
    # operator.index accepts numpy integers but refuses floats such as 4.0 or 4.5,
    # which would otherwise slip through int() silently.
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class LayerQuant:
    """The quantization state of one quantized layer, carried by the layer itself (``layer.hq_quant``).

    The only home of a layer's scheme, bits and search score: :mod:`hq_ptq.swap` writes it when it
    attaches or changes a quantizer, and :func:`hq_ptq.state.get_plan` reads the plan back from it.
    """

    scheme: str
    bits: int
    sensitivity: float | None = None


@dataclass(frozen=True)
class LayerChoice:
    """The quantization chosen for one layer.

    Args:
        name: Fully qualified module name (``model.named_modules()`` key).
        scheme: Weight scheme name, e.g. ``"uniform"`` or ``"pot"``.
        bits: Weight bit width (>= 1).
        params: Number of weight parameters of the layer (>= 1).
        sensitivity: Score Ω of the chosen (scheme, bits) candidate; lower is better. ``None`` when
            unknown (a hand-made plan), written as JSON ``null``, never NaN.
    """

    name: str
    scheme: str
    bits: int
    params: int
    sensitivity: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"layer name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.scheme, str) or not self.scheme:
            raise ValueError(f"layer {self.name!r}: scheme must be a non-empty string, got {self.scheme!r}")
        bits = _as_int(self.bits, f"layer {self.name!r}: bits")
        params = _as_int(self.params, f"layer {self.name!r}: params")
        if bits < 1:
            raise ValueError(f"layer {self.name!r}: bits must be >= 1, got {bits}")
        if params < 1:
            raise ValueError(f"layer {self.name!r}: params must be >= 1, got {params}")
        sensitivity = self.sensitivity
        try:
            if sensitivity is not None:
                sensitivity = float(sensitivity)
        except (TypeError, ValueError):
            raise ValueError(
                f"layer {self.name!r}: sensitivity must be a number or None, got {self.sensitivity!r}"
            ) from None
        if sensitivity is not None and math.isnan(sensitivity):
            sensitivity = None  # NaN is not JSON; unknown is None
        # Normalise numpy scalars to builtins so the plan is always JSON serialisable.
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "sensitivity", sensitivity)

    def to_dict(self) -> dict[str, Any]:
        """Return the layer as a JSON-ready dict."""
        return {k: getattr(self, k) for k in _LAYER_KEYS}


@dataclass(frozen=True)
class Plan:
    """A per-layer (scheme, bits) assignment, in model order.

    Args:
        layers: One :class:`LayerChoice` per layer; names must be unique.
        budget: Parameter-weighted average-bit budget the plan was searched for, if any.
        method: How the plan was made (``"greedy"``, ``"milp"``, ``"homogeneous"``, ...).
        meta: Free-form JSON-serialisable search report (total Ω, MILP gap, timings, ...).

    Example:
        >>> plan = Plan((LayerChoice("fc", "pot", 4, 100, 0.5),), budget=4.0)
        >>> plan["fc"].bits, plan.avg_bits
        (4, 4.0)
    """

    layers: tuple[LayerChoice, ...]
    budget: float | None = None
    method: str = "greedy"
    # A dict is unhashable; keep it out of the generated __hash__ so plans stay hashable.
    meta: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers:
            # An empty plan would quantize nothing without complaint (style.md §7.1).
            raise ValueError("a Plan needs at least one layer")
        seen: set[str] = set()
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerChoice):
                raise ValueError(f"Plan.layers[{i}] must be a LayerChoice, got {type(layer).__name__}")
            if layer.name in seen:
                raise ValueError(f"duplicate layer name {layer.name!r} in plan; names must be unique")
            seen.add(layer.name)
        budget = self.budget
        if budget is not None:
            budget = float(budget)
            if not math.isfinite(budget) or budget <= 0:
                raise ValueError(f"plan budget must be a positive finite number or None, got {budget}")
        if not isinstance(self.meta, Mapping):
            raise ValueError(f"plan meta must be a dict, got {type(self.meta).__name__}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "meta", dict(self.meta))

    # -- derived quantities -------------------------------------------------------------------
    @property
    def total_params(self) -> int:
        """Σ n_l over all layers."""
        return sum(layer.params for layer in self.layers)

    @property
    def size_bits(self) -> int:
        """Σ n_l · b_l: weight storage in bits (scales and zero points not counted)."""
        return sum(layer.params * layer.bits for layer in self.layers)

    @property
    def avg_bits(self) -> float:
        """Parameter-weighted average weight bits Σ n_l·b_l / Σ n_l."""
        return self.size_bits / self.total_params

    @property
    def omega_total(self) -> float:
        """Σ of the chosen candidates' sensitivities (NaN when any is unknown)."""
        values = [layer.sensitivity for layer in self.layers]
        return math.nan if None in values else math.fsum(values)

    @cached_property
    def by_name(self) -> Mapping[str, LayerChoice]:
        """Read-only mapping layer name → :class:`LayerChoice`, in plan order."""
        return MappingProxyType({layer.name: layer for layer in self.layers})

    def __getstate__(self) -> dict:
        # the cached read-only view does not pickle (multiprocessing, torch.distributed); it is rebuilt on use
        state = dict(self.__dict__)
        state.pop("by_name", None)
        return state

    def layer(self, name: str) -> LayerChoice:
        """Return the choice for ``name``.

        Raises:
            KeyError: If the plan has no such layer.
        """
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"no layer {name!r} in plan; known layers: {_preview(self.by_name)}") from None

    def __getitem__(self, name: str) -> LayerChoice:
        return self.layer(name)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __iter__(self) -> Iterator[LayerChoice]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (with ``"version"``; derived totals are informative only)."""
        return {
            "version": PLAN_VERSION,
            "method": self.method,
            "budget": self.budget,
            "avg_bits": self.avg_bits,
            "total_params": self.total_params,
            "meta": dict(self.meta),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Build a plan from :meth:`to_dict` output.

        ``version`` and ``layers`` are required (each layer needs name, scheme, bits, params; a
        missing or null sensitivity is unknown); ``budget``, ``method`` and ``meta`` default as in
        the constructor.
        Derived keys (``avg_bits``, ``total_params``) are recomputed, not read.

        Raises:
            ValueError: On an unknown version, a missing key or a bad value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        for key in ("version", "layers"):
            if key not in d:
                raise ValueError(f"plan dict is missing key {key!r}; was it written by Plan.to_dict()?")
        if d["version"] != PLAN_VERSION:
            raise ValueError(
                f"unsupported plan version {d['version']!r}; this hq_ptq reads version {PLAN_VERSION}"
            )
        raw_layers = d["layers"]
        if not isinstance(raw_layers, (list, tuple)):
            raise ValueError(f"plan 'layers' must be a list, got {type(raw_layers).__name__}")
        layers = []
        for i, entry in enumerate(raw_layers):
            if not isinstance(entry, Mapping):
                raise ValueError(f"plan layer {i} must be an object, got {type(entry).__name__}")
            missing = [k for k in _LAYER_KEYS if k not in entry and k != "sensitivity"]
            if missing:
                raise ValueError(f"plan layer {i} ({entry.get('name', '?')!r}) is missing key {missing[0]!r}")
            layers.append(LayerChoice(**{k: entry[k] for k in _LAYER_KEYS if k in entry}))
        return cls(
            layers=tuple(layers),
            budget=d.get("budget"),
            method=d.get("method", "greedy"),
            meta=dict(d.get("meta") or {}),
        )

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as JSON atomically (temp file in the same folder + ``os.replace``).

        Returns:
            The path written.
        """
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`to_json`.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file is not valid JSON or not a valid plan.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {str(path)!r} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan file {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def _preview(names: Mapping[str, Any], limit: int = 5) -> str:
    keys = list(names)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} total)" if len(keys) > limit else "")
