"""A fused multi-step LIF: the whole time loop of ``snn.Leaky`` in one autograd node.

``snntorch.Leaky`` called per time step records about ten autograd nodes per step and keeps their
intermediates for backward. :class:`FusedLIF` runs the time loop without recording anything and keeps
only the membrane trace and the spikes (both ``[T, ...]``, both its outputs); its backward is a
hand-written reverse-time loop. Both loops work in place on preallocated buffers, one step at a time.

Same maths as ``snn.Leaky`` (``init_hidden=False``, ``reset_delay=True``, no ``state_quant``, no
``inhibition``), step by step::

    r_t   = H(mem_{t-1} - thr)                   (detached reset; r_0 from the initial membrane)
    mem_t = beta * (1 - r_t) * mem_{t-1} + x_t   ("zero")
          = beta * mem_{t-1} + x_t - r_t * thr   ("subtract")
          = beta * mem_{t-1} + x_t               ("none")
    spk_t = H(mem_t - thr) * gain

Surrogate derivatives are snnTorch's own: for atan and fast_sigmoid the expressions of
``ATan/FastSigmoid.backward`` in the same operation order (their closures' alpha/slope are read), for the
other known surrogates their backward is called under autograd on the pre-activation ``mem - thr``.

Double backward (Hutchinson Hessian-vector products): inside a ``create_graph=True`` backward the
gradient is written with whole-``[T, ...]`` differentiable ops plus one linear recurrence over time
(``_DecayScan``, whose backward is the transposed recurrence, so it is differentiable to any order);
autograd records about a dozen nodes per layer instead of a dozen per time step. The membrane trace it
reads is this node's own output, so the second derivative goes through the surrogate's derivative and
back into ``FusedLIF.backward``, as it goes through the per-step graph of ``snn.Leaky``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from snntorch import surrogate

__all__ = ["RESET_NONE", "RESET_SUBTRACT", "RESET_ZERO", "FusedLIF", "fused_lif", "heaviside_surrogate"]

RESET_SUBTRACT, RESET_ZERO, RESET_NONE = 0, 1, 2  # snnTorch's SpikingNeuron.reset_dict codes

SpikeFn = Callable[[torch.Tensor], torch.Tensor]

# snnTorch surrogates whose forward is exactly (u > 0).float() and whose backward is deterministic and
# elementwise, recognised by the code object of the closure their factory returns (shared by every
# instance, whatever its slope/alpha). LSO (wraps the stochastic operator) and SSO (random backward)
# are left out on purpose: a single vectorised call would not reproduce their per-step draws.
_HEAVISIDE_FACTORIES = (
    surrogate.atan,
    surrogate.fast_sigmoid,
    surrogate.sigmoid,
    surrogate.spike_rate_escape,
    surrogate.SFS,
    surrogate.triangular,
    surrogate.straight_through_estimator,
    surrogate.heaviside,
)
_HEAVISIDE_CODES = frozenset(factory().__code__ for factory in _HEAVISIDE_FACTORIES)
_ATAN_CODE = surrogate.atan().__code__
_FAST_SIGMOID_CODE = surrogate.fast_sigmoid().__code__


def heaviside_surrogate(spike_fn: object) -> bool:
    """True when ``spike_fn`` is one of snnTorch's deterministic surrogates with a Heaviside forward."""
    code = getattr(spike_fn, "__code__", None)
    return code is not None and code in _HEAVISIDE_CODES


def _surrogate_vjp(spike_fn: SpikeFn, u: torch.Tensor, w: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``w * dS/du`` at ``u`` through the surrogate's own backward (differentiable when ``create_graph``).

    For the surrogates without a written-out form here; atan and fast_sigmoid go through
    :func:`_surrogate_grad_into` and :class:`_SurrogateVJP`.
    """
    with torch.enable_grad():
        if not create_graph or not u.requires_grad:
            u = u.detach().requires_grad_()
        s = spike_fn(u)
        (g,) = torch.autograd.grad(s, u, w, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(u) if g is None else g


def _surrogate_grad_into(
    out: torch.Tensor, spike_fn: SpikeFn, mem: torch.Tensor, thr: torch.Tensor, w: torch.Tensor
) -> None:
    """``out = w * dS/du`` at ``u = mem - thr``, in place for atan and fast_sigmoid.

    The two are written with snnTorch's own operations in its order (``c / x`` is ``x.reciprocal() * c``
    in torch), so the values are the ones ATan/FastSigmoid.backward compute; every other surrogate
    goes through its own backward under autograd.
    """
    code = getattr(spike_fn, "__code__", None)
    if code is _ATAN_CODE:
        alpha = _closure_value(spike_fn, "alpha")
        torch.sub(mem, thr, out=out)
        out.mul_(torch.pi / 2 * alpha).pow_(2).add_(1).reciprocal_().mul_(alpha / 2).mul_(w)
    elif code is _FAST_SIGMOID_CODE:
        slope = _closure_value(spike_fn, "slope")
        torch.sub(mem, thr, out=out)
        out.abs_().mul_(slope).add_(1.0).pow_(2)
        torch.div(w, out, out=out)
    else:
        out.copy_(_surrogate_vjp(spike_fn, mem - thr, w, False))


def _closed_form(spike_fn: SpikeFn) -> bool:
    """True for the surrogates whose first and second derivatives are written out here."""
    return getattr(spike_fn, "__code__", None) in (_ATAN_CODE, _FAST_SIGMOID_CODE)


def _surrogate_derivatives_into(
    d1: torch.Tensor, d2: torch.Tensor, spike_fn: SpikeFn, mem: torch.Tensor, thr: torch.Tensor
) -> None:
    """``d1 = S'(u)``, ``d2 = S''(u)`` at ``u = mem - thr``, in place (atan and fast_sigmoid only)."""
    torch.sub(mem, thr, out=d2)  # u, until overwritten
    if getattr(spike_fn, "__code__", None) is _ATAN_CODE:
        # S' = (a/2) q with q = 1 / (1 + (k u)^2), k = pi/2 a;  S'' = -a k^2 u q^2
        alpha = _closure_value(spike_fn, "alpha")
        k = torch.pi / 2 * alpha
        torch.mul(d2, k, out=d1).pow_(2).add_(1).reciprocal_()
        d2.mul_(d1).mul_(d1).mul_(-alpha * k * k)
        d1.mul_(alpha / 2)
    else:
        # S' = p^2 with p = 1 / (s |u| + 1);  S'' = -2 s sign(u) p^3
        slope = _closure_value(spike_fn, "slope")
        torch.abs(d2, out=d1).mul_(slope).add_(1).reciprocal_()
        d2.sign_().mul_(d1).mul_(d1).mul_(d1).mul_(-2 * slope)
        d1.mul_(d1)


class _SurrogateVJP(torch.autograd.Function):
    """``w * S'(mem - thr)`` over ``[T, ...]`` for atan / fast_sigmoid, with ``S''`` written out.

    The create_graph backward of :class:`FusedLIF` records this one node instead of the surrogate's six
    elementwise ops and their saved intermediates; forward and backward go one time step at a time.
    Its own backward is not differentiable again (Hutchinson needs second derivatives, not third).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        mems: torch.Tensor,
        thr: torch.Tensor,
        w: torch.Tensor,
        spike_fn: SpikeFn,
    ) -> torch.Tensor:
        out = torch.empty_like(mems, dtype=torch.result_type(mems, w))
        for t in range(mems.shape[0]):
            _surrogate_grad_into(out[t], spike_fn, mems[t], thr, w[t])
        ctx.save_for_backward(mems, thr, w)
        ctx.spike_fn = spike_fn
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        mems, thr, w = ctx.saved_tensors
        need_mem, need_thr, need_w = ctx.needs_input_grad[:3]
        grad_mem = torch.empty_like(mems) if need_mem or need_thr else None
        grad_w = torch.empty_like(w) if need_w else None
        d1, d2 = torch.empty_like(mems[0]), torch.empty_like(mems[0])
        for t in range(mems.shape[0]):
            _surrogate_derivatives_into(d1, d2, ctx.spike_fn, mems[t], thr)
            if grad_w is not None:
                torch.mul(grad_out[t], d1, out=grad_w[t])
            if grad_mem is not None:
                torch.mul(grad_out[t], w[t], out=grad_mem[t]).mul_(d2)
        grad_thr = _sum_to(-grad_mem, thr) if need_thr else None
        return (grad_mem if need_mem else None), grad_thr, grad_w, None


def _closure_value(fn: SpikeFn, name: str) -> float:
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True))
    return cells[name].cell_contents


def _sum_to(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return g.sum_to_size(like.shape).to(like.dtype)


class FusedLIF(torch.autograd.Function):
    """``(spikes, membranes) = FusedLIF.apply(x, mem0, beta, thr, gain, mode, spike_fn, heaviside)``.

    Inputs are tensors broadcastable to one step ``x[t]``; ``beta`` must already be clamped to [0, 1]
    (as ``snn.Leaky`` does) so that clamp's own gradient applies outside. ``heaviside=True`` computes
    the forward spikes as ``mem > thr`` (exact for every surrogate :func:`heaviside_surrogate` accepts);
    ``False`` calls ``spike_fn`` for the forward values too (any deterministic elementwise function,
    e.g. a smooth one for ``gradcheck``). Use :func:`fused_lif` rather than calling this directly.

    Both loops work one time step at a time on preallocated ``[T, ...]`` buffers, in place: a step's
    working set stays in cache on CPU, where whole-``[T, ...]`` elementwise ops were measured ~5x
    slower per element than per-step ones.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        mem0: torch.Tensor,
        beta: torch.Tensor,
        thr: torch.Tensor,
        gain: torch.Tensor,
        mode: int,
        spike_fn: SpikeFn,
        heaviside: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        steps = x.shape[0]
        # first: the pending reset of the carried-in membrane; spikes[t] is the reset applied at t + 1.
        # Heaviside spikes are float32 0/1, as snnTorch's (u > 0).float().
        first = (mem0 > thr).float() if heaviside else spike_fn(mem0 - thr)
        spikes = first.new_empty((steps, *first.shape))
        mems: torch.Tensor | None = None
        for t in range(steps):
            r = first if t == 0 else spikes[t - 1]
            if t == 0 or not heaviside:
                # out of place, written exactly as Leaky._base_zero/_base_sub/_base_int; step 0 also
                # fixes the dtype snnTorch's promotion gives (float32 once a float32 reset meets bf16)
                prev = mem0 if t == 0 else mems[t - 1]
                m = beta * ((1 - r) * prev if mode == RESET_ZERO else prev) + x[t]
                if mode == RESET_SUBTRACT:
                    m = m - r * thr
                if mems is None:
                    mems = x.new_empty((steps, *m.shape), dtype=m.dtype)
                mems[t] = m
            else:
                # in place, same values: r is exactly 0 or 1, so m - m * r is (1 - r) * m and
                # m - r * thr removes exactly thr or nothing
                m = mems[t]
                torch.mul(mems[t - 1], beta, out=m)
                if mode == RESET_ZERO:
                    m.addcmul_(m, r, value=-1)
                m.add_(x[t])
                if mode == RESET_SUBTRACT:
                    m.addcmul_(r, thr, value=-1)
            if heaviside:
                # mem > thr is exactly (mem - thr) > 0 in IEEE arithmetic (a - b == 0 only if a == b)
                torch.gt(mems[t], thr, out=spikes[t])
            else:
                spikes[t] = spike_fn(mems[t] - thr)
        spk = spikes if _trivial(gain) else spikes * gain
        ctx.save_for_backward(mems, mem0, beta, thr, gain, first, spikes)
        ctx.mode, ctx.spike_fn, ctx.heaviside = mode, spike_fn, heaviside
        ctx.x_dtype = x.dtype
        ctx.set_materialize_grads(False)
        return spk, mems

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_spk: torch.Tensor | None,
        grad_mem: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # inside a create_graph=True backward: differentiable ops only
            grads = _backward_differentiable(ctx, grad_spk, grad_mem)
        else:
            grads = _backward_in_place(ctx, grad_spk, grad_mem)
        return (*grads, None, None, None)


def _trivial(gain: torch.Tensor) -> bool:
    # a gain of exactly 1 on the CPU is skipped (checking it on an accelerator would synchronise)
    return not gain.requires_grad and gain.device.type == "cpu" and bool((gain == 1).all())


class _Resets:
    """``resets[t]``: the reset applied at step t (``first`` at 0, the previous step's spike after)."""

    def __init__(self, first: torch.Tensor, spikes: torch.Tensor) -> None:
        self.first, self.spikes = first, spikes

    def __getitem__(self, t: int) -> torch.Tensor:
        return self.first if t == 0 else self.spikes[t - 1]


def _decay(beta: torch.Tensor, r: torch.Tensor, mode: int) -> torch.Tensor:
    """``d mem_t / d mem_{t-1}`` given the reset ``r`` applied at step t."""
    return beta * (1 - r) if mode == RESET_ZERO else beta


def _saved_state(ctx: torch.autograd.function.FunctionCtx) -> tuple[Any, ...]:
    """``(mems, mem0, beta, thr, gain, resets, mode, spike_fn)`` as FusedLIF.forward left them on ``ctx``;
    both backward paths start from the same state, so it is unpacked here once for either."""
    mems, mem0, beta, thr, gain, first, spikes = ctx.saved_tensors
    # resets[t] = the (detached) reset applied at step t, spikes[t] = the reset applied at t + 1
    return mems, mem0, beta, thr, gain, _Resets(first, spikes.detach()), ctx.mode, ctx.spike_fn


def _backward_differentiable(
    ctx: torch.autograd.function.FunctionCtx, grad_spk: torch.Tensor | None, grad_mem: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    # Whole-[T, ...] differentiable ops plus one linear scan (_DecayScan, itself twice differentiable),
    # so autograd records a dozen nodes, not a dozen per time step. mems is this node's own output, so
    # the surrogate's second derivative flows back through FusedLIF.backward once more. Resets are
    # constants, as in snn.Leaky.
    mems, mem0, beta, thr, gain, resets, mode, spike_fn = _saved_state(ctx)
    need_x, need_mem0, need_beta, need_thr, need_gain = ctx.needs_input_grad[:5]
    surr = None
    if grad_spk is not None:
        w = grad_spk if _trivial(gain) else grad_spk * gain
        if _closed_form(spike_fn):
            surr = _SurrogateVJP.apply(mems, thr, w, spike_fn)
        else:
            surr = _surrogate_vjp(spike_fn, mems - thr, w, True)
    if surr is None and grad_mem is None:
        return None, None, None, None, None
    direct = surr if grad_mem is None else grad_mem if surr is None else surr + grad_mem
    # applied[t]: the reset applied at step t; the link from step t + 1 back to t decays by
    # d mem_{t+1} / d mem_t, which depends on the reset applied at t + 1
    spikes = resets.spikes
    applied = torch.cat([resets.first.expand_as(spikes[0]).unsqueeze(0), spikes[:-1]])
    full_beta = beta.reshape((1,) * (mems.dim() - 1 - beta.dim()) + tuple(beta.shape)).unsqueeze(0)
    links = _decay(full_beta, applied[1:], mode)
    g = _DecayScan.apply(direct, links, True)
    grad_x = g.to(ctx.x_dtype) if need_x else None
    grad_mem0 = _sum_to(g[0] * _decay(beta, resets[0], mode), mem0) if need_mem0 else None
    grad_beta = grad_thr = grad_gain = None
    if need_beta:
        prevs = torch.cat([mem0.expand_as(mems[0]).unsqueeze(0), mems[:-1]])
        if mode == RESET_ZERO:
            prevs = prevs * (1 - applied)
        grad_beta = _sum_to(g * prevs, beta)
    if need_thr:
        terms = [] if surr is None else [-surr]
        if mode == RESET_SUBTRACT:
            terms.append(-g * applied)
        grad_thr = _sum_to(sum(terms[1:], terms[0]), thr) if terms else None
    if need_gain and grad_spk is not None:
        # recomputed from the trace so that a smooth spike_fn's gain gradient stays differentiable
        # (Heaviside spikes are piecewise constant)
        values = spikes if ctx.heaviside else spike_fn(mems - thr)
        grad_gain = _sum_to(grad_spk * values, gain)
    return grad_x, grad_mem0, grad_beta, grad_thr, grad_gain


class _DecayScan(torch.autograd.Function):
    """``y = _DecayScan.apply(a, links, reverse)``: a first-order linear recurrence over time.

    Forward in time ``y_t = a_t + links[t-1] * y_{t-1}``; reversed ``y_t = a_t + links[t] * y_{t+1}``.
    ``links`` is ``[T-1, ...]`` or ``[1, ...]`` (the same link at every step), broadcastable to ``a[t]``.
    Each direction's backward is the other direction (the transposed recurrence) run through this same
    Function, so derivatives of every order stay one loop of in-place steps.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, links: torch.Tensor, reverse: bool
    ) -> torch.Tensor:
        y = torch.empty_like(a, dtype=torch.result_type(a, links))
        steps = a.shape[0]
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        prev: int | None = None
        for t in order:
            if prev is None:
                y[t] = a[t]
            else:
                link = links[0] if links.shape[0] == 1 else links[min(t, prev)]
                torch.addcmul(a[t], link, y[prev], out=y[t])
            prev = t
        ctx.reverse = reverse
        ctx.save_for_backward(links, y if ctx.needs_input_grad[1] else None)
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        links, y = ctx.saved_tensors
        # the transpose of a forward scan is the reverse scan with the same links, and vice versa
        h = _DecayScan.apply(grad_y, links, not ctx.reverse)
        grad_links = None
        if ctx.needs_input_grad[1]:
            # links[t] joins steps t and t + 1: reversed y_t gets links[t] * y_{t+1}; forward y_{t+1}
            # gets links[t] * y_t; either way its gradient pairs the joined steps' h and y
            prod = h[:-1] * y[1:] if ctx.reverse else h[1:] * y[:-1]
            grad_links = _sum_to(prod, links)
        return (h if ctx.needs_input_grad[0] else None), grad_links, None


def _backward_in_place(
    ctx: torch.autograd.function.FunctionCtx, grad_spk: torch.Tensor | None, grad_mem: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    # The same recursion as _backward_differentiable, one step at a time into one [T, ...] buffer.
    mems, mem0, beta, thr, gain, resets, mode, spike_fn = _saved_state(ctx)
    need_x, need_mem0, need_beta, need_thr, need_gain = ctx.needs_input_grad[:5]
    steps = mems.shape[0]
    g_all = torch.empty_like(mems)
    d_thr = torch.zeros_like(mems[0]) if need_thr else None
    d_beta = torch.zeros_like(mems[0]) if need_beta else None
    scratch = torch.empty_like(mems[0])
    trivial_gain = _trivial(gain)
    for t in range(steps - 1, -1, -1):
        g = g_all[t]
        if grad_spk is not None:
            w = grad_spk[t] if trivial_gain else grad_spk[t] * gain
            _surrogate_grad_into(g, spike_fn, mems[t], thr, w)
            if d_thr is not None:
                d_thr.sub_(g)
        else:
            g.zero_()
        if grad_mem is not None:
            g.add_(grad_mem[t])
        if t < steps - 1:
            torch.mul(g_all[t + 1], beta, out=scratch)
            if mode == RESET_ZERO:
                if ctx.heaviside:  # r is 0 or 1: s - s * r == (1 - r) * s
                    scratch.addcmul_(scratch, resets[t + 1], value=-1)
                else:
                    scratch.mul_(1 - resets[t + 1])
            g.add_(scratch)
        if d_thr is not None and mode == RESET_SUBTRACT:
            d_thr.addcmul_(g, resets[t], value=-1)
        if d_beta is not None:
            prev = mems[t - 1] if t > 0 else mem0
            d_beta.addcmul_(g, prev * (1 - resets[t]) if mode == RESET_ZERO else prev)
    grad_x = g_all.to(ctx.x_dtype) if need_x else None
    grad_mem0 = _sum_to(g_all[0] * _decay(beta, resets[0], mode), mem0) if need_mem0 else None
    grad_beta = _sum_to(d_beta, beta) if d_beta is not None else None
    grad_thr = _sum_to(d_thr, thr) if d_thr is not None else None
    grad_gain = None
    if need_gain and grad_spk is not None:
        grad_gain = _sum_to(grad_spk * resets.spikes, gain)
    return grad_x, grad_mem0, grad_beta, grad_thr, grad_gain


def fused_lif(
    x: torch.Tensor,
    *,
    beta: torch.Tensor,
    threshold: torch.Tensor,
    mode: int = RESET_ZERO,
    spike_fn: SpikeFn | None = None,
    mem0: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    heaviside: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes and membrane trace ``[T, ...]`` of ``snn.Leaky`` driven over ``x[0], ..., x[T-1]``.

    Args:
        x: input currents, time first ``[T, ...]``.
        beta: decay, a tensor broadcastable to ``x[0]``; clamped to [0, 1] here as snnTorch does.
        threshold: firing threshold tensor broadcastable to ``x[0]``.
        mode: ``RESET_ZERO``, ``RESET_SUBTRACT`` or ``RESET_NONE``.
        spike_fn: the surrogate (``snn.Leaky.spike_grad``); ``None`` gives snnTorch's default atan.
        mem0: membrane before step 0 (zeros if None).
        gain: ``graded_spikes_factor`` (1 if None).
        heaviside: forward spikes as ``mem > threshold``; default: whether ``spike_fn`` is a known
            Heaviside-forward snnTorch surrogate.

    Returns:
        ``(spikes, membranes)``, both ``[T, ...]``; membranes are pre-reset, as ``snn.Leaky`` returns them.

    Raises:
        ValueError: ``x`` has fewer than 2 dims or ``mode`` is unknown.
    """
    if x.dim() < 2:
        raise ValueError(f"fused_lif expects a time-first tensor [T, ...], got shape {tuple(x.shape)}")
    if mode not in (RESET_SUBTRACT, RESET_ZERO, RESET_NONE):
        raise ValueError(f"mode={mode!r} is not RESET_SUBTRACT (0), RESET_ZERO (1) or RESET_NONE (2)")
    spike_fn = spike_fn if spike_fn is not None else surrogate.atan()
    if heaviside is None:
        heaviside = heaviside_surrogate(spike_fn)
    mem0 = torch.zeros_like(x[0]) if mem0 is None else mem0
    gain = torch.ones((), dtype=torch.float32, device=x.device) if gain is None else gain
    return FusedLIF.apply(x, mem0, beta.clamp(0, 1), threshold, gain, mode, spike_fn, heaviside)
