"""Starts N JAX processes on this machine, for developing and testing multi-host runs.

    python -m autopipe.launch -n 2 --devices 4 [--timeout 60] [--pin] script.py [args ...]

Each process runs ``script.py`` with the coordinator on 127.0.0.1 at a free port; the script
calls ``autopipe.initialize()`` (before any other JAX work), which reads where it is from the
launcher and gives it ``--devices`` simulated CPU devices talking over gloo. ``--pin`` pins
process i to CPU core i (modulo the cores available), so stages really run apart.

The launcher never waits forever: when a process fails, the others get 2 × ``--timeout`` seconds to
end on their own (they normally stop with JAX's error about the dead peer), then are killed;
``--job-timeout`` bounds the whole run. Its exit status is the first failing process's (or 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from autopipe._distributed import (
    ENV_COORDINATOR,
    ENV_CPU_DEVICES,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ENV_TIMEOUT,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessResult:
    process_id: int
    returncode: int  # negative: killed by that signal (e.g. by the launcher's timeout)
    stdout: str
    stderr: str
    killed: bool  # the launcher ended it (a peer failed, or the job timed out)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(process_id: int, num_processes: int, devices: int, port: int, timeout: int) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # a forced host device count would override --devices
    env.update(
        {
            ENV_COORDINATOR: f"127.0.0.1:{port}",
            ENV_NUM_PROCESSES: str(num_processes),
            ENV_PROCESS_ID: str(process_id),
            ENV_CPU_DEVICES: str(devices),
            ENV_TIMEOUT: str(timeout),
            "JAX_PLATFORMS": "cpu",
        }
    )
    return env


def _pinner(core: int | None):
    if core is None:
        return None
    return lambda: os.sched_setaffinity(0, {core})


def launch(
    command: Sequence[str],
    *,
    num_processes: int,
    devices: int = 1,
    timeout: int = 60,
    grace: float | None = None,
    job_timeout: float | None = None,
    pin: bool = False,
    capture: bool = True,
) -> list[ProcessResult]:
    """Runs ``command`` (e.g. ``[sys.executable, "script.py"]``) as `num_processes` processes
    of one JAX run on this machine; returns one `ProcessResult` per process, in rank order.

    ``timeout``: seconds each process waits for its peers in ``autopipe.initialize`` (arrival
    and heartbeats). ``grace``: seconds the launcher gives the others to end on their own once
    one has failed (default 2 × timeout, so JAX's own dead-peer error comes first).
    ``job_timeout``: seconds after which every process still running is killed.
    """
    if num_processes < 1 or devices < 1:
        raise ValueError(f"need num_processes ≥ 1 and devices ≥ 1, got {num_processes}, {devices}")
    port = free_port()
    cores = sorted(os.sched_getaffinity(0))
    # files, not pipes: a chatty process must never block on a full pipe nobody reads yet
    files = [
        (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) if capture else (None, None)
        for _ in range(num_processes)
    ]
    procs = [
        subprocess.Popen(
            list(command),
            env=_env(i, num_processes, devices, port, timeout),
            stdout=files[i][0],
            stderr=files[i][1],
            text=True,
            preexec_fn=_pinner(cores[i % len(cores)] if pin else None),
        )
        for i in range(num_processes)
    ]
    grace = 2 * timeout if grace is None else grace
    killed = _supervise(procs, grace=grace, job_timeout=job_timeout)
    results = []
    for i, p in enumerate(procs):
        p.wait()
        out, err = (_read(f) for f in files[i])
        results.append(
            ProcessResult(
                process_id=i, returncode=p.returncode, stdout=out, stderr=err, killed=i in killed
            )
        )
    return results


def _read(f) -> str:
    if f is None:
        return ""
    with f:
        f.seek(0)
        return f.read()


def _supervise(procs: list, *, grace: float, job_timeout: float | None) -> set[int]:
    """Waits for the processes; kills the rest `grace` s after a failure or at job_timeout."""
    started, failed_at, killed = time.monotonic(), None, set()
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now
        late = failed_at is not None and now - failed_at > grace
        if late or (job_timeout is not None and now - started > job_timeout):
            for i, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    killed.add(i)
            break
        time.sleep(0.05)
    return killed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m autopipe.launch",
        description="Start N JAX processes of one run on this machine (CPU, gloo collectives).",
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--devices", type=int, default=1, help="CPU devices per process")
    parser.add_argument("--timeout", type=int, default=60, help="seconds to wait for peers")
    parser.add_argument("--job-timeout", type=float, default=None, help="kill all after this")
    parser.add_argument("--pin", action="store_true", help="pin process i to CPU core i")
    parser.add_argument("script", help="the Python script every process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    results = launch(
        [sys.executable, ns.script, *ns.args],
        num_processes=ns.num_processes,
        devices=ns.devices,
        timeout=ns.timeout,
        job_timeout=ns.job_timeout,
        pin=ns.pin,
        capture=False,
    )
    failed = [r for r in results if r.returncode != 0]
    for r in failed:
        how = "killed by the launcher" if r.killed else f"exit status {r.returncode}"
        print(f"autopipe.launch: process {r.process_id} failed ({how})", file=sys.stderr)
    return failed[0].returncode if failed and failed[0].returncode > 0 else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
