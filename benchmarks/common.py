"""What every benchmark shares: device/version metadata, the results table, the JSON file."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

from tuneforge.results import print_table  # noqa: F401  (re-exported for the scripts)
from tuneforge.results import write_results as _write_results


def write_results(name: str, rows: list[dict], summary: dict | None = None, out_dir: str | None = None) -> str:
    """Write ``benchmarks/results/<name>-<device>-<date>.json`` (or under ``out_dir``); returns the path."""
    out_dir = out_dir or os.environ.get("TUNEFORGE_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
    return _write_results(name, rows, summary, out_dir)


def source_variant(module, name: str, replacements: list[tuple[str, str]]):
    """A copy of kernel ``module`` with each ``(old, new)`` of ``replacements`` made in its source (its
    template not registered), imported from a file of its own: triton.jit reads a kernel's source file.
    Stops with a clear message where an ``old`` is no longer in the source (the benchmark needs updating)."""
    source = open(module.__file__).read().replace("TEMPLATE = register(Template(", "TEMPLATE = (Template(")
    for old, new in replacements:
        if old not in source:
            sys.exit(f"{os.path.basename(sys.argv[0])}: {module.__name__} changed; its variant '{name}' needs updating")
        source = source.replace(old, new)
    stem = f"{module.__name__.rsplit('.', 1)[-1]}_{name}"
    path = os.path.join(tempfile.mkdtemp(), f"{stem}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(stem, path)
    variant = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = variant
    spec.loader.exec_module(variant)
    return variant


class RegisterCount:
    """Stands in for a Triton kernel (``module.kernel = RegisterCount(module.kernel)``) and keeps the
    register count per thread of its last launch."""

    def __init__(self, kernel):
        self.kernel, self.registers = kernel, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.kernel[grid](*args, **kwargs)
            self.registers = compiled.n_regs
            return compiled
        return launch
