"""The model zoo: spiking vision transformers built from snnTorch neurons, behind a name registry.

>>> from hq_ptq.models import build_model, list_models
>>> model = build_model("spikformer-tiny", num_classes=10)   # input [T, B, 2, 32, 32]
"""

from __future__ import annotations

from hq_ptq.models.registry import build_model, list_models, register_model
from hq_ptq.models.sdt import SDTConfig, SpikeDrivenTransformer
from hq_ptq.models.spikformer import Spikformer, SpikformerConfig

__all__ = [
    "SDTConfig",
    "SpikeDrivenTransformer",
    "Spikformer",
    "SpikformerConfig",
    "build_model",
    "list_models",
    "register_model",
]
