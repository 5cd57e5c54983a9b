"""The tuner: one Optuna study per (problem, environment), winners verified and stored.

For every planned problem with a template:

1. Its study is opened in the tuning database, resumed if a run was killed, and searched
   (tuneforge.tune.study): the template's default config first, a space no larger than the trial
   budget enumerated, then a seeded TPE sampler.
2. Each config is checked against the template's constraints before anything compiles (rejected:
   a PRUNED trial with the reason in user attr ``reason``), then timed on a bench
   (tuneforge.tune.bench): measured on the local GPU or on every rank in lockstep (output checked
   against the reference first; compile errors, OOM and wrong results are FAIL trials with user
   attr ``error``, never the end of the run) or predicted by the cost model.
3. The torch baseline is timed the same way and is always a candidate: the winner is the fastest
   of trials and baseline, where everything within ``tie_tolerance`` of the best counts as a tie won
   by the baseline, else by the canonically smallest config, so reruns agree.
4. A kernel winner is verified against the reference before it is stored: by its bench on fresh
   inputs; predicted ones by running the real kernel under Triton's interpreter at a shrunken shape
   (tuneforge.tune.verify, once per op and config); multi-rank ones of the whole plan in as few
   worlds of processes as possible, after every problem was searched.

Budgets: ``trials`` per problem (evaluated configs; rejected ones come on top, up to a cap) and
``budget_s`` in total, shared out over the problems still to tune; a problem reached once it is spent
is skipped (not tuned: dispatch runs its torch baseline), so a tune ends within one problem's search
of its budget. Multi-rank problems are measured
only where this machine has a GPU per rank; otherwise (and for every problem under the cost model)
their times are predicted and stored as source "predicted" in the target's predicted environment.
The rows, the report and the table are tuneforge.tune.report's.
"""
from __future__ import annotations

import functools
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Optional, TextIO

from tuneforge.db.environment import Environment
from tuneforge.db.store import Store, Winner
from tuneforge.dsl.devices import DEFAULT_TARGET, DeviceSpec, local_device, spec as lookup_spec
from tuneforge.dsl.problem import Problem
from tuneforge.dsl.template import Template
from tuneforge.engine.lookup import untuned_serving
from tuneforge.errors import InputError
from tuneforge.tune import costmodel
from tuneforge.tune.bench import Bench, CostModelBench, GpuBench, LockstepBench, first_line
from tuneforge.tune.measure import percent_of_light
from tuneforge.tune.plan import Plan, PlanItem
from tuneforge.tune.report import Report, Row, count_trials, describe_config, progress_text, trials_text
from tuneforge.tune.study import Study
from tuneforge.tune.verify import InterpreterVerifier, MultiRankVerifier, Verdicts

BASELINE = {"baseline": True}
DEFAULT_TRIALS = {"measure": 40, "costmodel": 16}
MIN_PROBLEM_S = 1.0        # a problem gets at least this share of a total budget
VERIFY_PICKS = 1           # multi-rank candidates per problem verified in the first world (a failure queues the next)
VERIFY_ROUNDS = 3          # worlds started for multi-rank verification before giving up


@dataclass
class TuneOptions:
    target: Optional[str] = None          # a DeviceSpec name; None: the local GPU, else DEFAULT_TARGET
    backend: Optional[str] = None         # "measure" | "costmodel" | None: measure where the target is local
    trials: Optional[int] = None          # evaluated configs per problem (default by backend)
    budget_s: Optional[float] = None      # wall-clock budget for the whole plan
    started: Optional[float] = None       # time.monotonic() the budget counts from (None: tune()'s start)
    problem_budget_s: Optional[float] = None   # and for any one problem
    seed: int = 0
    tie_tolerance: float = 0.02
    verify: bool = True
    progress: Optional[TextIO] = field(default_factory=lambda: sys.stderr)
    # called after each problem with the report of those finished so far (complete=False): the CLI keeps
    # its summary JSON current, so a tune cut short (killed, Ctrl-C, a device limit) leaves what it measured
    on_progress: Optional[Callable[[Report], None]] = None


@dataclass
class Searched:
    """A searched problem waiting for its winner to be chosen, verified and stored."""
    item: PlanItem
    template: Template
    problem: Problem
    env: Environment
    bench: Bench
    study_name: str
    pool: list                       # (config, seconds), the baseline included
    baseline_s: float
    n_trials: int                    # as Row's
    new: int
    rejected: int
    notes: list = field(default_factory=list)


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


def _problem_seed(seed: int, problem: Problem) -> int:
    return (seed * 1_000_003 + zlib.crc32(problem.key.encode())) % 2**31


def _multirank_measure_available() -> bool:
    """Lockstep multi-rank measuring needs the world module (tuneforge.world)."""
    try:
        import tuneforge.world  # noqa: F401
    except ImportError:
        return False
    return True


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
        start = time.monotonic() if self.options.started is None else self.options.started
        tp = plan.tp
        run_env = self.env(tp, self.backend == "measure")
        self.store.add_plan(plan.model, plan.tp, plan.pairs())
        from tuneforge.dsl.template import _REGISTRY
        rows: list[Optional[Row]] = []
        deferred: list[tuple[int, Searched]] = []       # multi-rank winners verified together at the end
        todo = plan.tunable
        n = len(plan.items)

        def report(complete: bool) -> Report:      # of the problems finished so far (deferred ones wait)
            return Report(plan.model, tp, self.spec.name, self.backend, self.store.url, run_env.fingerprint,
                          [r for r in rows if r is not None], time.monotonic() - start, n, run_env.to_dict(),
                          self.verdicts.ran, complete=complete)
        done_tunable = 0
        for i, item in enumerate(plan.items, 1):
            t0 = time.monotonic()
            left = None if self.options.budget_s is None else self.options.budget_s - (time.monotonic() - start)
            if item.baseline_only:
                rows.append(self._baseline_only_row(item))
            elif left is not None and left <= 0:      # the budget is a promise: the rest stay untuned
                rows.append(Row(item.key, item.problem.op, list(item.roles), "skipped", None, None, None, None,
                                None, "measured" if self.measurable(item.problem) else "predicted",
                                note=f"budget {self.options.budget_s:.0f}s spent: "
                                     f"{untuned_serving(item.problem)}"))
            else:
                deadline = None
                if left is not None:
                    share = max(MIN_PROBLEM_S, left / max(1, len(todo) - done_tunable))
                    deadline = time.monotonic() + share
                if self.options.problem_budget_s is not None:
                    own = time.monotonic() + self.options.problem_budget_s
                    deadline = own if deadline is None else min(deadline, own)
                done_tunable += 1
                found = self.search_problem(item, _REGISTRY[item.problem.op], tp, deadline)
                rows.append(self._settle(found))
                if rows[-1] is None:
                    deferred.append((len(rows) - 1, found))
                    self._log(f"[{i:>{len(str(n))}}/{n}] {item.key}  {trials_text(found.n_trials, found.rejected, found.new)}"
                              f" searched; verified with the other multi-rank winners at the end")
                    continue
            r = rows[-1]
            self._log(f"[{i:>{len(str(n))}}/{n}] {r.problem}  {progress_text(r)}  {time.monotonic() - t0:.1f}s")
            if self.options.on_progress is not None:
                self.options.on_progress(report(complete=False))
        if deferred:
            t0 = time.monotonic()
            for (index, _), row in zip(deferred, self._finish_multirank([found for _, found in deferred])):
                rows[index] = row
                self._log(f"[verified] {row.problem}  {progress_text(row)}")
            self._log(f"multi-rank winners verified under the interpreter in {time.monotonic() - t0:.1f}s")
        return report(complete=True)

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
        row = self._settle(found)
        return row if row is not None else self._finish_multirank([found])[0]

    def _settle(self, found) -> Optional[Row]:
        """The row of a searched problem, or None for a predicted multi-rank one: its verification
        waits for a world of processes that verifies all such winners together."""
        if isinstance(found, Row):
            return found
        if found.problem.world > 1 and not found.bench.measured and self.options.verify:
            return None
        return self.finish(found, lambda config: found.bench.verify(config, self.options.seed + 1))

    def _finish_multirank(self, searched: list[Searched]) -> list[Row]:
        """Verify the multi-rank winners (and their likely runners-up, so a failure costs no new
        world) in as few worlds of processes as possible, then store them."""
        verifier = MultiRankVerifier(self.options.seed, self.spec, self.verdicts, self._log)
        lookups = [functools.partial(verifier.lookup, found.template, found.problem) for found in searched]
        for found, lookup in zip(searched, lookups):
            for config in self.picks(found.pool, VERIFY_PICKS):
                lookup(config)
        rows: list[Optional[Row]] = [None] * len(searched)

        def finish_verified() -> None:
            for i, (found, lookup) in enumerate(zip(searched, lookups)):
                if rows[i] is None:
                    rows[i] = self.finish(found, lookup)
        for _ in range(VERIFY_ROUNDS):
            verifier.run()
            finish_verified()
            if not verifier.pending:
                break
        verifier.give_up(f"not verified within {VERIFY_ROUNDS} worlds of processes")
        finish_verified()
        return rows

    def _bench(self, template: Template, problem: Problem, measured: bool) -> Bench:
        if not measured:
            return CostModelBench(template, problem, self.spec, self.verifier)
        if problem.world == 1:
            return GpuBench(template, problem, self.spec, self.options.seed)
        return LockstepBench(template, problem, self.options.seed)

    def search_problem(self, item: PlanItem, template: Template, tp: int, deadline: Optional[float] = None):
        """Run the study; returns what ``finish`` needs (a Row if the problem could not be searched)."""
        problem = item.problem
        measured = self.measurable(problem)
        env = self.env(tp, measured)
        study_name = self.store.study_name(problem, env)
        study = bench = None
        try:
            study = Study(self.storage, study_name)
            # several configs in flight at once (multi-rank batches): TPE lies about the pending ones
            study.replay(_problem_seed(self.options.seed, problem), max(4, min(10, self.trials // 3)),
                         constant_liar=measured and problem.world > 1)
            bench = self._bench(template, problem, measured)
            study.search(template, problem, self.spec, bench, self.trials, deadline)
            baseline_s = bench.time_baseline()
            study.record_baseline(baseline_s)
        except Exception as e:   # noqa: BLE001 - a problem that cannot be tuned must not stop the plan
            if bench is not None:
                bench.close()
            elif measured and problem.world == 1:
                import torch
                torch.cuda.empty_cache()       # what a failed set-up (e.g. out of memory) left behind
            n_trials, rejected = count_trials(study.history if study is not None else [])
            return Row(problem.key, problem.op, list(item.roles), "no-winner", None, None, None, None, None,
                       "measured" if measured else "predicted", n_trials, rejected=rejected, study_name=study_name,
                       note=first_line(e))
        n_trials, new, rejected = study.counts()
        return Searched(item, template, problem, env, bench, study_name,
                        study.candidates() + [(dict(BASELINE), baseline_s)], baseline_s, n_trials, new, rejected)

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

    def finish(self, found: Searched, verify: Callable[[dict], Optional[str]]) -> Optional[Row]:
        """Choose the winner, verify it (``verify`` -> '' ok, a reason, or None: not known yet) and
        store it. A config that fails drops out and the next pick is tried."""
        item, problem, template = found.item, found.problem, found.template
        while True:
            config, time_s = choose(found.pool, self.options.tie_tolerance)
            if config.get("baseline") or not self.options.verify:
                break
            try:
                why = verify(config)
            except Exception as e:   # noqa: BLE001 - a winner that cannot even run is not a winner
                why = first_line(e)
            if why is None:
                return None                       # verdict pending (multi-rank batch)
            if not why:
                break
            found.notes.append(f"{describe_config(config)} failed verification: {why}")
            found.pool = [(c, v) for c, v in found.pool if c is not config]
        found.bench.close()
        flops, nbytes = template.work(problem)
        pct = percent_of_light(time_s, flops, nbytes, self.spec, problem.dtype)
        source = "measured" if found.bench.measured else "predicted"
        w = Winner(problem=problem, env=found.env, config=config, time_s=time_s, baseline_s=found.baseline_s,
                   speedup=found.baseline_s / time_s, pct_sol=pct, source=source,
                   template_hash=template.source_hash, study_name=found.study_name, n_trials=found.n_trials,
                   created_at=datetime.now(timezone.utc))
        self.store.record_winner(w)
        return Row(problem.key, problem.op, list(item.roles), "tuned", config, time_s, found.baseline_s, w.speedup,
                   pct, source, found.n_trials, found.new, found.rejected, found.study_name, "; ".join(found.notes))


def tune(plan: Plan, store: Store, options: Optional[TuneOptions] = None) -> Report:
    return Tuner(store, options).tune(plan)
