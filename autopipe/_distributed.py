"""Multi-process (multi-host) execution: one plan, the same in every process.

JAX's multi-controller runtime runs the same Python program in every process; each process
drives only its own (addressable) devices, and one jitted SPMD program spans them all. autopipe
keeps that model: every process calls ``autopipe.plan`` with the same function, arguments and
global mesh, gets the same plan (the search is deterministic: no process id, time or randomness
enters it), and calls it. On the first call of a plan in a multi-process run:

  - `check_mesh` refuses a mesh that leaves a process without devices (that process could not
    take part in the program and the others would wait for it);
  - `check_same_plan` compares a hash of ``plan.to_json()`` across processes and refuses to run,
    naming every process's hash, when they differ (different code, arguments or versions).

Then each process packs only the stages whose devices it owns; batch arguments must be the
same full batch in every process; outputs come back in the processes that hold a device of
the last stage (``None`` elsewhere).

`initialize` wraps ``jax.distributed.initialize`` with bounded timeouts and the CPU settings a
development run on one machine needs; `autopipe.launch` starts such a run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from autopipe import _compat

# The launcher (autopipe.launch) tells the processes it starts where they are through these
# variables, as torchrun or SLURM do; `initialize` reads them only for arguments left as None.
ENV_COORDINATOR = "AUTOPIPE_COORDINATOR"
ENV_NUM_PROCESSES = "AUTOPIPE_NUM_PROCESSES"
ENV_PROCESS_ID = "AUTOPIPE_PROCESS_ID"
ENV_CPU_DEVICES = "AUTOPIPE_CPU_DEVICES"
ENV_TIMEOUT = "AUTOPIPE_TIMEOUT"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_devices: int | None = None,
    timeout: int | None = None,
) -> None:
    """Joins this process to a multi-process JAX run (call it before any other JAX work).

    Arguments left as None come from `autopipe.launch` when it started this process, and
    otherwise from JAX's own cluster detection (SLURM, Open MPI, TPU pods, ...), exactly as
    ``jax.distributed.initialize()`` does.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordination service.
      num_processes, process_id: the run's size and this process's rank.
      local_device_ids: the accelerators this process drives (e.g. one GPU per process).
      cpu_devices: simulated CPU devices in this process; when set (or set by the launcher),
        CPU collectives use gloo so the CPU devices of different processes can talk.
      timeout: seconds to wait for every process to arrive, and after which a process that
        stopped sending heartbeats is declared dead; the others then stop with an error
        instead of waiting forever. Default 300 (JAX's default for arriving).
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    if cpu_devices is None:
        cpu_devices = _env_int(ENV_CPU_DEVICES)
    if timeout is None:
        timeout = _env_int(ENV_TIMEOUT) or 300
    if timeout < 1:
        raise ValueError(f"timeout must be at least 1 second, got {timeout}.")
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout,
        heartbeat_timeout_seconds=max(timeout, 2),
        shutdown_timeout_seconds=timeout,
    )


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def check_mesh(mesh: Any, fn_name: str) -> None:
    """Every process must own at least one device of the plan's mesh, and this process too."""
    owners = sorted({d.process_index for d in np.asarray(mesh.devices).flat})
    missing = sorted(set(range(jax.process_count())) - set(owners))
    if missing:
        raise ValueError(
            f"plan for {fn_name}: its mesh has {mesh.devices.size} devices owned by processes "
            f"{owners}, but {jax.process_count()} processes are running; processes {missing} own "
            "none of its devices and cannot take part in the program. Build the mesh over all "
            "processes' devices (jax.make_mesh(..., devices=jax.devices())), or start "
            f"{len(owners)} processes."
        )


def plan_hash(plan_json: str) -> str:
    return hashlib.sha256(plan_json.encode()).hexdigest()


def check_same_plan(plan_json: str, fn_name: str) -> None:
    """Compares the plan's hash across processes (a collective: every process must call it)."""
    digest = plan_hash(plan_json)
    words = np.frombuffer(bytes.fromhex(digest), dtype=np.int32)
    gathered = np.asarray(_compat.process_allgather(words)).reshape(jax.process_count(), -1)
    hashes = [row.astype(np.int32).tobytes().hex() for row in gathered]
    if len(set(hashes)) > 1:
        mine = jax.process_index()
        differ = [i for i, h in enumerate(hashes) if h != hashes[0]]
        listing = ", ".join(f"process {i}: {h[:16]}" for i, h in enumerate(hashes))
        raise RuntimeError(
            f"plan for {fn_name}: processes computed different plans ({listing}; this is "
            f"process {mine}, processes {differ} differ from process 0). Every process must "
            "plan the same function with the same argument shapes, mesh and options, with the "
            "same autopipe/jax versions; compare plan.to_json() between processes, or plan in "
            "one process and load the JSON everywhere with autopipe.Plan.from_json."
        )


def check_plan(plan: Any) -> None:
    """The first-call checks of a plan in a multi-process run (no-op in a single process)."""
    if not is_multiprocess():
        return
    check_mesh(plan.mesh, plan.fn_name)
    check_same_plan(plan.to_json(), plan.fn_name)


def owns_any(devices: Sequence[Any]) -> bool:
    me = jax.process_index()
    return any(d.process_index == me for d in devices)


def local_devices(devices: Sequence[Any]) -> list[Any]:
    me = jax.process_index()
    return [d for d in devices if d.process_index == me]
