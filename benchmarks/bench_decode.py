"""Flash decode (kernels/decode_attention.py) vs torch SDPA vs the KV-read floor; with ``--distributed``
the sequence-parallel forms (kernels/decode_attention_sp.py) as a correctness smoke.

    python benchmarks/bench_decode.py                  # Qwen3-32B heads (64 q / 8 KV / 128), bf16: batch 1, 8, 32, 128 x ctx 1k-128k
    python benchmarks/bench_decode.py --distributed    # and the SP forms with 2 and 4 ranks sharing the GPU
    python benchmarks/bench_decode.py --quick --distributed     # CPU (interpreter): tiny sizes, end to end

Per (batch, context): the template's default config and the best of a sweep around it (the split count
/4, /2, x1, x1.5 and x2, each at four tile / stage / warp settings the constraints accept; every timed
config's time in the row's ``sweep``), each timed as the engine runs it (CUDA graph replays over input
sets rotated past the L2); torch SDPA the engine's way (each KV head's query heads as rows, the engine's
additive mask built once) in the same run; the floor is the K and V bytes the sequences' lengths read
over a measured 1 GiB copy's bandwidth. Sequences end in the last 8 slots (the last at ctx - 1). Every
timed kernel output and SDPA's are first checked against the fp64 reference of the first and last
sequence (outputs NaN-poisoned). Where the default splits, it is also timed with its two kernels
launched the other way than served: chained as programmatic dependents (``default_pdl_us``, while
``kernels/_common.CHAINED`` is off) or plainly (``default_no_pdl_us``). Shapes whose
cache does not fit in half the free device memory are skipped (a row says so).

``--distributed``: for 2 and 4 processes sharing the one GPU (CPU ranks without one), every form of
decode_attention_sp and its torch.distributed baseline on a cache sharded by sequence, checked against
SDPA on the whole cache and timed with events after a barrier (slowest rank); ranks sharing a GPU
contend for it, so these rows are a correctness smoke, not multi-GPU figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run as a script
import tuneforge  # noqa: E402,F401  (sets TRITON_INTERPRET=1 without a GPU)
from benchmarks.common import bench_device, print_table, write_results  # noqa: E402
from tuneforge.dsl import Problem, get  # noqa: E402
from tuneforge.dsl.check import compare, poison, split_out  # noqa: E402
from tuneforge.dsl.problem import DTYPES  # noqa: E402
from tuneforge.kernels import decode_attention as DA  # noqa: E402
from tuneforge.kernels import _common as C  # noqa: E402
from tuneforge.kernels._common import launch_spec  # noqa: E402
from tuneforge.tune.measure import time_calls  # noqa: E402

# issue 16's goals (% of the KV-read floor)
TARGETS = "batch 1: >= 60 % at 8k, >= 85 % at >= 32k; batch >= 8 at >= 8k: >= 90 %; never slower than SDPA"
SMOKE = {"cuda": "correctness smoke (ranks share one GPU)", "cpu": "correctness smoke (CPU ranks, interpreter)"}
# (block_n, num_stages, num_warps) tried at each split count of the sweep
TILINGS = ((64, 3, 4), (64, 4, 4), (128, 2, 4), (128, 3, 8))


def target_pct(batch: int, ctx: int) -> float | None:
    if batch == 1:
        return 85.0 if ctx >= 32768 else 60.0 if ctx >= 8192 else None
    return 90.0 if ctx >= 8192 else None


def make_sets(args, batch: int, ctx: int, device, sets: int) -> list[dict]:
    """``sets`` input sets drawn on the device (a 128k-key cache is too big to draw on the host): cache
    views [batch, kv_heads, ctx, head_dim] of a longer cache (strided, as the engine's), lengths in the
    last 8 slots, the last sequence's the whole ctx."""
    dtype = DTYPES[args.dtype]
    out = []
    for s in range(sets):
        g = torch.Generator(device=device).manual_seed(s)
        cache = torch.randn((2, batch, args.kv_heads, ctx + 8, args.head_dim), generator=g, device=device,
                            dtype=dtype)
        positions = ctx - 1 - torch.randint(0, min(8, ctx), (batch,), generator=g, device=device)
        positions[-1] = ctx - 1
        q = torch.randn((batch, args.heads, args.head_dim), generator=g, device=device, dtype=dtype)
        out.append(dict(q=q, k=cache[0, :, :, :ctx], v=cache[1, :, :, :ctx], positions=positions,
                        mask=DA.valid_slots_mask(positions, ctx, dtype)))
    return out


def checked(got: torch.Tensor, inputs: dict) -> str:
    """'ok', or why ``got`` differs from the fp64 reference of the first and last sequence."""
    ends = [0, inputs["q"].shape[0] - 1]
    ref = DA.reference(*(inputs[n][ends] for n in ("q", "k", "v", "positions")))
    result = compare(got[ends], ref, got.dtype)
    return "ok" if result else f"WRONG: {result.reason}"


def sweep_configs(problem: Problem, spec, default: dict) -> list[dict]:
    """The default's split count over 4, over 2, kept, x1.5 (about 3 programs per SM, which 64-key tiles
    in 3 stages leave room for) and doubled (the nearest listed), at each of ``TILINGS`` with pointer
    loads, then the same with TMA loads where the device has them; those the constraints accept, the
    default first. The split count matters most at short batches (issue 16: 16 splits beat 32 at batch 1
    while the last split combined in-launch)."""
    s = DA.SPLITS
    i = s.index(default["splits"])
    configs = [default]
    for splits in sorted({s[max(0, i - 4)], s[max(0, i - 2)], s[i], s[min(len(s) - 1, i + 1)],
                          s[min(len(s) - 1, i + 2)]}):
        for block_n, stages, warps in TILINGS:
            c = dict(splits=splits, block_n=block_n, num_warps=warps, num_stages=stages, tma=False)
            if c not in configs and get(DA.OP).reject_reason(c, problem, spec) is None:
                configs.append(c)
    # then the same configs with TMA loads, where the device has them (so a cut sweep keeps every split)
    tma = [dict(c, tma=True) for c in configs]
    return configs + [c for c in tma if get(DA.OP).reject_reason(c, problem, spec) is None]


def bench(args, device, spec, copy_bps) -> list[dict]:
    rows = []
    for ctx in args.ctx:
        for batch in args.batch:
            try:
                row = bench_row(args, device, spec, copy_bps, batch, ctx)
            except torch.cuda.OutOfMemoryError as e:        # the row's cache fit, its SDPA or reference not
                row = {"batch": batch, "ctx": ctx, "check": f"skipped: out of memory: {str(e).splitlines()[0][:200]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            if "best_us" in row:
                print(f"  batch {batch} ctx {ctx}: default {row['default_us']:.1f} us, best {row['best_us']:.1f} us "
                      f"({row['pct_floor_best']:.0f} % of floor, {row['best_config']}), sdpa {row['sdpa_us']:.1f} us",
                      flush=True)
            else:
                print(f"  batch {batch} ctx {ctx}: {row['check']}", flush=True)
    return rows


def bench_row(args, device, spec, copy_bps, batch: int, ctx: int) -> dict:
    """One (batch, context): the default, the sweep and SDPA, timed and checked."""
    plan_spec = launch_spec(device)          # the launcher's: local_device() on a GPU
    gpu = device.type == "cuda"
    size = DTYPES[args.dtype].itemsize
    cache_bytes = 2 * batch * args.kv_heads * (ctx + 8) * args.head_dim * size
    row = {"batch": batch, "ctx": ctx, "MB": cache_bytes / 1e6}
    free = torch.cuda.mem_get_info(device)[0] if gpu else None
    if gpu and cache_bytes > free // 2:
        row["check"] = f"skipped: the cache needs {cache_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} free"
        return row
    sets = max(1, min(4, -(-2 * (spec.l2_mb if spec else 50) * 2**20 // cache_bytes))) if gpu else 1
    inputs = make_sets(args, batch, ctx, device, sets)
    lengths = sum(int(p) + 1 for p in inputs[0]["positions"].tolist())
    floor_s = 2 * args.kv_heads * args.head_dim * size * lengths / copy_bps
    problem = Problem.make(DA.OP, args.dtype, m=batch, heads=args.heads, kv_heads=args.kv_heads,
                           head_dim=args.head_dim, ctx=ctx)
    default = DA.default_config(problem, plan_spec)
    outs = [torch.empty_like(i["q"]) for i in inputs]
    rep = max(20, 10 * sets) if gpu else 3

    def ours_us(config):
        first = inputs[0]
        DA.decode_attention(first["q"], first["k"], first["v"], first["positions"], out=poison(outs[0]),
                            config=config)
        status = checked(outs[0], first)
        us = time_calls([lambda i=i, o=o: DA.decode_attention(i["q"], i["k"], i["v"], i["positions"], out=o,
                                                              config=config)
                         for i, o in zip(inputs, outs)], graph=gpu, rep=rep).median_s * 1e6
        return us, status

    row["default_us"], row["check"] = ours_us(default)
    row["config"] = default
    if gpu and DA.split_count(ctx, default) > 1:      # the combine as a dependent launch, or not: the other way
        served = C.CHAINED
        C.CHAINED = not served
        try:
            row["default_no_pdl_us" if served else "default_pdl_us"], status = ours_us(default)
        finally:
            C.CHAINED = served
        if status != "ok":
            row["check"] = f"with PDL={not served}: {status}"
    row["sweep"] = [dict(default, us=row["default_us"])]      # every timed config: the split x tiling landscape
    best_us, best = row["default_us"], default
    for config in sweep_configs(problem, plan_spec, default)[1:args.sweep + 1]:
        try:
            us, status = ours_us(config)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:          # a config this GPU cannot compile or run: noted, not fatal
            row.setdefault("sweep_errors", []).append(f"{config}: {str(e).splitlines()[0][:200]}")
            continue
        row["sweep"].append(dict(config, us=us))
        if status != "ok":
            row["check"] = f"{config}: {status}"
        elif us < best_us:
            best_us, best = us, config
    row.update(best_us=best_us, best_config=best)
    try:
        sdpa_out = DA.sdpa(inputs[0]["q"], inputs[0]["k"], inputs[0]["v"], inputs[0]["mask"])
        row["sdpa_check"] = checked(sdpa_out, inputs[0])
        del sdpa_out
        row["sdpa_us"] = time_calls([lambda i=i: DA.sdpa(i["q"], i["k"], i["v"], i["mask"]) for i in inputs],
                                    graph=gpu, rep=rep).median_s * 1e6
    except torch.cuda.OutOfMemoryError as e:
        row["sdpa_check"] = f"n/a: {str(e).splitlines()[0][:200]}"
        row["sdpa_us"] = float("nan")
    row["floor_us"] = floor_s * 1e6
    row["pct_floor_default"] = 100.0 * floor_s / (row["default_us"] * 1e-6)
    row["pct_floor_best"] = 100.0 * floor_s / (best_us * 1e-6)
    row["pct_floor_sdpa"] = 100.0 * floor_s / (row["sdpa_us"] * 1e-6)      # nan without SDPA
    row["vs_sdpa"] = row["sdpa_us"] / best_us
    row["target_pct"] = target_pct(batch, ctx)
    return row


# --- --distributed: the sequence-parallel forms, ranks sharing one device -------------------------------

def _sp_rank(world, cases, dtype, heap_bytes, label):
    """On every rank: each case's forms and baseline, checked (fp64 reference of the whole cache, and SDPA
    on it) and timed after a barrier; rows of this rank."""
    from tuneforge.dsl import check
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.kernels import decode_attention_sp as SP
    heap = SymmetricHeap(world, heap_bytes)
    ctx = heap.context()
    template = get(SP.OP)
    rows = []
    for batch, heads, kv_heads, head_dim, length in cases:
        problem = Problem.make(SP.OP, dtype, world.size, m=batch, heads=heads, kv_heads=kv_heads,
                               head_dim=head_dim, ctx=length)
        inputs = template.make_inputs(problem, ctx.device, 0, ctx)
        whole = {n: t.to(ctx.device) for n, t in split_out(DA.make_inputs(problem, torch.device("cpu"), 0)).items()}
        sdpa = DA.baseline(**whole)
        reference = template.reference(**split_out(inputs))      # gathers the shards once per case
        default = template.default_config(problem, launch_spec(ctx.device))
        for form in (*SP.FORMS, None):
            row = {"ranks": world.size, "batch": batch, "ctx": length, "form": form or "baseline (torch.distributed)",
                   "label": label}
            if form is None:
                got = SP.baseline(**split_out(inputs))
                status = compare(got, reference, got.dtype)
                call = lambda: SP.baseline(**split_out(inputs))           # noqa: E731
            else:
                config = dict(default, form=form)
                row["config"] = config
                status = check(template, problem, config, ctx=ctx, inputs=inputs, reference=reference)
                got = inputs["out"]
                call = lambda c=config: template.launch(**inputs, config=c)   # noqa: E731
            vs_sdpa = compare(got, sdpa.double(), got.dtype, scale=2.0)
            row["check"] = "ok" if status and vs_sdpa else f"WRONG: {status.reason or vs_sdpa.reason}"
            row["us"] = time_calls([call], rep=20, barrier=world.barrier).median_s * 1e6
            ctx.synchronize()
            rows.append(row)
    heap.close()
    return rows


def bench_distributed(args, device) -> list[dict]:
    from tuneforge.world import spawn
    cases = [(b, args.heads, args.kv_heads, args.head_dim, c) for b in args.sp_batch for c in args.sp_ctx]
    size = DTYPES[args.dtype].itemsize
    rows = []
    for ranks in args.ranks:
        # the fused forms' areas: 2 parities x every rank's partials of every row, with room for flags
        heap = 4 * max(ranks * b * h * (d + 1) * 4 for b, h, _, d, _ in cases) + (4 << 20)
        per_rank = spawn(_sp_rank, ranks, cases, args.dtype, heap, SMOKE[device.type], device=device.type,
                         share_gpu=device.type == "cuda" or None, timeout=540)
        for i, row in enumerate(per_rank[0]):
            row["us"] = max(r[i]["us"] for r in per_rank)           # the slowest rank's time counts
            bad = [r[i]["check"] for r in per_rank if r[i]["check"] != "ok"]
            row["check"] = bad[0] if bad else "ok"
            row["MB"] = 2 * row["batch"] * args.kv_heads * row["ctx"] * args.head_dim * size / 1e6
            rows.append(row)
            print(f"  {ranks} ranks batch {row['batch']} ctx {row['ctx']} {row['form']}: {row['us']:.1f} us, "
                  f"{row['check']}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,8,32,128", help="comma-separated batch sizes")
    ap.add_argument("--ctx", default="1024,8192,32768,131072", help="comma-separated context lengths")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--sweep", type=int, default=40,
                    help="configs of the sweep around the default to time (pointer loads, then TMA)")
    ap.add_argument("--distributed", action="store_true", help="also the SP forms with --ranks ranks sharing the GPU")
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--sp-batch", default="1,8")
    ap.add_argument("--sp-ctx", default="8192")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes for the CPU interpreter: batch 1,3 x ctx 40,200, 8 q / 2 KV heads of 16, fp32")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.ctx, args.sp_batch, args.sp_ctx = "1,3", "40,200", "2", "100"
        args.heads, args.kv_heads, args.head_dim, args.dtype, args.sweep = 8, 2, 16, "fp32", 2
        args.copy_mib = min(args.copy_mib, 8)
    for name in ("batch", "ctx", "ranks", "sp_batch", "sp_ctx"):
        setattr(args, name, [int(x) for x in getattr(args, name).split(",") if x])
    device, spec, copy_bps = bench_device(args.copy_mib)
    started = time.perf_counter()
    rows = bench(args, device, spec, copy_bps)
    columns = ["batch", "ctx", "MB", "default_us", "default_pdl_us" if not C.CHAINED else "default_no_pdl_us", "best_us", "sdpa_us", "floor_us",
               "pct_floor_default", "pct_floor_best", "pct_floor_sdpa", "vs_sdpa", "target_pct", "check"]
    print_table(rows, columns)
    timed = [r for r in rows if "best_us" in r]
    summary = {"wrong": [(r["batch"], r["ctx"], r["check"]) for r in rows
                         if r["check"] != "ok" and not r["check"].startswith("skipped")]
               + [(r["batch"], r["ctx"], "sdpa: " + r["sdpa_check"]) for r in timed if r["sdpa_check"] != "ok"],
               "skipped": [(r["batch"], r["ctx"]) for r in rows if r["check"].startswith("skipped")],
               "below_target": [(r["batch"], r["ctx"], round(r["pct_floor_best"], 1)) for r in timed
                                if r["target_pct"] and r["pct_floor_best"] < r["target_pct"]],
               "slower_than_sdpa": [(r["batch"], r["ctx"]) for r in timed if r["vs_sdpa"] < 1.0],
               "no_sdpa": [(r["batch"], r["ctx"]) for r in timed if r["sdpa_check"].startswith("n/a")],
               "copy_gbs": copy_bps / 1e9, "dtype": args.dtype,
               "shape": dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim),
               "target": TARGETS, "seconds": round(time.perf_counter() - started, 1)}
    if args.distributed:
        sp_rows = bench_distributed(args, device)
        print_table(sp_rows, ["ranks", "batch", "ctx", "form", "us", "check", "label"])
        summary["distributed"] = sp_rows
        summary["wrong"] += [(r["ranks"], r["batch"], r["ctx"], r["form"], r["check"]) for r in sp_rows
                             if r["check"] != "ok"]
    print({k: v for k, v in summary.items() if k not in ("target", "distributed")})
    write_results("bench_decode" + ("-quick" if args.quick else ""), rows, summary, args.out_dir)
    return int(bool(summary["wrong"]))


if __name__ == "__main__":
    sys.exit(main())
