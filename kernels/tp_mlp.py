"""Tensor-parallel MLP block (Qwen3): gate_up column-parallel -> silu_mul -> down row-parallel.

Two strategies (``strategy``, a categorical parameter with its own conditional sub-space):

- ``gemm_ar``: the input ``x`` [m, hidden] is replicated on every rank; GEMM (``kernels/gemm``),
  silu_mul, GEMM, then an all-reduce of the partial sums (``kernels/allreduce``: ``ar_strategy``
  one_shot/two_shot, ``ar_variant`` push/pull, ``comm_sms`` programs). Returns [m, hidden] on
  every rank.
- ``ag_rs``: the input is row-sharded (rank r holds ``row_split(m, world)[r]``); AllGather-GEMM
  (``kernels/allgather_gemm``), silu_mul, GEMM-ReduceScatter (``kernels/gemm_reducescatter``), both
  overlapped (``variant``, ``signal``, ``chunk_tiles``, ``order``, ``gather``, ``reduce``, ``comm_sms``).
  Returns this rank's rows [rows, hidden].

The GEMM tiles (``block_m/n/k``, ``group_m``, ``num_warps``, ``num_stages``, ``tma``) are shared by
both GEMMs of the block. ``first_half`` / ``second_half`` are the two linear halves, reused by
``kernels/tp_attn`` (whose attention core sits between them).

The template's inputs hold the replicated ``x`` and an ``out`` [m, hidden]; a launch returns this
rank's rows of the block output (a view of ``out``): ``ag_rs`` runs on the rank's rows of ``x``
and writes only its rows of ``out``, ``gemm_ar`` writes all of ``out``. Each strategy is thus timed
in its own layout. Partial sums are rounded to the activation dtype before they are summed (both
strategies and NCCL do so); the reference follows those rounding points in fp64.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton

from tuneforge.dsl import Problem, Space, Template, categorical, register
from tuneforge.dsl.comm import row_split
from tuneforge.dsl.problem import DTYPE_NAMES
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.kernels import allgather_gemm as AG
from tuneforge.kernels import allreduce as AR
from tuneforge.kernels import gemm as G
from tuneforge.kernels import gemm_reducescatter as RS
from tuneforge.kernels import silu_mul as SILU
from tuneforge.kernels import _fused as FUSED
from tuneforge.kernels._common import rank_generator
from tuneforge.kernels._fused import TILE_KEYS, gemm_rejection
from tuneforge.dsl.roofline import gemm_config_time

STRATEGIES = ("gemm_ar", "ag_rs")
GEMM_AR = {"strategy": ["gemm_ar"]}
AG_RS = {"strategy": ["ag_rs"]}


# --- the block's space, shared with tp_attn -----------------------------------------------------------

def block_space(m: int, world: int, gemms: list[tuple[int, int]]) -> Space:
    """strategy, the tiles both GEMMs share (capped by the smaller of their dims), comm_sms, then each
    strategy's own parameters. ``gemms``: the block's (n, k) pairs."""
    return Space(categorical("strategy", STRATEGIES),
                 *FUSED.tile_space(m, min(n for n, _ in gemms), min(k for _, k in gemms)), FUSED.COMM_SMS,
                 categorical("ar_strategy", ["one_shot", "two_shot"], when=GEMM_AR),
                 categorical("ar_variant", ["push", "pull"], when=GEMM_AR),
                 *FUSED.comm_space(when=AG_RS), categorical("gather", AG.GATHERS, when=AG_RS),
                 categorical("reduce", ["fused", "consumer"], when=AG_RS))


def block_constraints(gemms_of):
    """The constraints of a block whose (n, k) pairs are ``gemms_of(problem)``:
    gemm's launch rules on each GEMM (at the rows a GEMM of that strategy covers: all m, or one
    rank's share), and for ag_rs the fused kernels' SM budget and tiles no larger than a share."""
    def rows(config, problem):
        return problem["m"] if config["strategy"] == "gemm_ar" else triton.cdiv(problem["m"], problem.world)

    def launchable(config, problem, spec):
        for n, k in gemms_of(problem):
            pipelines = AG.AG_PIPELINES if config["strategy"] == "ag_rs" else 1
            why = gemm_rejection(config, problem.dtype, rows(config, problem), n, k, spec, G.LAUNCH_CONSTRAINTS,
                                 pipelines)
            if why:
                return why
        if config["strategy"] == "ag_rs":    # the fused kernels' spaces cap the tiles at one share
            for n, k in gemms_of(problem):
                why = gemm_rejection(config, problem.dtype, rows(config, problem), n, k, spec,
                                     (G.tile_exceeds_problem,))
                if why:
                    return why
            return FUSED.comm_sms_fit(config, problem, spec)
        return None

    def fits(config, problem, spec):
        for n, k in gemms_of(problem):
            why = gemm_rejection(config, problem.dtype, rows(config, problem), n, k, spec, FUSED.GEMM_FIT)
            if why:
                return why
        if config["strategy"] == "ag_rs":
            return FUSED.chunk_covers_share(config, problem, spec)
        return None
    return launchable, fits


def block_template(op: str, gemms_of, doc: str, **parts) -> Template:
    """A TP block's template (multi-rank): the constraints ``block_constraints`` derives from its GEMMs'
    (n, k) pairs ``gemms_of(problem)``; ``parts`` are its own space, inputs, launch, references and cost."""
    return Template(op=op, constraints=block_constraints(gemms_of), multi_rank=True, doc=doc, **parts)


def block_default(problem: Problem, spec, gemms: list[tuple[int, int]], strategy: str = "gemm_ar") -> dict:
    """gemm_ar: gemm's default tiles for the block's GEMMs and the all-reduce's own defaults; ag_rs:
    tiles for one rank's share of the rows and the fused kernels' defaults."""
    m, w, dtype = problem["m"], problem.world, problem.dtype
    n, k = min(n for n, _ in gemms), min(k for _, k in gemms)
    if strategy == "gemm_ar":
        cfg = FUSED.tile_defaults(m, n, k, dtype, spec)
        ar = AR.TEMPLATE.default_config(Problem.make("allreduce", dtype, w, m=m, n=problem["hidden"]), spec)
        cfg.update(strategy="gemm_ar", comm_sms=min(ar["comm_sms"], 32), ar_strategy=ar["strategy"],
                   ar_variant=ar["variant"])
        return cfg
    if strategy != "ag_rs":
        raise InputError(f"unknown TP block strategy {strategy!r}; expected one of {STRATEGIES}")
    (n1, k1), (n2, k2) = gemms
    ag = AG.default_config(Problem.make("ag_gemm", dtype, w, m=m, n=n1, k=k1), spec)
    rs = RS.default_config(Problem.make("gemm_rs", dtype, w, m=m, n=n2, k=k2), spec)
    cfg = FUSED.tile_defaults(triton.cdiv(m, w), n, k, dtype, spec, AG.AG_PIPELINES)
    cfg.update(strategy="ag_rs", comm_sms=max(ag["comm_sms"], rs["comm_sms"]), variant="push", signal=ag["signal"],
               order="prev", gather=ag["gather"], reduce=rs["reduce"])
    return cfg


@functools.lru_cache(maxsize=1024)
def _sub_configs(items: tuple, world: int, m: int, hidden: int, dtype: str) -> dict:
    """The kernels' configs inside one block config: gemm, all-reduce, AG-GEMM, GEMM-RS."""
    config = dict(items)
    tiles = {key: config[key] for key in TILE_KEYS}
    if config["strategy"] == "gemm_ar":
        ar = AR.TEMPLATE.default_config(Problem.make("allreduce", dtype, world, m=m, n=hidden), None)
        ar.update(strategy=config["ar_strategy"], variant=config["ar_variant"], comm_sms=config["comm_sms"])
        return {"gemm": G.whole_tiles_config(tiles), "allreduce": ar}
    fused = {**tiles, **{key: config[key] for key in ("variant", "signal", "order", "comm_sms", "chunk_tiles")
                         if key in config}}
    return {"ag_gemm": {**fused, "gather": config["gather"]}, "gemm_rs": {**fused, "reduce": config["reduce"]}}


def sub_configs(config: dict | None, world: int, m: int, hidden: int, dtype: torch.dtype) -> dict:
    """``config`` None: gemm_ar with every kernel's default config."""
    if not config:
        return {"gemm": None, "allreduce": None}
    if config.get("strategy") not in STRATEGIES:
        raise ConfigRejected(f"TP block config {config}: strategy must be one of {STRATEGIES}")
    try:
        return _sub_configs(tuple(sorted(config.items())), world, m, hidden, DTYPE_NAMES[dtype])
    except KeyError as e:
        raise ConfigRejected(f"TP block config {config}: missing parameter {e}") from None


def heap_bytes(max_tokens: int, hidden: int, world: int, itemsize: int = 2) -> int:
    """Symmetric-heap bytes the TP blocks need for up to ``max_tokens`` tokens per call: the
    double-buffered staging of AG-GEMM (m x hidden), GEMM-RS (world x ceil(m / world) x hidden) and
    the all-reduce of gemm_ar (world x m x hidden for one_shot push), plus signals. Channels grow
    by reallocation on the heap (a bump allocator), so call the blocks at the largest token count
    first (e.g. when warming CUDA graphs), or the smaller channels carved before stay abandoned."""
    m = max(1, max_tokens)
    per_parity = (m + world * triton.cdiv(m, world) + world * m + 2 * m) * hidden * itemsize
    return 2 * per_parity + (16 << 20)


def strategy_of(config: dict | None) -> str:
    """The layout a block config runs in: ``gemm_ar`` (replicated rows) or ``ag_rs`` (row-sharded)."""
    return (config or {}).get("strategy", "gemm_ar")


# --- the two halves (the engine calls these) ----------------------------------------------------------

def first_half(x: torch.Tensor, w: torch.Tensor, *, ctx, config: dict | None = None, m: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Column-parallel linear: all ``m`` rows of ``x @ w.T`` on every rank ([m, n], n = this rank's
    out-features). gemm_ar: ``x`` is the replicated [m, hidden]; ag_rs: ``x`` is this rank's rows and
    ``m`` the total (gathered while the GEMM runs)."""
    if strategy_of(config) == "ag_rs":
        if m is None:
            raise InputError("ag_rs: pass m= (the total rows; x holds this rank's rows)")
        sub = sub_configs(config, ctx.size, m, x.shape[1], x.dtype)
        return AG.allgather_gemm(x, w, ctx=ctx, m=m, out=out, config=sub["ag_gemm"])
    if m is not None and m != x.shape[0]:
        raise InputError(f"gemm_ar: x must hold all m={m} rows (replicated), got {x.shape[0]}")
    sub = sub_configs(config, ctx.size, x.shape[0], x.shape[1], x.dtype)
    return G.gemm(x, w, out=out, config=sub["gemm"])


def second_half(a: torch.Tensor, w: torch.Tensor, *, ctx, config: dict | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-parallel linear + the sum over ranks: gemm_ar -> [m, n] on every rank (GEMM, then
    all-reduce); ag_rs -> this rank's rows [rows, n] (GEMM-ReduceScatter)."""
    sub = sub_configs(config, ctx.size, a.shape[0], w.shape[0], a.dtype)
    if strategy_of(config) == "ag_rs":
        return RS.gemm_reducescatter(a, w, ctx=ctx, out=out, config=sub["gemm_rs"])
    return AR.allreduce(G.gemm(a, w, config=sub["gemm"]), ctx=ctx, out=out, config=sub["allreduce"])


def tp_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, *, ctx, config: dict | None = None,
           m: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen3's MLP on this rank's shards: ``gate_up`` [2 * inter, hidden] ([gate | up] rows), ``down``
    [hidden, inter]. gemm_ar (also ``config`` None): ``x`` replicated [m, hidden] -> [m, hidden], the
    sum over ranks, on every rank. ag_rs: ``x`` = this rank's rows of ``m`` -> this rank's rows.
    Collective."""
    for name, t in (("gate_up", gate_up), ("down", down)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise InputError(f"tp_mlp: {name} must be a 2-D tensor")
    if gate_up.shape[0] != 2 * down.shape[1] or gate_up.shape[1] != down.shape[0]:
        raise InputError(f"tp_mlp: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} must be "
                         f"[2 * inter, hidden] and [hidden, inter]")
    h = first_half(x, gate_up, ctx=ctx, config=config, m=m)
    return second_half(SILU.silu_mul(h), down, ctx=ctx, config=config, out=out)


# --- template plumbing shared with tp_attn ------------------------------------------------------------

def own_rows(t: torch.Tensor, ctx) -> torch.Tensor:
    row0, rows = row_split(t.shape[0], ctx.size)[ctx.rank]
    return t[row0:row0 + rows]


def run_block(block, x: torch.Tensor, weights: tuple, ctx, out: torch.Tensor, config: dict | None) -> torch.Tensor:
    """A template launch: ``block`` in its strategy's layout on the replicated ``x``; returns this
    rank's rows of ``out``."""
    if strategy_of(config) == "ag_rs":
        block(own_rows(x, ctx), *weights, ctx=ctx, config=config, m=x.shape[0], out=own_rows(out, ctx))
    else:
        block(x, *weights, ctx=ctx, config=config, out=out)
    return own_rows(out, ctx)


def summed_rows(partial: torch.Tensor, ctx) -> torch.Tensor:
    """This rank's rows of the fp64 sum over ranks of ``partial`` (rounded to its dtype, as exchanged)."""
    return own_rows(torch.stack([p.double() for p in ctx.world.all_gather(partial)]).sum(0), ctx)


def all_reduced_rows(partial: torch.Tensor, ctx) -> torch.Tensor:
    """torch.distributed.all_reduce (NCCL; gloo on host copies for ranks sharing one GPU), this
    rank's rows."""
    import torch.distributed as dist
    if partial.is_cuda and ctx.world.backend == "gloo":
        host = partial.cpu()
        dist.all_reduce(host, group=ctx.world.group)
        return own_rows(host.to(partial.device), ctx)
    dist.all_reduce(partial, group=ctx.world.group)
    return own_rows(partial, ctx)


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).double()


def block_cost(problem: Problem, config: dict | None, spec, gemms: list[tuple[int, int]], between) -> float:
    """gemm_ar: both GEMMs (gemm's tile model) + what runs between + the all-reduce; ag_rs: the fused
    kernels' overlap models; baseline: cuBLAS-like GEMMs + eager between + NCCL all-reduce.
    ``between(config_or_none)``: seconds of the op between the GEMMs."""
    m, w, dtype = problem["m"], problem.world, problem.dtype
    (n1, k1), (n2, k2) = gemms
    reduce = Problem.make("allreduce", dtype, w, m=m, n=problem["hidden"])    # priced as the allreduce op is
    if config is None:
        return (gemm_config_time(m, n1, k1, None, spec, dtype) + between(None)
                + gemm_config_time(m, n2, k2, None, spec, dtype) + AR.cost(reduce, None, spec))
    sub = sub_configs(config, w, m, problem["hidden"], problem.torch_dtype)
    if config["strategy"] == "gemm_ar":
        return (gemm_config_time(m, n1, k1, sub["gemm"], spec, dtype) + between(config)
                + gemm_config_time(m, n2, k2, sub["gemm"], spec, dtype) + AR.cost(reduce, sub["allreduce"], spec))
    return (AG.cost(Problem.make("ag_gemm", dtype, w, m=m, n=n1, k=k1), sub["ag_gemm"], spec) + between(config)
            + RS.cost(Problem.make("gemm_rs", dtype, w, m=m, n=n2, k=k2), sub["gemm_rs"], spec))


# --- the tp_mlp template --------------------------------------------------------------------------------

def _gemms(problem: Problem) -> list[tuple[int, int]]:
    return [(2 * problem["inter"], problem["hidden"]), (problem["hidden"], problem["inter"])]


def _launch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, *, ctx, out: torch.Tensor,
            config: dict | None = None) -> torch.Tensor:
    return run_block(tp_mlp, x, (gate_up, down), ctx, out, config)


def reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ctx) -> torch.Tensor:
    """fp64 with the block's rounding points: gate_up output, silu_mul output and each rank's
    partial sum are rounded to the activation dtype; this rank's rows of the sum over ranks."""
    h = rounded(x.double() @ gate_up.double().T, x.dtype)
    gate, up = h.chunk(2, dim=-1)
    a = rounded(F.silu(gate) * up, x.dtype)
    return summed_rows((a @ down.double().T).to(x.dtype), ctx)


def baseline(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ctx) -> torch.Tensor:
    """What a torch user runs: F.linear, silu * up, F.linear, dist.all_reduce (this rank's rows)."""
    h = F.linear(x, gate_up)
    inter = down.shape[1]
    return all_reduced_rows(F.linear(F.silu(h[:, :inter]) * h[:, inter:], down), ctx)


def baseline_ag_rs(x_rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ctx, m: int) -> torch.Tensor:
    """The row-sharded torch way: all_gather_into_tensor, F.linear, silu * up, F.linear,
    reduce_scatter_tensor (this rank's rows)."""
    from tuneforge.kernels.allgather import baseline as gather
    from tuneforge.kernels.reducescatter import baseline as scatter
    h = F.linear(gather(x_rows, ctx, m), gate_up)
    inter = down.shape[1]
    return scatter(F.linear(F.silu(h[:, :inter]) * h[:, inter:], down), ctx)


def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    """x ~ N(0, 1), the same on every rank; this rank's weight shards scaled so that every stage
    stays ~ N(0, 1)."""
    m, hidden, inter = problem["m"], problem["hidden"], problem["inter"]
    dt = problem.torch_dtype
    x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(seed)).to(dt).to(device)
    g = rank_generator(problem, seed, ctx, stream=1)
    gate_up = (torch.randn(2 * inter, hidden, generator=g) / hidden ** 0.5).to(dt).to(device)
    down = (torch.randn(hidden, inter, generator=g) / (0.25 * inter * ctx.size) ** 0.5).to(dt).to(device)
    return {"x": x, "gate_up": gate_up, "down": down, "ctx": ctx,
            "out": torch.empty((m, hidden), dtype=dt, device=device)}


def space(problem: Problem) -> Space:
    return block_space(problem["m"], problem.world, _gemms(problem))


def default_config(problem: Problem, spec=None, strategy: str = "gemm_ar") -> dict:
    return block_default(problem, spec, _gemms(problem), strategy)


def work(problem: Problem) -> tuple[float, float]:
    m, h, i = problem["m"], problem["hidden"], problem["inter"]
    size = problem.torch_dtype.itemsize
    return 2.0 * m * 3 * i * h, float((3 * i * h + 2 * m * h + 3 * m * i) * size)


def cost(problem: Problem, config: dict | None, spec) -> float:
    silu = Problem.make("silu_mul", problem.dtype, m=problem["m"], n=problem["inter"])

    def between(cfg):
        return SILU.TEMPLATE.cost(silu, None if cfg is None else SILU.TEMPLATE.default_config(silu, spec), spec)
    return block_cost(problem, config, spec, _gemms(problem), between)


TEMPLATE = register(block_template(
    "tp_mlp", _gemms, "TP MLP: gemm + silu_mul + gemm + all-reduce (replicated rows) or AG-GEMM + silu_mul + "
    "GEMM-RS (row-sharded), strategy in the space", space=space, make_inputs=make_inputs, launch=_launch,
    reference=reference, baseline=baseline, default_config=default_config, work=work, cost=cost))
