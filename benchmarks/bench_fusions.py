"""Each GEMM fusion (kernels/gemm_fused.py) before and after, at a model's decode shapes: the fused
kernel against the unfused ops the engine runs in its place, both captured in CUDA graphs and replayed
interleaved (``time_interleaved``), and the torch ops (cuBLAS + torch) beside them.

What each row swaps, as the engine's forward does (``engine/dispatch``):

- ``qkv+norm``: rmsnorm then the qkv GEMM -> the GEMM with the norm in its prologue;
- ``o+residual`` / ``down+residual``: the GEMM then the next norm's residual add (``add_rmsnorm``) ->
  the GEMM adding into the residual stream, then a plain rmsnorm;
- ``gate_up+silu``: the gate_up GEMM then silu_mul -> the pair in one GEMM;
- ``gate_up+norm+silu``: rmsnorm, the gate_up GEMM, silu_mul -> one GEMM;
- ``layer``: one decoder layer's GEMMs and row ops without attention, every fusion on vs none
  (x the layers: the per-token saving).

Triton kernels run the best of the first ``--configs`` of their template's seeds (fused: gemm_fused's
seeds; unfused GEMMs: gemm's portfolio; rmsnorm / silu_mul: their defaults), each timed alone first,
so both sides get the same short search. Every fused output is checked against the unfused one first.

    python benchmarks/bench_fusions.py [--model Qwen3-32B] [--tokens 1] [--configs 4]

Writes benchmarks/results/bench_fusions-<device>-<date>.json. About a minute on an H200 at the defaults.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import print_table, write_results  # noqa: E402
from tuneforge.kernels import gemm as G  # noqa: E402
from tuneforge.kernels import gemm_fused as GF  # noqa: E402
from tuneforge.kernels import rmsnorm as RMS  # noqa: E402
from tuneforge.kernels import silu_mul as SILU  # noqa: E402
from tuneforge.kernels._common import launch_spec  # noqa: E402
from tuneforge.models import problems as P  # noqa: E402
from tuneforge.models.configs import load_config  # noqa: E402
from tuneforge.tune.measure import time_interleaved  # noqa: E402

SETS = 2            # weight sets rotated per candidate (each larger than L2 at 32B sizes, or near it)
ROUNDS = 30
EPS = RMS.QWEN3_EPS


def best(candidates: dict, rounds: int = 10):
    """(name, seconds) of the fastest of ``candidates`` (name -> calls), replays interleaved."""
    names = list(candidates)
    times = time_interleaved([candidates[n] for n in names], rounds=rounds)
    i = min(range(len(names)), key=lambda j: times[j].median_s)
    return names[i], times[i].median_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="Qwen3-32B")
    parser.add_argument("--tokens", type=int, default=1, help="tokens per step (decode batch)")
    parser.add_argument("--configs", type=int, default=4, help="seeds tried per Triton GEMM")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_fusions needs a CUDA GPU", file=sys.stderr)
        return 2
    device, dtype, m = torch.device("cuda"), torch.bfloat16, args.tokens
    spec = launch_spec(device)
    d = P.rank_dims(load_config(args.model), 1)
    h = d.hidden
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    weights = {name: [rand(n, k, scale=k ** -0.5) for _ in range(SETS)]
               for name, (n, k) in {"qkv": (d.qkv, h), "o": (h, d.o_in), "gate_up": (2 * d.inter, h),
                                    "down": (h, d.inter)}.items()}
    norm_w = (1 + 0.1 * torch.randn(h, generator=g, device=device)).to(dtype)
    residual, a_o, a_down = rand(m, h), rand(m, d.o_in), rand(m, d.inter)

    gemm_cfg, fused_cfg = {}, {}

    def gemm_config(name):
        """The fastest of gemm's first seeds for weight ``name`` at m tokens."""
        if name not in gemm_cfg:
            w = weights[name]
            x = torch.empty(m, w[0].shape[1], dtype=dtype, device=device).normal_()
            problem = P.gemm(dtype, m, w[0].shape)
            seeds = G.portfolio(problem, spec)[:args.configs]
            gemm_cfg[name] = seeds[int(best({str(i): [lambda c=c, wi=wi: G.gemm(x, wi, config=c) for wi in w]
                                              for i, c in enumerate(seeds)})[0])]
        return gemm_cfg[name]

    def fused_config(name, x, norm, epilogue, **kw):
        key = (name, norm, epilogue)
        if key not in fused_cfg:
            problem = P.gemm_fused(dtype, m, weights[name][0].shape, norm=norm, epilogue=epilogue)
            seeds = GF.seeds(problem, spec)[:args.configs]
            fused_cfg[key] = seeds[int(best({str(i): [lambda c=c, wi=wi: GF.gemm_fused(x, wi, config=c, **kw)
                                                       for wi in weights[name]] for i, c in enumerate(seeds)})[0])]
        return fused_cfg[key]

    def gemm(x, name, i):
        return G.gemm(x, weights[name][i], config=gemm_config(name))

    def fused(x, name, i, norm=False, epilogue="none", **kw):
        cfg = fused_config(name, x, norm, epilogue, **kw)
        return GF.gemm_fused(x, weights[name][i], config=cfg, **kw)

    res = residual.clone()   # the residual stream the in-place adds grow (timing only)
    nw = dict(norm_weight=norm_w, eps=EPS)
    # name -> (fused(i), unfused Triton(i), torch(i), check: (fused out, unfused out) on fresh inputs)
    cases = {
        "qkv+norm": (lambda i: fused(res, "qkv", i, norm=True, **nw),
                     lambda i: gemm(RMS.rmsnorm(res, norm_w, EPS), "qkv", i),
                     lambda i: F.linear(F.rms_norm(res, (h,), norm_w, EPS), weights["qkv"][i])),
        "o+residual": (lambda i: RMS.rmsnorm(fused(a_o, "o", i, epilogue="residual", residual=res, out=res), norm_w, EPS),
                       lambda i: RMS.rmsnorm(gemm(a_o, "o", i), norm_w, EPS, residual=res),
                       lambda i: RMS.baseline(F.linear(a_o, weights["o"][i]), norm_w, EPS, residual=res)),
        "gate_up+silu": (lambda i: fused(residual, "gate_up", i, epilogue="silu_mul", silu=True),
                         lambda i: SILU.silu_mul(gemm(residual, "gate_up", i)),
                         lambda i: SILU.baseline(F.linear(residual, weights["gate_up"][i]))),
        "gate_up+norm+silu": (lambda i: fused(res, "gate_up", i, norm=True, epilogue="silu_mul", silu=True, **nw),
                              lambda i: SILU.silu_mul(gemm(RMS.rmsnorm(res, norm_w, EPS), "gate_up", i)),
                              lambda i: SILU.baseline(F.linear(F.rms_norm(res, (h,), norm_w, EPS),
                                                               weights["gate_up"][i]))),
        "down+residual": (lambda i: RMS.rmsnorm(fused(a_down, "down", i, epilogue="residual", residual=res, out=res),
                                                norm_w, EPS),
                          lambda i: RMS.rmsnorm(gemm(a_down, "down", i), norm_w, EPS, residual=res),
                          lambda i: RMS.baseline(F.linear(a_down, weights["down"][i]), norm_w, EPS, residual=res)),
    }

    def layer_fused(i):         # returns the residual stream after the layer
        fused(res, "qkv", i, norm=True, **nw)
        fused(a_o, "o", i, epilogue="residual", residual=res, out=res)
        u = fused(res, "gate_up", i, norm=True, epilogue="silu_mul", silu=True, **nw)
        fused(u, "down", i, epilogue="residual", residual=res, out=res)
        return res

    def layer_unfused(i):
        gemm(RMS.rmsnorm(res, norm_w, EPS), "qkv", i)
        hn = RMS.rmsnorm(gemm(a_o, "o", i), norm_w, EPS, residual=res)
        u = SILU.silu_mul(gemm(hn, "gate_up", i))
        RMS.rmsnorm(gemm(u, "down", i), norm_w, EPS, residual=res)
        return res

    def layer_torch(i):
        F.linear(F.rms_norm(res, (h,), norm_w, EPS), weights["qkv"][i])
        hn = RMS.baseline(F.linear(a_o, weights["o"][i]), norm_w, EPS, residual=res)
        u = SILU.baseline(F.linear(hn, weights["gate_up"][i]))
        RMS.baseline(F.linear(u, weights["down"][i]), norm_w, EPS, residual=res)
        return res

    cases["layer"] = (layer_fused, layer_unfused, layer_torch)

    rows = []
    for name, (f, u, t) in cases.items():
        f(0), u(0)          # the config searches first: they grow the residual stream
        res.copy_(residual)
        got = f(0).float()
        res.copy_(residual)
        want = u(0).float()
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
        if not err < 0.05:
            sys.exit(f"bench_fusions: {name} differs from the unfused ops (max error {err:.3g} of the largest value)")
        res.copy_(residual)
        times = time_interleaved([[lambda i=i, fn=fn: fn(i) for i in range(SETS)] for fn in (f, u, t)], rounds=ROUNDS)
        fused_s, unfused_s, torch_s = (x.median_s for x in times)
        rows.append({"fusion": name, "tokens": m, "fused_us": fused_s * 1e6, "unfused_us": unfused_s * 1e6,
                     "torch_us": torch_s * 1e6, "saved_us": (unfused_s - fused_s) * 1e6,
                     "speedup": unfused_s / fused_s, "rel_err": err})
    print_table(rows, ["fusion", "tokens", "fused_us", "unfused_us", "torch_us", "saved_us", "speedup", "rel_err"])
    layer = rows[-1]
    layers = load_config(args.model).num_hidden_layers
    summary = {"model": args.model, "tokens": m, "configs_tried": args.configs, "layers": layers,
               "saved_ms_per_step": layer["saved_us"] * layers / 1e3, "gemm_configs": gemm_cfg,
               "fused_configs": {f"{n} norm={int(nm)} {e}": c for (n, nm, e), c in fused_cfg.items()}}
    print(f"{args.model}, {m} token(s): the fused layer saves {layer['saved_us']:.1f} us of "
          f"{layer['unfused_us']:.1f}; x {layers} layers = {summary['saved_ms_per_step']:.2f} ms per step")
    write_results("bench_fusions", rows, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
