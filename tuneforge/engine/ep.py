"""The engine's expert parallelism: which MoE layout a run loads, and the symmetric heap moe_block runs
on (the placed experts' all-to-all, or a tp winner's all-reduce).

The layout of the sparse layers at TP > 1 (``models/qwen3.Shard.moe``) is a load-time choice, since the
two hold different weights: ``tp`` every expert's moe_intermediate / tp channels (outputs all-reduced),
``ep`` experts [r E / N, (r + 1) E / N) whole on rank r (tokens sent to their experts' owners). ``layout``
makes it once, before the weights load: ``tp`` / ``ep`` as asked, ``auto`` the strategy of the stored
``moe_block`` winner at the decode bucket the run serves, tp without one (and at TP 1 or for a dense
model). Within the ep layout every forward looks its ``moe_block`` problem up (``Ops.moe_ep``): an ep
winner runs with its config, a tp winner runs ep at its defaults (the weights are placed), a baseline
winner or none runs the torch path (all_to_all_single around transformers' per-expert loop, then
all_gather: ``kernels/moe_block.baseline_ep``). Within the tp layout (``Ops.moe``) a tp winner runs the
block; anything else, or a layer with a shared expert, runs the ops and torch's all-reduce.

The MoE blocks' heap (``Heap``) is the engine's second, beside the TP blocks' (engine/tp.Heap): in the ep
layout always, in the tp layout where a moe_block tp winner runs (pack, grouped GEMMs, the heap's
all-reduce, instead of the ops and torch's all-reduce). It is opened once, collectively, at the largest
forward and warmed there with every chunk count (ep) or all-reduce strategy (tp) the table's configs
use (channels carved once, every kernel loaded before its first spin-wait). This module imports no
kernel at load (the CLI reads ``LAYOUTS`` and ``layout`` cheaply).
"""
from __future__ import annotations

from typing import Optional

import torch

from tuneforge.engine.lookup import BASELINE
from tuneforge.errors import InputError
from tuneforge.models import problems as P

LAYOUTS = ("tp", "ep", "auto")      # --moe-parallel


def layout(requested: str, cfg, tp: int, choice=None, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> str:
    """The MoE layout (models/qwen3.MOE_LAYOUTS) a run of ``cfg`` at TP ``tp`` loads for ``requested``
    (LAYOUTS); ``choice`` (problem -> config, ``Ops.choice``) answers ``auto`` at the bucket of ``batch``
    decode rows. Impossible requests are refused in one line."""
    if requested not in LAYOUTS:
        raise InputError(f"unknown MoE layout {requested!r}; expected one of {', '.join(LAYOUTS)}")
    sparse = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if requested == "ep":
        if not sparse:
            raise InputError(f"--moe-parallel ep: {cfg.name} has no MoE layers")
        if tp < 2:
            raise InputError("--moe-parallel ep places the experts over the ranks: it needs --tp 2 or more")
        if cfg.num_experts % tp:
            raise InputError(f"--moe-parallel ep: num_experts={cfg.num_experts} of {cfg.name} does not split over "
                             f"{tp} ranks (use --moe-parallel tp)")
        return "ep"
    if requested == "tp" or not sparse or tp < 2 or cfg.num_experts % tp or choice is None:
        return "tp"
    config = choice(block_problem(cfg, tp, batch, dtype))
    return "ep" if config is not BASELINE and config.get("strategy") == "ep" else "tp"


def block_problem(cfg, tp: int, tokens: int, dtype: torch.dtype):
    """The moe_block problem of a forward of ``tokens`` tokens (models/problems, the plan's)."""
    return P.moe_block(dtype, tp, tokens, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                       cfg.num_experts_per_tok)


class Heap:
    """The sparse layers' symmetric heap for moe_block, open from ``open`` to the engine's end (``ctx``:
    what moe_block runs on; ``placed``: the ep layout's). Under baseline dispatch only a context without
    a heap (the ep torch path needs the world alone)."""

    def __init__(self):
        self.heap = self.ctx = None
        self.tokens = 0
        self.placed = False
        self._retired: list = []       # heaps a reopen replaced: decode graphs captured on them may replay

    def open(self, model, max_tokens: int, configs: Optional[list], baseline: bool) -> None:
        """Collective: ``configs`` the configs of the model's layout the table may serve (None: defaults)."""
        from tuneforge.dsl.heap import Context, SymmetricHeap
        from tuneforge.kernels import moe_block as K
        moe = next(layer.mlp for layer in model.layers if hasattr(layer.mlp, "placed"))
        self.placed = moe.placed
        world = model.shard.world
        if world is None:
            raise InputError("moe_block needs this rank's World: build the model with Shard.of(world, ...)")
        if baseline:
            self.ctx = self.ctx or Context(world, None)
            return
        if self.heap is not None and max_tokens <= self.tokens:
            return
        max_tokens = max(max_tokens, self.tokens)
        if self.heap is not None:
            self._retired.append(self.heap)
        chunks = sorted({c.get("chunks", 1) for c in configs or [{}]} | {1})
        self.heap = SymmetricHeap(world, K.heap_bytes(max_tokens, model.cfg.hidden_size, moe.top_k, world.size,
                                                      model.dtype.itemsize))
        self.ctx = self.heap.context()
        self._warm_up(model, moe, max_tokens, configs or [], chunks)
        self.tokens = max_tokens

    def _warm_up(self, model, moe, tokens: int, configs: list, chunks: list) -> None:
        """moe_block at the largest forward, every slot unrouted (id -1: nothing sent, nothing computed,
        every kernel launched; the buffers are sized by the token count, not by the routing): ep with
        each chunk count, fewest first (each channel carved at its largest size once), tp with each
        all-reduce strategy."""
        from tuneforge.kernels import moe_block as K
        from tuneforge.kernels._common import launch_spec
        device, h = self.ctx.device, model.cfg.hidden_size
        x = torch.zeros((tokens, h), dtype=model.dtype, device=device)
        ids = torch.full((tokens, moe.top_k), -1, dtype=torch.int32, device=device)
        weights = torch.zeros((tokens, moe.top_k), dtype=torch.float32, device=device)
        problem = block_problem(model.cfg, model.shard.size, tokens, model.dtype)
        default = K.default_config(problem, launch_spec(device, persistent=False), "ep" if moe.placed else "tp")
        if moe.placed:     # the defaults at this size, with the chunks and form of a stored config using them
            stored = [next((cfg for cfg in configs if cfg.get("chunks", 1) == c), {}) for c in chunks]
            warm = [{**default, **{k: s[k] for k in ("form", "signal_rows") if k in s}, "chunks": c}
                    for c, s in zip(chunks, stored)]
        else:
            warm = [{**default, "ar_strategy": ar}
                    for ar in sorted({c.get("ar_strategy", default["ar_strategy"]) for c in configs})]
        for config in warm:
            K.moe_block(x, ids, weights, moe.gate_up, moe.down, ctx=self.ctx, experts=moe.experts, config=config)
        self.ctx.synchronize()
