"""MoE routing: the experts of each token and their weights, from the router's logits (op ``moe_router``).

``route(logits [T, experts], top_k)`` -> ``(topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32)``,
weights in descending order. Qwen3-MoE's semantics (transformers' ``Qwen3MoeTopKRouter``): softmax over
all experts in fp32, the top_k probabilities, divided by their sum when ``norm_topk_prob``.

Strategies (``strategy=``):

- ``naive``: torch softmax + topk (+ renormalisation): the baseline, 3-4 kernels.
- ``fused``: one Triton kernel per ``rows`` rows: softmax, top-k, renormalisation in registers. It selects
  on the logits (the order softmax preserves, so no rounding of the exponentials can reorder two
  experts) and breaks ties toward the lower expert index. ``torch.topk`` orders ties unspecified (on CPU
  it returned experts 2, 4, 1 for three equal values), so on tied logits the two give the same weights
  but possibly other ids. ``naive`` and ``fused`` are interchangeable: the tuned space holds ``fused``
  tiles only and the baseline is ``naive``.
- ``masked``: the same selection as ``naive``, for the dense masked expert compute ``masked_moe`` (every
  expert runs every token, the routing weights zero the unchosen; no pack, no permutation). Refused above
  ``MASKED_MAX_EXPERTS`` experts, where the dense compute is ``experts / top_k`` times the routed work.
- ``sinkhorn``: balanced routing. ``sinkhorn_iters`` rounds of Sinkhorn normalisation (rows to 1, the
  experts' columns to T / experts, in the log domain) of ``logits / sinkhorn_temperature`` choose the
  experts; the weights stay the softmax of the logits at the chosen experts. Selection ties (one token
  has nothing to balance) fall back to the larger logit. It changes which experts serve a token: the
  user's explicit choice, never a tuner's.

``router_metrics`` measures a routing's balance; ``synthetic_logits`` makes random logits with the first
``skew_experts`` experts biased by ``skew_bias`` (a skewed router) for experiments.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from tuneforge.dsl import Problem, Space, Template, categorical, pow2, register
from tuneforge.errors import InputError
from tuneforge.dsl.roofline import HBM_LATENCY_S, eager_time, roofline
from tuneforge.kernels._common import await_previous, chained, check_tensor, tile_reject_reason

OP = "moe_router"
STRATEGIES = ("naive", "fused", "masked", "sinkhorn")
# The dense masked compute runs experts / top_k times the routed FLOPs: past 16 experts it loses to the
# grouped GEMM at any top_k a model uses.
MASKED_MAX_EXPERTS = 16


@triton.jit
def _topk_softmax_kernel(logits_ptr, scores_ptr, w_ptr, ids_ptr, m, experts, stride_l, stride_s, stride_w,
                         stride_ids, TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                         ROWS: tl.constexpr, RENORM: tl.constexpr, HAS_SCORES: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, E_PAD)
    r = rows.to(tl.int64)[:, None]
    mask = (rows < m)[:, None] & (cols < experts)[None, :]
    x = tl.load(logits_ptr + r * stride_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    col_ok = (cols < experts)[None, :]
    x = tl.where(col_ok, x, -float("inf"))      # rows past m stay finite: no NaN in their (unstored) lanes
    p = tl.where(col_ok, tl.exp(x - tl.max(x, axis=1)[:, None]), 0.0)
    denom = tl.sum(p, axis=1)
    if HAS_SCORES:
        sel = tl.load(scores_ptr + r * stride_s + cols[None, :], mask=mask, other=-float("inf"))
    else:
        sel = x
    kcols = tl.arange(0, K_PAD)
    weights = tl.zeros([ROWS, K_PAD], dtype=tl.float32)
    ids = tl.zeros([ROWS, K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        cand = sel == tl.max(sel, axis=1)[:, None]
        if HAS_SCORES:   # tied scores: the larger logit first
            cand = cand & (x == tl.max(tl.where(cand, x, -float("inf")), axis=1)[:, None])
        idx = tl.min(tl.where(cand, cols[None, :], E_PAD), axis=1)          # ties: the lower expert
        pick = cols[None, :] == idx[:, None]
        wj = tl.sum(tl.where(pick, p, 0.0), axis=1) / denom
        weights = tl.where(kcols[None, :] == j, wj[:, None], weights)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        sel = tl.where(pick, -float("inf"), sel)
        if HAS_SCORES:
            x = tl.where(pick, -float("inf"), x)
    if RENORM:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out_mask = (rows < m)[:, None] & (kcols < TOP_K)[None, :]
    tl.store(w_ptr + r * stride_w + kcols[None, :], weights, mask=out_mask)
    tl.store(ids_ptr + r * stride_ids + kcols[None, :], ids, mask=out_mask)


def _outputs(out, ids_out, m: int, top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        out = torch.empty(m, top_k, dtype=torch.float32, device=device)
    check_tensor(OP, "out", out, (m, top_k), torch.float32, device)
    if ids_out is None:
        ids_out = torch.empty(m, top_k, dtype=torch.int32, device=device)
    if not isinstance(ids_out, torch.Tensor) or ids_out.shape != (m, top_k) or ids_out.dtype != torch.int32 \
            or ids_out.device != device or (top_k > 1 and ids_out.stride(1) != 1):
        got = (tuple(ids_out.shape), ids_out.dtype, str(ids_out.device)) if isinstance(ids_out, torch.Tensor) \
            else type(ids_out).__name__
        raise InputError(f"{OP}: ids_out must be an int32 [{m}, {top_k}] tensor on {device} with unit "
                         f"stride along top_k, got {got}")
    return out, ids_out


def check_masked(experts: int) -> None:
    if experts > MASKED_MAX_EXPERTS:
        raise InputError(f"{OP}: the masked (dense) strategy runs every expert on every token; it is refused "
                         f"above {MASKED_MAX_EXPERTS} experts, got {experts} (use naive or fused)")


def _fused(logits, top_k, norm_topk_prob, out, ids_out, config, scores=None):
    m, experts = logits.shape
    cfg = config or default(m, experts)
    e_pad = triton.next_power_of_2(experts)
    sel = logits if scores is None else scores
    _topk_softmax_kernel[(triton.cdiv(m, cfg["rows"]),)](
        logits, sel, out, ids_out, m, experts, logits.stride(0), sel.stride(0), out.stride(0), ids_out.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, ROWS=cfg["rows"],
        RENORM=bool(norm_topk_prob), HAS_SCORES=scores is not None, num_warps=cfg["num_warps"], **chained(logits))


def sinkhorn_scores(logits: torch.Tensor, iters: int, temperature: float) -> torch.Tensor:
    """log of the Sinkhorn-balanced assignment of ``logits / temperature`` (fp32, [T, experts]): rows
    normalised to 1, then the experts' columns to T / experts, ``iters`` times (a fixed count: no host
    sync, so it captures in a CUDA graph)."""
    s = logits.float() / temperature
    log_column = math.log(s.shape[0] / s.shape[1])
    for _ in range(iters):
        s = s - s.logsumexp(dim=1, keepdim=True)
        s = s - (s.logsumexp(dim=0, keepdim=True) - log_column)
    return s


def route(logits: torch.Tensor, top_k: int, *, norm_topk_prob: bool = False, strategy: str = "fused",
          sinkhorn_iters: int = 10, sinkhorn_temperature: float = 1.0, out: Optional[torch.Tensor] = None,
          ids_out: Optional[torch.Tensor] = None, config: Optional[dict] = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32)`` of ``logits`` [T, experts] (see the
    module doc for the strategies); written to ``out`` / ``ids_out`` when given. ``config``: the fused
    kernel's tiles (``rows``, ``num_warps``), also used by sinkhorn's selection."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"{OP}: logits must be a 2-D [tokens, experts] tensor, got {got}")
    m, experts = logits.shape
    check_tensor(OP, "logits", logits, (m, experts))
    if strategy not in STRATEGIES:
        raise InputError(f"{OP}: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise InputError(f"{OP}: top_k must be an int in [1, experts={experts}], got {top_k!r}")
    if strategy == "sinkhorn" and (not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 0
                                   or not sinkhorn_temperature > 0):
        raise InputError(f"{OP}: sinkhorn needs iters >= 0 and temperature > 0, "
                         f"got {sinkhorn_iters!r}, {sinkhorn_temperature!r}")
    if strategy == "masked":
        check_masked(experts)
    out, ids_out = _outputs(out, ids_out, m, top_k, logits.device)
    if m == 0:
        return out, ids_out
    if strategy in ("naive", "masked"):
        weights, ids = baseline(logits, top_k, norm_topk_prob)
        out.copy_(weights)
        ids_out.copy_(ids)
    elif strategy == "fused":
        _fused(logits, top_k, norm_topk_prob, out, ids_out, config)
    else:
        scores = sinkhorn_scores(logits, sinkhorn_iters, sinkhorn_temperature)
        _fused(logits, top_k, norm_topk_prob, out, ids_out, config, scores=scores)
    return out, ids_out


def masked_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """The masked strategy's expert compute, dense: every expert on every token (batched matmuls, no
    permutation), the outputs combined by the routing weights scattered to [T, experts] (zero where
    unchosen). ``gate_up`` [experts, 2 * inter, hidden] (gate rows first) and ``down`` [experts, hidden,
    inter]: transformers 5's fused expert tensors. Returns [T, hidden] in x's dtype."""
    experts = gate_up.shape[0]
    check_masked(experts)
    combine = torch.zeros(x.shape[0], experts, dtype=torch.float32, device=x.device)
    combine.scatter_(1, topk_ids.long(), topk_weights.float())
    gate, up = torch.matmul(x.unsqueeze(0), gate_up.transpose(1, 2)).chunk(2, dim=-1)   # [E, T, inter]
    y = torch.matmul(torch.nn.functional.silu(gate) * up, down.transpose(1, 2))           # [E, T, hidden]
    return torch.einsum("te,eth->th", combine, y.float()).to(x.dtype)


# --- metrics and synthetic logits ---------------------------------------------------------------------

def router_metrics(topk_ids: torch.Tensor, experts: int, capacity_factor: float = 1.0) -> dict:
    """Balance of a routing: per-expert load (routed slots), max/mean skew, the coefficient of variation
    of the load (population std / mean), and the slots dropped when each expert takes at most
    ``ceil(capacity_factor * slots / experts)``. Reads the ids back to the host (a benchmark's figure)."""
    if not capacity_factor > 0:
        raise InputError(f"{OP}: capacity_factor must be > 0, got {capacity_factor!r}")
    flat = topk_ids.reshape(-1).long().cpu()
    load = torch.bincount(flat[(flat >= 0) & (flat < experts)], minlength=experts).double()
    slots = flat.numel()
    mean = load.mean().item()
    capacity = math.ceil(capacity_factor * slots / experts)
    dropped = int((load - capacity).clamp(min=0).sum().item())
    return {"load": [int(v) for v in load.tolist()], "max_over_mean": load.max().item() / mean if mean else 0.0,
            "cv": load.std(unbiased=False).item() / mean if mean else 0.0, "capacity": capacity,
            "dropped": dropped, "dropped_fraction": dropped / slots if slots else 0.0}


def synthetic_logits(tokens: int, experts: int, *, skew_experts: int = 0, skew_bias: float = 0.0,
                     dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    """Standard-normal router logits [tokens, experts], the first ``skew_experts`` raised by ``skew_bias``."""
    if not 0 <= skew_experts <= experts:
        raise InputError(f"{OP}: skew_experts must be in [0, experts={experts}], got {skew_experts}")
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g, device=device)
    logits[:, :skew_experts] += skew_bias
    return logits.to(dtype)


# --- the template -------------------------------------------------------------------------------------

def reference(logits, top_k, norm_topk_prob=False, ids_out=None) -> torch.Tensor:
    """The top-k weights in fp64 math (Qwen3-MoE's router)."""
    weights = torch.topk(torch.softmax(logits.double(), dim=-1), top_k, dim=-1).values
    return weights / weights.sum(dim=-1, keepdim=True) if norm_topk_prob else weights


def baseline(logits, top_k, norm_topk_prob=False, ids_out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """What transformers' Qwen3MoeTopKRouter runs: fp32 softmax, torch.topk, renormalise."""
    weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.int()


def _launch(logits, top_k, norm_topk_prob=False, out=None, ids_out=None, config=None) -> torch.Tensor:
    return route(logits, top_k, norm_topk_prob=norm_topk_prob, strategy="fused", out=out, ids_out=ids_out,
                 config=config)[0]


def default(m: int, experts: int) -> dict:
    """~1024 logits per program (whole rows), ~16 per thread."""
    e_pad = triton.next_power_of_2(experts)
    rows = max(1, min(16, 1024 // e_pad, triton.next_power_of_2(max(1, m))))
    return {"rows": rows, "num_warps": max(1, min(8, rows * e_pad // 512))}


def space(problem: Problem) -> Space:
    return Space(pow2("rows", 1, 16), categorical("num_warps", (1, 2, 4, 8)))


def tile_fits(config: dict, problem: Problem, spec) -> Optional[str]:
    if problem["topk"] > problem["experts"]:
        return f"topk {problem['topk']} > {problem['experts']} experts"
    return tile_reject_reason(triton.next_power_of_2(problem["experts"]), config["rows"], config["num_warps"],
                              problem["m"])


def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    m, e, k = problem["m"], problem["experts"], problem["topk"]
    return {"logits": synthetic_logits(m, e, dtype=problem.torch_dtype, device=device, seed=seed), "top_k": k,
            "norm_topk_prob": True, "out": torch.empty(m, k, dtype=torch.float32, device=device),
            "ids_out": torch.empty(m, k, dtype=torch.int32, device=device)}


def work(problem: Problem) -> tuple[float, float]:
    """Read the logits once, write the weights and ids."""
    m, e, k = problem["m"], problem["experts"], problem["topk"]
    return float(4 * m * e), float(m * e * problem.torch_dtype.itemsize + 8 * m * k)


# the baseline's kernels: the fp32 softmax, torch.topk (a sort-based selection of several kernels), the
# renormalising sum and divide, the ids' cast (the H200 tune of 2026-12-02: 17.4 us at 1 token, ~9 launches)
BASELINE_LAUNCHES = 9


def cost(problem: Problem, config: Optional[dict], spec) -> float:
    """The fused kernel: one launch whose rows load, select and store in one dependent round trip more;
    the baseline: BASELINE_LAUNCHES eager kernels over the same bytes."""
    flops, nbytes = work(problem)
    if config is None:
        return eager_time(flops, 3 * nbytes, spec, BASELINE_LAUNCHES, dtype=problem.dtype)
    return roofline(flops, nbytes, spec, problem.dtype, mem_efficiency=0.7, launches=1) + HBM_LATENCY_S


TEMPLATE = register(Template(
    op=OP,
    space=space,
    make_inputs=make_inputs,
    launch=_launch,
    reference=reference,
    baseline=baseline,
    default_config=lambda problem, spec: default(problem["m"], problem["experts"]),
    work=work,
    cost=cost,
    constraints=(tile_fits,),
    doc=__doc__.split("\n")[0],
))
