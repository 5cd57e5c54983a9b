"""How close correct bf16 norm + gate_up + SiLU-mul outputs come to the checker's bound, with the table
alone and with the SiLU-mul's propagated error (``silu_mul.propagated_error``), at Qwen3-32B's gate_up
(K = 5120; ``--inter`` columns of its 25600-wide intermediate, enough elements to reach the tails).

Rows, each against the fp64 reference (``gemm_fused.reference``):
- ``fused rounding`` replays the fused kernel's rounding points in fp64 on the host: x * norm_weight
  rounded to bf16 for the tensor cores, the rows' rsqrt applied to the fp32 accumulators, the SiLU-mul
  in fp32, one bf16 store;
- ``unfused bf16 chain`` is what a torch user runs (``gemm_fused.baseline``: F.rms_norm, F.linear, F.silu
  and a multiply, in bf16);
- on a GPU, ``kernel <config>``: the kernel itself at its default config and its first seeds.
``bad`` counts elements past the bound; ``worst`` is the largest error over its bound (1.0: at the bound).

    python3 benchmarks/bench_check_margin.py [--tokens 512] [--inter 6400] [--norm-scale 1.0]
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import print_table, write_results
from tuneforge.dsl.check import TOLERANCE
from tuneforge.kernels import gemm as G
from tuneforge.kernels import gemm_fused as GF
from tuneforge.kernels.silu_mul import reference as silu_mul
from tuneforge.models import problems as P


def margins(got: torch.Tensor, ref: torch.Tensor, slack: torch.Tensor) -> dict:
    atol, rtol = TOLERANCE[torch.bfloat16]
    err = (got.double().cpu() - ref.cpu()).abs()
    table = atol + rtol * ref.cpu().abs()
    both = table + slack.cpu()
    return {"elements": err.numel(), "max_abs_err": float(err.max()),
            "bad_table_alone": int((err > table).sum()), "worst_table_alone": float((err / table).max()),
            "bad_propagated": int((err > both).sum()), "worst_propagated": float((err / both).max())}


def fused_rounding(x, w, norm_weight, eps) -> torch.Tensor:
    """The fused kernel's rounding points, replayed in fp64 (see the module's docstring)."""
    rstd = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    h = (x.float() * norm_weight.float()).to(x.dtype).double()
    acc = ((h @ w.double().T).float().double() * rstd.float().double()).float()
    return silu_mul(acc).to(x.dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--inter", type=int, default=6400, help="gate_up's intermediate columns (Qwen3-32B: 25600)")
    ap.add_argument("--norm-scale", type=float, default=1.0, help="scale the norm weight (trained ones reach 4+)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = P.gemm_fused("bf16", args.tokens, (2 * args.inter, 5120), norm=True, epilogue="silu_mul")
    inputs = GF.make_inputs(problem, device, args.seed)
    inputs["norm_weight"] = (args.norm_scale * inputs["norm_weight"].float()).bfloat16()
    given = {k: v for k, v in inputs.items() if k != "out"}
    ref = GF.reference(**given)
    slack = GF.propagated_error(TOLERANCE[torch.bfloat16][0], **given)
    rows = [{"output": "fused rounding", **margins(fused_rounding(given["x"], given["w"], given["norm_weight"],
                                                                  given["eps"]), ref, slack)},
            {"output": "unfused bf16 chain", **margins(GF.baseline(**given), ref, slack)}]
    if device.type == "cuda":
        spec = G.launch_spec(device)
        for i, config in enumerate(GF.seeds(problem, spec)[:4]):
            if GF.TEMPLATE.reject_reason(config, problem, spec) is None:
                got = GF.gemm_fused(**given, config=config)
                rows.append({"output": "kernel default" if i == 0 else f"kernel seed {i}", "config": config,
                             **margins(got, ref, slack)})
    print_table(rows, ["output", "elements", "max_abs_err", "bad_table_alone", "worst_table_alone",
                       "bad_propagated", "worst_propagated"])
    write_results(f"bench_check_margin-m{args.tokens}-inter{args.inter}-norm{args.norm_scale:g}", rows,
                  {"problem": problem.key, "norm_scale": args.norm_scale, "seed": args.seed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
