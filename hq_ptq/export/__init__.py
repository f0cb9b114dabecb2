"""Export quantized spiking models to QONNX and to onnxruntime-runnable ONNX, and check the files.

The QONNX file is inside the QONNX spec: every quantized weight is an integer code tensor behind a
``Quant`` node (signed, narrow range, scale 1) followed by a constant per-output-channel ``Mul`` by its
scale. Uniform b-bit layers are INTb codes; power-of-two layers the exact codes ``0, ±2^j`` in the
smallest narrow container that holds them (2-bit ternary INT2, 3-bit INT4, 4-bit INT8, 5-bit INT16,
6-bit INT32), marked by ``metadata_props`` on the node (``hq_ptq.weight_kind``, ``hq_ptq.pot_exponents``).
``pot_as="float"`` keeps Brevitas' ``FloatQuant`` with 0 mantissa bits for PoT (exact, but outside the
spec). :func:`check_qonnx_spec` checks a file with qonnx's own cleanup and datatype inference.
Spiking neurons become plain ONNX ops (the Heaviside spike is ``Greater`` + ``Cast``, the reset
``Sub``/``Mul``); surrogates are switched off while tracing. The onnxruntime file is the same graph with
the weight ``Quant`` nodes rewritten to QuantizeLinear → Clip → DequantizeLinear (QCDQ) with the
per-channel scale, and weights wider than 8 bits (or ``FloatQuant``) folded to float constants.

The model is exported as it is called (see :mod:`hq_ptq.model_io`): ``example_input`` is whatever the
model takes, a tensor of any rank and layout (``[T, B, C, H, W]``, a static ``[B, C, H, W]`` image for a
model that loops over time itself, a ``[B, L, F]`` sequence), a tuple/list of positional arguments or a
dict of keyword arguments; each tensor in it becomes a graph input (other values are baked into the
graph as constants). The outputs may be one tensor of any rank or any nesting of tuples/lists/dicts of
tensors (a snnTorch ``(spk_rec, mem_rec)`` pair): each tensor becomes a graph output, in order.

snnTorch neurons built with ``init_hidden=True`` keep their membranes between calls: every forward the
exporter runs (probe, trace, reference) starts from states reset with
:func:`hq_ptq.snn.reset_states`, the graph starts from zero membranes, and the neurons' states are put
back as they were afterwards.

Two graph layouts (``mode``):

* ``"unrolled"``: the whole forward in one graph, every input and output shape baked in (the initial
  membranes are zeros of the traced batch shape), so export with the shapes you will run. Works for
  any model, including ones that loop over time themselves around plain ``snn.Leaky`` neurons.
* ``"step"``: one time step per call, ``x_t, mem_0 … mem_{k-1} -> out_t, mem_0_next …`` with every
  neuron's membrane as an explicit input/output. Needs the time loop inside
  :class:`hq_ptq.snn.MultiStepLeaky` layers (the zoo, models converted with
  :func:`hq_ptq.snn.to_multistep`); ``time_dim`` names the input axis that is time (each input tensor
  is cut along it and the model is called on one-step slices). A model whose neurons are plain
  ``snn.Leaky`` driven by its own loop is refused before anything is written: its state lives in the
  loop, which one graph call cannot run a step of. How the per-step outputs make the model's outputs
  (its readout) is measured on the example before export, by driving the model step by step in PyTorch,
  and recorded per output: ``"mean"`` over steps (the zoo's ``head(s).mean(0)``), ``"sum"``, ``"last"``
  (the last step's output) or ``"stack"`` (per-step outputs concatenated along a time axis, e.g. a
  ``[T, B, C]`` spike record). Any other readout (a max over time, a softmax of the mean, ops that mix
  time steps) is refused with the measured error. B is baked in; T is free.

Every file carries ``metadata_props["hq_ptq"]``, a JSON object (read it with :func:`export_info`):
mode, input/output names, shapes and dtypes, the state list (``name``, ``output``, ``shape``,
``neuron``) and per-output readouts. :func:`run_export` drives either layout with qonnx or onnxruntime, and
:func:`verify_export` compares a file against the PyTorch model on fresh inputs: every output, and the
spikes of every neuron whose graph nodes it can pair with the neuron's calls. The qonnx backend keeps
qonnx's semantics (its custom ops computed by qonnx, standard ops by onnxruntime, op by op) but, for
weight-only quantizer nodes like these files hold, computes the quantized weights once and runs the rest
as one onnxruntime session; other graphs go through qonnx's node-by-node ``execute_onnx``. Both take a
``provider`` (:func:`resolve_providers`): by default onnxruntime's ``CUDAExecutionProvider`` when the model
verified (or the inputs run) is on CUDA and onnxruntime has that provider, else the CPU; asking for a provider
onnxruntime does not have is a one-line error naming the ones it has.

Layout (one-way imports, ``verify`` → ``runtime`` → ``write`` → ``trace`` → ``passes``):

* :mod:`hq_ptq.export.trace`: torch → QONNX graph: checks, input/output structures, the traced modules,
  step mode (stateful layers, time axis, readouts), the metadata, the brevitas trace.
* :mod:`hq_ptq.export.passes`: graph passes: constant folding, shape inference, cleanup, weights as
  integer codes behind ``Quant``, the QCDQ (onnxruntime) conversion, constant compaction.
* :mod:`hq_ptq.export.write`: :func:`export_qonnx`, :func:`export_onnxruntime` (trace, convert, save) and
  :func:`export_info` (read the metadata back).
* :mod:`hq_ptq.export.runtime`: running files with qonnx or onnxruntime, :func:`run_export`, the
  execution providers (:func:`resolve_providers`).
* :mod:`hq_ptq.export.verify`: the PyTorch reference, spike pairing, :func:`check_qonnx_spec`,
  :func:`verify_export`.
"""

from hq_ptq.export.runtime import BACKENDS, resolve_providers, run_export
from hq_ptq.export.trace import MODES, READOUTS
from hq_ptq.export.verify import check_qonnx_spec, verify_export
from hq_ptq.export.write import export_info, export_onnxruntime, export_qonnx

__all__ = [
    "BACKENDS",
    "MODES",
    "READOUTS",
    "check_qonnx_spec",
    "export_info",
    "export_onnxruntime",
    "export_qonnx",
    "resolve_providers",
    "run_export",
    "verify_export",
]
