"""`tuneforge bench router`: the MoE router's time broken down, and the permutation's bandwidth (issue 15).

Breakdown (one run at ``--tokens``): T_logit, the router matmul ``x [T, d_model] @ W^T`` (torch, cuBLAS
on a GPU); T_select, ``moe_router.route`` with the chosen strategy (softmax, top-k, renormalisation);
T_pack, ``moe_pack.pack`` of the ids by expert (none for ``masked``: the dense compute has no
permutation); T_route, the three together as one timed sequence (not the sum). The router's input makes
its logits exactly ``synthetic_logits(tokens, experts, skew...)`` (the first ``experts`` columns of x
hold them, W = [I | 0]), so ``--skew-experts/--skew-bias`` skew what the matmul produces and the
metrics (``router_metrics``) are those of that routing.

``--perm-sweep``: per batch size (tokens = batch x ``--seq-len``), the permutation = the pack plus the
gather of x's rows into the packed expert order (``index_select`` through ``sorted_ids // top_k``; the
sentinel maps to a zero row past x). Bytes counted: the ``tokens * top_k`` rows of ``d_model`` read
and the same written; not counted: the padding rows the gather also writes (``padded_rows`` minus
``rows``, up to ``experts * (block_m - 1)``) and the pack's int32 ids. Achieved GB/s against the
device's datasheet HBM peak (``tuneforge.dsl.devices``), as CSV and a PNG plot (matplotlib: the
``plot`` extra).

Timing: ``tuneforge.tune.measure.time_calls`` over input sets rotated past twice the L2, in CUDA
graphs of the calls (launch gaps vanish, as in a served decode step). Without a GPU the kernels run in
Triton's interpreter on the host clock: every output says those times are not GPU figures.
"""
from __future__ import annotations

import csv
import math
import os

from tuneforge.errors import InputError

CPU_NOTE = "not a GPU figure: Triton interpreter, host clock"
PLOT_EXTRA = 'the plot extra: pip install -e ".[plot]" (or pip install "tuneforge[plot]")'


def add_parser(bench) -> None:
    """``tuneforge bench router`` under ``bench``'s subparsers."""
    r = bench.add_parser("router", help="MoE router: T_logit/T_select/T_pack/T_route, permutation GB/s",
                         description="The MoE router's time broken down (router matmul, selection, pack, "
                                     "all three) with the routing's balance metrics; or, with --perm-sweep, "
                                     "the permutation's bandwidth against the HBM peak per batch size. "
                                     "Without a GPU the interpreter runs it: not GPU figures.")
    r.add_argument("--tokens", type=int, default=4096, metavar="T", help="tokens of the breakdown (default 4096)")
    r.add_argument("--d-model", type=int, default=4096, metavar="D", help="hidden size (>= --experts; default 4096)")
    r.add_argument("--experts", type=int, default=64, metavar="E", help="routed experts (default 64)")
    r.add_argument("--top-k", type=int, default=2, metavar="K", help="experts per token (default 2)")
    r.add_argument("--strategy", default="fused", metavar="S",
                   help="naive|fused|masked|sinkhorn (default fused)")
    r.add_argument("--no-norm-topk-prob", dest="norm_topk_prob", action="store_false",
                   help="do not renormalise the top-k weights (Qwen3-MoE does)")
    r.add_argument("--skew-experts", type=int, default=0, metavar="N", help="bias the first N experts' logits")
    r.add_argument("--skew-bias", type=float, default=0.0, metavar="B", help="by this much (default 0)")
    r.add_argument("--sinkhorn-iters", type=int, default=10, metavar="N", help="sinkhorn rounds (default 10)")
    r.add_argument("--sinkhorn-temperature", type=float, default=1.0, metavar="X",
                   help="sinkhorn temperature (default 1)")
    r.add_argument("--capacity-factor", type=float, default=1.0, metavar="X",
                   help="expert capacity of the dropped-slots metric (default 1)")
    r.add_argument("--block-m", type=int, default=64, metavar="M", help="the pack's row block (default 64)")
    r.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    r.add_argument("--seed", type=int, default=0, help="of the synthetic inputs")
    r.add_argument("--perm-sweep", action="store_true", help="sweep the permutation over --batch-sizes")
    r.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], metavar="B",
                   help="the sweep's batch sizes (default 1 2 4 ... 64)")
    r.add_argument("--seq-len", type=int, default=128, metavar="L",
                   help="tokens per sequence in the sweep (default 128)")
    r.add_argument("--csv-out", metavar="F.csv", help="write the sweep's CSV here")
    r.add_argument("--plot-out", metavar="F.png", help="plot the sweep here (needs matplotlib)")
    r.add_argument("--out-dir", metavar="DIR", help="where the JSON goes (default $TUNEFORGE_RESULTS "
                                                    "or the current directory)")
    r.set_defaults(func=cmd_bench_router)


def _check(args) -> None:
    """Every refusal before any work, one line each."""
    from tuneforge.kernels.moe_router import STRATEGIES, check_masked
    if args.strategy not in STRATEGIES:
        raise InputError(f"unknown --strategy {args.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    for name in ("tokens", "d_model", "experts", "top_k", "seq_len"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        raise InputError(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if args.d_model < args.experts:
        raise InputError(f"--d-model {args.d_model} must be >= --experts {args.experts} (x holds the logits)")
    if not 0 <= args.skew_experts <= args.experts:
        raise InputError(f"--skew-experts must be in [0, {args.experts}], got {args.skew_experts}")
    if args.block_m < 1 or args.block_m & (args.block_m - 1):
        raise InputError(f"--block-m must be a power of two, got {args.block_m}")
    if args.sinkhorn_iters < 0 or not args.sinkhorn_temperature > 0:
        raise InputError(f"--sinkhorn-iters must be >= 0 and --sinkhorn-temperature > 0, got "
                         f"{args.sinkhorn_iters}, {args.sinkhorn_temperature}")
    if not args.capacity_factor > 0:
        raise InputError(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    if args.strategy == "masked":
        check_masked(args.experts)
    if args.perm_sweep:
        if args.strategy == "masked":
            raise InputError("--perm-sweep: the masked strategy has no permutation (dense compute)")
        if any(b < 1 for b in args.batch_sizes):
            raise InputError(f"--batch-sizes must all be >= 1, got {args.batch_sizes}")
    elif args.csv_out or args.plot_out:
        raise InputError("--csv-out and --plot-out are the sweep's outputs: add --perm-sweep")
    if args.plot_out:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError(f"--plot-out needs matplotlib, which is not installed: {PLOT_EXTRA}") from None


class _Bench:
    """The device, its spec, the dtype and the timing every measurement here shares."""

    def __init__(self, args):
        import torch
        import tuneforge
        from tuneforge.dsl.devices import local_device
        from tuneforge.dsl.problem import DTYPES
        self.torch = torch
        self.gpu = torch.cuda.is_available() and not tuneforge.INTERPRETED
        self.device = torch.device("cuda" if self.gpu else "cpu")
        self.spec = local_device() if self.gpu else None
        self.dtype = DTYPES[args.dtype]
        self.args = args

    def sets(self, nbytes: int) -> int:
        """Input sets that together exceed twice the L2 (one without a GPU: no cache to defeat)."""
        if not self.gpu:
            return 1
        return max(1, min(16, math.ceil(2 * self.spec.l2_mb * 2**20 / max(1, nbytes))))

    def time_us(self, calls) -> tuple[float, str]:
        from tuneforge.tune.measure import time_calls
        if self.gpu:
            t = time_calls(calls, graph=True, rep=max(50, 20 * len(calls)))
        else:
            t = time_calls(calls)
        return t.median_s * 1e6, t.method

    def router_inputs(self, tokens: int, seed: int):
        """x_ext [tokens + 1, d_model] (x = its first tokens rows; the last row zero, for the gather's
        sentinel) and W [experts, d_model] with x @ W^T == synthetic_logits(...) exactly."""
        from tuneforge.kernels.moe_router import synthetic_logits
        torch, a = self.torch, self.args
        g = torch.Generator(device=self.device).manual_seed(seed)
        x_ext = torch.randn(tokens + 1, a.d_model, generator=g, device=self.device).to(self.dtype)
        x_ext[:tokens, :a.experts] = synthetic_logits(tokens, a.experts, skew_experts=a.skew_experts,
                                                      skew_bias=a.skew_bias, dtype=self.dtype,
                                                      device=self.device, seed=seed)
        x_ext[tokens] = 0
        w = torch.zeros(a.experts, a.d_model, dtype=self.dtype, device=self.device)
        w[:, :a.experts] = torch.eye(a.experts, dtype=self.dtype, device=self.device)
        return x_ext, w

    def gpu_figure(self) -> dict:
        if self.gpu:
            return {"gpu_figure": True, "device": self.spec.name, "hbm_peak_gbs": self.spec.hbm_gbs}
        return {"gpu_figure": False, "note": CPU_NOTE}


def _route_fn(args):
    from tuneforge.kernels.moe_router import route
    return lambda logits, out, ids_out: route(
        logits, args.top_k, norm_topk_prob=args.norm_topk_prob, strategy=args.strategy,
        sinkhorn_iters=args.sinkhorn_iters, sinkhorn_temperature=args.sinkhorn_temperature, out=out,
        ids_out=ids_out)


def breakdown(b: _Bench) -> tuple[dict, dict]:
    """(row, metrics) of one routing at --tokens."""
    from tuneforge.kernels.moe_pack import buffer_size, pack
    from tuneforge.kernels.moe_router import router_metrics
    torch, a = b.torch, b.args
    t, e, k = a.tokens, a.experts, a.top_k
    select = _route_fn(a)
    sets = []
    for s in range(b.sets(t * a.d_model * b.dtype.itemsize)):
        x_ext, w = b.router_inputs(t, a.seed + s)
        sets.append(dict(x=x_ext[:t], w=w, logits=torch.empty(t, e, dtype=b.dtype, device=b.device),
                         weights=torch.empty(t, k, dtype=torch.float32, device=b.device),
                         ids=torch.empty(t, k, dtype=torch.int32, device=b.device),
                         packed=torch.empty(buffer_size(t, k, e, a.block_m), dtype=torch.int32, device=b.device)))
    steps = {"logit": lambda i: torch.mm(i["x"], i["w"].t(), out=i["logits"]),
             "select": lambda i: select(i["logits"], i["weights"], i["ids"])}
    if a.strategy != "masked":
        steps["pack"] = lambda i: pack(i["ids"], e, a.block_m, out=i["packed"])

    def whole(i):
        for step in steps.values():
            step(i)

    row = dict(tokens=t, d_model=a.d_model, experts=e, top_k=k, strategy=a.strategy, dtype=a.dtype,
               block_m=a.block_m if "pack" in steps else None)
    whole(sets[0])      # the routing the metrics describe
    metrics = router_metrics(sets[0]["ids"], e, a.capacity_factor)
    for name, step in list(steps.items()) + [("route", whole)]:
        row[f"T_{name}_us"], row["timing"] = b.time_us([lambda i=i, step=step: step(i) for i in sets])
    row.setdefault("T_pack_us", None)
    return row, metrics


def perm_sweep(b: _Bench) -> list[dict]:
    from tuneforge.kernels.moe_pack import buffer_size, max_padded, pack
    from tuneforge.kernels.moe_router import router_metrics
    torch, a = b.torch, b.args
    e, k, d = a.experts, a.top_k, a.d_model
    select = _route_fn(a)
    rows = []
    for batch in a.batch_sizes:
        t = batch * a.seq_len
        padded = max_padded(t, k, e, a.block_m)
        sets = []
        for s in range(b.sets(2 * t * k * d * b.dtype.itemsize)):
            x_ext, w = b.router_inputs(t, a.seed + s)
            _, ids = select(x_ext[:t] @ w.t(), None, None)
            sets.append(dict(x_ext=x_ext, ids=ids, rows=torch.empty(padded, d, dtype=b.dtype, device=b.device),
                             packed=torch.empty(buffer_size(t, k, e, a.block_m), dtype=torch.int32,
                                                device=b.device)))

        def permute(i):
            sorted_ids = pack(i["ids"], e, a.block_m, out=i["packed"]).sorted_ids
            torch.index_select(i["x_ext"], 0, torch.div(sorted_ids, k, rounding_mode="floor"), out=i["rows"])

        us, method = b.time_us([lambda i=i: permute(i) for i in sets])
        nbytes = 2 * t * k * d * b.dtype.itemsize
        gbs = nbytes / (us * 1e-6) / 1e9
        row = dict(batch_size=batch, seq_len=a.seq_len, tokens=t, rows=t * k, padded_rows=padded, d_model=d,
                   bytes=nbytes, perm_us=us, gbs=gbs, hbm_peak_gbs=b.spec.hbm_gbs if b.gpu else None,
                   pct_hbm_peak=100.0 * gbs / b.spec.hbm_gbs if b.gpu else None,
                   max_over_mean=router_metrics(sets[0]["ids"], e, a.capacity_factor)["max_over_mean"],
                   timing=method, figure="gpu" if b.gpu else CPU_NOTE)
        rows.append(row)
        print(f"  batch {batch} ({t} tokens): {us:.1f} us, {gbs:.1f} GB/s", flush=True)
    return rows


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


def _plot(path: str, rows: list[dict], b: _Bench) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    a = b.args
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["batch_size"] for r in rows], [r["gbs"] for r in rows], "o-",
            label=f"pack + gather ({a.strategy} routing)")
    if b.gpu:
        ax.axhline(b.spec.hbm_gbs, color="gray", linestyle="--", label=f"{b.spec.name} HBM peak")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["batch_size"] for r in rows], [str(r["batch_size"]) for r in rows])
    ax.set_xlabel(f"batch size (x {a.seq_len} tokens)")
    ax.set_ylabel("GB/s (token rows read + written)")
    where = b.spec.name if b.gpu else f"CPU: {CPU_NOTE}"
    ax.set_title(f"MoE permutation, d_model {a.d_model}, {a.experts} experts, top-{a.top_k}, {a.dtype}\n{where}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp", format="png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")




def cmd_bench_router(args) -> int:
    _check(args)
    from tuneforge.results import print_table, write_results
    b = _Bench(args)
    out_dir = args.out_dir or os.environ.get("TUNEFORGE_RESULTS") or "."
    where = b.spec.name if b.gpu else f"cpu ({CPU_NOTE})"
    if args.perm_sweep:
        print(f"permutation sweep on {where}")
        rows = perm_sweep(b)
        print_table(rows, ["batch_size", "tokens", "rows", "padded_rows", "perm_us", "gbs"]
                    + (["hbm_peak_gbs", "pct_hbm_peak"] if b.gpu else []))
        if not b.gpu:
            print(f"({CPU_NOTE})")
        if args.csv_out:
            _write_csv(args.csv_out, rows)
        if args.plot_out:
            _plot(args.plot_out, rows, b)
        summary = dict(b.gpu_figure(), counted="tokens*top_k rows of d_model read + written",
                       block_m=args.block_m, strategy=args.strategy, dtype=args.dtype)
        write_results("bench_router-perm", rows, summary, out_dir, ["tuneforge", *args.argv])
        return 0
    print(f"router breakdown on {where}")
    row, metrics = breakdown(b)
    shown = {k: "-" if v is None else v for k, v in row.items()}    # masked: no pack
    print_table([shown], ["tokens", "experts", "top_k", "strategy", "T_logit_us", "T_select_us", "T_pack_us",
                        "T_route_us", "timing"])
    print(f"load max/mean {metrics['max_over_mean']:.3f}, cv {metrics['cv']:.3f}, dropped "
          f"{metrics['dropped']} of {args.tokens * args.top_k} slots at capacity factor {args.capacity_factor}")
    if not b.gpu:
        print(f"({CPU_NOTE})")
    row["metrics"] = metrics
    summary = dict(b.gpu_figure(), skew_experts=args.skew_experts, skew_bias=args.skew_bias,
                   norm_topk_prob=args.norm_topk_prob, capacity_factor=args.capacity_factor,
                   sinkhorn_iters=args.sinkhorn_iters if args.strategy == "sinkhorn" else None,
                   sinkhorn_temperature=args.sinkhorn_temperature if args.strategy == "sinkhorn" else None)
    write_results(f"bench_router-{args.strategy}", [row], summary, out_dir, ["tuneforge", *args.argv])
    return 0
