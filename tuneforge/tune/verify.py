"""Verifying predicted winners: the real kernel run under Triton's interpreter at a shrunken shape
(``shrink``), single-rank ones one by one (``InterpreterVerifier``), multi-rank ones in worlds of
processes, all pending configs of a round together (``MultiRankVerifier``); every verdict kept per
op and config, in this process and in the database (``Verdicts``), so no kernel is checked twice."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Optional

from tuneforge.db.store import Store
from tuneforge.dsl.check import check, interpreter_scale
from tuneforge.dsl.problem import Problem, canonical_config
from tuneforge.dsl.template import Template, portable
from tuneforge.tune.bench import first_line, heap_bytes
from tuneforge.dsl.devices import DeviceSpec
from tuneforge.tune.report import describe_config

KEEP_DIMS = ("head_dim",)          # never shrunk for interpreter verification
SMALL_DIMS = (3, 8, 24, 64)        # sizes a dim is cut to for interpreter verification (odd ones mask)
SHRINK_TILES = (1, 2, 3, 4, 5, 8)  # a dim's caps in the config's tiles, before SMALL_DIMS
VERIFY_WORLD = 2                   # ranks multi-rank winners are verified with under the interpreter


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

    def verify(self, template: Template, problem: Problem, config: dict, spec: DeviceSpec) -> str:
        """'' when the kernel matched its reference, else the reason."""
        import torch
        config_key = canonical_config(config)
        known = self.verdicts.get(template, config_key)
        if known is not None:
            return known
        run = portable(config)
        small = shrink(template, problem, run, spec)
        self.log(f"      verifying {describe_config(config)} under the interpreter at {small.key} ...")
        try:
            inputs = template.make_inputs(small, torch.device("cpu"), self.seed, None)
            res = check(template, small, run, inputs=inputs, scale=interpreter_scale(inputs["out"].dtype))
            why = "" if res.ok else f"wrong result at {small.key}: {res.reason}"
        except Exception as e:   # noqa: BLE001 - any failure disqualifies the config
            why = f"failed at {small.key}: {first_line(e)}"
        self.verdicts.put([(template, config_key, small, why)])
        return why


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

    def lookup(self, template: Template, problem: Problem, config: dict) -> Optional[str]:
        """The verdict of ``config`` at ``problem``: '' ok, the reason, or None: queued for ``run``."""
        key = (template.op, canonical_config(config))
        known = self.verdicts.get(template, key[1])
        if known is not None:
            return known
        if key in self.failed:
            return self.failed[key]
        if self.closed:
            return self.closed
        if key not in self.pending:
            run = portable(config)
            small_world = dataclasses.replace(problem, world=min(problem.world, VERIFY_WORLD))
            if template.reject_reason(run, small_world, self.spec) is None:
                problem = small_world
            self.pending[key] = (template, shrink(template, problem, run, self.spec), run)
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
                    self.failed[key] = f"world of {world} failed: {first_line(e)}"
                continue
            self.verdicts.put([(template, key[1], problem, next((r[i] for r in per_rank if r[i]), ""))
                               for i, (key, template, problem, _) in enumerate(batch)])
        self.pending.clear()


def _verify_worker(world, items: list, seed: int) -> list[str]:
    """On every rank: each (op, problem key, config) checked against its reference; '' when it matched."""
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
                out.append(f"failed at {key} on rank {world.rank}: {first_line(e)}")
            world.barrier()
    finally:
        heap.close()
    return out

