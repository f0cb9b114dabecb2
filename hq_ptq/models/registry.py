"""Model registry: ``@register_model(name)`` builders, ``build_model(name, **overrides)``.

Every built model carries ``model.hq_config = {"name": ..., **constructor kwargs}`` (JSON-safe), so a
checkpoint rebuilds it with ``build_model(cfg["name"], **rest)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

log = logging.getLogger(__name__)

__all__ = ["build_model", "list_models", "make_config", "register_model"]

Builder = Callable[..., nn.Module]
C = TypeVar("C")

_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(**overrides) -> nn.Module`` under ``name``.

    Raises:
        ValueError: if ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def deco(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered; pick another name")
        _REGISTRY[name] = builder
        return builder

    return deco


def _load_builtins() -> None:
    # Deferred so that `registry` can be imported on its own (the zoo modules import it).
    import hq_ptq.models.sdt  # noqa: F401
    import hq_ptq.models.spikformer  # noqa: F401


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    _load_builtins()
    return sorted(_REGISTRY)


def _unknown(kind: str, value: str, choices: list[str]) -> ValueError:
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {value!r}.{hint} Choose from: {', '.join(choices)}")


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name`` with keyword ``overrides`` of its defaults.

    Args:
        name: a name from ``list_models()``.
        **overrides: constructor settings, e.g. ``num_classes=11``.

    Returns:
        The model, with ``model.hq_config`` set.

    Raises:
        ValueError: unknown name or setting, or a setting that is not JSON-serialisable.

    Example:
        >>> m = build_model("spikformer-tiny", num_classes=10)
        >>> cfg = dict(m.hq_config); m2 = build_model(cfg.pop("name"), **cfg)
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise _unknown("model", name, sorted(_REGISTRY))
    model = _REGISTRY[name](**overrides)
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        kwargs = dataclasses.asdict(config)
    else:
        kwargs = dict(overrides)
    if "name" in kwargs:
        raise ValueError(f"model {name!r}: 'name' is reserved in hq_config; rename that setting")
    hq_config = {"name": name, **kwargs}
    try:
        json.dumps(hq_config)
    except TypeError as err:
        raise ValueError(f"model {name!r}: settings must be JSON-serialisable ({err})") from None
    model.hq_config = hq_config
    log.debug("built %s with %s", name, hq_config)
    return model


def make_config(cls: type[C], defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> C:
    """``cls(**{**defaults, **overrides})`` for a config dataclass, with a readable unknown-key error."""
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in overrides:
        if key not in fields:
            raise _unknown(f"{cls.__name__} setting", key, fields)
    return cls(**{**defaults, **overrides})


def register_presets(
    model_cls: type[nn.Module], config_cls: type, presets: Mapping[str, Mapping[str, object]]
) -> None:
    """Register one builder per preset: ``build_model(name, **overrides)`` -> ``model_cls(config)``."""

    def register(name: str) -> None:
        @register_model(name)
        def build(**overrides: object) -> nn.Module:
            return model_cls(make_config(config_cls, presets[name], overrides))

        build.__name__ = build.__qualname__ = name.replace("-", "_")
        build.__module__ = model_cls.__module__

    for name in presets:
        register(name)
