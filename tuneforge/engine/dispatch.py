"""Dispatch: which kernel config serves each op call, decided from the tuning database.

``DispatchTable.load`` reads the database once, at engine start, into a dict; ``lookup`` is then a
dictionary walk (no SQL on the hot path). An op with no record, or only a stale one (its kernel
source changed since tuning, or it was recorded under other versions/driver/interconnect), runs the
torch baseline, and the table says so in ONE warning line per op. Winners predicted by the cost
model (CPU-only databases, foreign targets) serve only when ``allow_predicted`` is set.

``Ops`` is what the model calls: each method asks the table (or the fixed mode) for a config and
runs the Triton kernel with it, or the op's torch baseline.

Tensor parallelism (TP > 1): each layer's attention projection pair and MLP run as the TP blocks
(``kernels/tp_attn``: qkv_half -> the engine's attention core -> o_half; ``kernels/tp_mlp``) with the
configs of ops ``tp_attn`` / ``tp_mlp``, looked up once per forward (``Ops.tp_step``). One layout
serves a whole forward (the residual stream keeps it through the layer stack): row-sharded only if
both blocks' configs say ``ag_rs``, else ``gemm_ar`` for both (a block whose winner is ag_rs then
runs gemm_ar at its default config). A block without a config runs the torch path (gemm +
torch.distributed all-reduce). The blocks run on a symmetric heap opened once per engine
(``Ops.open_tp``), whose channels are warmed at the largest token count first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

import tuneforge
from tuneforge.db.environment import Environment
from tuneforge.dsl.problem import DECODE_CONTEXTS, DEFAULT_BUCKETS, DTYPE_NAMES, Problem, bucket
from tuneforge.errors import InputError

log = logging.getLogger("tuneforge.engine")

# The ops the engine dispatches (prefill attention is torch SDPA).
ENGINE_OPS = ("gemm", "rmsnorm", "silu_mul", "rope_qk_norm", "decode_attention", "tp_attn", "tp_mlp")
TP_OPS = ("tp_attn", "tp_mlp")
MODES = ("tuned", "baseline", "default")


def family(problem: Problem) -> tuple:
    """A problem without its token count: the problems that differ only in ``m`` share it."""
    return (problem.op, tuple(kv for kv in problem.dims if kv[0] != "m"), problem.dtype, problem.world)


class DispatchTable:
    """In-memory winners for one environment: ``{family: {m: config}}`` plus what is stale."""

    def __init__(self, winners: dict, stale: dict, *, where: str, model: str, tp: int,
                 buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, unusable: str = ""):
        self._configs: dict[tuple, dict[int, dict]] = {}
        for w in winners.values():
            self._configs.setdefault(family(w.problem), {})[w.problem.shape.get("m", 0)] = dict(w.config)
        self._stale = stale                # family -> reason
        self._unusable = unusable          # why nothing in the database may serve (predicted, missing db)
        self._warned: set[str] = set()
        self.where, self.model, self.tp = where, model, tp
        self.buckets = None if buckets is None else tuple(sorted(buckets))

    @classmethod
    def load(cls, store, env: Environment, model: str, tp: int,
             buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, *, allow_predicted: bool = False,
             ops: Sequence[str] = ENGINE_OPS) -> "DispatchTable":
        """Read ``env``'s winners once. A winner is a fact about a shape in an environment, so every
        usable winner of the fingerprint serves (shapes shared with other tuned models included);
        ``model`` and ``tp`` name what the warnings suggest tuning. Records of ``ops`` whose kernel
        source changed since tuning are stale."""
        from tuneforge.db.store import display_url
        from tuneforge.dsl.template import get
        where = f"{env.label} in {display_url(store.url)}"
        if env.predicted and not allow_predicted:
            return cls({}, {}, where=where, model=model, tp=tp, buckets=buckets,
                       unusable=f"the winners for {env.label} are cost-model predictions, used only when "
                                f"allowed (--allow-predicted)")
        hashes = {op: get(op).source_hash for op in ops}
        usable, stale = store.load_winners(env, hashes)
        reasons: dict[tuple, str] = {}
        for w, why in stale:
            reasons.setdefault(family(w.problem), why)
        return cls(usable, reasons, where=where, model=model, tp=tp, buckets=buckets)

    @classmethod
    def unavailable(cls, why: str, model: str, tp: int) -> "DispatchTable":
        """A table with nothing in it (no database), saying why at each op's first lookup."""
        return cls({}, {}, where="", model=model, tp=tp, unusable=why)

    def __len__(self) -> int:
        return sum(len(v) for v in self._configs.values())

    def configs(self, op: str) -> list[dict]:
        """Every config the table holds for ``op`` (all shapes; baseline winners included)."""
        return [c for fam, by_m in self._configs.items() if fam[0] == op for c in by_m.values()]

    @property
    def fallbacks(self) -> list[str]:
        """The ops that have run the torch baseline for want of a usable record so far."""
        return sorted(self._warned)

    def lookup(self, op: str, problem: Problem) -> Optional[dict]:
        """The tuned config for ``problem`` (the exact token count if tuned, else the tuned bucket that
        serves it: the smallest >= m, else the largest), or None: run the torch baseline."""
        if problem.op != op:
            raise InputError(f"dispatch lookup for op {op!r} got a {problem.op!r} problem ({problem.key})")
        by_m = self._configs.get(family(problem))
        m = problem.shape.get("m", 0)
        if by_m:
            if m in by_m:
                return by_m[m]
            tuned = [t for t in by_m if self.buckets is None or t in self.buckets]
            if tuned:
                return by_m[bucket(m, tuned)]
        self._warn_once(op, problem)
        return None

    def _warn_once(self, op: str, problem: Problem) -> None:
        if op in self._warned:
            return
        self._warned.add(op)
        if self._unusable:
            why = self._unusable
        elif family(problem) in self._stale:
            why = f"stale record for {problem.key} ({self._stale[family(problem)]})"
        else:
            why = (f"no record for {problem.key} on {self.where} "
                   f"(tune it: tuneforge tune --model {self.model} --tp {self.tp})")
        log.warning("dispatch: %s runs the torch baseline: %s", op, why)


@dataclass(frozen=True)
class TPStep:
    """How one forward pass runs its tensor-parallel linear pairs (the same decision on every rank).
    ``attn`` / ``mlp``: the block's config (``{}``: the block's defaults, gemm_ar), or None: gemm +
    torch.distributed all-reduce. ``sharded`` (ag_rs): the residual stream holds only this rank's
    rows ``[row0, row0 + rows)`` of the ``m`` tokens."""
    shard: object
    m: int
    attn: Optional[dict] = None
    mlp: Optional[dict] = None
    sharded: bool = False
    row0: int = 0
    rows: int = 0


class Ops:
    """The model's ops. ``mode``: ``tuned`` (configs from ``table``; misses run the torch baseline),
    ``baseline`` (torch everywhere) or ``default`` (every Triton kernel with its default config).

    Configs are cached per shape, so after the first pass a call costs one dict lookup."""

    def __init__(self, mode: str = "tuned", table: Optional[DispatchTable] = None):
        if mode not in MODES:
            raise InputError(f"unknown dispatch mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == "tuned" and table is None:
            raise InputError("tuned dispatch needs a DispatchTable")
        self.mode, self.table = mode, table
        self._chosen: dict[tuple, Optional[dict]] = {}
        self._steps: dict[tuple, TPStep] = {}
        self._heap = self._ctx = None     # the TP blocks' symmetric heap and its context (open_tp)
        self._tp_tokens = self._logit_rows = 0     # what the heap's channels are warmed for
        self._retired: list = []

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
                return "ag_rs" if s.sharded else "+".join(sorted({"torch" if c is None else "gemm_ar"
                                                                  for c in (s.attn, s.mlp)}))
            text += "; TP: " + ", ".join(f"m={s.m} {label(s)}" for s in steps)
        return text

    def config(self, op: str, dtype: torch.dtype, world: int = 1, **dims: int) -> Optional[dict]:
        """The config for one call: a dict for the Triton kernel (``{}``: the launcher's own default),
        or None for the torch baseline (also when the tuned winner is the baseline)."""
        key = (op, dtype, world, *dims.items())
        if key not in self._chosen:
            self._chosen[key] = self._choose(Problem.make(op, DTYPE_NAMES[dtype], world, **dims))
        return self._chosen[key]

    def _choose(self, problem: Problem) -> Optional[dict]:
        if self.mode == "baseline":
            return None
        if self.mode == "default":
            return {}
        config = self.table.lookup(problem.op, problem)
        return None if config is None or config.get("baseline") else config

    # --- ops -----------------------------------------------------------------------------------
    def gemm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from tuneforge.kernels import gemm as k
        cfg = self.config("gemm", x.dtype, m=x.shape[0], n=w.shape[0], k=w.shape[1])
        return k.baseline(x, w) if cfg is None else k.gemm(x, w, config=cfg or None)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        from tuneforge.kernels import silu_mul as k
        cfg = self.config("silu_mul", x.dtype, m=x.shape[0], n=x.shape[1] // 2)
        return k.baseline(x) if cfg is None else k.silu_mul(x, config=cfg or None)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from tuneforge.kernels import rmsnorm as k
        if x.shape[0] == 0:          # a rank without rows of a row-sharded (ag_rs) forward
            return torch.empty_like(x)
        cfg = self.config("rmsnorm", x.dtype, m=x.shape[0], n=x.shape[1])
        return k.baseline(x, weight, eps=eps) if cfg is None else k.rmsnorm(x, weight, eps=eps, config=cfg or None)

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + residual) * weight, residual) with ``residual += x`` in place."""
        from tuneforge.kernels import rmsnorm as k
        if x.shape[0] == 0:
            return torch.empty_like(x), residual
        cfg = self.config("rmsnorm", x.dtype, m=x.shape[0], n=x.shape[1])
        if cfg is None:
            return k.baseline(x, weight, eps=eps, residual=residual), residual
        return k.rmsnorm(x, weight, eps=eps, residual=residual, config=cfg or None), residual

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
        """One token per sequence: q [batch, heads, head_dim] over the cache views k, v [batch, kv_heads,
        kv_len, head_dim]; keys [0, positions[b]] (the baseline reads them from the additive ``mask``).
        Tuned per bucket of kv_len among ``DECODE_CONTEXTS``."""
        from tuneforge.kernels import decode_attention as k_attn
        b, heads, d = q.shape
        cfg = self.config("decode_attention", q.dtype, m=b, heads=heads, kv_heads=k.shape[1], head_dim=d,
                          ctx=bucket(k.shape[2], DECODE_CONTEXTS))
        if cfg is None:
            return k_attn.sdpa(q, k, v, mask)
        return k_attn.decode_attention(q, k, v, positions, config=cfg or None)

    def rope_qk_norm(self, qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor,
                     k_weight: torch.Tensor, *, heads: int, kv_heads: int, theta: float, eps: float) -> None:
        """In place on ``qkv`` [tokens, (heads + 2 kv_heads) * head_dim]: q and k per-head RMSNorm, then
        RoPE at ``positions`` [tokens]; v untouched."""
        from tuneforge.kernels import rope as k
        head_dim = q_weight.shape[0]
        qk = qkv[:, :(heads + kv_heads) * head_dim]
        cfg = self.config("rope_qk_norm", qkv.dtype, m=qkv.shape[0], heads=heads, kv_heads=kv_heads,
                          head_dim=head_dim)
        if cfg is None:
            qk.copy_(k.baseline(qkv, positions, q_weight, k_weight, heads, kv_heads, theta, eps))
        else:
            k.rope_qk_norm(qkv, positions, q_weight, k_weight, heads=heads, kv_heads=kv_heads, theta=theta,
                           eps=eps, out=qk, config=cfg or None)

    # --- tensor parallelism -------------------------------------------------------------------
    def open_tp(self, model, max_tokens: int, logit_rows: int) -> None:
        """Collective (every rank, the same arguments): open the symmetric heap the TP blocks run on
        and warm its channels at ``max_tokens`` tokens (the largest forward) and ``logit_rows``
        gathered rows of logits, largest first (channels grow by reallocation on a heap that never
        frees). Nothing to do at TP 1, under baseline dispatch, when no tuned record runs a block,
        or when the open heap already covers the sizes."""
        shard = model.shard
        strategies = self._tp_strategies() if shard.size > 1 else set()
        if not strategies or (self._ctx is not None and max_tokens <= self._tp_tokens
                              and logit_rows <= self._logit_rows):
            return
        if shard.world is None:
            raise InputError("the TP blocks need this rank's World: build the model with Shard.of(world)")
        from tuneforge.dsl.heap import SymmetricHeap
        from tuneforge.kernels.tp_mlp import heap_bytes
        max_tokens, logit_rows = max(max_tokens, self._tp_tokens), max(logit_rows, self._logit_rows)
        hidden, size = model.cfg.hidden_size, model.dtype.itemsize
        gathered = max(max_tokens * hidden, logit_rows * model.cfg.vocab_size) * size   # the all-gathers
        if self._heap is not None:      # decode graphs captured on it may still replay: keep it alive
            self._retired.append(self._heap)
        self._heap = SymmetricHeap(shard.world, heap_bytes(max_tokens, hidden, shard.size, size) + 2 * gathered)
        self._ctx = self._heap.context()
        self._warm_up(model, max_tokens, logit_rows, "ag_rs" in strategies)
        self._tp_tokens, self._logit_rows = max_tokens, logit_rows

    def _tp_strategies(self) -> set:
        """The block strategies this dispatch may run: gemm_ar (the fallback layout) plus ag_rs if a
        record chooses it; empty when no block runs."""
        if self.mode == "baseline":
            return set()
        if self.mode == "default":
            return {"gemm_ar"}
        from tuneforge.kernels.tp_mlp import strategy_of
        found = {strategy_of(c) for op in TP_OPS for c in self.table.configs(op) if not c.get("baseline")}
        return found | {"gemm_ar"} if found else set()

    def _warm_up(self, model, tokens: int, logit_rows: int, ag_rs: bool) -> None:
        """The blocks and the all-gathers at their largest sizes, so every channel is carved once."""
        from tuneforge.dsl.comm import row_split
        from tuneforge.kernels import tp_mlp as TPM
        from tuneforge.kernels.allgather import allgather
        from tuneforge.kernels.gemm import launch_spec
        ctx, mlp, tp = self._ctx, model.layers[0].mlp, model.shard.size
        x = torch.zeros((tokens, model.cfg.hidden_size), dtype=model.dtype, device=ctx.device)
        mine = row_split(tokens, tp)[ctx.rank]
        TPM.tp_mlp(x, mlp.gate_up, mlp.down, ctx=ctx)
        if ag_rs:
            problem = Problem.make("tp_mlp", DTYPE_NAMES[model.dtype], tp, m=tokens, hidden=x.shape[1],
                                   inter=mlp.inter)
            spec = None if tuneforge.INTERPRETED else launch_spec(ctx.device)
            config = TPM.default_config(problem, spec, "ag_rs")
            TPM.tp_mlp(x[mine[0]:mine[0] + mine[1]], mlp.gate_up, mlp.down, ctx=ctx, config=config, m=tokens)
        logits = torch.zeros((logit_rows, model.vocab_part), dtype=model.dtype, device=ctx.device)
        gathers = [(x[mine[0]:mine[0] + mine[1]], tokens), (logits, tp * logit_rows)]
        for part, m in sorted(gathers, key=lambda g: -g[1] * g[0].shape[1]):
            allgather(part, ctx=ctx, m=m)
        ctx.synchronize()

    def tp_step(self, m: int, dtype: torch.dtype, shard, *, hidden: int, qkv: int, o_in: int, inter: int
                ) -> TPStep:
        """The TP plan of one forward of ``m`` tokens: the tp_attn / tp_mlp configs for this shape
        (dims as the tuning plan makes them) and the layout they share."""
        key = (m, dtype, shard.rank, shard.size, hidden, qkv, o_in, inter)
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._tp_layout(m, dtype, shard, hidden, qkv, o_in, inter)
        return step

    @property
    def tp_steps(self) -> list[TPStep]:
        """The TP plans of the forwards run so far, one per shape."""
        return list(self._steps.values())

    def _tp_layout(self, m, dtype, shard, hidden, qkv, o_in, inter) -> TPStep:
        if shard.size == 1:
            return TPStep(shard, m)
        from tuneforge.dsl.comm import row_split
        from tuneforge.kernels.tp_mlp import strategy_of
        attn = self.config("tp_attn", dtype, shard.size, m=m, hidden=hidden, qkv=qkv, o_in=o_in)
        mlp = self.config("tp_mlp", dtype, shard.size, m=m, hidden=hidden, inter=inter)
        if (attn is not None or mlp is not None) and self._ctx is None:
            raise InputError("the TP blocks run on a symmetric heap: call Ops.open_tp(model, ...) on every "
                             "rank first (the Generator does)")
        if attn is not None and mlp is not None and strategy_of(attn) == strategy_of(mlp) == "ag_rs":
            row0, rows = row_split(m, shard.size)[shard.rank]
            return TPStep(shard, m, attn, mlp, True, row0, rows)

        def replicated(config):      # an ag_rs winner in a replicated forward: gemm_ar, default config
            return config if config is None or strategy_of(config) == "gemm_ar" else {}
        return TPStep(shard, m, replicated(attn), replicated(mlp))

    def qkv_proj(self, x: torch.Tensor, w: torch.Tensor, tp: TPStep) -> torch.Tensor:
        """The fused q|k|v projection of all ``tp.m`` tokens for this rank's heads (x: this rank's
        rows when sharded)."""
        if tp.attn is None:
            return self.gemm(x, w)
        from tuneforge.kernels.tp_attn import qkv_half
        return qkv_half(x, w, ctx=self._ctx, config=tp.attn or None, m=tp.m if tp.sharded else None)

    def o_proj(self, a: torch.Tensor, w: torch.Tensor, tp: TPStep) -> torch.Tensor:
        """o_proj summed over ranks: all rows, or this rank's rows when sharded."""
        if tp.attn is None:
            return self.all_reduce(self.gemm(a, w), tp.shard)
        from tuneforge.kernels.tp_attn import o_half
        return o_half(a, w, ctx=self._ctx, config=tp.attn or None)

    def mlp(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, tp: TPStep) -> torch.Tensor:
        """gate_up -> silu_mul -> down, summed over ranks, in the forward's layout."""
        if tp.mlp is None:
            return self.all_reduce(self.gemm(self.silu_mul(self.gemm(x, gate_up)), down), tp.shard)
        from tuneforge.kernels.tp_mlp import tp_mlp
        return tp_mlp(x, gate_up, down, ctx=self._ctx, config=tp.mlp or None, m=tp.m if tp.sharded else None)

    def gather_rows(self, h: torch.Tensor, tp: TPStep) -> torch.Tensor:
        """Row-sharded forward: this rank's rows -> all ``tp.m`` rows on every rank."""
        if not tp.sharded:
            return h
        from tuneforge.kernels.allgather import allgather
        return allgather(h, ctx=self._ctx, m=tp.m)

    # --- tensor-parallel communication on the torch path -------------------------------------------
    @staticmethod
    def all_reduce(x: torch.Tensor, shard) -> torch.Tensor:
        if shard.size > 1:
            import torch.distributed as dist
            if x.is_cuda and dist.get_backend(shard.group) == "gloo":   # ranks sharing a GPU: host copies
                host = x.cpu()
                dist.all_reduce(host, group=shard.group)
                return x.copy_(host)
            dist.all_reduce(x, group=shard.group)
        return x

    def all_gather_columns(self, x: torch.Tensor, shard) -> torch.Tensor:
        """[rows, n/tp] on each rank -> [rows, n] on every rank, rank order along the columns: through
        the heap's all-gather when the TP blocks' heap is open and warmed for ``rows`` (CUDA-graph
        safe), else torch.distributed."""
        if shard.size == 1:
            return x
        rows, part = x.shape
        if self._ctx is not None and rows <= self._logit_rows:
            from tuneforge.kernels.allgather import allgather
            stacked = allgather(x.contiguous(), ctx=self._ctx, m=shard.size * rows)   # rank r's block r
            return stacked.view(shard.size, rows, part).transpose(0, 1).reshape(rows, shard.size * part)
        import torch.distributed as dist
        host = x.is_cuda and dist.get_backend(shard.group) == "gloo"
        src = x.cpu() if host else x.contiguous()
        parts = [torch.empty_like(src) for _ in range(shard.size)]
        dist.all_gather(parts, src, group=shard.group)
        return torch.cat(parts, dim=-1).to(x.device)


def open_ops(mode: str, *, db: Optional[str], model: str, tp: int, allow_predicted: bool = False,
             target: Optional[str] = None, buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS) -> Ops:
    """The engine's ops for ``mode``; ``tuned`` loads this environment's table from ``db`` (default: the
    default database, where a missing file only means nothing is tuned). The environment is this GPU
    measured at world size ``tp``, or without a GPU the cost model's ``target`` (default H100)."""
    if mode != "tuned":
        return Ops(mode)
    import os
    from tuneforge.db.store import Store, default_url, normalize_url
    from tuneforge.tune.devices import DEFAULT_TARGET, spec
    if torch.cuda.is_available() and target is None:
        env = Environment.local(world_size=tp)
    else:
        env = Environment.predicted(spec(target or DEFAULT_TARGET), world_size=tp)
    url = normalize_url(db) if db else default_url()
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
    if not db and path and not os.path.exists(path):
        return Ops("tuned", DispatchTable.unavailable(f"no tuning database at {path} (run tuneforge tune "
                                                      f"--model {model} --tp {tp})", model, tp))
    with Store(url, create=False) as store:
        return Ops("tuned", DispatchTable.load(store, env, model, tp, buckets, allow_predicted=allow_predicted))
