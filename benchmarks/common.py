"""What every benchmark shares: device/version metadata, the results table, the JSON file, the ranks of a
multi-rank run."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import torch

import tuneforge
from tuneforge.dsl.devices import local_device
from tuneforge.results import print_table  # noqa: F401  (re-exported for the scripts)
from tuneforge.results import write_results as _write_results
from tuneforge.world import World, spawn

# what a multi-rank run's times are, by how its ranks ran (``run_ranks``'s mode)
MODE_NOTES = {"n-gpus": "{n} ranks, one per GPU; times are the slowest rank's median",
              "shared-gpu-smoke": "CORRECTNESS SMOKE: {n} processes share one GPU (time-sliced); times are not "
                                  "communication figures",
              "cpu-interpreter-smoke": "CORRECTNESS SMOKE: {n} CPU processes under Triton's interpreter; times are "
                                       "not GPU figures"}


def write_results(name: str, rows: list[dict], summary: dict | None = None, out_dir: str | None = None) -> str:
    """Write ``benchmarks/results/<name>-<device>-<date>.json`` (or under ``out_dir``); returns the path."""
    out_dir = out_dir or os.environ.get("TUNEFORGE_RESULTS") or os.path.join(os.path.dirname(__file__), "results")
    return _write_results(name, rows, summary, out_dir)


def world_size(requested: int | None) -> int:
    """The ranks of a multi-rank run: torchrun's world, else ``requested`` (default: the GPUs, at least 2)."""
    if "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return requested or max(2, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def run_ranks(rank_main, ranks: int, args, timeout: float, share_gpu: bool = False, smoke_sizes=None):
    """``rank_main(world, args)`` on every rank: under torchrun this process is one rank; otherwise ``ranks``
    processes are spawned, on the CPU under Triton's interpreter without a GPU, sharing GPU 0 where
    ``share_gpu`` or there are fewer GPUs than ranks. A spawned smoke first calls
    ``smoke_sizes(args, mode, ranks)`` (the benchmark's smaller sizes). Returns ``(rank 0's rows, mode, note)``
    (``MODE_NOTES``), None on the other torchrun ranks."""
    if "RANK" in os.environ:
        world = World.from_env()
        rows = rank_main(world, args)
        mode = "shared-gpu-smoke" if world.shared_gpu else "n-gpus"
        world.close()
        if world.rank != 0:
            return None
    else:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        share = share_gpu or gpus < ranks
        mode = "cpu-interpreter-smoke" if gpus == 0 else "shared-gpu-smoke" if share else "n-gpus"
        if mode != "n-gpus" and smoke_sizes is not None:
            smoke_sizes(args, mode, ranks)
        rows = spawn(rank_main, ranks, args, device="cpu" if gpus == 0 else "cuda", share_gpu=share,
                     timeout=timeout)[0]
    return rows, mode, MODE_NOTES[mode].format(n=ranks)


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    from tuneforge.tune.measure import time_calls
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_calls([lambda: dst.copy_(src)], warmup=3, rep=20, flush_l2=False)
    del src, dst
    return 2 * nbytes / timing.median_s


def bench_device(copy_mib: int):
    """``(device, spec, copy_bps)`` of this run: the GPU (the interpreter on the CPU without one), its
    datasheet spec (None on the CPU) and the bandwidth of a ``copy_mib`` MiB copy, printed in one line."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tuneforge.INTERPRETED else "cpu")
    spec = local_device() if device.type == "cuda" else None
    copy_bps = copy_bandwidth(device, copy_mib * 2**20)
    print(f"device: {spec.name if spec else 'cpu (interpreter; times are not GPU figures)'}; "
          f"copy bandwidth {copy_bps / 1e9:.0f} GB/s"
          + (f" = {100 * copy_bps / spec.hbm_bytes_per_s:.0f} % of the {spec.hbm_gbs:.0f} GB/s datasheet" if spec else ""))
    return device, spec, copy_bps


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
