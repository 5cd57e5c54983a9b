"""The tuning plan: which ops at which shapes a model needs at a TP degree, each with its roles.

Every linear of attention and MLP at its per-rank (sharded) shape, the all-reduces after the
row-parallel linears, the strategy choice of each TP block (``tp_attn`` / ``tp_mlp``, whose space
holds the strategy), the elementwise ops, decode attention and the MoE expert GEMMs, for every
token bucket. Linears use the fused layouts the engine runs: one ``qkv_proj`` ([q | k | v] rows)
and one ``gate_up_proj`` ([gate | up] rows). Sharding (Megatron-style): q heads, MLP and expert
intermediate sizes and the vocabulary split across ranks; KV heads split too, or are replicated
when there are fewer KV heads than ranks. A problem several roles (or models) share is planned
once; ops without a registered template stay in the plan, marked baseline-only.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Optional, Sequence

from tuneforge.dsl.problem import DECODE_CONTEXTS, DTYPES, Problem
from tuneforge.errors import InputError
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


def _shard(value: int, tp: int, what: str, model: str) -> int:
    if value % tp:
        raise InputError(f"tp={tp} does not divide {what}={value} of {model}")
    return value // tp


class _Builder:
    def __init__(self):
        self.items: dict[str, PlanItem] = {}

    def add(self, role: str, op: str, dtype: str, world: int = 1, **dims: int) -> None:
        p = Problem.make(op, dtype, world, **dims)
        item = self.items.get(p.key)
        if item is None:
            self.items[p.key] = PlanItem(p, [role])
        elif role not in item.roles:
            item.roles.append(role)


def plan(model: str | ModelConfig, tp: int = 1, decode_buckets: Optional[Sequence[int]] = None,
         prefill_buckets: Optional[Sequence[int]] = None, dtype: str = "bf16",
         contexts: Sequence[int] = DECODE_CONTEXTS, registered: Optional[dict] = None) -> Plan:
    """The problems ``model`` needs at TP ``tp`` (``registered``: op -> module of the templates to
    tune; default: every template that imports)."""
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
    name = cfg.name
    h, hd = cfg.hidden_size, cfg.head_dim
    heads = _shard(cfg.num_attention_heads, tp, "num_attention_heads", name)
    if cfg.num_key_value_heads >= tp:
        kv = _shard(cfg.num_key_value_heads, tp, "num_key_value_heads", name)
    elif tp % cfg.num_key_value_heads:
        raise InputError(f"tp={tp} is not a multiple of num_key_value_heads={cfg.num_key_value_heads} of {name} "
                         f"(KV heads are replicated when fewer than ranks)")
    else:
        kv = 1
    q_width = heads * hd * (2 if cfg.gated_attention else 1)    # gated attention: q and its gate
    qkv = q_width + 2 * kv * hd
    o_in = heads * hd
    layers = range(cfg.num_hidden_layers)
    full_attn = any(cfg.layer_type(i) == "full_attention" for i in layers)
    linear_attn = any(cfg.layer_type(i) == "linear_attention" for i in layers)
    dense_mlp = any(not cfg.is_moe_layer(i) for i in layers)
    moe = any(cfg.is_moe_layer(i) for i in layers)
    inter = _shard(cfg.intermediate_size, tp, "intermediate_size", name) if dense_mlp else 0
    vocab = -(-cfg.vocab_size // tp)                             # the last shard padded
    b = _Builder()
    for m in sorted(set(decode + prefill)):
        is_decode = m in decode
        b.add("layer.input_layernorm", "rmsnorm", dtype, m=m, n=h)
        if full_attn:
            b.add("layer.attn.qkv_proj", "gemm", dtype, m=m, n=qkv, k=h)
            b.add("layer.attn.rope_qk_norm", "rope_qk_norm", dtype, m=m, heads=heads, kv_heads=kv, head_dim=hd)
            if is_decode:
                for ctx in contexts:
                    b.add("layer.attn.decode", "decode_attention", dtype, m=m, heads=heads, kv_heads=kv,
                          head_dim=hd, ctx=int(ctx))
            b.add("layer.attn.o_proj", "gemm", dtype, m=m, n=h, k=o_in)
            if tp > 1:
                b.add("layer.attn.allreduce", "allreduce", dtype, tp, m=m, n=h)
                b.add("layer.attn.tp", "tp_attn", dtype, tp, m=m, hidden=h, qkv=qkv, o_in=o_in)
        if linear_attn:
            lk, lv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
            kd, vd = cfg.linear_key_head_dim, cfg.linear_value_head_dim
            qkvz = 2 * _shard(lk, tp, "linear_num_key_heads", name) * kd + 2 * _shard(lv, tp, "linear_num_value_heads", name) * vd
            b.add("layer.linear_attn.in_proj_qkvz", "gemm", dtype, m=m, n=qkvz, k=h)
            b.add("layer.linear_attn.in_proj_ba", "gemm", dtype, m=m, n=2 * (lv // tp), k=h)
            b.add("layer.linear_attn.out_proj", "gemm", dtype, m=m, n=h, k=(lv // tp) * vd)
            if tp > 1:
                b.add("layer.linear_attn.allreduce", "allreduce", dtype, tp, m=m, n=h)
        b.add("layer.post_attention_layernorm", "rmsnorm", dtype, m=m, n=h)
        if dense_mlp:
            b.add("layer.mlp.gate_up_proj", "gemm", dtype, m=m, n=2 * inter, k=h)
            b.add("layer.mlp.silu_mul", "silu_mul", dtype, m=m, n=inter)
            b.add("layer.mlp.down_proj", "gemm", dtype, m=m, n=h, k=inter)
            if tp > 1:
                b.add("layer.mlp.allreduce", "allreduce", dtype, tp, m=m, n=h)
                b.add("layer.mlp.tp", "tp_mlp", dtype, tp, m=m, hidden=h, inter=inter)
        if moe:
            e, topk = cfg.num_experts, cfg.num_experts_per_tok
            mi = _shard(cfg.moe_intermediate_size, tp, "moe_intermediate_size", name)
            b.add("layer.moe.router", "gemm", dtype, m=m, n=e, k=h)
            b.add("layer.moe.experts.gate_up", "moe_gemm", dtype, m=m, n=2 * mi, k=h, experts=e, topk=topk)
            b.add("layer.moe.experts.silu_mul", "silu_mul", dtype, m=m * topk, n=mi)
            b.add("layer.moe.experts.down", "moe_gemm", dtype, m=m, n=h, k=mi, experts=e, topk=topk)
            if cfg.has_shared_expert:
                si = _shard(cfg.shared_expert_intermediate_size, tp, "shared_expert_intermediate_size", name)
                b.add("layer.shared_expert.gate_up_proj", "gemm", dtype, m=m, n=2 * si, k=h)
                b.add("layer.shared_expert.silu_mul", "silu_mul", dtype, m=m, n=si)
                b.add("layer.shared_expert.down_proj", "gemm", dtype, m=m, n=h, k=si)
                b.add("layer.shared_expert_gate.proj", "gemm", dtype, m=m, n=1, k=h)
                b.add("layer.shared_expert_gate", "shared_expert_gate", dtype, m=m, n=h)
            if tp > 1:
                b.add("layer.moe.allreduce", "allreduce", dtype, tp, m=m, n=h)
        b.add("final_norm", "rmsnorm", dtype, m=m, n=h)
        if is_decode:                       # prefill computes logits for the last position only
            b.add("lm_head", "gemm", dtype, m=m, n=vocab, k=h)
    ops = registered_ops() if registered is None else registered
    items = list(b.items.values())
    for item in items:
        if item.problem.op not in ops:
            item.baseline_only, item.why = True, f"no template registered for op {item.problem.op}"
    return Plan(name, tp, dtype, decode, prefill, items)
