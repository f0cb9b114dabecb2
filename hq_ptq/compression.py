"""The one definition of the FP32 size and of compression, used by reports, ``inspect``, the CLI and the
benchmarks alike (docs/BENCHMARKS.md, "Definitions").

- **FP32 size**: 4 bytes × every element of the float model's state dict (parameters and buffers), the
  tensor payload of an FP32 checkpoint. File headers and metadata are not counted: they depend on the file
  format and on what a writer chooses to record, not on the model.
- **weight compression**: 32 / average weight bits (parameter-weighted over the quantized layers; codes
  only). This is SpikeHQ's definition, the one comparable with the paper.
- **file compression**: FP32 size / bytes of the file a method writes (hq_ptq's packed checkpoint,
  torchao's ``torch.save``), so scales, float BatchNorm and biases, headers and metadata are all charged to
  the quantized model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

__all__ = ["FP_BITS", "file_compression", "fp32_bytes", "weight_compression"]

FP_BITS = 32


def fp32_bytes(state: Mapping[str, Tensor] | Iterable[Tensor | int]) -> int:
    """FP32 size of a float model's ``state_dict()``: 4 bytes × every element.

    Also takes the tensors alone, or element counts (for tensors that exist only in another form, such as
    the weights of a packed checkpoint).
    """
    items = state.values() if isinstance(state, Mapping) else state
    return (FP_BITS // 8) * sum(t if isinstance(t, int) else t.numel() for t in items)


def weight_compression(avg_bits: float) -> float:
    """32 / ``avg_bits``, the average weight bits of a plan (:attr:`hq_ptq.plan.Plan.avg_bits`)."""
    if not avg_bits > 0:
        raise ValueError(f"average weight bits must be positive, got {avg_bits!r}")
    return FP_BITS / avg_bits


def file_compression(fp32: int, file_bytes: int) -> float:
    """FP32 size (:func:`fp32_bytes`) over the bytes of the file a quantized model was written to."""
    if file_bytes <= 0:
        raise ValueError(f"a file size must be positive, got {file_bytes!r}")
    return fp32 / file_bytes
