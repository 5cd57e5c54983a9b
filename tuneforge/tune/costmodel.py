"""The cost model: predicted seconds for an op at a shape under a config, on a target device.

Used where measuring is impossible (no GPU here, or ``--target`` is not the local device).
``predict(template, problem, config, spec)`` dispatches to the op's template's ``cost`` (the
registered template when none is passed); each template prices itself with the shared primitives
of ``tuneforge.dsl.roofline`` (roofline, alpha-beta, overlap, GEMM tiles, elementwise tiles).
This module keeps only the fallback no template owns: the roofline of a template's declared work
when it has no ``cost``. ``config=None`` is the baseline a torch user gets (cuBLAS-like tile
choice, eager elementwise passes, NCCL-like collectives).
Everything is closed-form arithmetic: deterministic and microseconds per call, so the tuner can
call it for every trial.
"""
from __future__ import annotations

from typing import Mapping, Optional

from tuneforge.dsl import template as registry
from tuneforge.dsl.problem import Problem
from tuneforge.dsl.roofline import roofline
from tuneforge.tune.plan import registered_ops


def _registered(op: str):
    """The template registered for ``op``, or None: no template, or its module does not import
    (the plan marks such ops baseline-only the same way). An op already registered skips the module
    scan (the tuner calls this for every trial)."""
    if op in registry._REGISTRY:
        return registry._REGISTRY[op]
    return registry.get(op) if op in registered_ops() else None


def predict(template, problem: Problem, config: Optional[Mapping], spec) -> float:
    """Predicted seconds for ``problem`` under ``config`` on ``spec`` (``config`` None or
    ``{"baseline": true}``: the torch baseline). ``template`` None: the op's registered template."""
    if config is not None and config.get("baseline"):
        config = None
    if template is None:
        template = _registered(problem.op)
    if template is None:
        raise KeyError(f"no cost model for op {problem.op!r}")
    if template.cost is not None:
        return float(template.cost(problem, dict(config) if config is not None else None, spec))
    flops, nbytes = template.work(problem)      # a template without a cost: the roofline of its declared work
    efficiency = 0.8 if config is None else 0.7
    return roofline(flops, nbytes, spec, problem.dtype, efficiency=efficiency, mem_efficiency=efficiency)
