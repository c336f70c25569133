"""Zero-bubble's split backward without doing the backward twice.

B computes the input gradient, W the weight gradient. W must not pull the cotangent back
through the stage again, nor recompute what B already computed: every matmul and convolution
that reads a parameter and an activation (a *tapped* operator) hands W the cotangent of its
result and its activation input, both of which B has on its way back (the activation input is
recomputed there from the stored matmul results anyway), and W applies only that operator's
weight transpose to them: x^T g, nothing else of the stage.

The split lives in identity operators with custom VJPs around the stage's operators while F
and B run it (`Hook`), so XLA drops what B does not need:

  - a tapped operator's parameter-derived inputs pass no cotangent (W computes it), and its
    result is `_tap`'ed: the cotangent arriving there is also returned as the cotangent of a
    zero *probe* input; its activation input is `_stash`'ed: the cotangent of a second probe
    is that input's value (B stores both);
  - every other operator that reads a parameter-derived value and an activation (a bias add,
    a norm's scale, an embedding lookup, a scanned layer) passes the parameter's cotangent:
    its weight gradient is cheap, or (a scan) cannot be split here, and B computes it.

W evaluates only the operators that do not depend on an activation (the parameters' casts,
reshapes) and the tapped operators on the stored activation inputs, and takes their VJP with
the stored cotangents. So B's parameter gradients are those of the untapped uses and W's those
of the tapped ones; their sum is the gradient. `WeightUses` says which operators are which and
which parameters each action adds to the gradient sums. W reads no residual of F: a deferred
W holds only its stored cotangents and activation inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from autopipe.passes.ir import Program

TAPPED_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightUses:
    """How a stage's operators use its parameters (value ids and op indices of a `Program`)."""

    tapped: tuple[int, ...]  # matmuls/convolutions of a parameter-derived and an activation input
    stashed: tuple[tuple[int, int], ...]  # (tapped op, input position) of each activation input
    gated: frozenset[int]  # other operators reading a parameter-derived float and an activation
    derived: frozenset[int]  # values computed from parameters (and constants) alone
    static: tuple[int, ...]  # the operators that depend on no activation, in order
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
    tapped, stashed, static, gated, late, early = [], [], [], set(), set(), set()
    for i in ops:
        op = program.ops[i]
        ins = [a for a in op.invars if isinstance(a, int)]
        weights = [a for a in ins if a in origin and is_float(program.avals[a])]
        if not any(a in act for a in ins):
            static.append(i)
            if any(a in origin for a in ins):
                for v in op.outvars:
                    origin[v] = frozenset().union(*(origin[a] for a in ins if a in origin))
            continue
        act.update(op.outvars)
        if not weights:
            continue
        if (
            op.kind == "eqn"
            and op.primitive in TAPPED_PRIMITIVES
            and is_float(program.avals[op.outvars[0]])
        ):
            tapped.append(i)
            stashed += [(i, j) for j, a in enumerate(op.invars) if isinstance(a, int) and a in act]
            late.update(*(origin[a] for a in weights))
        else:
            gated.add(i)
            early.update(*(origin[a] for a in weights))
    early.update(*(origin[v] for v in outputs if v in origin))  # sent on: B's cotangent
    return WeightUses(
        tapped=tuple(tapped),
        stashed=tuple(stashed),
        gated=frozenset(gated),
        derived=frozenset(origin),
        static=tuple(static),
        late=frozenset(late),
        early=frozenset(early),
    )


@jax.custom_vjp
def _gate(x: Any) -> Any:
    """Identity passing no cotangent: a tapped operator's parameter input (W's)."""
    return x


_gate.defvjp(lambda x: (x, None), lambda _, ct: (jnp.zeros_like(ct),))


@jax.custom_vjp
def _tap(y: Any, probe: Any) -> Any:
    """Identity whose cotangent is also the cotangent of ``probe``: a tapped result's, for W."""
    return y


_tap.defvjp(lambda y, probe: (y, None), lambda _, ct: (ct, ct))


@jax.custom_vjp
def _stash(x: Any, probe: Any) -> Any:
    """Identity whose backward returns ``x`` itself as the cotangent of ``probe``: a tapped
    operator's activation input, for W (recomputed in the backward like every other
    non-matmul value, `passes.residuals.saving`)."""
    return x


_stash.defvjp(lambda x, probe: (x, x), lambda x, ct: (ct, x))


@dataclasses.dataclass(kw_only=True)
class Hook:
    """Applied around each operator while F and B evaluate a stage (`tensor_local.eval_stage`).
    ``stash_of``: (tapped op, input position) → index of the stored activation input it reads
    (one per value and layout: q, k and v projections of one input share it). ``probes``: one
    zero per tapped result and one per stored input; None: only records them (to learn their
    shapes)."""

    uses: WeightUses
    stash_of: Mapping[tuple[int, int], int]
    probes: tuple[Sequence[Any], Sequence[Any]] | None
    taps: list = dataclasses.field(default_factory=list)  # the tapped results, in order
    stash: dict = dataclasses.field(default_factory=dict)  # index → activation input

    def args(self, i: int, invars: Sequence[Any], args: list) -> list:
        if i not in self.uses.tapped:
            return args
        derived, out = self.uses.derived, list(args)
        for j, (a, x) in enumerate(zip(invars, args, strict=True)):
            k = self.stash_of.get((i, j))
            if isinstance(a, int) and a in derived and is_float(x):
                out[j] = _gate(x)
            elif k is not None and k not in self.stash:
                self.stash[k] = x
                if self.probes is not None:
                    out[j] = _stash(x, self.probes[1][k])
        return out

    def outs(self, i: int, outs: list) -> list:
        if i not in self.uses.tapped:
            return outs
        (y,) = outs
        self.taps.append(y)
        if self.probes is None:
            return outs
        return [_tap(y, self.probes[0][len(self.taps) - 1])]


@dataclasses.dataclass(kw_only=True)
class Recorder:
    """Records the tapped results while W evaluates a stage's static and tapped operators."""

    uses: WeightUses
    taps: list = dataclasses.field(default_factory=list)

    def args(self, i: int, invars: Sequence[Any], args: list) -> list:
        return args

    def outs(self, i: int, outs: list) -> list:
        if i in self.uses.tapped:
            self.taps.append(outs[0])
        return outs


def is_float(x: Any) -> bool:
    """Whether an aval or array is of a float (inexact) dtype."""
    return jnp.issubdtype(x.dtype, jnp.inexact)


def tap_avals(fn: Callable, args: tuple, n_out: int, local: Callable) -> tuple[tuple, tuple]:
    """The avals of a stage's tapped results and of their activation inputs as one device
    holds them (``local``: how the stage is traced as one device runs it)."""

    def taps(param_vals, recv_vals, fixed_vals, xs):
        return fn(param_vals, recv_vals, fixed_vals, xs, None)[0][n_out]

    got = jax.eval_shape(local(taps), *args)
    return tuple(got[0]), tuple(got[1])
