"""Reduce-scatter: every rank holds ``x[m, n]``; rank r gets the sum over ranks of its rows.

Rank r owns rows ``row_split(m, world)[r]`` (uneven splits allowed). Sums run in fp32 in rank
order 0..world-1, so results do not depend on arrival order. Two variants (``variant``):

- push: each rank writes the rows owned by peer q into q's receive area (one area per sender,
  ``ceil(m / world) * n`` elements each), signals; each owner sums its areas and its own rows.
- pull: each rank copies the rows others own into its own staging, signals; each owner reads its
  rows from every peer's staging (remote loads) and sums.

The kernel is ``kernels/_collective.py``'s (``KIND=REDUCESCATTER``): the first phase of the two-shot
all-reduce.
"""
from __future__ import annotations

import torch

from tuneforge.dsl import Problem, Space, Template, categorical, register
from tuneforge.dsl.comm import row_split
from tuneforge.kernels._collective import REDUCESCATTER, collective_kernel
from tuneforge.kernels._common import check_tensor, comm_tile_default, comm_tile_space, output_tensor, rank_generator
from tuneforge.errors import InputError
from tuneforge.dsl.roofline import alpha_beta, comm_efficiency, nccl_time


def staging_elems(m: int, n: int, world: int) -> int:
    """Per-parity staging both variants fit in: push's receive areas, pull's copy of x."""
    return max(world * -(-m // world) * n, m * n)


def _default(problem: Problem, spec=None) -> dict:
    return {"variant": "push", **comm_tile_default(problem["m"] * problem["n"] // problem.world, spec)}


def reducescatter(x: torch.Tensor, *, ctx, out: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """Sum ``x`` ([m, n], every rank) over ranks and return this rank's rows ([rows, n]) in ``out``."""
    if x.dim() != 2:
        raise InputError(f"x must be 2-D [m, n], got shape {tuple(x.shape)}")
    m, n = x.shape
    check_tensor("reducescatter", "x", x, (m, n), None, ctx.device, "contiguous")
    rows = row_split(m, ctx.size)[ctx.rank][1]
    out = output_tensor("reducescatter", out, (rows, n), x, "contiguous")
    config = config or _default(Problem.make("reducescatter", "fp32", ctx.size, m=m, n=n))
    ch = ctx.channel("reducescatter", staging_elems(m, n, ctx.size) * x.element_size())
    ch.launch(collective_kernel, (config["comm_sms"],), x, out, ch.staging(x.dtype),
              ch.nbytes // x.element_size(), m, n, *ch.args(),
              KIND=REDUCESCATTER, PUSH=config["variant"] == "push", BLOCK=config["block"], num_warps=config["num_warps"])
    return out


def reference(x: torch.Tensor, ctx) -> torch.Tensor:
    total = torch.stack([p.double() for p in ctx.world.all_gather(x)]).sum(0)
    row0, rows = row_split(x.shape[0], ctx.size)[ctx.rank]
    return total[row0:row0 + rows]


def baseline(x: torch.Tensor, ctx) -> torch.Tensor:
    """torch.distributed: reduce_scatter_tensor, with shares padded to the largest when uneven
    (ranks sharing one GPU use gloo, which reduces host copies)."""
    if x.is_cuda and ctx.world.backend == "gloo":
        return _scatter_rows(x.cpu(), ctx).to(x.device)
    return _scatter_rows(x, ctx)


def _scatter_rows(x: torch.Tensor, ctx) -> torch.Tensor:
    import torch.distributed as dist
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    m, n = x.shape
    split = row_split(m, ctx.size)
    most = split[0][1]
    if m == most * ctx.size:
        out = torch.empty((most, n), dtype=x.dtype, device=x.device)
        scatter(out, x, group=ctx.world.group)
        return out
    padded = torch.zeros((most * ctx.size, n), dtype=x.dtype, device=x.device)
    for r, (row0, rows) in enumerate(split):
        padded[r * most: r * most + rows] = x[row0:row0 + rows]
    out = torch.empty((most, n), dtype=x.dtype, device=x.device)
    scatter(out, padded, group=ctx.world.group)
    return out[: split[ctx.rank][1]]


def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    m, n = problem["m"], problem["n"]
    g = rank_generator(problem, seed, ctx)
    x = torch.randn(m, n, generator=g).to(problem.torch_dtype).to(device)
    out = torch.empty((row_split(m, ctx.size)[ctx.rank][1], n), dtype=problem.torch_dtype, device=device)
    return {"x": x, "ctx": ctx, "out": out}


def space(problem: Problem) -> Space:
    return Space(categorical("variant", ["push", "pull"]),
                 *comm_tile_space(-(-problem["m"] // problem.world) * problem["n"]))


def work(problem: Problem) -> tuple[float, float]:
    m, n, w = problem["m"], problem["n"], problem.world
    return float((w - 1) * m * n / w), (m * n + m * n / w) * problem.torch_dtype.itemsize


def cost(problem: Problem, config: dict | None, spec) -> float:
    nbytes = problem["m"] * problem["n"] * problem.torch_dtype.itemsize
    if config is None:
        return nccl_time("reducescatter", nbytes, problem.world, spec)
    t = alpha_beta(nbytes, problem.world, spec, "reducescatter", comm_efficiency(config))
    if config["variant"] == "pull":      # the rows others own are staged locally first
        t += 2 * nbytes * (problem.world - 1) / problem.world / spec.hbm_bytes_per_s
    return t + spec.launch_us * 1e-6


TEMPLATE = register(Template(
    op="reducescatter", space=space, make_inputs=make_inputs, launch=reducescatter, reference=reference,
    baseline=baseline, default_config=_default, work=work, cost=cost, multi_rank=True,
    doc="reduce-scatter by rows (uneven splits allowed); push or pull through the symmetric heap"))
