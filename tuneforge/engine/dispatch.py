"""Dispatch: which kernel config serves each op call, decided from the tuning database.

``DispatchTable.load`` reads the database once, at engine start, into a dict; ``lookup`` is then a
dictionary walk (no SQL on the hot path). An op with no record, or only a stale one (its kernel
source changed since tuning, or it was recorded under other versions/driver/interconnect), runs the
torch baseline, and the table says so in ONE warning line per op. Winners predicted by the cost
model (CPU-only databases, foreign targets) serve only when ``allow_predicted`` is set.

``Ops`` is what the model calls: each method asks the table (or the fixed mode) for a config and
runs the Triton kernel with it, or the op's torch baseline.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from tuneforge.db.environment import Environment
from tuneforge.dsl.problem import DEFAULT_BUCKETS, DTYPE_NAMES, Problem, bucket
from tuneforge.errors import InputError

log = logging.getLogger("tuneforge.engine")

# The ops the engine dispatches (attention is torch SDPA; decode_attention is baseline-only).
ENGINE_OPS = ("gemm", "rmsnorm", "silu_mul", "rope_qk_norm")
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

    def describe(self) -> str:
        if self.mode == "tuned":
            where = f" from {self.table.where}" if self.table.where else ""
            missing = f"; torch baseline for {', '.join(self.table.fallbacks)}" if self.table.fallbacks else ""
            return f"tuned ({len(self.table)} winners{where}{missing})"
        return {"baseline": "torch baseline", "default": "Triton kernels, default configs"}[self.mode]

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
        cfg = self.config("rmsnorm", x.dtype, m=x.shape[0], n=x.shape[1])
        return k.baseline(x, weight, eps=eps) if cfg is None else k.rmsnorm(x, weight, eps=eps, config=cfg or None)

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + residual) * weight, residual) with ``residual += x`` in place."""
        from tuneforge.kernels import rmsnorm as k
        cfg = self.config("rmsnorm", x.dtype, m=x.shape[0], n=x.shape[1])
        if cfg is None:
            return k.baseline(x, weight, eps=eps, residual=residual), residual
        return k.rmsnorm(x, weight, eps=eps, residual=residual, config=cfg or None), residual

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

    # --- tensor-parallel communication (torch.distributed; the TP blocks will replace it) --------
    @staticmethod
    def all_reduce(x: torch.Tensor, shard) -> torch.Tensor:
        if shard.size > 1:
            import torch.distributed as dist
            dist.all_reduce(x, group=shard.group)
        return x

    @staticmethod
    def all_gather_columns(x: torch.Tensor, shard) -> torch.Tensor:
        """[rows, n/tp] on each rank -> [rows, n] on every rank, rank order along the columns."""
        if shard.size == 1:
            return x
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(shard.size)]
        dist.all_gather(parts, x.contiguous(), group=shard.group)
        return torch.cat(parts, dim=-1)


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
