"""Search spaces: finite parameters, conditional sub-spaces, Optuna sampling and enumeration."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence


@dataclass(frozen=True)
class Param:
    """One tunable parameter with a finite list of choices.

    ``when`` makes it conditional: it exists only if every named parameter takes one of the
    listed values (e.g. ``when={"strategy": ("ag_gemm",)}``).
    """

    name: str
    choices: tuple
    when: Mapping[str, tuple] = field(default_factory=dict)

    def active(self, config: Mapping[str, Any]) -> bool:
        return all(k in config and config[k] in v for k, v in self.when.items())


def categorical(name: str, choices: Sequence, when: Mapping[str, Sequence] | None = None) -> Param:
    return Param(name, tuple(choices), {k: tuple(v) for k, v in (when or {}).items()})


def integer(name: str, low: int, high: int, step: int = 1, when=None) -> Param:
    return categorical(name, range(low, high + 1, step), when)


def pow2(name: str, low: int, high: int, when=None) -> Param:
    choices, v = [], low
    while v <= high:
        choices.append(v)
        v *= 2
    return categorical(name, choices, when)


class Space:
    """An ordered list of parameters; a parameter's conditions may only name earlier ones."""

    def __init__(self, *params: Param):
        seen = set()
        for p in params:
            missing = set(p.when) - seen
            if missing:
                raise ValueError(f"parameter {p.name!r} is conditional on later/unknown {sorted(missing)}")
            if p.name in seen:
                raise ValueError(f"duplicate parameter {p.name!r}")
            seen.add(p.name)
        self.params = params

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def sample(self, trial) -> dict:
        """Draw a config through an Optuna trial (define-by-run: inactive parameters are not asked)."""
        config: dict = {}
        for p in self.params:
            if p.active(config):
                config[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        return config

    def enumerate(self) -> Iterator[dict]:
        """Every valid config (conditional parameters expanded only where active)."""
        def rec(i: int, config: dict):
            if i == len(self.params):
                yield dict(config)
                return
            p = self.params[i]
            if not p.active(config):
                yield from rec(i + 1, config)
                return
            for c in p.choices:
                config[p.name] = c
                yield from rec(i + 1, config)
                del config[p.name]
        yield from rec(0, {})

    def size(self) -> int:
        return sum(1 for _ in self.enumerate())

    def validate(self, config: Mapping[str, Any]) -> dict:
        """Check a config against the space; returns only its active parameters."""
        out: dict = {}
        for p in self.params:
            if p.active(out):
                if p.name not in config:
                    raise ValueError(f"config is missing parameter {p.name!r}")
                if config[p.name] not in p.choices:
                    raise ValueError(f"{p.name}={config[p.name]!r} is not one of {list(p.choices)}")
                out[p.name] = config[p.name]
        extra = set(config) - set(out)
        if extra:
            raise ValueError(f"config has parameters not active in this space: {sorted(extra)}")
        return out

    def product(self) -> Iterator[tuple]:  # for tests of small unconditional spaces
        return itertools.product(*(p.choices for p in self.params))
