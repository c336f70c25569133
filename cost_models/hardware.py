"""Hardware descriptions the planner prices plans against.

A `Hardware` is a frozen value: per-device peak compute and memory, and the link between
neighbouring devices of the pipeline axis. Presets carry vendor figures (dense, no sparsity);
`cpu` is a rough stand-in for this kind of machine until calibration fills it in.
Users define their own by constructing `Hardware(...)`.
"""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hardware:
    name: str
    peak_flops: float  # FLOP/s per device at the compute dtype (float32 unless stated)
    memory_bandwidth: float  # bytes/s per device (HBM or DRAM)
    memory_bytes: float  # capacity per device
    link_bandwidth: float  # bytes/s, one direction, between pipeline neighbours
    link_latency: float  # seconds per transfer
    op_overhead: float = 2e-6  # fixed seconds per operator (launch / dispatch)
    flops_efficiency: float = 0.6  # fraction of peak a typical matmul reaches
    bandwidth_efficiency: float = 0.7  # fraction of peak bandwidth a typical kernel reaches

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, Hardware] = {
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16 (67 TFLOP/s fp32 without tensor cores,
    # 495 TF32), 3.35 TB/s HBM3, 80 GB; NVLink 4: 900 GB/s total = 450 GB/s per direction.
    "h100": Hardware(
        name="h100",
        peak_flops=989e12,
        memory_bandwidth=3.35e12,
        memory_bytes=80e9,
        link_bandwidth=450e9,
        link_latency=5e-6,
    ),
    # NVIDIA V100 SXM2 datasheet: 125 TFLOP/s fp16 tensor, 900 GB/s HBM2, 32 GB; NVLink 2:
    # 300 GB/s total = 150 GB/s per direction.
    "v100": Hardware(
        name="v100",
        peak_flops=125e12,
        memory_bandwidth=900e9,
        memory_bytes=32e9,
        link_bandwidth=150e9,
        link_latency=8e-6,
    ),
    # This machine's class (2 cores, simulated devices share them): rough figures, to be
    # replaced by calibration.
    "cpu": Hardware(
        name="cpu",
        peak_flops=50e9,
        memory_bandwidth=10e9,
        memory_bytes=8 * GiB,
        link_bandwidth=5e9,
        link_latency=20e-6,
        op_overhead=5e-6,
    ),
}


def get_hardware(hardware: str | Hardware | None, *, platform: str = "cpu") -> Hardware:
    """Resolves a preset name (or None: the preset for `platform`) to a `Hardware`."""
    if isinstance(hardware, Hardware):
        return hardware
    key = hardware if hardware is not None else ("h100" if platform == "gpu" else "cpu")
    if key not in PRESETS:
        raise ValueError(
            f"hardware={key!r} is not a preset; choose one of {sorted(PRESETS)} or pass an "
            "autopipe.Hardware(...)."
        )
    return PRESETS[key]
