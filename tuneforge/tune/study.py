"""One problem's Optuna study: opened in the tuning database (created if new, resumed if a run was
killed: only finished trials are ever written, so nothing half-done survives and nothing finished is
lost), its trials replayed into a fast in-memory study whose seeded TPE sampler proposes the next
configs, and the search that asks, filters, evaluates (on a bench) and tells until the trial budget
is spent. Trials reach the database through Optuna's public ``add_trials``, which numbers them under
the storage's own locking, so several tuners can share one database."""
from __future__ import annotations

import time
from typing import Optional

import optuna
from optuna.trial import TrialState

from tuneforge.dsl.devices import DeviceSpec
from tuneforge.dsl.problem import Problem, canonical_config
from tuneforge.dsl.template import Template
from tuneforge.tune.bench import Bench, Outcome
from tuneforge.tune.report import count_trials

REJECT_CAP = 4             # asks per problem stop at REJECT_CAP x trials (rejected configs are cheap)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _enumerate_small(space, limit: int) -> Optional[list[dict]]:
    """Every config of a space with at most ``limit`` configs, else None."""
    out = []
    for c in space.enumerate():
        out.append(c)
        if len(out) > limit:
            return None
    return out


class Study:
    """``stored``: the study in the tuning database and ``history``, its finished trials; ``live``
    (after ``replay``): the in-memory study the sampler works on; ``unwritten``: trials told to
    ``live`` and not yet written to ``stored``."""

    def __init__(self, storage, name: str):
        self.name = name
        self.stored = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                          load_if_exists=True)
        self.history = [t for t in self.stored.get_trials(deepcopy=False) if t.state.is_finished()]
        self.live: Optional[optuna.Study] = None
        self.unwritten: list = []
        self.told = 0                      # trials told in this run, written or not

    def replay(self, seed: int, n_startup_trials: int, constant_liar: bool) -> None:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials,
                                             constant_liar=constant_liar)
        self.live = optuna.create_study(direction="minimize", sampler=sampler)
        self.live.add_trials(self.history)

    def tell(self, trial, outcome: Outcome, repeat: bool = False) -> bool:
        """True when the trial counts as evaluated (count_trials)."""
        state, value, attrs = outcome
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if repeat:
            trial.set_user_attr("repeat", True)
        self.live.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        self.unwritten.append(self.live.get_trials(deepcopy=False)[trial.number])
        self.told += 1
        return state != TrialState.PRUNED

    def write(self) -> None:
        self.stored.add_trials(self.unwritten)
        self.unwritten = []

    def record_baseline(self, baseline_s: float) -> None:
        if self.stored.user_attrs.get("baseline_s") != baseline_s:
            self.stored.set_user_attr("baseline_s", baseline_s)

    def finished(self) -> list:
        """The live study's finished trials (not the queued ones), the stored history first."""
        return [t for t in self.live.get_trials(deepcopy=False) if t.state.is_finished()]

    def candidates(self) -> list[tuple[dict, float]]:
        """(config, its best time) of every config that completed."""
        best: dict[str, tuple[dict, float]] = {}
        for t in self.finished():
            if t.state == TrialState.COMPLETE and t.value is not None:
                key = canonical_config(t.params)
                if key not in best or t.value < best[key][1]:
                    best[key] = (dict(t.params), float(t.value))
        return list(best.values())

    def counts(self) -> tuple[int, int, int]:
        """(trials, new trials, rejected) as count_trials counts them, all runs and this one."""
        trials = self.finished()
        n_trials, rejected = count_trials(trials)
        return n_trials, count_trials(trials[len(self.history):])[0], rejected

    def search(self, template: Template, problem: Problem, spec: DeviceSpec, bench: Bench, trials: int,
               deadline: Optional[float]) -> None:
        """Ask, filter, evaluate and tell until ``trials`` configs were evaluated (counting the stored
        history); ``bench.batch`` configs are evaluated together (one world of ranks per batch for
        multi-rank measuring), finished trials written every ``bench.write_every``. Past ``deadline``
        the search stops once a first trial of the study exists."""
        space = template.space(problem)
        evaluated = count_trials(self.history)[0]
        asks = len(self.history)                 # the cap on asks counts the stored trials too
        cap = REJECT_CAP * trials
        if evaluated >= trials or asks >= cap:
            return
        results: dict[str, Outcome] = {}
        for t in self.history:
            results.setdefault(canonical_config(t.params), (t.state, t.value, dict(t.user_attrs)))
        configs = _enumerate_small(space, trials)
        if configs is None:       # the default, then the template's portfolio, then the sampler
            configs = [template.default_config(problem, spec)]
            configs += template.seeds(problem, spec) if template.seeds else []
        queued = set(results)
        for c in configs:
            c = {k: v for k, v in c.items() if k in space.names}
            key = canonical_config(c)
            if key not in queued and len(queued) - len(results) < trials - evaluated:
                queued.add(key)
                self.live.enqueue_trial(c, skip_if_exists=True)
        min_new = 1 if not self.history else 0

        while evaluated < trials and asks < cap:
            if deadline is not None and time.monotonic() > deadline and self.told >= min_new:
                break
            fresh: dict[str, tuple] = {}            # key -> (config, [trials asking for it])
            while len(fresh) < bench.batch and asks < cap and evaluated + len(fresh) < trials:
                asks += 1
                trial = self.live.ask()
                config = space.sample(trial)
                key = canonical_config(config)
                if key in results:                  # TPE proposes repeats in small spaces: reuse
                    evaluated += self.tell(trial, results[key], repeat=True)
                elif key in fresh:
                    fresh[key][1].append(trial)
                else:
                    reason = template.reject_reason(config, problem, spec)
                    if reason:                      # rejected before anything compiles
                        results[key] = (TrialState.PRUNED, None, {"reason": reason})
                        self.tell(trial, results[key])
                    else:
                        fresh[key] = (config, [trial])
            if fresh:
                outcomes = bench.evaluate_many([config for config, _ in fresh.values()])
                for (key, (config, asked)), outcome in zip(fresh.items(), outcomes):
                    results[key] = outcome
                    for i, trial in enumerate(asked):
                        evaluated += self.tell(trial, outcome, repeat=i > 0)
            if len(self.unwritten) >= bench.write_every:
                self.write()
        self.write()
