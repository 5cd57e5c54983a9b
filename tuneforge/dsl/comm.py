"""Device-side communication verbs (``@triton.jit``) and the host side of one op's signals.

Verbs, called from inside kernels (plain Triton, portable; Iris-style):

    translate(ptr, from_rank, to_rank, bases)          # my heap pointer -> the peer's copy
    remote_load(base, offs, rank, peer, bases, mask)          # tl.load of base[offs] in the peer's copy
    remote_store(base, offs, value, rank, peer, bases, mask)  # tl.store into base[offs] of the peer's copy
    signal(flags, kind, slot, epoch, rank, peer, world, bases)         # release a channel flag at the peer
    wait(flags, kind, slot, epoch, peer, world, state, max_spins) -> ok   # acquire, bounded
    release(flag, epoch) / signal_flag(flag, epoch, rank, peer, bases)  # any flag (``tile_flags``): mine / the peer's
    wait_flag(flag, epoch, state, max_spins, peer, kind, slot) -> ok    # acquire any flag, bounded
    signal_peers(...) / wait_peers(...) -> count; barrier(...) -> ok     # all other ranks
    epoch_begin(state) -> epoch; epoch_end(state, epoch)   # once per program, first/last thing

Signals are epoch-based: the flag ``flags[kind, src, slot]`` in rank ``dst``'s heap holds the
latest epoch rank ``src`` signalled; a wait for epoch ``e`` passes once the flag is ``>= e``. The
epoch lives in device memory (``state``): every program reads ``epoch = state[EPOCH] + 1`` at
start and the last program of the launch to finish stores it back. Nothing is cleared between
calls, so the same kernels work across tuning trials and inside CUDA-graph replays (the graph
replays the increment). Kernels on one stream run in order, which is what makes the last-program
update safe; one channel must therefore be used from one stream at a time.

Every wait is bounded: after ``max_spins`` polls (the channel converts its timeout in seconds with
a calibrated poll rate) it records peer/kind/slot/epoch in ``state`` and returns False, and later
waits of that launch return at once. The host calls ``Channel.check()`` (or ``ctx.synchronize()``)
after the kernel and raises ``tuneforge.errors.SignalTimeout`` naming rank, peer and signal. A
channel that timed out has ranks at different epochs: ``reset()`` it (collective) or rebuild the world.

Performance note: translate a *scalar* base pointer once per peer and add the offsets after
(``translate(buf, rank, q, bases) + offs``, what ``remote_load`` / ``remote_store`` do): Triton's
contiguity analysis then still sees contiguous offsets and vectorizes; translating a block of
pointers goes through integers and loses it.

Interpreter rule: programs of one launch run one after another, so program ``p`` must only wait
for program ``p`` of the peers (never for a later program of its own launch). The collectives
here give each program its own signal slot.

Staging data follow the epoch's parity (``epoch % 2``): a buffer written in call ``e`` is next
written in call ``e + 2``, and every rank has waited for every peer in call ``e + 1`` before that,
so no peer can still be reading it -- one signal round per phase, no end-of-call barrier.
"""
from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

import tuneforge
from tuneforge.errors import SignalTimeout

MAX_SLOTS = tl.constexpr(256)   # signal slots per (kind, source rank): one per program, at most
N_KINDS = 4                     # signal kinds per channel (phases of one op)
# state words (int64, local to each rank)
EPOCH = tl.constexpr(0)
ARRIVALS = tl.constexpr(1)
ERR_FLAG = tl.constexpr(2)
ERR_PEER = tl.constexpr(3)
ERR_KIND = tl.constexpr(4)
ERR_SLOT = tl.constexpr(5)
ERR_EPOCH = tl.constexpr(6)
ERR_SEEN = tl.constexpr(7)
STATE_WORDS = 8


# --- verbs -----------------------------------------------------------------------------------------

@triton.jit
def translate(ptr, from_rank, to_rank, bases):
    """``ptr`` (a pointer or block of pointers into ``from_rank``'s heap) as the same place in
    ``to_rank``'s heap."""
    from_base = tl.load(bases + from_rank)
    to_base = tl.load(bases + to_rank)
    # Arenas start on 256-byte boundaries, so the distance is a whole number of 16-element groups;
    # saying so keeps Triton's alignment analysis (and vector loads/stores) intact.
    delta = tl.multiple_of((to_base - from_base) // (ptr.dtype.element_ty.primitive_bitwidth // 8), 16)
    return ptr + delta


@triton.jit
def remote_load(base, offs, rank, peer, bases, mask):
    """``base[offs]`` in ``peer``'s heap (masked lanes 0); ``base`` a scalar pointer (performance note)."""
    return tl.load(translate(base, rank, peer, bases) + offs, mask=mask, other=0.0)


@triton.jit
def remote_store(base, offs, value, rank, peer, bases, mask):
    """``base[offs] = value`` in ``peer``'s heap; ``base`` a scalar pointer (performance note)."""
    tl.store(translate(base, rank, peer, bases) + offs, value, mask=mask)


@triton.jit
def flag_ptr(flags, kind, src, slot, world):
    """Where rank ``src``'s signal ``kind``/``slot`` lands in a rank's flags (int64 [kinds, world, slots])."""
    return flags + (kind * world + src) * MAX_SLOTS + slot


@triton.jit
def release(flag, epoch):
    """Publish ``epoch`` at ``flag`` (a local or translated address) after all of this program's stores."""
    tl.debug_barrier()          # all threads' stores precede the flag write
    tl.atomic_xchg(flag, epoch, sem="release", scope="sys")


@triton.jit
def signal_flag(flag, epoch, rank, peer, bases):
    """``release`` of ``flag`` (a pointer into my heap) in ``peer``'s copy."""
    release(translate(flag, rank, peer, bases), epoch)


@triton.jit
def signal(flags, kind, slot, epoch, rank, peer, world, bases):
    """Release: everything this program wrote before is visible to ``peer`` once it sees ``epoch``."""
    signal_flag(flag_ptr(flags, kind, rank, slot, world), epoch, rank, peer, bases)


@triton.jit
def wait(flags, kind, slot, epoch, peer, world, state, max_spins):
    """Acquire: spin until ``peer`` signalled ``kind``/``slot`` at ``epoch`` or later (see ``wait_flag``)."""
    return wait_flag(flag_ptr(flags, kind, peer, slot, world), epoch, state, max_spins, peer, kind, slot)


@triton.jit
def wait_flag(flag, epoch, state, max_spins, peer, kind, slot):
    """Acquire: spin until ``flag`` holds ``epoch`` or later. Returns True when it did; after
    ``max_spins`` polls (or at once if an earlier wait of this launch already timed out) records the
    timeout in ``state``, naming ``peer``/``kind``/``slot``, and returns False."""
    seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
    failed = tl.load(state + ERR_FLAG, volatile=True)
    spins = 0
    while (seen < epoch) & (spins < max_spins) & (failed == 0):
        seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
        spins += 1
    if seen < epoch:
        if tl.atomic_xchg(state + ERR_FLAG, 1) == 0:    # the first failure is the one reported
            tl.store(state + ERR_PEER, peer)
            tl.store(state + ERR_KIND, kind)
            tl.store(state + ERR_SLOT, slot)
            tl.store(state + ERR_EPOCH, epoch)
            tl.store(state + ERR_SEEN, seen)
    tl.debug_barrier()
    return seen >= epoch


@triton.jit
def signal_peers(flags, kind, slot, epoch, rank, world, bases):
    """``signal`` every other rank (starting with the next one, so ranks spread their writes)."""
    for i in range(1, world):
        signal(flags, kind, slot, epoch, rank, (rank + i) % world, world, bases)


@triton.jit
def wait_peers(flags, kind, slot, epoch, rank, world, state, max_spins):
    """``wait`` for every other rank; returns the number of peers that came in time."""
    arrived = 0
    for i in range(1, world):
        arrived += wait(flags, kind, slot, epoch, (rank + i) % world, world, state, max_spins).to(tl.int32)
    return arrived


@triton.jit
def barrier(flags, kind, slot, epoch, rank, world, bases, state, max_spins):
    """Signal every peer, then wait for every peer (this program's ``slot``). True if all came."""
    signal_peers(flags, kind, slot, epoch, rank, world, bases)
    return wait_peers(flags, kind, slot, epoch, rank, world, state, max_spins) == world - 1


@triton.jit
def epoch_begin(state):
    """This launch's epoch (the previous launch's + 1); the same in every program of the launch."""
    return tl.load(state + EPOCH, volatile=True) + 1


@triton.jit
def epoch_end(state, epoch):
    """The last program of the launch to get here publishes ``epoch`` for the next launch."""
    epoch_end_of(state, epoch, tl.num_programs(0))


@triton.jit
def epoch_end_of(state, epoch, total_programs):
    """``epoch_end`` for a call made of several launches (e.g. a copy kernel on a side stream beside a
    GEMM): the last of ``total_programs`` programs, whichever launch it belongs to, publishes the epoch."""
    tl.debug_barrier()
    arrived = tl.atomic_add(state + ARRIVALS, 1, sem="acq_rel", scope="gpu")
    if arrived == total_programs - 1:
        tl.atomic_xchg(state + ARRIVALS, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(state + EPOCH, epoch, sem="release", scope="gpu")


@triton.jit
def rows_of(r, m, world):
    """(first row, row count) of rank ``r``'s share of ``m`` rows: the first ``m % world`` ranks get
    one extra row (same split as ``row_split``)."""
    base = m // world
    extra = m % world
    return r * base + tl.minimum(r, extra), base + (r < extra).to(tl.int32)


def row_split(m: int, world: int) -> list[tuple[int, int]]:
    """Host twin of ``rows_of``: [(first row, row count)] per rank."""
    base, extra = divmod(m, world)
    return [(r * base + min(r, extra), base + (1 if r < extra else 0)) for r in range(world)]


# --- calibration: polls per second of ``wait`` --------------------------------------------------------

@triton.jit
def _spin_probe(flags, state, max_spins):
    # A wait nobody will satisfy: it polls exactly max_spins times and records a timeout.
    wait(flags, 0, 0, 1, 0, 1, state, max_spins)


_POLLS_PER_S: dict = {}


def polls_per_second(device: torch.device) -> float:
    """How many ``wait`` polls one second buys here (measured once per process and device kind)."""
    key = device.type
    if key in _POLLS_PER_S:
        return _POLLS_PER_S[key]
    flags = torch.zeros(N_KINDS * MAX_SLOTS.value, dtype=torch.int64, device=device)
    state = torch.zeros(STATE_WORDS, dtype=torch.int64, device=device)
    spins = 50 if tuneforge.INTERPRETED else 2000
    _spin_probe[(1,)](flags, state, 1)                        # compile and load
    for _ in range(2):   # grow the probe until it runs long enough to time
        state.zero_()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        _spin_probe[(1,)](flags, state, spins)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        if dt > 0.02:
            break
        spins *= max(2, int(0.05 / max(dt, 1e-6)))
    _POLLS_PER_S[key] = rate = spins / dt
    return rate


# --- host side -------------------------------------------------------------------------------------

def _variant_key(arg):
    """What of a kernel argument selects its compiled variant: a tensor's dtype, a TMA descriptor's
    dtype and block shape (descriptors are unhashable), any other argument itself."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype
    if hasattr(arg, "block_shape"):
        return ("desc", arg.base.dtype, tuple(arg.block_shape))
    return arg


def default_timeout() -> float:
    """Seconds a wait may spin: generous under the interpreter (slow, CPU shared by ranks)."""
    return 30.0 if tuneforge.INTERPRETED else 10.0


class Channel:
    """Signals, epoch state and double-buffered staging of one op, carved from the symmetric heap.

    Collective to create (same order on every rank), without a host barrier: ``flags`` and
    ``state`` come from the heap zero, and a peer's signal sent before this rank created its
    channel is kept (allocation does not write the heap). Kernels take ``*channel.args()`` =
    ``(bases, flags, state, rank, world, max_spins)`` as their last runtime arguments, and the
    staging view ``channel.staging(dtype)`` (``2 * nbytes`` bytes: parity 0, then parity 1 at
    element ``channel.nbytes // itemsize``). ``kinds`` names the signal kinds in errors.
    """

    def __init__(self, heap, name: str, nbytes: int, kinds=("data", "reduced", "gathered", "barrier"),
                 timeout: float | None = None):
        self.heap, self.name, self.kinds = heap, name, tuple(kinds)
        self.rank, self.world = heap.rank, heap.size
        self.flags = heap.zeros((N_KINDS, self.world, MAX_SLOTS.value), torch.int64)
        self.state = heap.zeros((STATE_WORDS,), torch.int64)
        self.nbytes = 0
        self.data = None
        self.ensure(nbytes)
        self.set_timeout(default_timeout() if timeout is None else timeout)
        self.check_each_call = tuneforge.INTERPRETED     # cheap there: launches are synchronous
        self._warm: set = set()
        self._tile_flags = None

    def ensure(self, nbytes: int) -> None:
        """Grow the staging to ``nbytes`` per parity (collective; old staging is abandoned)."""
        if nbytes > self.nbytes:
            self.nbytes = (max(int(nbytes), 2 * self.nbytes) + 255) // 256 * 256
            self.data = self.heap.empty((2 * self.nbytes,), torch.uint8)

    def set_timeout(self, seconds: float) -> None:
        """Bound every wait of this channel's kernels to about ``seconds`` (collective by convention)."""
        self.timeout = float(seconds)
        # an int32 argument keeps one kernel specialization whatever the timeout
        self.max_spins = max(1, min(2**31 - 1, int(seconds * polls_per_second(self.heap.device))))

    def staging(self, dtype: torch.dtype) -> torch.Tensor:
        return self.data.view(dtype)

    def tile_flags(self, count: int) -> torch.Tensor:
        """``count`` int64 epoch flags on the heap beside ``flags``, for kernels that signal per row
        segment or per tile (more than ``MAX_SLOTS``): set with ``release``, waited on with
        ``wait_flag``. Collective; grown like the staging (a grown area is fresh heap memory, zero)."""
        if self._tile_flags is None or self._tile_flags.numel() < count:
            old = 0 if self._tile_flags is None else self._tile_flags.numel()
            self._tile_flags = self.heap.zeros((max(int(count), 2 * old),), torch.int64)
        return self._tile_flags[:count]

    def args(self) -> tuple:
        return (self.heap.bases, self.flags, self.state, self.rank, self.world, self.max_spins)

    def launch(self, kernel, grid, *args, **meta) -> None:
        """Launch a kernel that waits on peers. The first launch of each variant (kernel, grid,
        constexprs, argument dtypes and sizes) is compiled and loaded first (a module loaded lazily
        while another kernel spins can deadlock), then all ranks meet at a host barrier so that no
        rank spins on a peer that is still compiling: that first launch is a host collective, so
        every rank must launch the same variants in the same order (warm them all before a CUDA
        graph capture or before ranks may diverge)."""
        if not tuneforge.INTERPRETED:
            key = (kernel, tuple(grid), tuple(sorted(meta.items())), tuple(_variant_key(a) for a in args[:-6]))
            if key not in self._warm:
                kernel.warmup(*args, grid=grid, **meta)._init_handles()
                self._warm.add(key)
                self.heap.barrier()
        kernel[grid](*args, **meta)
        if self.check_each_call:
            self.check()

    def error(self) -> SignalTimeout | None:
        """The timeout recorded in ``state`` (synchronizes), or None."""
        words = self.state.tolist()
        if not words[2]:
            return None
        kind = int(words[4])
        kind_name = self.kinds[kind] if 0 <= kind < len(self.kinds) else str(kind)
        return SignalTimeout(
            f"rank {self.rank}: '{self.name}' timed out after ~{self.timeout:g}s waiting for signal "
            f"'{kind_name}' (slot {words[5]}) from peer {words[3]} at epoch {words[6]} (its flag holds "
            f"epoch {words[7]}): peer {words[3]} never signalled (crashed, hung, or ran another op)")

    def check(self) -> None:
        err = self.error()
        if err is not None:
            raise err

    def reset(self) -> None:
        """Collective: after a timeout, zero flags (``tile_flags`` too: they hold the old epochs, which
        the restarted epochs would take as already signalled), epoch and error on every rank."""
        if self.heap.device.type == "cuda":
            torch.cuda.synchronize(self.heap.device)
        self.heap.barrier()
        self.flags.zero_()
        self.state.zero_()
        if self._tile_flags is not None:
            self._tile_flags.zero_()
        if self.heap.device.type == "cuda":
            torch.cuda.synchronize(self.heap.device)
        self.heap.barrier()
