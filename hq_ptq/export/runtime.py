"""Running export files: qonnx's semantics (weight-only quantizer nodes folded once by qonnx, the rest one
onnxruntime session; else qonnx's node-by-node ``execute_onnx``) or one optimized onnxruntime session
(:class:`_Runner`), the inputs checked against the file's metadata, step files driven over time
(:func:`run_export`), and which onnxruntime execution providers those sessions use
(:func:`resolve_providers`: CUDA first for a model or inputs on CUDA when onnxruntime has it, else the
CPU)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch

from hq_ptq.export.passes import _STANDARD_DOMAINS, _fold_constants
from hq_ptq.export.trace import _one_line
from hq_ptq.export.write import export_info

log = logging.getLogger("hq_ptq.export")  # the package's one logger, as before the split

BACKENDS = ("qonnx", "onnxruntime")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
# the short names a provider argument takes besides "auto" and onnxruntime's own names
PROVIDER_NAMES = {"cpu": CPU_PROVIDER, "cuda": CUDA_PROVIDER}
# the CUDA provider's options: float32 MatMul/Conv without TF32 (10-bit mantissas), which onnxruntime's CUDA
# provider turns on by default on Ampere and later and which would move outputs by ~1e-3 and flip spikes
# that sit near a threshold: a verification compares with PyTorch, whose reference forward runs in full
# float32 (devices.full_fp32: cuDNN's TF32 switched off as well)
CUDA_OPTIONS = {"use_tf32": "0"}


def resolve_providers(provider: str | Sequence[str] = "auto", *, on_cuda: bool = False) -> list[str]:
    """The onnxruntime execution providers a session is created with, in order of preference.

    ``"auto"``: ``CUDAExecutionProvider`` then the CPU when ``on_cuda`` (the model verified, or the inputs
    run, are on CUDA) and onnxruntime reports CUDA available (``onnxruntime.get_available_providers()``),
    else ``CPUExecutionProvider`` alone. ``"cpu"``, ``"cuda"``, an onnxruntime provider name
    (``"CUDAExecutionProvider"``) or a sequence of them: those, in that order, with the CPU provider last
    for the nodes the others do not implement.

    Raises:
        ValueError: a provider asked for that onnxruntime does not report available here; one line naming
            the available ones.
    """
    import onnxruntime as ort

    available = list(ort.get_available_providers())
    if isinstance(provider, str) and provider.strip() == "auto":
        return [CUDA_PROVIDER, CPU_PROVIDER] if on_cuda and CUDA_PROVIDER in available else [CPU_PROVIDER]
    asked = [provider] if isinstance(provider, str) else list(provider)
    if not asked or not all(isinstance(p, str) for p in asked):
        raise ValueError(
            f"provider must be 'auto', 'cpu', 'cuda' or onnxruntime provider names, got {provider!r}"
        )
    names = [PROVIDER_NAMES.get(p.strip().lower(), p.strip()) for p in asked]
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(
            f"onnxruntime provider {missing[0]} is not available here (onnxruntime {ort.__version__} has "
            f"{', '.join(available)}); pass provider='auto' or one of those"
        )
    return list(dict.fromkeys([*names, CPU_PROVIDER]))


def _provider_list(providers: Sequence[str]) -> list[Any]:
    """``providers`` as onnxruntime's ``InferenceSession`` takes them, with the CUDA provider's options."""
    return [(p, dict(CUDA_OPTIONS)) if p == CUDA_PROVIDER else p for p in providers]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")


MARGIN_SUFFIX = "__hq_margin"  # the graph output holding a spike's margin ``a - b`` of its ``Greater(a, b)``


def _with_spike_outputs(
    proto: onnx.ModelProto, margins: bool = False
) -> tuple[onnx.ModelProto, list[str], dict[str, str]]:
    """A copy of ``proto`` that also outputs every ``Greater`` result (the Heaviside spikes), in node order;
    with ``margins``, also each ``Greater(a, b)``'s ``a - b`` where ``a`` is a float32 tensor the graph
    computes: how far the file's membrane was from firing (positive where it fired). Returns the copy,
    the spike names and ``{spike name: its margin output}``."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    infos = {v.name: v for v in proto.graph.value_info}
    greaters = [n for n in proto.graph.node if n.op_type == "Greater" and n.output[0] in infos]
    names = [n.output[0] for n in greaters]
    proto.graph.output.extend(infos[n] for n in names)
    margin_names: dict[str, str] = {}
    for node in greaters if margins else ():
        a = node.input[0]
        if a in infos and infos[a].type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            spike = node.output[0]
            margin_names[spike] = spike + MARGIN_SUFFIX
            proto.graph.node.append(onnx.helper.make_node("Sub", list(node.input), [margin_names[spike]],
                                                          name=margin_names[spike]))
            info = onnx.ValueInfoProto()
            info.CopyFrom(infos[spike])  # the spike's shape (qonnx's executor checks output shapes)
            info.name = margin_names[spike]
            info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            proto.graph.output.append(info)
    keep = [v for v in proto.graph.value_info if v.name not in set(names)]  # one ValueInfo per tensor
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)
    return proto, names, margin_names


def _ort_session(proto: onnx.ModelProto, optimize: bool, providers: Sequence[str] = (CPU_PROVIDER,)) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if optimize:
        # ORT's QDQ fusions would re-quantize float tensors into integer kernels and move outputs by
        # ~1e-2 on graphs with activation QDQ; the other (default) optimizations stay on
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    else:
        # the kernels qonnx's executor gets from its one-node sessions: no fusion or layout rewrite, and
        # no weight prepacking (there every weight is a fed input, never a constant)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=_provider_list(providers))


def _fold_custom_nodes(proto: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """``proto`` with every qonnx custom node evaluated by qonnx into an initializer, or None and why not.

    Possible when each custom node has constant inputs (weight-only quantization, as hq_ptq exports)
    and no tensor carries an integer quantization annotation (qonnx's executor would round those).
    """
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import is_custom_op

    for annotation in proto.graph.quantization_annotation:
        for entry in annotation.quant_parameter_tensor_names:
            if entry.key == "finn_datatype" and DataType[entry.value].is_integer():
                return None, f"tensor {annotation.tensor_name!r} has an integer datatype annotation"
    # no initializer ValueInfo fix-up: it is quadratic in the graph size and onnxruntime needs none
    model = ModelWrapper(onnx.ModelProto.FromString(proto.SerializeToString()),
                         fix_missing_initializer_valueinfo=False)
    count = _fold_constants(model, frozenset(), custom_only=True)
    graph = model.graph
    left = [n for n in graph.node if is_custom_op(n.domain, n.op_type)]
    if left:
        return None, f"{left[0].op_type} node {left[0].name!r} has a non-constant input"
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [i for i in graph.initializer if i.name not in used]  # the float weights behind the folds
    for init in unused:
        graph.initializer.remove(init)
    domains = {n.domain for n in graph.node}
    opsets = [o for o in model.model.opset_import if o.domain in _STANDARD_DOMAINS or o.domain in domains]
    del model.model.opset_import[:]
    model.model.opset_import.extend(opsets)
    return model.model, f"{count} qonnx nodes folded"


class _Runner:
    """One loaded graph and how it runs; ``executor`` names the path taken.

    ``backend="onnxruntime"``: one optimized onnxruntime session (``executor="onnxruntime"``).

    ``backend="qonnx"`` gives qonnx's semantics (custom ops by qonnx's ``execute_node``, standard ops by
    onnxruntime) without its executor's per-call cost, which is quadratic in the graph size (about a
    minute for spikformer-tiny unrolled over T=8): when every qonnx custom node has constant inputs,
    they are evaluated once by qonnx into initializers and the rest, all standard ops, runs in one
    onnxruntime session with optimizations and prepacking off, the kernels qonnx's one-node sessions
    use (``executor="qonnx-folded+onnxruntime"``). Otherwise qonnx's ``execute_onnx`` runs the graph
    node by node (``executor="qonnx"``).

    The onnxruntime session is created with ``providers`` (:func:`resolve_providers`); ``providers`` then
    says which it got (onnxruntime's ``get_providers()``; qonnx's own executor: the CPU).
    """

    def __init__(
        self,
        proto: onnx.ModelProto,
        backend: str,
        fold: bool = True,
        providers: Sequence[str] = (CPU_PROVIDER,),
    ) -> None:
        self.executor = backend
        self.model: Any = None
        self.session: Any = None
        self.providers = [CPU_PROVIDER]
        if backend == "onnxruntime":
            try:
                self.session = _ort_session(proto, optimize=True, providers=providers)
            except Exception as err:  # onnxruntime raises its own exception types
                raise ValueError(
                    f"onnxruntime cannot load this graph ({_one_line(err)}); a QONNX file needs "
                    "backend='qonnx' or a file from export_onnxruntime"
                ) from None
            self.providers = list(self.session.get_providers())
            return
        folded, why = _fold_custom_nodes(proto) if fold else (None, "folding switched off")
        if folded is not None:
            try:
                self.session = _ort_session(folded, optimize=False, providers=providers)
                self.executor = "qonnx-folded+onnxruntime"
                self.providers = list(self.session.get_providers())
            except Exception as err:  # qonnx's one-node sessions may still run what one session rejects
                why = f"onnxruntime rejects the folded graph: {_one_line(err)}"
        if self.session is None:
            from qonnx.core.modelwrapper import ModelWrapper

            self.model = ModelWrapper(proto)
        log.info("qonnx backend runs with executor %r (%s)", self.executor, why)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model is not None:
            from qonnx.core.onnx_exec import execute_onnx

            return execute_onnx(self.model, dict(feeds))
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, dict(feeds)), strict=True))


def _io_info(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with the format-2 keys (``inputs``, ``outputs``, ``time_dim``, ``scope_prefix``) filled in
    for files written by format 1 (one float input, one logits output, step files read out by the mean)."""
    if "inputs" in info:
        return info
    info = dict(info)
    info["inputs"] = [{"name": info["input"], "shape": info["input_shape"], "dtype": "float32"}]
    output: dict[str, Any] = {"name": info["logits"], "shape": None, "dtype": "float32"}
    if info["mode"] == "step":
        output["readout"] = "mean"
    info["outputs"] = [output]
    info.setdefault("time_dim", 0)
    info.setdefault("scope_prefix", "model" if info["mode"] == "step" else "")
    return info


def _arrays(value: Any) -> list[np.ndarray]:
    """Every tensor or array inside ``value`` (nested tuples, lists and dict values) as numpy, in order."""
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays(v)]
    return []


def _feeds(info: dict[str, Any], inputs: Any, path: str | os.PathLike[str]) -> list[np.ndarray]:
    """The input arrays of a run, cast to the file's dtypes and checked against its shapes."""
    specs = info["inputs"]
    arrays = _arrays(inputs)
    if len(arrays) != len(specs):
        raise ValueError(
            f"inputs hold {len(arrays)} tensors but {path} takes {len(specs)} "
            f"({', '.join(s['name'] for s in specs)}); pass the structure it was exported with"
        )
    arrays = [np.asarray(a).astype(s["dtype"], copy=False) for a, s in zip(arrays, specs, strict=True)]
    if info["mode"] == "unrolled":
        for a, s in zip(arrays, specs, strict=True):
            if list(a.shape) != s["shape"]:
                shape = f"inputs have shape {list(a.shape)}" if len(specs) == 1 else (
                    f"input {s['name']!r} has shape {list(a.shape)}"
                )
                raise ValueError(
                    f"{shape} but {path} was exported for {s['shape']}; re-export with an example of the "
                    "shape you run (every shape, T and B included, is baked in)"
                )
        return arrays
    axis = info["time_dim"]
    lengths = set()
    for a, s in zip(arrays, specs, strict=True):
        if a.ndim != len(s["shape"]) + 1 or list(np.delete(np.asarray(a.shape), axis)) != s["shape"]:
            raise ValueError(
                f"inputs have shape {list(a.shape)} but {path} takes {s['shape']} per time step, with time "
                f"on axis {axis} (B is baked in: re-export with the batch size you run)"
            )
        lengths.add(a.shape[axis])
    if len(lengths) != 1:
        raise ValueError(f"the inputs have different numbers of time steps {sorted(lengths)} on axis {axis}")
    return arrays


def _read_out(spec: dict[str, Any], steps: list[np.ndarray]) -> np.ndarray:
    kind = spec["readout"]
    if kind == "last":
        return steps[-1]
    if kind == "stack":
        return np.concatenate(steps, axis=spec["axis"])
    total = np.sum([s.astype(np.float64) for s in steps], axis=0)
    return (total / len(steps) if kind == "mean" else total).astype(steps[0].dtype)


def run_export(
    path: str | os.PathLike[str],
    inputs: Any,
    *,
    backend: str = "qonnx",
    spikes: bool = False,
    provider: str | Sequence[str] = "auto",
) -> dict[str, Any]:
    """Run an exported file on ``inputs``; step files are driven over time from zero state.

    Args:
        path: a file from :func:`export_qonnx` or :func:`export_onnxruntime`.
        inputs: the structure the model was exported with (a tensor or array, a tuple/list or a dict
            of them); every tensor of the exported shape (step files: with any number of steps along
            the exported ``time_dim``, and the exported B).
        backend: ``"qonnx"`` (runs QONNX and plain files with qonnx's semantics: qonnx custom ops by
            qonnx, standard ops by onnxruntime without graph optimizations; weight-only quantizer nodes
            are evaluated once and the rest runs as one onnxruntime session, any other graph goes
            through qonnx's ``execute_onnx`` node by node) or ``"onnxruntime"`` (plain files only,
            one optimized session).
        spikes: also return every spike tensor (the output of each ``Greater`` node).
        provider: the onnxruntime execution provider(s) (:func:`resolve_providers`): ``"auto"`` (CUDA when
            ``inputs`` hold CUDA tensors and onnxruntime has it, else the CPU), ``"cpu"``, ``"cuda"``, or
            onnxruntime provider names.

    Returns:
        ``{"outputs": {graph output name: array}}``, in the model's output order; step files apply each
        output's recorded readout over the steps (mean, sum, last step or stack along its time axis).
        ``"logits"`` repeats the output when the model returns one ``[B, classes]`` tensor. Step files
        add ``"states"`` (name → final membrane); ``spikes=True`` adds ``"spikes"``: graph tensor name →
        bool array ``[calls, ...]`` (calls = T for step files, one per step; 1 for unrolled files).
        ``"providers"``: the execution providers the onnxruntime session got, in order.

    Raises:
        FileNotFoundError / ValueError: no file, not an hq_ptq export, unknown backend, inputs of the
            wrong structure or shape, a QONNX file given to onnxruntime, or a provider onnxruntime does not
            have here.
    """
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in _tensors(inputs))
    return _run(path, inputs, backend, spikes, providers=resolve_providers(provider, on_cuda=on_cuda))[0]


def _tensors(value: Any) -> list[Any]:
    """Every leaf inside ``value`` (nested tuples, lists and dict values)."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return [value]


def _run(
    path: str | os.PathLike[str],
    inputs: Any,
    backend: str,
    spikes: bool,
    fold: bool = True,
    providers: Sequence[str] = (CPU_PROVIDER,),
    margins: bool = False,
) -> tuple[dict[str, Any], str]:
    """:func:`run_export` plus the executor that ran; ``fold=False`` forces qonnx's ``execute_onnx``;
    ``providers`` as :func:`resolve_providers` gives them; ``margins`` (with ``spikes``) adds
    ``"margins"``: spike tensor name → float32 ``a - b`` of its ``Greater(a, b)``, laid out as its spikes."""
    _check_backend(backend)
    info = _io_info(export_info(path))
    arrays = _feeds(info, inputs, path)
    names = [s["name"] for s in info["inputs"]]
    proto = onnx.load(str(path))
    spike_names: list[str] = []
    margin_names: dict[str, str] = {}
    if spikes:
        proto, spike_names, margin_names = _with_spike_outputs(proto, margins)
    runner = _Runner(proto, backend, fold, providers)
    result: dict[str, Any] = {}
    if info["mode"] == "unrolled":
        out = runner(dict(zip(names, arrays, strict=True)))
        result["outputs"] = {o["name"]: out[o["name"]] for o in info["outputs"]}
        if spikes:
            result["spikes"] = {n: out[n][None] for n in spike_names}
        if margins:
            result["margins"] = {n: out[m][None] for n, m in margin_names.items()}
    else:
        axis = info["time_dim"]
        states = {s["name"]: np.zeros(s["shape"], dtype=np.float32) for s in info["states"]}
        per_output: dict[str, list[np.ndarray]] = {o["name"]: [] for o in info["outputs"]}
        per_step: dict[str, list[np.ndarray]] = {n: [] for n in [*spike_names, *margin_names.values()]}
        for t in range(arrays[0].shape[axis]):
            feeds = {n: np.take(a, t, axis=axis) for n, a in zip(names, arrays, strict=True)}
            out = runner({**feeds, **states})
            states = {s["name"]: out[s["output"]] for s in info["states"]}
            for name, acc in per_output.items():
                acc.append(out[name])
            for n, acc in per_step.items():
                acc.append(out[n])
        result["outputs"] = {o["name"]: _read_out(o, per_output[o["name"]]) for o in info["outputs"]}
        result["states"] = states
        if spikes:
            result["spikes"] = {n: np.stack(per_step[n]) for n in spike_names}
        if margins:
            result["margins"] = {n: np.stack(per_step[m]) for n, m in margin_names.items()}
    if "logits" in info:
        result["logits"] = result["outputs"][info["logits"]]
    result["providers"] = runner.providers
    return result, runner.executor
