"""Energy model: exact MAC and synaptic-op counts on a hand-made model, input kinds, the formulas."""

from __future__ import annotations

import ast
import inspect
import math

import pytest
import torch
from torch import nn

from hq_ptq import energy as energy_mod
from hq_ptq.energy import (
    HOROWITZ_45NM,
    EnergyConstants,
    LayerActivity,
    estimate_energy,
    measure_activity,
)
from hq_ptq.plan import LayerChoice, Plan
from hq_ptq.swap import swap_layers

T, B = 3, 2


class Tiny(nn.Module):
    """Input ``[T, B, 2, 4, 4]``. Every layer's input is known in closed form:

    * ``conv`` reads the model input itself (3x3, padding 1, 2 -> 3 channels);
    * ``fc`` reads spikes ``s`` = channel 0 of the input, thresholded (16 values);
    * ``fc2`` reads ``s + s`` (values 0 and 2: a hidden count layer);
    * ``gconv`` reads ``s`` as ``[T*B, 4, 4]`` (grouped Conv1d, k=3, no padding);
    * ``head`` reads the time mean of ``fc``'s real-valued output, once per inference.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 6)
        self.fc2 = nn.Linear(16, 6)
        self.gconv = nn.Conv1d(4, 4, 3, groups=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        xf = x.flatten(0, 1)
        y = self.conv(xf)
        s = (xf[:, 0] > 0).float().flatten(1)
        z = self.fc(s)
        c = self.fc2(s + s)
        g = self.gconv(s.reshape(-1, 4, 4))
        feat = (z + c).reshape(t, b, -1).mean(0) + 1e-3 * (y.mean() + g.mean())
        return self.head(feat)


def _spikes(scale: float = 1.0) -> torch.Tensor:
    # channel 0, rows 0-1 on: 8 of the 32 input values per item (rate 0.25); channel 0 is half on
    x = torch.zeros(T, B, 2, 4, 4)
    x[:, :, 0, :2, :] = 1.0
    return x * scale


def _model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


# dense MACs per inference (per sample, all T steps), from the shapes
CONV_MACS = T * (3 * 4 * 4) * 2 * 9
FC_MACS = T * 6 * 16
GCONV_MACS = T * (4 * 2) * (4 // 2) * 3
HEAD_MACS = 3 * 6  # runs once per inference


def _batches(n: int = 2, scale: float = 1.0):
    return [(_spikes(scale), torch.zeros(B, dtype=torch.long)) for _ in range(n)]


def test_exact_macs_rates_and_kinds():
    act = measure_activity(_model(), _batches(2))
    assert list(act) == ["conv", "fc", "fc2", "gconv", "head"]
    conv, fc, fc2, gconv, head = (act[n] for n in act)
    assert (conv.macs, fc.macs, fc2.macs, gconv.macs, head.macs) == (
        CONV_MACS, FC_MACS, FC_MACS, GCONV_MACS, HEAD_MACS)
    assert conv.macs_per_step == CONV_MACS / T
    assert [a.steps for a in act.values()] == [T, T, T, T, 1]
    assert all(a.samples == 2 * B and a.calls == 2 and a.time_steps == T for a in act.values())
    assert [a.params for a in act.values()] == [2 * 3 * 9, 16 * 6, 16 * 6, 4 * 2 * 3, 6 * 3]

    assert conv.binary and conv.model_input and conv.kind == "spike"
    assert conv.rate == 0.25 and conv.ops == 0.25 * CONV_MACS
    assert fc.binary and not fc.model_input and fc.kind == "spike"
    assert fc.rate == 0.5 and fc.ops == 0.5 * FC_MACS
    assert not fc2.binary and fc2.integer and fc2.kind == "count"
    assert fc2.rate == 0.5 and fc2.mean_abs == 1.0 and fc2.ops == 1.0 * FC_MACS
    assert gconv.kind == "spike" and gconv.ops == 0.5 * GCONV_MACS
    assert not head.binary and not head.integer and head.kind == "mac" and head.ops == HEAD_MACS


def test_event_counts_at_the_input_make_a_mac_layer():
    act = measure_activity(_model(), _batches(1, scale=3.0))
    conv = act["conv"]
    assert conv.integer and not conv.binary and conv.model_input
    assert conv.kind == "mac" and conv.ops == CONV_MACS  # dense: every MAC is a float multiply
    assert conv.mean_abs == 0.75 and conv.rate == 0.25
    assert act["fc"].kind == "spike"  # thresholded, still binary


def test_measure_restores_mode_removes_hooks_and_caps_batches():
    model = _model().train()
    act = measure_activity(model, _batches(5), max_batches=2)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    assert act["fc"].samples == 2 * B and act["fc"].calls == 2


def test_quantized_model_counts_match_float_and_carry_bits():
    float_act = measure_activity(_model(), _batches(1))
    q = _model()
    swap_layers(q, scheme="pot", bits=4)
    q_act = measure_activity(q, _batches(1))
    for name, a in float_act.items():
        b = q_act[name]
        assert (b.macs, b.steps, b.binary, b.integer, b.model_input) == (
            a.macs, a.steps, a.binary, a.integer, a.model_input)
        assert a.bits is None and (b.scheme, b.bits) == ("pot", 4)
        # quantized weights change the real-valued head input, never the spike inputs
        if a.kind != "mac":
            assert b.rate == a.rate and b.mean_abs == a.mean_abs
    rep = estimate_energy(q_act)  # bits read back from the layers
    assert [e.bits for e in rep.layers] == [4] * 5


def test_non_temporal_model():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.zeros(5, 8)
    x[:, :2] = 1.0
    act = measure_activity(model, [(x, torch.zeros(5))], time_first=False)
    first = act["0"]
    assert first.time_steps == 1 and first.steps == 1 and first.macs == 4 * 8
    assert first.kind == "spike" and first.rate == 0.25


def test_a_transposed_conv_counts_one_kernel_per_input_element():
    # each input element is scattered through one 3x3 kernel into 5 output channels: 2*4*4 * 5*9 MACs per
    # sample (the output's 8x8 grid would give out.numel() * C_in * 9, four times too many at stride 2)
    model = nn.Sequential(nn.ConvTranspose2d(2, 5, 3, stride=2, padding=1, output_padding=1))
    x = torch.ones(3, 2, 4, 4)
    act = measure_activity(model, [(x, torch.zeros(3))], time_first=False)
    assert act["0"].macs == 2 * 4 * 4 * 5 * 9


def test_int_add_is_the_line_through_horowitz_points():
    c = HOROWITZ_45NM
    assert c.int_add(8) == pytest.approx(0.03) and c.int_add(32) == pytest.approx(0.1)
    assert c.int_add(4) == pytest.approx(0.03 + (4 - 8) * 0.07 / 24)
    assert c.int_add(20) == pytest.approx((0.03 + 0.1) / 2)
    assert all(c.int_add(b) < c.int_add(b + 1) for b in range(1, 32))
    assert c.sram_read_bit == 5.0 / 32 and c.weight_read(4) == 4 * 5.0 / 32
    with pytest.raises(ValueError, match="bits"):
        c.int_add(0)
    with pytest.raises(ValueError, match="fp32_add"):
        EnergyConstants(fp32_add=-1.0)


def _expected(act: dict[str, LayerActivity], bits: dict[str, int], c: EnergyConstants) -> tuple[float, float]:
    fp = q = 0.0
    for name, a in act.items():
        reads = a.params * a.steps
        b = bits[name]
        if a.kind == "mac":
            fp += a.macs * c.fp32_mac + reads * 32 * c.sram_read_32 / 32
            q += a.macs * c.fp32_mac + reads * b * c.sram_read_32 / 32
        else:
            add_b = c.int_add_8 + (b - 8) * (c.int_add_32 - c.int_add_8) / 24
            fp += a.ops * c.fp32_add + reads * 32 * c.sram_read_32 / 32
            q += a.ops * add_b + reads * b * c.sram_read_32 / 32
    return fp, q


def test_four_bit_plan_is_cheaper_and_ratio_follows_the_formula():
    act = measure_activity(_model(), _batches(2))
    bits = {n: 4 for n in act}
    rep = estimate_energy(act, bits)
    fp, q = _expected(act, bits, HOROWITZ_45NM)
    assert rep.fp32_pj == pytest.approx(fp, rel=1e-12)
    assert rep.quant_pj == pytest.approx(q, rel=1e-12)
    assert rep.quant_pj < rep.fp32_pj
    assert rep.ratio == pytest.approx(fp / q, rel=1e-12)
    # a spike layer by hand: 0.5 * 288 accumulates, 96 weights read T times
    fc = next(e for e in rep.layers if e.name == "fc")
    assert fc.fp32_compute_pj == pytest.approx(0.5 * FC_MACS * 0.9)
    assert fc.quant_memory_pj == pytest.approx(96 * T * 4 * 5.0 / 32)
    # the MAC head keeps its float multiply: only its weight read shrinks
    head = next(e for e in rep.layers if e.name == "head")
    assert head.quant_compute_pj == head.fp32_compute_pj == pytest.approx(HEAD_MACS * 4.6)
    # fewer bits never cost more
    assert estimate_energy(act, {n: 2 for n in act}).quant_pj < rep.quant_pj < estimate_energy(
        act, {n: 8 for n in act}).quant_pj


def test_plan_and_partial_plans():
    act = measure_activity(_model(), _batches(1))
    plan = Plan(tuple(LayerChoice(n, "uniform", 3, a.params, 0.0) for n, a in act.items()))
    by_plan = estimate_energy(act, plan)
    by_dict = estimate_energy(act, {n: 3 for n in act})
    assert by_plan.totals() == by_dict.totals()
    assert {e.scheme for e in by_plan.layers} == {"uniform"}
    # a layer the plan leaves out is costed as FP32
    partial = estimate_energy(act, {"fc": 3})
    other = next(e for e in partial.layers if e.name == "conv")
    assert other.bits is None and other.quant_pj == other.fp32_pj
    d = by_plan.to_dict()
    assert d["totals"]["ratio"] == by_plan.ratio and len(d["layers"]) == 5
    assert d["constants"]["fp32_mac"] == 4.6


def test_bad_inputs_raise_readable_errors():
    act = measure_activity(_model(), _batches(1))
    with pytest.raises(ValueError, match="no measured activity: nope"):
        estimate_energy(act, {"nope": 4})
    with pytest.raises(ValueError, match="'fc': bits"):
        estimate_energy(act, {"fc": 0})
    with pytest.raises(ValueError, match="'fc': bits"):
        estimate_energy(act, {"fc": 3.5})
    with pytest.raises(ValueError, match="no bit widths"):
        estimate_energy(act, None)  # float model, nothing to read back
    with pytest.raises(ValueError, match="empty"):
        estimate_energy({}, {})
    with pytest.raises(ValueError, match="max_batches"):
        measure_activity(_model(), _batches(1), max_batches=0)
    with pytest.raises(ValueError, match="yielded nothing"):
        measure_activity(_model(), [])
    with pytest.raises(ValueError, match="time-first"):
        measure_activity(_model(), [(_spikes(), torch.zeros(5))])


def test_constants_live_in_one_place():
    # the pJ values appear as literals only inside EnergyConstants ...
    tree = ast.parse(inspect.getsource(energy_mod))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EnergyConstants")
    inside = {id(n) for n in ast.walk(cls)}
    pj = {0.03, 0.1, 0.9, 4.6, 5.0}
    stray = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in pj
             and isinstance(n.value, float) and id(n) not in inside]
    assert stray == []
    # ... and estimate_energy reads nothing else: scaling every constant scales every energy
    act = measure_activity(_model(), _batches(1))
    base = estimate_energy(act, {n: 4 for n in act})
    doubled = EnergyConstants(**{k: 2 * v for k, v in vars(HOROWITZ_45NM).items()})
    rep = estimate_energy(act, {n: 4 for n in act}, constants=doubled)
    assert rep.fp32_pj == pytest.approx(2 * base.fp32_pj) and rep.quant_pj == pytest.approx(2 * base.quant_pj)
    assert math.isclose(rep.ratio, base.ratio)


# ---------------------------------------------------------------------------------------------
# operation counts (NeuroBench's names) and memory: the counts the pJ are made of
# ---------------------------------------------------------------------------------------------
def _add(bits: int) -> float:
    return 0.03 + (bits - 8) * (0.1 - 0.03) / 24


def test_spike_layer_counts_accumulates_at_its_rate():
    act = measure_activity(_model(), _batches(2))
    rep = estimate_energy(act, Plan(tuple(LayerChoice(n, "pot", 4, a.params, 0.0) for n, a in act.items())))
    fc = next(e for e in rep.layers if e.name == "fc")
    # exact binary spikes, half of the 16 inputs on: ACs = rate x dense MACs, in both columns, any scheme
    for ops in (fc.fp32_ops, fc.quant_ops):
        assert ops == energy_mod.LayerOps(dense_macs=FC_MACS, effective_acs=0.5 * FC_MACS,
                                          effective_macs=0.0, shifts=0.0)
        assert ops.synops == 0.5 * FC_MACS
    # the real-valued head: dense float MACs in FP32, one shift-and-add per dense MAC with PoT weights
    head = next(e for e in rep.layers if e.name == "head")
    assert head.fp32_ops == energy_mod.LayerOps(HEAD_MACS, 0.0, HEAD_MACS, 0.0)
    assert head.quant_ops == energy_mod.LayerOps(HEAD_MACS, 0.0, 0.0, HEAD_MACS)
    # NeuroBench's own classification, by input alone: s+s (0/2) is a MAC layer there, skipping zeros
    assert act["fc"].neurobench_spiking and not act["fc2"].neurobench_spiking
    nb = rep.operations()["neurobench"]
    assert nb["Effective_ACs"] == pytest.approx(0.25 * CONV_MACS + 0.5 * FC_MACS + 0.5 * GCONV_MACS)
    assert nb["Effective_MACs"] == pytest.approx(0.5 * FC_MACS + act["head"].rate * HEAD_MACS)


def test_count_layer_takes_the_cheaper_pot_datapath():
    act = measure_activity(_model(), _batches(1))
    fc2 = act["fc2"]  # values 0 and 2, rate 0.5, mean|x| 1.0
    assert energy_mod.layer_ops(fc2, "uniform", 4) == energy_mod.LayerOps(FC_MACS, FC_MACS, 0.0, 0.0)
    assert energy_mod.layer_ops(fc2, "pot", 4, EnergyConstants(barrel_shift_per_add=2.0)).shifts == 0.0
    cheap = EnergyConstants(barrel_shift_per_add=0.5)
    ops = energy_mod.layer_ops(fc2, "pot", 4, cheap)
    assert ops == energy_mod.LayerOps(FC_MACS, 0.0, 0.0, 0.5 * FC_MACS)
    assert energy_mod.layer_cost(fc2, "pot", 4, cheap)[0] == pytest.approx(0.5 * FC_MACS * 1.5 * _add(4))


class LifNet(nn.Module):
    """Input ``[T, B, 2, 4, 4]`` real-valued. Membranes per sample: ``lif1`` 3x4x4 = 48 (multi-step),
    ``lif2`` 5 (multi-step), ``step`` 5 (a step-wise snn.Leaky called T times on the same state)."""

    def __init__(self) -> None:
        super().__init__()
        import snntorch as snn

        from hq_ptq.snn import MultiStepLeaky

        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.lif1 = MultiStepLeaky(beta=0.5, threshold=0.1)
        self.fc = nn.Linear(48, 5)
        self.lif2 = MultiStepLeaky(beta=0.5, threshold=0.1)
        self.step = snn.Leaky(beta=0.5, threshold=0.1, init_hidden=False)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        s = self.lif1(self.conv(x.flatten(0, 1)).reshape(t, b, 48))
        s = self.lif2(self.fc(s.flatten(0, 1)).reshape(t, b, 5))
        mem, outs = torch.zeros(b, 5), []
        for s_t in s.unbind(0):
            spk, mem = self.step(s_t, mem)
            outs.append(spk)
        return self.head(torch.stack(outs).mean(0))


def _lif_batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(T, B, 2, 4, 4, generator=g), torch.zeros(B, dtype=torch.long))]


class SecondOrderNet(nn.Module):
    """Step-wise snnTorch neurons with more state than a membrane: Synaptic (syn + mem) on 6 features, and an
    SLSTM whose state has its hidden size (4), not its input size (6)."""

    def __init__(self):
        import snntorch as snn

        super().__init__()
        self.fc = nn.Linear(2 * 4 * 4, 6)
        self.syn = snn.Synaptic(alpha=0.8, beta=0.7, init_hidden=True)
        self.lstm = snn.SLSTM(6, 4, init_hidden=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.lstm(self.syn(self.fc(x_t.flatten(1)))) for x_t in x.unbind(0)]
        return self.head(torch.stack(outs).mean(0))


def test_neuron_state_counts_every_state_variable_at_the_state_shape():
    torch.manual_seed(0)
    act = measure_activity(SecondOrderNet(), _lif_batches())
    assert act.neurons == {"syn": 2 * 6, "lstm": 2 * 4}


def test_real_first_layer_macs_or_shifts_and_neuron_state():
    torch.manual_seed(0)
    act = measure_activity(LifNet(), _lif_batches())
    conv_macs = T * 48 * 2 * 9
    conv = act["conv"]
    assert conv.kind == "mac" and conv.rate == 1.0 and conv.macs == conv_macs
    # membranes: one per-step tensor per sample; the Leaky inside a MultiStepLeaky is not a second neuron
    assert act.neurons == {"lif1": 48, "lif2": 5, "step": 5}
    layers = ("conv", "fc", "head")
    def plan(scheme: str) -> Plan:
        return Plan(tuple(LayerChoice(n, scheme, 4, act[n].params, 0.0) for n in layers))

    uniform = estimate_energy(act, plan("uniform"))
    pot = estimate_energy(act, plan("pot"), membrane_bits=16)
    u, p = (next(e for e in r.layers if e.name == "conv") for r in (uniform, pot))
    assert u.quant_ops == energy_mod.LayerOps(conv_macs, 0.0, conv_macs, 0.0)  # MACs = dense MACs
    assert p.quant_ops == energy_mod.LayerOps(conv_macs, 0.0, 0.0, conv_macs)  # shifts = dense MACs
    assert p.quant_compute_pj == pytest.approx(conv_macs * (0.03 + 0.9))
    assert u.quant_compute_pj == u.fp32_compute_pj == pytest.approx(conv_macs * 4.6)
    # memory: weights at 32 bits against 4, neuron state at 32 bits against membrane_bits
    ops = pot.operations()
    params = sum(act[n].params for n in layers)
    assert ops["weight_memory_bits"] == {"fp32": 32 * params, "quantized": 4 * params}
    state = ops["neuron_state_memory_bits"]
    assert (state["elements"], state["fp32_bits"], state["quant_bits"]) == (58, 58 * 32, 58 * 16)
    assert uniform.operations()["neuron_state_memory_bits"]["quant_bits"] == 58 * 32
    # a hand-built activity dict has no neuron count; an explicit one can be passed
    plain = dict(act)
    assert estimate_energy(plain, {"conv": 4}).operations()["neuron_state_memory_bits"] is None
    given = estimate_energy(plain, {"conv": 4}, neurons={"x": 10}).operations()["neuron_state_memory_bits"]
    assert given["quant_bits"] == 320
    with pytest.raises(ValueError, match="membrane_bits"):
        estimate_energy(act, {"conv": 4}, membrane_bits=0)


def _mixed_plan(act) -> Plan:
    schemes = {"conv": ("uniform", 8), "fc": ("pot", 3), "fc2": ("pot", 4), "gconv": ("uniform", 2)}
    return Plan(tuple(LayerChoice(n, *schemes[n], act[n].params, 0.0) for n in schemes))  # head left float


def test_totals_are_the_sum_over_layers_and_pj_are_counts_times_constants():
    act = measure_activity(_model(), _batches(2, scale=3.0))  # conv: event counts, a MAC layer
    cheap = EnergyConstants(barrel_shift_per_add=0.5)
    rep = estimate_energy(act, _mixed_plan(act), cheap)
    ops = rep.operations()
    for column, attr in (("fp32", "fp32_ops"), ("quantized", "quant_ops")):
        for key, field in (("Effective_ACs", "effective_acs"), ("Effective_MACs", "effective_macs"),
                           ("shifts", "shifts")):
            by_layer = [getattr(getattr(e, attr), field) for e in rep.layers]
            assert ops[column][key] == pytest.approx(sum(by_layer))
    assert ops["Dense"] == CONV_MACS + 2 * FC_MACS + GCONV_MACS + HEAD_MACS
    assert ops["quantized"]["shifts"] == pytest.approx(0.5 * FC_MACS)  # fc2: 0/2 counts, cheap shift
    bits = {"conv": 8, "fc": 3, "fc2": 4, "gconv": 2, "head": 32}
    assert ops["weight_memory_bits"]["quantized"] == sum(act[n].params * b for n, b in bits.items())
    assert ops["weight_memory_bits"]["fp32"] == 32 * sum(a.params for a in act.values())
    # every layer's pJ are its counts times the per-operation energies, written out here by hand
    for e in rep.layers:
        fp, q = e.fp32_ops, e.quant_ops
        assert e.fp32_compute_pj == pytest.approx(fp.effective_acs * 0.9 + fp.effective_macs * 4.6)
        b = bits[e.name]
        shift = 0.03 + 0.9 if e.kind == "mac" else 1.5 * _add(b)
        ac = 0.9 if e.bits is None else _add(b)
        assert e.quant_compute_pj == pytest.approx(q.effective_acs * ac + q.shifts * shift
                                                   + q.effective_macs * 4.6)
        assert e.quant_memory_pj == pytest.approx(e.weight_reads * b * 5.0 / 32)
        assert fp.dense_macs == q.dense_macs == e.macs
    # the report's JSON keeps every earlier key and adds the operations
    d = rep.to_dict()
    assert {"unit", "time_steps", "totals", "constants", "conventions", "layers"} < set(d)
    assert d["operations"] == ops and d["totals"] == rep.totals()
    assert d["layers"][0]["quant_ops"]["effective_macs"] == CONV_MACS
    assert d["layers"][0]["quant_weight_bits"] == 8 * act["conv"].params
