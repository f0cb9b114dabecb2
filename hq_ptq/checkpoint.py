"""Float checkpoints: safetensors weights + model config as JSON metadata (no pickle, no code on load)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hq_ptq.files import atomic_write

FORMAT = "hq_ptq.float"
FORMAT_VERSION = 1


def save_float(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Save a zoo model (one with ``hq_config``) as ``path`` (.safetensors) with its config and ``meta``."""
    config = getattr(model, "hq_config", None)
    if config is None:
        raise ValueError(
            "save_float needs a model built by hq_ptq.models.build_model (it has no hq_config); "
            "save other models with torch.save(model.state_dict())"
        )
    # clone() breaks storage sharing, which safetensors refuses
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_config": json.dumps(config),
        "meta": json.dumps(meta or {}),
    }
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


def load_float(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the zoo model saved by :func:`save_float`; returns ``(model, meta)``, model in eval mode."""
    from hq_ptq.models import build_model

    md = read_metadata(path)
    if md.get("format") != FORMAT:
        raise ValueError(f"{path} is not an hq_ptq float checkpoint (format={md.get('format')!r})")
    if md.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has format version {md.get('format_version')}, this hq_ptq reads {FORMAT_VERSION}"
        )
    config = dict(json.loads(md["model_config"]))
    model = build_model(config.pop("name"), **config)
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match model {model.hq_config['name']}: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.eval()
    return model, json.loads(md.get("meta", "{}"))


__all__ = ["save_float", "load_float", "read_metadata"]
