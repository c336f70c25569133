"""Hardware descriptions the planner prices plans against.

A `Hardware` is a frozen value describing one kind of device and the cluster it sits in:

- the device: peak dense FLOP/s per dtype (`peak_flops` is the headline rate — bf16/fp16 on
  accelerators — and `flops_by_dtype` refines it per dtype), memory capacity and bandwidth;
- the cluster: `devices_per_node` devices share the fast intra-node link (`link_bandwidth`,
  `link_latency`: NVLink / ICI); nodes talk over `inter_node_bandwidth`/`inter_node_latency`
  (InfiniBand / DCN). `axis_link` says which of the two a mesh axis crosses;
- fitted factors: achievable fractions of peak (`flops_efficiency`, `bandwidth_efficiency`), a
  fixed per-operator overhead, and a fusion discount for elementwise traffic. Presets carry
  typical values; `autopipe.calibrate()` measures them on the machine at hand.

Presets are vendor datasheet figures (dense, no sparsity), cited next to each. `cpu` is a rough
stand-in for this kind of machine until `autopipe.calibrate()` replaces it with measurements.
Users define their own with `Hardware(...)`, or load a calibrated profile with
`load_hardware(path)` (`autopipe.plan(..., hardware="profile.json")` does it for them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GiB = 1024**3

_DTYPE_CLASSES = {
    "float64": "float64",
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "int8": "int8",
    "uint8": "int8",
}


def dtype_class(dtype: Any) -> str:
    """The name `flops_by_dtype` is keyed by: 'float32', 'bfloat16', 'float8', 'int8', …"""
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name.startswith("float8"):
        return "float8"
    return _DTYPE_CLASSES.get(name, name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Link:
    """One alpha-beta link: seconds = latency + bytes / bandwidth (bandwidth one direction)."""

    bandwidth: float
    latency: float

    def time(self, nbytes: float, steps: float = 1.0) -> float:
        if nbytes <= 0 and steps <= 0:
            return 0.0
        return steps * self.latency + nbytes / self.bandwidth


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hardware:
    name: str
    peak_flops: float  # dense FLOP/s per device at the headline dtype (bf16/fp16; fp32 on CPU)
    memory_bandwidth: float  # bytes/s per device (HBM or DRAM)
    memory_bytes: float  # capacity per device
    link_bandwidth: float  # bytes/s, one direction, between devices of one node (NVLink/ICI)
    link_latency: float  # seconds per message on that link
    op_overhead: float = 2e-6  # fixed seconds per operator (launch / dispatch)
    flops_efficiency: float = 0.6  # fraction of peak a typical matmul reaches
    bandwidth_efficiency: float = 0.7  # fraction of peak bandwidth a typical kernel reaches
    # --- refinements (all optional; defaults keep the flat model above) -----------------------
    flops_by_dtype: tuple[tuple[str, float], ...] = ()  # dense matmul FLOP/s per dtype class
    vector_flops: float | None = None  # achievable FLOP/s of non-matmul arithmetic; None = matmul's
    conv_efficiency: float = 1.0  # convolutions' achievable rate relative to matmuls'
    # fixed seconds per matmul/convolution kernel beyond op_overhead (Hockney's n½ / rate): a
    # GEMM of a microbatch's few rows or one attention head runs below the rate, so more and
    # smaller microbatches cost more than their FLOPs; 0 = the flat roofline
    matmul_overhead: float = 0.0
    transcendental_time: float = 0.0  # extra seconds per exp/log/tanh/erf element
    fusion_discount: float = 0.5  # share of elementwise/layout bytes that fusion removes
    devices_per_node: int = 8  # devices sharing the fast link
    inter_node_bandwidth: float | None = None  # bytes/s one direction per device; None = link
    inter_node_latency: float | None = None  # seconds; None = link_latency
    # the backend copies a parameter out of autopipe's flat parameter buffer before a GEMM or
    # convolution library call reads it (measured on XLA:CPU; the stage DP then counts it)
    copies_library_operands: bool = False
    source: str = ""  # where the figures come from (datasheet, or "calibrated on …")

    def __post_init__(self) -> None:
        pairs = self.flops_by_dtype
        if isinstance(pairs, Mapping):
            pairs = pairs.items()
        normal = tuple(sorted((dtype_class(k), float(v)) for k, v in pairs))
        object.__setattr__(self, "flops_by_dtype", normal)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["flops_by_dtype"] = dict(self.flops_by_dtype)
        return d

    def matmul_flops(self, dtype: Any) -> float:
        """Peak dense matmul FLOP/s for operands of `dtype` (the headline rate if not listed)."""
        return dict(self.flops_by_dtype).get(dtype_class(dtype), self.peak_flops)

    @property
    def vector_rate(self) -> float:
        """Achievable FLOP/s of arithmetic outside matmuls."""
        if self.vector_flops is not None:
            return self.vector_flops
        return self.peak_flops * self.flops_efficiency

    @property
    def intra_node(self) -> Link:
        return Link(bandwidth=self.link_bandwidth, latency=self.link_latency)

    @property
    def inter_node(self) -> Link:
        bw = self.inter_node_bandwidth
        lat = self.inter_node_latency
        return Link(
            bandwidth=self.link_bandwidth if bw is None else bw,
            latency=self.link_latency if lat is None else lat,
        )

    def axis_link(self, mesh_axes: Sequence[tuple[str, int]], axis: str) -> Link:
        """The link a mesh axis crosses, devices numbered row-major over `mesh_axes`.

        An axis of size n whose stride (product of the sizes of later axes) is s spans a block
        of n·s consecutive devices: within one node when n·s ≤ devices_per_node.
        """
        sizes = dict(mesh_axes)
        names = [n for n, _ in mesh_axes]
        if axis not in sizes:
            raise ValueError(f"mesh axes {tuple(names)} have no axis {axis!r}.")
        stride = math.prod(sizes[n] for n in names[names.index(axis) + 1 :])
        span = sizes[axis] * stride
        return self.intra_node if span <= self.devices_per_node else self.inter_node

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)


def load_hardware(path: str | os.PathLike) -> Hardware:
    """Loads a `Hardware` saved by `Hardware.save` (e.g. a profile from `autopipe.calibrate`)."""
    with open(path) as f:
        data = json.load(f)
    data = data.get("hardware", data)  # a whole calibration report is accepted too
    known = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{os.fspath(path)!r} is not an autopipe hardware profile: unknown fields {unknown} "
            f"(expected fields of autopipe.Hardware: {sorted(known)})."
        )
    return Hardware(**data)


_NVLINK = "intra-node NVLink per direction = half the datasheet's bidirectional total"

PRESETS: dict[str, Hardware] = {
    # NVIDIA H100 SXM5 datasheet: dense BF16/FP16 989 TFLOP/s, TF32 495 (what XLA uses for
    # fp32 matmuls), FP8 1979, FP32 (no tensor cores) 67; 80 GB HBM3 at 3.35 TB/s; NVLink 4
    # 900 GB/s. Inter-node: one 400 Gb/s ConnectX-7 NDR port per GPU (DGX H100) = 50 GB/s.
    "h100": Hardware(
        name="h100",
        peak_flops=989e12,
        memory_bandwidth=3.35e12,
        memory_bytes=80e9,
        link_bandwidth=450e9,
        link_latency=5e-6,
        flops_by_dtype=(
            ("float32", 495e12),
            ("bfloat16", 989e12),
            ("float16", 989e12),
            ("float8", 1979e12),
        ),
        inter_node_bandwidth=50e9,
        inter_node_latency=10e-6,
        source=f"NVIDIA H100 SXM5 datasheet (dense); {_NVLINK}",
    ),
    # NVIDIA H200 SXM datasheet: same tensor-core rates as H100 SXM (989 BF16 dense, 1979 FP8);
    # 141 GB HBM3e at 4.8 TB/s; NVLink 900 GB/s; 400 Gb/s NDR per GPU across nodes.
    "h200": Hardware(
        name="h200",
        peak_flops=989e12,
        memory_bandwidth=4.8e12,
        memory_bytes=141e9,
        link_bandwidth=450e9,
        link_latency=5e-6,
        flops_by_dtype=(
            ("float32", 495e12),
            ("bfloat16", 989e12),
            ("float16", 989e12),
            ("float8", 1979e12),
        ),
        inter_node_bandwidth=50e9,
        inter_node_latency=10e-6,
        source=f"NVIDIA H200 SXM datasheet (dense); {_NVLINK}",
    ),
    # NVIDIA A100 80GB SXM datasheet: BF16/FP16 312 TFLOP/s dense, TF32 156, FP32 19.5;
    # 80 GB HBM2e at 2,039 GB/s; NVLink 3 600 GB/s; 200 Gb/s HDR per GPU (DGX A100) = 25 GB/s.
    "a100_80gb": Hardware(
        name="a100_80gb",
        peak_flops=312e12,
        memory_bandwidth=2.039e12,
        memory_bytes=80e9,
        link_bandwidth=300e9,
        link_latency=6e-6,
        flops_by_dtype=(
            ("float32", 156e12),
            ("bfloat16", 312e12),
            ("float16", 312e12),
            ("int8", 624e12),
        ),
        inter_node_bandwidth=25e9,
        inter_node_latency=10e-6,
        source=f"NVIDIA A100 80GB SXM datasheet (dense); {_NVLINK}",
    ),
    # NVIDIA A100 40GB SXM datasheet: same compute as the 80GB part; 40 GB HBM2 at 1,555 GB/s.
    "a100_40gb": Hardware(
        name="a100_40gb",
        peak_flops=312e12,
        memory_bandwidth=1.555e12,
        memory_bytes=40e9,
        link_bandwidth=300e9,
        link_latency=6e-6,
        flops_by_dtype=(
            ("float32", 156e12),
            ("bfloat16", 312e12),
            ("float16", 312e12),
            ("int8", 624e12),
        ),
        inter_node_bandwidth=25e9,
        inter_node_latency=10e-6,
        source=f"NVIDIA A100 40GB SXM datasheet (dense); {_NVLINK}",
    ),
    # NVIDIA V100 SXM2 datasheet: FP16 tensor 125 TFLOP/s, FP32 15.7 (no TF32, no bf16 tensor
    # cores); 32 GB HBM2 at 900 GB/s; NVLink 2 300 GB/s; 100 Gb/s EDR per GPU (DGX-1).
    "v100": Hardware(
        name="v100",
        peak_flops=125e12,
        memory_bandwidth=900e9,
        memory_bytes=32e9,
        link_bandwidth=150e9,
        link_latency=8e-6,
        flops_by_dtype=(("float32", 15.7e12), ("float16", 125e12), ("bfloat16", 15.7e12)),
        inter_node_bandwidth=12.5e9,
        inter_node_latency=12e-6,
        source=f"NVIDIA V100 SXM2 datasheet; {_NVLINK}",
    ),
    # Google Cloud TPU v4 docs: 275 TFLOP/s bf16/int8 per chip, 32 GiB HBM2 at 1,200 GB/s,
    # 3D torus ICI (4,096-chip pod). ICI per neighbour link ≈ 50 GB/s (approximation, not on
    # the docs page); multislice over DCN ≈ 6.25 GB/s per chip (approximation).
    "tpu_v4": Hardware(
        name="tpu_v4",
        peak_flops=275e12,
        memory_bandwidth=1.2e12,
        memory_bytes=32 * GiB,
        link_bandwidth=50e9,
        link_latency=5e-6,
        flops_by_dtype=(("bfloat16", 275e12), ("int8", 275e12)),
        devices_per_node=4096,
        inter_node_bandwidth=6.25e9,
        inter_node_latency=30e-6,
        source="Google Cloud TPU v4 system architecture page; ICI/DCN link figures approximate",
    ),
    # Google Cloud TPU v5e docs: 197 TFLOP/s bf16, 394 TOP/s int8, 16 GB HBM2 at 819 GB/s,
    # ICI 1,600 Gb/s per chip (2D torus, 256-chip pod) = 200 GB/s over 4 links ≈ 50 GB/s each.
    "tpu_v5e": Hardware(
        name="tpu_v5e",
        peak_flops=197e12,
        memory_bandwidth=819e9,
        memory_bytes=16e9,
        link_bandwidth=50e9,
        link_latency=5e-6,
        flops_by_dtype=(("bfloat16", 197e12), ("int8", 394e12)),
        devices_per_node=256,
        inter_node_bandwidth=6.25e9,
        inter_node_latency=30e-6,
        source="Google Cloud TPU v5e system architecture page; DCN figure approximate",
    ),
    # Google Cloud TPU v5p docs: 459 TFLOP/s bf16 (and fp8) per chip, 95 GiB HBM at
    # 2,765 GB/s, bidirectional ICI 1,200 GB/s per chip over 6 links (3D torus, 8,960-chip
    # pod) = 100 GB/s per link per direction, DCN 50 Gb/s per chip = 6.25 GB/s.
    "tpu_v5p": Hardware(
        name="tpu_v5p",
        peak_flops=459e12,
        memory_bandwidth=2.765e12,
        memory_bytes=95 * GiB,
        link_bandwidth=100e9,
        link_latency=5e-6,
        flops_by_dtype=(("bfloat16", 459e12), ("float8", 459e12), ("int8", 918e12)),
        devices_per_node=8960,
        inter_node_bandwidth=6.25e9,
        inter_node_latency=30e-6,
        source="Google Cloud TPU v5p system architecture page",
    ),
    # This machine's class (2 cores, simulated devices share them): rough figures, to be
    # replaced by `autopipe.calibrate()`.
    "cpu": Hardware(
        name="cpu",
        peak_flops=50e9,
        memory_bandwidth=10e9,
        memory_bytes=8 * GiB,
        link_bandwidth=5e9,
        link_latency=20e-6,
        op_overhead=5e-6,
        copies_library_operands=True,
        source="rough defaults for a small CPU host; run autopipe.calibrate() to measure",
    ),
}
PRESETS["h100_sxm"] = PRESETS["h100"]
PRESETS["a100"] = PRESETS["a100_80gb"]


def get_hardware(
    hardware: str | os.PathLike | Hardware | Mapping | Any | None,
    *,
    platform: str = "cpu",
    device_kind: str = "",
) -> Hardware:
    """Resolves the planner's ``hardware=`` argument to a `Hardware`.

    Accepts a `Hardware`, what `autopipe.calibrate()` returns (its ``.hardware``), a preset
    name, a path to a JSON profile (from `autopipe.calibrate` or `Hardware.save`), a dict of
    `Hardware` fields, or None (the preset for the devices: `default_preset`).
    """
    if isinstance(hardware, Hardware):
        return hardware
    if isinstance(getattr(hardware, "hardware", None), Hardware):  # a Calibration
        return hardware.hardware
    if isinstance(hardware, Mapping):
        return Hardware(**hardware)
    if hardware is not None and (
        isinstance(hardware, os.PathLike) or str(hardware).endswith(".json")
    ):
        return load_hardware(hardware)
    key = hardware if hardware is not None else default_preset(platform, device_kind)
    if not isinstance(key, str) or key not in PRESETS:
        raise ValueError(
            f"hardware={key!r} is not a preset; choose one of {sorted(PRESETS)}, pass an "
            "autopipe.Hardware(...), what autopipe.calibrate() returns, or the path of a "
            "profile saved by autopipe.calibrate()."
        )
    return PRESETS[key]


_TPU_KINDS = (("v5p", "tpu_v5p"), ("v5 lite", "tpu_v5e"), ("v5e", "tpu_v5e"), ("v4", "tpu_v4"))


def default_preset(platform: str, device_kind: str = "") -> str:
    """The preset for ``hardware=None``: by the mesh's platform ("cpu", "gpu", "tpu") and,
    for TPUs, the device kind jax reports ("TPU v4", "TPU v5 lite", "TPU v5p", ...)."""
    if platform == "gpu":
        return "h100"
    if platform == "tpu":
        kind = device_kind.lower()
        return next((name for key, name in _TPU_KINDS if key in kind), "tpu_v5e")
    return "cpu"
