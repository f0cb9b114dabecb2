"""Float checkpoints: safetensors weights + model config as JSON metadata (no pickle, no code on load).

A zoo model is rebuilt from the config the file records. A user's own model (built by a recipe's
``[model] factory``) is saved with the factory's reference recorded for information only: loading never
imports it; pass the freshly built model instead, ``load_float(path, model=build())``, which also reads
a plain safetensors file or a ``torch.save`` state_dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hq_ptq.errors import first_line
from hq_ptq.files import atomic_write

FORMAT = "hq_ptq.float"
FORMAT_VERSION = 1


def save_float(
    model: nn.Module,
    path: str | os.PathLike,
    meta: dict[str, Any] | None = None,
    *,
    factory: str | None = None,
) -> Path:
    """Save a float model as ``path`` (.safetensors) with ``meta``: a zoo model (one with ``hq_config``) with
    its config, any other model with ``factory``, the ``"package.module:function"`` that builds it (recorded,
    never imported on load)."""
    config = getattr(model, "hq_config", None)
    if config is None and factory is None:
        raise ValueError(
            "save_float needs a model built by hq_ptq.models.build_model (it has no hq_config) or the "
            "factory= that builds it; save other models with torch.save(model.state_dict())"
        )
    # clone() breaks storage sharing, which safetensors refuses
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(meta or {}),
    }
    if config is not None:
        metadata["model_config"] = json.dumps(config)
    else:
        metadata["factory"] = str(factory)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({err})") from None


def _state_dict_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, safetensors metadata) of a safetensors file or a ``torch.save``-d state_dict."""
    try:
        md = read_metadata(path)
    except ValueError:
        md = None
    if md is not None:
        if md.get("format") not in (None, FORMAT):
            raise ValueError(f"{path} is not a float checkpoint (format={md.get('format')!r})")
        if md.get("format") == FORMAT and md.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(
                f"{path} has format version {md.get('format_version')}, this hq_ptq reads {FORMAT_VERSION}"
            )
        return load_file(str(path)), md
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is not what we can read
        detail = first_line(err)
        raise ValueError(
            f"{path} is neither a safetensors file nor a torch.save state_dict ({detail})"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors); got {type(obj).__name__}")
    return obj, {}


def _load_into(model: nn.Module, path: Path) -> tuple[nn.Module, dict[str, Any]]:
    state, md = _state_dict_file(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"{path} does not match the model: {lines[-1] if lines else err}") from None
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model {type(model).__name__}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    model.eval()
    return model, json.loads(md.get("meta", "{}"))


def load_float(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    map_location: str | torch.device | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the zoo model saved by :func:`save_float`; returns ``(model, meta)``, model in eval mode.

    With ``model`` (a freshly built float model of the saved architecture) its weights are loaded instead:
    from a :func:`save_float` file, any safetensors file or a ``torch.save`` state_dict (``{"state_dict":
    ...}`` too), every key matching.

    ``map_location`` ("cpu", "cuda", "cuda:N", "auto": cuda when available, or a ``torch.device``) is
    where the returned model lives. None (the default): as before, a rebuilt zoo model on the CPU and a
    ``model`` passed in where it already is. The file is always read on the CPU.

    Raises:
        ValueError: an unreadable or foreign file, a model it does not match, or a ``map_location`` that
            is not a device here (one line).
    """
    from hq_ptq.devices import resolve_device
    from hq_ptq.models import build_model

    device = None if map_location is None else resolve_device(map_location, what="map_location")
    if model is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        return _placed(_load_into(model, Path(path)), device)
    md = read_metadata(path)
    if md.get("format") == FORMAT and "model_config" not in md and "factory" in md:
        raise ValueError(
            f"{path} holds a model built by {md['factory']}, not a zoo model; pass the model it loads into "
            "(load_float(path, model=...), hq-ptq --model package.module:function)"
        )
    if md.get("format") != FORMAT:
        raise ValueError(f"{path} is not an hq_ptq float checkpoint (format={md.get('format')!r})")
    if md.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has format version {md.get('format_version')}, this hq_ptq reads {FORMAT_VERSION}"
        )
    config = dict(json.loads(md["model_config"]))
    return _placed(_load_into(build_model(config.pop("name"), **config), Path(path)), device)


def _placed(loaded: tuple[nn.Module, dict[str, Any]], device: torch.device | None) -> tuple[nn.Module, dict]:
    model, meta = loaded
    return (model if device is None else model.to(device)), meta


__all__ = ["save_float", "load_float", "read_metadata"]
