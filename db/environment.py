"""The environment fingerprint a winner was measured (or predicted) in.

A winner is only reused where the fingerprint matches: same GPU (name, SM count, memory), world
size, interconnect and torch / triton / driver versions. Predicted winners carry the target's
name and ``predicted=True``, so they never pass for measured ones.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Environment:
    gpu_name: str
    sm_count: int
    memory_gb: float
    world_size: int
    interconnect: str
    torch_version: str
    triton_version: str
    driver_version: str
    predicted: bool

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        how = "predicted" if self.predicted else "measured"
        return f"{self.gpu_name} x{self.world_size} ({how})"

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Environment":
        return Environment(**{k: d[k] for k in Environment.__dataclass_fields__})

    @staticmethod
    def local(world_size: int = 1, interconnect: str | None = None) -> "Environment":
        """This machine's GPU, measured. Raises if there is no GPU."""
        import torch
        import triton
        if not torch.cuda.is_available():
            raise RuntimeError("no GPU: use Environment.predicted(spec, world_size)")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        driver = torch.version.cuda or getattr(torch.version, "hip", None) or "unknown"
        if interconnect is None:
            interconnect = "single-gpu" if torch.cuda.device_count() < 2 or world_size == 1 else "nvlink-or-pcie"
        return Environment(props.name, props.multi_processor_count, round(props.total_memory / 2**30, 1),
                           world_size, interconnect, torch.__version__.split("+")[0], triton.__version__,
                           driver, False)

    @staticmethod
    def predicted(spec, world_size: int = 1) -> "Environment":
        """A target modelled by the cost model (``spec`` is a tuneforge.dsl.devices.DeviceSpec)."""
        import torch
        import triton
        return Environment(spec.name, spec.sms, float(spec.memory_gb), world_size,
                           f"{spec.topology}:{spec.link_gbs:g}GB/s", torch.__version__.split("+")[0],
                           triton.__version__, "cost-model", True)
