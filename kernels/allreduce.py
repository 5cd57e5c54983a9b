"""All-reduce: every rank holds ``x[m, n]`` and gets the sum over ranks.

Strategies (``strategy`` in the space) x variants (``variant``):

- one_shot: every rank makes its whole ``x`` available (push: written into every peer's
  receive area, one per sender; pull: copied into its own staging), signals, then sums all ranks'
  copies itself. One signal round; each rank moves ``(world-1) * |x|`` over the links. Best for
  small messages (decode).
- two_shot: reduce-scatter (each rank sums the rows it owns, ``row_split``) then all-gather of the
  reduced rows; two signal rounds, ``2 (world-1)/world * |x|`` per rank. Best for large messages.

Sums run in fp32 in rank order 0..world-1 and are rounded once, so every rank gets bit-identical
results (tensor-parallel replicas must agree). Uneven row splits work (two_shot's owners get
``m // world`` or one more row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuneforge.dsl import Problem, Space, Template, categorical, register
from tuneforge.dsl.comm import (epoch_begin, epoch_end, remote_load, remote_store, rows_of, signal_peers,
                                wait_peers)
from tuneforge.kernels._common import check_tensor, comm_tile_default, comm_tile_space, rank_generator
from tuneforge.errors import InputError
from tuneforge.kernels.allgather import collect_shares, publish_tile
from tuneforge.kernels.reducescatter import reduce_tile, scatter_shares, staging_elems
from tuneforge.dsl.roofline import alpha_beta, comm_efficiency, nccl_time

# Messages up to this size default to one_shot (latency-bound), larger to two_shot.
ONE_SHOT_MAX_BYTES = 1 << 20


@triton.jit
def _one_shot(x, out, area, m, n, rank, world, bases, flags, epoch, state, max_spins,
              PUSH: tl.constexpr, BLOCK: tl.constexpr):
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


@triton.jit
def _two_shot(x, out, area, m, n, rank, world, bases, flags, epoch, state, max_spins,
              PUSH: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    scatter_shares(x, area, m, n, rank, world, bases, PUSH, BLOCK)
    signal_peers(flags, 0, pid, epoch, rank, world, bases)
    wait_peers(flags, 0, pid, epoch, rank, world, state, max_spins)
    row0, rows = rows_of(rank, m, world)
    start = row0 * n
    length = rows * n
    gathered = area + tl.maximum(world * tl.cdiv(m, world) * n, m * n)   # after the reduce-scatter area
    for t in range(pid, tl.cdiv(length, BLOCK), programs):
        o = t * BLOCK + offs
        mask = o < length
        v = reduce_tile(x, area, o, mask, start, m, n, rank, world, bases, PUSH).to(out.dtype.element_ty)
        tl.store(out + start + o, v, mask=mask)
        publish_tile(v, gathered, start + o, mask, rank, world, bases, PUSH)
    signal_peers(flags, 1, pid, epoch, rank, world, bases)
    collect_shares(out, gathered, m, n, rank, world, bases, flags, 1, epoch, state, max_spins, PUSH, BLOCK)


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _allreduce_kernel(x, out, stage, slot_elems, m, n,
                      bases, flags, state, rank, world, max_spins,
                      TWO_SHOT: tl.constexpr, PUSH: tl.constexpr, BLOCK: tl.constexpr):
    epoch = epoch_begin(state)
    area = stage + (epoch % 2) * slot_elems
    if TWO_SHOT:
        _two_shot(x, out, area, m, n, rank, world, bases, flags, epoch, state, max_spins, PUSH, BLOCK)
    else:
        _one_shot(x, out, area, m, n, rank, world, bases, flags, epoch, state, max_spins, PUSH, BLOCK)
    epoch_end(state, epoch)


def _staging_elems(m: int, n: int, world: int) -> int:
    """Per-parity staging every strategy fits in: one_shot push's receive areas (world * |x|),
    two_shot's reduce-scatter area followed by the gathered rows."""
    return max(world * m * n, staging_elems(m, n, world) + m * n)


def _default(problem: Problem, spec=None) -> dict:
    m, n = problem["m"], problem["n"]
    one_shot = m * n * problem.torch_dtype.itemsize <= ONE_SHOT_MAX_BYTES
    return {"strategy": "one_shot" if one_shot else "two_shot", "variant": "push",
            **comm_tile_default(m * n if one_shot else -(-m // problem.world) * n, spec)}


def allreduce(x: torch.Tensor, *, ctx, out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Sum ``x`` ([m, n]) over all ranks into ``out`` on every rank; collective."""
    if x.dim() != 2:
        raise InputError(f"x must be 2-D [m, n], got shape {tuple(x.shape)}")
    m, n = x.shape
    check_tensor("allreduce", "x", x, (m, n), None, ctx.device, "contiguous")
    if out is None:
        out = torch.empty_like(x)
    check_tensor("allreduce", "out", out, (m, n), x.dtype, ctx.device, "contiguous")
    if out.data_ptr() == x.data_ptr():
        raise InputError("allreduce cannot run in place: out must not alias x")
    config = config or _default(Problem.make("allreduce", _DTYPE_NAME[x.dtype], ctx.size, m=m, n=n))
    ch = ctx.channel("allreduce", _staging_elems(m, n, ctx.size) * x.element_size())
    ch.launch(_allreduce_kernel, (config["comm_sms"],), x, out, ch.staging(x.dtype),
              ch.nbytes // x.element_size(), m, n, *ch.args(),
              TWO_SHOT=config["strategy"] == "two_shot", PUSH=config["variant"] == "push",
              BLOCK=config["block"], num_warps=config["num_warps"])
    return out


_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def reference(x: torch.Tensor, ctx) -> torch.Tensor:
    return torch.stack([p.double() for p in ctx.world.all_gather(x)]).sum(0)


def baseline(x: torch.Tensor, ctx) -> torch.Tensor:
    """torch.distributed.all_reduce (NCCL across GPUs; gloo on CPU, and on host copies for ranks
    sharing one GPU)."""
    import torch.distributed as dist
    host = x.is_cuda and ctx.world.backend == "gloo"
    y = x.cpu() if host else x.clone()
    dist.all_reduce(y, group=ctx.world.group)
    return y.to(x.device) if host else y


def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    m, n = problem["m"], problem["n"]
    g = rank_generator(problem, seed, ctx)
    x = torch.randn(m, n, generator=g).to(problem.torch_dtype).to(device)
    return {"x": x, "ctx": ctx, "out": torch.empty_like(x)}


def space(problem: Problem) -> Space:
    return Space(categorical("strategy", ["one_shot", "two_shot"]), categorical("variant", ["push", "pull"]),
                 *comm_tile_space(problem["m"] * problem["n"]))


def work(problem: Problem) -> tuple[float, float]:
    m, n, w = problem["m"], problem["n"], problem.world
    return float((w - 1) * m * n), 2.0 * m * n * problem.torch_dtype.itemsize


def cost(problem: Problem, config: dict | None, spec) -> float:
    nbytes = problem["m"] * problem["n"] * problem.torch_dtype.itemsize
    if config is None:
        return nccl_time("allreduce", nbytes, problem.world, spec)
    t = alpha_beta(nbytes, problem.world, spec, config["strategy"], comm_efficiency(config))
    if config["variant"] == "pull":       # x is staged locally before peers read it
        t += 2 * nbytes / spec.hbm_bytes_per_s
    return t + spec.launch_us * 1e-6


TEMPLATE = register(Template(
    op="allreduce", space=space, make_inputs=make_inputs, launch=allreduce, reference=reference,
    baseline=baseline, default_config=_default, work=work, cost=cost, multi_rank=True,
    doc="all-reduce: one_shot or two_shot (reduce-scatter + all-gather), push or pull, over the symmetric heap"))
