"""Where a split GEMM's time goes: ``finish_tile`` (kernels/gemm.py) rebuilt in variants and timed,
replays interleaved, next to cuBLAS and the same tiles unsplit.

- ``current``: each split stores its fp32 slice, the last to arrive sums the slices and stores y;
- ``slices_only``: the slices are stored, nobody sums them (y wrong by construction: a timing probe);
- ``no_slices``: the split's compute alone, y from the last arrival's own slice (wrong: a probe);
- ``unmasked``: as ``current``, the slices stored and read back without masks (each slot holds a whole
  tile, so rows and columns past M and N are harmless), which frees the registers of the masks (on an
  H100: 254 -> 169 for 128x128 stream-K, then 2 % slower; split 128x128 5 % faster; 128x256 unchanged);
- ``own_in_registers``: as ``current``, but the last to arrive adds its own slice from registers
  instead of reading it back (on an H100: 0.5-3 % faster on 128x128 tiles, 3-15 % slower on 128x256,
  whose accumulator then changes layout through shared memory).

The variants are the kernel's source with ``finish_tile``'s body replaced (the script stops with a
clear message if that body has changed); each row also records every variant's registers per thread. Writes benchmarks/results/bench_split_cost-<device>-<date>.json.

    python benchmarks/bench_split_cost.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_gemm import input_sets  # noqa: E402
from benchmarks.common import RegisterCount, print_table, source_variant, write_results  # noqa: E402
from tuneforge.dsl import Problem  # noqa: E402
from tuneforge.kernels import gemm as G  # noqa: E402
from tuneforge.tune.measure import time_interleaved  # noqa: E402

SUM_SLICES = """        tl.store(mine + offs, acc, mask=mask)
        if last_to_arrive(counts, tile, contributors):
            total = tl.load(first + offs, mask=mask, other=0.0, cache_modifier=".cg")   # L2: peers' writes
            for j in range(0, contributors - 1):
                total += tl.load(rest + j * rest_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
            store_tile(y, total, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)"""
VARIANTS = {
    "current": SUM_SLICES,
    "slices_only": """        tl.store(mine + offs, acc, mask=mask)
        if last_to_arrive(counts, tile, contributors):
            store_tile(y, acc, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)""",
    "no_slices": """        if last_to_arrive(counts, tile, contributors):
            store_tile(y, acc, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)""",
    "unmasked": """        tl.store(mine + offs, acc)
        if last_to_arrive(counts, tile, contributors):
            total = tl.load(first + offs, cache_modifier=".cg")
            for j in range(0, contributors - 1):
                total += tl.load(rest + j * rest_stride + offs, cache_modifier=".cg")
            store_tile(y, total, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)""",
    "own_in_registers": """        tl.store(mine + offs, acc, mask=mask)
        if last_to_arrive(counts, tile, contributors):
            total = acc
            if first.to(tl.int64) != mine.to(tl.int64):
                total += tl.load(first + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for j in range(0, contributors - 1):
                other = rest + j * rest_stride
                if other.to(tl.int64) != mine.to(tl.int64):
                    total += tl.load(other + offs, mask=mask, other=0.0, cache_modifier=".cg")
            store_tile(y, total, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)""",
}
PROBES = ("slices_only", "no_slices")
TILE = dict(group_m=8, tma=True, block_k=64, programs_per_sm=1, flatten=False)
CASES = [  # (m, n, k), config: the split configs the mid-size searches tried
    ((128, 5120, 5120), dict(TILE, block_m=128, block_n=128, num_warps=8, num_stages=4, schedule="tiles", split_k=3)),
    ((128, 5120, 5120), dict(TILE, block_m=128, block_n=64, num_warps=4, num_stages=4, schedule="tiles", split_k=3,
                             programs_per_sm=2)),
    ((512, 5120, 5120), dict(TILE, block_m=128, block_n=256, num_warps=8, num_stages=3, schedule="tiles", split_k=3)),
    ((512, 5120, 5120), dict(TILE, block_m=128, block_n=128, num_warps=8, num_stages=4, schedule="hybrid")),
    ((512, 5120, 25600), dict(TILE, block_m=128, block_n=256, num_warps=8, num_stages=3, schedule="tiles", split_k=2)),
    ((512, 5120, 5120), dict(TILE, block_m=128, block_n=256, num_warps=8, num_stages=3, schedule="stream")),
    ((512, 5120, 5120), dict(TILE, block_m=128, block_n=128, num_warps=8, num_stages=4, schedule="stream")),
    ((512, 5120, 25600), dict(TILE, block_m=128, block_n=256, num_warps=8, num_stages=3, schedule="stream")),
    ((16, 51200, 5120), dict(TILE, block_m=16, block_n=64, block_k=256, group_m=1, num_warps=4, num_stages=3,
                             schedule="stream", programs_per_sm=2, tma=False)),
]


def variant_modules() -> dict:
    modules = {name: source_variant(G, name, [(SUM_SLICES, body)]) for name, body in VARIANTS.items()}
    for module in modules.values():
        module._gemm_kernel = RegisterCount(module._gemm_kernel)
    return modules


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_split_cost needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    modules = variant_modules()
    rows = []
    for (m, n, k), config in CASES:
        problem = Problem.make("gemm", "bf16", m=m, n=n, k=k)
        sets = input_sets(problem, G.launch_spec(device), device)
        unsplit = {key: v for key, v in config.items() if key != "split_k"} | {"schedule": "tiles", "split_k": 1}
        runs = {"cublas": lambda s: torch.nn.functional.linear(s["x"], s["w"]),
                "unsplit": lambda s: G.gemm(s["x"], s["w"], out=s["out"], config=unsplit)}
        runs |= {name: (lambda s, mod=mod: mod.gemm(s["x"], s["w"], out=s["out"], config=config))
                 for name, mod in modules.items()}
        expected = torch.nn.functional.linear(sets[0]["x"], sets[0]["w"]).float()
        for name in ("unsplit", "current", "unmasked", "own_in_registers"):
            err = float((runs[name](sets[0]).float() - expected).abs().max())
            if err > 0.1:
                sys.exit(f"bench_split_cost: {name} is wrong on {m}x{n}x{k} (max error {err})")
        times = time_interleaved([[lambda s=s, fn=fn: fn(s) for s in sets] for fn in runs.values()], rounds=20)
        row = {"m": m, "n": n, "k": k, "tile": f"{config['block_m']}x{config['block_n']}",
               "schedule": config["schedule"] + (f" sk{config['split_k']}" if "split_k" in config else ""),
               **{f"{name}_us": t.median_s * 1e6 for name, t in zip(runs, times)},
               **{f"{name}_registers": mod._gemm_kernel.registers for name, mod in modules.items()}, "config": config}
        rows.append(row)
        print({key: round(v, 1) if isinstance(v, float) else v for key, v in row.items() if key != "config"}, flush=True)
    print_table(rows, ["m", "n", "k", "tile", "schedule", "cublas_us", "unsplit_us"] + [f"{v}_us" for v in VARIANTS]
                + [f"{v}_registers" for v in VARIANTS])
    write_results("bench_split_cost", rows, {"probes_wrong_by_construction": list(PROBES),
                                             "method": "time_interleaved, 20 rounds over rotated input sets streaming 3x L2 (bench_gemm's)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
