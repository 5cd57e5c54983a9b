"""The grouped expert GEMM (kernels/moe_gemm.py) vs the per-expert torch loop and torch._grouped_mm.

    python benchmarks/bench_moe_gemm.py                   # Qwen3-30B-A3B: 128 experts, top-8, hidden 2048, inter 768
    python benchmarks/bench_moe_gemm.py --tokens 1,16 --sweep 20    # and 20 sampled configs per shape

Per token count and GEMM (gate_up: gathered rows, silu_mul fused; down: router-weighted, combined):
the template's default config, each schedule's default (``packed_us``, ``per_slot_us``; ``pack_us``:
the pack the packed schedule needs first, which per_slot skips) and with ``--sweep`` the best of that many
sampled configs, timed as an engine runs it (CUDA graph replays over input sets rotated past the L2); the template's baseline
(transformers' eager loop over the hit experts: it syncs with the host, so it is timed call by call
with events after an L2 flush, as is the grouped kernel in ``grouped_events_us``); and
``torch._grouped_mm`` where this torch has it, on rows already sorted by expert (the GEMM alone: no
gather, no epilogue, no combine, so a lower bound of a torch grouped path). The floor is the bytes of
the experts this routing touches plus the activations, over a measured 1 GiB copy's bandwidth (decode
target: >= 75 %); % of peak is the datasheet bf16 rate (prefill target: >= 1.0x torch._grouped_mm).
Every default output is checked against the fp32 reference first. Without a GPU the interpreter runs
it (host clock: not GPU figures; use tiny sizes, e.g. ``--tokens 2 --hidden 64 --inter 32 --experts 8``).
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run as a script
import tuneforge  # noqa: E402,F401  (sets TRITON_INTERPRET=1 without a GPU)
from benchmarks.common import bench_device, print_table, write_results  # noqa: E402
from tuneforge.dsl import check, get  # noqa: E402
from tuneforge.dsl.check import split_out  # noqa: E402
from tuneforge.kernels import moe_gemm as MG, moe_pack  # noqa: E402
from tuneforge.kernels._common import launch_spec  # noqa: E402
from tuneforge.models import problems as P  # noqa: E402
from tuneforge.tune.measure import time_calls  # noqa: E402

DECODE_TARGET_PCT_FLOOR, PREFILL_TARGET_VS_GROUPED_MM = 75.0, 1.0


def grouped_mm_call(inputs: dict):
    """torch._grouped_mm on the rows sorted by expert (sorting not timed), or None without it."""
    if not hasattr(torch, "_grouped_mm") or inputs["x"].device.type != "cuda":
        return None
    ids = inputs["topk_ids"].reshape(-1).long()
    order = torch.argsort(ids, stable=True)
    src = order // inputs["topk_ids"].shape[1] if inputs["act"] else order     # gate_up gathers token rows
    a = inputs["x"].index_select(0, src).contiguous()
    offs = torch.cumsum(torch.bincount(ids, minlength=inputs["w"].shape[0]), 0).int()
    b = inputs["w"].transpose(1, 2)          # [E, K, N], column-major as _grouped_mm wants
    return lambda: torch._grouped_mm(a, b, offs=offs)


def bench(args, device, spec, copy_bps) -> list[dict]:
    template = get("moe_gemm")
    plan_spec = launch_spec(device, persistent=False)     # the launcher's: local_device() on a GPU
    rows = []
    for m in args.tokens:
        for name, act in (("gate_up", True), ("down", False)):
            weight = (2 * args.inter, args.hidden) if act else (args.hidden, args.inter)
            problem = P.moe_gemm(args.dtype, m, weight, args.experts, args.top_k, act)
            flops, _ = template.work(problem)
            first = template.make_inputs(problem, device, 0, None)
            set_bytes = first["w"].numel() * first["w"].element_size()
            sets = max(1, min(8, -(-2 * (spec.l2_mb if spec else 50) * 2**20 // set_bytes)))
            inputs = [first] + [template.make_inputs(problem, device, s, None) for s in range(1, sets)]
            hit = first["topk_ids"].unique().numel()
            size = first["x"].element_size()
            nbytes = (hit * weight[0] * weight[1] + first["x"].numel() + first["out"].numel()) * size
            default = template.default_config(problem, plan_spec)
            row = {"gemm": name, "tokens": m, "experts_hit": hit, "MB": nbytes / 1e6, "config": default}
            result = check(template, problem, default, inputs=first)
            row["check"] = "ok" if result else f"WRONG: {result.reason}"

            def graph_us(config):
                return time_calls([lambda i=i: template.launch(**i, config=config) for i in inputs],
                                  graph=device.type == "cuda", rep=max(50, 20 * sets)).median_s * 1e6

            row["grouped_us"] = graph_us(default)
            # both schedules' defaults, and the pack the packed one needs first (per_slot reads the ids)
            for schedule in MG.SCHEDULES:
                config = template.default_config(problem, plan_spec, schedule=schedule)
                if template.reject_reason(config, problem, plan_spec) is None and check(template, problem, config,
                                                                                        inputs=first):
                    row[f"{schedule}_us"] = graph_us(config)
            block_m = template.default_config(problem, plan_spec, schedule="packed")["block_m"]
            row["pack_us"] = time_calls([lambda i=i: moe_pack.pack(i["topk_ids"], args.experts, block_m) for i in inputs],
                                        graph=device.type == "cuda", rep=max(50, 20 * sets)).median_s * 1e6
            row["grouped_events_us"] = time_calls(
                [lambda i=i: template.launch(**i, config=default) for i in inputs]).median_s * 1e6
            row["torch_loop_us"] = time_calls([lambda i=i: template.baseline(**split_out(i)) for i in inputs]
                                              ).median_s * 1e6
            calls = [c for c in (grouped_mm_call(i) for i in inputs) if c is not None]
            if calls:
                try:
                    row["grouped_mm_us"] = time_calls(calls, graph=True, rep=max(50, 20 * sets)).median_s * 1e6
                except RuntimeError as e:           # shapes or alignment this torch's kernel refuses
                    row["grouped_mm"] = f"n/a: {str(e).splitlines()[0]}"
            if args.sweep:
                valid = [c for c in template.space(problem).enumerate()
                         if template.reject_reason(c, problem, plan_spec) is None]
                picked = random.Random(m).sample(valid, min(args.sweep, len(valid)))
                best_us, best = min(((graph_us(c), c) for c in picked if check(template, problem, c, inputs=first)),
                                    default=(row["grouped_us"], default), key=lambda t: t[0])
                row.update(best_us=min(best_us, row["grouped_us"]), best_config=best)
            fastest = row.get("best_us", row["grouped_us"])
            row["vs_torch_loop"] = row["torch_loop_us"] / fastest
            if "grouped_mm_us" in row:
                row["vs_grouped_mm"] = row["grouped_mm_us"] / fastest
            row["pct_floor"] = 100.0 * nbytes / copy_bps / (fastest * 1e-6)
            if spec is not None:
                row["pct_peak_flops"] = 100.0 * flops / spec.peak_flops(args.dtype) / (fastest * 1e-6)
            rows.append(row)
            print(f"  {name} m={m}: grouped {fastest:.2f} us, torch loop {row['torch_loop_us']:.2f} us", flush=True)
            del inputs, first
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,4096,16384", help="comma-separated token counts")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768, help="expert intermediate size (per rank)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--sweep", type=int, default=0, help="also time this many configs sampled from the space")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    device, spec, copy_bps = bench_device(args.copy_mib)
    rows = bench(args, device, spec, copy_bps)
    columns = ["gemm", "tokens", "experts_hit", "MB", "grouped_us", "packed_us", "per_slot_us", "pack_us",
               "grouped_events_us", "torch_loop_us",
               "grouped_mm_us", "vs_torch_loop", "vs_grouped_mm", "pct_floor", "pct_peak_flops"] \
        + (["best_us"] if args.sweep else []) + ["check"]
    print_table(rows, columns)
    decode = [r for r in rows if r["tokens"] <= 256]
    prefill = [r for r in rows if r["tokens"] >= 4096 and "vs_grouped_mm" in r]
    summary = {"wrong": [(r["gemm"], r["tokens"]) for r in rows if r["check"] != "ok"],
               "min_pct_floor_decode": min((r["pct_floor"] for r in decode), default=None),
               "min_vs_grouped_mm_prefill": min((r["vs_grouped_mm"] for r in prefill), default=None),
               "copy_gbs": copy_bps / 1e9, "dtype": args.dtype,
               "shape": dict(experts=args.experts, top_k=args.top_k, hidden=args.hidden, inter=args.inter),
               "target": f"decode (<= 256 tokens) >= {DECODE_TARGET_PCT_FLOOR} % of the touched experts' floor; "
                         f"prefill (>= 4096) >= {PREFILL_TARGET_VS_GROUPED_MM}x torch._grouped_mm"}
    print({k: v for k, v in summary.items() if k != "target"})
    write_results("bench_moe_gemm", rows, summary, args.out_dir)
    return int(bool(summary["wrong"]))


if __name__ == "__main__":
    sys.exit(main())
