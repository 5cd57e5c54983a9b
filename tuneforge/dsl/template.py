"""Templates: a parametrized kernel family for one op, and the registry that finds them by op name.

Every ``kernels/<op>.py`` builds one ``Template`` and calls ``register``. The contract:

- ``make_inputs(problem, device, seed, ctx)`` -> dict of tensors including ``out`` (preallocated;
  the checker NaN-poisons it). ``ctx`` is ``None`` for single-rank ops and a ``tuneforge.world.Rank``-like
  object (world + heap) for multi-rank ops. Inputs are deterministic in (problem, seed, rank), so
  every rank can rebuild its peers' inputs for the reference.
- ``launch(**inputs, config=...)`` writes ``out`` and returns it (the op's public launcher).
- ``reference(**inputs_without_out)`` -> the expected output in fp32/fp64 math.
- ``side_outputs(**inputs_without_out)`` (optional) -> ``{input name: expected tensor}``: inputs the
  launch also writes (a fused store: rope_qk_norm's KV cache), expected in fp32/fp64 with NaN where
  nothing is written, whatever the tensors hold before the launch (the checker NaN-poisons them).
- ``baseline(**inputs_without_out)`` -> what a torch user runs today (cuBLAS, NCCL, ...).
- ``space(problem)`` -> ``Space``; ``default_config(problem, device_spec)`` -> dict.
- ``constraints``: ``fn(config, problem, device_spec) -> str | None`` (a reason to reject).
- ``work(problem)`` -> ``(flops, bytes)`` moved at the minimum, for % of speed of light.
- ``cost(problem, config, device_spec)`` -> predicted seconds (``config=None``: the baseline),
  the cost model's estimate used when measuring is impossible.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from tuneforge.dsl.problem import Problem
from tuneforge.dsl.space import Space

Constraint = Callable[[dict, Problem, Any], Optional[str]]

# Config flags that select a hardware-only path (TMA descriptors, warp specialization). Triton's
# interpreter and GPUs without the feature run the same tiles with the flag off.
FEATURE_FLAGS = ("tma", "use_tma", "warp_specialize")


def portable(config: dict) -> dict:
    """``config`` with every hardware feature flag off: the same tiles on the portable path."""
    return {k: (False if k in FEATURE_FLAGS else v) for k, v in config.items()}


def flags_off_where_absent(space, config: dict) -> dict:
    """``config`` with the feature flags of ``space`` it lacks set off: a config stored (or built) before
    a flag existed ran without that hardware path."""
    out = dict(config)
    for p in space.params:
        if p.name in FEATURE_FLAGS and p.name not in out and p.active(out):
            out[p.name] = False
    return out


@dataclass
class Template:
    op: str
    space: Callable[[Problem], Space]
    make_inputs: Callable[..., dict]
    launch: Callable[..., Any]
    reference: Callable[..., Any]
    baseline: Callable[..., Any]
    default_config: Callable[[Problem, Any], dict]
    work: Callable[[Problem], tuple[float, float]]
    cost: Optional[Callable[[Problem, Optional[dict], Any], float]] = None
    constraints: Sequence[Constraint] = field(default_factory=tuple)
    multi_rank: bool = False
    doc: str = ""
    module: str = ""
    # configs the tuner tries first, after the default (a curated portfolio; None: the default only)
    seeds: Optional[Callable[[Problem, Any], list]] = None
    # inputs the launch writes besides ``out`` and their expected values (None: ``out`` only; see above)
    side_outputs: Optional[Callable[..., dict]] = None
    # per output element, the error a correct launch may add beyond the table through a nonlinear epilogue
    # (None: the table alone): called with the table's atol for the output (times the check's scale) and
    # the inputs
    propagated_error: Optional[Callable[..., Optional[torch.Tensor]]] = None
    # a config stored before parameters were added -> the same config as it ran then (None: the space's
    # absent feature flags off, ``flags_off_where_absent``, which ``served`` applies after this)
    upgrade: Optional[Callable[[dict], dict]] = None

    def __post_init__(self):
        if not self.module:
            self.module = inspect.getmodule(self.launch).__name__

    def served(self, problem: Problem, config: dict) -> dict:
        """A stored ``config`` as this template's space serves it: ``upgrade``, then absent flags off."""
        return flags_off_where_absent(self.space(problem), self.upgrade(config) if self.upgrade else config)

    def reject_reason(self, config: dict, problem: Problem, device) -> Optional[str]:
        """The first constraint a config violates, or None. Runs before anything compiles."""
        try:
            self.space(problem).validate(config)
        except ValueError as e:
            return str(e)
        for c in self.constraints:
            why = c(config, problem, device)
            if why:
                return why
        return None

    @property
    def source_modules(self) -> list[str]:
        """The op's module and every kernel module it draws on (``kernels/_*.py`` helpers and other op
        files whose kernels it runs, e.g. gemm's tile loop in the fused ops), directly or transitively."""
        seen, todo = set(), [self.module]
        while todo:
            name = todo.pop()
            seen.add(name)
            todo += [m for m in _kernel_imports(inspect.getsource(importlib.import_module(name))) if m not in seen]
        return sorted(seen)

    @property
    def source_hash(self) -> str:
        """Hash of the sources of ``source_modules``: a stored winner whose hash differs is stale."""
        src = "".join(inspect.getsource(importlib.import_module(n)) for n in self.source_modules)
        return hashlib.sha256(src.encode()).hexdigest()[:16]


_REGISTRY: dict[str, Template] = {}
_loaded = False


@functools.lru_cache(maxsize=None)
def _kernel_imports(source: str) -> frozenset[str]:
    """The ``tuneforge.kernels.*`` modules a module's source imports (read from its import statements,
    so the answer is the same under the interpreter, where jitted functions belong to no module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "tuneforge.kernels" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return frozenset(n for n in found if n.startswith("tuneforge.kernels."))


def register(template: Template) -> Template:
    if template.op in _REGISTRY and _REGISTRY[template.op].module != template.module:
        raise ValueError(f"op {template.op!r} registered twice ({_REGISTRY[template.op].module}, {template.module})")
    _REGISTRY[template.op] = template
    return template


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import tuneforge.kernels as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _loaded = True


def get(op: str) -> Template:
    if op not in _REGISTRY:
        _load_all()
    if op not in _REGISTRY:
        raise KeyError(f"no template for op {op!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def all_templates() -> dict[str, Template]:
    _load_all()
    return dict(_REGISTRY)
