"""Qwen3 decoders as plain PyTorch modules, tensor-parallel by shape: dense (Qwen3-0.6B ... Qwen3-32B)
and mixture-of-experts (Qwen3-MoE: Qwen3-30B-A3B, Qwen3-235B-A22B; Qwen2-MoE: Qwen1.5-MoE-A2.7B,
whose attention has a q/k/v bias and no q/k norm and whose sparse blocks add a sigmoid-gated shared
expert; ``mlp_only_layers`` / ``decoder_sparse_step`` layers dense, as transformers builds them). RoPE
as the config says (default, linear, dynamic, YaRN); a config asking for anything else (linear
attention, sliding window, ...) is refused when the model is built (configs.check_engine_support).

Each rank holds only its shard (``Shard(rank, size)``): the fused q|k|v projection and the fused
gate|up projection are column-parallel (a rank owns ``heads/tp`` query heads, ``kv_heads/tp`` KV heads
and ``intermediate/tp`` MLP channels), o_proj and down_proj are row-parallel and their partial sums are
all-reduced; the embedding is replicated and lm_head is split over the vocabulary (its logits
all-gathered). A sparse layer (``SparseMoE``) holds every expert's ``moe_intermediate / tp`` channels
(gate|up column-parallel, down row-parallel, the router replicated) and all-reduces its output, or in
the ``ep`` layout (``Shard.moe``) whole experts placed per rank, reached by all-to-all; a model with sparse layers keeps every token on every rank (no ag_rs layout). Every op goes through ``ops`` (tuneforge.engine.dispatch.Ops), which runs the tuned
Triton kernel or the torch baseline. Activations are token-major ``[tokens, features]``.

At TP > 1 the linear pairs run as the TP blocks (``ops.tp_step`` decides per forward): gemm_ar
keeps every token on every rank; ag_rs row-shards the residual stream (embedding, norms and
residual adds on this rank's rows), the qkv projection gathers all tokens so attention is
unchanged, o_proj and the MLP reduce-scatter back to this rank's rows, and the final rows are
all-gathered before lm_head.

Attention: torch SDPA for a causal prefill from an empty cache; decode steps through ``ops.decode_attention``
(the flash-decoding kernel, or SDPA with a mask of each sequence's valid slots) over the first ``kv_len`` slots.
With the KV cache sharded by sequence (``KVCache`` with a world: ``--kv-shard sequence``) each rank stores every
KV head of its share of the tokens, and decode runs ``ops.decode_attention_sp`` (partials combined across ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import InputError
from tuneforge.models.configs import check_engine_support
from tuneforge.models.kv_cache import KVCache


# The weight layouts of a sparse layer at TP > 1 (a load-time choice: the two hold different tensors):
# "tp" every expert's moe_intermediate / size channels, "ep" experts placed, whole (SparseMoE).
MOE_LAYOUTS = ("tp", "ep")


@dataclass(frozen=True)
class Shard:
    """This process's place in the tensor-parallel group (``group`` None: the default group;
    ``world``: the rank's tuneforge World, which the TP blocks' symmetric heap needs)."""
    rank: int = 0
    size: int = 1
    group: object = None
    world: object = field(default=None, compare=False, repr=False)
    moe: str = "tp"          # how sparse layers split over the ranks: MOE_LAYOUTS (SparseMoE)

    def __post_init__(self):
        if self.moe not in MOE_LAYOUTS:
            raise InputError(f"unknown MoE layout {self.moe!r}; expected one of {', '.join(MOE_LAYOUTS)}")

    @staticmethod
    def of(world, moe: str = "tp") -> "Shard":
        return Shard(world.rank, world.size, world.group, world, moe)

    def part(self, total: int, what: str) -> int:
        if total % self.size:
            raise InputError(f"{what}={total} does not split over TP={self.size}")
        return total // self.size


@dataclass(frozen=True)
class CheckpointTensor:
    """Where one Hugging Face checkpoint tensor goes: its full shape, the dim this rank slices
    (None: the whole tensor), where the slice starts, and the parameter view it is copied into
    (whose size along ``split_dim`` is the slice's length)."""
    name: str
    shape: tuple[int, ...]
    split_dim: Optional[int]
    start: int
    dest: torch.Tensor


@dataclass
class Step:
    """What one forward pass needs besides the tokens: the cache rows and slots its tokens occupy
    (``[batch, tokens]``, slot = position). Prefill starts at slot 0 of an empty cache; decode has one
    token per sequence and an additive mask ``[batch, 1, 1, kv_len]`` (0 on valid slots, -inf after)."""
    rows: torch.Tensor
    positions: torch.Tensor
    prefill: bool
    kv_len: int
    mask: Optional[torch.Tensor] = None
    slots: Optional[torch.Tensor] = None     # this rank's cache slot of each token (KVCache.slots), per forward


def _param(*shape: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def kv_heads_of(cfg, shard: Shard) -> tuple[int, int]:
    """(KV heads per rank, the first one this rank holds): split over the ranks, or, with fewer KV
    heads than ranks, one replicated head per rank (``tp / kv_heads`` ranks share each)."""
    kv = cfg.num_key_value_heads
    if kv >= shard.size:
        per = shard.part(kv, "num_key_value_heads")
        return per, shard.rank * per
    if shard.size % kv:
        raise InputError(f"TP={shard.size} is neither a divisor nor a multiple of num_key_value_heads={kv}")
    return 1, shard.rank // (shard.size // kv)


class Attention(nn.Module):
    def __init__(self, cfg, shard: Shard, dtype, device):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.heads = shard.part(cfg.num_attention_heads, "num_attention_heads")
        self.kv_heads, self.first_kv_head = kv_heads_of(cfg, shard)
        self.shard = shard
        self.replicas = max(1, shard.size // cfg.num_key_value_heads)    # ranks holding each KV head
        self.eps, self.theta, self.rope_scaling = cfg.rms_norm_eps, cfg.rope_theta, cfg.rope_scaling
        self.qkv = _param((self.heads + 2 * self.kv_heads) * self.head_dim, cfg.hidden_size, dtype=dtype, device=device)
        self.o = _param(cfg.hidden_size, self.heads * self.head_dim, dtype=dtype, device=device)
        self.q_norm = self.k_norm = self.qkv_bias = None
        if cfg.has_qk_norm:
            self.q_norm = _param(self.head_dim, dtype=dtype, device=device)
            self.k_norm = _param(self.head_dim, dtype=dtype, device=device)
        if cfg.qkv_bias:       # Qwen2-MoE: q | k | v bias, sliced like the qkv rows
            self.qkv_bias = _param(self.qkv.shape[0], dtype=dtype, device=device)

    def forward(self, x, layer: int, step: Step, cache: KVCache, ops, tp) -> torch.Tensor:
        """x: the layer's normed input (``ops.normed``; [tokens, hidden], this rank's rows when ``tp.sharded``)
        -> the o_proj output summed over ranks, in the same rows, or None where o_proj added it into x's
        residual stream itself. The projections run as ``tp`` says; the core sees every token."""
        b, t = step.positions.shape
        d, hq, hkv = self.head_dim, self.heads, self.kv_heads
        qkv = ops.qkv_proj(x, self.qkv, tp)
        if self.qkv_bias is not None:   # a torch add after the GEMM (no GEMM epilogue bias yet)
            qkv.add_(self.qkv_bias)
        # q|k (normed and) rotated in place: qkv then holds q | k | v, and k | v is one cache write (with
        # q/k norms, an unsharded cache's write is in the same launch)
        fused_write = self.q_norm is not None and not cache.sharded
        if self.q_norm is not None:
            planes = cache.planes(layer) if fused_write else None       # None: a cache that keeps nothing
            ops.rope_qk_norm(qkv, step.positions.reshape(-1), self.q_norm, self.k_norm, heads=hq, kv_heads=hkv,
                             theta=self.theta, eps=self.eps, scaling=self.rope_scaling, kv_cache=planes,
                             cache_rows=None if planes is None else step.rows.reshape(-1))
        else:
            ops.rope(qkv, step.positions.reshape(-1), heads=hq, kv_heads=hkv, head_dim=d, theta=self.theta,
                     scaling=self.rope_scaling)
        kv = qkv[:, hq * d:].view(b, t, 2, hkv, d)
        if cache.sharded:
            q = self._store_sharded(qkv, layer, step, cache, ops)
        elif not fused_write:
            cache.write(layer, step.rows, step.slots, kv)
        if step.prefill:   # the cache held nothing before: attend to this chunk's keys, causally
            q = qkv[:, :hq * d].view(b, t, hq, d).transpose(1, 2)        # [b, hq, t, d]
            keys, values = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=hq != hkv)
            out = out.transpose(1, 2).reshape(b * t, hq * d)
        elif cache.sharded:    # every head over every rank's shard; this rank keeps its heads' rows
            keys, values = cache.keys_values(layer, b, step.kv_len)
            out = ops.decode_attention_sp(q, keys, values, step.positions[:, 0], cache.ctx)
            out = out[:, self.shard.rank * hq:(self.shard.rank + 1) * hq].reshape(b, hq * d)
        else:             # one token per sequence
            keys, values = cache.keys_values(layer, b, step.kv_len)
            out = ops.decode_attention(qkv[:, :hq * d].view(b, hq, d), keys, values, step.positions[:, 0],
                                       step.mask).reshape(b, hq * d)
        return ops.o_proj(out, self.o, tp, x)

    def _store_sharded(self, qkv, layer: int, step: Step, cache: KVCache, ops) -> Optional[torch.Tensor]:
        """The KV cache sharded by sequence: every rank's heads of the new tokens gathered (k|v in a
        prefill, whose attention stays on this rank's heads; q|k|v in decode), every KV head of a token
        stored by the rank owning its position (``KVCache.write``). Returns decode's q of every head
        [batch, heads, head_dim] (None in a prefill)."""
        b, t = step.positions.shape
        d, hq, hkv = self.head_dim, self.heads, self.kv_heads
        first = hq * d if step.prefill else 0      # the columns gathered: k|v, or q|k|v
        gathered = ops.all_gather_columns(qkv[:, first:].contiguous(), self.shard, cache.ctx)
        gathered = gathered.view(b * t, self.shard.size, -1)
        # a KV head held by several ranks (fewer KV heads than ranks) is taken from the first of them
        kv = gathered[:, ::self.replicas, hq * d - first:].unflatten(2, (2, hkv, d)).transpose(1, 2)
        cache.write(layer, step.rows, step.slots, kv.unflatten(0, (b, t)))
        return None if step.prefill else gathered[:, :, :hq * d].reshape(b, -1, d)


class MLP(nn.Module):
    def __init__(self, cfg, shard: Shard, dtype, device):
        super().__init__()
        self.inter = shard.part(cfg.intermediate_size, "intermediate_size")
        self.gate_up = _param(2 * self.inter, cfg.hidden_size, dtype=dtype, device=device)
        self.down = _param(cfg.hidden_size, self.inter, dtype=dtype, device=device)

    def forward(self, x, ops, tp) -> Optional[torch.Tensor]:
        """x: the layer's normed input (``ops.normed``) or [tokens, hidden] -> down_proj output summed over
        ranks (rows as ``tp`` says), or None where down_proj added it into x's residual stream itself."""
        return ops.mlp(x, self.gate_up, self.down, tp)


class SparseMoE(nn.Module):
    """Qwen3-MoE's sparse block (transformers' Qwen3MoeSparseMoeBlock): the router's logits, each token's
    top-k experts and weights (softmax, renormalised when ``norm_topk_prob``), every routed token through
    its experts' gate|up -> SiLU-mul -> down, the outputs weighted and summed per token. This rank holds
    ``local`` experts from ``first`` on, ``inter`` channels of each: ``gate_up`` [local, 2 inter, hidden]
    (gate rows, then up rows), ``down`` [local, hidden, inter]; the router [experts, hidden] whole.

    The layout is ``shard.moe`` (a load-time choice, MOE_LAYOUTS): ``tp`` every expert (local = experts),
    ``inter`` = moe_intermediate_size / tp of its channels, the outputs all-reduced; ``ep`` (placed,
    TP > 1) experts ``[rank E / tp, (rank + 1) E / tp)`` whole, each rank routing its row share of the
    tokens to the experts' owners by all-to-all (``ops.moe_ep``).

    With ``shared_expert_intermediate_size`` (transformers' Qwen2MoeSparseMoeBlock): a shared expert MLP
    (``shared_gate_up`` / ``shared_down``, split over ranks like the dense MLP, whole on every rank when
    placed) whose output, times the sigmoid of ``shared_gate`` [1, hidden] (replicated), is added to the
    routed output: Qwen2-MoE's layers."""

    def __init__(self, cfg, shard: Shard, dtype, device):
        super().__init__()
        self.experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        h = cfg.hidden_size
        self.placed = shard.moe == "ep" and shard.size > 1
        if self.placed:
            if self.experts % shard.size:
                raise InputError(f"num_experts={self.experts} does not split over EP={shard.size} ranks "
                                 f"(use the tp MoE layout)")
            self.local, self.inter = self.experts // shard.size, cfg.moe_intermediate_size
        else:
            self.local, self.inter = self.experts, shard.part(cfg.moe_intermediate_size, "moe_intermediate_size")
        self.first = shard.rank * self.local if self.placed else 0
        self.router = _param(self.experts, h, dtype=dtype, device=device)
        self.gate_up = _param(self.local, 2 * self.inter, h, dtype=dtype, device=device)
        self.down = _param(self.local, h, self.inter, dtype=dtype, device=device)
        self.shared = None
        if cfg.has_shared_expert:
            si = cfg.shared_expert_intermediate_size if self.placed else \
                shard.part(cfg.shared_expert_intermediate_size, "shared_expert_intermediate_size")
            self.shared_gate_up = _param(2 * si, h, dtype=dtype, device=device)
            self.shared_down = _param(h, si, dtype=dtype, device=device)
            self.shared_gate = _param(1, h, dtype=dtype, device=device)
            self.shared = (self.shared_gate_up, self.shared_down, self.shared_gate)

    def forward(self, x, ops, tp) -> torch.Tensor:
        """x [tokens, hidden] (every token) -> the block's output on every token, on every rank."""
        if self.placed:
            return ops.moe_ep(x, self.router, self.gate_up, self.down, self.top_k, self.norm_topk_prob, tp,
                              self.shared)
        return ops.moe(x, self.router, self.gate_up, self.down, self.top_k, self.norm_topk_prob, tp, self.shared)


class Layer(nn.Module):
    def __init__(self, cfg, shard: Shard, dtype, device, index: int):
        super().__init__()
        self.input_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.post_attention_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.attn = Attention(cfg, shard, dtype, device)
        self.mlp = (SparseMoE if cfg.is_moe_layer(index) else MLP)(cfg, shard, dtype, device)


class Qwen3(nn.Module):
    def __init__(self, cfg, shard: Shard = Shard(), dtype=torch.bfloat16, device="cpu"):
        super().__init__()
        check_engine_support(cfg)
        self.cfg, self.shard, self.dtype = cfg, shard, dtype
        self.eps = cfg.rms_norm_eps
        self.vocab_part = shard.part(cfg.vocab_size, "vocab_size")
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Layer(cfg, shard, dtype, device, i) for i in range(cfg.num_hidden_layers))
        self.norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = None if cfg.tie_word_embeddings else _param(self.vocab_part, cfg.hidden_size,
                                                                   dtype=dtype, device=device)

    @property
    def head_weight(self) -> torch.Tensor:
        """This rank's lm_head rows: its own, or its slice of the (tied) embedding."""
        if self.lm_head is not None:
            return self.lm_head
        r = self.shard.rank * self.vocab_part
        return self.embed[r:r + self.vocab_part]

    @property
    def dense_mlp(self) -> Optional[MLP]:
        """The first dense MLP layer's block (None: every layer is sparse)."""
        return next((layer.mlp for layer in self.layers if isinstance(layer.mlp, MLP)), None)

    @property
    def sparse(self) -> bool:
        return any(isinstance(layer.mlp, SparseMoE) for layer in self.layers)

    def checkpoint_tensors(self, fused_experts: bool = False) -> list[CheckpointTensor]:
        """Every tensor of the Hugging Face checkpoint this rank needs and where it goes. Experts: one
        tensor per expert and projection (``mlp.experts.{e}.gate_proj.weight``, as released on the Hub
        and as transformers 5 saves), or with ``fused_experts`` transformers 5's in-memory
        ``mlp.experts.gate_up_proj`` [experts, 2 I, hidden] and ``mlp.experts.down_proj`` [experts, hidden, I]."""
        c, out = self.cfg, []
        h, d = c.hidden_size, c.head_dim

        def add(name, shape, dest, split_dim=None, part=0, start=None):
            # part: which slice of split_dim (slices are as long as dest is along it); start: or where it starts
            if start is None:
                start = part * dest.shape[split_dim] if split_dim is not None else 0
            out.append(CheckpointTensor(name, tuple(shape), split_dim, start, dest))

        def experts(p, moe):
            # tp: slice ``part`` of every expert's channels; placed: experts [first, first + local), whole
            e, i, mi, part = c.num_experts, moe.inter, c.moe_intermediate_size, 0 if moe.placed else r
            add(p + "mlp.gate.weight", (e, h), moe.router)
            if fused_experts and moe.placed:
                add(p + "mlp.experts.gate_up_proj", (e, 2 * mi, h), moe.gate_up, 0, start=moe.first)
                add(p + "mlp.experts.down_proj", (e, h, mi), moe.down, 0, start=moe.first)
            elif fused_experts:     # gate rows [0, I), up rows [I, 2 I): this rank's slice of each
                add(p + "mlp.experts.gate_up_proj", (e, 2 * mi, h), moe.gate_up[:, :i], 1, r)
                add(p + "mlp.experts.gate_up_proj", (e, 2 * mi, h), moe.gate_up[:, i:], 1, start=mi + r * i)
                add(p + "mlp.experts.down_proj", (e, h, mi), moe.down, 2, r)
            else:
                for x in range(moe.local):
                    q = f"{p}mlp.experts.{moe.first + x}."
                    add(q + "gate_proj.weight", (mi, h), moe.gate_up[x, :i], 0, part)
                    add(q + "up_proj.weight", (mi, h), moe.gate_up[x, i:], 0, part)
                    add(q + "down_proj.weight", (h, mi), moe.down[x], 1, part)
            if moe.shared is not None:    # the same names in both layouts
                si, full = moe.shared_down.shape[1], c.shared_expert_intermediate_size
                add(p + "mlp.shared_expert.gate_proj.weight", (full, h), moe.shared_gate_up[:si], 0, part)
                add(p + "mlp.shared_expert.up_proj.weight", (full, h), moe.shared_gate_up[si:], 0, part)
                add(p + "mlp.shared_expert.down_proj.weight", (h, full), moe.shared_down, 1, part)
                add(p + "mlp.shared_expert_gate.weight", (1, h), moe.shared_gate)

        r = self.shard.rank
        add("model.embed_tokens.weight", (c.vocab_size, h), self.embed)
        for i, layer in enumerate(self.layers):
            p, a, mlp = f"model.layers.{i}.", layer.attn, layer.mlp
            q_rows, kv_rows = a.heads * d, a.kv_heads * d
            kv_part = a.first_kv_head // a.kv_heads
            add(p + "self_attn.q_proj.weight", (c.num_attention_heads * d, h), a.qkv[:q_rows], 0, r)
            add(p + "self_attn.k_proj.weight", (c.num_key_value_heads * d, h), a.qkv[q_rows:q_rows + kv_rows], 0, kv_part)
            add(p + "self_attn.v_proj.weight", (c.num_key_value_heads * d, h), a.qkv[q_rows + kv_rows:], 0, kv_part)
            if a.qkv_bias is not None:
                add(p + "self_attn.q_proj.bias", (c.num_attention_heads * d,), a.qkv_bias[:q_rows], 0, r)
                add(p + "self_attn.k_proj.bias", (c.num_key_value_heads * d,), a.qkv_bias[q_rows:q_rows + kv_rows], 0,
                    kv_part)
                add(p + "self_attn.v_proj.bias", (c.num_key_value_heads * d,), a.qkv_bias[q_rows + kv_rows:], 0, kv_part)
            add(p + "self_attn.o_proj.weight", (h, c.num_attention_heads * d), a.o, 1, r)
            if a.q_norm is not None:
                add(p + "self_attn.q_norm.weight", (d,), a.q_norm)
                add(p + "self_attn.k_norm.weight", (d,), a.k_norm)
            if isinstance(mlp, SparseMoE):
                experts(p, mlp)
            else:
                add(p + "mlp.gate_proj.weight", (c.intermediate_size, h), mlp.gate_up[:mlp.inter], 0, r)
                add(p + "mlp.up_proj.weight", (c.intermediate_size, h), mlp.gate_up[mlp.inter:], 0, r)
                add(p + "mlp.down_proj.weight", (h, c.intermediate_size), mlp.down, 1, r)
            add(p + "input_layernorm.weight", (h,), layer.input_norm)
            add(p + "post_attention_layernorm.weight", (h,), layer.post_attention_norm)
        add("model.norm.weight", (h,), self.norm)
        if self.lm_head is not None:
            add("lm_head.weight", (c.vocab_size, h), self.lm_head, 0, r)
        return out

    def streamed_weight_bytes(self, tokens: int = 1) -> int:
        """Bytes of weights one decode step of ``tokens`` tokens reads on this rank: every parameter but
        the embedding table, of which a step reads only its tokens' rows (tied: lm_head reads its
        vocabulary part), and of a sparse layer's experts only the ones hit: top_k for one token, for
        more the expected count under uniform routing, experts (1 - (1 - top_k / experts) ^ tokens)."""
        total = sum(p.numel() * p.element_size() for p in self.parameters())
        embed = self.embed.numel() * self.embed.element_size()
        head = self.head_weight.numel() * self.head_weight.element_size()
        for layer in self.layers:
            moe = layer.mlp
            if isinstance(moe, SparseMoE):     # of its local experts (all of them at tp), as many hit
                hit = moe.local * (1.0 - (1.0 - moe.top_k / moe.experts) ** tokens)
                total -= round((moe.local - hit) * (moe.gate_up[0].numel() + moe.down[0].numel())
                               * moe.gate_up.element_size())
        return total - embed + (head if self.lm_head is None else 0)

    def forward(self, tokens: torch.Tensor, step: Step, cache: KVCache, ops,
                logits_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [batch, t] -> logits [rows, vocab] (full vocabulary on every rank), for every token
        or only the flat token indices ``logits_rows``."""
        flat = tokens.reshape(-1)
        step = replace(step, slots=cache.slots(step.positions))
        a = self.layers[0].attn
        dense = self.dense_mlp
        tp = ops.tp_step(flat.shape[0], self.dtype, self.shard, hidden=self.cfg.hidden_size, qkv=a.qkv.shape[0],
                         o_in=a.o.shape[1], inter=0 if dense is None else dense.inter, sparse=self.sparse)
        if tp.sharded:      # ag_rs: the residual stream holds this rank's rows only
            flat = flat[tp.row0:tp.row0 + tp.rows]
        residual = F.embedding(flat, self.embed)
        delta = None        # the last block's output, still to add into the residual stream
        for i, layer in enumerate(self.layers):
            # The TP seam: each block returns its output summed over ranks (TP blocks, or gemm +
            # all-reduce on the torch path), in the forward's layout, or None where its last GEMM added
            # it into the residual stream (TP 1). A block's input is the stream's norm (``ops.normed``),
            # which its first GEMM may compute in its prologue; the sparse block takes it computed.
            h = ops.normed(residual, delta, layer.input_norm, self.eps)
            delta = layer.attn(h, i, step, cache, ops, tp)
            h = ops.normed(residual, delta, layer.post_attention_norm, self.eps)
            delta = layer.mlp(h if isinstance(layer.mlp, MLP) else ops.norm(h), ops, tp)
        h = ops.gather_rows(ops.norm(ops.normed(residual, delta, self.norm, self.eps)), tp)
        if logits_rows is not None:
            h = h.index_select(0, logits_rows)
        return ops.all_gather_columns(ops.gemm(h, self.head_weight), self.shard)
