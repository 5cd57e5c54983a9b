"""GEMM vs cuBLAS on Qwen3's linear layers at TP 1/2/4/8 (bf16, y = x @ w.T).

For every (layer, tp, tokens) shape: a short search over the template's seeds for the shape
(``TEMPLATE.seeds``: the default config first, the Triton kernel's portfolio, then on Hopper the
Gluon family's -- the configs the tuner also tries first), each candidate checked against cuBLAS's
output; the three fastest, the default and the fastest Gluon and skinny configs are re-timed with cuBLAS
(torch.nn.functional.linear), their replays interleaved so clock drift reaches all alike, and the
fastest of that round is reported. Timing: a CUDA graph over
enough rotated input sets to stream 3x the L2 per pass (tuneforge.tune.measure.time_calls with
graph=True), so host launch gaps do not count (an engine replays graphs too) and no set finds its
operands in cache. Reports the time ratio to cuBLAS (< 1 is faster), the default config's ratio,
and % of the speed of light (max of peak-FLOP time and HBM time of the minimum traffic).
Writes benchmarks/results/bench_gemm-<device>-<date>.json.

    python benchmarks/bench_gemm.py            # Qwen3-32B's shapes (~100), a few minutes on an H100
    python benchmarks/bench_gemm.py --quick    # TP 8, tokens 1/128/4096
    python benchmarks/bench_gemm.py --tp 2 --tokens 512 --explore 30   # and 30 random configs per shape
    python benchmarks/bench_gemm.py --all-sizes   # every Qwen3 dense size, tokens 1..8192 (sampled, <= 6 min)

``--all-sizes``: the qkv / o / gate_up / down linears of Qwen3-0.6B, 1.7B, 4B, 8B, 14B and 32B at
every TP degree of 1/2/4/8 that divides them (shapes from ``models/problems.rank_dims``), at token
counts on and between the tuned buckets (SWEEP_TOKENS). The grid (~900 shapes) is sampled so the run
fits 6 minutes on an H200: the distinct (n, k) weights sorted by size, each token count taking every
``stride``-th weight from its own offset (``sweep_grid``: each count a spread of small to large
weights, different ones per count), run round-robin over the token counts; each shape searches the
default, the next ``--triton-seeds`` - 1 Triton seeds and every Gluon seed; past ``--budget-s`` no
new shape starts (the JSON says how many ran).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import optuna
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tuneforge  # noqa: E402
from benchmarks.common import print_table, write_results  # noqa: E402
from tuneforge.dsl import Problem  # noqa: E402
from tuneforge.dsl.check import TOLERANCE  # noqa: E402
from tuneforge.errors import InputError  # noqa: E402
from tuneforge.kernels import _gemm_gluon as GW  # noqa: E402
from tuneforge.kernels import gemm as G  # noqa: E402
from tuneforge.models import problems as P  # noqa: E402
from tuneforge.models.configs import load_config  # noqa: E402
from tuneforge.tune.measure import percent_of_light, time_calls, time_interleaved  # noqa: E402

# Qwen3-32B
HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 5120, 64, 8, 128, 25600, 151936
LAYERS = {  # layer -> (n, k) per rank at tensor-parallel degree tp
    "qkv": lambda tp: ((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM // tp, HIDDEN),
    "o": lambda tp: (HIDDEN, Q_HEADS * HEAD_DIM // tp),
    "gate_up": lambda tp: (2 * INTERMEDIATE // tp, HIDDEN),
    "down": lambda tp: (HIDDEN, INTERMEDIATE // tp),
    "lm_head": lambda tp: (VOCAB // tp, HIDDEN),
}
# --all-sizes: every Qwen3 dense size, token counts on and between the tuned buckets
QWEN3_DENSE = ("Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B")
SWEEP_TOKENS = (1, 7, 16, 48, 129, 200, 384, 511, 1024, 3000, 8192)
SWEEP_SHAPES = 48      # sampled (weight, tokens) pairs: ~5-6 s each on an H200 with the short search
MIN_INPUT_SETS, MAX_INPUT_SETS = 2, 32
REPLAYS = 20     # timed replays of the graph over all input sets (the median is reported)
FINALISTS = 3    # fastest candidates of the search re-timed next to cuBLAS


def input_sets(problem: Problem, spec, device) -> list[dict]:
    """Enough input sets that one pass over them streams 3x the L2: each call finds its operands
    in HBM, as in a model where every layer has its own weights."""
    per_set = G.work(problem)[1]
    count = max(MIN_INPUT_SETS, min(MAX_INPUT_SETS, math.ceil(3 * spec.l2_mb * 2**20 / per_set)))
    return [G.make_inputs(problem, device, seed=s) for s in range(count)]


def matches(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Elementwise within the checker's tolerance of cuBLAS's output (on the GPU: prefill-sized
    outputs are too large to compare on the host); a NaN (unwritten element) fails."""
    atol, rtol = TOLERANCE[out.dtype]
    e = expected.float()
    return bool(((out.float() - e).abs() <= atol + rtol * e.abs()).all())


def explored_configs(problem: Problem, spec, count: int, seed: int) -> list[dict]:
    """``count`` configs drawn at random from the template's whole space (Optuna's random sampler)
    that pass every constraint: a check that the portfolio is not missing a better family."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space, picked = G.TEMPLATE.space(problem), []
    for _ in range(200 * count):
        if len(picked) == count:
            break
        config = space.sample(study.ask())
        if config not in picked and G.TEMPLATE.reject_reason(config, problem, spec) is None:
            picked.append(config)
    return picked


def dense_linears(models=QWEN3_DENSE, tps=(1, 2, 4, 8)) -> dict[tuple[int, int], list[str]]:
    """(n, k) of every dense linear of ``models`` at every TP degree that divides them -> its labels
    (``Qwen3-8B tp2 qkv``), from the per-rank shapes the tuning plan uses."""
    weights: dict[tuple[int, int], list[str]] = {}
    for name in models:
        cfg = load_config(name)
        for tp in tps:
            try:
                d = P.rank_dims(cfg, tp)
            except InputError:          # tp does not divide this model's heads / MLP
                continue
            for layer, nk in (("qkv", (d.qkv, d.hidden)), ("o", (d.hidden, d.o_in)),
                              ("gate_up", (2 * d.inter, d.hidden)), ("down", (d.hidden, d.inter))):
                weights.setdefault(nk, []).append(f"{name} tp{tp} {layer}")
    return weights


def sweep_grid(weights: list, tokens=SWEEP_TOKENS, shapes: int = SWEEP_SHAPES) -> list[tuple]:
    """About ``shapes`` (weight, tokens) pairs of the full grid: weights sorted by size, token count j
    of J taking weights o, o + stride, ... (stride = grid / shapes, o = j * stride // J: the counts'
    offsets spread over the stride), listed round-robin over the counts so a run cut short still
    covers every count."""
    ordered = sorted(weights, key=lambda nk: (nk[0] * nk[1], nk))
    stride = max(1, math.ceil(len(ordered) * len(tokens) / shapes))
    offsets = [j * stride // len(tokens) for j in range(len(tokens))]     # spread over the stride
    per_count = [[(ordered[i], m) for i in range(offset, len(ordered), stride)] for offset, m in zip(offsets, tokens)]
    return [pair for rank in range(max(map(len, per_count))) for pairs in per_count if rank < len(pairs)
            for pair in [pairs[rank]]]


def bench_problem(layer: str, tp: int, problem: Problem, spec, device, explore: int = 0,
                  triton_seeds: int | None = None) -> dict:
    sets = input_sets(problem, spec, device)
    x0, w0 = sets[0]["x"], sets[0]["w"]
    expected = G.baseline(x0, w0)

    def timed(fn):
        # one CUDA graph over all sets: launch gaps vanish (as in served decode), caches do not help
        return time_calls([lambda s=s: fn(s) for s in sets], graph=True, rep=REPLAYS * len(sets)).median_s

    def run_config(cfg):
        return lambda s: G.gemm(s["x"], s["w"], out=s["out"], config=cfg)

    def run_cublas(s):
        return torch.nn.functional.linear(s["x"], s["w"])

    portfolio = G.TEMPLATE.seeds(problem, spec)
    if triton_seeds is not None:      # the head of the Triton kernel's portfolio and every Gluon seed
        triton_list = [c for c in portfolio if c["kernel"] == "triton"][:triton_seeds]
        portfolio = [c for c in portfolio if c in triton_list or c["kernel"] != "triton"]
    explored = [c for c in explored_configs(problem, spec, explore, seed=problem["m"]) if c not in portfolio]
    tried = [{"config": c, "source": "portfolio"} for c in portfolio] + [{"config": c, "source": "explored"}
                                                                         for c in explored]
    for t in tried:
        try:
            if matches(G.gemm(x0, w0, out=torch.full_like(expected, float("nan")), config=t["config"]), expected):
                t["us"] = timed(run_config(t["config"])) * 1e6
            else:
                t["error"] = "wrong result"
        except Exception as e:   # a candidate that fails to compile (resources) is skipped, not fatal
            t["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    # the search's front runners, the default and the fastest Gluon config, re-timed with cuBLAS in
    # interleaved replays: the reported ratios share the same clocks (back-to-back runs drifted by up to 20 %)
    ranked = sorted((t for t in tried if "us" in t), key=lambda t: t["us"])
    finalists = ranked[:FINALISTS]
    families = [next((t for t in ranked if GW.kernel_of(t["config"]) == kind), None) for kind in ("gluon_ws", "skinny")]
    for t in ([tried[0]] if "us" in tried[0] else []) + [t for t in families if t is not None]:
        if t not in finalists:
            finalists.append(t)
    times = time_interleaved([[lambda s=s, fn=fn: fn(s) for s in sets]
                              for fn in [run_cublas] + [run_config(t["config"]) for t in finalists]],
                             rounds=REPLAYS)
    cublas_s = times[0].median_s
    for t, timing in zip(finalists, times[1:]):
        t["final_us"] = timing.median_s * 1e6
    best = min(finalists, key=lambda t: t["final_us"])
    best_s = best["final_us"] * 1e-6
    flops, nbytes = G.work(problem)
    default = tried[0]
    best_of = {kind: min((t["final_us"] for t in finalists if GW.kernel_of(t["config"]) == kind), default=None)
               for kind in GW.KERNELS}
    return {
        "layer": layer, "tp": tp, "m": problem["m"], "n": problem["n"], "k": problem["k"],
        "triton_us": best_s * 1e6, "cublas_us": cublas_s * 1e6, "ratio": best_s / cublas_s,
        "default_ratio": default["final_us"] * 1e-6 / cublas_s if "final_us" in default else None,
        "triton_ratio": best_of["triton"] * 1e-6 / cublas_s if best_of["triton"] else None,
        "gluon_ratio": best_of["gluon_ws"] * 1e-6 / cublas_s if best_of["gluon_ws"] else None,
        "skinny_ratio": best_of["skinny"] * 1e-6 / cublas_s if best_of["skinny"] else None,
        "best_kernel": GW.kernel_of(best["config"]),
        "pct_sol": percent_of_light(best_s, flops, nbytes, spec, problem.dtype),
        "cublas_pct_sol": percent_of_light(cublas_s, flops, nbytes, spec, problem.dtype),
        "input_sets": len(sets), "best_config": best["config"], "candidates": tried,
    }


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 4096])
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    ap.add_argument("--quick", action="store_true", help="TP 8 and tokens 1/128/4096 only")
    ap.add_argument("--explore", type=int, default=0, metavar="N",
                    help="also try N random configs from the whole space per shape (they are marked in the JSON)")
    ap.add_argument("--all-sizes", action="store_true",
                    help="every Qwen3 dense size's linears at TP 1/2/4/8 and SWEEP_TOKENS, sampled (see above)")
    ap.add_argument("--shapes", type=int, default=SWEEP_SHAPES, help="--all-sizes: (weight, tokens) pairs sampled")
    ap.add_argument("--triton-seeds", type=int, default=GW.TRITON_SEEDS_FIRST, metavar="N",
                    help="--all-sizes: search the first N Triton seeds (the default first) and every Gluon seed "
                         "(the default N: the head of the tuner's seeds)")
    ap.add_argument("--budget-s", type=float, default=320.0, help="--all-sizes: start no shape past this many seconds")
    args = ap.parse_args(argv)
    if args.quick:
        args.tp, args.tokens = [8], [1, 128, 4096]
    if not torch.cuda.is_available() or tuneforge.INTERPRETED:
        print("bench_gemm needs a CUDA GPU (the interpreter's times mean nothing here)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    spec = G.launch_spec(device)
    if args.all_sizes:
        weights = dense_linears(tps=tuple(args.tp))
        jobs = [(weights[nk], nk, m) for nk, m in sweep_grid(list(weights), SWEEP_TOKENS, args.shapes)]
        name, triton_seeds, budget = "bench_gemm-all-sizes", args.triton_seeds, args.budget_s
        print(f"{len(jobs)} of {len(weights) * len(SWEEP_TOKENS)} (weight, tokens) shapes, "
              f"{len(weights)} distinct weights", flush=True)
    else:
        jobs = [([f"Qwen3-32B tp{tp} {layer}"], LAYERS[layer](tp), m)
                for tp in args.tp for layer in args.layers for m in args.tokens]
        name, triton_seeds, budget = "bench_gemm", None, None
    start = time.perf_counter()
    rows = []
    for i, (labels, (n, k), m) in enumerate(jobs):
        if budget is not None and time.perf_counter() - start > budget:
            print(f"budget of {budget:.0f} s spent: {i} of {len(jobs)} shapes ran", flush=True)
            break
        model, tp, layer = labels[0].split()
        row = bench_problem(layer, int(tp[2:]), Problem.make("gemm", "bf16", m=m, n=n, k=k), spec, device,
                            args.explore, triton_seeds)
        row.update(model=model, weights=labels)
        rows.append(row)
        print(f"[{time.perf_counter() - start:6.1f}s] {model:10s} {layer:8s} {tp} m={m:<5d} n={n:<6d} k={k:<6d} "
              f"best {row['triton_us']:9.1f} us  cublas {row['cublas_us']:9.1f} us  ratio {row['ratio']:.3f} "
              f"(default {row['default_ratio'] or float('nan'):.3f}, gluon {row['gluon_ratio'] or float('nan'):.3f}, "
              f"skinny {row['skinny_ratio'] or float('nan'):.3f})  "
              f"{row['best_config']}", flush=True)
        if (i + 1) % 10 == 0:
            write_results(name, rows, summarize(rows, time.perf_counter() - start, complete=False))
    summary = summarize(rows, time.perf_counter() - start, complete=len(rows) == len(jobs))
    if args.all_sizes:
        summary.update(grid_shapes=len(weights) * len(SWEEP_TOKENS), sampled_shapes=len(jobs),
                       tokens=list(SWEEP_TOKENS), triton_seeds=triton_seeds, budget_s=budget,
                       sample="sweep_grid: distinct (n, k) weights sorted by size, token count j of J takes weights "
                              "o, o + stride, ... (o = j * stride // J); run round-robin over the counts")
    print_table(rows, ["model", "layer", "tp", "m", "n", "k", "triton_us", "cublas_us", "ratio", "default_ratio",
                       "gluon_ratio", "skinny_ratio", "best_kernel", "pct_sol", "cublas_pct_sol"])
    print(f"geomean ratio to cuBLAS {summary['geomean_ratio']:.3f} (default config {summary['geomean_default_ratio']:.3f}), "
          f"max {summary['max_ratio']:.3f}, {summary['shapes_above_1.10']}/{len(rows)} shapes above 1.10 "
          f"(default: max {summary['max_default_ratio']:.3f}, {summary['default_shapes_above_1.10']} above 1.10), "
          f"Gluon fastest at {summary['gluon_best_shapes']}, skinny at {summary['skinny_best_shapes']}, "
          f"geomean {summary['geomean_pct_sol']:.1f}% of speed of light (cuBLAS {summary['geomean_cublas_pct_sol']:.1f}%), "
          f"{summary['seconds']:.0f} s")
    for m, by in summary["by_tokens"].items():
        print(f"  m={m:<5} {by['shapes']:3d} shapes  geomean {by['geomean_ratio']:.3f}  max {by['max_ratio']:.3f}  "
              f"default geomean {by['geomean_default_ratio']:.3f}")
    write_results(name, rows, summary)
    return 0


def summarize(rows: list[dict], seconds: float, complete: bool) -> dict:
    """Ratios over all rows (and per token count); ``complete`` False marks a file written part-way."""
    ratios = [r["ratio"] for r in rows]
    defaults = [r["default_ratio"] for r in rows if r["default_ratio"]]
    by_tokens = {m: [r for r in rows if r["m"] == m] for m in sorted({r["m"] for r in rows})}
    return {
        "geomean_ratio": geomean(ratios), "max_ratio": max(ratios),
        "shapes_above_1.10": sum(r > 1.10 for r in ratios), "shapes": len(rows),
        "geomean_default_ratio": geomean(defaults), "max_default_ratio": max(defaults, default=float("nan")),
        "default_shapes_above_1.10": sum(r > 1.10 for r in defaults),
        "gluon_best_shapes": sum(r.get("best_kernel") == "gluon_ws" for r in rows),
        "skinny_best_shapes": sum(r.get("best_kernel") == "skinny" for r in rows),
        "by_tokens": {m: {"shapes": len(rs), "geomean_ratio": geomean(r["ratio"] for r in rs),
                          "max_ratio": max(r["ratio"] for r in rs),
                          "geomean_default_ratio": geomean(r["default_ratio"] for r in rs if r["default_ratio"])}
                      for m, rs in by_tokens.items()},
        "geomean_pct_sol": geomean(r["pct_sol"] for r in rows),
        "geomean_cublas_pct_sol": geomean(r["cublas_pct_sol"] for r in rows),
        "dtype": "bf16", "seconds": seconds, "complete": complete,
        "method": "median over CUDA-graph replays of one pass over rotated input sets streaming 3x L2; "
                  "search: time_calls graph=True; reported: the 3 fastest, the default and the fastest Gluon config "
                  "re-timed with cuBLAS, replays interleaved (time_interleaved); ratio = triton / cublas time, "
                  "< 1 is faster",
    }


if __name__ == "__main__":
    sys.exit(main())
