"""MoE routing (kernels/moe_router.py) and the pack by expert (kernels/moe_pack.py).

CPU: the real Triton kernels under the interpreter on small token counts, outputs poisoned first (NaN
weights, -1 ids and packed slots). Routers: fused == naive (same ids, weights allclose) for 8/64/128
experts, top-k 1/2/8, fp32/bf16/fp16 logits, with and without renormalisation, on logits distinct in
their dtype (ties are tested on their own); the fused router against transformers' Qwen3MoeTopKRouter;
Sinkhorn lowers the load's coefficient of variation on skewed logits; the masked strategy against
transformers' Qwen3MoeExperts and its refusal above its limit; the metrics by hand. Pack: Triton ==
reference == a construction from torch.argsort(stable=True), for ragged counts, experts with no token
and with one, dropped ids, one and zero tokens, several chunks. GPU (``-m gpu``): Qwen3-30B-A3B shapes.
"""
import math

import pytest
import torch
import triton

from tuneforge.dsl import Problem, check, compare, get, poison
from tuneforge.errors import InputError
from tuneforge.kernels import moe_pack as mp
from tuneforge.kernels import moe_router as mr
from tuneforge.kernels._common import launch_spec

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def distinct_logits(tokens, experts, seed=0):
    """Each row a permutation of a 1/16 grid in [-4, 4): distinct, and exact in bf16 and fp16."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(experts, generator=g) for _ in range(tokens)]
    return (torch.stack(rows).float() * (8 / experts) - 4).mul(16).round().div(16)


def poisoned(tokens, top_k):
    return poison(torch.empty(tokens, top_k)), poison(torch.empty(tokens, top_k, dtype=torch.int32))


# --- routers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("experts", [8, 64, 128])
def test_fused_selects_the_same_experts_with_the_same_weights_as_naive(experts, top_k):
    for tokens, config in ((1, None), (13, {"rows": 4, "num_warps": 1})):      # 4 rows: a ragged last program
        logits32 = distinct_logits(tokens, experts, seed=experts + top_k + tokens)
        for dtype in DTYPES:
            logits = logits32.to(dtype)
            assert torch.equal(logits.float(), logits32)
            for norm in (False, True):
                weights, ids = poisoned(tokens, top_k)
                mr.route(logits, top_k, norm_topk_prob=norm, out=weights, ids_out=ids, config=config)
                naive_w, naive_ids = mr.route(logits, top_k, norm_topk_prob=norm, strategy="naive")
                case = f"T={tokens} {dtype} norm={norm} {config}"
                assert torch.equal(ids, naive_ids), case
                torch.testing.assert_close(weights, naive_w, atol=1e-6, rtol=1e-5, msg=case)
                result = compare(weights, mr.reference(logits, top_k, norm))
                assert result, f"{case}: {result.reason}"


@pytest.mark.parametrize("norm", [False, True])
def test_fused_matches_transformers_qwen3_moe_router(norm):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    config = Qwen3MoeConfig(hidden_size=32, num_experts=64, num_experts_per_tok=8, norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(64, 32, generator=g))
        hidden = torch.randn(9, 32, generator=g)
        logits, hf_weights, hf_ids = router(hidden)
    weights, ids = mr.route(logits, 8, norm_topk_prob=norm)
    assert torch.equal(ids.long(), hf_ids)
    torch.testing.assert_close(weights, hf_weights, atol=1e-6, rtol=1e-5)


def test_ties_pick_the_lower_expert_with_the_same_weights_as_naive():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0, -1.0]])
    weights, ids = mr.route(logits, 3, norm_topk_prob=True)
    assert ids.tolist() == [[1, 2, 4]]
    naive_w, naive_ids = mr.route(logits, 3, norm_topk_prob=True, strategy="naive")
    assert set(naive_ids[0].tolist()) <= {1, 2, 4, 6}      # torch.topk's order among ties is unspecified
    torch.testing.assert_close(weights, naive_w)


def test_sinkhorn_balances_skewed_logits_and_keeps_the_softmax_weights():
    logits = mr.synthetic_logits(256, 16, skew_experts=4, skew_bias=2.0, seed=1)
    _, naive_ids = mr.route(logits, 2, strategy="naive")
    weights, ids = poisoned(256, 2)
    mr.route(logits, 2, strategy="sinkhorn", sinkhorn_iters=10, sinkhorn_temperature=1.0, out=weights, ids_out=ids)
    skewed, balanced = mr.router_metrics(naive_ids, 16), mr.router_metrics(ids, 16)
    assert skewed["cv"] > 1.0 and balanced["cv"] < 0.25 * skewed["cv"], (skewed, balanced)
    assert balanced["dropped"] < skewed["dropped"]
    assert all(len(set(row)) == 2 for row in ids.tolist())
    softmax = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(weights, softmax.gather(1, ids.long()), atol=1e-6, rtol=1e-5)
    # no iterations: the naive selection; one token: nothing to balance, the larger logits win
    for tokens, iters in ((256, 0), (1, 10)):
        _, none = mr.route(logits[:tokens], 2, strategy="sinkhorn", sinkhorn_iters=iters)
        assert torch.equal(none, naive_ids[:tokens])


def test_masked_strategy_matches_transformers_experts_and_refuses_many_experts():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    config = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    experts = Qwen3MoeExperts(config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        experts.gate_up_proj.copy_(0.2 * torch.randn(experts.gate_up_proj.shape, generator=g))
        experts.down_proj.copy_(0.2 * torch.randn(experts.down_proj.shape, generator=g))
        x, logits = torch.randn(5, 16, generator=g), torch.randn(5, 8, generator=g)
        weights, ids = mr.route(logits, 2, norm_topk_prob=True, strategy="masked")
        expected = experts(x, ids.long(), weights)
        result = compare(mr.masked_moe(x, weights, ids, experts.gate_up_proj, experts.down_proj), expected)
    assert result, result.reason
    message = (r"^moe_router: the masked \(dense\) strategy runs every expert on every token; it is refused "
               r"above 16 experts, got 17 \(use naive or fused\)$")
    with pytest.raises(InputError, match=message):
        mr.route(torch.randn(3, 17), 2, strategy="masked")
    with pytest.raises(InputError, match=message):
        mr.masked_moe(x, weights, ids, torch.zeros(17, 48, 16), torch.zeros(17, 16, 24))


def test_router_metrics_by_hand_and_synthetic_skew():
    m = mr.router_metrics(torch.tensor([[0, 1], [0, 2], [0, 1]]), 4, capacity_factor=1.0)
    assert m["load"] == [3, 2, 1, 0] and m["capacity"] == 2 and m["dropped"] == 1
    assert m["max_over_mean"] == 2.0 and m["cv"] == pytest.approx(math.sqrt(1.25) / 1.5)
    assert m["dropped_fraction"] == pytest.approx(1 / 6)
    assert mr.router_metrics(torch.tensor([[0, 1], [0, 2], [0, 1]]), 4, capacity_factor=2.0)["dropped"] == 0
    plain = mr.synthetic_logits(4, 8, seed=2)
    skewed = mr.synthetic_logits(4, 8, skew_experts=3, skew_bias=2.5, seed=2, dtype=torch.bfloat16)
    torch.testing.assert_close(skewed.float(), (plain + torch.tensor([2.5] * 3 + [0.0] * 5)).bfloat16().float())


def test_router_zero_tokens_and_errors():
    assert mr.route(torch.empty(0, 8), 2)[1].shape == (0, 2)
    logits = torch.randn(3, 8)
    cases = [
        (lambda: mr.route(logits, 9), r"top_k must be an int in \[1, experts=8\], got 9"),
        (lambda: mr.route(logits, 2, strategy="greedy"), r"unknown strategy 'greedy'; expected one of naive"),
        (lambda: mr.route(logits[None], 2), r"logits must be a 2-D \[tokens, experts\] tensor"),
        (lambda: mr.route(logits, 2, ids_out=torch.empty(3, 2)), r"ids_out must be an int32 \[3, 2\] tensor"),
        (lambda: mr.route(logits, 2, out=torch.empty(3, 2).half()), r"out has dtype torch.float16"),
        (lambda: mr.route(logits, 2, strategy="sinkhorn", sinkhorn_temperature=0.0), r"sinkhorn needs iters >= 0"),
        (lambda: mr.router_metrics(torch.zeros(3, 2), 8, capacity_factor=0), r"capacity_factor must be > 0"),
        (lambda: mr.synthetic_logits(3, 8, skew_experts=9), r"skew_experts must be in \[0, experts=8\]"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


# --- pack ---------------------------------------------------------------------------------------------

def argsort_pack(topk_ids, experts, block_m):
    """(sorted slots, block experts) built from torch.argsort(stable=True), expert by expert."""
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(torch.where((flat >= 0) & (flat < experts), flat, experts), stable=True)
    slots, blocks = [], []
    for e in range(experts):
        run = [s for s in order.tolist() if flat[s] == e]
        run += [flat.numel()] * (-len(run) % block_m)
        slots += run
        blocks += [e] * (len(run) // block_m)
    return slots, blocks


def routed_ids(tokens, experts, top_k, seed):
    """Distinct experts per token, skewed: experts past max(top_k, experts // 2) get no token, except that
    the last gets exactly one (token 0)."""
    logits = mr.synthetic_logits(tokens, experts, skew_experts=experts // 4, skew_bias=1.5, seed=seed)
    logits[:, max(top_k, experts // 2):] = -float("inf")
    if tokens and top_k < experts:
        logits[0, -1] = float("inf")
    return torch.topk(logits, top_k, dim=-1).indices.int()


def assert_packed(ids, experts, block_m, config=None):
    t, k = ids.shape
    buf = poison(torch.empty(mp.buffer_size(t, k, experts, block_m), dtype=torch.int32))
    packed = mp.pack(ids, experts, block_m, out=buf, config=config)
    slots, blocks = argsort_pack(ids, experts, block_m)
    padded = mp.max_padded(t, k, experts, block_m)
    assert packed.sorted_ids.shape == (padded,) and packed.block_expert.shape == (padded // block_m,)
    assert packed.padded_count.tolist() == [len(slots)] and packed.block_m == block_m
    assert packed.sorted_ids.tolist() == slots + [t * k] * (padded - len(slots))
    assert packed.block_expert.tolist() == blocks + [-1] * (padded // block_m - len(blocks))
    ref = mp.reference(ids, experts, block_m)
    assert all(torch.equal(a, b) for a, b in zip(packed[:3], ref[:3]))
    return packed


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("experts", [8, 64, 128])
def test_pack_matches_reference_and_stable_argsort(experts, top_k):
    for block_m, tokens in ((16, 1), (32, 7), (64, 21)):
        ids = routed_ids(tokens, experts, top_k, seed=experts * top_k + tokens)
        packed = assert_packed(ids, experts, block_m)
        load = torch.bincount(ids.flatten().long(), minlength=experts)
        if top_k < experts // 2:
            assert (load == 0).any() and load[-1] == 1
        assert_packed(ids, experts, block_m, config={"block": 16, "num_warps": 1})     # several chunks
        one_chunk = max(16, triton.next_power_of_2(tokens * top_k))
        for single in (0, 1):                          # one chunk: three launches, or one program
            assert_packed(ids, experts, block_m, config={"block": one_chunk, "num_warps": 4, "single": single})
        assert int(packed.padded_count) % block_m == 0


def test_pack_drops_out_of_range_ids_and_handles_zero_tokens():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(-2, 10, (37, 3), generator=g, dtype=torch.int32)     # -2, -1, 8, 9: not this rank's
    packed = assert_packed(ids, 8, 16, config={"block": 32, "num_warps": 2})
    assert_packed(ids, 8, 16, config={"block": 128, "num_warps": 2, "single": 1})
    assert_packed(ids, 6, 16, config={"block": 128, "num_warps": 2, "single": 1})   # ids 6, 7: E_PAD 8's padding
    valid = ((ids >= 0) & (ids < 8)).sum().item()
    assert (packed.sorted_ids < ids.numel()).sum().item() == valid
    assert_packed(ids.long(), 8, 16)                                         # any int dtype
    empty = assert_packed(torch.empty(0, 2, dtype=torch.int32), 8, 16)
    assert empty.padded_count.tolist() == [0] and (empty.block_expert == -1).all()


def test_max_padded_and_pack_errors():
    assert mp.max_padded(5, 2, 8, 16) == 144                  # 10 slots + 8 experts * 15 padding = 130, to 16s
    assert mp.max_padded(4096, 8, 128, 64) == 32768 + 128 * 63          # already a multiple of 64
    assert mp.buffer_size(5, 2, 8, 16) == 144 + 9 + 1
    ids = torch.zeros(5, 2, dtype=torch.int32)
    cases = [
        (lambda: mp.pack(ids.float(), 8, 16), r"topk_ids must be an integer tensor, got torch.float32"),
        (lambda: mp.pack(ids[0], 8, 16), r"topk_ids must be a 2-D \[tokens, top_k\] tensor, got \(2,\)"),
        (lambda: mp.pack(ids, 8, 24), r"block_m must be a power of two >= 1, got 24"),
        (lambda: mp.pack(ids, 0, 16), r"num_experts must be an int >= 1, got 0"),
        (lambda: mp.pack(ids, 8, 16, config={"block": 8, "num_warps": 1, "single": 1}),
         r"config single=1 packs in one program: 10 slots > block 8"),
        (lambda: mp.pack(ids, 8, 16, out=torch.empty(153, dtype=torch.int32)),
         r"out must be a contiguous int32 \[154\] tensor on cpu \(buffer_size\(5, 2, 8, 16\)\)"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


# --- the templates ------------------------------------------------------------------------------------

SPEC = launch_spec(torch.device("cpu"), persistent=False)      # the default target
TEMPLATE_CASES = {"moe_router": dict(m=11, experts=64, topk=8), "moe_pack": dict(m=11, experts=64, topk=8)}
REAL = {"moe_router": dict(experts=128, topk=8), "moe_pack": dict(experts=128, topk=8)}


@pytest.mark.parametrize("op", sorted(TEMPLATE_CASES))
def test_template_default_and_extreme_configs_pass_the_checker(op):
    template = get(op)
    for dtype in ("bf16", "fp32"):
        problem = Problem.make(op, dtype, **TEMPLATE_CASES[op])
        valid = [c for c in template.space(problem).enumerate() if template.reject_reason(c, problem, SPEC) is None]
        assert len(valid) > 1
        for config in (template.default_config(problem, SPEC), valid[0], valid[-1]):
            result = check(template, problem, config)
            assert result, f"{problem.key} {config}: {result.reason}"


@pytest.mark.parametrize("op", sorted(TEMPLATE_CASES))
def test_template_defaults_are_valid_from_one_token_to_long_prefills(op):
    template = get(op)
    real = Problem.make(op, "bf16", **{**REAL[op], "m": 4096})
    assert any(template.reject_reason(c, real, SPEC) for c in template.space(real).enumerate()), "rejects nothing"
    # the verifier's shrink() cuts dims one by one: a top-k past the experts must not pass
    too_many = real.with_dims(experts=4)
    assert template.reject_reason(template.default_config(too_many, SPEC), too_many, SPEC) == "topk 8 > 4 experts"
    for m in (1, 3, 64, 4096, 16384):
        for experts in (8, 64, 128, 512):
            problem = Problem.make(op, "bf16", **{**REAL[op], "m": m, "experts": experts})
            config = template.default_config(problem, SPEC)
            assert template.reject_reason(config, problem, SPEC) is None, (problem.key, config)


def test_moe_plan_tunes_the_select_step_and_the_pack():
    from tuneforge.tune.plan import plan
    p = plan("Qwen3-30B-A3B", 1, decode_buckets=[4], prefill_buckets=[512])
    for m in (4, 512):
        for op in ("moe_router", "moe_pack"):
            (item,) = p.find(op, m=m)
            assert item.problem.shape == {"m": m, "experts": 128, "topk": 8} and not item.baseline_only, op
        assert p.find("gemm", m=m, n=128, k=2048)                    # the router's logit matmul


# --- GPU: Qwen3-30B-A3B shapes ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 256, 4096, 16384])
def test_gpu_router_and_pack_at_qwen3_30b_shapes(tokens):
    logits = mr.synthetic_logits(tokens, 128, skew_experts=8, skew_bias=1.0, dtype=torch.bfloat16, device="cuda")
    weights, ids = mr.route(logits, 8, norm_topk_prob=True)
    naive_w, _ = mr.route(logits, 8, norm_topk_prob=True, strategy="naive")
    # bf16 logits tie often, and torch.topk orders ties its own way: judge the ids by what they select
    torch.testing.assert_close(weights, naive_w, atol=1e-6, rtol=1e-5)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, ids.long())
    torch.testing.assert_close(probs / probs.sum(dim=1, keepdim=True), naive_w, atol=1e-6, rtol=1e-5)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()                   # distinct experts per token
    for block_m in (16, 64, 128):
        packed, ref = mp.pack(ids, 128, block_m), mp.reference(ids, 128, block_m)
        assert all(torch.equal(a, b) for a, b in zip(packed[:3], ref[:3])), block_m
    # graph-capturable: warmed up, neither the router, the pack nor the torch reference reads back
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mr.route(logits, 8, norm_topk_prob=True, out=weights, ids_out=ids)
        mp.pack(ids, 128, 64, out=packed.sorted_ids.new_empty(mp.buffer_size(tokens, 8, 128, 64)))
        mp.reference(ids, 128, 64)
    finally:
        torch.cuda.set_sync_debug_mode(0)
