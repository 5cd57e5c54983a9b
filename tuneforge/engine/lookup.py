"""Lookup: which config serves each op call, decided from the tuning database (the engine's one home
for it; ``dispatch.Ops`` asks ``choose``).

A call's config is one of three states, named here: ``BASELINE`` (None: the op's torch baseline),
``LAUNCHER_DEFAULT`` (``{}``: the Triton kernel at its launcher's own default config) or a stored
config (a non-empty dict). ``MODES``: ``tuned`` (configs from a ``DispatchTable``; misses run the
baseline, or the kernel's default config for the ops of ``UNTUNED_RUNS_DEFAULT``),
``baseline`` (torch everywhere) or ``default`` (every Triton kernel at its default; the fusions of
``TUNED_ONLY`` left to the unfused ops).

``DispatchTable.load`` reads the database once, at engine start, into a dict; ``lookup`` is then a
dictionary walk (no SQL on the hot path). Loading says in one line what the table holds (or why it
holds nothing). An op with no record, or only a stale one (its kernel source changed since tuning,
or it was recorded under other versions/driver/interconnect), runs the torch baseline, and the table
says so in ONE warning line per op. Winners predicted by the cost model (CPU-only databases, foreign
targets) serve only when ``allow_predicted`` is set. Every stored config is checked at load against
its template's space and constraints on this machine (``runnable``): one that needs a hardware path
missing here (TMA under the interpreter) serves as its portable variant, one that cannot run at all
leaves its problem to the baseline; one line per op says which. Only rank 0 of a TP world speaks
(``quiet`` elsewhere). This module imports no kernel (the CLI and the dashboard read it cheaply).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Optional, Sequence

import torch

import tuneforge
from tuneforge.db.environment import Environment
from tuneforge.dsl.problem import DEFAULT_BUCKETS, Problem, serving_bucket, serving_buckets
from tuneforge.errors import InputError

log = logging.getLogger("tuneforge.engine")

# The ops the engine dispatches (prefill attention is torch SDPA; a MoE layer's all-reduce is torch's).
ENGINE_OPS = ("gemm", "rmsnorm", "silu_mul", "rope_qk_norm", "decode_attention", "decode_attention_sp", "allgather",
              "tp_attn", "tp_mlp", "moe_router", "moe_pack", "moe_gemm", "shared_expert_gate", "gemm_fused",
              "moe_block")
TP_OPS = ("tp_attn", "tp_mlp")
MODES = ("tuned", "baseline", "default")

# The states of one call's config (Ops.choice, TPStep.attn / .mlp); any other dict is a stored config.
BASELINE = None             # the op's torch baseline (TP blocks: gemm + torch.distributed all-reduce)
LAUNCHER_DEFAULT: dict = {}  # the Triton kernel at its launcher's default config (shared: never mutated)


def kernel_config(config: dict) -> Optional[dict]:
    """A kernel's config as its launcher's ``config=`` argument: None for ``LAUNCHER_DEFAULT``."""
    return config or None


def default_choice(op: str) -> Optional[dict]:
    """What default dispatch serves ``op`` with: its kernel at the launcher's default, but a fusion only
    where a tune measured it winning (``BASELINE``: the unfused ops)."""
    return BASELINE if op in TUNED_ONLY else LAUNCHER_DEFAULT


def choose(mode: str, table: Optional["DispatchTable"], problem: Problem) -> Optional[dict]:
    """The config ``mode`` serves ``problem`` with (a tuned winner that is the baseline: ``BASELINE``)."""
    if mode == "baseline":
        return BASELINE
    if mode == "default":
        return default_choice(problem.op)
    config = table.lookup(problem.op, problem)
    if config is None and table.runs_default(problem):
        return LAUNCHER_DEFAULT
    return BASELINE if config is None or config.get("baseline") else config


# Ops ``default`` dispatch leaves to their baseline (for a fusion: the unfused ops, each at its default):
# at default configs the fusions of a Qwen3-32B layer ran 0.92x the unfused ops' speed on the H200
# (benchmarks/results/bench_fusions-NVIDIA_H200-2026-12-02.json); the tuner accepts them where they win.
TUNED_ONLY = ("gemm_fused",)

# The ops whose kernel at its default config serves a problem without a winner, and why: their torch
# baselines are sequences of small kernels (or a host-syncing loop) that the default beats everywhere
# measured (the first trial of every H200 tune of 2026-12-02 is the default; speedups from its log). The
# GEMMs (cuBLAS), the fusions (the unfused ops) and the communication blocks keep the baseline.
# Only in a table that holds winners (an untuned engine says it runs the baseline, and does). Here, not
# in the kernel modules, so the policy does not change the kernels' source hashes.
UNTUNED_RUNS_DEFAULT = {
    "moe_gemm": "its baseline (transformers' per-expert loop) reads the routing back to the host: no CUDA graph, "
                "40-70x slower decode on an H200",
    "moe_pack": "its baseline is a torch argsort / scatter sequence, 11x slower at decode",
    "moe_router": "its baseline (torch softmax + topk + renormalise) is 6x slower",
    "rmsnorm": "its baseline (torch ops) is 2x slower",
    "silu_mul": "its baseline (torch ops) is 1.5-2.7x slower",
    "rope_qk_norm": "its baseline (torch ops) is 16x slower",
    "decode_attention": "its baseline (SDPA) is 1.4-34x slower",
    "shared_expert_gate": "its baseline (torch ops) is 2.2x slower",
}


def untuned_serving(problem: Problem) -> str:
    """What dispatch runs for ``problem`` without a winner, in words (``DispatchTable.runs_default``'s rule)."""
    if problem.op in UNTUNED_RUNS_DEFAULT:
        return f"runs its kernel's default config (the torch baseline where no {problem.dtype} winner is stored)"
    return "runs the torch baseline"


def family(problem: Problem) -> tuple:
    """A problem without its token count: the problems that differ only in ``m`` share it."""
    return (problem.op, tuple(kv for kv in problem.dims if kv[0] != "m"), problem.dtype, problem.world)


def serving_spec(env: Environment):
    """The device ``env``'s winners were chosen for, as it is here: its spec (the local GPU when
    measured on it, the target when predicted; without a GPU the launchers' interpreter stand-in)
    with only the hardware features this machine has (none under Triton's interpreter)."""
    from dataclasses import replace
    from tuneforge.kernels._common import launch_spec
    from tuneforge.dsl.devices import SPECS, local_device
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
            w = replace(w, config=template.served(w.problem, w.config))
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
        self._times: dict[tuple, dict[int, float]] = {}     # the winners' measured (or predicted) seconds
        for w in winners.values():
            self._configs.setdefault(family(w.problem), {})[w.problem.shape.get("m", 0)] = dict(w.config)
            self._times.setdefault(family(w.problem), {})[w.problem.shape.get("m", 0)] = w.time_s
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

    def families(self, m: Optional[int] = None) -> list[tuple]:
        """The families holding winners (those serving ``m`` tokens, when given)."""
        return [fam for fam, by_m in self._configs.items() if m is None or self._serving(m, by_m) is not None]

    def served_at_default(self, families: Sequence[tuple]) -> "DispatchTable":
        """A copy in which ``families`` are served as default dispatch serves them (the kernel at its
        launcher's default; a fusion by the unfused ops): what their winners buy, by taking them away."""
        table = copy.copy(self)
        table._warned, table._told, table._said, table._rejected = set(), set(), set(), set()
        def stored(op: str) -> dict:      # a stored config saying what default_choice says
            return {"baseline": True} if default_choice(op) is BASELINE else LAUNCHER_DEFAULT
        table._configs = {fam: dict.fromkeys(by_m, stored(fam[0])) if fam in families else by_m
                          for fam, by_m in self._configs.items()}
        return table

    def runs_default(self, problem: Problem) -> str:
        """Why ``problem`` without a winner runs its kernel's default config here ('' : the torch baseline,
        also in a dtype nothing was tuned in, as load says)."""
        return UNTUNED_RUNS_DEFAULT.get(problem.op, "") if problem.dtype in self._dtypes else ""

    @property
    def fallbacks(self) -> list[str]:
        """The ops that have run the torch baseline for want of a usable record so far."""
        return sorted(self._warned)

    def lookup(self, op: str, problem: Problem) -> Optional[dict]:
        """The tuned config for ``problem`` (the exact token count if tuned, else the tuned bucket that
        serves it: the smallest >= m, ``serving_bucket``), or None: run the torch baseline."""
        if problem.op != op:
            raise InputError(f"dispatch lookup for op {op!r} got a {problem.op!r} problem ({problem.key})")
        config = self._find(problem)
        if config is None:
            self._warn_once(op, problem)
        if self.on_lookup is not None:
            self.on_lookup(problem, config)
        return config

    def time(self, problem: Problem) -> Optional[float]:
        """Seconds the winner serving ``problem`` took when tuned (None: no record); no lookup is recorded
        (the engine weighs a fusion's winner against the unfused ops' with it)."""
        return self._find(problem, self._times)

    def _find(self, problem: Problem, table: Optional[dict] = None):
        by_m = (self._configs if table is None else table).get(family(problem))
        served = self._serving(problem.shape.get("m", 0), by_m) if by_m else None
        return None if served is None else by_m[served]

    def _serving(self, m: int, by_m: dict) -> Optional[int]:
        """The tuned token count of ``by_m`` serving ``m`` tokens: ``m`` itself if tuned, else ``serving_bucket``."""
        return m if m in by_m else serving_bucket(m, by_m, self.buckets)

    def fall_back(self, op: str, problem: Problem, config: dict, why: str) -> None:
        """A launcher rejected ``config``, the stored config serving ``problem``: the caller runs the
        torch baseline. Said once per config (it may serve several token counts)."""
        from tuneforge.dsl.problem import canonical_config
        self._warned.add(op)
        if (op, canonical_config(config)) not in self._rejected:
            self._rejected.add((op, canonical_config(config)))
            self.note(f"dispatch: {op} runs the torch baseline for {problem.key} (and any shape its stored config "
                      f"serves): the launcher rejected that config: {why}")

    def _other_key_forms(self, problem: Problem) -> str:
        """'' or, where records (usable or stale) of ``problem``'s op, dtype and world agree with it on
        every dim they share but have other dim names (a database tuned before the op's key gained or
        lost a dim, e.g. rope_qk_norm's ``cache``), a clause saying so."""
        op, dims, dtype, world = family(problem)
        want = dict(dims)
        forms: dict[str, str] = {}      # how the key differs -> "" (usable records) or " (stale)"
        for fam in (*self._configs, *self._stale):
            have = dict(fam[1])
            if fam[0] != op or fam[2:] != (dtype, world) or have.keys() == want.keys() \
                    or any(have[k] != want[k] for k in have.keys() & want.keys()):
                continue
            missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
            form = " and ".join(([f"without {', '.join(missing)}"] if missing else [])
                                + ([f"with {', '.join(extra)}"] if extra else []))
            forms[form] = "" if fam in self._configs or forms.get(form) == "" else " (stale)"
        if not forms:
            return ""
        said = " / ".join(f"{form}{stale}" for form, stale in sorted(forms.items()))
        return f"; records of {op} at the same dims but {said} are there: tuned under an older problem key?"

    def _warn_once(self, op: str, problem: Problem) -> None:
        runs_default = self.runs_default(problem)
        if not runs_default:
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
        elif serving_buckets(self._configs.get(family(problem), {}), self.buckets):
            most = max(serving_buckets(self._configs[family(problem)], self.buckets))
            why = (f"tuned up to m={most}, not for m={problem['m']} ({problem.key}; a bucket >= {problem['m']}: "
                   f"tuneforge tune --model {self.model} --tp {self.tp} --buckets / --prefill-buckets)")
        else:
            other = self._other_key_forms(problem)
            why = (f"no record for {problem.key} on {self.where}{other} "
                   f"(tune it: tuneforge tune --model {self.model} --tp {self.tp})")
        # a fusion without a winner yields to the ops it fuses, each dispatched on its own (Ops.normed)
        instead = "the unfused ops, each as tuned" if op == "gemm_fused" else "the torch baseline"
        if runs_default:
            instead = f"its Triton kernel at the default config, not the torch baseline ({runs_default})"
        self.note(f"dispatch: {op} runs {instead}: {why}")


def environment(tp: int, target: Optional[str] = None) -> Environment:
    """The environment whose winners serve: this GPU measured at world size ``tp``, or without a GPU
    (or with ``target``) the cost model's prediction for ``target`` (default H100)."""
    from tuneforge.dsl.devices import DEFAULT_TARGET, spec
    if torch.cuda.is_available() and target is None:
        return Environment.local(world_size=tp)
    return Environment.predicted(spec(target or DEFAULT_TARGET), world_size=tp)


def database(db: Optional[str]) -> tuple[str, Optional[str]]:
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
    url, missing = database(db)
    if missing:
        return None
    fingerprint = environment(tp, target).fingerprint
    with Store(url, create=False) as store:
        found = Counter(w.problem.dtype for w in store.winners(fingerprint=fingerprint, model=model, tp=tp))
    return found.most_common(1)[0][0] if found else None
