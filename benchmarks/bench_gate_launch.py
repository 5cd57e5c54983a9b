"""How the shared-expert gate's tiling shapes its time: the kernel as it is and rebuilt in variants,
replays interleaved, next to a device copy of the same bytes.

- ``current``: row-major tiles (consecutive programs stream consecutive addresses), the default config;
- ``column_order``: tiles in column-major order (row tiles fastest: the order of the 2-D grid the
  kernel had until 2026-11-24);
- ``four_warps``: the default tile with at most 4 warps instead of its 8.

The column-order variant is ``kernels/shared_expert_gate.py``'s source with its kernel's
``row_tile`` call (``kernels/_common.py``) replaced by the column-major tile (the script stops with a
clear message if it changed). Floor: minimum bytes / a 1 GiB
device copy's bandwidth, as in bench_gate.py. Writes
benchmarks/results/bench_gate_launch-<device>-<date>.json. (A programmatic dependent launch,
tried as a variant on 2026-11-24, gained nothing measurable:
``bench_gate_launch-...-2026-11-24-with-dependent-launch.json``.)

    python benchmarks/bench_gate_launch.py
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth, print_table, source_variant, write_results  # noqa: E402
from tuneforge.dsl import Problem  # noqa: E402
from tuneforge.kernels import shared_expert_gate as S  # noqa: E402
from tuneforge.kernels._common import launch_spec, tile_default  # noqa: E402
from tuneforge.tune.measure import time_interleaved  # noqa: E402

TOKENS, HIDDEN = (4096, 16384, 65536), 4096
ROW_MAJOR = """    rows, cols = row_tile(tiles_n, ROWS, BLOCK_N)"""
COLUMN_MAJOR = """    tile = tl.program_id(0)
    tiles_m = tl.num_programs(0) // tiles_n
    rows = (tile % tiles_m) * ROWS + tl.arange(0, ROWS)
    cols = (tile // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)"""
VARIANTS = {  # name: (source replacements, cap on the default tile's warps or None)
    "current": ([], None),
    "column_order": ([(ROW_MAJOR, COLUMN_MAJOR)], None),
    "four_warps": ([], 4),
}


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_gate_launch needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    spec = launch_spec(device, persistent=False)
    copy_bps = copy_bandwidth(device, 1 << 30)
    modules = {name: source_variant(S, name, replacements) for name, (replacements, _) in VARIANTS.items()}
    rows = []
    for m in TOKENS:
        problem = Problem.make(S.OP, "bf16", m=m, n=HIDDEN)
        nbytes = S.work(problem)[1]
        sets = max(1, min(32, math.ceil(2 * spec.l2_mb * 2**20 / nbytes)))
        inputs = [S.make_inputs(problem, device, seed) for seed in range(sets)]
        default = tile_default(m, HIDDEN, spec)
        expected = S.reference(inputs[0]["final"], inputs[0]["gate_logits"], inputs[0]["shared_out"])
        runs = {}
        for name, (_, warps) in VARIANTS.items():
            config = dict(default, num_warps=min(warps or default["num_warps"], default["num_warps"]))
            run = (lambda i, mod=modules[name], config=config:
                   mod.shared_expert_gate(i["final"], i["gate_logits"], i["shared_out"], out=i["out"], config=config))
            inputs[0]["out"].fill_(float("nan"))
            run(inputs[0])
            err = float((inputs[0]["out"].float() - expected).abs().max())
            if not err <= 0.05:
                sys.exit(f"bench_gate_launch: {name} is wrong at {m} tokens (max error {err})")
            runs[name] = run
        copies = [(torch.empty(int(nbytes) // 2, dtype=torch.uint8, device=device),
                   torch.empty(int(nbytes) // 2, dtype=torch.uint8, device=device)) for _ in range(sets)]
        calls = [[lambda i=i, run=run: run(i) for i in inputs] for run in runs.values()]
        calls.append([lambda c=c: c[1].copy_(c[0]) for c in copies])
        times = time_interleaved(calls, rounds=20)
        floor_us = nbytes / copy_bps * 1e6
        row = {"tokens": m, "MB": nbytes / 1e6, "config": default, "floor_us": floor_us}
        for name, t in zip(list(runs) + ["same_size_copy"], times):
            row[f"{name}_us"] = t.median_s * 1e6
            row[f"{name}_pct_floor"] = 100.0 * floor_us / row[f"{name}_us"]
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        del inputs, copies
        torch.cuda.empty_cache()
    print_table(rows, ["tokens", "floor_us"] + [f"{n}_us" for n in list(VARIANTS) + ["same_size_copy"]])
    write_results("bench_gate_launch", rows, {"copy_gbs": copy_bps / 1e9, "hidden": HIDDEN, "dtype": "bf16",
                                              "method": "time_interleaved, 20 rounds over input sets > 2x L2"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
