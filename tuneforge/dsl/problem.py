"""Problems: an op at one shape, dtype and world size, with a canonical key and token buckets."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Token buckets tuned by default: decode batch sizes and prefill chunk lengths.
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# KV-cache lengths decode attention is tuned at; a decode step uses the bucket of its cache length
# (its split count: a shorter view keeps the programs, kernels/decode_attention.split_count).
DECODE_CONTEXTS = (256, 1024, 4096, 16384, 65536, 131072)


@dataclass(frozen=True)
class Problem:
    """``dims`` is an ordered tuple of (name, size); the token dimension is always named ``m``."""

    op: str
    dims: tuple[tuple[str, int], ...]
    dtype: str = "bf16"
    world: int = 1

    @staticmethod
    def make(op: str, dtype: str = "bf16", world: int = 1, **dims: int) -> "Problem":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        return Problem(op, tuple((k, int(v)) for k, v in dims.items()), dtype, int(world))

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.dims)

    def __getitem__(self, name: str) -> int:
        return self.shape[name]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> str:
        """Canonical text key: ``op|m=16,n=1024,k=5120|bf16|w1``."""
        dims = ",".join(f"{k}={v}" for k, v in self.dims)
        return f"{self.op}|{dims}|{self.dtype}|w{self.world}"

    @staticmethod
    def from_key(key: str) -> "Problem":
        try:
            op, dims, dtype, world = key.split("|")
            pairs = tuple((k, int(v)) for k, v in (d.split("=") for d in dims.split(",") if d))
            return Problem(op, pairs, dtype, int(world.lstrip("w")))
        except ValueError as e:
            raise ValueError(f"malformed problem key {key!r}") from e

    def with_dims(self, **dims: int) -> "Problem":
        shape = self.shape
        shape.update(dims)
        return Problem(self.op, tuple(shape.items()), self.dtype, self.world)

    def __str__(self) -> str:
        return self.key


def serving_buckets(tuned: Sequence[int], buckets: Optional[Sequence[int]] = None) -> list[int]:
    """The tuned token counts whose winners serve other counts: those in ``buckets`` (every one where
    None); an exact shape off the bucket list serves only itself."""
    return [t for t in tuned if buckets is None or t in buckets]


def serving_bucket(tokens: int, tuned: Sequence[int], buckets: Optional[Sequence[int]] = None) -> Optional[int]:
    """The tuned token count whose winner serves ``tokens``: the smallest of ``serving_buckets`` >= tokens;
    None above every one (a miss): a config tuned for fewer rows says nothing about more (a 1-row
    split-K GEMM config ran a 4096-token prefill 4x slower than cuBLAS on an H200)."""
    above = [t for t in serving_buckets(tuned, buckets) if t >= tokens]
    return min(above) if above else None


def bucket(tokens: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The tuned bucket that serves ``tokens``: the smallest bucket >= tokens, else the largest."""
    if tokens < 0:
        raise ValueError(f"token count must be >= 0, got {tokens}")
    b = sorted(buckets)
    i = bisect.bisect_left(b, tokens)
    return b[min(i, len(b) - 1)]


def canonical_config(config: Mapping) -> str:
    """A stable text form of a config (for hashing, storage and tie-breaking)."""
    import json
    return json.dumps(dict(sorted(config.items())), separators=(",", ":"), default=str)
