"""Seeing a plan: schedule timelines, the stage split, and a Chrome trace of the schedule.

Everything here is drawn from *predicted* times: a schedule table (`passes.schedule`) plus a
duration per action. Two timings are offered:

- ``"event"``: each device runs its actions in table order as soon as their inputs are ready
  (`schedule.simulate`); for forward-only plans its makespan is the planner's predicted step
  ``Σ tᵢ + (m − 1)·max tᵢ``.
- ``"lockstep"``: what one SPMD program executes: every tick lasts as long as the slowest
  device's work on that tick, and all devices start the next tick together
  (`schedule.lockstep`); for training plans its makespan is the planner's predicted step.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no global state),
so drawing works headless and never changes the caller's matplotlib backend. matplotlib is
imported only when a picture is drawn.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from autopipe.cost_models.durations import action_durations
from autopipe.cost_models.rules import transfer_time
from autopipe.passes.schedule import Action, Schedule, idle_share, lockstep, simulate

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from autopipe._plan import PlanRecord

Timing = Literal["event", "lockstep"]
Durations = dict[str, float] | Callable[[Action], float]
Times = dict[Action, tuple[float, float]]

KIND_NAMES = {"F": "forward", "B": "backward", "W": "weight grad"}
_HATCH = {"F": "", "B": "////", "W": "...."}
_IDLE = "#e4e4e4"


# --- timing ---------------------------------------------------------------------------------


def _as_callable(durations: Durations) -> Callable[[Action], float]:
    return durations if callable(durations) else (lambda a: durations[a.kind])


def plan_durations(plan: PlanRecord) -> Callable[[Action], float]:
    """Seconds per action of `plan.schedule` from the plan's per-stage predicted times, by the
    one action-duration model the planner prices the step with
    (`cost_models.durations.action_durations`): the picture's makespan is the predicted step."""
    return action_durations(
        [st.time for st in plan.stages],
        training=plan.schedule.training,
        split_backward=plan.schedule.split_backward,
        remat=plan.remat,
        store_times=[st.store_time for st in plan.stages],
        fused=plan.schedule.fused(),
    )


def timeline(
    schedule: Schedule, durations: Durations, *, timing: Timing = "event"
) -> tuple[Times, float]:
    """``({action: (start, end)}, makespan)`` of a schedule under the chosen timing."""
    cost = _as_callable(durations)
    if timing == "event":
        return simulate(schedule, cost)
    if timing != "lockstep":
        raise ValueError(f"timing={timing!r} is not one of 'event', 'lockstep'.")
    return lockstep(schedule, cost)


def bubble(schedule: Schedule, times: Times, makespan: float) -> float:
    """Idle share of the ``devices × makespan`` device-seconds."""
    return idle_share(schedule, times, makespan)


def _time_unit(span: float) -> tuple[str, float]:
    for name, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if span >= scale:
            return name, scale
    return "ns", 1e-9


def _bytes_unit(largest: float) -> tuple[str, float]:
    for name, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= scale:
            return name, scale
    return "B", 1.0


# --- schedule timeline ----------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | pathlib.Path | None) -> None:
    if path is not None:
        fig.savefig(path, dpi=110)


def _microbatch_colors(m: int) -> list[Any]:
    from matplotlib import colormaps

    if m <= 10:
        return [colormaps["tab10"](j) for j in range(m)]
    if m <= 20:
        return [colormaps["tab20"](j) for j in range(m)]
    return [colormaps["hsv"](j / m) for j in range(m)]


def draw_schedule(
    ax: Any,
    schedule: Schedule,
    durations: Durations,
    *,
    timing: Timing = "event",
    title: str | None = None,
) -> tuple[Times, float]:
    """Draws the device × time timeline on a matplotlib Axes; returns its times and makespan.

    One box per action, one `PolyCollection` per action kind (gid ``"F"``/``"B"``/``"W"``):
    colour = microbatch, F solid, B hatched, W dotted; grey is idle time (the bubble).
    """
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    times, makespan = timeline(schedule, durations, timing=timing)
    unit, scale = _time_unit(makespan)
    p, colors = schedule.num_devices, _microbatch_colors(schedule.num_microbatches)
    label_boxes = len(times) <= 400
    for kind in ("F", "B", "W"):
        acts = [a for a in times if a.kind == kind]
        if not acts:
            continue
        boxes, faces = [], []
        for a in acts:
            (x0, x1), y = (t / scale for t in times[a]), schedule.device_of(a.stage)
            boxes.append([(x0, y - 0.4), (x1, y - 0.4), (x1, y + 0.4), (x0, y + 0.4)])
            faces.append(colors[a.microbatch])
        coll = PolyCollection(
            boxes, facecolors=faces, edgecolors="black", linewidths=0.4, hatch=_HATCH[kind]
        )
        coll.set_gid(kind)
        ax.add_collection(coll)
        if label_boxes:
            _label_boxes(ax, schedule, acts, times, scale)
    ax.set_facecolor(_IDLE)
    ax.set_xlim(0, makespan / scale if makespan > 0 else 1)
    ax.set_ylim(p - 0.5, -0.5)
    ax.set_yticks(range(p) if p <= 32 else range(0, p, max(1, p // 16)))
    ax.set_ylabel("device")
    ax.set_xlabel(f"time ({unit}, {timing} timing)")
    frac = bubble(schedule, times, makespan)
    ax.set_title(
        title
        or f"{schedule.kind}: {p} devices, {schedule.num_stages} stages, "
        f"{schedule.num_microbatches} microbatches — step {makespan / scale:.3g} {unit}, "
        f"bubble {frac:.1%}",
        fontsize=10,
    )
    kinds = [k for k in ("F", "B", "W") if any(a.kind == k for a in times)]
    handles = [
        Patch(facecolor="white", edgecolor="black", hatch=_HATCH[k], label=KIND_NAMES[k])
        for k in kinds
    ]
    handles.append(Patch(facecolor=_IDLE, edgecolor="black", label="idle (bubble)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return times, makespan


def _label_boxes(ax: Any, schedule: Schedule, acts: Sequence[Action], times: Times, scale: float):
    from matplotlib.patheffects import withStroke

    virtual = schedule.virtual_stages > 1
    for a in acts:
        start, end = times[a]
        text = f"{a.stage}.{a.microbatch}" if virtual else str(a.microbatch)
        ax.text(
            (start + end) / 2 / scale,
            schedule.device_of(a.stage),
            text,
            ha="center",
            va="center",
            fontsize=7,
            clip_on=True,
            path_effects=[withStroke(linewidth=2, foreground="white")],
        )


def plot_schedule(
    schedule: Schedule,
    durations: Durations,
    path: str | pathlib.Path | None = None,
    *,
    timing: Timing = "event",
    title: str | None = None,
) -> Figure:
    """A timeline picture of `schedule` (see `draw_schedule`); saved to `path` when given."""
    p = schedule.num_devices
    width = min(20.0, max(8.0, 0.25 * schedule.num_ticks + 3))
    fig = _figure(width, min(24.0, 1.4 + 0.35 * p))
    draw_schedule(fig.subplots(), schedule, durations, timing=timing, title=title)
    _save(fig, path)
    return fig


def compare_schedules(
    schedules: Sequence[Schedule],
    durations: Durations | Sequence[Durations],
    path: str | pathlib.Path | None = None,
    *,
    timing: Timing = "event",
) -> Figure:
    """Timelines of several schedules stacked on one shared time axis. `durations` is one for
    all, or one per schedule (e.g. interleaved stages are 1/v of a device's layers)."""
    if isinstance(durations, dict) or callable(durations):
        durations = [durations] * len(schedules)
    height = sum(1.2 + 0.35 * s.num_devices for s in schedules)
    width = min(20.0, max(8.0, 0.25 * max(s.num_ticks for s in schedules) + 3))
    fig = _figure(width, min(30.0, height))
    axes = fig.subplots(len(schedules), 1, sharex=True, squeeze=False)[:, 0]
    makespans = [
        draw_schedule(ax, s, d, timing=timing)[1]
        for ax, s, d in zip(axes, schedules, durations, strict=True)
    ]
    unit, scale = _time_unit(max(makespans))
    for ax in axes:
        ax.set_xlim(0, max(makespans) / scale)
        ax.set_xlabel(f"time ({unit}, {timing} timing)" if ax is axes[-1] else "")
    _save(fig, path)
    return fig


# --- stages ---------------------------------------------------------------------------------


def plot_stages(
    plan: PlanRecord, layer_times: Sequence[float], path: str | pathlib.Path | None = None
) -> Figure:
    """The layer sequence coloured by stage (width = predicted forward time per layer, as
    the stage search priced it), then per stage its predicted time (compute + send) and
    memory (parameters + activations) against the limit."""
    times = list(layer_times)
    p = plan.num_stages
    colors = _stage_colors(p)
    fig = _figure(min(20.0, max(9.0, 0.3 * p + 6)), 7.5)
    strip, time_ax, mem_ax = fig.subplots(3, 1, height_ratios=(1, 2, 2))
    unit, scale = _time_unit(sum(times))
    x = 0.0
    for k, t in enumerate(times):
        s = _stage_of_layer(plan, k)
        strip.add_patch(_rect(x / scale, 0, t / scale, 1, colors[s], linewidth=0.2))
        x += t
    for st in plan.stages:
        lo = sum(times[: st.layers[0]]) / scale
        hi = sum(times[: st.layers[1]]) / scale
        strip.axvline(lo, color="black", linewidth=1.0)
        if p <= 32:
            strip.text((lo + hi) / 2, 1.08, str(st.index), ha="center", va="bottom", fontsize=8)
    strip.set_xlim(0, x / scale)
    strip.set_ylim(0, 1.3)
    strip.set_yticks([])
    strip.set_xlabel(f"layers in program order, width = predicted forward time ({unit})")
    strip.set_title(
        f"{plan.fn_name}: {plan.num_layers} layers in {p} stages "
        f"({plan.hardware.name}, {plan.num_microbatches} microbatches)",
        fontsize=10,
    )
    sends = [transfer_time(st.send_bytes, plan.hardware) for st in plan.stages]
    compute = [st.time - send for st, send in zip(plan.stages, sends, strict=True)]
    idx = range(p)
    t_unit, t_scale = _time_unit(max(st.time for st in plan.stages))
    time_ax.bar(idx, [c / t_scale for c in compute], color=colors, edgecolor="black", lw=0.4)
    time_ax.bar(
        idx,
        [s / t_scale for s in sends],
        bottom=[c / t_scale for c in compute],
        color="white",
        edgecolor="black",
        hatch="////",
        lw=0.4,
        label="send to next stage",
    )
    slowest = max(st.time for st in plan.stages) / t_scale
    time_ax.axhline(slowest, color="black", ls="--", lw=0.8, label="slowest stage")
    time_ax.set_ylabel(f"time / microbatch ({t_unit})")
    time_ax.legend(fontsize=8, loc="lower right")
    _stage_axis(time_ax, p)
    b_unit, b_scale = _bytes_unit(max(st.memory for st in plan.stages))
    params = [st.param_bytes / b_scale for st in plan.stages]
    acts = [max(0.0, st.memory - st.param_bytes) / b_scale for st in plan.stages]
    mem_ax.bar(idx, params, color=colors, edgecolor="black", lw=0.4, label="parameters")
    mem_ax.bar(
        idx,
        acts,
        bottom=params,
        color="white",
        edgecolor="black",
        hatch="....",
        lw=0.4,
        label="activations & buffers",
    )
    limit = plan.hardware.memory_bytes / b_scale
    if limit <= 4 * max(p_ + a for p_, a in zip(params, acts, strict=True)):
        mem_ax.axhline(limit, color="red", ls="--", lw=0.8, label=f"{plan.hardware.name} memory")
    mem_ax.set_ylabel(f"memory / device ({b_unit})")
    mem_ax.legend(fontsize=8, loc="lower right")
    _stage_axis(mem_ax, p)
    mem_ax.set_xlabel("stage")
    _save(fig, path)
    return fig


def _stage_colors(p: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"] if p <= 20 else colormaps["viridis"]
    return [cmap(s if p <= 20 else s / max(1, p - 1)) for s in range(p)]


def _stage_of_layer(plan: PlanRecord, layer: int) -> int:
    for st in plan.stages:
        if st.layers[0] <= layer < st.layers[1]:
            return st.index
    raise AssertionError(f"layer {layer} belongs to no stage")


def _rect(x: float, y: float, w: float, h: float, color: Any, **kw: Any) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, facecolor=color, edgecolor="black", **kw)


def _stage_axis(ax: Any, p: int) -> None:
    ax.set_xlim(-0.6, p - 0.4)
    ax.set_xticks(range(p) if p <= 32 else range(0, p, max(1, p // 16)))


# --- Chrome trace ---------------------------------------------------------------------------


def chrome_trace(
    schedule: Schedule,
    durations: Durations,
    *,
    timing: Timing = "event",
    name: str = "autopipe schedule",
) -> dict:
    """The schedule in Chrome's trace-event format (open in chrome://tracing or Perfetto).

    One process, one thread per device, one complete ("X") event per action, times in µs.
    """
    times, makespan = timeline(schedule, durations, timing=timing)
    ticks = schedule.ticks()
    events: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": name}},
    ]
    for d in range(schedule.num_devices):
        events.append(
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": d, "args": {"name": f"device {d}"}}
        )
        events.append(
            {"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": d, "args": {"sort_index": d}}
        )
    for a, (start, end) in sorted(times.items(), key=lambda kv: (kv[1][0], str(kv[0]))):
        events.append(
            {
                "name": f"{a.kind} stage {a.stage} mb {a.microbatch}",
                "cat": KIND_NAMES[a.kind],
                "ph": "X",
                "pid": 0,
                "tid": schedule.device_of(a.stage),
                "ts": start * 1e6,
                "dur": (end - start) * 1e6,
                "args": {"stage": a.stage, "microbatch": a.microbatch, "tick": ticks[a]},
            }
        )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "schedule": schedule.kind,
            "timing": timing,
            "makespan_s": makespan,
            "bubble_fraction": bubble(schedule, times, makespan),
        },
    }


def save_chrome_trace(
    schedule: Schedule,
    durations: Durations,
    path: str | pathlib.Path,
    *,
    timing: Timing = "event",
    name: str = "autopipe schedule",
) -> dict:
    trace = chrome_trace(schedule, durations, timing=timing, name=name)
    pathlib.Path(path).write_text(json.dumps(trace))
    return trace
