"""Dispatch: which kernel config serves each op call, decided from the tuning database.

``DispatchTable.load`` reads the database once, at engine start, into a dict; ``lookup`` is then a
dictionary walk (no SQL on the hot path). Loading says in one line what the table holds (or why it
holds nothing). An op with no record, or only a stale one (its kernel source changed since tuning,
or it was recorded under other versions/driver/interconnect), runs the torch baseline, and the table
says so in ONE warning line per op. Winners predicted by the cost model (CPU-only databases, foreign
targets) serve only when ``allow_predicted`` is set. Every stored config is checked at load against
its template's space and constraints on this machine (``runnable``): one that needs a hardware path
missing here (TMA under the interpreter) serves as its portable variant, one that cannot run at all
leaves its problem to the baseline; one line per op says which.

``Ops`` is what the model calls: each method asks the table (or the fixed mode) for a config and
runs the Triton kernel with it, or the op's torch baseline. A stored config its launcher still
rejects at the first call switches that problem to the baseline, said once: serving never stops
for a bad record. Only rank 0 of a TP world speaks (``quiet`` elsewhere).

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
from typing import Callable, Optional, Sequence

import torch

import tuneforge
from tuneforge.db.environment import Environment
from tuneforge.dsl.problem import DEFAULT_BUCKETS, DTYPE_NAMES, Problem, bucket
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.models import problems as P

log = logging.getLogger("tuneforge.engine")

# The ops the engine dispatches (prefill attention is torch SDPA).
ENGINE_OPS = ("gemm", "rmsnorm", "silu_mul", "rope_qk_norm", "decode_attention", "tp_attn", "tp_mlp")
TP_OPS = ("tp_attn", "tp_mlp")
MODES = ("tuned", "baseline", "default")


def family(problem: Problem) -> tuple:
    """A problem without its token count: the problems that differ only in ``m`` share it."""
    return (problem.op, tuple(kv for kv in problem.dims if kv[0] != "m"), problem.dtype, problem.world)


def serving_spec(env: Environment):
    """The device ``env``'s winners were chosen for, as it is here: its spec (the local GPU when
    measured on it, the target when predicted; without a GPU the launchers' interpreter stand-in)
    with only the hardware features this machine has (none under Triton's interpreter)."""
    from dataclasses import replace
    from tuneforge.kernels.gemm import launch_spec
    from tuneforge.tune.devices import SPECS, local_device
    here = None if tuneforge.INTERPRETED or not torch.cuda.is_available() else local_device()
    recorded = SPECS.get(env.gpu_name) if env.predicted else here
    recorded = recorded or launch_spec(torch.device("cpu"))
    if here is None:
        return replace(recorded, name="interpreter", features=frozenset())
    return replace(recorded, features=recorded.features & here.features)


def runnable(winners: dict, spec, ops: Sequence[str]) -> tuple[dict, list[tuple], list[str]]:
    """The winners of ``ops`` whose configs pass their template's space and constraints on ``spec``;
    a config that needs a hardware path ``spec`` lacks serves as its portable variant (the same
    tiles, feature flags off) when that passes. Returns (winners by key, the families of the dropped
    ones, one note per op that had configs changed or dropped: dropped ones run the torch baseline)."""
    from dataclasses import replace
    from tuneforge.dsl.template import FEATURE_FLAGS, get, portable
    kept: dict = {}
    dropped: list[tuple] = []
    changed: dict[str, list] = {}      # op -> [(problem key, why, flags turned off or None)]
    for key, w in winners.items():
        op = w.problem.op
        if op not in ops:
            continue
        if not w.config.get("baseline"):
            template = get(op)
            why = template.reject_reason(w.config, w.problem, spec)
            if why:
                run, flags = portable(w.config), [f for f in FEATURE_FLAGS if w.config.get(f)]
                still = template.reject_reason(run, w.problem, spec) if flags else why
                if still is None:
                    changed.setdefault(op, []).append((w.problem.key, why, flags))
                    w = replace(w, config=run)
                else:
                    why = why if still == why else f"{why}; without {'/'.join(flags)}: {still}"
                    changed.setdefault(op, []).append((w.problem.key, why, None))
                    dropped.append(family(w.problem))
                    continue
        kept[key] = w
    notes = []
    for op, items in sorted(changed.items()):
        ported = [i for i in items if i[2] is not None]
        refused = [i for i in items if i[2] is None]
        if ported:
            key, why, flags = ported[0]
            notes.append(f"dispatch: {len(ported)} stored {op} config(s) need {'/'.join(flags)}, which {spec.name} "
                         f"lacks (e.g. {key}: {why}): they run the same tiles without it")
        if refused:
            key, why, _ = refused[0]
            more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
            notes.append(f"dispatch: {op} runs the torch baseline for {key}{more}: the stored config cannot run "
                         f"on {spec.name}: {why}")
    return kept, dropped, notes


class DispatchTable:
    """In-memory winners for one environment: ``{family: {m: config}}`` plus what is stale.

    Messages go to the ``tuneforge.engine`` log once each, and only where ``quiet`` is off (rank 0
    of a TP world): the table's summary at load, one line per op that falls back, one line if the
    run's dtype is not the one the winners were tuned in."""

    def __init__(self, winners: dict, stale: dict, *, where: str, model: str, tp: int,
                 buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, unusable: str = "", quiet: bool = False,
                 dropped: Sequence[tuple] = (), on_lookup: Optional[Callable[[Problem, Optional[dict]], None]] = None):
        self._configs: dict[tuple, dict[int, dict]] = {}
        for w in winners.values():
            self._configs.setdefault(family(w.problem), {})[w.problem.shape.get("m", 0)] = dict(w.config)
        self._dtypes = sorted({fam[2] for fam in self._configs})
        self._stale = stale                # family -> reason
        self._dropped = set(dropped)       # families whose configs cannot run here (said at load)
        self._unusable = unusable          # said at load: why nothing in the database may serve
        self._warned: set[str] = set()     # ops that ran the baseline for want of a usable config
        self._told: set[str] = set()       # ops whose missing record was said
        self._said: set[str] = set()       # lines logged
        self._rejected: set[tuple] = set()     # (op, config) a launcher refused
        self.quiet = quiet
        self.on_lookup = on_lookup         # called with every looked-up problem and its answer
        self.summary = unusable            # what the table holds, in one line (load sets it)
        self.where, self.model, self.tp = where, model, tp
        self.buckets = None if buckets is None else tuple(sorted(buckets))

    @classmethod
    def load(cls, store, env: Environment, model: str, tp: int,
             buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, *, allow_predicted: bool = False,
             ops: Sequence[str] = ENGINE_OPS, quiet: bool = False) -> "DispatchTable":
        """Read ``env``'s winners once. A winner is a fact about a shape in an environment, so every
        usable winner of the fingerprint serves (shapes shared with other tuned models included);
        ``model`` and ``tp`` name what the messages suggest tuning. Records of ``ops`` whose kernel
        source changed since tuning are stale; configs that cannot run on this machine serve as their
        portable variant or not at all (``runnable``). Says in one line what it loaded."""
        from tuneforge.db.store import display_url
        from tuneforge.dsl.template import get
        where = f"{env.label} (fingerprint {env.fingerprint}) in {display_url(store.url)}"
        usable, stale = store.load_winners(env, {op: get(op).source_hash for op in ops})
        ignored = 0
        if env.predicted and not allow_predicted:
            ignored, usable, stale = len(usable), {}, []
        usable, dropped, notes = runnable(usable, serving_spec(env), ops)
        reasons: dict[tuple, str] = {}
        for w, why in stale:
            reasons.setdefault(family(w.problem), why)
        found = "" if ignored or stale or dropped else f" (run `tuneforge tune --model {model} --tp {tp}`)"
        summary = (f"dispatch: {len(usable)} winner{'' if len(usable) == 1 else 's'} for {where}, model {model}, TP {tp}"
                   if usable else f"dispatch: no winners for {where}, model {model}, TP {tp}: every op runs the torch "
                                  f"baseline{found}")
        ones = lambda n: "one" if n == 1 else "ones"
        if ignored:
            summary += f"; {ignored} predicted {ones(ignored)} ignored (use --allow-predicted)"
        if stale:
            summary += f"; {len(stale)} stale {ones(len(stale))} ignored"
        if dropped:
            summary += f"; {len(dropped)} that cannot run here ignored"
        table = cls(usable, reasons, where=where, model=model, tp=tp, buckets=buckets, quiet=quiet,
                    unusable="" if usable or reasons else summary, dropped=dropped)
        table.summary = summary
        table.note(summary, logging.INFO if usable else logging.WARNING)
        for line in notes:
            table.note(line)
        return table

    @classmethod
    def unavailable(cls, why: str, model: str, tp: int, quiet: bool = False) -> "DispatchTable":
        """A table with nothing in it (no database), saying why once."""
        table = cls({}, {}, where="", model=model, tp=tp, unusable=why, quiet=quiet)
        table.note(f"dispatch: every op runs the torch baseline: {why}")
        return table

    def note(self, line: str, level: int = logging.WARNING) -> None:
        """Log ``line`` once (nothing where ``quiet``)."""
        if line not in self._said and not self.quiet:
            self._said.add(line)
            log.log(level, "%s", line)

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
        config = self._find(problem)
        if config is None:
            self._warn_once(op, problem)
        if self.on_lookup is not None:
            self.on_lookup(problem, config)
        return config

    def _find(self, problem: Problem) -> Optional[dict]:
        by_m = self._configs.get(family(problem))
        m = problem.shape.get("m", 0)
        if by_m:
            if m in by_m:
                return by_m[m]
            tuned = [t for t in by_m if self.buckets is None or t in self.buckets]
            if tuned:
                return by_m[bucket(m, tuned)]
        return None

    def fall_back(self, op: str, problem: Problem, config: dict, why: str) -> None:
        """A launcher rejected ``config``, the stored config serving ``problem``: the caller runs the
        torch baseline. Said once per config (it may serve several token counts)."""
        from tuneforge.dsl.problem import canonical_config
        self._warned.add(op)
        if (op, canonical_config(config)) not in self._rejected:
            self._rejected.add((op, canonical_config(config)))
            self.note(f"dispatch: {op} runs the torch baseline for {problem.key} (and any shape its stored config "
                      f"serves): the launcher rejected that config: {why}")

    def _warn_once(self, op: str, problem: Problem) -> None:
        self._warned.add(op)
        if self._unusable or family(problem) in self._dropped or op in self._told:   # said already
            return
        self._told.add(op)
        if family(problem) in self._stale:
            why = f"stale record for {problem.key} ({self._stale[family(problem)]})"
        elif self._dtypes and problem.dtype not in self._dtypes:
            self.note(f"dispatch: the winners are for {', '.join(self._dtypes)}; this run is {problem.dtype}: "
                      f"ops without a winner in {problem.dtype} run the torch baseline (pass --dtype "
                      f"{self._dtypes[0]})")
            return
        else:
            why = (f"no record for {problem.key} on {self.where} "
                   f"(tune it: tuneforge tune --model {self.model} --tp {self.tp})")
        self.note(f"dispatch: {op} runs the torch baseline: {why}")


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
        self._proven: set[tuple] = set()      # calls whose stored config has launched once
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
        """The config for one call of ``op`` at ``dims`` (see ``choice``)."""
        return self.choice(Problem.make(op, DTYPE_NAMES[dtype], world, **dims))

    def choice(self, problem: Problem) -> Optional[dict]:
        """The config for one call: a dict for the Triton kernel (``{}``: the launcher's own default),
        or None for the torch baseline (also when the tuned winner is the baseline)."""
        if problem not in self._chosen:
            self._chosen[problem] = self._choose(problem)
        return self._chosen[problem]

    def _run(self, problem: Problem, kernel, baseline):
        """``kernel(config)`` with this call's config (None: the launcher's default), or ``baseline()``.
        Under tuned dispatch a stored config its launcher rejects (ConfigRejected / InputError, raised
        before anything launches) switches that problem to the baseline for good, said once. A shape's
        first call runs eagerly (decode graphs are captured after warm-up steps), so the switch comes
        before any capture."""
        cfg = self.choice(problem)
        if cfg is None:
            return baseline()
        if self.mode != "tuned" or problem in self._proven:
            return kernel(cfg or None)
        try:
            out = kernel(cfg or None)
        except (ConfigRejected, InputError) as e:
            self._chosen[problem] = None
            self.table.fall_back(problem.op, problem, cfg, str(e))
            return baseline()
        self._proven.add(problem)
        return out

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
        return self._run(P.gemm(x.dtype, x.shape[0], w.shape),
                         lambda cfg: k.gemm(x, w, config=cfg), lambda: k.baseline(x, w))

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        from tuneforge.kernels import silu_mul as k
        return self._run(P.silu_mul(x.dtype, x.shape[0], x.shape[1]),
                         lambda cfg: k.silu_mul(x, config=cfg), lambda: k.baseline(x))

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from tuneforge.kernels import rmsnorm as k
        if x.shape[0] == 0:          # a rank without rows of a row-sharded (ag_rs) forward
            return torch.empty_like(x)
        return self._run(P.rmsnorm(x.dtype, x.shape[0], x.shape[1]),
                         lambda cfg: k.rmsnorm(x, weight, eps=eps, config=cfg), lambda: k.baseline(x, weight, eps=eps))

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + residual) * weight, residual) with ``residual += x`` in place."""
        from tuneforge.kernels import rmsnorm as k
        if x.shape[0] == 0:
            return torch.empty_like(x), residual
        return self._run(P.rmsnorm(x.dtype, x.shape[0], x.shape[1]),
                         lambda cfg: k.rmsnorm(x, weight, eps=eps, residual=residual, config=cfg),
                         lambda: k.baseline(x, weight, eps=eps, residual=residual)), residual

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
        """One token per sequence: q [batch, heads, head_dim] over the cache views k, v [batch, kv_heads,
        kv_len, head_dim]; keys [0, positions[b]] (the baseline reads them from the additive ``mask``).
        Tuned per bucket of kv_len among ``DECODE_CONTEXTS`` (``problems.decode_attention``)."""
        from tuneforge.kernels import decode_attention as k_attn
        b, heads, d = q.shape
        return self._run(P.decode_attention(q.dtype, b, heads, k.shape[1], d, k.shape[2]),
                         lambda cfg: k_attn.decode_attention(q, k, v, positions, config=cfg),
                         lambda: k_attn.sdpa(q, k, v, mask))

    def rope_qk_norm(self, qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor,
                     k_weight: torch.Tensor, *, heads: int, kv_heads: int, theta: float, eps: float,
                     scaling=None) -> None:
        """In place on ``qkv`` [tokens, (heads + 2 kv_heads) * head_dim]: q and k per-head RMSNorm, then
        RoPE (``scaling``: the config's rope_scaling) at ``positions`` [tokens]; v untouched."""
        from tuneforge.kernels import rope as k
        head_dim = q_weight.shape[0]
        qk = qkv[:, :(heads + kv_heads) * head_dim]
        self._run(P.rope_qk_norm(qkv.dtype, qkv.shape[0], heads, kv_heads, head_dim),
                  lambda cfg: k.rope_qk_norm(qkv, positions, q_weight, k_weight, heads=heads, kv_heads=kv_heads,
                                             theta=theta, eps=eps, scaling=scaling, out=qk, config=cfg),
                  lambda: qk.copy_(k.baseline(qkv, positions, q_weight, k_weight, heads, kv_heads, theta, eps,
                                              scaling)))

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
            problem = P.tp_mlp(model.dtype, tp, tokens, x.shape[1], mlp.inter)
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
        attn = self.choice(P.tp_attn(dtype, shard.size, m, hidden, qkv, o_in))
        mlp = self.choice(P.tp_mlp(dtype, shard.size, m, hidden, inter))
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


def environment(tp: int, target: Optional[str] = None) -> Environment:
    """The environment whose winners serve: this GPU measured at world size ``tp``, or without a GPU
    (or with ``target``) the cost model's prediction for ``target`` (default H100)."""
    from tuneforge.tune.devices import DEFAULT_TARGET, spec
    if torch.cuda.is_available() and target is None:
        return Environment.local(world_size=tp)
    return Environment.predicted(spec(target or DEFAULT_TARGET), world_size=tp)


def _database(db: Optional[str]) -> tuple[str, Optional[str]]:
    """(URL, why there is nothing to read): ``db``, or the default database, whose missing file only
    means nothing is tuned yet."""
    import os
    from tuneforge.db.store import default_url, normalize_url
    url = normalize_url(db) if db else default_url()
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else None
    if not db and path and not os.path.exists(path):
        return url, f"no tuning database at {path}"
    return url, None


def tuned_dtype(db: Optional[str], model: str, tp: int, target: Optional[str] = None) -> Optional[str]:
    """The dtype ``model``'s winners for this environment were tuned in (the most common one), or
    None when there are none."""
    from collections import Counter
    from tuneforge.db.store import Store
    url, missing = _database(db)
    if missing:
        return None
    fingerprint = environment(tp, target).fingerprint
    with Store(url, create=False) as store:
        found = Counter(w.problem.dtype for w in store.winners(fingerprint=fingerprint, model=model, tp=tp))
    return found.most_common(1)[0][0] if found else None


def open_ops(mode: str, *, db: Optional[str], model: str, tp: int, allow_predicted: bool = False,
             target: Optional[str] = None, buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS,
             quiet: bool = False) -> Ops:
    """The engine's ops for ``mode``; ``tuned`` loads ``environment(tp, target)``'s table from ``db``
    (default: the default database). ``quiet``: say nothing (the TP ranks other than 0)."""
    if mode != "tuned":
        return Ops(mode)
    from tuneforge.db.store import Store
    url, missing = _database(db)
    if missing:
        return Ops("tuned", DispatchTable.unavailable(f"{missing} (run `tuneforge tune --model {model} --tp {tp}`)",
                                                      model, tp, quiet=quiet))
    with Store(url, create=False) as store:
        return Ops("tuned", DispatchTable.load(store, environment(tp, target), model, tp, buckets,
                                               allow_predicted=allow_predicted, quiet=quiet))
