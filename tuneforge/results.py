"""What every benchmark result carries (device, versions, date, the exact command), its table and its
JSON file. Here, not in benchmarks/, so the installed `tuneforge bench` commands write the same files
as the repository's benchmark scripts (benchmarks/common.py re-exports these)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys

import torch

NOT_A_GPU_FIGURE = "cpu (Triton interpreter; times are not GPU figures)"


def metadata(command: list[str] | None = None) -> dict:
    """``command``: the argv to record (default ``sys.argv``, its script as a relative path)."""
    import triton
    argv = command if command is not None else [os.path.relpath(sys.argv[0])] + sys.argv[1:]
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in argv),
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
        meta.update(device=NOT_A_GPU_FIGURE, gpus=0)
    return meta


def print_table(rows: list[dict], columns: list[str], file=None) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)), file=file)
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)), file=file)


def write_results(name: str, rows: list[dict], summary: dict | None, out_dir: str,
                  command: list[str] | None = None) -> str:
    """Write ``<out_dir>/<name>-<device>-<date>.json`` (atomically: no half-written file); returns the path."""
    meta = metadata(command)
    os.makedirs(out_dir, exist_ok=True)
    dev = meta["device"].split(" (")[0].replace(" ", "_")
    path = os.path.join(out_dir, f"{name}-{dev}-{meta['date'][:10]}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"benchmark": name, "meta": meta, "summary": summary or {}, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return path
