"""Dispatch: the model's ops (``Ops``), each running its Triton kernel with the config the lookup
(``engine/lookup``) chooses, or its torch baseline.

Each op maps its tensors to its Problem through ``tuneforge.models.problems`` (the functions the tuning
plan uses), asks ``lookup.choose`` once per shape (cached: after the first pass a call costs one dict
lookup) and runs. A stored config its launcher still rejects at the first call switches that problem
to the baseline, said once: serving never stops for a bad record. At TP > 1 the linear pairs run as
the TP blocks or the torch path, as ``engine/tp`` lays each forward out, on the heap ``tp.Heap`` keeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from tuneforge.dsl.problem import DEFAULT_BUCKETS, DTYPE_NAMES, Problem
from tuneforge.engine import ep as EP
from tuneforge.engine import tp as TP
from tuneforge.engine.lookup import (BASELINE, ENGINE_OPS, MODES, TP_OPS, DispatchTable,  # noqa: F401
                                     choose, database, environment, kernel_config)  # ENGINE_OPS: for the dashboard
from tuneforge.engine.tp import TPStep
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.kernels import decode_attention as k_attn
from tuneforge.kernels import decode_attention_sp as k_attn_sp
from tuneforge.kernels import gemm as k_gemm
from tuneforge.kernels import gemm_fused as k_fused
from tuneforge.kernels import moe_block as k_block
from tuneforge.kernels import moe_gemm as k_moe
from tuneforge.kernels import moe_pack as k_pack
from tuneforge.kernels import moe_router as k_router
from tuneforge.kernels import rmsnorm as k_rmsnorm
from tuneforge.kernels import rope as k_rope
from tuneforge.kernels import shared_expert_gate as k_seg
from tuneforge.kernels import silu_mul as k_silu
from tuneforge.kernels._common import launch_spec
from tuneforge.kernels.allgather import allgather
from tuneforge.kernels.tp_attn import o_half, qkv_half
from tuneforge.kernels.tp_mlp import tp_mlp
from tuneforge.models import problems as P


@dataclass
class Normed:
    """``rmsnorm(residual + delta) * weight`` at a layer boundary, not computed yet, so the GEMM that reads
    it may norm in its prologue. ``delta``: the last block's output still to add into the residual stream
    (None: its GEMM added it in its epilogue). ``Ops.norm`` computes it once (adding ``delta`` in place)."""
    residual: torch.Tensor
    delta: Optional[torch.Tensor]
    weight: torch.Tensor
    eps: float
    value: Optional[torch.Tensor] = None


class Ops:
    """The model's ops. ``mode``: ``tuned`` (configs from ``table``; misses run the torch baseline),
    ``baseline`` (torch everywhere) or ``default`` (every Triton kernel with its default config).

    Configs are cached per shape, so after the first pass a call costs one dict lookup."""

    problems = P    # builds each call's lookup key (export_onnx.ExportOps builds none)

    def __init__(self, mode: str = "tuned", table: Optional[DispatchTable] = None):
        if mode not in MODES:
            raise InputError(f"unknown dispatch mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == "tuned" and table is None:
            raise InputError("tuned dispatch needs a DispatchTable")
        self.mode, self.table = mode, table
        self._chosen: dict[Problem, Optional[dict]] = {}
        self._proven: set[Problem] = set()      # calls whose stored config has launched once
        self._steps: dict[tuple, TPStep] = {}
        self._heap = TP.Heap()                  # the TP blocks' symmetric heap (open_tp)
        self._ep = EP.Heap()                    # the placed sparse layers' (open_tp, engine/ep)
        self.uncapturable = ""                  # why a call made so far cannot be captured in a CUDA graph

    def describe(self) -> str:
        """The mode, and at TP > 1 how each forward shape ran its linear pairs: ag_rs, gemm_ar (the
        blocks, replicated rows), torch (gemm + all-reduce) or gemm_ar+torch (one block each)."""
        if self.mode == "tuned":
            where = f" from {self.table.where}" if self.table.where else ""
            missing = f"; torch baseline for {', '.join(self.table.fallbacks)}" if self.table.fallbacks else ""
            text = f"tuned ({len(self.table)} winners{where}{missing})"
        else:
            text = {"baseline": "torch baseline", "default": "Triton kernels, default configs"}[self.mode]
        steps = [s for s in self._steps.values() if s.shard.size > 1]
        if steps:
            def label(s):
                return "ag_rs" if s.sharded else "+".join(sorted({"torch" if c is BASELINE else "gemm_ar"
                                                                  for c in (s.attn, s.mlp)}))
            text += "; TP: " + ", ".join(f"m={s.m} {label(s)}" for s in steps)
        if self._ep.ctx is not None:     # the MoE blocks' heap: placed experts, or tp winners running the block
            text += "; MoE: experts placed (ep)" if self._ep.placed else "; MoE: moe_block tp"
        return text

    def config(self, op: str, dtype: torch.dtype, world: int = 1, **dims: int) -> Optional[dict]:
        """The config for one call of ``op`` at ``dims`` (see ``choice``)."""
        return self.choice(Problem.make(op, DTYPE_NAMES[dtype], world, **dims))

    def choice(self, problem: Problem) -> Optional[dict]:
        """The config for one call: a stored config for the Triton kernel, ``LAUNCHER_DEFAULT`` (its
        launcher's own default) or ``BASELINE`` (the torch baseline, also when the tuned winner is the
        baseline)."""
        if problem not in self._chosen:
            self._chosen[problem] = choose(self.mode, self.table, problem)
        return self._chosen[problem]

    def _run(self, problem: Problem, kernel, baseline):
        """``kernel(config)`` with this call's config (None: the launcher's default), or ``baseline()``.
        Under tuned dispatch a stored config its launcher rejects (ConfigRejected / InputError, raised
        before anything launches) switches that problem to the baseline for good, said once. A shape's
        first call runs eagerly (decode graphs are captured after warm-up steps), so the switch comes
        before any capture."""
        cfg = self.choice(problem)
        if cfg is BASELINE:
            return baseline()
        if self.mode != "tuned" or problem in self._proven:
            return kernel(kernel_config(cfg))
        try:
            out = kernel(kernel_config(cfg))
        except (ConfigRejected, InputError) as e:
            self._chosen[problem] = BASELINE
            self.table.fall_back(problem.op, problem, cfg, str(e))
            return baseline()
        self._proven.add(problem)
        return out

    # --- ops -----------------------------------------------------------------------------------
    def gemm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._run(self.problems.gemm(x.dtype, x.shape[0], w.shape),
                         lambda cfg: k_gemm.gemm(x, w, config=cfg), lambda: k_gemm.baseline(x, w))

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.problems.silu_mul(x.dtype, x.shape[0], x.shape[1]),
                         lambda cfg: k_silu.silu_mul(x, config=cfg), lambda: k_silu.baseline(x))

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.shape[0] == 0:          # a rank without rows of a row-sharded (ag_rs) forward
            return torch.empty_like(x)
        return self._run(self.problems.rmsnorm(x.dtype, x.shape[0], x.shape[1]),
                         lambda cfg: k_rmsnorm.rmsnorm(x, weight, eps=eps, config=cfg),
                         lambda: k_rmsnorm.baseline(x, weight, eps=eps))

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + residual) * weight, residual) with ``residual += x`` in place."""
        if x.shape[0] == 0:
            return torch.empty_like(x), residual
        return self._run(self.problems.rmsnorm(x.dtype, x.shape[0], x.shape[1]),
                         lambda cfg: k_rmsnorm.rmsnorm(x, weight, eps=eps, residual=residual, config=cfg),
                         lambda: k_rmsnorm.baseline(x, weight, eps=eps, residual=residual)), residual

    # --- fusions (kernels/gemm_fused): each looked up like any op; the unfused ops where it did not win ---
    def normed(self, residual: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
               eps: float) -> Normed:
        return Normed(residual, delta, weight, eps)

    def norm(self, h: Normed) -> torch.Tensor:
        """``h`` computed (once): rmsnorm of the residual stream, or the add into it and rmsnorm."""
        if h.value is None:
            if h.delta is None:
                h.value = self.rmsnorm(h.residual, h.weight, h.eps)
            else:
                h.value, h.delta = self.add_rmsnorm(h.delta, h.residual, h.weight, h.eps)[0], None
        return h.value

    def norm_linear(self, h: Normed, w: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """``linear(norm(h), w, silu)``, with the norm in the GEMM's prologue where that won and nothing
        is left to add into the residual stream."""
        if h.value is not None or h.delta is not None:
            return self.linear(self.norm(h), w, silu)
        x = h.residual
        m, p = x.shape[0], self.problems
        unfused = [p.rmsnorm(x.dtype, m, x.shape[1]), p.gemm(x.dtype, m, w.shape)]
        unfused += [p.silu_mul(x.dtype, m, w.shape[0])] if silu else []
        fused = self._fusion(p.gemm_fused(x.dtype, m, w.shape, norm=True, epilogue="silu_mul" if silu else "none"),
                             unfused)
        return self._run(fused,
                         lambda cfg: k_fused.gemm_fused(x, w, norm_weight=h.weight, eps=h.eps, silu=silu, config=cfg),
                         lambda: self.linear(self.norm(h), w, silu))

    def linear(self, x: torch.Tensor, w: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """``x @ w.T``; ``silu``: w is [gate | up] and the SiLU-mul follows, in its epilogue where that won."""
        if not silu:
            return self.gemm(x, w)
        m, p = x.shape[0], self.problems
        fused = self._fusion(p.gemm_fused(x.dtype, m, w.shape, epilogue="silu_mul"),
                             [p.gemm(x.dtype, m, w.shape), p.silu_mul(x.dtype, m, w.shape[0])])
        return self._run(fused, lambda cfg: k_fused.gemm_fused(x, w, silu=True, config=cfg),
                         lambda: self.silu_mul(self.gemm(x, w)))

    def _fusion(self, fused: Problem, unfused: list) -> Problem:
        """``fused``; under tuned dispatch its choice turns to the unfused ops (once) where their own
        winners together took no longer than the fusion's: it won against the torch ops it replaces,
        and the tuned ones may be faster still."""
        if self.mode == "tuned" and fused not in self._chosen and self.choice(fused) is not BASELINE:
            times = [self.table.time(q) for q in [fused] + unfused]
            if None not in times and times[0] >= sum(times[1:]):
                self._chosen[fused] = BASELINE
        return fused

    def linear_residual(self, a: torch.Tensor, w: torch.Tensor, residual: torch.Tensor) -> Optional[torch.Tensor]:
        """``a @ w.T`` added into ``residual`` in place by the GEMM's epilogue where that won (None), else
        the GEMM's output, for the next norm to add. The fusion is weighed against the GEMM alone: the add
        then rides in the next norm's kernel (add_rmsnorm, the pass over the residual it makes anyway).
        What the fused add forfeits when it loses is the next GEMM's norm prologue, which gained less on
        the H200 than a losing residual epilogue cost (Qwen3-30B-A3B bs 1: qkv's norm prologue 0.24 us
        per layer, o's residual epilogue 2.6 us slower than its GEMM alone, in the winners of
        tune-Qwen3-30B-A3B-tp1-NVIDIA_H200-2026-12-03-budget-125s-killed-at-150s.json; the step 2.53 ms
        with it unfused against 2.68 tuned, decode-fusion-ablation-Qwen3-30B-A3B-...-2026-12-03.json)."""
        def fused(cfg):
            k_fused.gemm_fused(a, w, residual=residual, out=residual, config=cfg)
        m, p = a.shape[0], self.problems
        problem = self._fusion(p.gemm_fused(a.dtype, m, w.shape, epilogue="residual"), [p.gemm(a.dtype, m, w.shape)])
        return self._run(problem, fused, lambda: self.gemm(a, w))

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
        """One token per sequence: q [batch, heads, head_dim] over the cache views k, v [batch, kv_heads,
        kv_len, head_dim]; keys [0, positions[b]] (the baseline reads them from the additive ``mask``).
        Tuned per bucket of kv_len among ``DECODE_CONTEXTS`` (``problems.decode_attention``)."""
        b, heads, d = q.shape
        return self._run(self.problems.decode_attention(q.dtype, b, heads, k.shape[1], d, k.shape[2]),
                         lambda cfg: k_attn.decode_attention(q, k, v, positions, config=cfg),
                         lambda: k_attn.sdpa(q, k, v, mask))

    def decode_attention_sp(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            ctx) -> torch.Tensor:
        """Decode attention over a KV cache sharded by sequence over ``ctx``'s ranks: q [batch, heads,
        head_dim] of every head (the same on every rank) over this rank's shard k, v [batch, kv_heads,
        capacity, head_dim] (``kernels/decode_attention_sp.place``); every rank gets every head's output.
        Tuned per (batch, context bucket, world): the form is the config's categorical."""
        b, heads, d = q.shape

        def baseline():
            if q.is_cuda and ctx.world.backend == "gloo":
                self.uncapturable = "decode_attention_sp's torch baseline gathers through gloo's host copies"
            return k_attn_sp.baseline(q, k, v, positions, ctx)
        return self._run(self.problems.decode_attention_sp(q.dtype, ctx.size, b, heads, k.shape[1], d,
                                                           ctx.size * k.shape[2]),
                         lambda cfg: k_attn_sp.decode_attention_sp(q, k, v, positions, ctx=ctx, config=cfg), baseline)

    def rope_qk_norm(self, qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor,
                     k_weight: torch.Tensor, *, heads: int, kv_heads: int, theta: float, eps: float,
                     scaling=None, kv_cache: Optional[torch.Tensor] = None,
                     cache_rows: Optional[torch.Tensor] = None) -> None:
        """In place on ``qkv`` [tokens, (heads + 2 kv_heads) * head_dim]: q and k per-head RMSNorm, then
        RoPE (``scaling``: the config's rope_scaling) at ``positions`` [tokens]; v untouched. ``kv_cache``
        (a layer's [2, batch, kv_heads, slots, head_dim] planes) with ``cache_rows`` [tokens]: k and v also
        stored there at (row, position), by the kernel in the same launch (the baseline: an indexed copy)."""
        head_dim = q_weight.shape[0]
        qk = qkv[:, :(heads + kv_heads) * head_dim]

        def baseline():
            qk.copy_(k_rope.baseline(qkv, positions, q_weight, k_weight, heads, kv_heads, theta, eps, scaling))
            if kv_cache is not None:
                k_rope.cache_reference(kv_cache, cache_rows, positions, qkv[:, heads * head_dim:])
        self._run(self.problems.rope_qk_norm(qkv.dtype, qkv.shape[0], heads, kv_heads, head_dim,
                                             cache=kv_cache is not None),
                  lambda cfg: k_rope.rope_qk_norm(qkv, positions, q_weight, k_weight, heads=heads, kv_heads=kv_heads,
                                                  theta=theta, eps=eps, scaling=scaling, out=qk, config=cfg,
                                                  kv_cache=kv_cache, cache_rows=cache_rows),
                  baseline)

    def rope(self, qkv: torch.Tensor, positions: torch.Tensor, *, heads: int, kv_heads: int, head_dim: int,
             theta: float, scaling=None) -> None:
        """In place on ``qkv``: RoPE of q and k with no norm before it (Qwen2-MoE), in torch as transformers
        runs it (fp32 cos/sin cast to the dtype, rotate-half in the dtype). No template runs this yet, so
        nothing is looked up and the plan has no problem for it (rope_qk_norm's kernel always norms)."""
        x = qkv[:, :(heads + kv_heads) * head_dim].view(qkv.shape[0], heads + kv_heads, head_dim)
        cos, sin = (t.to(qkv.dtype) for t in k_rope._cos_sin(positions, head_dim, theta, scaling, qkv.device))
        x.copy_(x * cos + k_rope._rotate_half(x) * sin)

    # --- mixture of experts (models/qwen3.SparseMoE) ----------------------------------------------
    def moe_router(self, logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights fp32 [tokens, top_k], expert ids int32 [tokens, top_k]) from the router's logits:
        the fused softmax + top-k kernel, or transformers' torch softmax + topk (the same experts and
        weights: the two are interchangeable)."""
        m, experts = logits.shape
        return self._run(self.problems.moe_router(logits.dtype, m, experts, top_k),
                         lambda cfg: k_router.route(logits, top_k, norm_topk_prob=norm_topk_prob, strategy="fused",
                                                    config=cfg),
                         lambda: k_router.baseline(logits, top_k, norm_topk_prob))

    def moe_pack(self, ids: torch.Tensor, experts: int, block_m: int, dtype: torch.dtype) -> k_pack.Packed:
        """The routed slots packed by expert in runs of ``block_m`` (on the device, no host sync)."""
        return self._run(self.problems.moe_pack(dtype, ids.shape[0], experts, ids.shape[1]),
                         lambda cfg: k_pack.pack(ids, experts, block_m, config=cfg),
                         lambda: k_pack.reference(ids, experts, block_m))

    def moe_experts(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
        """Every token through its ``ids``' experts, the outputs weighted and summed per token: the
        grouped gate_up GEMM (SiLU-mul fused) then the grouped down GEMM (weighted combine fused), each
        the kernel or transformers' per-expert loop. A per_slot config reads ``ids`` (no pack); packed
        ones share one pack: at the gate_up config's block_m; a stored down config of another block_m
        gets its own pack (a launcher-default one takes the pack already made)."""
        tokens, top_k = ids.shape
        experts = gate_up.shape[0]
        packs: dict[int, k_pack.Packed] = {}

        def routed(cfg, problem) -> k_pack.Packed | torch.Tensor:
            """What the GEMM reads its slots from: the router's ids (per_slot) or a pack by expert."""
            chosen = cfg or k_moe.default_config(problem, launch_spec(x.device, persistent=False))
            if chosen["schedule"] == "per_slot":
                return ids
            if cfg is None and packs:
                return next(iter(packs.values()))
            block_m = chosen["block_m"]
            if block_m not in packs:
                packs[block_m] = self.moe_pack(ids, experts, block_m, x.dtype)
            return packs[block_m]

        def per_expert(a, w, **kw):
            # its loop reads the hit experts back to the host: the generator decodes eagerly once it
            # has run (its warm-up steps run every call eagerly first); a capture that still meets it fails
            self.uncapturable = ("moe_gemm's torch baseline (transformers' per-expert loop) reads the routing "
                                 "back to the host")
            if a.is_cuda and torch.cuda.is_current_stream_capturing():
                raise InputError("moe_gemm: the torch baseline (transformers' per-expert loop) reads the routing "
                                 "back to the host, which a CUDA graph cannot capture: decode with --no-graphs, or "
                                 "run the grouped kernel (--dispatch default, or tune moe_gemm)")
            return k_moe.baseline(a, w, ids, **kw)

        up = self.problems.moe_gemm(x.dtype, tokens, gate_up.shape[1:], experts, top_k, act=True)
        h = self._run(up, lambda cfg: k_moe.moe_gemm(x, gate_up, routed(cfg, up), top_k=top_k, gather=True,
                                                     activation="silu_mul", config=cfg),
                      lambda: per_expert(x, gate_up, gather=True, activation="silu_mul"))
        dn = self.problems.moe_gemm(x.dtype, tokens, down.shape[1:], experts, top_k, act=False)
        return self._run(dn, lambda cfg: k_moe.moe_gemm(h, down, routed(cfg, dn), top_k=top_k, gather=False,
                                                        routed_weights=weights, combine=True, config=cfg),
                         lambda: per_expert(h, down, gather=False, routed_weights=weights, combine=True))

    def shared_expert_gate(self, final: torch.Tensor, gate_logits: torch.Tensor, shared_out: torch.Tensor
                           ) -> torch.Tensor:
        """``final + sigmoid(gate_logits) * shared_out``, in place on ``final``."""
        return self._run(self.problems.shared_expert_gate(final.dtype, final.shape[0], final.shape[1]),
                         lambda cfg: k_seg.shared_expert_gate(final, gate_logits, shared_out, out=final, config=cfg),
                         lambda: k_seg.baseline(final, gate_logits, shared_out))

    def moe(self, x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
            norm_topk_prob: bool, tp: TPStep, shared: Optional[tuple] = None) -> torch.Tensor:
        """The sparse block on every token: router logits (gemm) -> select -> experts (+ the shared
        expert ``shared`` = (gate_up, down, gate), gated), summed over ranks (each holds its slice of
        every expert's intermediate channels; the gate's logits are whole on every rank, so the gated
        partial sums add up). At TP > 1 the experts run as moe_block's tp strategy (pack, grouped GEMMs,
        the heap's all-reduce) where its stored winner is tp; otherwise, and with a shared expert (whose
        partial sums share the experts' all-reduce), as the ops above and torch's all-reduce."""
        weights, ids = self.moe_router(self.gemm(x, router), top_k, norm_topk_prob)
        if tp.shard.size > 1:
            experts, world = router.shape[0], tp.shard.size
            problem = self.problems.moe_block(x.dtype, world, x.shape[0], x.shape[1], down.shape[2] * world,
                                              experts, top_k)
            config = self.choice(problem)
            if shared is None and self._ep.ctx is not None and config and config.get("strategy") == "tp":
                return self._run(problem, lambda cfg: k_block.moe_block(x, ids, weights, gate_up, down,
                                                                        ctx=self._ep.ctx, experts=experts, config=cfg),
                                 lambda: TP.all_reduce(self.moe_experts(x, gate_up, down, weights, ids), tp.shard))
        out = self._shared_expert(x, self.moe_experts(x, gate_up, down, weights, ids), shared)
        return TP.all_reduce(out, tp.shard)

    def moe_ep(self, x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
               norm_topk_prob: bool, tp: TPStep, shared: Optional[tuple] = None) -> torch.Tensor:
        """The sparse block in the ep layout (engine/ep; ``gate_up`` / ``down``: this rank's experts, whole):
        the router on every token as in ``moe``, then moe_block's ep strategy (this rank's row share sent
        to its experts' owners, through the local experts, combined back weighted, all rows gathered) at
        its tuned ep config (another strategy's winner: ep's defaults), or the torch path; the shared
        expert (whole on every rank) on every token. Every rank gets every token's output."""
        ctx = self._ep.ctx
        if ctx is None:
            raise InputError("the ep MoE layout runs on its heap: call Ops.open_tp(model, ...) on every rank "
                             "first (the Generator does)")
        weights, ids = self.moe_router(self.gemm(x, router), top_k, norm_topk_prob)
        experts = router.shape[0]
        problem = self.problems.moe_block(x.dtype, tp.shard.size, x.shape[0], x.shape[1], down.shape[2], experts,
                                          top_k)

        def baseline():
            self.uncapturable = ("moe_block's ep torch baseline reads the routing back to the host "
                                 "(all_to_all_single's split sizes, the per-expert loop)")
            return k_block.baseline_ep(x, ids, weights, None, None, {"ep": (gate_up, down)}, ctx, experts)
        out = self._run(problem,
                        lambda cfg: k_block.moe_block(x, ids, weights, gate_up, down, ctx=ctx, experts=experts,
                                                      config=cfg if (cfg or {}).get("strategy") == "ep" else None),
                        baseline)
        return self._shared_expert(x, out, shared)

    def _shared_expert(self, x: torch.Tensor, out: torch.Tensor, shared: Optional[tuple]) -> torch.Tensor:
        """``out`` plus the shared expert ``shared`` = (gate_up, down, gate) of x, gated (none: ``out``)."""
        if shared is None:
            return out
        s_gate_up, s_down, s_gate = shared
        s_out = self.gemm(self.linear(x, s_gate_up, silu=True), s_down)     # SiLU-mul fused where that won
        return self.shared_expert_gate(out, self.gemm(x, s_gate), s_out)

    # --- tensor parallelism (engine/tp) ----------------------------------------------------------
    def open_tp(self, model, max_tokens: int, logit_rows: int) -> None:
        """Collective (every rank, the same arguments): open the symmetric heap the TP blocks run on
        and warm its channels at ``max_tokens`` tokens (the largest forward) and ``logit_rows``
        gathered rows of logits. Nothing to do at TP 1, under baseline dispatch, when no tuned record
        runs a block, or when the open heap already covers the sizes. The placed sparse layers' heap
        (engine/ep) opens here too."""
        moe = next((layer.mlp for layer in model.layers if hasattr(layer.mlp, "placed")), None)
        if moe is not None and model.shard.size > 1:     # the MoE blocks' heap: ep always, tp where a winner runs
            layout = "ep" if moe.placed else "tp"
            configs = None if self.mode != "tuned" else [c for c in self.table.configs("moe_block")
                                                         if c.get("strategy") == layout]
            if moe.placed or (configs and moe.shared is None):    # Ops.moe runs no block with a shared expert
                # no heap where every block runs the torch baseline (tuned without a kernel winner too)
                self._ep.open(model, max_tokens, configs, self.mode == "baseline" or configs == [])
        if model.shard.size == 1 or self.mode == "baseline":
            return
        strategies = {"gemm_ar"} if self.mode == "default" else TP.strategies(
            c for op in TP_OPS for c in self.table.configs(op))
        if strategies and not self._heap.covers(max_tokens, logit_rows):
            self._heap.open(model, max_tokens, logit_rows, "ag_rs" in strategies)

    def tp_step(self, m: int, dtype: torch.dtype, shard, *, hidden: int, qkv: int, o_in: int, inter: int,
                sparse: bool = False) -> TPStep:
        """The TP plan of one forward of ``m`` tokens (``tp.layout``), once per shape (``inter`` 0: no
        dense MLP layer; ``sparse``: the model has MoE layers)."""
        key = (m, dtype, shard.rank, shard.size, hidden, qkv, o_in, inter, sparse)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = TP.layout(self.choice, m, dtype, shard, hidden, qkv, o_in, inter,
                                                self._heap.ctx is not None, sparse)
        return step

    @property
    def tp_steps(self) -> list[TPStep]:
        """The TP plans of the forwards run so far, one per shape."""
        return list(self._steps.values())

    def qkv_proj(self, x, w: torch.Tensor, tp: TPStep) -> torch.Tensor:
        """The fused q|k|v projection of all ``tp.m`` tokens for this rank's heads (x: this rank's
        rows when sharded; the layer's ``Normed`` input, normed in the GEMM's prologue where that won at
        TP 1, or a tensor)."""
        if isinstance(x, Normed):
            if tp.shard.size == 1:
                return self.norm_linear(x, w)
            x = self.norm(x)
        if tp.attn is BASELINE:
            return self.gemm(x, w)
        return qkv_half(x, w, ctx=self._heap.ctx, config=kernel_config(tp.attn), m=tp.m if tp.sharded else None)

    def o_proj(self, a: torch.Tensor, w: torch.Tensor, tp: TPStep, x: Optional[Normed] = None
               ) -> Optional[torch.Tensor]:
        """o_proj summed over ranks: all rows, or this rank's rows when sharded. With the layer's input
        ``x`` at TP 1: added into its residual stream where the fused residual add won (None)."""
        if x is not None and tp.shard.size == 1:
            return self.linear_residual(a, w, x.residual)
        if tp.attn is BASELINE:
            return TP.all_reduce(self.gemm(a, w), tp.shard)
        return o_half(a, w, ctx=self._heap.ctx, config=kernel_config(tp.attn))

    def mlp(self, x, gate_up: torch.Tensor, down: torch.Tensor, tp: TPStep) -> Optional[torch.Tensor]:
        """gate_up -> silu_mul -> down, summed over ranks, in the forward's layout (x: the layer's ``Normed``
        input or a tensor). At TP 1 the norm, the SiLU-mul and the residual add are fused where each won
        (None: down's output went into the residual stream)."""
        if isinstance(x, Normed):
            if tp.shard.size == 1:
                return self.linear_residual(self.norm_linear(x, gate_up, silu=True), down, x.residual)
            x = self.norm(x)
        if tp.mlp is BASELINE:
            return TP.all_reduce(self.gemm(self.linear(x, gate_up, silu=True), down), tp.shard)
        return tp_mlp(x, gate_up, down, ctx=self._heap.ctx, config=kernel_config(tp.mlp),
                      m=tp.m if tp.sharded else None)

    def gather_rows(self, h: torch.Tensor, tp: TPStep) -> torch.Tensor:
        """Row-sharded forward: this rank's rows -> all ``tp.m`` rows on every rank."""
        if not tp.sharded:
            return h
        return allgather(h, ctx=self._heap.ctx, m=tp.m)

    def all_gather_columns(self, x: torch.Tensor, shard, ctx=None) -> torch.Tensor:
        """[rows, n/tp] on each rank -> [rows, n] on every rank (``tp.Heap.all_gather_columns``), or with
        ``ctx`` (a sequence-sharded KV cache's heap) through its all-gather; torch.distributed under
        baseline dispatch."""
        if ctx is None:
            return self._heap.all_gather_columns(x, shard)

        def baseline():
            if x.is_cuda and ctx.world.backend == "gloo":
                self.uncapturable = "the torch baseline's all-gather goes through gloo's host copies"
            return TP.all_gather_columns(x, shard)
        return self._run(self.problems.allgather(x.dtype, shard.size, x.shape[0], x.shape[1]),
                         lambda cfg: TP.all_gather_columns(x, shard, ctx, cfg), baseline)


def open_ops(mode: str, *, db: Optional[str], model: str, tp: int, allow_predicted: bool = False,
             target: Optional[str] = None, buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS,
             quiet: bool = False) -> Ops:
    """The engine's ops for ``mode``; ``tuned`` loads ``environment(tp, target)``'s table from ``db``
    (default: the default database). ``quiet``: say nothing (the TP ranks other than 0)."""
    if mode != "tuned":
        return Ops(mode)
    from tuneforge.db.store import Store
    url, missing = database(db)
    if missing:
        return Ops("tuned", DispatchTable.unavailable(f"{missing} (run `tuneforge tune --model {model} --tp {tp}`)",
                                                      model, tp, quiet=quiet))
    with Store(url, create=False) as store:
        return Ops("tuned", DispatchTable.load(store, environment(tp, target), model, tp, buckets,
                                               allow_predicted=allow_predicted, quiet=quiet))
