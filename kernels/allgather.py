"""All-gather: every rank holds a share of the rows of ``[m, n]`` and gets all of it.

Rank r holds rows ``row_split(m, world)[r]`` (the first ``m % world`` ranks one row more), so
uneven splits work. One kernel, two variants (``variant`` in the space):

- push: each rank writes its tiles into every peer's staging (remote stores), signals; after the
  peers' signals it copies their tiles from its own staging into ``out``.
- pull: each rank copies its tiles into its own staging, signals; after the peers' signals it
  reads their tiles from their staging (remote loads) into ``out``.

The kernel is ``kernels/_collective.py``'s (``KIND=ALLGATHER``): the all-gather phase of the two-shot
all-reduce.
"""
from __future__ import annotations

import torch

from tuneforge.dsl import Problem, Space, Template, categorical, register
from tuneforge.dsl.comm import row_split
from tuneforge.kernels._collective import ALLGATHER, collective_kernel
from tuneforge.kernels._common import check_tensor, comm_tile_default, comm_tile_space, output_tensor, rank_generator
from tuneforge.errors import InputError
from tuneforge.dsl.roofline import alpha_beta, comm_efficiency, nccl_time


def _share(problem: Problem) -> int:
    """Elements of the largest rank share: what one program loop runs over."""
    return -(-problem["m"] // problem.world) * problem["n"]


def _default(problem: Problem, spec=None) -> dict:
    return {"variant": "push", **comm_tile_default(_share(problem), spec)}


def allgather(x: torch.Tensor, *, ctx, m: int | None = None, out: torch.Tensor | None = None,
              config: dict | None = None) -> torch.Tensor:
    """Gather every rank's rows ``x`` ([rows of this rank, n]) into ``out`` ([m, n]) on every rank.
    ``m`` (total rows) defaults to ``out.shape[0]``; collective (all ranks call it alike)."""
    if m is None:
        if out is None:
            raise InputError("allgather needs the total row count: pass m= or out=")
        m = out.shape[0]
    if x.dim() != 2:
        raise InputError(f"x must be 2-D [rows, n], got shape {tuple(x.shape)}")
    n = x.shape[1]
    rows = row_split(m, ctx.size)[ctx.rank][1]
    check_tensor("allgather", "x", x, (rows, n), None, ctx.device, "contiguous")
    out = output_tensor("allgather", out, (m, n), x, "contiguous")
    config = config or _default(Problem.make("allgather", "fp32", ctx.size, m=m, n=n))
    ch = ctx.channel("allgather", m * n * x.element_size())
    ch.launch(collective_kernel, (config["comm_sms"],), x, out, ch.staging(x.dtype),
              ch.nbytes // x.element_size(), m, n, *ch.args(),
              KIND=ALLGATHER, PUSH=config["variant"] == "push", BLOCK=config["block"], num_warps=config["num_warps"])
    return out


def reference(x: torch.Tensor, ctx, m: int) -> torch.Tensor:
    return torch.cat([p.double() for p in ctx.world.all_gather(x)])


def baseline(x: torch.Tensor, ctx, m: int) -> torch.Tensor:
    """torch.distributed: all_gather_into_tensor, with shares padded to the largest when uneven
    (ranks sharing one GPU use gloo, which gathers host copies)."""
    if x.is_cuda and ctx.world.backend == "gloo":
        return _gather_rows(x.cpu(), ctx, m).to(x.device)
    return _gather_rows(x, ctx, m)


def _gather_rows(x: torch.Tensor, ctx, m: int) -> torch.Tensor:
    import torch.distributed as dist
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    split = row_split(m, ctx.size)
    most = split[0][1]
    if x.shape[0] == most and all(r == most for _, r in split):
        out = torch.empty((m, x.shape[1]), dtype=x.dtype, device=x.device)
        gather(out, x, group=ctx.world.group)
        return out
    padded = torch.zeros((most, x.shape[1]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    full = torch.empty((most * ctx.size, x.shape[1]), dtype=x.dtype, device=x.device)
    gather(full, padded, group=ctx.world.group)
    return torch.cat([full[r * most: r * most + rows] for r, (_, rows) in enumerate(split)])


def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    m, n = problem["m"], problem["n"]
    rows = row_split(m, ctx.size)[ctx.rank][1]
    g = rank_generator(problem, seed, ctx)
    x = torch.randn(rows, n, generator=g).to(problem.torch_dtype).to(device)
    out = torch.empty((m, n), dtype=problem.torch_dtype, device=device)
    return {"x": x, "ctx": ctx, "m": m, "out": out}


def space(problem: Problem) -> Space:
    return Space(categorical("variant", ["push", "pull"]), *comm_tile_space(_share(problem)))


def work(problem: Problem) -> tuple[float, float]:
    size = problem.torch_dtype.itemsize
    return 0.0, 2.0 * problem["m"] * problem["n"] * size      # write all of out, read it once in


def cost(problem: Problem, config: dict | None, spec) -> float:
    shard = problem["m"] * problem["n"] * problem.torch_dtype.itemsize / problem.world
    if config is None:
        return nccl_time("allgather", shard, problem.world, spec)
    t = alpha_beta(shard, problem.world, spec, "allgather", comm_efficiency(config))
    if config["variant"] == "push":      # received tiles are copied from staging to out
        t += problem["m"] * problem["n"] * problem.torch_dtype.itemsize * 2 / spec.hbm_bytes_per_s
    return t + spec.launch_us * 1e-6


TEMPLATE = register(Template(
    op="allgather", space=space, make_inputs=make_inputs, launch=allgather, reference=reference,
    baseline=baseline, default_config=_default, work=work, cost=cost, multi_rank=True,
    doc="all-gather of row shards (uneven splits allowed); push or pull through the symmetric heap"))
