"""Zero-bubble's split backward without doing the backward twice.

B computes the input gradient, W the weight gradient. W must not pull the cotangent back
through the stage again: every matmul and convolution that reads a parameter and an
activation (a *tapped* operator) hands W the cotangent of its result, which B computed on its
way back, and W applies only that operator's weight transpose to it.

The stage runs under one function with the same residuals for F, B and W, and the split lives
in identity operators with custom VJPs whose backward is fixed when the action is traced (so
XLA drops what an action does not need):

  - a tapped operator's parameter-derived inputs pass their cotangent in W only, and its
    result is `_tap`'ed: in B the cotangent arriving there is also returned as the cotangent
    of a zero *probe* input (B stores it); in W nothing flows back through the result, and the
    stage returns the result once more as an extra output whose cotangent W sets to the stored
    one;
  - every other operator that reads a parameter-derived value and an activation (a bias add,
    a norm's scale, an embedding lookup, a scanned layer) passes the parameter's cotangent in
    B only: its weight gradient is cheap, or (a scan) cannot be split here, and B computes it.

So B's parameter gradients are those of the untapped uses and W's those of the tapped ones;
their sum is the gradient. `WeightUses` says which operators are which and which parameters
each action adds to the gradient sums.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from autopipe.passes.ir import Program

TAPPED_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})

Mode = Literal["B", "W"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightUses:
    """How a stage's operators use its parameters (value ids and op indices of a `Program`)."""

    tapped: tuple[int, ...]  # matmuls/convolutions of a parameter-derived and an activation input
    gated: frozenset[int]  # other operators reading a parameter-derived float and an activation
    derived: frozenset[int]  # values computed from parameters (and constants) alone
    late: frozenset[int]  # parameters read by a tapped operator: W adds their gradient
    early: frozenset[int]  # parameters read otherwise (or sent on): B adds their gradient


def weight_uses(
    program: Program,
    ops: Sequence[int],
    params: Sequence[int],
    activations: Sequence[int],
    outputs: Sequence[int],
) -> WeightUses:
    """Classifies ``ops`` (in order) by what their inputs derive from: ``params`` (the float
    parameters), ``activations`` (the received and batch values) or neither (constants)."""
    origin: dict[int, frozenset[int]] = {v: frozenset({v}) for v in params}
    act = set(activations)
    tapped, gated, late, early = [], set(), set(), set()
    for i in ops:
        op = program.ops[i]
        ins = [a for a in op.invars if isinstance(a, int)]
        weights = [a for a in ins if a in origin and is_float(program.avals[a])]
        if any(a in act for a in ins):
            act.update(op.outvars)
            if not weights:
                continue
            if (
                op.kind == "eqn"
                and op.primitive in TAPPED_PRIMITIVES
                and is_float(program.avals[op.outvars[0]])
            ):
                tapped.append(i)
                late.update(*(origin[a] for a in weights))
            else:
                gated.add(i)
                early.update(*(origin[a] for a in weights))
        elif any(a in origin for a in ins):
            for v in op.outvars:
                origin[v] = frozenset().union(*(origin[a] for a in ins if a in origin))
    early.update(*(origin[v] for v in outputs if v in origin))  # sent on: B's cotangent
    return WeightUses(
        tapped=tuple(tapped),
        gated=frozenset(gated),
        derived=frozenset(origin),
        late=frozenset(late),
        early=frozenset(early),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gate(x: Any, keep: bool) -> Any:
    return x


def _gate_fwd(x, keep):
    return x, None


def _gate_bwd(keep, _, ct):
    return (ct if keep else jnp.zeros_like(ct),)


_gate.defvjp(_gate_fwd, _gate_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tap(y: Any, probe: Any, mode: Mode) -> Any:
    return y


def _tap_fwd(y, probe, mode):
    return y, None


def _tap_bwd(mode, _, ct):
    if mode == "B":
        return ct, ct
    zero = jnp.zeros_like(ct)
    return zero, zero


_tap.defvjp(_tap_fwd, _tap_bwd)


@dataclasses.dataclass(kw_only=True)
class Hook:
    """Applied around each operator while a stage is evaluated (`tensor_local.eval_stage`).
    ``probes`` None: only records the tapped results (to learn their shapes)."""

    uses: WeightUses
    mode: Mode
    probes: Sequence[Any] | None
    taps: list = dataclasses.field(default_factory=list)  # the tapped results, in order

    def args(self, i: int, invars: Sequence[Any], args: list) -> list:
        if i in self.uses.gated:
            keep = self.mode == "B"
        elif i in self.uses.tapped:
            keep = self.mode == "W"
        else:
            return args
        derived = self.uses.derived
        return [
            _gate(x, keep) if isinstance(a, int) and a in derived and is_float(x) else x
            for a, x in zip(invars, args, strict=True)
        ]

    def outs(self, i: int, outs: list) -> list:
        if i not in self.uses.tapped:
            return outs
        (y,) = outs
        self.taps.append(y)
        if self.probes is None:
            return outs
        return [_tap(y, self.probes[len(self.taps) - 1], self.mode)]


def is_float(x: Any) -> bool:
    """Whether an aval or array is of a float (inexact) dtype."""
    return jnp.issubdtype(x.dtype, jnp.inexact)


def tap_avals(fn: Callable, args: tuple, n_out: int, local: Callable) -> tuple:
    """The avals of a stage's tapped results as one device holds them (``local``: how the
    stage is traced as one device runs it)."""

    def taps(param_vals, recv_vals, fixed_vals, xs):
        return fn(param_vals, recv_vals, fixed_vals, xs, None)[0][n_out:]

    return tuple(jax.eval_shape(local(taps), *args))


def w_treedef(b: Any, w: Any) -> Any:
    """W's VJP structure, checked to hold the residuals F stored for B: the two differ only
    in the backward rules of `split_backward`'s identities."""
    if b.stored != w.stored or b.param_index != w.param_index:
        raise AssertionError(
            f"the split backward's W residuals differ from B's: {w.stored} vs {b.stored}"
        )
    return w.treedef
