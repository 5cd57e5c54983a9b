"""What each tuned winner buys the decode step: the tuned table with one family of winners served as
default dispatch serves it (the kernel at its launcher's default; a fusion by the unfused ops), the
step timed for each, beside tuned and default dispatch, in one run on one model. A family whose row is
faster than ``tuned`` holds a winner that costs the step (its isolated time misled the tuner, or the
engine's choice around it). The context buckets of one attention shape go together.

    python benchmarks/bench_ablation.py --model Qwen3-30B-A3B --db sqlite:///tuneforge.db [--bsz 1]

Each variant gets its own Generator (CUDA-graph decode where there is a GPU), timed by
``time_generation`` (random prompts of ``--ctx`` tokens, ``--gen`` new ones); ``--rounds`` interleaved
rounds, the fastest kept. Writes benchmarks/results/bench_ablation-<model>-<device>-<date>.json.
Found on the H200 (2026-12-03): Qwen3-30B-A3B's o_proj residual epilogue, 2.53 ms/token unfused against
2.68 tuned (``decode-fusion-ablation-Qwen3-30B-A3B-NVIDIA_H200-2026-12-03.json``).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tuneforge  # noqa: E402,F401  (before torch imports triton: picks the interpreter on CPU)
import torch  # noqa: E402

from benchmarks.common import print_table, write_results  # noqa: E402
from tuneforge.dsl.problem import bucket  # noqa: E402
from tuneforge.engine.dispatch import Ops, open_ops  # noqa: E402
from tuneforge.engine.generate import BATCH_BUCKETS, Generator, time_generation  # noqa: E402
from tuneforge.errors import InputError  # noqa: E402
from tuneforge.models.configs import load_config  # noqa: E402
from tuneforge.models.loading import load_model  # noqa: E402

CONTEXT_DIM = "ctx"     # decode attention's KV-length bucket: one shape's buckets are ablated together


def groups(families: list[tuple], ops: list[str] | None) -> dict[str, list[tuple]]:
    """Name -> the families ablated together: one per family, a shape's context buckets as one."""
    out: dict[str, list[tuple]] = {}
    for fam in families:
        op, dims = fam[0], [kv for kv in fam[1] if kv[0] != CONTEXT_DIM]
        if ops is None or op in ops:
            out.setdefault(f"{op} " + ",".join(f"{k}={v}" for k, v in dims), []).append(fam)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="Qwen3-30B-A3B", help="built-in name or a config.json / model directory")
    p.add_argument("--db", help="the tuning database (default: tuneforge's default database)")
    p.add_argument("--target", help="the tuned environment's GPU (default: this machine's)")
    p.add_argument("--allow-predicted", action="store_true", help="serve predicted winners")
    p.add_argument("--bsz", type=int, default=1)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ops", nargs="+", help="only these ops' families")
    p.add_argument("--out", help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    for name in ("bsz", "ctx", "gen", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.model)
    tuned = open_ops("tuned", db=args.db, model=cfg.name, tp=1, target=args.target,
                     allow_predicted=args.allow_predicted, quiet=True)
    m = bucket(args.bsz, BATCH_BUCKETS)
    parts = groups(tuned.table.families(m), args.ops)
    if not parts:
        raise SystemExit(f"bench_ablation: no winners serve {m} tokens of {cfg.name} in {tuned.describe()}")
    # variant -> the families served at their default (None: default dispatch)
    variants = {"tuned": [], "default": None, **{f"tuned, {name} at default": fams for name, fams in parts.items()}}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(cfg.name, config=cfg, random=True, dtype=dtype, device=device)
    best: dict[str, dict] = {}
    for rnd in range(args.rounds):
        for name, fams in variants.items():
            ops = Ops("default") if fams is None else Ops("tuned", tuned.table.served_at_default(fams))
            gen = Generator(model, ops, max_batch=args.bsz, max_len=args.ctx + args.gen, graphs=device.type == "cuda")
            ms = time_generation(gen, args.bsz, args.ctx, args.gen)["decode_ms_per_token"]
            if name not in best or ms < best[name]["decode_ms_per_token"]:
                best[name] = dict(variant=name, decode_ms_per_token=ms,
                                  decode_graph_chained=all(gen.chained_decode.values()) if gen.chained_decode else None)
            print(f"  round {rnd + 1}/{args.rounds} {name}: {ms:.3f} ms/token", flush=True)
            del gen
    rows = list(best.values())
    for r in rows:
        r["tuned_vs_this"] = best["tuned"]["decode_ms_per_token"] / r["decode_ms_per_token"]
    print_table(rows, ["variant", "decode_ms_per_token", "tuned_vs_this", "decode_graph_chained"])
    costly = [r["variant"] for r in rows[2:] if r["tuned_vs_this"] > 1.01]
    print("winners that cost the step (tuned over 1 % slower without them): " + (", ".join(costly) or "none"))
    write_results(f"bench_ablation-{cfg.name}", rows, dict(model=cfg.name, bsz=args.bsz, ctx=args.ctx, gen=args.gen,
                  rounds=args.rounds, dispatch=tuned.describe(), costly=costly), args.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:
        print(f"bench_ablation: error: {e}", file=sys.stderr)
        sys.exit(2)
