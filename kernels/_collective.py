"""The device code of the collectives (``allgather``, ``reducescatter``, ``allreduce``): the share
exchange pieces and one kernel whose ``KIND`` picks the collective. The two-shot all-reduce is the
reduce-scatter phase followed by the all-gather phase of the reduced rows, so all but the one-shot
all-reduce run the same loop. Each op's launcher, space and cost stay in the op's module.

Program ``p`` moves tiles ``p, p + P, ...`` of every rank's share and signals slot ``p``, so program
``p`` only waits for program ``p`` of the peers (interpreter-safe, no cross-program waits).
"""
from __future__ import annotations

import triton
import triton.language as tl

from tuneforge.dsl.comm import (epoch_begin, epoch_end, remote_load, remote_store, rows_of, signal_peers,
                                translate, wait, wait_peers)

ALLGATHER = tl.constexpr(0)
REDUCESCATTER = tl.constexpr(1)
ONE_SHOT = tl.constexpr(2)      # all-reduce strategies
TWO_SHOT = tl.constexpr(3)


@triton.jit
def publish_tile(v, area, o, mask, rank, world, bases, PUSH: tl.constexpr):
    """Make tile ``v`` (element offsets ``o`` of the full tensor) readable by the peers: written into
    every peer's ``area`` (push) or into this rank's own ``area`` (pull)."""
    if PUSH:
        for i in range(1, world):
            remote_store(area, o, v, rank, (rank + i) % world, bases, mask)
    else:
        tl.store(area + o, v, mask=mask)


@triton.jit
def collect_shares(out, area, m, n, rank, world, bases, flags, kind, epoch, state, max_spins,
                   PUSH: tl.constexpr, BLOCK: tl.constexpr):
    """Wait for each peer's signal ``kind`` (this program's slot), then copy that peer's rows of
    ``area`` (its staging when pulling, mine when pushed) into ``out``."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    for i in range(1, world):
        q = (rank + i) % world
        wait(flags, kind, pid, epoch, q, world, state, max_spins)
        row0, rows = rows_of(q, m, world)
        start = row0 * n
        length = rows * n
        if PUSH:
            src = area + start
        else:
            src = translate(area, rank, q, bases) + start
        for t in range(pid, tl.cdiv(length, BLOCK), programs):
            o = t * BLOCK + offs
            mask = o < length
            tl.store(out + start + o, tl.load(src + o, mask=mask), mask=mask)


@triton.jit
def scatter_shares(x, area, m, n, rank, world, bases, PUSH: tl.constexpr, BLOCK: tl.constexpr):
    """Reduce-scatter phase 1: the rows of ``x`` each peer q owns go to q's receive area for this rank
    (push, at ``rank * ceil(m / world) * n``) or to the same rows of this rank's staging (pull)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    share = tl.cdiv(m, world) * n
    for i in range(1, world):
        q = (rank + i) % world
        row0, rows = rows_of(q, m, world)
        start = row0 * n
        length = rows * n
        if PUSH:
            dst = translate(area, rank, q, bases) + rank * share
        else:
            dst = area + start
        for t in range(pid, tl.cdiv(length, BLOCK), programs):
            o = t * BLOCK + offs
            mask = o < length
            tl.store(dst + o, tl.load(x + start + o, mask=mask), mask=mask)


@triton.jit
def reduce_tile(x, area, o, mask, start, m, n, rank, world, bases, PUSH: tl.constexpr):
    """Reduce-scatter phase 2: fp32 sum over ranks (in rank order) of element offsets ``o`` of this
    rank's rows (which start at element ``start`` of x)."""
    share = tl.cdiv(m, world) * n
    acc = tl.zeros(o.shape, dtype=tl.float32)
    for src in range(0, world):
        if src == rank:
            v = tl.load(x + start + o, mask=mask, other=0.0)
        elif PUSH:
            v = tl.load(area + src * share + o, mask=mask, other=0.0)
        else:
            v = remote_load(area, start + o, rank, src, bases, mask)
        acc += v.to(tl.float32)
    return acc


@triton.jit
def _one_shot(x, out, area, m, n, rank, world, bases, flags, epoch, state, max_spins,
              PUSH: tl.constexpr, BLOCK: tl.constexpr):
    """Every rank's whole ``x`` into every peer's receive area for it (push) or its own staging
    (pull), one signal round, then each rank sums all copies itself."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    numel = m * n
    for t in range(pid, tl.cdiv(numel, BLOCK), programs):
        o = t * BLOCK + offs
        mask = o < numel
        v = tl.load(x + o, mask=mask)
        if PUSH:     # into each peer's receive area for this rank
            for i in range(1, world):
                remote_store(area, rank * numel + o, v, rank, (rank + i) % world, bases, mask)
        else:
            tl.store(area + o, v, mask=mask)
    signal_peers(flags, 0, pid, epoch, rank, world, bases)
    wait_peers(flags, 0, pid, epoch, rank, world, state, max_spins)
    for t in range(pid, tl.cdiv(numel, BLOCK), programs):
        o = t * BLOCK + offs
        mask = o < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for src in range(0, world):
            if src == rank:
                v = tl.load(x + o, mask=mask, other=0.0)
            elif PUSH:
                v = tl.load(area + src * numel + o, mask=mask, other=0.0)
            else:
                v = remote_load(area, o, rank, src, bases, mask)
            acc += v.to(tl.float32)
        tl.store(out + o, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rank", "max_spins"])
def collective_kernel(x, out, stage, slot_elems, m, n,
                      bases, flags, state, rank, world, max_spins,
                      KIND: tl.constexpr, PUSH: tl.constexpr, BLOCK: tl.constexpr):
    """One launch of collective ``KIND`` in this call's epoch and its parity of the staging area.
    ``out``: [rows of this rank, n] for the reduce-scatter, [m, n] otherwise."""
    epoch = epoch_begin(state)
    area = stage + (epoch % 2) * slot_elems
    if KIND == ONE_SHOT:
        _one_shot(x, out, area, m, n, rank, world, bases, flags, epoch, state, max_spins, PUSH, BLOCK)
    else:
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        offs = tl.arange(0, BLOCK)
        row0, rows = rows_of(rank, m, world)
        start = row0 * n
        length = rows * n
        if KIND == ALLGATHER:
            gathered = area                             # [m, n] layout
            mine = out + start
        else:        # the reduce-scatter phase: my rows, summed over ranks
            scatter_shares(x, area, m, n, rank, world, bases, PUSH, BLOCK)
            signal_peers(flags, 0, pid, epoch, rank, world, bases)
            wait_peers(flags, 0, pid, epoch, rank, world, state, max_spins)
            gathered = area + tl.maximum(world * tl.cdiv(m, world) * n, m * n)   # after the reduce-scatter area
            mine = out if KIND == REDUCESCATTER else out + start
        for t in range(pid, tl.cdiv(length, BLOCK), programs):
            o = t * BLOCK + offs
            mask = o < length
            if KIND == ALLGATHER:
                v = tl.load(x + o, mask=mask)
            else:
                v = reduce_tile(x, area, o, mask, start, m, n, rank, world, bases, PUSH).to(out.dtype.element_ty)
            tl.store(mine + o, v, mask=mask)
            if KIND != REDUCESCATTER:
                publish_tile(v, gathered, start + o, mask, rank, world, bases, PUSH)
        if KIND != REDUCESCATTER:   # the all-gather phase's signal round (the second one of the two-shot)
            kind = 0 if KIND == ALLGATHER else 1
            signal_peers(flags, kind, pid, epoch, rank, world, bases)
            collect_shares(out, gathered, m, n, rank, world, bases, flags, kind, epoch, state, max_spins, PUSH, BLOCK)
    epoch_end(state, epoch)
