"""The fused MoE router (kernels/moe_router.py: softmax, top-k and renormalisation in one Triton kernel)
vs its baseline, torch softmax + topk + renormalise (what transformers' Qwen3MoeTopKRouter runs).

    python benchmarks/bench_router.py                   # 1, 2, 4, ..., 16384 tokens x 64 / 128 experts x top-8 / 2
    python benchmarks/bench_router.py --sweep           # and the best of the template's space per row
    python benchmarks/bench_router.py --tokens 1 4 --experts 8 --top-k 2 --copy-mib 1   # tiny: fine on the CPU

Per (experts, top-k, tokens): the fused kernel at its default config (``--sweep``: also the best of the
space the tuner searches) and the baseline, each timed as a served step runs it (CUDA-graph replays
over input sets rotated past twice the L2), ``speedup`` = baseline / fused (> 1: fused faster), and the
fused time against the floor of the bytes it moves (the logits read, weights and ids written) over a
measured copy's bandwidth. Every fused config timed is first checked against the fp64 reference with
a NaN-poisoned output. Logits are standard normal in ``--dtype`` (bf16, the router GEMM's output).
Without a GPU the interpreter runs it on the host clock: not GPU figures.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run as a script
import tuneforge  # noqa: E402,F401  (sets TRITON_INTERPRET=1 without a GPU)
from benchmarks.common import bench_device, print_table, write_results  # noqa: E402
from tuneforge.dsl import check, get  # noqa: E402
from tuneforge.dsl.check import split_out  # noqa: E402
from tuneforge.kernels._common import launch_spec  # noqa: E402
from tuneforge.models import problems as P  # noqa: E402
from tuneforge.results import NOT_A_GPU_FIGURE  # noqa: E402
from tuneforge.tune.measure import time_calls  # noqa: E402


def timed_us(calls, gpu: bool) -> float:
    return time_calls(calls, graph=gpu, rep=max(50, 20 * len(calls))).median_s * 1e6


def bench(args, device, spec, copy_bps) -> list[dict]:
    template = get("moe_router")
    plan_spec = launch_spec(device, persistent=False)
    gpu = device.type == "cuda"
    rows = []
    for experts in args.experts:
        for top_k in args.top_k:
            for m in args.tokens:
                problem = P.moe_router(args.dtype, m, experts, top_k)
                _, nbytes = template.work(problem)
                set_bytes = m * experts * problem.torch_dtype.itemsize
                sets = max(1, min(16, math.ceil(2 * spec.l2_mb * 2**20 / set_bytes))) if gpu else 1
                inputs = [template.make_inputs(problem, device, s, None) for s in range(sets)]

                def fused_us(config):
                    return timed_us([lambda i=i: template.launch(**i, config=config) for i in inputs], gpu)

                default = template.default_config(problem, plan_spec)
                result = check(template, problem, default, inputs=inputs[0])
                row = dict(experts=experts, top_k=top_k, tokens=m, config=default,
                           check="ok" if result else f"WRONG: {result.reason}")
                row["fused_us"] = fused_us(default)
                row["baseline_us"] = timed_us([lambda i=i: template.baseline(**split_out(i)) for i in inputs], gpu)
                fastest = row["fused_us"]
                if args.sweep:
                    valid = [c for c in template.space(problem).enumerate()
                             if c != default and template.reject_reason(c, problem, plan_spec) is None
                             and check(template, problem, c, inputs=inputs[0])]
                    best_us, best = min([(fused_us(c), c) for c in valid] + [(fastest, default)], key=lambda t: t[0])
                    row.update(best_us=best_us, best_config=best)
                    fastest = best_us
                row["speedup"] = row["baseline_us"] / fastest
                row["pct_floor"] = 100.0 * nbytes / copy_bps / (fastest * 1e-6)
                rows.append(row)
                print(f"  {experts} experts top-{top_k}, {m} tokens: fused {fastest:.2f} us, torch "
                      f"{row['baseline_us']:.2f} us ({row['speedup']:.2f}x)", flush=True)
                del inputs
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2 ** i for i in range(15)], metavar="T",
                    help="token counts (default 1 2 4 ... 16384)")
    ap.add_argument("--experts", type=int, nargs="+", default=[64, 128], metavar="E")
    ap.add_argument("--top-k", type=int, nargs="+", default=[8, 2], metavar="K")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="the logits' dtype")
    ap.add_argument("--sweep", action="store_true", help="also the best config of the template's space")
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the copy whose bandwidth is the floor's")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    for name in ("tokens", "experts", "top_k"):
        if min(getattr(args, name)) < 1:
            ap.error(f"--{name.replace('_', '-')} values must be >= 1, got {getattr(args, name)}")
    if max(args.top_k) > min(args.experts):
        ap.error(f"--top-k {max(args.top_k)} exceeds --experts {min(args.experts)}")
    device, spec, copy_bps = bench_device(args.copy_mib)
    rows = bench(args, device, spec, copy_bps)
    print_table(rows, ["experts", "top_k", "tokens", "fused_us", "baseline_us", "speedup", "pct_floor"]
                + (["best_us"] if args.sweep else []) + ["check"])
    summary = {"wrong": [(r["experts"], r["top_k"], r["tokens"]) for r in rows if r["check"] != "ok"],
               "slower_than_torch": [(r["experts"], r["top_k"], r["tokens"]) for r in rows if r["speedup"] < 1],
               "min_speedup": min(r["speedup"] for r in rows), "max_speedup": max(r["speedup"] for r in rows),
               "copy_gbs": copy_bps / 1e9, "dtype": args.dtype, "norm_topk_prob": True, "sweep": args.sweep,
               "figures": spec.name if spec else NOT_A_GPU_FIGURE,
               "timing": "cuda-graph replays" if device.type == "cuda" else "host clock (interpreter)"}
    print({k: v for k, v in summary.items() if k not in ("wrong", "slower_than_torch")})
    if summary["slower_than_torch"]:
        print(f"fused slower than torch at (experts, top_k, tokens): {summary['slower_than_torch']}"
              + ("" if spec else f" ({NOT_A_GPU_FIGURE})"))
    write_results("bench_router-sweep", rows, summary, args.out_dir)
    return int(bool(summary["wrong"]))


if __name__ == "__main__":
    sys.exit(main())
