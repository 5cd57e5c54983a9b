"""The KV cache: one preallocated tensor per rank, written in place, never reallocated (CUDA graphs
replay against its addresses).

Layout: ``kv[2, layers, batch, kv_heads, slots, head_dim]``; ``k = kv[0]`` and ``v = kv[1]`` are the
``[layers, batch, kv_heads, slots, head_dim]`` caches. Keeping K and V in one tensor lets a layer
write a step's keys and values with one indexed copy. Sequences are right-padded (see
tuneforge/engine/generate.py), so a token's place follows from its position alone and the cache needs
no per-sequence offsets. The model owns it (its forward writes and reads it); the engine allocates one
per Generator. Two ways to spread it over TP ranks:

- by heads (default): each rank holds its KV heads (``kv_heads`` of them; a replicated head when there
  are fewer KV heads than ranks) of every token, at slot = position (``slots = max_len``).
- by sequence (``world`` given, TP > 1): each rank holds every KV head of 1 / world of the tokens.
  Placement (``kernels/decode_attention_sp.place``): blocks of ``SHARD_BLOCK`` = 16 consecutive
  positions dealt round-robin over the ranks, so position ``p`` lives on rank ``(p // 16) % world``
  at slot ``(p // (16 world)) * 16 + p % 16``; a rank's tokens of a sequence are a prefix of its shard
  and every rank's share grows by at most one block more than another's. ``slots`` is the shard
  capacity (``shard_capacity(max_len, world)``) plus one spill slot: every rank runs the same indexed
  write and a token another rank owns lands in the spill slot (never read), which keeps the write
  free of host decisions and capturable. The tokens' K/V reach their owners (and decode's q reaches
  every rank) through the cache's own symmetric heap (``ctx``), sized and carved here for the largest
  prefill and decode batch, so nothing grows after warm-up (CUDA-graph safe).
"""
from __future__ import annotations

from typing import Optional

import torch

from tuneforge.dsl.comm import N_KINDS, MAX_SLOTS
from tuneforge.errors import InputError
from tuneforge.kernels import decode_attention_sp as SP

KV_SHARDS = ("heads", "sequence")


class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, *, world=None, exchange: Optional[dict] = None):
        """``world`` (a tuneforge World of size > 1): shard by sequence over its ranks; ``exchange``
        then sizes the heap: ``tokens`` (the largest prefill), ``qkv`` / ``kv`` (one rank's q|k|v and
        k|v widths of a token) and ``heads`` (all query heads)."""
        if min(layers, batch, kv_heads, max_len, head_dim) <= 0:
            raise InputError(f"KV cache sizes must be positive: layers={layers} batch={batch} "
                             f"kv_heads={kv_heads} max_len={max_len} head_dim={head_dim}")
        self.batch, self.max_len = batch, max_len
        self.sharded = world is not None
        self.ranks, self.rank, self.ctx = 1, 0, None
        slots = max_len
        if self.sharded:
            if world.size < 2:
                raise InputError(f"a KV cache sharded by sequence needs a world of 2 or more ranks, got {world.size}")
            missing = {"tokens", "qkv", "kv", "heads"} - set(exchange or {})
            if missing:
                raise InputError(f"a KV cache sharded by sequence needs exchange= with {sorted(missing)} "
                                 f"(the sizes its heap is carved for)")
            self.ranks, self.rank = world.size, world.rank
            self.capacity = SP.shard_capacity(max_len, world.size)
            slots = self.capacity + 1          # the spill slot
        self.kv = torch.zeros((2, layers, batch, kv_heads, slots, head_dim), dtype=dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]
        if self.sharded:
            self._open_exchange(world, batch, kv_heads, head_dim, dtype, **(exchange or {}))

    def _open_exchange(self, world, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                       tokens: int, qkv: int, kv: int, heads: int) -> None:
        """The heap for the all-gathers of new tokens' heads and for the attention's partials, with the
        channels carved at their largest sizes (collective)."""
        from tuneforge.dsl.heap import SymmetricHeap
        gather = world.size * max(tokens * kv, batch * qkv) * torch.empty((), dtype=dtype).element_size()
        partials = world.size * batch * heads * (head_dim + 1) * 4
        tile_flags = world.size * batch * kv_heads * 8
        signals = N_KINDS * world.size * MAX_SLOTS.value * 8 + 1024
        self.heap = SymmetricHeap(world, 2 * (gather + partials) + 2 * signals + tile_flags + 8 * 256)
        self.ctx = self.heap.context()
        self.ctx.channel("allgather", gather)
        self.ctx.channel(SP.OP, partials).tile_flags(world.size * batch * kv_heads)

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """This rank's cache slot of each token at ``positions``: the position itself split by heads;
        sharded by sequence its shard slot where this rank owns the position, the spill slot elsewhere.
        The same for every layer: a forward computes it once (``Step.slots``), each layer's write is the
        indexed copy alone."""
        if not self.sharded:
            return positions
        owner, slot = SP.place(positions, self.ranks)
        return torch.where(owner == self.rank, slot, self.capacity)

    def write(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store new keys and values: ``kv[b, t, 2, kv_heads, head_dim]`` of a token at cache row
        ``rows[b, t]`` and slot ``slots[b, t]`` (``slots``' answer; index tensors, so the copy is
        capturable in a CUDA graph). Sharded by sequence: ``kv`` holds every KV head, and the spill slot
        takes the tokens another rank owns; its heads may come as [groups, heads] (``kv[b, t, 2, groups,
        heads, head_dim]``, the ranks' head groups as gathered), written from that strided view as they
        are (merging the two dims would be a copy)."""
        planes = self.kv[:, layer]
        if kv.dim() == 6:
            planes = planes.unflatten(2, kv.shape[3:5])
        planes[:, rows, ..., slots, :] = kv

    def planes(self, layer: int) -> torch.Tensor:
        """The layer's k | v planes ``[2, batch, kv_heads, slots, head_dim]`` (a view), for a kernel that
        stores new tokens itself (``rope_qk_norm``'s cache store: slot = position, so not sharded)."""
        return self.kv[:, layer]

    def keys_values(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[batch, kv_heads, n, head_dim]`` of the first ``batch`` rows holding positions
        ``[0, length)``: ``n = length`` slots, or sharded by sequence this rank's shard of them."""
        n = SP.shard_capacity(length, self.ranks) if self.sharded else length
        return self.k[layer, :batch, :, :n], self.v[layer, :batch, :, :n]
