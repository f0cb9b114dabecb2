"""hq_ptq: heterogeneous (uniform + power-of-two) mixed-precision weight quantization for spiking ViTs.

qmodel = hq_ptq.quantize(model, budget=3.5, calib_data=loader, train_data=loader)
plan = hq_ptq.get_plan(qmodel)
"""

from __future__ import annotations

from hq_ptq.api import analyze, quantize, recalibrate_bn, search_plan
from hq_ptq.config import QATConfig, QuantConfig, SearchConfig
from hq_ptq.export import export_onnxruntime, export_qonnx, run_export, verify_export
from hq_ptq.pack import load, save
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.qat import finetune
from hq_ptq.snn import detached_copy, reset_states, set_lif_backend, to_multistep, to_stepwise
from hq_ptq.state import apply_plan, get_plan

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
    "to_multistep",
    "to_stepwise",
    "set_lif_backend",
    "Plan",
    "LayerChoice",
    "QuantConfig",
    "SearchConfig",
    "QATConfig",
    "__version__",
]
