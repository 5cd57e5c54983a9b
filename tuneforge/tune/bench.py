"""The bench protocol: time a config, time the torch baseline, verify a winner.

Three benches keep it: ``CostModelBench`` predicts (no GPU, or a foreign target), ``GpuBench``
measures a single-rank problem on the local GPU, ``LockstepBench`` measures a multi-rank problem on
this machine's GPUs with every rank in lockstep. Every measured config is first run once against the
reference (``tuneforge.dsl.check.check``, the one run-and-compare); a config that fails is a FAIL
trial, never the end of the run.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from optuna.trial import TrialState

from tuneforge.dsl.check import check, interpreter_scale, propagated, split_out
from tuneforge.dsl.problem import Problem, canonical_config
from tuneforge.dsl.template import Template
from tuneforge.errors import ConfigRejected
from tuneforge.tune import costmodel
from tuneforge.dsl.devices import DeviceSpec
from tuneforge.tune.measure import time_calls

MULTIRANK_BATCH = 8        # configs measured per world of ranks (starting a world costs seconds)

Outcome = tuple[TrialState, Optional[float], dict]      # a trial's state, value and user attrs


class WrongResult(Exception):
    pass


def first_line(e: BaseException) -> str:
    """``Type: message`` in one line (a compiler error's last line, which names the cause)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines and type(e).__name__ == "CompilationError" else (lines[0] if lines else "")
    return f"{type(e).__name__}: {text}"[:500]


def outcome(evaluate: Callable[[dict], float], config: dict) -> Outcome:
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
        return TrialState.FAIL, None, {"error": first_line(e)}
    if not math.isfinite(value) or value <= 0:
        return TrialState.FAIL, None, {"error": f"non-positive or non-finite time {value!r}"}
    return TrialState.COMPLETE, value, {}


class Bench:
    """What the search and the winner's verification ask of a bench. ``batch`` configs are evaluated
    together; finished trials are written to the database every ``write_every`` (measured trials at
    once: a killed run loses at most the batch in flight; predictions are cheap)."""
    measured = True
    batch = 1
    write_every = 1

    def time_config(self, config: dict) -> float:
        raise NotImplementedError

    def evaluate_many(self, configs: list) -> list[Outcome]:
        return [outcome(self.time_config, c) for c in configs]

    def time_baseline(self) -> float:
        raise NotImplementedError

    def verify(self, config: dict, seed: int) -> str:
        """'' when the config matches the reference, else the reason."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class CostModelBench(Bench):
    """Times predicted by the cost model for ``spec``; a winner verified by ``verifier`` (the real
    kernel under Triton's interpreter at a shrunken shape, see tuneforge.tune.verify)."""
    measured = False
    write_every = 256

    def __init__(self, template: Template, problem: Problem, spec: DeviceSpec, verifier):
        self.template, self.problem, self.spec, self.verifier = template, problem, spec, verifier

    def time_config(self, config: dict) -> float:
        return costmodel.predict(self.template, self.problem, config, self.spec)

    def time_baseline(self) -> float:
        return costmodel.predict(self.template, self.problem, None, self.spec)

    def verify(self, config: dict, seed: int) -> str:
        return self.verifier.verify(self.template, self.problem, config, self.spec)


class GpuBench(Bench):
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
        self.slack = propagated(template, first)

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _check(self, inputs: dict, reference, config: dict, slack=None) -> str:
        res = check(self.template, self.problem, config, inputs=inputs, reference=reference, slack=slack)
        return "" if res.ok else res.reason

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
        why = self._check(self.inputs[0], self.reference, config, self.slack)
        if why:
            raise WrongResult(why)
        return self._time(lambda inp: self.template.launch(**inp, config=config))

    def time_baseline(self) -> float:
        return self._time(lambda inp: self.template.baseline(**split_out(inp)))

    def verify(self, config: dict, seed: int) -> str:
        """The config on fresh inputs (another seed) against the reference."""
        inputs = self.template.make_inputs(self.problem, self.device, seed, None)
        return self._check(inputs, self.template.reference(**split_out(inputs)), config)

    def close(self) -> None:
        self.inputs = self.reference = self.slack = None
        if self.cuda:
            self.torch.cuda.empty_cache()


# --- multi-rank measurement ------------------------------------------------------------------

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
        scale = interpreter_scale(inputs["out"].dtype)
        slack = propagated(template, inputs, scale)
        out = []
        for config in configs:
            try:
                if config is None:
                    fn = lambda: template.baseline(**split_out(inputs))  # noqa: E731
                else:
                    res = check(template, problem, config, ctx=ctx, inputs=inputs, reference=reference,
                                scale=scale, slack=slack)
                    if not res.ok:
                        out.append((None, f"wrong result on rank {world.rank}: {res.reason}"))
                        world.barrier()
                        continue
                    fn = lambda: template.launch(**inputs, config=config)  # noqa: E731
                out.append((time_calls([fn], barrier=world.barrier).median_s, ""))
            except Exception as e:   # noqa: BLE001 - reported as a FAIL trial
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                out.append((None, first_line(e)))
            world.barrier()
        return out
    finally:
        heap.close()


def lockstep(template: Template, problem: Problem, configs: list, seed: int,
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


class LockstepBench(Bench):
    """A multi-rank problem measured on this machine's GPUs: each batch of configs runs in one world
    of ranks in lockstep (the baseline with the first batch); the slowest rank's time counts."""
    batch = MULTIRANK_BATCH

    def __init__(self, template: Template, problem: Problem, seed: int):
        self.template, self.problem, self.seed = template, problem, seed
        self.baseline_s: Optional[float] = None
        self.verified: dict[str, str] = {}

    def evaluate_many(self, configs: list) -> list[Outcome]:
        ask = list(configs) + ([None] if self.baseline_s is None else [])
        try:
            results = lockstep(self.template, self.problem, ask, self.seed)
        except Exception as e:   # noqa: BLE001 - the world died: every config of the batch fails
            results = [(None, first_line(e))] * len(ask)
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
            (t, why), = lockstep(self.template, self.problem, [None], self.seed)
            if t is None:
                raise RuntimeError(f"baseline failed: {why}")
            self.baseline_s = t
        return self.baseline_s

    def verify(self, config: dict, seed: int) -> str:
        """Every measured config was checked against the reference on every rank before timing."""
        key = canonical_config(config)
        if key in self.verified:
            return self.verified[key]
        (t, why), = lockstep(self.template, self.problem, [config], seed)
        return why if t is None else ""
