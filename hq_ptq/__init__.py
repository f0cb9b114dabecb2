"""hq_ptq: heterogeneous (uniform + power-of-two) mixed-precision weight quantization for spiking ViTs.

qmodel = hq_ptq.quantize(model, budget=3.5, calib_data=loader, train_data=loader)
plan = hq_ptq.get_plan(qmodel)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The public names and the module each lives in. They load on first use (PEP 562), so `import hq_ptq` and
# `hq-ptq --help` do not pay for torch, Brevitas and onnx (about 5 s on a 2-core machine) until needed.
_HOMES = {
    "analyze": "api", "quantize": "api", "recalibrate_bn": "api", "search_plan": "api",
    "QATConfig": "config", "QuantConfig": "config", "SearchConfig": "config",
    "export_onnxruntime": "export", "export_qonnx": "export", "run_export": "export",
    "verify_export": "export",
    "load": "pack", "save": "pack",
    "LayerChoice": "plan", "Plan": "plan",
    "finetune": "qat",
    "integerize": "integer", "reference_mode": "integer", "save_integer": "integer",
    "run_integer_graph": "integer_graph",
    "detached_copy": "snn", "reset_states": "snn", "set_lif_backend": "snn", "to_multistep": "snn",
    "to_stepwise": "snn",
    "apply_plan": "state", "get_plan": "state",
    "split_attention": "attention",
}

if TYPE_CHECKING:  # static tools see the plain imports
    from hq_ptq.api import analyze, quantize, recalibrate_bn, search_plan
    from hq_ptq.attention import split_attention
    from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
    from hq_ptq.export import export_onnxruntime, export_qonnx, run_export, verify_export
    from hq_ptq.integer import integerize, reference_mode, save_integer
    from hq_ptq.integer_graph import run_integer_graph
    from hq_ptq.pack import load, save
    from hq_ptq.plan import LayerChoice, Plan
    from hq_ptq.qat import finetune
    from hq_ptq.snn import detached_copy, reset_states, set_lif_backend, to_multistep, to_stepwise
    from hq_ptq.state import apply_plan, get_plan


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'hq_ptq' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hq_ptq.{home}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__version__ = "0.1.0"

__all__ = [
    "quantize",
    "get_plan",
    "apply_plan",
    "analyze",
    "search_plan",
    "recalibrate_bn",
    "save",
    "load",
    "export_qonnx",
    "export_onnxruntime",
    "run_export",
    "verify_export",
    "reset_states",
    "detached_copy",
    "finetune",
    "integerize",
    "reference_mode",
    "save_integer",
    "run_integer_graph",
    "to_multistep",
    "to_stepwise",
    "split_attention",
    "set_lif_backend",
    "Plan",
    "LayerChoice",
    "QuantConfig",
    "SearchConfig",
    "QATConfig",
    "__version__",
]
