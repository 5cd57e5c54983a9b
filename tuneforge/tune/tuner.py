"""The tuner: one Optuna study per (problem, environment), winners verified and stored.

For every planned problem with a template:

1. The study ``store.study_name(problem, env)`` is opened in the tuning database (created if new,
   resumed if a run was killed: only finished trials are ever written, so nothing half-done
   survives and nothing finished is lost) and its trials replayed into a fast in-memory study
   whose seeded TPE sampler proposes the next configs (the template's default config first; a
   space no larger than the trial budget is enumerated instead).
2. Each config is checked against the template's constraints before anything compiles (rejected:
   a PRUNED trial with the reason in user attr ``reason``), then timed: measured on the local GPU
   (output checked against the reference first; compile errors, OOM and wrong results are FAIL
   trials with user attr ``error``, never the end of the run) or predicted by the cost model.
3. The torch baseline is timed the same way and is always a candidate: the winner is the fastest
   of trials and baseline, where everything within ``tie_tolerance`` of the best counts as a tie won
   by the baseline, else by the canonically smallest config, so reruns agree.
4. A kernel winner is verified against the reference before it is stored: on the GPU on fresh
   inputs; without one, by running the real kernel under Triton's interpreter at a shrunken shape
   (once per op and config).

Budgets: ``trials`` per problem (evaluated configs; rejected ones come on top, up to a cap) and
``budget_s`` in total, shared out over the problems still to tune. Multi-rank problems are measured
only where this machine has a GPU per rank; otherwise (and for every problem under the cost model)
their times are predicted and stored as source "predicted" in the target's predicted environment.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
import sys
import textwrap
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional, TextIO

import optuna
from optuna.trial import TrialState

from tuneforge.db.environment import Environment
from tuneforge.db.store import Store, Winner
from tuneforge.dsl.check import compare, interpreter_scale, poison, split_out
from tuneforge.dsl.problem import Problem, canonical_config
from tuneforge.dsl.template import Template, portable
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.tune import costmodel
from tuneforge.dsl.devices import DEFAULT_TARGET, DeviceSpec, local_device, spec as lookup_spec
from tuneforge.tune.measure import percent_of_light, time_calls
from tuneforge.tune.plan import Plan, PlanItem

BASELINE = {"baseline": True}
DEFAULT_TRIALS = {"measure": 40, "costmodel": 16}
MULTIRANK_BATCH = 8        # configs measured per world of ranks (starting a world costs seconds)
REJECT_CAP = 4             # asks per problem stop at REJECT_CAP x trials (rejected configs are cheap)
MIN_PROBLEM_S = 1.0        # a problem gets at least this share of a total budget
KEEP_DIMS = ("head_dim",)          # never shrunk for interpreter verification
SMALL_DIMS = (3, 8, 24, 64)        # sizes a dim is cut to for interpreter verification (odd ones mask)
SHRINK_TILES = (1, 2, 3, 4, 5, 8)  # a dim's caps in the config's tiles, before SMALL_DIMS
VERIFY_WORLD = 2                   # ranks multi-rank winners are verified with under the interpreter
VERIFY_PICKS = 1                   # multi-rank candidates per problem verified in the first world (a failure queues the next)
VERIFY_ROUNDS = 3                  # worlds started for multi-rank verification before giving up

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class TuneOptions:
    target: Optional[str] = None          # a DeviceSpec name; None: the local GPU, else DEFAULT_TARGET
    backend: Optional[str] = None         # "measure" | "costmodel" | None: measure where the target is local
    trials: Optional[int] = None          # evaluated configs per problem (default by backend)
    budget_s: Optional[float] = None      # wall-clock budget for the whole plan
    problem_budget_s: Optional[float] = None   # and for any one problem
    seed: int = 0
    tie_tolerance: float = 0.02
    verify: bool = True
    progress: Optional[TextIO] = field(default_factory=lambda: sys.stderr)


@dataclass
class Row:
    """One line of the final table (and of the summary JSON)."""
    problem: str
    op: str
    roles: list
    status: str                     # tuned | baseline-only | no-winner
    config: Optional[dict]
    time_s: Optional[float]
    baseline_s: Optional[float]
    speedup: Optional[float]
    pct_sol: Optional[float]
    source: str                     # measured | predicted
    n_trials: int = 0               # evaluated configs (see count_trials), all runs
    new_trials: int = 0             # of them, evaluated in this run
    rejected: int = 0               # configs rejected before they ran, all runs
    study_name: str = ""
    note: str = ""

    @property
    def winner(self) -> str:
        if self.status == "baseline-only":
            return "baseline (no template)"
        if self.config is None:
            return "-"
        return describe_config(self.config)


@dataclass
class Report:
    model: str
    tp: int
    target: str
    backend: str
    database: str
    fingerprint: str
    rows: list[Row]
    elapsed_s: float
    plan_size: int
    environment: dict = field(default_factory=dict)   # the fingerprint's fields: GPU, versions, world size
    verifications_run: int = 0      # configs run under the interpreter to verify them (0: all verdicts known)

    def to_dict(self) -> dict:
        tuned = [r for r in self.rows if r.status == "tuned"]
        beat = [r for r in tuned if r.config and not r.config.get("baseline")]
        return {"model": self.model, "tp": self.tp, "target": self.target, "backend": self.backend,
                "database": self.database, "fingerprint": self.fingerprint, "environment": self.environment,
                "elapsed_s": round(self.elapsed_s, 3),
                "problems": self.plan_size, "tuned": len(tuned), "kernel_winners": len(beat),
                "baseline_only": sum(r.status == "baseline-only" for r in self.rows),
                "n_trials": sum(r.n_trials for r in self.rows), "new_trials": sum(r.new_trials for r in self.rows),
                "rejected": sum(r.rejected for r in self.rows), "verifications_run": self.verifications_run,
                "rows": [dict(problem=r.problem, op=r.op, roles=r.roles, status=r.status, winner=r.winner,
                              config=r.config, time_s=r.time_s, baseline_s=r.baseline_s, speedup=r.speedup,
                              pct_sol=r.pct_sol, source=r.source, n_trials=r.n_trials, new_trials=r.new_trials,
                              rejected=r.rejected, study_name=r.study_name, note=r.note) for r in self.rows]}


@dataclass
class Searched:
    """A searched problem waiting for its winner to be chosen, verified and stored."""
    item: PlanItem
    template: Template
    problem: Problem
    env: Environment
    measured: bool
    study_name: str
    pool: list                       # (config, seconds), the baseline included
    baseline_s: float
    n_trials: int                    # as Row's
    new: int
    rejected: int
    bench: Optional["GpuBench"] = None
    notes: list = field(default_factory=list)


_ABBREV = {"block_m": "bm", "block_n": "bn", "block_k": "bk", "group_m": "g", "num_warps": "w",
           "num_stages": "s", "split_k": "sk", "programs_per_sm": "pps", "rows": "rows", "block": "blk"}


def describe_config(config: dict) -> str:
    """Strategy first, then the other parameters in short form (``gemm_ar bm128 bn256 bk64 w8 s3``)."""
    if config.get("baseline"):
        return "baseline"
    parts = [str(config["strategy"])] if "strategy" in config else []
    for k, v in sorted(config.items()):
        if k == "strategy":
            continue
        short = _ABBREV.get(k.lower(), k.lower())
        if isinstance(v, bool):
            if v:
                parts.append(short)
        else:
            parts.append(f"{short}{v}" if isinstance(v, (int, float)) and short.isalpha() else f"{short}={v}")
    return " ".join(parts)


def _sort_key(config: dict) -> tuple:
    """Canonical order of configs for tie-breaking: numbers compare as numbers (16 < 128)."""
    def item(v):
        if isinstance(v, bool):
            return (0, int(v), "")
        if isinstance(v, (int, float)):
            return (0, v, "")
        return (1, 0, str(v))
    return tuple((k, item(v)) for k, v in sorted(config.items()))


def choose(candidates: list[tuple[dict, float]], tie_tolerance: float) -> tuple[dict, float]:
    """The winner among (config, seconds): within ``tie_tolerance`` of the fastest, the baseline if
    it is there, else the canonically smallest config."""
    best = min(t for _, t in candidates)
    tied = [(c, t) for c, t in candidates if t <= best * (1.0 + tie_tolerance)]
    for c, t in tied:
        if c.get("baseline"):
            return c, t
    return min(tied, key=lambda ct: _sort_key(ct[0]))


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines and type(e).__name__ == "CompilationError" else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}"[:500]


def count_trials(trials: list) -> tuple[int, int]:
    """(trials, rejected) of finished trials: a trial is an evaluated config (COMPLETE, or FAIL: it
    compiled or ran and failed); a config the constraints or the launcher rejected before it ran
    (PRUNED) is counted apart. The budget, progress lines, table, summary and stored winners all
    count this way."""
    rejected = sum(t.state == TrialState.PRUNED for t in trials)
    return len(trials) - rejected, rejected


def _problem_seed(seed: int, problem: Problem) -> int:
    return (seed * 1_000_003 + zlib.crc32(problem.key.encode())) % 2**31


# --- measuring on the local GPU --------------------------------------------------------------

class WrongResult(Exception):
    pass


class GpuBench:
    """Inputs, reference and timing of one single-rank problem on the local GPU (``device`` cpu:
    the same steps under the interpreter with host-clock times, for tests of this logic)."""

    def __init__(self, template: Template, problem: Problem, spec: DeviceSpec, seed: int, device=None):
        import torch
        self.torch = torch
        self.template, self.problem = template, problem
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        first = template.make_inputs(problem, self.device, seed, None)
        set_bytes = sum(t.numel() * t.element_size() for t in first.values() if isinstance(t, torch.Tensor))
        # decode-sized problems are timed as the engine runs them (CUDA graph replays), with enough
        # input sets rotated that the weights cannot stay in L2; larger ones one call at a time after
        # an L2 flush
        self.graph = self.cuda and problem.shape.get("m", 0) <= 256
        sets = 1
        if self.graph:
            free = torch.cuda.mem_get_info(self.device)[0]
            want = math.ceil(2 * spec.l2_mb * 2**20 / max(set_bytes, 1))
            sets = max(1, min(8, want, int(0.25 * free // max(set_bytes, 1))))
        self.inputs = [first] + [template.make_inputs(problem, self.device, seed + i, None) for i in range(1, sets)]
        self.reference = template.reference(**split_out(first))

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _run_checked(self, inputs: dict, reference, config: dict) -> str:
        out = poison(inputs["out"])
        got = self.template.launch(**inputs, config=config)
        self._sync()
        res = compare(got if got is not None else out, reference, out.dtype)
        return "" if res.ok else res.reason

    def check(self, config: dict) -> None:
        why = self._run_checked(self.inputs[0], self.reference, config)
        if why:
            raise WrongResult(why)

    def _time(self, fn: Callable[[dict], Any]) -> float:
        calls = [(lambda inp=inp: fn(inp)) for inp in self.inputs]
        if self.graph:
            try:
                return time_calls(calls, graph=True).median_s
            except RuntimeError:
                # not capturable (or it failed): time it call by call; a real failure fails again there
                self._sync()
        return time_calls(calls, graph=False).median_s

    def time_config(self, config: dict) -> float:
        self.check(config)
        return self._time(lambda inp: self.template.launch(**inp, config=config))

    def time_baseline(self) -> float:
        return self._time(lambda inp: self.template.baseline(**split_out(inp)))

    def verify(self, config: dict, seed: int) -> str:
        """The config on fresh inputs (another seed) against the reference: '' when it matches."""
        inputs = self.template.make_inputs(self.problem, self.device, seed, None)
        return self._run_checked(inputs, self.template.reference(**split_out(inputs)), config)

    def close(self) -> None:
        self.inputs = self.reference = None
        if self.cuda:
            self.torch.cuda.empty_cache()


# --- verifying predicted winners under the interpreter --------------------------------------------

def _tile_scale(config: dict) -> int:
    sizes = [v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 16
             and "warp" not in k.lower() and "stage" not in k.lower()]
    return max(sizes, default=16)


def shrink(template: Template, problem: Problem, config: dict, spec: DeviceSpec) -> Problem:
    """A small version of ``problem`` the config still accepts: first the smallest (by product of
    dims) shape whose every dim is capped at 1-8 of the config's tiles, then each dim on its own cut
    further (to SMALL_DIMS, or just past half) while the constraints still pass (head_dim is kept:
    kernels specialise on it); the real problem if nothing smaller passes.

    The constraints are checked for the device the interpreted launch plans with (the target's spec
    with the interpreter's few SMs): wave-shape rules (a hybrid schedule needs more tiles than
    programs and a partial last wave) then hold for that launch, and a few tiles satisfy them where
    the target's 132 SMs would keep the whole problem. Caps are chosen per dim (3 or 5 tiles one way,
    2 the other), since equal caps give tile counts that fill 4 SMs exactly."""
    import torch
    from tuneforge.kernels.gemm import launch_spec
    spec = dataclasses.replace(spec, sms=launch_spec(torch.device("cpu")).sms)
    scale = _tile_scale(config)
    names = [k for k, _ in problem.dims]
    caps = [sorted({v} if k in KEEP_DIMS else {min(v, f * scale) for f in SHRINK_TILES}) for k, v in problem.dims]
    accepted = None
    for dims in sorted(itertools.product(*caps), key=math.prod):
        if template.reject_reason(config, problem.with_dims(**dict(zip(names, dims))), spec) is None:
            accepted = dict(zip(names, dims))
            break
    if accepted is None:
        return problem
    for name in accepted:
        for small in sorted({*SMALL_DIMS, accepted[name] // 2 + 1}):     # or just past half: a masked tail
            if name in KEEP_DIMS or small >= accepted[name]:
                break
            trial = {**accepted, name: small}
            if template.reject_reason(config, problem.with_dims(**trial), spec) is None:
                accepted = trial
                break
    return problem.with_dims(**accepted)


class Verdicts:
    """Verification results shared by the verifiers: per (op, canonical config) in this process, and
    in the database keyed by the template's source hash too, so a re-run (or another tuner) interprets
    no kernel already checked; ``ran`` counts the configs actually run under the interpreter."""

    def __init__(self, store: Optional[Store]):
        self.store = store
        self.stored = store.verifications() if store is not None else {}
        self.cache: dict[tuple[str, str], str] = {}
        self.ran = 0

    def get(self, template: Template, config_key: str) -> Optional[str]:
        key = (template.op, config_key)
        if key not in self.cache:
            stored = self.stored.get((template.op, config_key, template.source_hash))
            if stored is None:
                return None
            self.cache[key] = stored
        return self.cache[key]

    def put(self, results: list[tuple[Template, str, Problem, str]], persist: bool = True) -> None:
        """(template, config key, problem it ran at, '' or why) of configs just checked; ``persist``
        False for verdicts that say nothing about the config (a world of processes that died)."""
        for template, config_key, _, why in results:
            self.cache[(template.op, config_key)] = why
        self.ran += len(results)
        if persist and self.store is not None:
            self.store.record_verifications([(t.op, key, t.source_hash, problem.key, why)
                                             for t, key, problem, why in results])


class InterpreterVerifier:
    """Runs a winner once under Triton's interpreter on a shrunken shape; verdicts kept in ``verdicts``
    (per op and config, persistent through the store)."""

    def __init__(self, seed: int, verdicts: Optional[Verdicts] = None, log: Callable[[str], None] = lambda _: None):
        self.seed = seed
        self.verdicts = verdicts or Verdicts(None)
        self.log = log

    @property
    def cache(self) -> dict[tuple[str, str], str]:
        return self.verdicts.cache

    def portable(self, config: dict) -> dict:
        return portable(config)

    def verify(self, template: Template, problem: Problem, config: dict, spec: DeviceSpec) -> str:
        """'' when the kernel matched its reference, else the reason."""
        import torch
        config_key = canonical_config(config)
        known = self.verdicts.get(template, config_key)
        if known is not None:
            return known
        run = self.portable(config)
        small = shrink(template, problem, run, spec)
        self.log(f"      verifying {describe_config(config)} under the interpreter at {small.key} ...")
        try:
            inputs = template.make_inputs(small, torch.device("cpu"), self.seed, None)
            out = poison(inputs["out"])
            got = template.launch(**inputs, config=run)
            res = compare(got if got is not None else out, template.reference(**split_out(inputs)), out.dtype,
                          scale=interpreter_scale(out.dtype))
            why = "" if res.ok else f"wrong result at {small.key}: {res.reason}"
        except Exception as e:   # noqa: BLE001 - any failure disqualifies the config
            why = f"failed at {small.key}: {_first_line(e)}"
        self.verdicts.put([(template, config_key, small, why)])
        return why


# --- the tuner ---------------------------------------------------------------------------------

def choose_backend(target: Optional[str], backend: Optional[str]) -> tuple[DeviceSpec, str]:
    """(device spec, "measure" | "costmodel"): measure where the target is this machine's GPU."""
    local = local_device()
    if backend not in (None, "measure", "costmodel"):
        raise InputError(f"unknown backend {backend!r}; expected measure or costmodel")
    wanted = lookup_spec(target) if target else None
    if backend == "measure":
        if local is None:
            raise InputError("--backend measure needs a GPU; this machine has none (use the cost model)")
        if wanted is not None and wanted.name != local.name:
            raise InputError(f"cannot measure on {wanted.name}: the local GPU is a {local.name}")
        return local, "measure"
    if backend is None and local is not None and (wanted is None or wanted.name == local.name):
        return local, "measure"
    return wanted or lookup_spec(DEFAULT_TARGET), "costmodel"


class Tuner:
    def __init__(self, store: Store, options: Optional[TuneOptions] = None):
        self.store = store
        self.options = options or TuneOptions()
        self.spec, self.backend = choose_backend(self.options.target, self.options.backend)
        self.trials = self.options.trials or DEFAULT_TRIALS[self.backend]
        if self.trials < 1:
            raise InputError(f"trials must be >= 1, got {self.trials}")
        self.storage = store.optuna_storage()
        self.verdicts = Verdicts(store)
        self.verifier = InterpreterVerifier(self.options.seed, self.verdicts, self._log)
        self._envs: dict[tuple[int, bool], Environment] = {}

    # ---------------------------------------------------------------------- environments
    def env(self, world: int, measured: bool) -> Environment:
        key = (world, measured)
        if key not in self._envs:
            self._envs[key] = Environment.local(world_size=world) if measured else \
                Environment.predicted(self.spec, world)
        return self._envs[key]

    def measurable(self, problem: Problem) -> bool:
        if self.backend != "measure":
            return False
        if problem.world == 1:
            return True
        import torch
        return False if torch.cuda.device_count() < problem.world else _multirank_measure_available()

    def _log(self, text: str) -> None:
        if self.options.progress is not None:
            print(text, file=self.options.progress, flush=True)

    # ---------------------------------------------------------------------- the plan
    def tune(self, plan: Plan) -> Report:
        start = time.monotonic()
        tp = plan.tp
        run_env = self.env(tp, self.backend == "measure")
        self.store.add_plan(plan.model, plan.tp, plan.pairs())
        from tuneforge.dsl.template import _REGISTRY
        rows: list[Optional[Row]] = []
        deferred: list[tuple[int, Searched]] = []       # multi-rank winners verified together at the end
        todo = plan.tunable
        n = len(plan.items)
        done_tunable = 0
        for i, item in enumerate(plan.items, 1):
            t0 = time.monotonic()
            if item.baseline_only:
                rows.append(self._baseline_only_row(item))
            else:
                deadline = None
                if self.options.budget_s is not None:
                    left = self.options.budget_s - (time.monotonic() - start)
                    share = max(MIN_PROBLEM_S, left / max(1, len(todo) - done_tunable))
                    deadline = time.monotonic() + share
                if self.options.problem_budget_s is not None:
                    own = time.monotonic() + self.options.problem_budget_s
                    deadline = own if deadline is None else min(deadline, own)
                done_tunable += 1
                found = self.search_problem(item, _REGISTRY[item.problem.op], tp, deadline)
                if isinstance(found, Row):
                    rows.append(found)
                elif found.problem.world > 1 and found.bench is None and self.options.verify:
                    rows.append(None)
                    deferred.append((len(rows) - 1, found))
                    self._log(f"[{i:>{len(str(n))}}/{n}] {item.key}  {_trials_text(found.n_trials, found.rejected, found.new)}"
                              f" searched; verified with the other multi-rank winners at the end")
                    continue
                else:
                    rows.append(self.finish(found, self._verify_single))
            r = rows[-1]
            self._log(f"[{i:>{len(str(n))}}/{n}] {r.problem}  {_progress_text(r)}  {time.monotonic() - t0:.1f}s")
        if deferred:
            t0 = time.monotonic()
            self._finish_multirank(rows, deferred)
            for index, _ in deferred:
                self._log(f"[verified] {rows[index].problem}  {_progress_text(rows[index])}")
            self._log(f"multi-rank winners verified under the interpreter in {time.monotonic() - t0:.1f}s")
        return Report(plan.model, tp, self.spec.name, self.backend, self.store.url, run_env.fingerprint, rows,
                      time.monotonic() - start, n, run_env.to_dict(), self.verdicts.ran)

    def _baseline_only_row(self, item: PlanItem) -> Row:
        try:
            t = costmodel.predict(None, item.problem, None, self.spec)
        except KeyError:
            t = None
        return Row(item.key, item.problem.op, list(item.roles), "baseline-only", None, t, t, 1.0 if t else None,
                   None, "predicted", note=item.why)

    # ---------------------------------------------------------------------- one problem
    def tune_problem(self, item: PlanItem, template: Template, tp: int, deadline: Optional[float] = None) -> Row:
        """Search, verify and store one problem (multi-rank ones verified in their own world)."""
        found = self.search_problem(item, template, tp, deadline)
        if isinstance(found, Row):
            return found
        if found.problem.world > 1 and found.bench is None and self.options.verify:
            rows: list[Optional[Row]] = [None]
            self._finish_multirank(rows, [(0, found)])
            return rows[0]
        return self.finish(found, self._verify_single)

    def _finish_multirank(self, rows: list, deferred: list) -> None:
        """Verify the multi-rank winners (and their likely runners-up, so a failure costs no new
        world) in as few worlds of processes as possible, then store them into ``rows``."""
        verdicts = MultiRankVerifier(self.options.seed, self.spec, self.verdicts, self._log)
        for _, found in deferred:
            for config in self.picks(found.pool, VERIFY_PICKS):
                verdicts.lookup(found, config)
        for _ in range(VERIFY_ROUNDS):
            verdicts.run()
            for index, found in deferred:
                if rows[index] is None:
                    rows[index] = self.finish(found, verdicts.lookup)
            if not verdicts.pending:
                break
        verdicts.give_up(f"not verified within {VERIFY_ROUNDS} worlds of processes")
        for index, found in deferred:
            if rows[index] is None:
                rows[index] = self.finish(found, verdicts.lookup)

    def search_problem(self, item: PlanItem, template: Template, tp: int, deadline: Optional[float] = None):
        """Run the study; returns what ``finish`` needs (a Row if the problem could not be searched)."""
        problem = item.problem
        measured = self.measurable(problem)
        env = self.env(tp, measured)
        study_name = self.store.study_name(problem, env)
        seed = _problem_seed(self.options.seed, problem)
        bench = None
        history: list = []
        try:
            stored = optuna.create_study(storage=self.storage, study_name=study_name, direction="minimize",
                                         load_if_exists=True)
            history = [t for t in stored.get_trials(deepcopy=False) if t.state.is_finished()]
            # several configs in flight at once (multi-rank batches): TPE lies about the pending ones
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, min(10, self.trials // 3)),
                                                 constant_liar=measured and problem.world > 1)
            live = optuna.create_study(direction="minimize", sampler=sampler)
            live.add_trials(history)
            if measured:
                bench = GpuBench(template, problem, self.spec, self.options.seed) if problem.world == 1 \
                    else LockstepBench(template, problem, self.options.seed)
            evaluate_many, batch = self._evaluator(template, problem, bench, measured)
            self._search(live, template.space(problem), template, problem, history, evaluate_many, deadline,
                         stored_writer=stored.add_trials, write_each=measured, batch=batch)
            if bench is not None:
                baseline_s = bench.time_baseline()
            else:
                baseline_s = costmodel.predict(template, problem, None, self.spec)
            if stored.user_attrs.get("baseline_s") != baseline_s:
                stored.set_user_attr("baseline_s", baseline_s)
        except Exception as e:   # noqa: BLE001 - a problem that cannot be tuned must not stop the plan
            if bench is not None:
                bench.close()
            elif measured and problem.world == 1:
                import torch
                torch.cuda.empty_cache()       # what a failed set-up (e.g. out of memory) left behind
            n_trials, rejected = count_trials(history)
            return Row(problem.key, problem.op, list(item.roles), "no-winner", None, None, None, None, None,
                       "measured" if measured else "predicted", n_trials, rejected=rejected, study_name=study_name,
                       note=_first_line(e))
        candidates: dict[str, tuple[dict, float]] = {}
        trials = [t for t in live.get_trials(deepcopy=False) if t.state.is_finished()]   # not the queued ones
        for t in trials:
            if t.state == TrialState.COMPLETE and t.value is not None:
                key = canonical_config(t.params)
                if key not in candidates or t.value < candidates[key][1]:
                    candidates[key] = (dict(t.params), float(t.value))
        pool = list(candidates.values()) + [(dict(BASELINE), baseline_s)]
        n_trials, rejected = count_trials(trials)
        new = count_trials(trials[len(history):])[0]
        return Searched(item, template, problem, env, measured, study_name, pool, baseline_s, n_trials, new, rejected,
                        bench)

    def picks(self, pool: list, k: int) -> list[dict]:
        """The first ``k`` kernel configs ``choose`` would pick if each before it failed verification."""
        pool, out = list(pool), []
        while len(out) < k:
            config, _ = choose(pool, self.options.tie_tolerance)
            if config.get("baseline"):
                break
            out.append(config)
            pool = [(c, v) for c, v in pool if c is not config]
        return out

    def _verify_single(self, found: "Searched", config: dict) -> Optional[str]:
        if found.bench is not None:
            return found.bench.verify(config, self.options.seed + 1)
        return self.verifier.verify(found.template, found.problem, config, self.spec)

    def finish(self, found: "Searched", verify: Callable[["Searched", dict], Optional[str]]) -> Optional[Row]:
        """Choose the winner, verify it (``verify`` -> '' ok, a reason, or None: not known yet) and
        store it. A config that fails drops out and the next pick is tried."""
        item, problem, template = found.item, found.problem, found.template
        while True:
            config, time_s = choose(found.pool, self.options.tie_tolerance)
            if config.get("baseline") or not self.options.verify:
                break
            try:
                why = verify(found, config)
            except Exception as e:   # noqa: BLE001 - a winner that cannot even run is not a winner
                why = _first_line(e)
            if why is None:
                return None                       # verdict pending (multi-rank batch)
            if not why:
                break
            found.notes.append(f"{describe_config(config)} failed verification: {why}")
            found.pool = [(c, v) for c, v in found.pool if c is not config]
        if found.bench is not None:
            found.bench.close()
            found.bench = None
        flops, nbytes = template.work(problem)
        pct = percent_of_light(time_s, flops, nbytes, self.spec, problem.dtype)
        source = "measured" if found.measured else "predicted"
        w = Winner(problem=problem, env=found.env, config=config, time_s=time_s, baseline_s=found.baseline_s,
                   speedup=found.baseline_s / time_s, pct_sol=pct, source=source,
                   template_hash=template.source_hash, study_name=found.study_name, n_trials=found.n_trials,
                   created_at=datetime.now(timezone.utc))
        self.store.record_winner(w)
        return Row(problem.key, problem.op, list(item.roles), "tuned", config, time_s, found.baseline_s, w.speedup,
                   pct, source, found.n_trials, found.new, found.rejected, found.study_name, "; ".join(found.notes))

    def _evaluator(self, template: Template, problem: Problem, bench, measured: bool):
        """(evaluate_many(configs) -> outcomes, batch size)."""
        spec = self.spec
        if not measured:
            one = lambda config: costmodel.predict(template, problem, config, spec)  # noqa: E731
        elif isinstance(bench, GpuBench):
            one = bench.time_config
        else:
            return bench.evaluate_many, MULTIRANK_BATCH
        return (lambda configs: [self._outcome(one, c) for c in configs]), 1

    def _search(self, live, space, template: Template, problem: Problem, history: list, evaluate_many,
                deadline: Optional[float], stored_writer, write_each: bool, batch: int = 1) -> int:
        """Ask, filter, evaluate and tell until ``self.trials`` configs were evaluated (counting the
        stored history); ``batch`` configs are evaluated together (one world of ranks per batch for
        multi-rank measuring); finished trials go to ``stored_writer`` (each batch, or every 256)."""
        evaluated = count_trials(history)[0]
        asks = len(history)                 # the cap on asks counts the stored trials too
        cap = REJECT_CAP * self.trials
        if evaluated >= self.trials or asks >= cap:
            return
        results: dict[str, tuple[TrialState, Optional[float], dict]] = {}
        for t in history:
            results.setdefault(canonical_config(t.params), (t.state, t.value, dict(t.user_attrs)))
        configs = _enumerate_small(space, self.trials)
        if configs is None:       # the default, then the template's portfolio, then the sampler
            configs = [template.default_config(problem, self.spec)]
            configs += template.seeds(problem, self.spec) if template.seeds else []
        queued = set(results)
        for c in configs:
            c = {k: v for k, v in c.items() if k in space.names}
            key = canonical_config(c)
            if key not in queued and len(queued) - len(results) < self.trials - evaluated:
                queued.add(key)
                live.enqueue_trial(c, skip_if_exists=True)
        pending: list = []
        written = 0
        min_new = 1 if not history else 0

        def tell(trial, outcome, repeat=False):
            nonlocal evaluated
            state, value, attrs = outcome
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            if repeat:
                trial.set_user_attr("repeat", True)
            live.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            evaluated += state != TrialState.PRUNED
            pending.append(live.get_trials(deepcopy=False)[trial.number])

        while evaluated < self.trials and asks < cap:
            if deadline is not None and time.monotonic() > deadline and written + len(pending) >= min_new:
                break
            fresh: dict[str, tuple] = {}            # key -> (config, [trials asking for it])
            while len(fresh) < batch and asks < cap and evaluated + len(fresh) < self.trials:
                asks += 1
                trial = live.ask()
                config = space.sample(trial)
                key = canonical_config(config)
                if key in results:                  # TPE proposes repeats in small spaces: reuse
                    tell(trial, results[key], repeat=True)
                elif key in fresh:
                    fresh[key][1].append(trial)
                else:
                    reason = template.reject_reason(config, problem, self.spec)
                    if reason:                      # rejected before anything compiles
                        results[key] = (TrialState.PRUNED, None, {"reason": reason})
                        tell(trial, results[key])
                    else:
                        fresh[key] = (config, [trial])
            if fresh:
                outcomes = evaluate_many([config for config, _ in fresh.values()])
                for (key, (config, trials)), outcome in zip(fresh.items(), outcomes):
                    results[key] = outcome
                    for i, trial in enumerate(trials):
                        tell(trial, outcome, repeat=i > 0)
            if write_each or len(pending) >= 256:
                stored_writer(pending)
                written += len(pending)
                pending = []
        stored_writer(pending)

    @staticmethod
    def _outcome(evaluate, config: dict) -> tuple[TrialState, Optional[float], dict]:
        """Time one config: a COMPLETE trial, or PRUNED (the launcher rejected it) / FAIL (compile
        error, OOM, wrong result, ...) with the reason."""
        try:
            value = float(evaluate(config))
        except ConfigRejected as e:
            return TrialState.PRUNED, None, {"reason": str(e)}
        except WrongResult as e:
            return TrialState.FAIL, None, {"error": f"wrong result: {e}"[:500]}
        except Exception as e:   # noqa: BLE001 - compile errors, OOM, launch failures: a FAIL trial
            if type(e).__name__ == "OutOfMemoryError":
                import torch
                torch.cuda.empty_cache()
            return TrialState.FAIL, None, {"error": _first_line(e)}
        if not math.isfinite(value) or value <= 0:
            return TrialState.FAIL, None, {"error": f"non-positive or non-finite time {value!r}"}
        return TrialState.COMPLETE, value, {}


def _enumerate_small(space, limit: int) -> Optional[list[dict]]:
    """Every config of a space with at most ``limit`` configs, else None."""
    out = []
    for c in space.enumerate():
        out.append(c)
        if len(out) > limit:
            return None
    return out


def _trials_text(n_trials: int, rejected: int, new: int) -> str:
    """``16 trials (+5 rejected), 16 new``: the one way trials are counted (count_trials)."""
    return f"{n_trials} trials" + (f" (+{rejected} rejected)" if rejected else "") + f", {new} new"


def _progress_text(r: Row) -> str:
    if r.status == "baseline-only":
        return "baseline-only (no template)"
    if r.status != "tuned":
        return f"NO WINNER: {r.note}"
    return (f"{_trials_text(r.n_trials, r.rejected, r.new_trials)}: {describe_config(r.config)} "
            f"{_us(r.time_s)} vs baseline {_us(r.baseline_s)} {r.speedup:.2f}x {r.source}")


# --- multi-rank measurement ------------------------------------------------------------------

def _multirank_measure_available() -> bool:
    """Lockstep multi-rank measuring needs the world module (tuneforge.world)."""
    try:
        import tuneforge.world  # noqa: F401
    except ImportError:
        return False
    return True


def heap_bytes(problem: Problem) -> int:
    """Symmetric-heap size for a multi-rank problem: staging for a few copies of every rank's rows
    at the widest dim, in fp32, plus signals."""
    s = problem.shape
    widest = max((v for k, v in s.items() if k != "m"), default=1)
    return 16 * 2**20 + 4 * problem.world * s.get("m", 1) * widest * 4


def _lockstep_worker(world, template_op: str, problem_key: str, configs: list, seed: int) -> list:
    """Runs on every rank: the same configs in the same order, every timing started by a barrier;
    returns this rank's (seconds or None, reason) per config (None config: the baseline)."""
    import torch
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.dsl.template import get
    template = get(template_op)
    problem = Problem.from_key(problem_key)
    heap = SymmetricHeap(world, heap_bytes(problem))
    ctx = heap.context()
    try:
        inputs = template.make_inputs(problem, ctx.device, seed, ctx)
        reference = template.reference(**split_out(inputs))
        out = []
        for config in configs:
            try:
                if config is None:
                    fn = lambda: template.baseline(**split_out(inputs))  # noqa: E731
                else:
                    poison(inputs["out"])
                    got = template.launch(**inputs, config=config)
                    ctx.synchronize()
                    res = compare(got, reference, got.dtype, scale=interpreter_scale(got.dtype))
                    if not res.ok:
                        out.append((None, f"wrong result on rank {world.rank}: {res.reason}"))
                        world.barrier()
                        continue
                    fn = lambda: template.launch(**inputs, config=config)  # noqa: E731
                out.append((time_calls([fn], barrier=world.barrier).median_s, ""))
            except Exception as e:   # noqa: BLE001 - reported as a FAIL trial
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                out.append((None, _first_line(e)))
            world.barrier()
        return out
    finally:
        heap.close()


def _lockstep(template: Template, problem: Problem, configs: list, seed: int,
              device: str = "cuda") -> list[tuple[Optional[float], str]]:
    """Every rank measures the same configs in lockstep; the slowest rank's time counts
    (``device="cpu"``: the same under the interpreter, host-clock times, for tests)."""
    from tuneforge.world import spawn
    per_rank = spawn(_lockstep_worker, problem.world, template.op, problem.key, configs, seed, device=device,
                     timeout=600.0)
    merged = []
    for results in zip(*per_rank):
        errors = [why for t, why in results if t is None]
        merged.append((None, errors[0]) if errors else (max(t for t, _ in results), ""))
    return merged


class LockstepBench:
    """A multi-rank problem measured on this machine's GPUs: each batch of configs runs in one world
    of ranks in lockstep (the baseline with the first batch); the slowest rank's time counts."""

    def __init__(self, template: Template, problem: Problem, seed: int):
        self.template, self.problem, self.seed = template, problem, seed
        self.baseline_s: Optional[float] = None
        self.verified: dict[str, str] = {}

    def evaluate_many(self, configs: list) -> list:
        ask = list(configs) + ([None] if self.baseline_s is None else [])
        try:
            results = _lockstep(self.template, self.problem, ask, self.seed)
        except Exception as e:   # noqa: BLE001 - the world died: every config of the batch fails
            results = [(None, _first_line(e))] * len(ask)
        if self.baseline_s is None:
            t, why = results.pop()
            if t is None:
                raise RuntimeError(f"baseline failed: {why}")
            self.baseline_s = t
        outcomes = []
        for config, (t, why) in zip(configs, results):
            if t is None:
                outcomes.append((TrialState.FAIL, None, {"error": why[:500]}))
            else:
                self.verified[canonical_config(config)] = ""
                outcomes.append((TrialState.COMPLETE, t, {}))
        return outcomes

    def time_baseline(self) -> float:
        if self.baseline_s is None:
            (t, why), = _lockstep(self.template, self.problem, [None], self.seed)
            if t is None:
                raise RuntimeError(f"baseline failed: {why}")
            self.baseline_s = t
        return self.baseline_s

    def verify(self, config: dict, seed: int) -> str:
        """Every measured config was checked against the reference on every rank before timing."""
        key = canonical_config(config)
        if key in self.verified:
            return self.verified[key]
        (t, why), = _lockstep(self.template, self.problem, [config], seed)
        return why if t is None else ""

    def close(self) -> None:
        pass


class MultiRankVerifier:
    """Verifies multi-rank winners under the interpreter: each at a shrunken shape in a world of
    VERIFY_WORLD ranks (the real world size if the config needs it), all pending ones of a round in
    one world of processes; verdicts kept in ``verdicts`` (per op and config, persistent through the
    store) and, for configs not checked because a world died or time ran out, in ``failed``."""

    def __init__(self, seed: int, spec: DeviceSpec, verdicts: Optional[Verdicts] = None,
                 log: Callable[[str], None] = lambda _: None):
        self.seed, self.spec, self.log = seed, spec, log
        self.verdicts = verdicts or Verdicts(None)
        self.failed: dict[tuple[str, str], str] = {}
        self.pending: dict[tuple[str, str], tuple[Template, Problem, dict]] = {}
        self.closed = ""                 # once set, the verdict of every config not yet verified

    def lookup(self, found: "Searched", config: dict) -> Optional[str]:
        key = (found.template.op, canonical_config(config))
        known = self.verdicts.get(found.template, key[1])
        if known is not None:
            return known
        if key in self.failed:
            return self.failed[key]
        if self.closed:
            return self.closed
        if key not in self.pending:
            run = portable(config)
            problem = found.problem
            small_world = dataclasses.replace(problem, world=min(problem.world, VERIFY_WORLD))
            if found.template.reject_reason(run, small_world, self.spec) is None:
                problem = small_world
            self.pending[key] = (found.template, shrink(found.template, problem, run, self.spec), run)
        return None

    def give_up(self, why: str) -> None:
        """Configs still pending get ``why`` as their verdict (they are not stored as winners)."""
        for key in self.pending:
            self.failed[key] = why
        self.pending.clear()
        self.closed = why

    def run(self) -> None:
        from tuneforge.world import spawn
        by_world: dict[int, list] = {}
        for key, (template, problem, config) in self.pending.items():
            by_world.setdefault(problem.world, []).append((key, template, problem, config))
        for world, batch in sorted(by_world.items()):
            self.log(f"      verifying {len(batch)} multi-rank config(s) under the interpreter in a world of "
                     f"{world} ranks ...")
            try:
                per_rank = spawn(_verify_worker, world, [(t.op, p.key, c) for _, t, p, c in batch], self.seed,
                                 timeout=600.0)
            except Exception as e:   # noqa: BLE001 - the whole world failed: none of its configs is trusted
                for key, *_rest in batch:
                    self.failed[key] = f"world of {world} failed: {_first_line(e)}"
                continue
            self.verdicts.put([(template, key[1], problem, next((r[i] for r in per_rank if r[i]), ""))
                               for i, (key, template, problem, _) in enumerate(batch)])
        self.pending.clear()


def _verify_worker(world, items: list, seed: int) -> list[str]:
    """On every rank: each (op, problem key, config) checked against its reference; '' when it matched."""
    from tuneforge.dsl.check import check
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.dsl.template import get
    heap = SymmetricHeap(world, max(heap_bytes(Problem.from_key(key)) for _, key, _ in items))
    ctx = heap.context()
    out = []
    try:
        for op, key, config in items:
            template, problem = get(op), Problem.from_key(key)
            try:
                inputs = template.make_inputs(problem, ctx.device, seed, ctx)
                res = check(template, problem, config, ctx=ctx, inputs=inputs)
                out.append("" if res.ok else f"wrong result at {key} on rank {world.rank}: {res.reason}")
            except Exception as e:   # noqa: BLE001
                out.append(f"failed at {key} on rank {world.rank}: {_first_line(e)}")
            world.barrier()
    finally:
        heap.close()
    return out


# --- the table -----------------------------------------------------------------------------------

def format_table(report: Report, width: Optional[int] = None, wide: bool = False) -> str:
    """The winners, sorted by op, then the other dims, then the token count.

    Compact (the default) fits ``width`` columns (the terminal's, 80 when it is not one): the problem
    as its op and the dims that tell that op's rows apart (dtype and world size only where they
    differ), the winner, its time, its speedup over the torch baseline and the trials; a cell too long
    for its column wraps onto the next line, nothing is cut. ``wide``: every column (the whole problem
    key, every role, baseline time, % of speed of light, source, rejected configs), one line each."""
    rows = sorted(report.rows, key=_row_order)
    if wide:
        cols = ("problem", "roles", "winner", "time", "baseline", "speedup", "%SOL", "source", "trials", "rejected")
        lines = [(r.problem, ",".join(r.roles), _winner_cell(r), _us(r.time_s), _us(r.baseline_s), _speedup(r),
                  f"{r.pct_sol:.0f}%" if r.pct_sol is not None else "-", r.source, str(r.n_trials), str(r.rejected))
                 for r in rows]
        widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]
        return "\n".join(_table_line(line, widths, left=3) for line in [cols, *lines])
    width = width or shutil.get_terminal_size((80, 24)).columns
    names = _short_names(rows)
    mixed = len({r.source for r in rows}) > 1
    cols = ("problem", "winner", "time", "speedup", "trials") + (("source",) if mixed else ())
    lines = [(names[r.problem], _winner_cell(r), _us(r.time_s), _speedup(r), str(r.n_trials))
             + ((r.source,) if mixed else ()) for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]
    room = width - sum(widths[2:]) - 2 * (len(cols) - 1)        # for problem and winner together
    if widths[0] + widths[1] > room:              # the winner wraps first, the problem only if it must
        widths[0] = min(widths[0], max(12, room - 20))
        widths[1] = max(12, room - widths[0])
    out = [_table_line(cols, widths, left=2)]
    for line in lines:
        cells = [textwrap.wrap(v, w, break_on_hyphens=False) or [""] for v, w in zip(line, widths)]
        for k in range(max(map(len, cells))):
            out.append(_table_line([c[k] if k < len(c) else "" for c in cells], widths, left=2))
    return "\n".join(out)


def _table_line(cells, widths, left: int) -> str:
    """The first ``left`` columns (text) left-aligned, the others right-aligned."""
    return "  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths))).rstrip()


def _winner_cell(r: Row) -> str:
    return f"FAILED: {r.note}" if r.status == "no-winner" else r.winner


def _speedup(r: Row) -> str:
    return f"{r.speedup:.2f}x" if r.speedup else "-"


def _row_order(r: Row) -> tuple:
    p = Problem.from_key(r.problem)
    return (r.op, tuple((k, v) for k, v in p.dims if k != "m"), p.shape.get("m", 0), p.dtype, p.world)


def _short_names(rows: list[Row]) -> dict[str, str]:
    """problem key -> op and the dims that differ among that op's rows (the token count always)."""
    problems = {r.problem: Problem.from_key(r.problem) for r in rows}
    by_op: dict[str, list[Problem]] = {}
    for p in problems.values():
        by_op.setdefault(p.op, []).append(p)
    tails = {(p.dtype, p.world) for p in problems.values()}
    names = {}
    for key, p in problems.items():
        same = by_op[p.op]
        dims = [f"{k}={v}" for k, v in p.dims if k == "m" or len({q.shape.get(k) for q in same}) > 1]
        tail = f" {p.dtype} w{p.world}" if len(tails) > 1 else ""
        names[key] = " ".join([p.op, *dims]) + tail
    return names


def _us(t: Optional[float]) -> str:
    return f"{t * 1e6:.2f}us" if t else "-"


def tune(plan: Plan, store: Store, options: Optional[TuneOptions] = None) -> Report:
    return Tuner(store, options).tune(plan)
