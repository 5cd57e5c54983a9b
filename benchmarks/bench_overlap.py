"""Communication-overlapped kernels vs torch at Qwen3-32B tensor-parallel shapes (bf16).

AG-GEMM (qkv, gate_up), GEMM-RS (o_proj, down) and the TP blocks (tp_attn, tp_mlp) at TP ``--tp``
for tokens M in 128..8192, each against, in the same run:

- torch + NCCL: ``all_gather_into_tensor`` + F.linear / F.linear + ``reduce_scatter_tensor``; the
  TP blocks against both torch layouts (F.linear ... + ``all_reduce``, and all-gather ...
  reduce-scatter);
- torch symmetric memory's fused ops (``torch.ops.symm_mem.fused_all_gather_matmul`` /
  ``fused_matmul_reduce_scatter``) where this torch has them (N distinct GPUs only).

Our side: a few candidate configs per shape (the default first; the TP blocks' default of each
strategy), every one checked against the reference before it is timed; the fastest is reported.
Timing: ``tuneforge.tune.measure.time_calls`` (CUDA events, L2 flushed, median), all ranks started
by a barrier, the slowest rank's median counts. %SOL: the larger of peak-FLOP time and the time
to move the minimum bytes (HBM), over the measured time.

With fewer GPUs than ``--tp`` the ranks share one GPU: the script then runs as a CORRECTNESS SMOKE
(small M, every candidate and baseline checked, no timings -- time-sliced processes say nothing
about speed) and says so in the table and the JSON.

    python benchmarks/bench_overlap.py --tp 8             # 8 GPUs: the full sweep
    python benchmarks/bench_overlap.py --tp 8 --quick     # M = 128, 2048
    python benchmarks/bench_overlap.py --tp 2             # on 1 GPU: 2 processes, smoke
Writes benchmarks/results/bench_overlap-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tuneforge  # noqa: E402,F401
from benchmarks.common import print_table, write_results  # noqa: E402
from tuneforge.dsl import Problem, get  # noqa: E402
from tuneforge.dsl.check import compare, poison, split_out  # noqa: E402

# Qwen3-32B
HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 5120, 64, 8, 128, 25600
M_FULL, M_QUICK, M_SMOKE = (128, 512, 2048, 8192), (128, 2048), (128, 333)


def cases(tp: int) -> list[tuple[str, str, dict]]:
    """(op, layer, dims) at TP ``tp``: per-rank shards as the tuning plan makes them."""
    heads, kv = Q_HEADS // tp, max(1, KV_HEADS // tp)
    qkv, o_in, inter = (heads + 2 * kv) * HEAD_DIM, heads * HEAD_DIM, INTERMEDIATE // tp
    return [("ag_gemm", "qkv", dict(n=qkv, k=HIDDEN)), ("ag_gemm", "gate_up", dict(n=2 * inter, k=HIDDEN)),
            ("gemm_rs", "o_proj", dict(n=HIDDEN, k=o_in)), ("gemm_rs", "down", dict(n=HIDDEN, k=inter)),
            ("tp_attn", "attn", dict(hidden=HIDDEN, qkv=qkv, o_in=o_in)),
            ("tp_mlp", "mlp", dict(hidden=HIDDEN, inter=inter))]


def candidates(op: str, problem: Problem, spec) -> list[dict]:
    """The default config first, then a few neighbours (strategy, push/pull, signal granularity,
    SMs given to communication, TMA, gather on a side stream / consumer reduction), those the
    constraints accept."""
    t = get(op)
    if op in ("tp_mlp", "tp_attn"):
        ar, ag = t.default_config(problem, spec, "gemm_ar"), t.default_config(problem, spec, "ag_rs")
        configs = [ar, ag, dict(ag, variant="pull"), dict(ag, comm_sms=max(1, ag["comm_sms"] // 2)),
                   dict(ar, ar_strategy="two_shot" if ar["ar_strategy"] == "one_shot" else "one_shot")]
    else:
        d = t.default_config(problem, spec)
        configs = [d, dict(d, variant="pull"), dict(d, signal="rank" if d["signal"] != "rank" else "tile"),
                   dict(d, comm_sms=max(1, d["comm_sms"] // 2)), dict(d, comm_sms=min(32, 2 * d["comm_sms"])),
                   dict(d, tma=not d["tma"])]
        if op == "gemm_rs":
            configs.append(dict(d, reduce="consumer"))
        else:
            configs.append(dict(d, gather="side_stream"))
    out = []
    for c in configs:
        c = {k: v for k, v in c.items() if k != "chunk_tiles" or c.get("signal") == "chunk"}
        if c not in out and t.reject_reason(c, problem, spec) is None:
            out.append(c)
    return out


def _symm_mem_op(op: str, inputs: dict, ctx):
    """torch symmetric memory's fused op for ``op`` as a closure, or (None, why)."""
    try:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError as e:
        return None, f"no torch symmetric memory ({e})"
    if ctx.world.shared_gpu:
        return None, "torch symmetric memory needs one GPU per rank"
    ops = getattr(torch.ops, "symm_mem", None)
    name = {"ag_gemm": "fused_all_gather_matmul", "gemm_rs": "fused_matmul_reduce_scatter"}[op]
    if ops is None or not hasattr(ops, name):
        return None, f"torch {torch.__version__} has no torch.ops.symm_mem.{name}"
    group_name = dist.group.WORLD.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        symm_mem.enable_symm_mem_for_group(group_name)
    x, w = inputs["x"], inputs["w"]
    if x.shape[0] % ctx.size and op == "gemm_rs":
        return None, "fused_matmul_reduce_scatter needs m divisible by the world size"
    if op == "ag_gemm":
        return (lambda: ops.fused_all_gather_matmul(x, [w.T], 0, group_name)[1][0]), ""
    return (lambda: ops.fused_matmul_reduce_scatter(x, w.T, "sum", 0, group_name)), ""


def _slowest(world, seconds):
    """The slowest rank's time (None if any rank failed)."""
    times = world.all_gather_object(seconds)
    return None if any(t is None for t in times) else max(times)


def _worker(world, tp: int, ms: list[int], smoke: bool) -> list[dict]:
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.kernels.gemm import launch_spec
    from tuneforge.tune.measure import percent_of_light, time_calls
    spec = launch_spec(world.device)
    heap = SymmetricHeap(world, (64 << 20) + 2 * 2 * max(ms) * HIDDEN * (tp + 4) + 2 * 2 * max(ms) * INTERMEDIATE // tp * 2)
    ctx = heap.context()
    rows = []

    def timed(fn):
        if smoke:
            return None
        try:
            t = time_calls([fn], barrier=world.barrier).median_s
        except Exception:   # noqa: BLE001 - reported as a missing time, every rank still meets below
            t = None
        return _slowest(world, t)

    for op, layer, dims in cases(tp):
        template = get(op)
        for m in ms:
            problem = Problem.make(op, "bf16", tp, m=m, **dims)
            inputs = template.make_inputs(problem, world.device, 0, ctx)
            reference = template.reference(**split_out(inputs))
            best, best_t, failures, tried = None, None, [], 0
            for config in candidates(op, problem, spec):
                poison(inputs["out"])
                got = template.launch(**inputs, config=config)
                ctx.synchronize()
                ok = compare(got, reference, got.dtype)
                verdict = world.all_gather_object(bool(ok))
                tried += 1
                if not all(verdict):
                    failures.append(f"{config}: {ok.reason or 'wrong on another rank'}")
                    continue
                t = timed(lambda c=config: template.launch(**inputs, config=c))
                if best is None or (t is not None and (best_t is None or t < best_t)):
                    best, best_t = config, t
            row = {"op": op, "layer": layer, "tp": tp, "m": m, **dims, "candidates": tried,
                   "checked_ok": tried - len(failures), "failures": failures, "config": best,
                   "triton_us": None if best_t is None else best_t * 1e6}
            base = template.baseline(**split_out(inputs))
            row["nccl_ok"] = bool(compare(base, reference, base.dtype, scale=2 * tp))
            t = timed(lambda: template.baseline(**split_out(inputs)))
            row["torch_nccl_us"] = None if t is None else t * 1e6
            if op in ("tp_mlp", "tp_attn"):
                from tuneforge.kernels.tp_mlp import own_rows
                module = importlib.import_module(template.module)
                weights = [v for k, v in inputs.items() if k not in ("x", "ctx", "out")]
                rows_x = own_rows(inputs["x"], ctx).contiguous()
                t = timed(lambda: module.baseline_ag_rs(rows_x, *weights, ctx, m))
                row["torch_nccl_ag_rs_us"] = None if t is None else t * 1e6
            else:
                fn, why = _symm_mem_op(op, inputs, ctx)
                row["symm_mem_note"] = why
                if fn is not None:
                    try:
                        fn()
                        torch.cuda.synchronize()
                        t = timed(fn)
                    except Exception as e:   # noqa: BLE001 - recorded, the sweep goes on
                        row["symm_mem_note"], t = f"failed: {str(e).splitlines()[0][:200]}", None
                    row["torch_symm_mem_us"] = None if t is None else t * 1e6
            if best_t is not None:
                torch_times = [v for k, v in row.items() if k.startswith("torch_") and k.endswith("_us") and v]
                row["speedup_vs_best_torch"] = min(torch_times) / row["triton_us"] if torch_times else None
                row["speedup_vs_nccl"] = row["torch_nccl_us"] / row["triton_us"] if row["torch_nccl_us"] else None
                if row.get("torch_symm_mem_us"):
                    row["speedup_vs_symm_mem"] = row["torch_symm_mem_us"] / row["triton_us"]
                flops, nbytes = template.work(problem)
                row["pct_sol"] = percent_of_light(best_t, flops, nbytes, spec, "bf16")
            row["strategy"] = (best or {}).get("strategy")
            rows.append(row)
            if world.rank == 0:
                timing = (f", {row['triton_us']:.1f} us vs torch+NCCL {row['torch_nccl_us']:.1f} us"
                          if best_t and row["torch_nccl_us"] else "")
                print(f"  {op} {layer} m={m}: {row['checked_ok']}/{tried} configs correct{timing}", flush=True)
            del inputs
    heap.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=None, help="ranks (default: the GPUs here, at least 2)")
    ap.add_argument("--m", default=None, help="comma-separated token counts")
    ap.add_argument("--quick", action="store_true", help=f"M = {M_QUICK}")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_overlap needs a CUDA GPU", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    tp = args.tp or max(2, gpus)
    smoke = gpus < tp
    ms = [int(v) for v in args.m.split(",")] if args.m else list(M_SMOKE if smoke else M_QUICK if args.quick else M_FULL)
    mode = (f"SMOKE: {tp} processes share {gpus} GPU(s) -- correctness only, no timings" if smoke
            else f"measured: {tp} ranks on {tp} GPUs")
    print(f"bench_overlap: {mode}; M = {ms}")
    from tuneforge.world import spawn
    rows = spawn(_worker, tp, tp, ms, smoke, device="cuda", share_gpu=smoke, timeout=3600)[0]
    columns = ["op", "layer", "m", "checked_ok", "candidates", "nccl_ok", "strategy", "triton_us", "torch_nccl_us",
               "torch_nccl_ag_rs_us", "torch_symm_mem_us", "speedup_vs_nccl", "speedup_vs_symm_mem", "pct_sol"]
    print_table(rows, columns if not smoke else columns[:7])
    failed = [r for r in rows if r["failures"] or not r["nccl_ok"]]
    summary = {"mode": "smoke" if smoke else "measured", "note": mode, "tp": tp, "gpus": gpus, "m": ms,
               "all_correct": not failed,
               "timing": "tuneforge.tune.measure.time_calls: CUDA events, L2 flushed, median; slowest rank"}
    write_results("bench_overlap", rows, summary, args.out_dir)
    for r in failed:
        print(f"WRONG: {r['op']} {r['layer']} m={r['m']}: {r['failures'] or 'torch baseline off'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
