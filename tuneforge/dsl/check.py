"""The checker used by tests and by the tuner: run a config, compare with the torch reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tuneforge.dsl.problem import Problem

# Elementwise tolerance |out - ref| <= atol + rtol * |ref|, by the output's dtype.
# bf16 keeps 8 mantissa bits (rounding alone is 2^-9 relative); fp16 keeps 11.
# An op with a nonlinear epilogue after a GEMM (the SiLU-mul) has its template's ``propagated_error``
# added: the table's atol on the values the GEMM feeds it, carried through the epilogue's derivative
# (a product amplifies one factor's absolute error by the other).
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.int32: (0.0, 0.0),      # ids, counts, offsets (moe_pack): exact
}


# Triton's interpreter (3.9) converts fp32 -> bf16 by truncation, not round-to-nearest: each bf16
# rounding errs up to 2^-8 instead of 2^-9, and ops that chain several bf16 stages (the TP blocks:
# GEMM, SwiGLU, GEMM, reduction) compound it. Checks of whole ops under the interpreter widen bf16
# tolerances by this factor so they judge the kernel, not the emulator's rounding.
INTERPRETER_BF16_SCALE = 4.0


def interpreter_scale(dtype) -> float:
    import tuneforge
    return INTERPRETER_BF16_SCALE if tuneforge.INTERPRETED and dtype == torch.bfloat16 else 1.0


@dataclass
class CheckResult:
    ok: bool
    max_abs_err: float
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: Optional[torch.dtype] = None,
            scale: float = 1.0, slack: Optional[torch.Tensor] = None) -> CheckResult:
    """Compare ``out`` with a high-precision ``ref``; NaN anywhere in ``out`` fails (poisoned = unwritten).

    ``scale`` widens the tolerance for ops whose error grows with a reduction length; ``slack`` (per
    element, absolute) adds what a template's ``propagated_error`` allows on top of the table.
    """
    if out.shape != ref.shape:
        return CheckResult(False, float("inf"), f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    atol, rtol = TOLERANCE[dtype or out.dtype]
    atol, rtol = atol * scale, rtol * scale
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    propagated = "" if slack is None else " + propagated"
    slack = 0.0 if slack is None else slack.detach().double().cpu()
    nan = torch.isnan(o) & ~torch.isnan(r)
    if nan.any():
        idx = tuple(nan.nonzero()[0].tolist())
        return CheckResult(False, float("nan"), f"{int(nan.sum())} elements NaN (unwritten?), first at {idx}")
    err = (o - r).abs()
    allowed = atol + rtol * r.abs() + slack
    bad = err > allowed
    max_err = float(err.max()) if err.numel() else 0.0
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        return CheckResult(False, max_err, f"{int(bad.sum())}/{err.numel()} elements off, first at {idx}: "
                                           f"{float(o[idx]):.6g} vs {float(r[idx]):.6g} (allowed "
                                           f"{float(allowed[idx]):.3g}: atol {atol:g}, rtol {rtol:g}{propagated})")
    return CheckResult(True, max_err)


def split_out(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "out"}


def poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-1)
    return t


def compare_written(out: torch.Tensor, ref: torch.Tensor, dtype: Optional[torch.dtype] = None,
                    scale: float = 1.0) -> CheckResult:
    """``compare`` of a tensor the launch writes in part (``ref`` NaN where nothing is written): the
    written elements as ``compare`` judges them, and no value where ``ref`` is NaN (a stray store; in
    ``compare`` NaN in the reference lets anything pass). Only the written elements leave the device
    (a KV cache is mostly unwritten: tens of millions of elements at real shapes)."""
    if out.shape != ref.shape:
        return CheckResult(False, float("inf"), f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    written = ~torch.isnan(ref)
    result = compare(out[written], ref[written], dtype or out.dtype, scale)
    if not result.ok:
        return compare(out, ref, dtype or out.dtype, scale)     # the same verdict, with the index in ``out``
    stray = ~written & ~torch.isnan(out)
    if stray.any():
        idx = tuple(stray.nonzero()[0].tolist())
        return CheckResult(False, float("nan"), f"{int(stray.sum())} elements written where nothing should be, "
                                                f"first at {idx}")
    return result


def propagated(template, inputs: dict, scale: float = 1.0) -> Optional[torch.Tensor]:
    """The template's ``propagated_error`` on ``inputs`` at the output dtype's atol (x ``scale``), or
    None where it has none."""
    if template.propagated_error is None:
        return None
    return template.propagated_error(TOLERANCE[inputs["out"].dtype][0] * scale, **split_out(inputs))


def check(template, problem: Problem, config: dict, *, device="cpu", seed: int = 0, ctx=None,
          inputs: Optional[dict] = None, reference: Optional[torch.Tensor] = None,
          scale: float = 1.0, slack: Optional[torch.Tensor] = None) -> CheckResult:
    """Run ``config`` once on fresh (or given) inputs with a poisoned output; compare with the reference
    (given, or computed from the inputs after the launch). The one run-and-compare of the tests, the
    tuner's benches and its verifiers; ``scale`` as in ``compare`` (``interpreter_scale`` under the
    interpreter); ``slack`` as ``propagated`` gives it (computed here unless given: a caller checking
    many configs on one input set computes it once, as it does the reference). A template with ``side_outputs`` has those inputs poisoned too, and each compared
    with its expectation (drawn before the launch), written nowhere its expectation is NaN."""
    if inputs is None:
        inputs = template.make_inputs(problem, torch.device(device), seed, ctx)
    sides = template.side_outputs(**split_out(inputs)) if template.side_outputs is not None else {}
    for name in sides:
        poison(inputs[name])
    out = poison(inputs["out"])
    if slack is None:
        slack = propagated(template, inputs, scale)
    got = template.launch(**inputs, config=config)
    got = out if got is None else got
    if ctx is not None and hasattr(ctx, "synchronize"):
        ctx.synchronize()
    elif got.is_cuda:
        torch.cuda.synchronize(got.device)
    if reference is None:
        reference = template.reference(**split_out(inputs))
    result = compare(got, reference, got.dtype, scale=scale, slack=slack)
    for name, expected in sides.items():
        if not result.ok:
            break
        side = compare_written(inputs[name], expected, inputs[name].dtype, scale=scale)
        if not side.ok:
            return CheckResult(False, side.max_abs_err, f"{name}: {side.reason}")
        result = CheckResult(True, max(result.max_abs_err, side.max_abs_err))
    return result
