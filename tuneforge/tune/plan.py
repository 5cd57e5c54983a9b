"""The tuning plan: which ops at which shapes a model needs at a TP degree, each with its roles.

Every linear of attention and MLP at its per-rank (sharded) shape, the all-reduces after the
row-parallel linears, the strategy choice of each TP block (``tp_attn`` / ``tp_mlp``, whose space
holds the strategy) and of each sparse layer's experts (``moe_block``: TP-sharded or EP-placed), the
elementwise ops, decode attention and the MoE expert GEMMs, for every token bucket. Linears use the
fused layouts the engine runs: one ``qkv_proj`` ([q | k | v] rows) and one ``gate_up_proj`` ([gate |
up] rows). Sharding (Megatron-style): q heads, MLP and expert
intermediate sizes and the vocabulary split across ranks; KV heads split too, or are replicated
when there are fewer KV heads than ranks. At TP > 1 decode attention is planned in both KV-cache
layouts, split by heads (``decode_attention``) and by sequence (``decode_attention_sp``: every KV
head, 1 / tp of the tokens, so none is stored twice), so the tuner measures which wins per bucket
(``tuneforge generate --kv-shard``). A problem several roles (or models) share is planned
once; ops without a registered template stay in the plan, marked baseline-only. The GEMM fusions
(``gemm_fused``: the norm before qkv / gate_up, the SiLU-mul after gate_up, the residual add after o /
down; at TP > 1 only the SiLU-mul, the others meet an all-reduce) are planned beside the unfused ops, so
the tuner measures each against the ops it replaces and the engine fuses only where it won. The shapes and each
op's Problem come from ``tuneforge.models.problems``, which the engine's dispatch calls too.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Optional, Sequence

from tuneforge.dsl.problem import DECODE_CONTEXTS, DTYPES, Problem
from tuneforge.errors import InputError
from tuneforge.models import problems as P
from tuneforge.models.configs import ModelConfig, load_config

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_BUCKETS = (512, 1024, 2048, 4096, 8192)


@dataclass
class PlanItem:
    problem: Problem
    roles: list[str]
    baseline_only: bool = False
    why: str = ""                  # why it is baseline-only

    @property
    def key(self) -> str:
        return self.problem.key


@dataclass
class Plan:
    model: str
    tp: int
    dtype: str
    decode_buckets: tuple
    prefill_buckets: tuple
    items: list[PlanItem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    @property
    def tunable(self) -> list[PlanItem]:
        return [i for i in self.items if not i.baseline_only]

    @property
    def baseline_only(self) -> list[PlanItem]:
        return [i for i in self.items if i.baseline_only]

    def pairs(self) -> list[tuple[Problem, str]]:
        """(problem, role) pairs, for ``Store.add_plan``."""
        return [(i.problem, r) for i in self.items for r in i.roles]

    def find(self, op: str, **dims) -> list[PlanItem]:
        return [i for i in self.items if i.problem.op == op
                and all(i.problem.shape.get(k) == v for k, v in dims.items())]

    def summary(self) -> str:
        ops = sorted({i.problem.op for i in self.baseline_only})
        tail = f", {len(self.baseline_only)} baseline-only ({', '.join(ops)})" if ops else ""
        return (f"{self.model} TP{self.tp} {self.dtype}: {len(self)} problems, {len(self.tunable)} to tune{tail}; "
                f"decode m={','.join(map(str, self.decode_buckets))}, prefill m={','.join(map(str, self.prefill_buckets))}")


def registered_ops() -> dict[str, str]:
    """op -> "" for every importable template; a kernel module that fails to import is skipped (its
    ops then plan as baseline-only) instead of taking every other template down with it."""
    import tuneforge.kernels as pkg
    from tuneforge.dsl import template as registry
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            try:
                importlib.import_module(f"{pkg.__name__}.{info.name}")
            except Exception:   # noqa: BLE001 - a half-written kernel must not stop tuning the rest
                continue
    return {op: t.module for op, t in registry._REGISTRY.items()}


def runs_per_forward(model: str | ModelConfig, role: str) -> int:
    """How many times a problem planned in ``role`` runs in one forward of ``model``: once per layer of
    the kind the role belongs to (the role names ``plan`` gives), once for ``final_norm`` / ``lm_head``."""
    cfg = model if isinstance(model, ModelConfig) else load_config(model)
    layers = range(cfg.num_hidden_layers)
    kinds = {"layer.attn.": lambda i: cfg.layer_type(i) == "full_attention",
             "layer.linear_attn.": lambda i: cfg.layer_type(i) == "linear_attention",
             "layer.mlp.": lambda i: not cfg.is_moe_layer(i),
             "layer.moe.": cfg.is_moe_layer, "layer.shared_expert": cfg.is_moe_layer}
    for prefix, has in kinds.items():
        if role.startswith(prefix):
            return sum(1 for i in layers if has(i))
    return len(layers) if role.startswith("layer.") else 1


# the roles of the KV cache sharded by sequence (--kv-shard sequence), planned beside the default
# layout (split by heads) at TP > 1: a forward runs one layout's roles, never both
DECODE_SP_ROLE = "layer.attn.decode_sp"                 # decode attention over the sequence-sharded cache
ROPE_SEQ_KV_ROLE = "layer.attn.rope_qk_norm.seq_kv"     # rope_qk_norm without the fused cache store
GATHER_SEQ_KV_ROLE = "layer.attn.head_gather.seq_kv"    # every rank's head columns to every rank
SEQUENCE_KV_ROLES = (DECODE_SP_ROLE, ROPE_SEQ_KV_ROLE, GATHER_SEQ_KV_ROLE)


class _Builder:
    def __init__(self):
        self.items: dict[str, PlanItem] = {}

    def add(self, role: str, p: Problem) -> None:
        item = self.items.get(p.key)
        if item is None:
            self.items[p.key] = PlanItem(p, [role])
        elif role not in item.roles:
            item.roles.append(role)


def plan(model: str | ModelConfig, tp: int = 1, decode_buckets: Optional[Sequence[int]] = None,
         prefill_buckets: Optional[Sequence[int]] = None, dtype: str = "bf16",
         contexts: Sequence[int] = DECODE_CONTEXTS, registered: Optional[dict] = None) -> Plan:
    """The problems ``model`` needs at TP ``tp`` (``registered``: op -> module of the templates to
    tune; default: every template that imports). Each problem comes from its op's function in
    ``tuneforge.models.problems`` at the shapes ``rank_dims`` gives, the functions dispatch calls."""
    cfg = model if isinstance(model, ModelConfig) else load_config(model)
    if not isinstance(tp, int) or tp < 1:
        raise InputError(f"tp must be a positive integer, got {tp!r}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    decode = tuple(sorted(set(DECODE_BUCKETS if decode_buckets is None else decode_buckets)))
    prefill = tuple(sorted(set(PREFILL_BUCKETS if prefill_buckets is None else prefill_buckets)))
    if any(int(b) < 1 for b in decode + prefill):
        raise InputError(f"token buckets must be >= 1, got {list(decode + prefill)}")
    if not decode and not prefill:
        raise InputError("no token buckets to plan")
    d = P.rank_dims(cfg, tp)
    h = d.hidden
    layers = range(cfg.num_hidden_layers)
    full_attn = any(cfg.layer_type(i) == "full_attention" for i in layers)
    linear_attn = any(cfg.layer_type(i) == "linear_attention" for i in layers)
    dense_mlp = any(not cfg.is_moe_layer(i) for i in layers)
    moe = any(cfg.is_moe_layer(i) for i in layers)
    b = _Builder()
    for m in sorted(set(decode + prefill)):
        is_decode = m in decode
        b.add("layer.input_layernorm", P.rmsnorm(dtype, m, h))
        if full_attn:
            b.add("layer.attn.qkv_proj", P.gemm(dtype, m, (d.qkv, h)))
            if tp == 1:     # the fusions (kernels/gemm_fused), each against the unfused ops it replaces
                b.add("layer.attn.qkv_proj+input_layernorm", P.gemm_fused(dtype, m, (d.qkv, h), norm=True))
            if cfg.has_qk_norm:     # Qwen2-MoE's norm-less RoPE runs in torch (Ops.rope): nothing to tune
                # the KV cache split by heads takes each token's k and v in the same launch
                b.add("layer.attn.rope_qk_norm", P.rope_qk_norm(dtype, m, d.heads, d.kv_heads, d.head_dim, cache=True))
                if tp > 1:      # the cache sharded by sequence (--kv-shard sequence) is written apart
                    b.add(ROPE_SEQ_KV_ROLE, P.rope_qk_norm(dtype, m, d.heads, d.kv_heads, d.head_dim))
            if tp > 1:          # ... from every rank's heads: q|k|v in decode, k|v in a prefill
                widths = ([d.qkv] if is_decode else []) + ([d.qkv - d.heads * d.head_dim] if m in prefill else [])
                for width in widths:
                    b.add(GATHER_SEQ_KV_ROLE, P.allgather(dtype, tp, m, width))
            if is_decode:
                for ctx in contexts:
                    b.add("layer.attn.decode", P.decode_attention(dtype, m, d.heads, d.kv_heads, d.head_dim,
                                                                  int(ctx), contexts))
                    if tp > 1:      # the KV cache sharded by sequence instead (--kv-shard sequence)
                        b.add(DECODE_SP_ROLE, P.decode_attention_sp(dtype, tp, m, d.seq_heads,
                                                                     d.seq_kv_heads, d.head_dim,
                                                                     int(ctx), contexts))
            b.add("layer.attn.o_proj", P.gemm(dtype, m, (h, d.o_in)))
            if tp == 1:
                b.add("layer.attn.o_proj+residual", P.gemm_fused(dtype, m, (h, d.o_in), epilogue="residual"))
            if tp > 1:
                b.add("layer.attn.allreduce", P.allreduce(dtype, tp, m, h))
                b.add("layer.attn.tp", P.tp_attn(dtype, tp, m, h, d.qkv, d.o_in))
        if linear_attn:
            b.add("layer.linear_attn.in_proj_qkvz", P.gemm(dtype, m, (d.linear_qkvz, h)))
            b.add("layer.linear_attn.in_proj_ba", P.gemm(dtype, m, (d.linear_ba, h)))
            b.add("layer.linear_attn.out_proj", P.gemm(dtype, m, (h, d.linear_out_in)))
            if tp > 1:
                b.add("layer.linear_attn.allreduce", P.allreduce(dtype, tp, m, h))
        b.add("layer.post_attention_layernorm", P.rmsnorm(dtype, m, h))
        if dense_mlp:
            b.add("layer.mlp.gate_up_proj", P.gemm(dtype, m, (2 * d.inter, h)))
            b.add("layer.mlp.silu_mul", P.silu_mul(dtype, m, 2 * d.inter))
            b.add("layer.mlp.down_proj", P.gemm(dtype, m, (h, d.inter)))
            b.add("layer.mlp.gate_up_proj+silu_mul", P.gemm_fused(dtype, m, (2 * d.inter, h), epilogue="silu_mul"))
            if tp == 1:
                b.add("layer.mlp.gate_up_proj+post_attention_layernorm+silu_mul",
                      P.gemm_fused(dtype, m, (2 * d.inter, h), norm=True, epilogue="silu_mul"))
                b.add("layer.mlp.down_proj+residual", P.gemm_fused(dtype, m, (h, d.inter), epilogue="residual"))
            if tp > 1:
                b.add("layer.mlp.allreduce", P.allreduce(dtype, tp, m, h))
                b.add("layer.mlp.tp", P.tp_mlp(dtype, tp, m, h, d.inter))
        if moe:
            e, topk, mi = cfg.num_experts, cfg.num_experts_per_tok, d.moe_inter
            b.add("layer.moe.router", P.gemm(dtype, m, (e, h)))
            b.add("layer.moe.router.select", P.moe_router(dtype, m, e, topk))
            b.add("layer.moe.pack", P.moe_pack(dtype, m, e, topk))
            b.add("layer.moe.experts.gate_up", P.moe_gemm(dtype, m, (2 * mi, h), e, topk, act=True))   # silu_mul fused
            b.add("layer.moe.experts.down", P.moe_gemm(dtype, m, (h, mi), e, topk, act=False))
            if cfg.has_shared_expert:
                si = d.shared_inter
                b.add("layer.shared_expert.gate_up_proj", P.gemm(dtype, m, (2 * si, h)))
                b.add("layer.shared_expert.silu_mul", P.silu_mul(dtype, m, 2 * si))
                b.add("layer.shared_expert.gate_up_proj+silu_mul",
                      P.gemm_fused(dtype, m, (2 * si, h), epilogue="silu_mul"))
                b.add("layer.shared_expert.down_proj", P.gemm(dtype, m, (h, si)))
                b.add("layer.shared_expert_gate.proj", P.gemm(dtype, m, (1, h)))
                b.add("layer.shared_expert_gate", P.shared_expert_gate(dtype, m, h))
            if tp > 1:
                b.add("layer.moe.allreduce", P.allreduce(dtype, tp, m, h))
                # the strategy choice: experts TP-sharded (+ all-reduce) or EP-placed (all-to-all)
                b.add("layer.moe.block", P.moe_block(dtype, tp, m, h, cfg.moe_intermediate_size, e, topk))
        b.add("final_norm", P.rmsnorm(dtype, m, h))
        if is_decode:                       # prefill computes logits for the last position only
            b.add("lm_head", P.gemm(dtype, m, (d.vocab, h)))
    ops = registered_ops() if registered is None else registered
    items = list(b.items.values())
    for item in items:
        if item.problem.op not in ops:
            item.baseline_only, item.why = True, f"no template registered for op {item.problem.op}"
    return Plan(cfg.name, tp, dtype, decode, prefill, items)
