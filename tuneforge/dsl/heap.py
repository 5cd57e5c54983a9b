"""The symmetric heap: one arena per rank, the same size everywhere, every peer's base known.

A tensor carved from the heap sits at the same offset in every rank's arena, so a kernel turns a
pointer into its own copy into a pointer to peer ``p``'s copy with
``bases[p] + (ptr - bases[rank])`` (``tuneforge.dsl.comm.translate``). ``heap.bases`` holds the
bases *as addresses valid in this process*:

- ``cuda_ipc`` (GPUs; default): each rank allocates its arena with torch and exports a CUDA IPC
  handle; peers open it. Works between processes on one GPU and across GPUs of one host.
- ``torch_symm`` (distinct GPUs only; opt-in): torch's symmetric memory
  (``torch.distributed._symmetric_memory``); it refuses two ranks on one device.
- ``shm`` (CPU, Triton interpreter): each rank's arena is a file in /dev/shm mapped
  ``MAP_SHARED`` by every rank, so a peer's arena is addressable from this process.

Allocation is a bump allocator: ranks must make the same ``empty`` calls in the same order (as
SPMD code does), which keeps offsets symmetric. ``scope()`` frees what was allocated inside it.
Memory is handed out zero and allocating never writes it: ranks run ahead of each other, so a
peer may store into this rank's copy of a tensor before this rank has allocated it, and zeroing
it at allocation would erase that store. Instead every arena is zeroed before any rank learns the
bases (construction is complete on every rank, device work included, before it returns), and
``scope()`` re-zeroes what it frees, collectively, before any rank allocates it again.

``heap.context()`` gives the ``ctx`` that multi-rank templates receive: ``rank``, ``size``,
``device``, ``world``, ``heap``, ``channel(name, nbytes)`` (signals + staging for one op, see
``tuneforge.dsl.comm.Channel``), ``synchronize()`` (device sync, signal-timeout check, barrier) and
``capture(launch)`` (a CUDA graph of warmed communication launches, every rank synchronized around it).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Callable
from typing import Optional

import torch

from tuneforge.errors import InputError

ALIGN = 256          # bytes; every carved tensor starts on this boundary (vector loads, TMA)
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
TRANSPORTS = ("cuda_ipc", "torch_symm", "shm")


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class SymmetricHeap:
    """``SymmetricHeap(world, nbytes, transport="auto")``; collective: every rank constructs it."""

    def __init__(self, world, nbytes: int, transport: str = "auto"):
        if nbytes <= 0:
            raise InputError(f"heap size must be positive, got {nbytes} bytes")
        self.world = world
        self.rank, self.size, self.device = world.rank, world.size, world.device
        self.nbytes = _round_up(int(nbytes), ALIGN)
        if transport == "auto":
            transport = "cuda_ipc" if self.device.type == "cuda" else "shm"
        if transport not in TRANSPORTS:
            raise InputError(f"unknown heap transport {transport!r}; expected one of {TRANSPORTS}")
        if (transport == "shm") != (self.device.type == "cpu"):
            raise InputError(f"heap transport {transport!r} does not fit device {self.device}")
        if transport == "torch_symm" and world.shared_gpu:
            raise InputError("torch symmetric memory refuses several ranks on one GPU; use transport='cuda_ipc'")
        self.transport = transport
        self._peer_arenas: list[Optional[torch.Tensor]] = [None] * self.size
        self._keepalive: list = []
        self._offset = 0
        self._closed = False
        getattr(self, f"_open_{transport}")()
        self.arena = self._peer_arenas[self.rank]
        base_list = [int(a.data_ptr()) for a in self._peer_arenas]
        if any(b % ALIGN for b in base_list):   # translate() relies on it for vector accesses
            raise RuntimeError(f"heap arena not {ALIGN}-byte aligned: bases {[hex(b) for b in base_list]}")
        self.bases = torch.tensor(base_list, dtype=torch.int64, device=self.device)
        self._context = None
        # Every arena's zeroing has run (on the device too) before any rank may store into a peer's.
        world.synchronize()

    # --- transports --------------------------------------------------------------------------

    def _open_shm(self) -> None:
        if SHM_DIR is None:
            raise InputError("the CPU heap needs /dev/shm (shared memory files)")
        token = self.world.broadcast_object(uuid.uuid4().hex if self.rank == 0 else None)
        paths = [os.path.join(SHM_DIR, f"tuneforge-heap-{token}-{r}") for r in range(self.size)]
        own = torch.from_file(paths[self.rank], shared=True, size=self.nbytes, dtype=torch.uint8)
        own.zero_()
        self.world.barrier()                    # every file exists before anyone maps a peer's
        for r, path in enumerate(paths):
            self._peer_arenas[r] = own if r == self.rank else torch.from_file(
                path, shared=True, size=self.nbytes, dtype=torch.uint8)
        self.world.barrier()                    # every rank mapped every file: names can go
        os.unlink(paths[self.rank])             # mappings outlive the names; nothing leaks in /dev/shm

    def _open_cuda_ipc(self) -> None:
        own = torch.zeros(self.nbytes, dtype=torch.uint8, device=self.device)
        torch.cuda.synchronize(self.device)
        handle = own.untyped_storage()._share_cuda_()
        handles = self.world.all_gather_object((own.storage_offset(), handle))
        for r, (offset, h) in enumerate(handles):
            if r == self.rank:
                self._peer_arenas[r] = own
                continue
            storage = torch.UntypedStorage._new_shared_cuda(*h)
            peer = torch.empty(0, dtype=torch.uint8, device=self.device)
            peer.set_(storage, offset, (self.nbytes,), (1,))
            self._peer_arenas[r] = peer

    def _open_torch_symm(self) -> None:
        import torch.distributed._symmetric_memory as symm_mem
        own = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        own.zero_()
        handle = symm_mem.rendezvous(own, self.world.group.group_name)
        self._keepalive.append(handle)
        ptrs = list(handle.buffer_ptrs)
        for r in range(self.size):
            # Peers' buffers are known by address only; kernels reach them through ``bases``.
            self._peer_arenas[r] = own if r == self.rank else _AddressOnly(ptrs[r])

    # --- allocation --------------------------------------------------------------------------

    @property
    def used(self) -> int:
        return self._offset

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor at the next aligned offset (the same offset on every rank). It holds zeros, or
        what a peer that allocated it first has already stored into this rank's copy; it is not
        written here (see the module docstring)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        start = _round_up(self._offset, ALIGN)
        if start + nbytes > self.nbytes:
            raise InputError(f"symmetric heap full: {nbytes} bytes asked at offset {start} of {self.nbytes} "
                             f"(create SymmetricHeap(world, nbytes=...) larger)")
        self._offset = start + nbytes
        return self.arena[start:start + nbytes].view(dtype).view(shape)

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """``empty``: heap memory is handed out zero (zeroing here would erase a peer's early store)."""
        return self.empty(shape, dtype)

    def offset_of(self, t: torch.Tensor) -> int:
        """Byte offset of ``t`` in this rank's arena (raises if ``t`` is not on the heap)."""
        off = t.data_ptr() - self.arena.data_ptr()
        if not 0 <= off < self.nbytes:
            raise InputError("tensor is not on the symmetric heap")
        return off

    def peer_view(self, t: torch.Tensor, peer: int) -> torch.Tensor:
        """Peer ``peer``'s copy of heap tensor ``t`` as a tensor in this process (host-side checks and
        debugging; kernels use ``bases``). Contiguous tensors only; not for ``torch_symm`` peers."""
        arena = self._peer_arenas[peer]
        if isinstance(arena, _AddressOnly):
            raise InputError("peer_view is unavailable with transport 'torch_symm'")
        if not t.is_contiguous():
            raise InputError("peer_view needs a contiguous heap tensor")
        off = self.offset_of(t)
        nbytes = t.numel() * t.element_size()
        return arena[off:off + nbytes].view(t.dtype).view(t.shape)

    @contextlib.contextmanager
    def scope(self):
        """Tensors allocated inside are freed on exit and their memory zeroed again. Collective:
        every rank must enter and leave together; on a normal exit every rank's device work is done
        before the memory is zeroed, and every rank has zeroed it before any rank goes on. When an
        exception leaves the scope the ranks may have diverged, so the memory is zeroed on this rank
        alone (a collective could hang on a peer that never comes)."""
        mark = self._offset
        try:
            yield self
        except BaseException:
            self._free_to(mark, collective=False)
            raise
        self._free_to(mark, collective=True)

    def _free_to(self, mark: int, collective: bool) -> None:
        end, self._offset = self._offset, mark
        if end == mark:     # nothing allocated: the same on every rank, so no collective either
            return
        if collective:
            self.world.synchronize()        # no rank's kernels still read or write the memory
        self.arena[mark:end].zero_()
        if collective:
            self.world.synchronize()        # zero everywhere before any rank allocates it again

    # --- collectives and lifetime --------------------------------------------------------------

    def barrier(self) -> None:
        """Host barrier over the world (pair with a device synchronize for device writes)."""
        self.world.barrier()

    def context(self) -> "Context":
        if self._context is None:
            self._context = Context(self.world, self)
        return self._context

    def close(self) -> None:
        """Collective: drop peers' mappings once every rank is done with them."""
        if self._closed:
            return
        self._closed = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.world.barrier()
        self._peer_arenas = [None] * self.size
        self._keepalive.clear()
        self.world.barrier()

    def __enter__(self) -> "SymmetricHeap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AddressOnly:
    """A peer arena known only by its address (torch symmetric memory)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


class Context:
    """What multi-rank templates get as ``ctx``: the world, the heap and the ops' channels."""

    def __init__(self, world, heap: SymmetricHeap):
        self.world, self.heap = world, heap
        self.rank, self.size, self.device = world.rank, world.size, world.device
        self._channels: dict = {}

    def channel(self, name: str, nbytes: int):
        """The channel (signals, epoch, staging of ``nbytes`` per parity) of op ``name``; created on
        first use and grown when a larger message needs it (collective: all ranks call it alike)."""
        from tuneforge.dsl.comm import Channel
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = Channel(self.heap, name, nbytes)
        else:
            ch.ensure(nbytes)
        return ch

    @property
    def channels(self) -> dict:
        return dict(self._channels)

    def check(self) -> None:
        """Raise ``SignalTimeout`` if a wait of any channel expired (synchronizes the device)."""
        for ch in self._channels.values():
            ch.check()

    def synchronize(self) -> None:
        """Device sync, then the signal-timeout check, then a host barrier."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.check()
        self.world.barrier()

    def capture(self, launch: Callable[[], object]) -> torch.cuda.CUDAGraph:
        """A CUDA graph of ``launch`` (communication kernels on this context, already warmed:
        compiled, heap carved), captured on a side stream; every rank is synchronized before and
        after, so no rank captures while a peer still runs eager launches on the same signals."""
        self.synchronize()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            launch()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.synchronize()
        return graph
