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

from tuneforge.dsl import Problem, Space, Template, categorical, register
from tuneforge.kernels._collective import ONE_SHOT, TWO_SHOT, collective_kernel
from tuneforge.kernels._common import check_tensor, comm_tile_default, comm_tile_space, output_tensor, rank_generator
from tuneforge.errors import InputError
from tuneforge.kernels.reducescatter import staging_elems
from tuneforge.dsl.roofline import alpha_beta, comm_efficiency, nccl_time

# Messages up to this size default to one_shot (latency-bound), larger to two_shot.
ONE_SHOT_MAX_BYTES = 1 << 20


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
    out = output_tensor("allreduce", out, (m, n), x, "contiguous")
    if out.data_ptr() == x.data_ptr():
        raise InputError("allreduce cannot run in place: out must not alias x")
    config = config or _default(Problem.make("allreduce", _DTYPE_NAME[x.dtype], ctx.size, m=m, n=n))
    ch = ctx.channel("allreduce", _staging_elems(m, n, ctx.size) * x.element_size())
    ch.launch(collective_kernel, (config["comm_sms"],), x, out, ch.staging(x.dtype),
              ch.nbytes // x.element_size(), m, n, *ch.args(),
              KIND=TWO_SHOT if config["strategy"] == "two_shot" else ONE_SHOT, PUSH=config["variant"] == "push",
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
