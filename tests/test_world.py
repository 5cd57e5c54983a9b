"""The world (processes, groups, spawn's error and deadline handling), the symmetric heap, and
the device-side verbs, on CPU processes running Triton's interpreter (and on one GPU, ``-m gpu``)."""
import os
import time

import pytest
import torch
import triton
import triton.language as tl

from tuneforge.dsl.comm import (barrier, epoch_begin, epoch_end, remote_load, remote_store, signal,
                                wait)
from tuneforge.errors import InputError
from tuneforge.world import spawn


@triton.jit
def _ring_kernel(src, dst, got, bases, flags, state, rank, world, max_spins, N: tl.constexpr):
    """Each rank writes a value into the next rank's ``dst[rank]`` (remote store), signals it,
    waits for the previous rank, then reads the previous rank's ``src`` (remote load)."""
    epoch = epoch_begin(state)
    nxt = (rank + 1) % world
    prev = (rank + world - 1) % world
    offs = tl.arange(0, N)
    value = (rank * 1000 + epoch * 10 + offs).to(tl.float32)
    tl.store(src + offs, value)
    remote_store(dst, rank * N + offs, value, rank, nxt, bases, offs < N)
    signal(flags, 0, 0, epoch, rank, nxt, world, bases)
    wait(flags, 0, 0, epoch, prev, world, state, max_spins)
    tl.store(got + offs, remote_load(src, offs, rank, prev, bases, offs < N))
    barrier(flags, 1, 0, epoch, rank, world, bases, state, max_spins)   # nobody rewrites src early
    epoch_end(state, epoch)


def _heap_and_verbs(world, n):
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 1 << 16)
    prev, nxt = (world.rank - 1) % world.size, (world.rank + 1) % world.size
    # symmetric offsets; peers' arenas addressable from this process
    a = heap.zeros((5, 3), torch.float32)
    b = heap.zeros(7, torch.int64)
    offsets = world.all_gather_object((heap.offset_of(a), heap.offset_of(b)))
    heap.peer_view(b, nxt).fill_(world.rank)
    world.synchronize()
    host_ok = bool((b == prev).all()) and heap.bases.tolist()[world.rank] == heap.arena.data_ptr()
    with heap.scope():
        heap.empty(100, torch.float16)
    scope_ok = heap.used == heap.offset_of(b) + 7 * 8
    try:
        heap.empty(1 << 20, torch.uint8)
        full = "no error"
    except InputError as e:
        full = str(e)
    # device verbs: three calls on the same flags, never cleared (epochs 1, 2, 3)
    ctx = heap.context()
    ch = ctx.channel("ring", 0)
    src, dst, got = heap.zeros(n, torch.float32), heap.zeros((world.size, n), torch.float32), heap.zeros(n, torch.float32)
    calls = []
    for _ in range(3):
        ch.launch(_ring_kernel, (1,), src, dst, got, *ch.args(), N=n)
        calls.append((dst[prev].tolist(), got.tolist()))   # (synchronizes) before peers go on
        ctx.synchronize()
    heap.close()
    return {"offsets": offsets, "host_ok": host_ok, "scope_ok": scope_ok, "full": full, "calls": calls,
            "backend": world.backend, "gather": [t.tolist() for t in world.all_gather(torch.arange(world.rank + 1))]}


def _check_heap_and_verbs(results, size, n):
    for rank, r in enumerate(results):
        prev = (rank - 1) % size
        assert len(set(r["offsets"])) == 1, "heap offsets differ between ranks"
        assert r["host_ok"] and r["scope_ok"]
        assert "symmetric heap full" in r["full"]
        for epoch, (received, fetched) in enumerate(r["calls"], start=1):
            expected = [prev * 1000 + epoch * 10 + i for i in range(n)]
            assert received == expected, f"rank {rank} epoch {epoch}: remote store/signal"
            assert fetched == expected, f"rank {rank} epoch {epoch}: remote load after wait"
        assert r["gather"] == [list(range(q + 1)) for q in range(size)]


def test_world_heap_and_verbs_on_cpu():
    results = spawn(_heap_and_verbs, 3, 16, timeout=120)
    assert [r["backend"] for r in results] == ["gloo"] * 3
    _check_heap_and_verbs(results, 3, 16)


def _early_peer_store(world):
    """Rank 0 allocates and stores into rank 1's copy before rank 1 has allocated it (the order
    SPMD ranks get whenever one runs ahead), in fresh heap memory and in memory a scope freed."""
    from tuneforge.dsl.heap import SymmetricHeap
    heap = SymmetricHeap(world, 1 << 16)
    seen = []
    for round_ in range(2):
        with heap.scope():
            if world.rank == 0:
                x, y = heap.zeros(8, torch.int64), heap.empty(8, torch.int64)
                heap.peer_view(x, 1).fill_(10 + round_)
                world.synchronize()     # the store has landed before rank 1 allocates
            else:
                world.synchronize()
                x, y = heap.zeros(8, torch.int64), heap.empty(8, torch.int64)
            world.synchronize()
            seen.append((x.tolist(), y.tolist()))
            x.fill_(-1)                 # what the scope must not hand out again
            y.fill_(-1)
    heap.close()
    return seen


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_heap_keeps_a_peers_store_made_before_this_rank_allocates(device):
    results = spawn(_early_peer_store, 2, device=device, share_gpu=device == "cuda", timeout=120)
    for round_ in range(2):
        assert results[0][round_] == ([0] * 8, [0] * 8), f"round {round_}: rank 0's heap memory is not zero"
        assert results[1][round_] == ([10 + round_] * 8, [0] * 8), f"round {round_}: rank 0's store into rank 1"


def _fail_on_rank(world, bad):
    if world.rank == bad:
        raise ValueError("bad shard")
    return world.rank


def test_spawn_reraises_a_ranks_exception_naming_the_rank():
    with pytest.raises(ValueError, match=r"^rank 1: bad shard$") as info:
        spawn(_fail_on_rank, 2, 1, timeout=60)
    assert "_fail_on_rank" in str(info.value.__cause__)      # the remote traceback comes along


def _hang_on_rank(world, hung):
    world.barrier()
    if world.rank == hung:
        time.sleep(3600)
    return os.getpid()


def test_spawn_kills_the_world_at_the_deadline():
    t = time.monotonic()
    # rank 0 normally finishes; on a crowded machine it may still be starting at the deadline
    with pytest.raises(TimeoutError, match=r"killed ranks \[(0, )?1\]"):
        spawn(_hang_on_rank, 2, 1, timeout=8)
    assert time.monotonic() - t < 28


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [2, 4])
def test_heap_and_verbs_on_one_shared_gpu(ranks):
    results = spawn(_heap_and_verbs, ranks, 64, device="cuda", share_gpu=True, timeout=300)
    assert [r["backend"] for r in results] == ["gloo"] * ranks
    _check_heap_and_verbs(results, ranks, 64)
