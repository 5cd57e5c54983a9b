"""What every benchmark shares: device/version metadata, the results table, the JSON file."""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile

import torch


def metadata() -> dict:
    import triton
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        meta.update(device=p.name, sm_count=p.multi_processor_count, gpus=torch.cuda.device_count(),
                    cuda=torch.version.cuda, memory_gb=round(p.total_memory / 2**30, 1))
    else:
        meta.update(device="cpu (Triton interpreter; times are not GPU figures)", gpus=0)
    return meta


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def write_results(name: str, rows: list[dict], summary: dict | None = None, out_dir: str | None = None) -> str:
    """Write ``benchmarks/results/<name>-<device>-<date>.json`` (or under ``out_dir``); returns the path."""
    meta = metadata()
    out_dir = out_dir or os.environ.get("TUNEFORGE_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    dev = meta["device"].split(" (")[0].replace(" ", "_")
    path = os.path.join(out_dir, f"{name}-{dev}-{meta['date'][:10]}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"benchmark": name, "meta": meta, "summary": summary or {}, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return path


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
