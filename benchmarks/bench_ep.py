"""Expert-parallel benchmark (issue 17): per router strategy, what it costs to select, to move the tokens
to their experts' ranks and back, and the EP MoE layer with and without overlap.

    torchrun --nproc-per-node 8 benchmarks/bench_ep.py --all-strategies          # one rank per GPU
    python benchmarks/bench_ep.py --ranks 2 --share-gpu --all-strategies          # ranks share GPU 0: SMOKE
    python benchmarks/bench_ep.py --ranks 2 --all-strategies                      # no GPU: CPU SMOKE

Every rank holds ``--tokens`` tokens of ``--d-model`` (its own batch, as under EP) and the experts
``[r E / N, (r + 1) E / N)`` of ``--experts`` (``--inter`` channels each). The router's logits are
``moe_router.synthetic_logits`` (``--skew-experts N --skew-bias B`` favour the first N experts); x and the
experts are drawn as ``kernels/moe_block``'s template draws them. The EP layer takes every rank's tokens
on every rank and dispatches each rank's row share, so all ranks draw all N x T rows alike and rank r's
tokens are rows [r T, (r + 1) T). Printed on rank 0, per ``--strategy`` (naive | fused | sinkhorn, or
``--all-strategies``):

- dT_select: ``moe_router.route``'s time minus the naive strategy's (torch softmax + top-k);
- T_comm: dispatch + combine of the routed rows (``kernels/moe_alltoall``: counts exchanged on the
  device, rows pushed into the owners' heap buffers) against ``all_to_all_single`` with its counts
  exchange (NCCL across GPUs, gloo otherwise); both with the same one-op stand-in experts;
- load skew: the routing's per-expert load max/mean and CV (``moe_router.router_metrics``, every rank's
  slots), and the busiest rank's received rows over the mean;
- T_layer without (1 chunk) and with overlap (the best of 2 and 4 chunks: the all-to-all of one chunk on a
  side stream while the local experts run on another) of ``kernels/moe_block``'s EP layer (dispatch ->
  local grouped GEMMs -> combine, ep at its default config), and eta_overlap =
  (T_comm + T_compute - T_layer) / min(T_comm, T_compute) of that config's parts
  (``moe_block.ep_parts`` / ``eta_overlap``; none include the final all-gather).

Every figure is the slowest rank's median. Ranks sharing one GPU (``--share-gpu``, or fewer GPUs than
ranks) and CPU processes under Triton's interpreter check correctness only: the table and the JSON say
"correctness smoke" and their times are not communication figures. Every timed call is first checked
against its torch reference (fp64) on every rank. JSON under benchmarks/results/ (``--out-dir``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# the repository root, for ``benchmarks.common`` (appended: an installed tuneforge keeps precedence)
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_table, run_ranks, world_size, write_results  # noqa: E402
from tuneforge.errors import InputError  # noqa: E402

STRATEGIES = ("naive", "fused", "sinkhorn")     # the router strategies; masked is dense (no all-to-all)
# the CPU smoke's sizes (the interpreter runs every program one after another)
CPU_CAPS = dict(tokens=8, d_model=64, inter=64)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default 4096)")
    p.add_argument("--d-model", type=int, default=4096, help="hidden size (default 4096)")
    p.add_argument("--experts", type=int, default=64, help="routed experts in all, a multiple of the ranks (64)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--inter", type=int, default=1024, help="each expert's intermediate size (default 1024)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--strategy", choices=STRATEGIES, default="fused", help="the router strategy (fused)")
    which.add_argument("--all-strategies", action="store_true", help="naive, fused and sinkhorn")
    p.add_argument("--skew-experts", type=int, default=0, help="bias the first N experts' logits")
    p.add_argument("--skew-bias", type=float, default=0.0, help="by this much (default 0)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--ranks", type=int, default=None, help="ranks to spawn without torchrun (default: the GPUs, "
                                                           "at least 2)")
    p.add_argument("--share-gpu", action="store_true", help="spawned ranks share GPU 0 (a correctness smoke)")
    p.add_argument("--rep", type=int, default=30, help="timed repetitions (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = p.parse_args(argv)
    args.strategies = list(STRATEGIES) if args.all_strategies else [args.strategy]
    return args


def check_args(args, ranks: int) -> None:
    """Every refusal before any rank starts, one line each."""
    for name in ("tokens", "d_model", "experts", "top_k", "inter", "rep"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if ranks < 2:
        raise InputError(f"expert parallelism needs at least 2 ranks, got {ranks}")
    if args.experts % ranks:
        raise InputError(f"--experts {args.experts} must be a multiple of the {ranks} ranks (experts are placed "
                         f"evenly)")
    if args.top_k > args.experts:
        raise InputError(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if not 0 <= args.skew_experts <= args.experts:
        raise InputError(f"--skew-experts must be in [0, {args.experts}], got {args.skew_experts}")


def _smoke_sizes(args, mode: str, ranks: int) -> None:
    """The CPU smoke's sizes: capped (CPU_CAPS), at most 4 experts per rank (a shared GPU keeps them)."""
    if mode != "cpu-interpreter-smoke":
        return
    for name, cap in CPU_CAPS.items():
        setattr(args, name, min(getattr(args, name), cap))
    args.experts = min(args.experts, 4 * ranks)
    args.top_k = min(args.top_k, args.experts)
    args.skew_experts = min(args.skew_experts, args.experts)


class Rank:
    """One rank's set-up: the heap, the timing protocol (slowest rank's median), the layer's inputs. The
    EP layer (kernels/moe_block) takes every rank's tokens on every rank and dispatches each rank's row
    share, so x and the logits of all ranks are drawn alike everywhere and rank r's tokens are rows
    [r T, (r + 1) T)."""

    def __init__(self, world, args):
        from tuneforge.dsl.heap import SymmetricHeap
        from tuneforge.dsl.problem import DTYPES
        from tuneforge.kernels import moe_block as K
        from tuneforge.models import problems as P
        self.world, self.args = world, args
        self.dtype = DTYPES[args.dtype]
        self.smoke = world.shared_gpu or world.device.type == "cpu"
        self.m = world.size * args.tokens
        self.rows = slice(world.rank * args.tokens, (world.rank + 1) * args.tokens)
        # the layer's channels (every chunk count), the round trip's and the parts' own, with room
        self.heap = SymmetricHeap(world, 2 * K.heap_bytes(self.m, args.d_model, args.top_k, world.size,
                                                          self.dtype.itemsize) + (64 << 20))
        self.ctx = self.heap.context()
        self.problem = P.moe_block(self.dtype, world.size, self.m, args.d_model, args.inter, args.experts, args.top_k)
        # x and the whole experts as the template draws them (the same on every rank); ep: rank r's experts
        self.inputs = K.make_inputs(self.problem, world.device, args.seed, self.ctx)
        self.x = self.inputs["x"]

    def time_us(self, calls) -> float:
        from tuneforge.tune.measure import time_calls
        reps = dict(warmup=1, rep=3) if self.smoke else dict(warmup=10, rep=self.args.rep)
        t = time_calls(calls, flush_l2=False, barrier=self.world.barrier, **reps)
        self.ctx.synchronize()
        return max(self.world.all_gather_object(t.median_s)) * 1e6

    def logits(self):
        """Every rank's tokens' router logits (its own are rows ``self.rows``)."""
        from tuneforge.kernels.moe_router import synthetic_logits
        a = self.args
        return synthetic_logits(self.m, a.experts, skew_experts=a.skew_experts, skew_bias=a.skew_bias,
                                dtype=self.dtype, device=self.world.device, seed=a.seed)

    def agree(self, ok, what: str) -> None:
        """Stop every rank with one line if ``what`` went wrong on any of them."""
        bad = [r for r, good in enumerate(self.world.all_gather_object(bool(ok))) if not good]
        if bad:
            raise RuntimeError(f"bench_ep: {what} is wrong on rank(s) {bad}: {getattr(ok, 'reason', '')}")


def measure(r: Rank, strategy: str, naive_select_us: float) -> dict:
    """One strategy's row."""
    from tuneforge.dsl.check import compare
    from tuneforge.kernels import moe_alltoall as a2a
    from tuneforge.kernels.moe_router import route, router_metrics
    a, world = r.args, r.world
    logits = r.logits()
    weights, ids = route(logits, a.top_k, norm_topk_prob=True, strategy=strategy)      # every rank's tokens
    mine = logits[r.rows]
    select_us = r.time_us([lambda: route(mine, a.top_k, norm_topk_prob=True, strategy=strategy)])
    balance = router_metrics(ids, a.experts)
    per_rank = torch.bincount(ids.reshape(-1).long().cpu() // (a.experts // world.size), minlength=world.size)
    x, w, i = r.x[r.rows], weights[r.rows].contiguous(), ids[r.rows].contiguous()

    # this rank's tokens there and back (the stand-in experts: one torch op), ours against all_to_all_single
    ours = lambda: a2a.round_trip(x, i, w, ctx=r.ctx, experts=a.experts)  # noqa: E731
    theirs = lambda: a2a.baseline(x, i, w, r.ctx, a.experts)              # noqa: E731
    ref = a2a.reference(x, i, w, r.ctx, a.experts)
    r.agree(compare(ours(), ref, r.dtype), f"{strategy}: dispatch + combine")
    r.agree(compare(theirs(), ref, r.dtype), f"{strategy}: all_to_all_single's round trip")
    row = dict(strategy=strategy, tokens=a.tokens, d_model=a.d_model, experts=a.experts, top_k=a.top_k,
               inter=a.inter, world=world.size, T_select_us=select_us, dT_select_us=select_us - naive_select_us,
               T_comm_us=r.time_us([ours]), T_comm_a2a_us=r.time_us([theirs]),
               load_max_over_mean=balance["max_over_mean"], load_cv=balance["cv"],
               rank_max_over_mean=float(per_rank.max() / per_rank.double().mean()))
    row["comm_speedup"] = row["T_comm_a2a_us"] / row["T_comm_us"]
    row.update(layer(r, weights, ids))
    return row


def layer(r: Rank, weights, ids) -> dict:
    """The EP layer (kernels/moe_block, ep at its default config for this shape) checked against its fp64
    reference, then timed without overlap (1 chunk) and with it (the best of 2 and 4 chunks the shape
    allows), with that config's parts alone for eta_overlap (moe_block.eta_overlap; none include the
    final all-gather, which nothing overlaps)."""
    from tuneforge.dsl.check import compare
    from tuneforge.kernels import moe_block as K
    from tuneforge.kernels._common import launch_spec
    a, inp = r.args, r.inputs
    gate_up, down = inp["shards"]["ep"]
    spec = launch_spec(r.world.device, persistent=False)
    default = K.default_config(r.problem, spec, "ep")
    args = (r.x, ids, weights, gate_up, down)
    out = K.moe_block(*args, ctx=r.ctx, experts=a.experts, config={**default, "chunks": 1})
    ref = K.reference(r.x, ids, weights, inp["gate_up"], inp["down"], None, r.ctx, a.experts)
    r.agree(compare(out, ref, r.dtype), "the EP layer")
    timed = {}
    for chunks in K.CHUNKS:
        config = {**default, "chunks": chunks}
        if K.TEMPLATE.reject_reason(config, r.problem, spec) is None:
            parts = K.ep_parts(*args, ctx=r.ctx, experts=a.experts, config=config)
            timed[chunks] = {name: r.time_us([parts[name]]) for name in ("layer", "comm", "compute")}
    row = {"T_layer_us": timed[1]["layer"]}
    overlapped = [c for c in timed if c > 1]
    if overlapped:
        best = min(overlapped, key=lambda c: timed[c]["layer"])
        t = timed[best]
        row.update(T_layer_overlap_us=t["layer"], overlap_chunks=best,
                   eta_overlap=K.eta_overlap(t["comm"], t["compute"], t["layer"]))
    return row


def run(world, args) -> list[dict]:
    from tuneforge.kernels.moe_router import route
    r = Rank(world, args)
    logits = r.logits()[r.rows]
    naive_us = r.time_us([lambda: route(logits, args.top_k, norm_topk_prob=True, strategy="naive")])
    rows = []
    for strategy in args.strategies:
        rows.append(measure(r, strategy, naive_us))
        if world.rank == 0:
            print(f"{strategy}: T_comm {rows[-1]['T_comm_us']:.1f} us (all_to_all_single "
                  f"{rows[-1]['T_comm_a2a_us']:.1f} us)", flush=True)
    r.heap.close()
    return rows


def _rank_main(world, args):
    return run(world, args)


COLUMNS = ["strategy", "dT_select_us", "T_comm_us", "T_comm_a2a_us", "comm_speedup", "load_max_over_mean",
           "load_cv", "rank_max_over_mean", "T_layer_us", "T_layer_overlap_us", "overlap_chunks", "eta_overlap"]


def main(argv=None) -> None:
    args = parse(argv)
    ranks = world_size(args.ranks)
    check_args(args, ranks)
    ran = run_ranks(_rank_main, ranks, args, args.timeout, share_gpu=args.share_gpu, smoke_sizes=_smoke_sizes)
    if ran is None:
        return
    rows, mode, note = ran
    print(f"\n== bench_ep: {note}")
    print_table(rows, [c for c in COLUMNS if any(c in row for row in rows)])
    config = {k: getattr(args, k) for k in ("tokens", "d_model", "experts", "top_k", "inter", "skew_experts",
                                            "skew_bias", "dtype", "seed")}
    write_results("bench_ep", rows, {"mode": mode, "world": ranks, "note": note, **config}, out_dir=args.out_dir)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"bench_ep: {e}")
