"""The engine's tensor-parallel runtime (TP > 1): each forward's layout, the symmetric heap's lifetime,
and the collectives of the torch path.

Each layer's attention projection pair and MLP run as the TP blocks (``kernels/tp_attn``: qkv_half ->
the engine's attention core -> o_half; ``kernels/tp_mlp``) with the configs of ops ``tp_attn`` /
``tp_mlp``, looked up once per forward (``layout``). One layout serves a whole forward (the residual
stream keeps it through the layer stack): row-sharded only if both blocks' configs say ``ag_rs``, else
``gemm_ar`` for both (a block whose winner is ag_rs then runs gemm_ar at its default config). A block
without a config runs the torch path (gemm + torch.distributed all-reduce, ``all_reduce``). The blocks
run on a symmetric heap opened once per engine (``Heap``), whose channels are warmed at the largest
token count first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

import tuneforge
from tuneforge.dsl.comm import row_split
from tuneforge.dsl.heap import SymmetricHeap
from tuneforge.engine.lookup import BASELINE, LAUNCHER_DEFAULT
from tuneforge.errors import InputError
from tuneforge.kernels import tp_mlp as TPM
from tuneforge.kernels.allgather import allgather
from tuneforge.kernels._common import launch_spec
from tuneforge.models import problems as P


@dataclass(frozen=True)
class TPStep:
    """How one forward pass runs its tensor-parallel linear pairs (the same decision on every rank).
    ``attn`` / ``mlp``: the block's config (``LAUNCHER_DEFAULT``: the block's defaults, gemm_ar), or
    ``BASELINE``: gemm + torch.distributed all-reduce. ``sharded`` (ag_rs): the residual stream holds
    only this rank's rows ``[row0, row0 + rows)`` of the ``m`` tokens."""
    shard: object
    m: int
    attn: Optional[dict] = BASELINE
    mlp: Optional[dict] = BASELINE
    sharded: bool = False
    row0: int = 0
    rows: int = 0


def strategies(configs) -> set:
    """The block strategies a dispatch whose TP block configs are ``configs`` may run: gemm_ar (the
    fallback layout) plus ag_rs if a config chooses it; empty when none runs a block."""
    found = {TPM.strategy_of(c) for c in configs if not c.get("baseline")}
    return found | {"gemm_ar"} if found else set()


def layout(choice: Callable, m: int, dtype: torch.dtype, shard, hidden: int, qkv: int, o_in: int,
           inter: int, heap_open: bool, sparse: bool = False) -> TPStep:
    """The TP plan of one forward of ``m`` tokens: the tp_attn / tp_mlp configs ``choice`` (problem ->
    config) gives for this shape and the layout they share. ``inter`` 0: no dense MLP (no tp_mlp);
    ``sparse``: MoE layers, which route every token on every rank, so the rows stay replicated."""
    if shard.size == 1:
        return TPStep(shard, m)
    attn = choice(P.tp_attn(dtype, shard.size, m, hidden, qkv, o_in))
    mlp = choice(P.tp_mlp(dtype, shard.size, m, hidden, inter)) if inter else BASELINE
    if (attn is not BASELINE or mlp is not BASELINE) and not heap_open:
        raise InputError("the TP blocks run on a symmetric heap: call Ops.open_tp(model, ...) on every "
                         "rank first (the Generator does)")
    if not sparse and attn is not BASELINE and mlp is not BASELINE and \
            TPM.strategy_of(attn) == TPM.strategy_of(mlp) == "ag_rs":
        row0, rows = row_split(m, shard.size)[shard.rank]
        return TPStep(shard, m, attn, mlp, True, row0, rows)

    def replicated(config):      # an ag_rs winner in a replicated forward: gemm_ar, default config
        return config if config is BASELINE or TPM.strategy_of(config) == "gemm_ar" else LAUNCHER_DEFAULT
    return TPStep(shard, m, replicated(attn), replicated(mlp))


class Heap:
    """The TP blocks' symmetric heap, open from the first ``open`` to the engine's end. Channels grow by
    reallocation on a heap that never frees, so it is warmed at the largest sizes first; a reopen
    (larger sizes) keeps the old heap alive, since decode graphs captured on it may still replay."""

    def __init__(self):
        self.heap = self.ctx = None
        self.tokens = self.logit_rows = 0      # what the channels are warmed for
        self._retired: list = []

    def covers(self, max_tokens: int, logit_rows: int) -> bool:
        return self.ctx is not None and max_tokens <= self.tokens and logit_rows <= self.logit_rows

    def open(self, model, max_tokens: int, logit_rows: int, ag_rs: bool) -> None:
        """Collective: a heap for forwards up to ``max_tokens`` tokens and ``logit_rows`` gathered rows
        of logits (at least the sizes it already covers), warmed at those sizes."""
        shard = model.shard
        if shard.world is None:
            raise InputError("the TP blocks need this rank's World: build the model with Shard.of(world)")
        max_tokens, logit_rows = max(max_tokens, self.tokens), max(logit_rows, self.logit_rows)
        hidden, size = model.cfg.hidden_size, model.dtype.itemsize
        gathered = max(max_tokens * hidden, logit_rows * model.cfg.vocab_size) * size   # the all-gathers
        if self.heap is not None:
            self._retired.append(self.heap)
        self.heap = SymmetricHeap(shard.world, TPM.heap_bytes(max_tokens, hidden, shard.size, size) + 2 * gathered)
        self.ctx = self.heap.context()
        self._warm_up(model, max_tokens, logit_rows, ag_rs)
        self.tokens, self.logit_rows = max_tokens, logit_rows

    def _warm_up(self, model, tokens: int, logit_rows: int, ag_rs: bool) -> None:
        """The blocks and the all-gathers at their largest sizes, so every channel is carved once."""
        ctx, mlp, tp = self.ctx, model.dense_mlp, model.shard.size
        x = torch.zeros((tokens, model.cfg.hidden_size), dtype=model.dtype, device=ctx.device)
        mine = row_split(tokens, tp)[ctx.rank]
        if mlp is not None:      # an all-MoE model runs no tp_mlp block
            TPM.tp_mlp(x, mlp.gate_up, mlp.down, ctx=ctx)
        if ag_rs and mlp is not None:
            problem = P.tp_mlp(model.dtype, tp, tokens, x.shape[1], mlp.inter)
            spec = None if tuneforge.INTERPRETED else launch_spec(ctx.device)
            config = TPM.default_config(problem, spec, "ag_rs")
            TPM.tp_mlp(x[mine[0]:mine[0] + mine[1]], mlp.gate_up, mlp.down, ctx=ctx, config=config, m=tokens)
        logits = torch.zeros((logit_rows, model.vocab_part), dtype=model.dtype, device=ctx.device)
        gathers = [(x[mine[0]:mine[0] + mine[1]], tokens), (logits, tp * logit_rows)]
        for part, m in sorted(gathers, key=lambda g: -g[1] * g[0].shape[1]):
            allgather(part, ctx=ctx, m=m)
        ctx.synchronize()

    def all_gather_columns(self, x: torch.Tensor, shard) -> torch.Tensor:
        """``all_gather_columns`` through this heap when it is open and warmed for ``x``'s rows."""
        return all_gather_columns(x, shard, self.ctx if self.ctx is not None and x.shape[0] <= self.logit_rows
                                  else None)


def all_gather_columns(x: torch.Tensor, shard, ctx=None, config: dict | None = None) -> torch.Tensor:
    """[rows, n/tp] on each rank -> [rows, n] on every rank, rank order along the columns: through the
    all-gather on ``ctx``'s heap (CUDA-graph safe; its channel warmed for the size; ``config``: the
    allgather template's, None its default), else torch.distributed."""
    if shard.size == 1:
        return x
    rows, part = x.shape
    if ctx is not None:
        stacked = allgather(x.contiguous(), ctx=ctx, m=shard.size * rows, config=config)   # rank r's block r
        return stacked.view(shard.size, rows, part).transpose(0, 1).reshape(rows, shard.size * part)
    host = x.is_cuda and dist.get_backend(shard.group) == "gloo"
    src = x.cpu() if host else x.contiguous()
    parts = [torch.empty_like(src) for _ in range(shard.size)]
    dist.all_gather(parts, src, group=shard.group)
    return torch.cat(parts, dim=-1).to(x.device)


def all_reduce(x: torch.Tensor, shard) -> torch.Tensor:
    """The torch path's sum over ranks, in place."""
    if shard.size > 1:
        if x.is_cuda and dist.get_backend(shard.group) == "gloo":   # ranks sharing a GPU: host copies
            host = x.cpu()
            dist.all_reduce(host, group=shard.group)
            return x.copy_(host)
        dist.all_reduce(x, group=shard.group)
    return x
