"""The KV cache: one preallocated tensor per rank, written in place, never reallocated (CUDA graphs
replay against its addresses).

Layout: ``kv[2, layers, batch, kv_heads, max_len, head_dim]``; ``k = kv[0]`` and ``v = kv[1]`` are the
``[layers, batch, kv_heads, max_len, head_dim]`` caches. Keeping K and V in one tensor lets a layer
write a step's keys and values with one indexed copy. A token's slot is its position (sequences are
right-padded, see tuneforge/engine/generate.py), so the cache needs no per-sequence offsets. The
model owns it (its forward writes and reads it); the engine allocates one per Generator.
"""
from __future__ import annotations

import torch

from tuneforge.errors import InputError


class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if min(layers, batch, kv_heads, max_len, head_dim) <= 0:
            raise InputError(f"KV cache sizes must be positive: layers={layers} batch={batch} "
                             f"kv_heads={kv_heads} max_len={max_len} head_dim={head_dim}")
        self.kv = torch.zeros((2, layers, batch, kv_heads, max_len, head_dim), dtype=dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]
        self.batch, self.max_len = batch, max_len

    def write(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store new keys and values: ``kv[b, t, 2, kv_heads, head_dim]`` goes to cache row ``rows[b, t]``
        at slot ``slots[b, t]`` (index tensors, so the copy is capturable in a CUDA graph)."""
        self.kv[:, layer][:, rows, :, slots] = kv

    def keys_values(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[batch, kv_heads, length, head_dim]`` of the first ``batch`` rows and ``length`` slots."""
        return self.k[layer, :batch, :, :length], self.v[layer, :batch, :, :length]
