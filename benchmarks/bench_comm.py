"""Communication benchmark: tuneforge's all-reduce / all-gather / reduce-scatter vs torch.distributed
(NCCL) and torch symmetric-memory all-reduce (where present), by message size.

    torchrun --nproc-per-node 8 benchmarks/bench_comm.py          # one process per GPU
    python benchmarks/bench_comm.py --world 8                      # same, started by spawn
    python benchmarks/bench_comm.py --world 2                      # one GPU: SMOKE (see below)

With fewer GPUs than ranks, the ranks are processes sharing one GPU (time-sliced, gloo as the
baseline): that run checks correctness only; its times are printed but are not communication
figures, and the output and JSON say so (``"mode": "shared-gpu-smoke"``). Without a GPU it runs
the same smoke on CPU processes under Triton's interpreter.

For every op and message size every candidate config is checked against the torch reference,
then timed (all ranks in lockstep, CUDA-graph replays on distinct GPUs; the slowest rank counts);
the table shows the default config, the best config, the baselines, the speedup of the best over
NCCL and the best's share of the link limit (bandwidth-optimal bytes over the spec's link_gbs).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# the repository root, for ``benchmarks.common`` (appended: an installed tuneforge keeps precedence)
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_table, run_ranks, world_size, write_results  # noqa: E402

OPS = ("allreduce", "allgather", "reducescatter")


def _candidates(template, problem, spec, smoke: bool) -> list[dict]:
    """The default config plus, per strategy x variant, a few program counts (signal granularity)."""
    space = template.space(problem)
    choices = {p.name: p.choices for p in space.params}
    default = template.default_config(problem, spec)
    configs = [default]
    programs = [c for c in choices["comm_sms"] if c in ((4,) if smoke else (8, 32, 64))] or [choices["comm_sms"][-1]]
    block = min(2048, choices["block"][-1])
    for strategy in choices.get("strategy", (None,)):
        for variant in choices["variant"]:
            for sms in programs:
                c = {"variant": variant, "block": block, "num_warps": 8 if block >= 1024 else 4, "comm_sms": sms}
                if strategy is not None:
                    c = {"strategy": strategy, **c}
                if c != default and template.reject_reason(c, problem, spec) is None:
                    configs.append(c)
    return configs


def _link_bound_s(op: str, nbytes: int, world: int, spec) -> float | None:
    """Bandwidth-optimal time over the links (no latency): the hardware limit for the op."""
    if spec is None or not spec.link_gbs:
        return None
    moved = {"allreduce": 2 * (world - 1) / world * nbytes, "allgather": (world - 1) / world * nbytes,
             "reducescatter": (world - 1) / world * nbytes}[op]
    return moved / (spec.link_gbs * 1e9)


def _symm_allreduce(x: torch.Tensor, world):
    """torch symmetric-memory one-shot all-reduce, or None where torch lacks it."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
        buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buf, world.group.group_name)
        buf.copy_(x)
        op = torch.ops.symm_mem.one_shot_all_reduce
        op(buf, "sum", world.group.group_name)
        return lambda: op(buf, "sum", world.group.group_name)
    except Exception as e:  # noqa: BLE001  optional comparison only
        if world.rank == 0:
            print(f"torch symmetric memory all-reduce unavailable: {type(e).__name__}: {str(e)[:120]}")
        return None


def run(world, args) -> list[dict]:
    from tuneforge.dsl import Problem, check, get
    from tuneforge.dsl.check import split_out
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.dsl.devices import local_device
    from tuneforge.tune.measure import time_calls

    smoke = world.shared_gpu or world.device.type == "cpu"
    graph = not smoke and not args.no_graph
    spec = local_device()
    itemsize = torch.empty((), dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype])).element_size()
    largest = max(args.m) * args.n * itemsize
    heap = SymmetricHeap(world, 4 * (world.size + 2) * largest + (64 << 20))
    ctx = heap.context()
    reps = dict(warmup=2, rep=5) if smoke else dict(warmup=10, rep=args.rep)

    def slowest(seconds: float) -> float:
        return max(world.all_gather_object(seconds))

    rows = []
    for op in args.ops:
        template = get(op)
        for m in args.m:
            problem = Problem.make(op, args.dtype, world.size, m=m, n=args.n)
            inputs = [template.make_inputs(problem, ctx.device, seed, ctx) for seed in range(2)]
            nbytes = m * args.n * itemsize
            row = {"op": op, "m": m, "n": args.n, "bytes": nbytes, "world": world.size}
            results = []
            for config in _candidates(template, problem, spec, smoke):
                ok = check(template, problem, config, ctx=ctx, inputs=inputs[0])
                if not all(world.all_gather_object(bool(ok))):
                    raise RuntimeError(f"{problem.key} {config}: wrong result ({ok.reason})")
                calls = [lambda inp=inp, c=config: template.launch(**inp, config=c) for inp in inputs]
                t = time_calls(calls, graph=graph, flush_l2=False, barrier=world.barrier, **reps)
                results.append((slowest(t.median_s), config))
                ctx.synchronize()
            best_s, best = min(results, key=lambda r: r[0])
            base_calls = [lambda inp=inp: template.baseline(**split_out(inp)) for inp in inputs]
            base_s = slowest(time_calls(base_calls, graph=graph and world.backend == "nccl", flush_l2=False,
                                        barrier=world.barrier, **reps).median_s)
            row.update(default_us=results[0][0] * 1e6, best_us=best_s * 1e6, best_config=best,
                       baseline_us=base_s * 1e6, speedup=base_s / best_s)
            if op == "allreduce" and not smoke:
                symm = _symm_allreduce(inputs[0]["x"], world)
                if symm is not None:
                    row["symm_mem_us"] = slowest(time_calls([symm], graph=graph, flush_l2=False,
                                                            barrier=world.barrier, **reps).median_s) * 1e6
            bound = _link_bound_s(op, nbytes, world.size, spec)
            if bound is not None and not smoke:
                row["pct_link"] = 100.0 * bound / best_s
            rows.append(row)
            if world.rank == 0:
                print(f"{op} m={m}: best {best_s * 1e6:.1f} us ({best}), baseline {base_s * 1e6:.1f} us", flush=True)
    heap.close()
    return rows


def _rank_main(world, args):
    return run(world, args)


def _smoke_sizes(args, mode: str, ranks: int) -> None:
    # the interpreter is slow: keep the CPU smoke to tiny messages
    if mode == "cpu-interpreter-smoke":
        args.m, args.n = [m for m in args.m if m <= 8] or [1], min(args.n, 256)
    else:
        args.m = [m for m in args.m if m <= 512] or [1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=None, help="ranks (default: the GPUs, at least 2)")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--m", default="1,8,64,512,4096", help="rows per message (comma list)")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--no-graph", action="store_true", help="time with CUDA events instead of graph replays")
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    args.m = [int(v) for v in args.m.split(",") if v]
    ranks = world_size(args.world)
    ran = run_ranks(_rank_main, ranks, args, args.timeout, smoke_sizes=_smoke_sizes)
    if ran is None:
        return
    rows, mode, note = ran
    print(f"\n== bench_comm: {note}")
    cols = ["op", "m", "bytes", "default_us", "best_us", "baseline_us", "symm_mem_us", "speedup", "pct_link"]
    print_table(rows, cols)
    write_results("bench_comm", rows, {"mode": mode, "world": ranks, "note": note}, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
