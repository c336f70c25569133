"""The runtime of a compiled plan: placing parameters on their stages, calling the compiled
step, training (init / step / unplace), and the mutable state behind a frozen plan.

`Executable` holds the call-time methods; the plan class mixes it in and provides the fields
they read (``traced``, ``program``, ``layouts``, ``mesh``, ``_runtime``, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe import _distributed
from autopipe.passes.trace import _split_nnx


@dataclasses.dataclass
class _Runtime:
    """Mutable call-time state behind a frozen plan: the compiled step and placed params."""

    emitted: Any  # passes.emit.Emitted or passes.emit_train.EmittedTrain
    compiled: Any
    packers: list
    init_opt: Any = None  # training: jitted optimizer.init laid out like the step expects
    unplace: Any = None  # training: jitted gather of parameters back to their leaves
    tables: Any = None  # training: the schedule's tables, placed (the step's last argument)
    differentiable: Any = None  # the step behind Plan.apply, built on first use
    placed_key: tuple = ()
    placed: tuple = ()
    processes_checked: bool = False  # multi-process: mesh and plan hash checked (_distributed)


class Executable:
    """Call-time methods of a compiled plan (mixed into `Plan`)."""

    # --- running ---------------------------------------------------------------------------

    def _require_compiled(self) -> Any:
        if self._runtime.compiled is None:
            raise RuntimeError(
                f"this plan for {self.fn_name} was made without compiling (abstract mesh or "
                "compile=False); plan again with a concrete jax Mesh to run it."
            )
        return self._runtime.compiled

    def __call__(self, *args: Any) -> Any:
        compiled = self._require_compiled()
        leaves = self._check_args(args)
        refuse_traced(
            leaves,
            f"calling the plan for {self.traced.spec.fn_name}",
            "Under transformations use plan.apply(*args), the traceable forward (jax.grad of it "
            "is GPipe by autodiff).",
        )
        self._check_processes()
        params, batch = self._split_leaves(leaves)
        bufs = self._place_params(params)
        sharding = self._runtime.emitted.batch_sharding
        outs = compiled(
            bufs, tuple(jax.device_put(x, sharding) for x in batch), self._inputs(leaves)
        )
        last = _stage_devices(self.mesh, self.pipeline_axis, self.num_stages - 1)
        if not _distributed.owns_any(last):
            return None  # multi-process: outputs live in the processes holding the last stage
        return jax.tree.unflatten(self.traced.out_tree, [self._last_stage_block(o) for o in outs])

    def _check_processes(self) -> None:
        rt = self._runtime
        if not rt.processes_checked:
            _distributed.check_plan(self)
            rt.processes_checked = True

    def apply(self, *args: Any) -> Any:
        """``fn(*args)`` as a traceable, differentiable function of the arguments: use it under
        ``jax.grad``/``jax.jit`` (the gradient of the forward pipeline is GPipe by autodiff).
        Unlike calling the plan it packs parameters on every call and replicates outputs."""
        from autopipe.passes.emit import emit
        from autopipe.passes.param_layout import pack_traced

        self._require_compiled()
        rt = self._runtime
        if rt.differentiable is None:
            rt.differentiable = emit(
                self.program,
                self.layouts,
                self.schedule,
                mesh=self.mesh,
                axis=self.pipeline_axis,
                batch_size=self.traced.batch_size,
                data_axis=self.data_axis,
                tensor_axis=self.tensor_axis,
                dims=self.dims,
                strategies=self.op_strategies,
                whole=self.whole_values,
                replicate_outputs=True,
            ).step
        leaves = self._check_args(args)
        params, batch = self._split_leaves(leaves)
        bufs = pack_traced(self.program, rt.emitted.params, params, rt.emitted.buffers)
        ins = [
            x for x, v in zip(leaves, self.program.invars, strict=True) if v in self.program.inputs
        ]
        outs = rt.differentiable(bufs, tuple(batch), tuple(ins))
        return jax.tree.unflatten(self.traced.out_tree, list(outs))

    def _check_args(self, args: Sequence[Any]) -> list[Any]:
        spec = self.traced.spec
        if len(args) != spec.num_args:
            raise TypeError(
                f"plan for {spec.fn_name} takes {spec.num_args} arguments, got {len(args)}."
            )
        treedef, leaves = spec.flatten(args)
        if treedef != spec.in_tree:
            raise ValueError(
                f"plan for {spec.fn_name} was made for arguments with structure {spec.in_tree}, "
                f"but was called with {treedef}. Call it with arguments shaped like the "
                "example arguments, or make a new plan."
            )
        for path, want, x in zip(spec.in_paths, spec.in_avals, leaves, strict=True):
            _check_leaf(spec.fn_name, path, want, x)
        return leaves

    def _split_leaves(self, leaves: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """(parameter leaves, batch leaves) of a call's flat arguments."""
        prog = self.program
        params = set(prog.param_invars)
        return (
            [x for x, v in zip(leaves, prog.invars, strict=True) if v in params],
            [x for x, v in zip(leaves, prog.invars, strict=True) if v in prog.batch_dependent],
        )

    def _inputs(self, leaves: Sequence[Any]) -> tuple[Any, ...]:
        """The inputs (`passes.inputs`) among a call's flat leaves, replicated on every device."""
        sharding = self._runtime.emitted.input_sharding
        prog = self.program
        return tuple(
            jax.device_put(x, sharding)
            for x, v in zip(leaves, prog.invars, strict=True)
            if v in prog.inputs
        )

    def _place_params(self, params: list[Any]) -> tuple[Any, ...]:
        rt = self._runtime
        cacheable = all(isinstance(x, jax.Array) for x in params)
        if cacheable and len(rt.placed_key) == len(params):
            if all(a is b for a, b in zip(rt.placed_key, params, strict=True)):
                return rt.placed
        placed = self.place_params(params)
        rt.placed_key, rt.placed = (tuple(params) if cacheable else ()), placed
        return placed

    def place_params(self, params: Sequence[Any]) -> tuple[Any, ...]:
        """Packs flat parameter leaves into the per-stage buffers, each stage on its devices
        (and each tensor-parallel device holding only its shard)."""
        prog = self.program
        raw = dict(zip(prog.param_invars, params, strict=True)) | dict(prog.consts)
        rt = self._runtime
        return place_buffers(rt.packers, rt.emitted.buffers, raw, self.mesh, self.pipeline_axis)

    # --- training ---------------------------------------------------------------------------

    def init(self, *params: Any) -> Any:
        """Places the parameter arguments on their stages and initialises the optimizer.
        Their non-float leaves are not trained: the state keeps them as given (``frozen``)."""
        rt = self._require_training()
        self._check_processes()
        ids, leaves = self._part(params, step=False)
        refuse_traced(leaves, f"plan.init for {self.traced.spec.fn_name}", "Call it from Python.")
        trained = set(self.program.param_invars)
        bufs = self.place_params([x for v, x in zip(ids, leaves, strict=True) if v in trained])
        frozen = tuple(x for v, x in zip(ids, leaves, strict=True) if v not in trained)
        return TrainState(params=bufs, opt_state=rt.init_opt(bufs), frozen=frozen)

    def step(self, state: Any, *args: Any) -> tuple[Any, jax.Array]:
        """One optimizer step; ``args`` are the arguments that are not parameters, in order:
        the batch arguments and the inputs (arguments without float leaves: a PRNG key, a step
        counter). Returns (new state, loss). Donates `state`: use only the returned one."""
        rt = self._require_training()
        where = f"plan.step for {self.traced.spec.fn_name}"
        refuse_traced(
            jax.tree.leaves((state, args)),
            where,
            "It is one compiled training step already: call it from Python, outside "
            "jax.jit/grad/vmap.",
        )
        check_live(state, where)
        batch, ins = self._step_inputs(state, args)
        params, opt_state, loss = rt.compiled(state.params, state.opt_state, batch, ins, rt.tables)
        return TrainState(params=params, opt_state=opt_state, frozen=state.frozen), loss

    def _step_inputs(self, state: Any, args: Sequence[Any]) -> tuple[tuple, tuple]:
        """(batch leaves, inputs) of a training step's non-parameter ``args``, placed."""
        rt = self._runtime
        ids, leaves = self._part(args, step=True)
        got = dict(zip(ids, leaves, strict=True))
        prog = self.program
        frozen = iter(state.frozen)
        given = [got[v] if v in got else next(frozen) for v in prog.input_invars]
        ins = tuple(jax.device_put(x, rt.emitted.input_sharding) for x in given)
        sharding = rt.emitted.batch_sharding
        batch = tuple(
            jax.device_put(got[v], sharding) for v in prog.invars if v in prog.batch_dependent
        )
        return batch, ins

    def unplace(self, state: Any) -> Any:
        """The parameter arguments (same pytrees as given to `init`) from a training state."""
        rt = self._require_training()
        spec, prog = self.traced.spec, self.program
        check_live(state, f"plan.unplace for {spec.fn_name}")
        it, frozen = iter(rt.unplace(state.params)), iter(state.frozen)
        input_args = {i for a in spec.input_args for i in spec.arg_leaves()[a]}
        leaves = [
            None
            if v in prog.batch_dependent or i in input_args
            else (next(frozen) if v in prog.inputs else next(it))
            for i, v in enumerate(prog.invars)
        ]
        args = jax.tree.unflatten(spec.in_tree, leaves)
        out = [
            a if g is None else nnx_merge(g, a)
            for a, g in zip(args, spec.nnx_graphdefs, strict=True)
        ]
        params = [a for i, a in enumerate(out) if i not in {*spec.batch_args, *spec.input_args}]
        return params[0] if len(params) == 1 else tuple(params)

    def _require_training(self) -> _Runtime:
        self._require_compiled()
        if not self.training:
            raise RuntimeError("init/step/unplace belong to training plans (autopipe.train).")
        return self._runtime

    def _part(self, args: Sequence[Any], *, step: bool) -> tuple[list[int], list[Any]]:
        """(value ids, flat leaves) of the parameter arguments (``step=False``) or of the others
        (batch and input arguments), checked against the plan."""
        spec = self.traced.spec
        per_step = {*spec.batch_args, *spec.input_args}
        positions = [i for i in range(spec.num_args) if (i in per_step) == step]
        kind = "batch or input" if step else "parameter"
        if len(args) != len(positions):
            raise TypeError(
                f"plan for {spec.fn_name} takes {len(positions)} {kind} argument(s) (arguments "
                f"{positions}), got {len(args)}."
            )
        leaves = [x for a in args for x in jax.tree.leaves(_split_nnx(a)[1])]
        index = [i for a in positions for i in spec.arg_leaves()[a]]
        want = [(spec.in_paths[i], spec.in_avals[i]) for i in index]
        if len(leaves) != len(want):
            raise ValueError(
                f"plan for {spec.fn_name}: the {kind} arguments have {len(leaves)} "
                f"leaves, but the plan was made for {len(want)}."
            )
        for (path, aval), x in zip(want, leaves, strict=True):
            _check_leaf(spec.fn_name, path, aval, x)
        return [self.program.invars[i] for i in index], leaves

    @property
    def batch_sharding(self) -> Any:
        """Where the program reads batch arguments: split over the data axis (if any),
        replicated otherwise. With several processes, build each batch leaf from the rows of
        the data-parallel replicas a process holds:
        ``jax.make_array_from_process_local_data(plan.batch_sharding, local_rows)``."""
        return self._runtime.emitted.batch_sharding

    def _last_stage_block(self, out: jax.Array) -> jax.Array:
        """The last stage's rows of a ``(p·B, ...)`` output: one device's array, or with a data
        axis an array split over the last stage's data-parallel devices (with several processes
        each holds its replicas' rows)."""
        rows = out.shape[0] // self.num_stages
        start = rows * (self.num_stages - 1)
        if self.data_axis is None:
            for shard in out.addressable_shards:
                if (shard.index[0].start or 0) == start:
                    return shard.data
            raise RuntimeError(
                "the last pipeline stage's output is not addressable from this process"
            )
        names = self.mesh.axis_names
        stage = np.take(
            self.mesh.devices, self.num_stages - 1, axis=names.index(self.pipeline_axis)
        )
        rest = [n for n in names if n != self.pipeline_axis]
        dp_pos = rest.index(self.data_axis)
        replicas = np.moveaxis(stage, dp_pos, 0).reshape(stage.shape[dp_pos], -1)[:, 0]
        sharding = NamedSharding(Mesh(replicas, (self.data_axis,)), P(self.data_axis))
        mine = {d: None for d in replicas}
        for shard in out.addressable_shards:
            lo = shard.index[0].start or 0
            if shard.device in mine and start <= lo < start + rows:
                mine[shard.device] = shard.data
        arrays = [a for a in mine.values() if a is not None]
        return jax.make_array_from_single_device_arrays((rows, *out.shape[1:]), sharding, arrays)


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Placed parameters and optimizer state: the parameter slots sharded over stages
    (`autopipe.passes.param_layout`) and the optimizer state laid out like them."""

    params: tuple[jax.Array, ...]
    opt_state: Any
    frozen: tuple = ()  # the non-float leaves of the parameter arguments, as given (not trained)


# a pytree (jax.block_until_ready, jax.tree.map, any pytree checkpointer see its arrays)
jax.tree_util.register_dataclass(
    TrainState, data_fields=["params", "opt_state", "frozen"], meta_fields=[]
)


def refuse_traced(leaves: Sequence[Any], where: str, hint: str) -> None:
    """A compiled plan runs on arrays; under jax.jit, jax.grad or jax.vmap its arguments are
    tracers, which the placement code would reject deep inside JAX."""
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        raise TypeError(
            f"{where}: it runs its compiled program on concrete arrays and cannot be traced "
            f"(it was called inside jax.jit, jax.grad or jax.vmap). {hint}"
        )


def check_live(state: Any, where: str) -> None:
    """Refuses a ``state`` that is not a `TrainState`, or one whose arrays an earlier step was
    given (`Plan.step` donates its state): passing a donated array to a compiled call crashes
    the whole process on jax 0.10.2's CPU client (segmentation fault) instead of raising."""
    if not isinstance(state, TrainState):
        raise TypeError(
            f"{where}: state is a {type(state).__name__}, not the TrainState that plan.init / "
            "plan.step return."
        )
    tree = {"params": state.params, "opt_state": state.opt_state}
    leaves = jax.tree.leaves(tree)  # on every step: paths only for the error
    dead = sum(isinstance(x, jax.Array) and x.is_deleted() for x in leaves)
    if dead:
        first = next(
            jax.tree_util.keystr(p, simple=True, separator=".")
            for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if isinstance(x, jax.Array) and x.is_deleted()
        )
        raise ValueError(
            f"{where}: {dead} of the state's {len(leaves)} arrays were donated to an "
            f"earlier plan.step (the first: {first}). plan.step "
            "consumes its state; keep only the state it returns: "
            "state, loss = plan.step(state, batch)."
        )


def place_buffers(
    packers: Sequence, buffers: Sequence, raw: dict, mesh: Any, axis: str
) -> tuple[Any, ...]:
    """The ``(p, ...)`` slot arrays of ``buffers`` filled by each stage's packer (`packers[s]`:
    jitted pack, the raw value ids it reads from ``raw``), run on that stage's devices."""
    per_stage = {}
    for s, (pack, ids) in enumerate(packers):
        # only stages with a device in this process (all of them in a single process)
        local = _distributed.local_devices(_stage_devices(mesh, axis, s))
        if local:
            per_stage[s] = pack(*[jax.device_put(raw[v], local[0]) for v in ids])
    out = []
    for k, buf in enumerate(buffers):
        arrays = [
            jax.device_put(per_stage[idx[0].start or 0][k][(slice(None), *idx[1:])], d)
            for d, idx in buf.sharding.addressable_devices_indices_map(buf.shape).items()
        ]
        out.append(jax.make_array_from_single_device_arrays(buf.shape, buf.sharding, arrays))
    return tuple(out)


def _check_leaf(fn_name: str, path: str, want: Any, x: Any) -> None:
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    got = (tuple(np.shape(x)), dtype)  # dtypes compare as is: PRNG keys have no numpy dtype
    if got != (tuple(want.shape), want.dtype):
        raise ValueError(
            f"plan for {fn_name}: argument {path} has shape {got[0]} and dtype {got[1]}, but "
            f"the plan was made for {tuple(want.shape)} {want.dtype}. Make a new plan for "
            "these shapes (the decorator does this automatically)."
        )


def nnx_merge(graphdef: Any, state: Any) -> Any:
    from flax import nnx

    return nnx.merge(graphdef, state)


def _stage_devices(mesh: Any, axis: str, stage: int) -> list[Any]:
    pos = mesh.axis_names.index(axis)
    return list(np.asarray(np.take(mesh.devices, stage, axis=pos)).reshape(-1))
