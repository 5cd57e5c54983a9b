"""Device specs: the numbers the constraints, the speed-of-light figures and the cost model use.

Datasheet figures (dense, no sparsity). ``hbm_gbs`` is HBM bandwidth in GB/s, ``link_gbs`` the
per-GPU, per-direction bandwidth to peers in GB/s (NVLink through NVSwitch for NVIDIA HGX boards;
for MI300-class, one xGMI link per peer, fully connected), ``link_latency_us`` a one-way small
message latency. ``measured_hbm_fraction`` is what a large copy reaches in practice.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from tuneforge.errors import InputError


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    vendor: str                    # "nvidia" | "amd" | "cpu"
    sms: int                       # SMs / CUs
    smem_per_block: int            # bytes of shared memory / LDS one program may use
    hbm_gbs: float
    tflops: dict = field(default_factory=dict)   # by dtype name: "bf16", "fp16", "fp32" (fp32 = CUDA cores)
    memory_gb: float = 80
    l2_mb: float = 50
    link_gbs: float = 0.0
    link_latency_us: float = 2.0
    topology: str = "nvswitch"     # "nvswitch" (all-to-all at link_gbs) | "mesh" (one link per peer)
    features: frozenset = frozenset()   # "tma", "wgmma", "warp_specialize"
    measured_hbm_fraction: float = 0.90
    # one kernel's launch-to-launch gap inside a CUDA graph (the engine and the tuner replay graphs):
    # ~1.5-2 us on an H100 (bench_gate: the fused ops at 1 token take 1.5-1.9 us in all)
    launch_us: float = 1.0

    def peak_flops(self, dtype: str) -> float:
        return self.tflops[dtype] * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbs * 1e9

    def peer_bytes_per_s(self, world: int) -> float:
        """Aggregate bandwidth one GPU can push to all its peers at once."""
        if world <= 1:
            return float("inf")
        if self.topology == "mesh":      # one link per peer: more peers, more links
            return self.link_gbs * 1e9 * (world - 1)
        return self.link_gbs * 1e9


_H = frozenset({"tma", "wgmma", "warp_specialize"})
_B = frozenset({"tma", "warp_specialize"})      # Blackwell: its MMAs are tcgen05, it has no wgmma
SPECS: dict[str, DeviceSpec] = {s.name: s for s in [
    DeviceSpec("H100", "nvidia", 132, 232448, 3350, {"bf16": 989, "fp16": 989, "fp32": 67}, 80, 50,
               450, 2.5, "nvswitch", _H, measured_hbm_fraction=0.90),
    # H200: a 1 GiB device copy moves 4.24 TB/s (2026-12-01), 0.88 of the datasheet's 4.8
    DeviceSpec("H200", "nvidia", 132, 232448, 4800, {"bf16": 989, "fp16": 989, "fp32": 67}, 141, 60,
               450, 2.5, "nvswitch", _H, measured_hbm_fraction=0.88),
    DeviceSpec("H800", "nvidia", 132, 232448, 3350, {"bf16": 989, "fp16": 989, "fp32": 67}, 80, 50,
               200, 2.5, "nvswitch", _H, measured_hbm_fraction=0.90),
    DeviceSpec("A100", "nvidia", 108, 166912, 2039, {"bf16": 312, "fp16": 312, "fp32": 19.5}, 80, 40,
               300, 3.0, "nvswitch", frozenset(), measured_hbm_fraction=0.88),
    DeviceSpec("B200", "nvidia", 148, 232448, 8000, {"bf16": 2250, "fp16": 2250, "fp32": 80}, 180, 126,
               900, 2.0, "nvswitch", _B, measured_hbm_fraction=0.90),
    DeviceSpec("B300", "nvidia", 148, 232448, 8000, {"bf16": 2250, "fp16": 2250, "fp32": 75}, 288, 126,
               900, 2.0, "nvswitch", _B, measured_hbm_fraction=0.90),
    DeviceSpec("MI300X", "amd", 304, 65536, 5300, {"bf16": 1307, "fp16": 1307, "fp32": 163}, 192, 256,
               64, 3.5, "mesh", frozenset(), measured_hbm_fraction=0.80, launch_us=6.0),
    # MI308X: the export-limited MI300 part (80 CUs); public figures vary, these are estimates.
    DeviceSpec("MI308X", "amd", 80, 65536, 5300, {"bf16": 188, "fp16": 188, "fp32": 41}, 192, 256,
               64, 3.5, "mesh", frozenset(), measured_hbm_fraction=0.80, launch_us=6.0),
]}
ALIASES = {"H100-SXM": "H100", "H100 SXM": "H100", "H100_SXM": "H100", "MI300": "MI300X", "MI308": "MI308X"}
DEFAULT_TARGET = "H100"


def spec(name: str) -> DeviceSpec:
    """Look up a target by name (case-insensitive); a clear error names the known targets."""
    key = ALIASES.get(name, name)
    for n, s in SPECS.items():
        if n.lower() == key.lower():
            return s
    raise InputError(f"unknown target device {name!r}; known: {', '.join(SPECS)}")


def gpu_spec(gpu_name: str) -> DeviceSpec:
    """The table's spec for a GPU named as the driver names it (``NVIDIA H100 80GB HBM3``)."""
    gpu = gpu_name.upper().replace(" ", "")
    for n in sorted(SPECS, key=len, reverse=True):
        if n in gpu:
            return SPECS[n]
    return SPECS["H100"] if "NVIDIA" in gpu else SPECS["MI300X"]


def local_device() -> Optional[DeviceSpec]:
    """The spec of the GPU this process uses, matched by name; None without a GPU."""
    import torch
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    base = gpu_spec(props.name)
    # The local device's own counts win over the table's.
    smem = getattr(props, "shared_memory_per_block_optin", base.smem_per_block)
    return replace(base, name=base.name, sms=props.multi_processor_count, smem_per_block=smem,
                   memory_gb=round(props.total_memory / 2**30, 1))
