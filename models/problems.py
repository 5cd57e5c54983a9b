"""Each op's Problem, derived once: the tuning plan and the engine's dispatch both call these.

The op functions map the shapes an op sees (its operands' sizes, as the model's layers hold them on one
rank) to the Problem it is tuned and looked up under. ``tuneforge.tune.plan`` calls them with the
shapes ``rank_dims`` derives from a model config at a TP degree; ``tuneforge.engine.dispatch`` calls
them with the runtime tensors' shapes. A planned problem and a looked-up one therefore differ only if
the model's parameters differ from ``rank_dims`` (tests/test_plan_dispatch.py runs every built-in
config's forward and asserts every lookup is planned).

Why here: ``tuneforge.models`` sits below both ``tune`` and ``engine`` (they import it; it imports
neither), and this module imports only ``dsl.problem`` and ``errors``, so ``db`` (which reaches only
``dsl.problem``) is untouched and no cycle forms. ``dsl`` is the wrong home: it sits under the kernels
and knows nothing of model configs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from tuneforge.dsl.problem import DECODE_CONTEXTS, DTYPE_NAMES, Problem, bucket
from tuneforge.errors import InputError

Dtype = Union[str, torch.dtype]


def _name(dtype: Dtype) -> str:
    return dtype if isinstance(dtype, str) else DTYPE_NAMES[dtype]


# --- one function per op: operand shapes -> Problem -----------------------------------------------

def gemm(dtype: Dtype, m: int, weight: Sequence[int]) -> Problem:
    """``x [m, k] @ weight[n, k].T``."""
    n, k = weight
    return Problem.make("gemm", _name(dtype), m=m, n=n, k=k)


# What a fused GEMM adds after its product (gemm_fused's ``epi`` dimension, an index into this tuple).
GEMM_EPILOGUES = ("none", "residual", "silu_mul")


def gemm_fused(dtype: Dtype, m: int, weight: Sequence[int], norm: bool = False, epilogue: str = "none") -> Problem:
    """``x [m, k] @ weight[n, k].T`` with x's RMSNorm in the prologue (``norm``) and an ``epilogue``:
    ``residual`` (+ the residual stream [m, n]) or ``silu_mul`` (weight = [gate | up]: out [m, n / 2]).
    Tuned against the unfused ops it replaces (its baseline), so the engine fuses only where it won."""
    n, k = weight
    return Problem.make("gemm_fused", _name(dtype), m=m, n=n, k=k, norm=int(norm), epi=GEMM_EPILOGUES.index(epilogue))


def rmsnorm(dtype: Dtype, m: int, n: int) -> Problem:
    return Problem.make("rmsnorm", _name(dtype), m=m, n=n)


def silu_mul(dtype: Dtype, m: int, width: int) -> Problem:
    """Input ``[m, width]`` = [gate | up]; output ``[m, width / 2]``."""
    return Problem.make("silu_mul", _name(dtype), m=m, n=width // 2)


def rope_qk_norm(dtype: Dtype, m: int, heads: int, kv_heads: int, head_dim: int, cache: bool = False) -> Problem:
    """``cache``: the launch also stores each token's k and v into the KV cache (the engine's layers
    with the cache split by heads); the problem then has ``cache=1`` (without it, no such dim)."""
    return Problem.make("rope_qk_norm", _name(dtype), m=m, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                        **({"cache": 1} if cache else {}))


def decode_attention(dtype: Dtype, batch: int, heads: int, kv_heads: int, head_dim: int, kv_len: int,
                     contexts: Sequence[int] = DECODE_CONTEXTS) -> Problem:
    """One query token per sequence over ``kv_len`` cached keys, tuned at the bucket of ``kv_len``
    among ``contexts``."""
    return Problem.make("decode_attention", _name(dtype), m=batch, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, ctx=bucket(kv_len, contexts))


def decode_attention_sp(dtype: Dtype, world: int, batch: int, heads: int, kv_heads: int, head_dim: int, kv_len: int,
                        contexts: Sequence[int] = DECODE_CONTEXTS) -> Problem:
    """Decode attention over a KV cache sharded by sequence over ``world`` ranks (``--kv-shard sequence``):
    every rank attends with all ``heads`` query heads over its shard of all ``kv_heads`` KV heads, and
    the partials are combined across ranks; ``kv_len`` keys in all (every shard's), at its bucket."""
    return Problem.make("decode_attention_sp", _name(dtype), world, m=batch, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, ctx=bucket(kv_len, contexts))


def allreduce(dtype: Dtype, world: int, m: int, n: int) -> Problem:
    return Problem.make("allreduce", _name(dtype), world, m=m, n=n)


def allgather(dtype: Dtype, world: int, rows: int, n: int) -> Problem:
    """``rows`` rows of ``n`` columns from every one of ``world`` ranks, stacked on each (``m`` =
    world x rows): the sequence-sharded KV cache's exchange of each rank's head columns
    (``tp.all_gather_columns``: q|k|v in decode, k|v in a prefill)."""
    return Problem.make("allgather", _name(dtype), world, m=world * rows, n=n)


def tp_attn(dtype: Dtype, world: int, m: int, hidden: int, qkv: int, o_in: int) -> Problem:
    """The attention projection pair as one TP block: qkv ``[qkv, hidden]``, o ``[hidden, o_in]``."""
    return Problem.make("tp_attn", _name(dtype), world, m=m, hidden=hidden, qkv=qkv, o_in=o_in)


def tp_mlp(dtype: Dtype, world: int, m: int, hidden: int, inter: int) -> Problem:
    """The MLP as one TP block: gate_up ``[2 inter, hidden]``, down ``[hidden, inter]``."""
    return Problem.make("tp_mlp", _name(dtype), world, m=m, hidden=hidden, inter=inter)


def moe_gemm(dtype: Dtype, m: int, weight: Sequence[int], experts: int, topk: int, act: bool) -> Problem:
    """``m`` tokens, each through ``topk`` of ``experts`` weights ``[n, k]``. ``act``: the gate_up GEMM
    (SiLU-mul fused, output n / 2 wide); else the down GEMM (router-weighted, combined per token)."""
    n, k = weight
    return Problem.make("moe_gemm", _name(dtype), m=m, n=n, k=k, experts=experts, topk=topk, act=int(act))


def moe_router(dtype: Dtype, m: int, experts: int, topk: int) -> Problem:
    """The select step on the router's logits ``[m, experts]`` (softmax, top-k; the logit matmul is a gemm)."""
    return Problem.make("moe_router", _name(dtype), m=m, experts=experts, topk=topk)


def moe_pack(dtype: Dtype, m: int, experts: int, topk: int) -> Problem:
    """Pack ``m * topk`` routed slots by expert; one problem for every GEMM ``block_m`` (the pack's tiles
    do not depend on it). ``dtype``: the model's (the pack moves int32 ids)."""
    return Problem.make("moe_pack", _name(dtype), m=m, experts=experts, topk=topk)


def moe_block(dtype: Dtype, world: int, m: int, hidden: int, inter: int, experts: int, topk: int) -> Problem:
    """The routed experts of one sparse layer across ``world`` ranks, for ``m`` tokens held by every rank:
    ``experts`` experts of the full ``inter`` (moe_intermediate_size) channels, top-``topk`` routing.
    Strategy-free (the template's categorical picks TP-sharded experts + all-reduce or EP-placed experts
    + all-to-all), so both strategies of one shape share the problem."""
    return Problem.make("moe_block", _name(dtype), world, m=m, hidden=hidden, inter=inter, experts=experts,
                        topk=topk)


def shared_expert_gate(dtype: Dtype, m: int, n: int) -> Problem:
    return Problem.make("shared_expert_gate", _name(dtype), m=m, n=n)


# --- a model config's per-rank shapes ------------------------------------------------------------

@dataclass(frozen=True)
class RankDims:
    """What one rank of a TP world holds of a model (Megatron-style): q heads, MLP and expert
    intermediate sizes and the vocabulary split across ranks; KV heads split too, or one replicated
    head per rank when there are fewer KV heads than ranks. Zero: the model has no such layer."""
    hidden: int
    head_dim: int
    heads: int
    kv_heads: int
    qkv: int                 # rows of the fused [q | k | v] projection (gated attention: q and its gate)
    o_in: int                # o_proj's input width
    inter: int               # dense MLP intermediate size
    vocab: int               # lm_head rows (the last shard padded)
    linear_qkvz: int = 0     # linear attention (Gated DeltaNet) projections
    linear_ba: int = 0
    linear_out_in: int = 0
    moe_inter: int = 0
    shared_inter: int = 0
    seq_heads: int = 0       # with the KV cache sharded by sequence (TP > 1): the q and KV heads each
    seq_kv_heads: int = 0    # rank's decode attention sees (every head, 1 / tp of the tokens)


def _shard(value: int, tp: int, what: str, model: str) -> int:
    if value % tp:
        raise InputError(f"tp={tp} does not divide {what}={value} of {model}")
    return value // tp


def rank_dims(cfg, tp: int) -> RankDims:
    """``cfg``'s per-rank shapes at TP ``tp``; one line naming the size ``tp`` does not split."""
    name, hd = cfg.name, cfg.head_dim
    heads = _shard(cfg.num_attention_heads, tp, "num_attention_heads", name)
    if cfg.num_key_value_heads >= tp:
        kv = _shard(cfg.num_key_value_heads, tp, "num_key_value_heads", name)
    elif tp % cfg.num_key_value_heads:
        raise InputError(f"tp={tp} is not a multiple of num_key_value_heads={cfg.num_key_value_heads} of {name} "
                         f"(KV heads are replicated when fewer than ranks)")
    else:
        kv = 1
    layers = range(cfg.num_hidden_layers)
    dense_mlp = any(not cfg.is_moe_layer(i) for i in layers)
    inter = _shard(cfg.intermediate_size, tp, "intermediate_size", name) if dense_mlp else 0
    linear = {}
    if any(cfg.layer_type(i) == "linear_attention" for i in layers):
        lk, lv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        kd, vd = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        qkvz = 2 * _shard(lk, tp, "linear_num_key_heads", name) * kd + 2 * _shard(lv, tp, "linear_num_value_heads", name) * vd
        linear = dict(linear_qkvz=qkvz, linear_ba=2 * (lv // tp), linear_out_in=(lv // tp) * vd)
    moe = {}
    if any(cfg.is_moe_layer(i) for i in layers):
        moe["moe_inter"] = _shard(cfg.moe_intermediate_size, tp, "moe_intermediate_size", name)
        if cfg.has_shared_expert:
            moe["shared_inter"] = _shard(cfg.shared_expert_intermediate_size, tp,
                                         "shared_expert_intermediate_size", name)
    q_width = heads * hd * (2 if cfg.gated_attention else 1)
    seq = dict(seq_heads=cfg.num_attention_heads, seq_kv_heads=cfg.num_key_value_heads) if tp > 1 else {}
    return RankDims(hidden=cfg.hidden_size, head_dim=hd, heads=heads, kv_heads=kv, qkv=q_width + 2 * kv * hd,
                    o_in=heads * hd, inter=inter, vocab=-(-cfg.vocab_size // tp), **linear, **moe, **seq)
