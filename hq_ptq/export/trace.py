"""Torch → QONNX graph: the checks on model and example, the structures of inputs and outputs, the
modules that are traced (:class:`_Flat`, :class:`_StepGraph`), step mode's stateful layers, time axis and
readout, the export metadata, and the TorchScript/dynamo trace through brevitas (cleaned by
:mod:`hq_ptq.export.passes`)."""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hq_ptq.errors import first_line
from hq_ptq.export.passes import _QUANT_OPS, _clean
from hq_ptq.model_io import call, describe, rebuild, tensors
from hq_ptq.snn import (
    MultiStepLeaky,
    explicit_membranes,
    is_spikingjelly_stateful,
    reset_states,
    spiking_neurons,
    spikingjelly_for_export,
    surrogate_disabled,
)
from hq_ptq.swap import layer_quant, quant_layers

log = logging.getLogger("hq_ptq.export")  # the package's one logger, as before the split

MODES = ("unrolled", "step")
READOUTS = ("mean", "sum", "last", "stack")  # how a step file's per-step outputs make the model's outputs
FORMAT_VERSION = 2

_MODEL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError)


# ---------------------------------------------------------------------------------------------
# checks


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown export mode {mode!r}; choose one of {', '.join(map(repr, MODES))}")


def _check_quantized(model: nn.Module, allow_float: bool) -> None:
    if not allow_float and not quant_layers(model):
        raise ValueError(
            "model has no hq_ptq-quantized layer; quantize it first (hq_ptq.quantize or hq_ptq.apply_plan) "
            "or pass allow_float=True to export it in float"
        )


def _prepare(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor detached and on ``device``, floats as float32; the structure kept."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to(device)
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _prepare(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_prepare(v, device) for v in value)
    return value


def _check_example(model: nn.Module, x: object, what: str = "example_input") -> Any:
    """``x`` ready to be passed through :func:`hq_ptq.model_io.call`: at least one non-empty tensor."""
    found = list(tensors(x))
    if not found:
        raise ValueError(
            f"{what} must be a tensor, or a tuple/list/dict holding tensors, that the model is called "
            f"with; got {describe(x)}"
        )
    empty = [t for t in found if 0 in t.shape]
    if empty:
        raise ValueError(f"{what} {describe(x)} holds an empty tensor {tuple(empty[0].shape)}")
    return _prepare(x, _device(model))


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _reset_hook(module: nn.Module, _args: object) -> None:
    reset_states(module)


@contextmanager
def _export_state(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics), no autograd, Heaviside spikes (SpikingJelly's too, and its
    LIF/IF step by step: :func:`hq_ptq.snn.spikingjelly_for_export`), and every call of ``model`` starting
    from reset neuron states; restores all of it, the neurons' states included."""
    training = {m: m.training for m in model.modules()}
    # init_hidden=True neurons keep their membranes in buffers between calls: a trace would bake a
    # previous call's membranes in as constants, and a reference forward would continue from them
    saved = [(m, dict(m._buffers)) for _, m in spiking_neurons(model)]
    memories = [(m, dict(vars(m)["_memories"])) for m in model.modules() if is_spikingjelly_stateful(m)]
    hook = model.register_forward_pre_hook(_reset_hook, prepend=True)
    model.eval()
    try:
        with torch.no_grad(), surrogate_disabled(model), spikingjelly_for_export(model):
            yield
    finally:
        hook.remove()
        for m, buffers in saved:
            m._buffers.update(buffers)
        for m, state in memories:
            vars(m)["_memories"].update(state)
        for m, flag in training.items():
            m.train(flag)


# ---------------------------------------------------------------------------------------------
# the structures of inputs and outputs


def _input_names(x: Any, suffix: str = "") -> list[str]:
    """Graph input names: ``x`` for one tensor, else ``x_<i>`` (``x_<key>`` for dict entries)."""
    if isinstance(x, torch.Tensor):
        return ["x" + suffix]
    names: list[str] = []

    def walk(value: Any, label: str) -> None:
        if isinstance(value, torch.Tensor):
            names.append(label)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{label}_{re.sub(r'[^0-9A-Za-z_]', '_', str(k))}")
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(v, f"{label}_{i}")

    walk(x, "x")
    if len(set(names)) != len(names):
        names = [f"x_{i}" for i in range(len(names))]
    return [n + suffix for n in names]


def _output_names(outputs: Sequence[torch.Tensor], suffix: str = "") -> list[str]:
    """``logits`` for one ``[B, classes]`` float tensor, ``output`` for another single tensor, else
    ``output_<i>``."""
    if len(outputs) == 1:
        one = outputs[0]
        return [("logits" if one.dim() == 2 and one.is_floating_point() else "output") + suffix]
    return [f"output_{i}{suffix}" for i in range(len(outputs))]


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    found = list(tensors(out))
    if not found:
        raise ValueError(f"the model returns no tensor ({describe(out)}); there is nothing to export")
    return found


def _tensor_info(name: str, t: torch.Tensor | np.ndarray) -> dict[str, Any]:
    dtype = str(t.dtype).removeprefix("torch.")
    return {"name": name, "shape": list(t.shape), "dtype": dtype}


# ---------------------------------------------------------------------------------------------
# the modules that are traced


class _Flat(nn.Module):
    """``(*tensors) -> tuple of output tensors`` around a model called with any input structure."""

    def __init__(self, model: nn.Module, template: Any) -> None:
        super().__init__()
        self.model = model
        self._template = template

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flat_outputs(call(self.model, rebuild(self._template, iter(flat)))))


class _StepGraph(nn.Module):
    """``(x_t…, mem_0 … mem_{k-1}) -> (out_t…, mem_0' … mem_{k-1}')`` around a model whose time loop
    runs in MultiStepLeaky layers.

    Calls the model on one-step slices (each input tensor unsqueezed at ``time_dim``) with each layer's
    ``initial_mem`` taken from the inputs; must run inside :func:`hq_ptq.snn.explicit_membranes` so
    ``final_mem`` is recorded.
    """

    def __init__(
        self, model: nn.Module, template: Any, time_dim: int, layers: Sequence[MultiStepLeaky]
    ) -> None:
        super().__init__()
        self.model = model
        self._template = template
        self._time_dim = time_dim
        self._layers = list(layers)  # a plain list: the layers are already registered under `model`
        self._inputs = len(list(tensors(template)))

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs, mems = args[: self._inputs], args[self._inputs:]
        for layer, mem in zip(self._layers, mems, strict=True):
            layer.initial_mem = mem
        steps = iter([x_t.unsqueeze(self._time_dim) for x_t in xs])
        out = _flat_outputs(call(self.model, rebuild(self._template, steps)))
        return (*out, *[layer.final_mem for layer in self._layers])


def _rejected(model: nn.Module, x: Any, err: BaseException) -> ValueError:
    channels = getattr(getattr(model, "config", None), "in_channels", None)
    if isinstance(channels, int) and isinstance(x, torch.Tensor) and x.dim() == 5 and x.shape[2] != channels:
        # a zoo model (time-first [T, B, C, H, W]): name the channel count it takes
        return ValueError(
            f"example_input has {x.shape[2]} channels (shape {tuple(x.shape)}) but the model takes "
            f"{channels}; pass [T, B, {channels}, H, W]"
        )
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors(x) if not t.is_floating_point()})
    kind = f" ({', '.join(dtypes)})" if dtypes else ""
    return ValueError(
        f"example_input {describe(x)}{kind} does not run through the model ({_one_line(err)}); pass what "
        "the model is called with (a tensor, or a tuple of its positional arguments)"
    )


def _probe(model: nn.Module, x: Any) -> tuple[Any, list[torch.Tensor]]:
    """The model's outputs on ``x`` and the tensors in them, with a one-line error when the model rejects
    ``x``."""
    try:
        out = call(model, x)
    except _MODEL_ERRORS as err:
        raise _rejected(model, x, err) from None
    return out, _flat_outputs(out)


# ---------------------------------------------------------------------------------------------
# step mode: the stateful layers, the time axis and the readout


def _time_steps(x: Any, time_dim: int) -> int:
    lengths = set()
    for t in tensors(x):
        if not -t.dim() <= time_dim < t.dim():
            raise ValueError(
                f"time_dim={time_dim} is not an axis of the input tensor {tuple(t.shape)}; give the axis "
                "that is time (mode='step' cuts every input tensor along it)"
            )
        lengths.add(int(t.shape[time_dim]))
    if len(lengths) != 1:
        raise ValueError(
            f"mode='step' cuts every input tensor along time_dim={time_dim}, but {describe(x)} has "
            f"lengths {sorted(lengths)} there; every input must have the same number of time steps"
        )
    return lengths.pop()


def _bare_neuron_error(model: nn.Module) -> ValueError | None:
    """Why ``model`` cannot be step-exported: an snnTorch neuron outside every MultiStepLeaky."""
    wrapped = {id(m.lif) for m in model.modules() if isinstance(m, MultiStepLeaky)}
    for name, m in model.named_modules():
        if is_spikingjelly_stateful(m):
            return ValueError(f"mode='step' exposes the state of MultiStepLeaky layers only, but {name!r} is "
                              f"SpikingJelly's {type(m).__name__}; use mode='unrolled'")
    for name, neuron in spiking_neurons(model):
        if id(neuron) not in wrapped:
            return ValueError(
                f"mode='step' needs the time loop inside hq_ptq.snn.MultiStepLeaky layers, but {name!r} is a "
                f"bare snn.{type(neuron).__name__} (driven by the model's own loop, its state would stay "
                "hidden); use mode='unrolled', or hq_ptq.to_multistep for nn.Sequential models"
            )
    return None


def _step_layers(
    model: nn.Module, x: Any, time_dim: int
) -> list[tuple[str, MultiStepLeaky, tuple[int, ...]]]:
    """The stateful layers of a step export, with their membrane shapes, in call order."""
    bare = _bare_neuron_error(model)
    if bare is not None:
        raise bare
    with explicit_membranes(model) as layers:
        order: list[str] = []
        hooks = [
            layer.register_forward_hook(lambda *_, n=name: order.append(n)) for name, layer in layers
        ]
        try:
            first = rebuild(x, iter([t.narrow(time_dim, 0, 1) for t in tensors(x)]))
            _probe(model, first)
        finally:
            for h in hooks:
                h.remove()
        by_name = dict(layers)
        twice = sorted({n for n in order if order.count(n) > 1})
        if twice:
            raise ValueError(
                f"mode='step' needs each MultiStepLeaky called once per forward, but {twice[0]!r} runs "
                f"{order.count(twice[0])} times; give each call its own layer or use mode='unrolled'"
            )
        out = [(n, by_name[n], tuple(by_name[n].final_mem.shape)) for n in order]
    if not out:
        raise ValueError(
            "mode='step' found no MultiStepLeaky in the model (no state to expose); use mode='unrolled'"
        )
    return out


def _drive_steps(
    step: _StepGraph, x: Any, time_dim: int, shapes: Sequence[Sequence[int]]
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """``step`` driven over every time step of ``x`` from zero membranes, in PyTorch:
    per output the list of per-step tensors, and the final membranes."""
    device = next(tensors(x)).device
    mems = [torch.zeros(tuple(s), device=device) for s in shapes]
    flat = list(tensors(x))
    per_output: list[list[torch.Tensor]] = []
    for t in range(flat[0].shape[time_dim]):
        out = step(*[v.select(time_dim, t) for v in flat], *mems)
        outs, mems = out[: len(out) - len(mems)], list(out[len(out) - len(mems):])
        if not per_output:
            per_output = [[] for _ in outs]
        for acc, o in zip(per_output, outs, strict=True):
            acc.append(o)
    return per_output, mems


def _readout_candidates(
    full: torch.Tensor, steps: list[torch.Tensor]
) -> dict[str, tuple[torch.Tensor, int | None]]:
    """What the per-step outputs give under each readout that fits their shapes (``stack``: with its axis)."""
    step_shape, n = tuple(steps[0].shape), len(steps)
    if tuple(full.shape) == step_shape:
        stacked = torch.stack([s.double() for s in steps])
        return {"mean": (stacked.mean(0), None), "sum": (stacked.sum(0), None), "last": (stacked[-1], None)}
    if full.dim() == len(step_shape):
        axes = [d for d in range(full.dim()) if full.shape[d] != step_shape[d]]
        if len(axes) == 1 and step_shape[axes[0]] == 1 and full.shape[axes[0]] == n:
            return {"stack": (torch.cat([s.double() for s in steps], axes[0]), axes[0])}
    return {}


def _readouts(
    names: Sequence[str], full: Sequence[torch.Tensor], per_step: Sequence[list[torch.Tensor]]
) -> list[dict[str, Any]]:
    """Per output, the readout that rebuilds the model's output from its per-step outputs, or raise."""
    out = []
    for name, ref, steps in zip(names, full, per_step, strict=True):
        found = _readout_candidates(ref, steps)
        if not ref.is_floating_point() and "mean" in found:
            del found["mean"]
        ref64 = ref.double()
        tol = 1e-5 + 1e-4 * float(ref64.abs().max())
        errors = {kind: float((value - ref64).abs().max()) for kind, (value, _) in found.items()}
        fits = [kind for kind in READOUTS if kind in errors and errors[kind] <= tol]
        if not fits:
            tried = ", ".join(f"{k} {e:.3g}" for k, e in errors.items()) or (
                f"per-step shape {tuple(steps[0].shape)} vs {tuple(ref.shape)} over {len(steps)} steps"
            )
            raise ValueError(
                f"mode='step' cannot rebuild output {name!r} {tuple(ref.shape)} from its per-step outputs: "
                f"it is not their {', '.join(READOUTS)} over time ({tried}); the readout mixes time steps "
                "(e.g. a max or a softmax over T): use mode='unrolled'"
            )
        if len(fits) > 1:
            log.warning("output %r: readouts %s all fit the example; recording %r (check with verify_export "
                        "on inputs with more activity)", name, fits, fits[0])
        entry: dict[str, Any] = {"readout": fits[0]}
        if fits[0] == "stack":
            entry["axis"] = found["stack"][1]
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# the traced graph and its metadata


def _build_qonnx(
    model: nn.Module, example_input: Any, mode: str, dynamo: bool, allow_float: bool, time_dim: int
) -> tuple[Any, dict[str, Any]]:
    """Trace ``model`` to a cleaned qonnx ``ModelWrapper`` plus the metadata dict."""
    _check_mode(mode)
    _check_quantized(model, allow_float)
    if mode == "step" and (bare := _bare_neuron_error(model)) is not None:
        raise bare  # before running anything: the model's own loop may not even take a one-step slice
    x = _check_example(model, example_input)
    meta: dict[str, Any] = {"format": "hq_ptq-export", "format_version": FORMAT_VERSION, "mode": mode}
    config = getattr(model, "hq_config", None)
    if isinstance(config, dict):
        meta["model"] = config
    meta["quant_layers"] = {
        name: list(layer_quant(layer)) for name, layer in quant_layers(model).items()
    }
    flat_in = list(tensors(x))
    with _export_state(model):
        out, ref = _probe(model, x)
        meta["input_structure"], meta["output_structure"] = describe(x), describe(out)
        if mode == "unrolled":
            in_names, out_names = _input_names(x), _output_names(ref)
            simple = isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
            module: nn.Module = model if simple else _Flat(model, x)
            meta.update(
                inputs=[_tensor_info(n, t) for n, t in zip(in_names, flat_in, strict=True)],
                outputs=[_tensor_info(n, t) for n, t in zip(out_names, ref, strict=True)],
                scope_prefix="" if simple else "model",
                readout="the graph outputs are the model's outputs",
            )
            _legacy_keys(meta, ref)
            return _trace(module, tuple(flat_in), in_names, out_names, dynamo, meta)
        steps = _time_steps(x, time_dim)
        if steps < 2:
            raise ValueError(
                f"mode='step' needs an example_input with at least 2 time steps along time_dim={time_dim} "
                f"(got {describe(x)}) to tell the model's readout over time apart"
            )
        layers = _step_layers(model, x, time_dim)
        in_names = _input_names(x, "_t")
        with explicit_membranes(model):
            module = _StepGraph(model, x, time_dim, [layer for _, layer, _ in layers])
            per_step, _ = _drive_steps(module, x, time_dim, [shape for _, _, shape in layers])
            out_names = _output_names(ref, "_t")
            readouts = _readouts(out_names, ref, per_step)
            mems = tuple(torch.zeros(shape, device=flat_in[0].device) for _, _, shape in layers)
            args = (*[t.select(time_dim, 0) for t in flat_in], *mems)
            states = [
                {"name": f"mem_{i}", "output": f"mem_{i}_next", "shape": list(shape), "neuron": name}
                for i, (name, _, shape) in enumerate(layers)
            ]
            meta.update(
                inputs=[_tensor_info(n, t) for n, t in zip(in_names, args, strict=False)],
                outputs=[
                    {**_tensor_info(n, s[0]), **r}
                    for n, s, r in zip(out_names, per_step, readouts, strict=True)
                ],
                time_dim=time_dim,
                states=states,
                scope_prefix="model",
                readout="; ".join(
                    f"{n}: {r['readout']}" + (f" along axis {r['axis']}" if "axis" in r else "")
                    for n, r in zip(out_names, readouts, strict=True)
                ) + " over time steps; states start at zero",
            )
            _legacy_keys(meta, ref)
            return _trace(
                module, args, in_names + [s["name"] for s in states],
                out_names + [s["output"] for s in states], dynamo, meta,
            )


def _legacy_keys(meta: dict[str, Any], ref: Sequence[torch.Tensor]) -> None:
    # format 1 keys, for runtimes written against them: the first input, and the logits when the model
    # returns one [B, classes] tensor
    meta["input"], meta["input_shape"] = meta["inputs"][0]["name"], meta["inputs"][0]["shape"]
    if len(ref) == 1 and ref[0].dim() == 2 and ref[0].is_floating_point():
        meta["logits"], meta["num_classes"] = meta["outputs"][0]["name"], int(ref[0].shape[1])


def _trace(module: nn.Module, *args: Any) -> tuple[Any, dict[str, Any]]:
    """:func:`_trace_graph`, with a failure inside a model with SpikingJelly neurons named as such: their
    kernels (custom ops, TorchScript loops, Python surrogates) often have no ONNX form, and the exporter's
    own message (a missing graph input, an unknown operator) does not say so."""
    try:
        return _trace_graph(module, *args)
    except Exception as err:
        foreign = [n.removeprefix("model.") for n, m in module.named_modules() if is_spikingjelly_stateful(m)]
        if not foreign:
            raise
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"the ONNX export failed in a model with SpikingJelly neurons ({shown}): {first_line(err)}; "
            "hq_ptq exports snnTorch neurons and SpikingJelly's own neurons (clock_driven MultiStep*Node, "
            "activation_based *Node) on the 'torch' backend"
        ) from err


def _trace_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    dynamo: bool,
    meta: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    from brevitas.export import export_qonnx as brevitas_export_qonnx
    from qonnx.core.modelwrapper import ModelWrapper

    with tempfile.TemporaryDirectory(prefix="hq_ptq_export_") as tmp:
        raw = Path(tmp) / "raw.onnx"
        start = time.perf_counter()
        brevitas_export_qonnx(
            module, args, export_path=str(raw), dynamo=dynamo, input_names=inputs, output_names=outputs
        )
        log.info("traced %s graph in %.2fs (dynamo=%s)", meta["mode"], time.perf_counter() - start, dynamo)
        # no initializer ValueInfo fix-up (quadratic, ~3 s per trace): _clean re-infers every ValueInfo
        qmodel = ModelWrapper(str(raw), fix_missing_initializer_valueinfo=False)
    names = [i.name for i in qmodel.graph.input]
    missing = [n for n in inputs if n not in names]
    if missing:  # the exporter drops an input the outputs do not depend on
        raise ValueError(
            f"the model's outputs do not depend on input {missing[0]!r} (the exporter dropped it); leave it "
            "out of example_input, or bake it into the model"
        )
    return _clean(qmodel, _QUANT_OPS), meta
