"""The routed experts of one sparse MoE layer across ranks (op ``moe_block``): experts TP-sharded
(+ all-reduce) or EP-placed (all-to-all), the strategy a tuned categorical with its own sub-spaces.

The layer's input and output (the same for both strategies, so the engine can swap them): every rank
holds all ``m`` tokens ``x`` [m, hidden] and their routing (``topk_ids`` [m, k] int32, ``topk_weights``
[m, k] fp32) -- the engine's attention is TP, so after o_proj's all-reduce every rank holds every token
and the router runs replicated -- and every rank gets the whole output [m, hidden].

- ``tp``: rank r holds channels [r I / W, (r + 1) I / W) of every expert (``gate_up`` [E, 2 I / W, H],
  [gate | up] rows; ``down`` [E, H, I / W]). Pack, the grouped gate_up GEMM (SiLU-mul fused), the grouped
  down GEMM (router-weighted, combined per token: ``combine`` atomic | reduce), then the all-reduce of the
  partial sums (kernels/allreduce: ``ar_strategy``, ``comm_sms``). Every id must name an expert (the
  router's do): ``combine="reduce"`` would sum a dropped slot's unwritten row (moe_pack's doc).
- ``ep``: rank r owns experts [r E / W, (r + 1) E / W) whole (``gate_up`` [E / W, 2 I, H], ``down``
  [E / W, H, I]). It dispatches only its row share ``row_split(m, W)[r]`` of the tokens
  (kernels/moe_alltoall, ``form`` low_latency | staged, ``comm_sms`` programs, ``comm_block``,
  ``signal_rows`` rows per signal when staged), runs the received rows through its local experts (the
  received local expert ids packed as top-1 routing; the two grouped GEMMs, no combine), combines them
  back to their tokens weighted by the router's weights, and all-gathers the rows (kernels/allgather).
  Ids outside [0, E) are not sent and add nothing (rows the pack drops are never summed).
- Overlap (``ep``, ``chunks`` > 1): the row share is cut into chunks, each with its own dispatch /
  combine channels. On a GPU the all-to-all runs on a side stream: chunk c + 1 is dispatched while the
  local experts run on chunk c, and chunk c is combined while the experts run on chunk c + 1 (under the
  interpreter the same launches run in that order on one stream). The first call of a shape runs
  unoverlapped: it compiles and loads every kernel before any spin-wait can meet a lazy module load.
  How well it overlaps: ``eta_overlap``, from the parts ``ep_parts`` times.

Partial sums and expert rows are rounded to the activation dtype before they are summed (the kernels
and torch do so alike); the reference rounds the SiLU-mul output, the one rounding point both share.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from tuneforge.dsl import Problem, Space, Template, categorical, pow2, register
from tuneforge.dsl.comm import row_split
from tuneforge.dsl.roofline import allreduce_time, nccl_allreduce_time, overlap
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.kernels import allgather as AG
from tuneforge.kernels import allreduce as AR
from tuneforge.kernels import moe_alltoall as A2A
from tuneforge.kernels import moe_gemm as MG
from tuneforge.kernels import moe_pack as PACK
from tuneforge.kernels._common import check_tensor, first_rejection, launch_spec, output_tensor
from tuneforge.models import problems as P

OP = "moe_block"
STRATEGIES = ("tp", "ep")
TP = {"strategy": ["tp"]}
EP = {"strategy": ["ep"]}
GEMM_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")


# --- weights ----------------------------------------------------------------------------------------

def shard(gate_up: torch.Tensor, down: torch.Tensor, strategy: str, rank: int, world: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s part of the whole experts ``gate_up`` [E, 2 I, H] ([gate | up] rows) and ``down``
    [E, H, I] under ``strategy``: tp -> every expert's channel slice (a copy); ep -> its experts (views)."""
    experts, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    if strategy == "tp":
        if inter % world:
            raise InputError(f"{OP}: tp needs the world size {world} to divide the expert intermediate size {inter}")
        step = inter // world
        lo = rank * step
        return (torch.cat([gate_up[:, lo:lo + step], gate_up[:, inter + lo:inter + lo + step]], 1).contiguous(),
                down[:, :, lo:lo + step].contiguous())
    if strategy == "ep":
        if experts % world:
            raise InputError(f"{OP}: ep needs the world size {world} to divide the {experts} experts")
        local = experts // world
        return gate_up[rank * local:(rank + 1) * local], down[rank * local:(rank + 1) * local]
    raise InputError(f"{OP}: unknown strategy {strategy!r}; expected one of {STRATEGIES}")


# --- configs --------------------------------------------------------------------------------------

def _gemm_problems(problem: Problem, strategy: str) -> tuple[Problem, Problem]:
    """The two grouped GEMMs one rank runs, as launched: tp on all m tokens over every expert's channel
    slice; ep on the received rows (capacity: world x the largest row share x top_k, top-1 routing) over
    its experts."""
    m, h, inter, e, k = (problem[d] for d in ("m", "hidden", "inter", "experts", "topk"))
    w = problem.world
    if strategy == "tp":
        i = inter // w
        return (P.moe_gemm(problem.dtype, m, (2 * i, h), e, k, act=True),
                P.moe_gemm(problem.dtype, m, (h, i), e, k, act=False))
    rows = w * row_split(m, w)[0][1] * k
    return (P.moe_gemm(problem.dtype, rows, (2 * inter, h), e // w, 1, act=True),
            P.moe_gemm(problem.dtype, rows, (h, inter), e // w, 1, act=False))


def _a2a_problem(problem: Problem) -> Problem:
    """The all-to-all of one rank's row share (the largest, as the buffers are sized)."""
    return Problem.make(A2A.OP, problem.dtype, problem.world, m=row_split(problem["m"], problem.world)[0][1],
                        hidden=problem["hidden"], experts=problem["experts"], topk=problem["topk"])


@functools.lru_cache(maxsize=1024)
def _sub_configs(items: tuple, problem: Problem) -> dict:
    config = dict(items)
    tiles = {"schedule": "packed", **{key: config[key] for key in GEMM_KEYS}}
    down = {**tiles, "block_n": config["down_block_n"]}
    m, h, w = problem["m"], problem["hidden"], problem.world
    if config["strategy"] == "tp":
        ar = AR.TEMPLATE.default_config(P.allreduce(problem.dtype, w, m, h), None)
        ar.update(strategy=config["ar_strategy"], comm_sms=config["comm_sms"])
        return {"up": tiles, "down": {**down, "combine": config["combine"]}, "allreduce": ar}
    a2a = {"form": config["form"], "block": config["comm_block"], "comm_sms": config["comm_sms"],
           "num_warps": 8 if config["comm_block"] >= 1024 else 4}
    if config["form"] == "staged":
        a2a["signal_rows"] = config["signal_rows"]
    gather = AG.TEMPLATE.default_config(Problem.make(AG.TEMPLATE.op, problem.dtype, w, m=m, n=h), None)
    gather.update(comm_sms=config["comm_sms"])
    return {"up": tiles, "down": {**down, "combine": "reduce"}, "a2a": a2a, "allgather": gather,
            "chunks": config["chunks"]}


def upgrade(config: dict) -> dict:
    """A config from before the down GEMM's own width (``down_block_n``) ran both GEMMs at ``block_n``."""
    return config if "down_block_n" in config or "block_n" not in config else {**config, "down_block_n": config["block_n"]}


def sub_configs(config: dict, problem: Problem) -> dict:
    """The kernels' configs inside one block config: tp -> up / down (moe_gemm), allreduce; ep -> up /
    down (moe_gemm, no combine), a2a (moe_alltoall), allgather, chunks."""
    if config.get("strategy") not in STRATEGIES:
        raise ConfigRejected(f"{OP} config {config}: strategy must be one of {STRATEGIES}")
    try:
        return _sub_configs(tuple(sorted(upgrade(config).items())), problem)
    except KeyError as e:
        raise ConfigRejected(f"{OP} config {config}: missing parameter {e}") from None


def space(problem: Problem) -> Space:
    """strategy; the grouped GEMMs' tiles (moe_gemm's, shared by gate_up and down, but for down_block_n);
    comm_sms (the all-reduce's or the all-to-all's programs); tp: combine, ar_strategy; ep: form,
    comm_block, signal_rows (staged), chunks."""
    return Space(categorical("strategy", STRATEGIES),
                 # the packed schedule's tiles (the ep layer packs received rows), unconditional here
                 *(dataclasses.replace(p, when={}) for p in MG.space(_gemm_problems(problem, "tp")[0]).params
                   if p.name in GEMM_KEYS),
                 # the down GEMM's own width (its K is short: wide tiles feed more MMAs per load)
                 *(dataclasses.replace(p, name="down_block_n", when={})
                   for p in MG.space(_gemm_problems(problem, "tp")[1]).params if p.name == "block_n"),
                 categorical("comm_sms", [1, 2, 4, 8, 16, 32]),
                 categorical("combine", ["atomic", "reduce"], when=TP),
                 categorical("ar_strategy", ["one_shot", "two_shot"], when=TP),
                 categorical("form", A2A.FORMS, when=EP),
                 pow2("comm_block", 256, 4096, when=EP),
                 categorical("signal_rows", A2A.SIGNAL_ROWS, when={**EP, "form": ["staged"]}),
                 categorical("chunks", CHUNKS, when=EP))


def strategy_fits(config: dict, problem: Problem, spec) -> Optional[str]:
    w = problem.world
    if config["strategy"] == "tp" and problem["inter"] % w:
        return f"tp: world {w} does not divide the expert intermediate size {problem['inter']}"
    if config["strategy"] == "ep" and problem["experts"] % w:
        return f"ep: world {w} does not divide the {problem['experts']} experts"
    if config["strategy"] == "ep" and config["chunks"] > max(1, row_split(problem["m"], w)[0][1]):
        return f"ep: {config['chunks']} chunks of a {row_split(problem['m'], w)[0][1]}-row share (empty chunks)"
    return None


def gemms_fit(config: dict, problem: Problem, spec) -> Optional[str]:
    """moe_gemm's constraints on both grouped GEMMs, as this strategy launches them."""
    sub = sub_configs(config, problem)
    for part, gemm in zip(("up", "down"), _gemm_problems(problem, config["strategy"])):
        why = first_rejection(sub[part], gemm, spec, MG.CONSTRAINTS)
        if why:
            return f"{part} GEMM: {why}"
    return None


CONSTRAINTS = (strategy_fits, gemms_fit)


def default_config(problem: Problem, spec=None, strategy: Optional[str] = None) -> dict:
    """moe_gemm's default tiles for the strategy's GEMMs (the gate_up GEMM's, which both share) and the
    communication's defaults. ``strategy`` None: tp where the world divides the intermediate size."""
    if strategy is None:
        strategy = "tp" if problem["inter"] % problem.world == 0 else "ep"
    if strategy not in STRATEGIES:
        raise InputError(f"{OP}: unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    up, down = _gemm_problems(problem, strategy)
    spec = spec or launch_spec(torch.device("cpu"), persistent=False)
    tiles, down_tiles = (MG.default_config(g, spec, schedule="packed") for g in (up, down))
    # both GEMMs share the tiles but the down GEMM's width: none deeper than either GEMM's own default (the
    # down GEMM's K is inter / world under tp)
    tiles["block_k"] = min(tiles["block_k"], down_tiles["block_k"])
    cfg = {"strategy": strategy, **{key: tiles[key] for key in GEMM_KEYS}, "down_block_n": down_tiles["block_n"]}
    if strategy == "tp":
        ar = AR.TEMPLATE.default_config(P.allreduce(problem.dtype, problem.world, problem["m"], problem["hidden"]),
                                        spec)
        return {**cfg, "comm_sms": min(32, ar["comm_sms"]), "combine": "atomic" if problem["m"] <= 256 else "reduce",
                "ar_strategy": ar["strategy"]}
    a2a = A2A.default_config(_a2a_problem(problem), spec)
    cfg.update(comm_sms=min(32, a2a["comm_sms"]), form=a2a["form"], comm_block=max(256, a2a["block"]), chunks=1)
    if a2a["form"] == "staged":
        cfg["signal_rows"] = a2a["signal_rows"]
    return cfg


# --- the layer ------------------------------------------------------------------------------------

def _check(x, topk_ids, topk_weights, gate_up, down, ctx, experts: int, strategy: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise InputError(f"{OP}: x must be a 2-D tensor [tokens, hidden], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    m, h = x.shape
    check_tensor(OP, "x", x, (m, h), None, ctx.device, "contiguous")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 or topk_ids.shape[0] != m \
            or topk_ids.dtype != torch.int32 or not topk_ids.is_contiguous() or topk_ids.device != ctx.device:
        got = (tuple(topk_ids.shape), topk_ids.dtype) if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__
        raise InputError(f"{OP}: topk_ids must be a contiguous int32 [tokens={m}, top_k] tensor on {ctx.device}, "
                         f"got {got}")
    k = topk_ids.shape[1]
    check_tensor(OP, "topk_weights", topk_weights, (m, k), None, ctx.device, "contiguous")
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1 or experts % ctx.size \
            and strategy == "ep":
        raise InputError(f"{OP}: experts={experts!r} must be a positive int (a multiple of the world size "
                         f"{ctx.size} for ep)")
    for name, t in (("gate_up", gate_up), ("down", down)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise InputError(f"{OP}: {name} must be a 3-D [experts, n, k] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    local = experts // ctx.size if strategy == "ep" else experts
    if gate_up.shape[0] != local or down.shape[0] != local or gate_up.shape[2] != h or down.shape[1] != h \
            or gate_up.shape[1] != 2 * down.shape[2]:
        raise InputError(f"{OP}: {strategy} on rank {ctx.rank} of {ctx.size} needs gate_up [{local}, 2 * inter, {h}] "
                         f"and down [{local}, {h}, inter] (moe_block.shard), got {tuple(gate_up.shape)} and "
                         f"{tuple(down.shape)}")


def block_problem(x: torch.Tensor, topk_ids: torch.Tensor, gate_up: torch.Tensor, ctx, experts: int,
                  strategy: str) -> Problem:
    """The Problem of a call, from its operands (the whole intermediate size from either layout)."""
    inter = gate_up.shape[1] // 2 * (ctx.size if strategy == "tp" else 1)
    return P.moe_block(x.dtype, ctx.size, x.shape[0], x.shape[1], inter, experts, topk_ids.shape[1])


def moe_block(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor, *, ctx, experts: int, config: Optional[dict] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The routed experts of ``x`` [m, H] (all tokens, on every rank) -> ``out`` [m, H] on every rank:
    sum over each token's slots j of ``topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`` with
    ``expert(x) = down @ (silu(gate @ x) * (up @ x))``. ``gate_up`` / ``down``: this rank's part in the
    config's strategy (``shard``); ``config`` None: ``default_config``. Collective."""
    # config None: the layout of the weights tells (whole experts: tp's channel slices)
    strategy = ("tp" if gate_up.shape[0] == experts else "ep") if config is None else config.get("strategy")
    if strategy not in STRATEGIES:
        raise InputError(f"{OP}: config strategy must be one of {STRATEGIES}, got {strategy!r}")
    _check(x, topk_ids, topk_weights, gate_up, down, ctx, experts, strategy)
    problem = block_problem(x, topk_ids, gate_up, ctx, experts, strategy)
    out = output_tensor(OP, out, tuple(x.shape), x, "contiguous")
    cfg = config or default_config(problem, launch_spec(x.device, persistent=False), strategy)
    sub = sub_configs(cfg, problem)
    if x.shape[0] == 0:
        return out
    if strategy == "tp":
        return _tp(x, topk_ids, topk_weights, gate_up, down, ctx, sub, out)
    return _ep(x, topk_ids, topk_weights, gate_up, down, ctx, experts, sub, out)


def _tp(x, topk_ids, topk_weights, gate_up, down, ctx, sub, out) -> torch.Tensor:
    top_k, experts = topk_ids.shape[1], gate_up.shape[0]
    packed = PACK.pack(topk_ids, experts, sub["up"]["block_m"])
    h = MG.moe_gemm(x, gate_up, packed, top_k=top_k, gather=True, activation="silu_mul", config=sub["up"])
    partial = MG.moe_gemm(h, down, packed, top_k=top_k, gather=False, routed_weights=topk_weights, combine=True,
                          config=sub["down"])
    return AR.allreduce(partial, ctx=ctx, out=out, config=sub["allreduce"])


def local_experts(d: A2A.Dispatched, gate_up: torch.Tensor, down: torch.Tensor, sub: dict) -> torch.Tensor:
    """The received rows of ``d`` [R_max, H] through this rank's experts -> [R_max, H]: the local ids
    packed as top-1 routing (rows past the received count hold -1 and are dropped: never written, and
    never combined), the grouped gate_up GEMM (SiLU-mul fused), the grouped down GEMM."""
    packed = PACK.pack(d.expert[:, None], gate_up.shape[0], sub["up"]["block_m"])     # a strided column of meta
    h = MG.moe_gemm(d.x, gate_up, packed, top_k=1, gather=True, activation="silu_mul", config=sub["up"])
    return MG.moe_gemm(h, down, packed, top_k=1, gather=False, config=sub["down"])


def _chunks(m: int, ctx, chunks: int) -> list[tuple[int, int, int]]:
    """(first row, rows, buffer rows) of each chunk of this rank's row share: buffers sized by the
    largest share's chunk, the same on every rank (the heap is carved collectively)."""
    row0, rows = row_split(m, ctx.size)[ctx.rank]
    largest = row_split(m, ctx.size)[0][1]
    return [(row0 + a, n, cap) for (a, n), (_, cap) in zip(row_split(rows, chunks), row_split(largest, chunks))]


# per context (weakly: a new context never inherits a freed one's entries by address), the (shape,
# config) keys whose kernels a first, unoverlapped call loaded
_READY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ep(x, topk_ids, topk_weights, gate_up, down, ctx, experts, sub, out) -> torch.Tensor:
    mine = _ep_rows(x, topk_ids, topk_weights, gate_up, down, ctx, experts, sub)
    return AG.allgather(mine, ctx=ctx, m=x.shape[0], out=out, config=sub["allgather"])


def _ep_rows(x, topk_ids, topk_weights, gate_up, down, ctx, experts, sub, experts_fn=None) -> torch.Tensor:
    """This rank's rows of the ep layer: dispatch, ``experts_fn`` (default ``local_experts``), combine,
    chunk by chunk (overlapped on a side stream once warm, see the module doc)."""
    key = (tuple(x.shape), tuple(topk_ids.shape), x.dtype, tuple(sorted(sub["a2a"].items())),
           sub["chunks"], experts_fn is None)
    ready = _READY.setdefault(ctx, set())
    experts_fn = experts_fn or (lambda d: local_experts(d, gate_up, down, sub))
    pieces = _chunks(x.shape[0], ctx, sub["chunks"])
    row0 = pieces[0][0]
    mine = torch.empty((sum(n for _, n, _ in pieces), x.shape[1]), dtype=x.dtype, device=x.device)
    side = x.is_cuda and len(pieces) > 1 and key in ready
    main = torch.cuda.current_stream(x.device) if side else None
    comm = _comm_stream(x.device) if side else None

    def on_comm(fn):
        if not side:
            return fn()
        with torch.cuda.stream(comm):
            return fn()

    if side:
        comm.wait_stream(main)
    sent = []
    for i, (r0, n, cap) in enumerate(pieces):
        d = on_comm(lambda: A2A.dispatch(x[r0:r0 + n], topk_ids[r0:r0 + n], ctx=ctx, experts=experts,
                                         max_tokens=cap, channel=_channel(i), config=sub["a2a"]))
        sent.append((d, _event(comm) if side else None))
    outputs = []      # held to the end: the side stream still reads them after the loop moves on
    for i, ((r0, n, _), (d, arrived)) in enumerate(zip(pieces, sent)):
        if side:
            main.wait_event(arrived)
        y = experts_fn(d)
        outputs.append(y)
        done = _event(main) if side else None

        def back(y=y, d=d, i=i, r0=r0, n=n, done=done):
            if done is not None:
                comm.wait_event(done)
            A2A.combine(y, topk_weights[r0:r0 + n], d, ctx=ctx, out=mine[r0 - row0:r0 - row0 + n],
                        channel=_channel(i), config=sub["a2a"])
        on_comm(back)
    if side:
        main.wait_stream(comm)
    ready.add(key)
    return mine


def ep_parts(x, topk_ids, topk_weights, gate_up, down, *, ctx, experts: int, config: dict) -> dict:
    """Collective callables timing the parts of the ep layer (``moe_block``'s operands, ep ``config``),
    for ``eta_overlap``: ``comm`` (dispatch + combine of this rank's row share in the config's chunks,
    identity experts), ``compute`` (the local experts on rows dispatched once here, on their own
    channel, ``dispatched``), ``layer`` (dispatch -> experts -> combine, overlapped in the config's chunks).
    None includes the final all-gather, which nothing overlaps."""
    if config.get("strategy") != "ep":
        raise InputError(f"{OP}: ep_parts times the ep strategy, got config strategy {config.get('strategy')!r}")
    _check(x, topk_ids, topk_weights, gate_up, down, ctx, experts, "ep")
    sub = sub_configs(config, block_problem(x, topk_ids, gate_up, ctx, experts, "ep"))
    row0, rows = row_split(x.shape[0], ctx.size)[ctx.rank]
    d = A2A.dispatch(x[row0:row0 + rows], topk_ids[row0:row0 + rows], ctx=ctx, experts=experts,
                     max_tokens=row_split(x.shape[0], ctx.size)[0][1], channel=".compute", config=sub["a2a"])
    args = (x, topk_ids, topk_weights, gate_up, down, ctx, experts, sub)
    return {"comm": lambda: _ep_rows(*args, experts_fn=lambda got: got.x),
            "compute": lambda: local_experts(d, gate_up, down, sub), "dispatched": d,
            "layer": lambda: _ep_rows(*args)}


CHUNKS = (1, 2, 4)


def heap_bytes(max_tokens: int, hidden: int, topk: int, world: int, itemsize: int = 2) -> int:
    """Symmetric-heap bytes both strategies need for up to ``max_tokens`` tokens per call, whatever the
    config: tp's all-reduce staging (``world`` x m x hidden per parity, one_shot push); ep's all-gather and,
    per chunk channel (the largest chunk any ``chunks`` gives it), the dispatch buffers (count matrices,
    meta and rows of ``world`` x rows x topk received, the staged send areas) and the combine areas, plus
    signals. Channels grow by reallocation on the bump-allocated heap, so call the layer at the largest
    token count first (e.g. when warming CUDA graphs)."""
    m = max(1, max_tokens)
    share = row_split(m, world)[0][1]
    total = 2 * world * m * hidden * itemsize + 2 * m * hidden * itemsize
    for i in range(max(CHUNKS)):
        tokens = max((row_split(share, c)[i][1] for c in CHUNKS if i < c), default=0)
        area = max(1, tokens * topk)
        capacity = world * area
        total += (2 * world * world + capacity * A2A.META.value + 2 * area * A2A.META.value) * 4 \
            + (capacity + 2 * area) * hidden * itemsize + 2 * capacity * hidden * itemsize
    return total + (16 << 20)


def _channel(chunk: int) -> str:
    return "" if chunk == 0 else f".{chunk}"


@functools.lru_cache(maxsize=None)
def _comm_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _event(stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


def eta_overlap(t_comm: float, t_compute: float, t_layer: float) -> float:
    """The overlap efficiency of the EP layer: ``(T_comm + T_compute - T_layer) / min(T_comm, T_compute)``,
    the share of the shorter part hidden behind the longer one. ``T_comm``: dispatch + combine alone
    (identity experts), ``T_compute``: the local experts alone on the dispatched rows, ``T_layer``: the
    layer with overlap (all three without the final all-gather, which nothing overlaps). 1: the shorter
    part entirely hidden; 0: the parts ran one after the other; below 0: overlapping cost time."""
    return (t_comm + t_compute - t_layer) / max(min(t_comm, t_compute), 1e-12)


# --- reference and baselines ----------------------------------------------------------------------

def reference(x, topk_ids, topk_weights, gate_up, down, shards, ctx, experts) -> torch.Tensor:
    """fp64 from the whole experts: each token's valid slots through its experts (the SiLU-mul output
    rounded to x's dtype, as every path stores it), weighted by the router's weights and summed."""
    xd = x.double()
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    ids = topk_ids.long()
    for e in ids[(ids >= 0) & (ids < experts)].unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = xd[tok] @ gate_up[e].double().T
        gate, up = h.chunk(2, dim=-1)
        a = (F.silu(gate) * up).to(x.dtype).double()
        out.index_add_(0, tok, (a @ down[e].double().T) * topk_weights[tok, slot].double()[:, None])
    return out


def _on_host(ctx, *tensors):
    """gloo exchanges host copies when ranks share a GPU."""
    if tensors[0].is_cuda and ctx.world.backend == "gloo":
        return tuple(t.cpu() for t in tensors)
    return tensors


def baseline(x, topk_ids, topk_weights, gate_up, down, shards, ctx, experts) -> torch.Tensor:
    """TP the torch way: transformers' per-expert loop over this rank's channel slices, then
    torch.distributed.all_reduce."""
    import torch.distributed as dist
    gu, dn = shards["tp"]
    h = MG.baseline(x, gu, topk_ids, gather=True, activation="silu_mul")
    partial = MG.baseline(h, dn, topk_ids, gather=False, routed_weights=topk_weights, combine=True)
    (host,) = _on_host(ctx, partial)
    dist.all_reduce(host, group=ctx.world.group)
    return host.to(x.device)


def baseline_ep(x, topk_ids, topk_weights, gate_up, down, shards, ctx, experts) -> torch.Tensor:
    """EP the torch way: this rank's row share through all_to_all_single (counts exchanged first, split
    sizes read back to the host), transformers' per-expert loop over its experts, the rows back, the
    weighted sum, all_gather."""
    gu, dn = shards["ep"]
    local = experts // ctx.size
    row0, rows = row_split(x.shape[0], ctx.size)[ctx.rank]

    def experts_of(recv, global_ids):
        ids = (global_ids - ctx.rank * local).int().view(-1, 1)
        h = MG.baseline(recv, gu.to(recv.device), ids, gather=True, activation="silu_mul")
        return MG.baseline(h, dn.to(recv.device), ids, gather=False)
    mine = A2A.torch_all_to_all(x[row0:row0 + rows], topk_ids[row0:row0 + rows], topk_weights[row0:row0 + rows],
                                ctx, experts, experts_of)
    return AG.baseline(mine, ctx, x.shape[0])


# --- the template ---------------------------------------------------------------------------------

def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    """The same on every rank: x ~ N(0, 1), a skewed router's routing (moe_gemm.routing), whole experts
    scaled so every stage stays ~ N(0, 1), drawn on ``device``; ``shards``: this rank's part under each
    strategy the world allows."""
    if ctx is None or ctx.size != problem.world:
        raise InputError(f"{OP} {problem.key} needs a world of {problem.world} ranks (ctx)")
    m, h, inter, e, k = (problem[d] for d in ("m", "hidden", "inter", "experts", "topk"))
    dt = problem.torch_dtype
    g = torch.Generator(device=device).manual_seed(seed)
    ids, weights = MG.routing(m, e, k, g)
    x = torch.randn((m, h), generator=g, device=device).to(dt)
    gate_up = (torch.randn((e, 2 * inter, h), generator=g, device=device) / h ** 0.5).to(dt)
    down = (torch.randn((e, h, inter), generator=g, device=device) / (0.3 * inter) ** 0.5).to(dt)
    shards = {s: shard(gate_up, down, s, ctx.rank, ctx.size) for s in STRATEGIES
              if (inter if s == "tp" else e) % ctx.size == 0}
    return {"x": x, "topk_ids": ids, "topk_weights": weights.float(), "gate_up": gate_up, "down": down,
            "shards": shards, "ctx": ctx, "experts": e, "out": torch.empty((m, h), dtype=dt, device=device)}


def _launch(x, topk_ids, topk_weights, gate_up, down, shards, ctx, experts, out=None, config=None):
    if config is None:
        config = default_config(P.moe_block(x.dtype, ctx.size, x.shape[0], x.shape[1], gate_up.shape[1] // 2,
                                            experts, topk_ids.shape[1]), launch_spec(x.device, persistent=False))
    return moe_block(x, topk_ids, topk_weights, *shards[config["strategy"]], ctx=ctx, experts=experts, config=config,
                     out=out)


def work(problem: Problem) -> tuple[float, float]:
    """2 m topk 3 I H flops; the hit experts' weights (uniform routing's expected count), x and out."""
    m, h, inter, e, k = (problem[d] for d in ("m", "hidden", "inter", "experts", "topk"))
    active = e * (1.0 - (1.0 - 1.0 / e) ** (m * k))
    return 2.0 * m * k * 3 * inter * h, float((active * 3 * inter * h + 2 * m * h) * problem.torch_dtype.itemsize)


def cost(problem: Problem, config: Optional[dict], spec) -> float:
    """tp: both grouped GEMMs on the channel slices (``moe_gemm.grouped_time``) + the all-reduce of [m, H]; ep:
    the all-to-all of the row share (moe_alltoall's model, its form), the local experts on the
    expected received rows (m k / W rows over E / W experts), overlapped across ``chunks`` (the hidden
    share 1 - 1 / chunks, a launch set per chunk), then the all-gather of [m, H]. Baseline: tp with
    transformers' per-expert loop (moe_gemm's baseline cost: a GEMM per hit expert) and NCCL's
    all-reduce."""
    m, h, w = problem["m"], problem["hidden"], problem.world
    act = m * h * problem.torch_dtype.itemsize
    if config is None:
        up, down = _gemm_problems(problem, "tp")
        return MG.cost(up, None, spec) + MG.cost(down, None, spec) + nccl_allreduce_time(act, w, spec)
    sub = sub_configs(config, problem)
    if config["strategy"] == "tp":
        up, down = _gemm_problems(problem, "tp")
        return (MG.grouped_time(up, sub["up"], spec) + MG.grouped_time(down, sub["down"], spec)
                + allreduce_time(act, w, spec, sub["allreduce"]))
    rows = max(1, row_split(m, w)[0][1] * problem["topk"])          # expected received rows per rank
    up, down = (g.with_dims(m=rows) for g in _gemm_problems(problem, "ep"))
    compute = MG.grouped_time(up, sub["up"], spec) + MG.grouped_time(down, sub["down"], spec)
    comm = A2A.cost(_a2a_problem(problem), sub["a2a"], spec)
    chunks = sub["chunks"]
    layer = overlap(compute, comm, spec, 1.0 - 1.0 / chunks) + (chunks - 1) * 8 * spec.launch_us * 1e-6
    gather = Problem.make(AG.TEMPLATE.op, problem.dtype, w, m=m, n=h)
    return layer + AG.cost(gather, sub["allgather"], spec)


TEMPLATE = register(Template(
    op=OP, space=space, make_inputs=make_inputs, launch=_launch, reference=reference, baseline=baseline,
    default_config=default_config, work=work, cost=cost, constraints=CONSTRAINTS, multi_rank=True, upgrade=upgrade,
    doc="the routed experts of a sparse layer across ranks: TP-sharded experts + all-reduce or EP-placed "
        "experts + all-to-all (dispatch, grouped GEMMs, combine, all-gather), strategy in the space"))
