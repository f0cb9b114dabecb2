"""Where a run computes: resolving a device setting and moving batches to the model's device.

The one rule: the model decides. :func:`hq_ptq.quantize` moves the model to ``QuantConfig.device`` (``"auto"``
keeps it where it is), and every batch it, :func:`hq_ptq.recalibrate_bn`, QAT and evaluation use is moved
to the device of the model at the point of use, inputs and targets alike (any nesting of tuples, lists and
dicts, :mod:`hq_ptq.model_io`). Data that cannot be moved there (a ``meta`` tensor holds no values) is one
ValueError line naming both devices.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hq_ptq.config import check_device
from hq_ptq.errors import first_line
from hq_ptq.model_io import map_tensors, tensors

__all__ = ["batch_to", "model_device", "resolve_device", "tensor_devices"]


def _cuda_device(index: int | None, what: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError(
            f"{what} asks for CUDA but torch {torch.__version__} sees no CUDA device; use 'cpu' or 'auto'"
        )
    count = torch.cuda.device_count()
    if index is None:
        index = torch.cuda.current_device()  # under torchrun: the device of this rank's LOCAL_RANK
    if not 0 <= index < count:
        raise ValueError(f"{what} asks for cuda:{index} but there are {count} CUDA device(s) (cuda:0..)")
    return torch.device("cuda", index)


def resolve_device(
    device: str | torch.device = "auto", model: nn.Module | None = None, *, what: str = "quant.device"
) -> torch.device:
    """The ``torch.device`` a setting names, always with its index for CUDA (``cuda:0``, not ``cuda``).

    ``"auto"`` is the device of ``model`` when one is given (:func:`model_device`), else ``cuda`` when
    CUDA is available, else ``cpu``. ``"cuda"`` is the current CUDA device.

    Raises:
        ValueError: a setting other than "auto", "cpu", "cuda", "cuda:N" (or a cpu/cuda ``torch.device``),
            CUDA asked for where there is none, or a GPU index past the last device; one line naming
            ``what``.
    """
    if isinstance(device, torch.device):
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{what} must be a cpu or cuda device, got {device}")
        return _cuda_device(device.index, what) if device.type == "cuda" else torch.device("cpu")
    name = check_device(device, what)
    if name == "auto":
        if model is not None:
            return model_device(model)
        return _cuda_device(None, what) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    _, _, index = name.partition(":")
    return _cuda_device(int(index) if index else None, what)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else its first buffer); ``cpu`` for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def tensor_devices(value: Any) -> list[torch.device]:
    """The distinct devices of the tensors inside ``value``, in order of appearance."""
    return list(dict.fromkeys(t.device for t in tensors(value)))


def _names(devices: list[torch.device]) -> str:
    return " and ".join(str(d) for d in devices)


def batch_to(value: Any, device: torch.device, *, what: str = "inputs") -> Any:
    """``value`` (a tensor, or tensors nested in tuples, lists and dicts) with every tensor on ``device``;
    tensors already there are kept as they are, and everything that is not a tensor too.

    Raises:
        ValueError: a tensor cannot be moved to ``device`` (e.g. a ``meta`` tensor, which holds no
            values): one line naming both devices and ``what`` (e.g. "calibration inputs").
    """
    try:
        return map_tensors(value, lambda t: t if t.device == device else t.to(device))
    except (RuntimeError, NotImplementedError) as err:
        others = [d for d in tensor_devices(value) if d != device]
        where = "" if device.type == "cpu" else f" or on {device}"
        raise ValueError(
            f"the model is on {device} but the {what} are on {_names(others)} and cannot be moved there "
            f"({first_line(err)}); give tensors that hold values (on the CPU{where})"
        ) from None
