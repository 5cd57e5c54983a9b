"""Fused elementwise ops vs torch and vs the HBM floor: the shared-expert combine by default.

    python benchmarks/bench_gate.py                       # shared_expert_gate, hidden 4096, bf16, 1..65536 tokens
    python benchmarks/bench_gate.py --op rmsnorm          # or silu_mul, rope_qk_norm, all
    python benchmarks/bench_gate.py --sweep 24            # also time 24 configs of the space, report the best

For every token count: the fused kernel (the template's default config), the torch baseline the
template names (for the gate: sigmoid, broadcast multiply, add, as Qwen3-Next's modelling code runs
it; plus ``torch.addcmul`` as a stronger one-kernel torch form), and the floor = minimum bytes moved
(``template.work``) / HBM bandwidth, both as measured in this run by a 1 GiB device-to-device copy and
as the datasheet figure of ``tuneforge.dsl.devices.local_device()``. Each output is checked against
the reference first (up to ``--check-max-tokens``). Timing: CUDA graphs of calls over input sets
rotated so that together they exceed twice the L2 (``--timing events``: one call per sample after an
L2 flush, launch overhead included). Target (shared_expert_gate, >= 4096 tokens): >= 2x the torch
baseline and >= 90 % of the measured-copy floor. Without a GPU the interpreter runs it (times are not
GPU figures; use tiny sizes to check the script).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run as a script
import tuneforge  # noqa: E402,F401  (sets TRITON_INTERPRET=1 without a GPU)
from benchmarks.common import bench_device, print_table, write_results  # noqa: E402
from tuneforge.dsl import Problem, check, get  # noqa: E402
from tuneforge.dsl.check import split_out  # noqa: E402
from tuneforge.tune.measure import time_calls  # noqa: E402

OPS = ("shared_expert_gate", "rmsnorm", "silu_mul", "rope_qk_norm")
TARGET_TOKENS, TARGET_SPEEDUP, TARGET_PCT_FLOOR = 4096, 2.0, 90.0

# Other torch forms worth beating, timed beside the template's baseline.
EXTRA_BASELINES = {
    "shared_expert_gate": {
        "addcmul": lambda final, gate_logits, shared_out: torch.addcmul(
            final, torch.sigmoid(gate_logits).reshape(-1, 1), shared_out),
    },
}


def problem_for(op: str, m: int, args) -> Problem:
    if op == "rope_qk_norm":
        return Problem.make(op, args.dtype, m=m, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    n = args.inter if op == "silu_mul" and args.inter else args.hidden
    return Problem.make(op, args.dtype, m=m, n=n)


def timed(calls, method: str) -> float:
    if method == "graph":
        return time_calls(calls, graph=True, rep=max(50, 20 * len(calls))).median_s
    return time_calls(calls, flush_l2=True).median_s


def bench_op(op: str, args, device, spec, copy_bps: float) -> list[dict]:
    template = get(op)
    l2_bytes = (spec.l2_mb if spec else 50) * 2**20
    rows = []
    for m in args.tokens:
        problem = problem_for(op, m, args)
        flops, nbytes = template.work(problem)
        sets = max(1, min(32, math.ceil(2 * l2_bytes / nbytes))) if args.timing == "graph" else 1
        inputs = [template.make_inputs(problem, device, seed, None) for seed in range(sets)]
        default = template.default_config(problem, spec)
        row = {"op": op, "tokens": m, "MB": nbytes / 1e6, "config": default}
        if m <= args.check_max_tokens:
            result = check(template, problem, default, inputs=inputs[0])
            row["check"] = "ok" if result else f"WRONG: {result.reason}"

        def kernel_time(config):
            return timed([lambda i=i: template.launch(**i, config=config) for i in inputs], args.timing)

        row["fused_us"] = kernel_time(default) * 1e6
        row["torch_us"] = timed([lambda i=i: template.baseline(**split_out(i)) for i in inputs], args.timing) * 1e6
        for name, fn in EXTRA_BASELINES.get(op, {}).items():
            row[f"{name}_us"] = timed([lambda i=i: fn(**split_out(i)) for i in inputs], args.timing) * 1e6
        row["speedup"] = row["torch_us"] / row["fused_us"]
        row["floor_us"] = nbytes / copy_bps * 1e6
        row["pct_floor"] = 100.0 * row["floor_us"] / row["fused_us"]
        # a device copy moving the same bytes (half read, half written), timed the same way: what
        # one pass over this much memory costs, ramp-up and tail included
        copies = [(torch.empty(int(nbytes) // 2, dtype=torch.uint8, device=device),
                   torch.empty(int(nbytes) // 2, dtype=torch.uint8, device=device)) for _ in range(sets)]
        row["same_size_copy_us"] = timed([lambda c=c: c[1].copy_(c[0]) for c in copies], args.timing) * 1e6
        row["pct_same_size_copy"] = 100.0 * row["same_size_copy_us"] / row["fused_us"]
        del copies
        if spec is not None:
            row["pct_spec"] = 100.0 * nbytes / spec.hbm_bytes_per_s / (row["fused_us"] * 1e-6)
        if args.sweep:
            valid = [c for c in template.space(problem).enumerate() if template.reject_reason(c, problem, spec) is None]
            candidates = random.Random(m).sample(valid, min(args.sweep, len(valid)))
            times = {str(c): (kernel_time(c) * 1e6, c) for c in candidates + [default]}
            best_us, best = min(times.values(), key=lambda tc: tc[0])
            row.update(best_us=best_us, best_config=best, best_speedup=row["torch_us"] / best_us)
        rows.append(row)
        print(f"  {op} m={m}: fused {row['fused_us']:.2f} us, torch {row['torch_us']:.2f} us", flush=True)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def summarize(op: str, rows: list[dict]) -> dict:
    big = [r for r in rows if r["tokens"] >= TARGET_TOKENS]
    summary = {"op": op, "wrong": [r["tokens"] for r in rows if r.get("check", "ok") != "ok"]}
    if big:
        summary.update(min_speedup_at_4096_plus=min(r["speedup"] for r in big),
                       min_pct_floor_at_4096_plus=min(r["pct_floor"] for r in big))
        summary["target_met"] = (summary["min_speedup_at_4096_plus"] >= TARGET_SPEEDUP
                                 and summary["min_pct_floor_at_4096_plus"] >= TARGET_PCT_FLOOR)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--op", default="shared_expert_gate", choices=OPS + ("all",))
    ap.add_argument("--tokens", default=",".join(str(4 ** i) for i in range(9)),
                    help="comma-separated token counts (default: powers of 4, 1..65536)")
    ap.add_argument("--hidden", type=int, default=4096, help="n of shared_expert_gate and rmsnorm")
    ap.add_argument("--inter", type=int, default=0, help="n of silu_mul (per-rank intermediate; default --hidden)")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--timing", default="graph", choices=("graph", "events"))
    ap.add_argument("--sweep", type=int, default=0, help="also time this many configs sampled from the space")
    ap.add_argument("--check-max-tokens", type=int, default=4096, help="check outputs up to this many tokens")
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth-measuring copy")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]

    device, spec, copy_bps = bench_device(args.copy_mib)
    status = 0
    for op in OPS if args.op == "all" else (args.op,):
        rows = bench_op(op, args, device, spec, copy_bps)
        columns = ["tokens", "MB", "fused_us", "torch_us"] + [f"{n}_us" for n in EXTRA_BASELINES.get(op, {})] \
            + ["speedup", "floor_us", "pct_floor", "same_size_copy_us", "pct_same_size_copy"] + (["pct_spec"] if spec else []) \
            + (["best_us", "best_speedup"] if args.sweep else []) + ["check"]
        print(f"\n{op} ({args.dtype}, timing: {args.timing})")
        print_table(rows, columns)
        summary = summarize(op, rows)
        summary.update(copy_gbs=copy_bps / 1e9, spec_hbm_gbs=spec.hbm_gbs if spec else None, timing=args.timing,
                       dtype=args.dtype, target=f">= {TARGET_SPEEDUP}x torch and >= {TARGET_PCT_FLOOR} % of the "
                                                f"copy floor at >= {TARGET_TOKENS} tokens (shared_expert_gate)")
        print({k: v for k, v in summary.items() if k != "target"})
        write_results(f"bench_gate-{op}", rows, summary, args.out_dir)
        status |= bool(summary["wrong"])
    return status


if __name__ == "__main__":
    sys.exit(main())
