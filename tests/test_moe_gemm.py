"""Grouped expert GEMM (kernels/moe_gemm.py) under the interpreter, against the per-expert torch loop in
fp32 computed from topk_ids (not from the pack): ragged and skewed counts, experts with no tokens, one
token, top-k 1/2/8, 8/64/128 experts, every dtype, NaN-poisoned outputs; the fused SiLU-mul and weighted
combine against the unfused kernels; the template's configs (atomic and reduce combine); bad input one
line each. On a GPU: Qwen3-30B-A3B shapes."""
import pytest
import torch

from tuneforge.dsl import check, compare, get
from tuneforge.dsl.check import interpreter_scale, poison
from tuneforge.dsl.devices import SPECS
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.kernels import moe_gemm as MG
from tuneforge.kernels import moe_pack
from tuneforge.kernels.silu_mul import silu_mul
from tuneforge.models import problems as P

CPU = torch.device("cpu")
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _inputs(tokens, experts, top_k, n, k, dtype, seed=0, ids=None, device=CPU):
    g = torch.Generator().manual_seed(seed)
    routed, weights = MG.routing(tokens, experts, top_k, g)
    ids = routed if ids is None else torch.tensor(ids, dtype=torch.int32)
    x = torch.randn(tokens, k, generator=g).to(dtype).to(device)
    h = torch.randn(tokens * top_k, k, generator=g).to(dtype).to(device)
    w = (torch.randn(experts, n, k, generator=g) / k ** 0.5).to(dtype).to(device)
    return x, h, w, ids.to(device), weights.to(device)


def _nan(shape, dtype, device=CPU):
    return poison(torch.empty(shape, dtype=dtype, device=device))


def _check(got, ref, dtype):
    res = compare(got, ref, dtype, scale=interpreter_scale(dtype))
    assert res, res.reason


# (tokens, experts, top_k, n, k, dtype, block_m, explicit topk_ids)
CASES = [
    (7, 8, 2, 48, 40, "bf16", 16, None),               # skewed, ragged counts, k not a block multiple
    (5, 8, 1, 32, 32, "fp16", 16, None),               # top-1
    (1, 8, 2, 32, 48, "fp32", 16, None),               # one token
    (6, 8, 2, 32, 32, "fp32", 32, [[0, 5]] * 6),       # six experts without a token, one full block each
    (3, 64, 8, 32, 32, "bf16", 16, None),              # top-8 of 64: most experts empty
    (2, 128, 8, 16, 16, "fp16", 16, None),             # 128 experts, tiny dims
    (3, 16, 6, 32, 40, "fp32", 16, None),              # top-6: not a power of 2 (per_slot pads its slots)
    (20, 8, 2, 64, 32, "fp32", 16, [[i % 8, (i * 3 + 1) % 8] for i in range(20)]),   # > one block per expert
]


@pytest.mark.parametrize("tokens,experts,top_k,n,k,dtype,block_m,ids", CASES)
def test_grouped_gemm_matches_the_per_expert_loop(tokens, experts, top_k, n, k, dtype, block_m, ids):
    dt = DT[dtype]
    x, h, w, ids, weights = _inputs(tokens, experts, top_k, n, k, dt, seed=tokens, ids=ids)
    packed = moe_pack.reference(ids, experts, block_m)
    # gate_up: gathered rows, SiLU-mul fused -> [T * top_k, n / 2]
    got = MG.moe_gemm(x, w, packed, top_k=top_k, gather=True, activation="silu_mul",
                      out=_nan((tokens * top_k, n // 2), dt))
    _check(got, MG.reference(x, w, ids, gather=True, activation="silu_mul"), dt)
    # plain gathered rows
    got = MG.moe_gemm(x, w, packed, top_k=top_k, gather=True, out=_nan((tokens * top_k, n), dt))
    _check(got, MG.reference(x, w, ids, gather=True), dt)
    # down: slot rows, router-weighted, combined per token, both ways
    want = MG.reference(h, w, ids, gather=False, routed_weights=weights, combine=True)
    for how in ("atomic", "reduce"):
        config = {**MG.default_config(P.moe_gemm(dtype, tokens, (n, k), experts, top_k, act=False),
                                      MG.launch_spec(CPU, persistent=False), block_m=block_m), "combine": how}
        got = MG.moe_gemm(h, w, packed, top_k=top_k, gather=False, routed_weights=weights, combine=True,
                          out=_nan((tokens, n), dt), config=config)
        _check(got, want, dt)
    if tokens > MG.PER_SLOT_MAX_M:        # per_slot takes decode counts only
        return
    # per_slot: no pack, the ids themselves (a k tail where k is not a multiple of 64)
    config = dict(schedule="per_slot", slot_block_n=8, slot_block_k=64, slot_warps=2)
    got = MG.moe_gemm(x, w, ids, top_k=top_k, gather=True, activation="silu_mul", out=_nan((tokens * top_k, n // 2), dt),
                      config=config)
    _check(got, MG.reference(x, w, ids, gather=True, activation="silu_mul"), dt)
    got = MG.moe_gemm(h, w, ids, top_k=top_k, gather=False, routed_weights=weights, combine=True,
                      out=_nan((tokens, n), dt), config=config)
    _check(got, want, dt)
    got = MG.moe_gemm(h, w, ids, top_k=top_k, gather=False, out=_nan((tokens * top_k, n), dt))
    _check(got, MG.reference(h, w, ids, gather=False), dt)


def test_per_slot_takes_decode_token_counts_only():
    spec = MG.launch_spec(CPU, persistent=False)
    config = dict(schedule="per_slot", slot_block_n=4, slot_block_k=64, slot_warps=4)
    assert MG.TEMPLATE.reject_reason(config, P.moe_gemm("bf16", MG.PER_SLOT_MAX_M, (64, 64), 8, 2, act=True), spec) is None
    why = MG.TEMPLATE.reject_reason(config, P.moe_gemm("bf16", MG.PER_SLOT_MAX_M + 1, (64, 64), 8, 2, act=True), spec)
    assert why.startswith(f"per_slot: m={MG.PER_SLOT_MAX_M + 1} tokens > {MG.PER_SLOT_MAX_M}") and "\n" not in why


def test_per_slot_skips_ids_outside_the_experts():
    """An id outside [0, experts) (a rank's foreign expert, -1): its row is not written without
    combine, and adds nothing with it, as the packed schedule's atomic combine."""
    dt, tokens, experts, top_k, n, k = torch.float32, 4, 8, 2, 32, 48
    x, h, w, _, weights = _inputs(tokens, experts, top_k, n, k, dt, seed=5)
    ids = torch.tensor([[0, -1], [9, 3], [7, 7 - 8], [2, 5]], dtype=torch.int32)
    kept = ids.clamp(0, experts - 1)
    dropped = ((ids < 0) | (ids >= experts)).reshape(-1)
    rows = MG.moe_gemm(h, w, ids, top_k=top_k, gather=False, out=_nan((tokens * top_k, n), dt))
    assert rows[dropped].isnan().all()
    _check(rows[~dropped], MG.reference(h, w, kept, gather=False)[~dropped], dt)
    got = MG.moe_gemm(h, w, ids, top_k=top_k, gather=False, routed_weights=weights, combine=True,
                      out=_nan((tokens, n), dt))
    _check(got, MG.reference(h, w, kept, gather=False, routed_weights=weights * (~dropped).view(tokens, top_k),
                             combine=True), dt)


def test_the_device_pack_feeds_the_gemm_and_fused_epilogues_match_the_unfused_kernels():
    """moe_pack.pack's (Triton) pack gives the same result as its reference; fused silu_mul == the
    silu_mul kernel on the unfused GEMM; the weighted combine == the unfused rows times the weights summed."""
    dt, tokens, experts, top_k, n, k = torch.bfloat16, 9, 8, 2, 64, 32
    x, h, w, ids, weights = _inputs(tokens, experts, top_k, n, k, dt, seed=3)
    packed = moe_pack.pack(ids, experts, 16)
    fused = MG.moe_gemm(x, w, packed, top_k=top_k, gather=True, activation="silu_mul")
    unfused = silu_mul(MG.moe_gemm(x, w, packed, top_k=top_k, gather=True))
    _check(fused, unfused.float(), dt)
    combined = MG.moe_gemm(h, w, packed, top_k=top_k, gather=False, routed_weights=weights, combine=True)
    rows = MG.moe_gemm(h, w, packed, top_k=top_k, gather=False).float()
    _check(combined, (rows * weights.reshape(-1, 1)).view(tokens, top_k, n).sum(1), dt)


@pytest.mark.parametrize("act", [1, 0])
def test_template_configs_pass_the_checker(act):
    """make_inputs / launch / reference as the tuner runs them: default, a 32-row block with group order
    and a k tail, and for the down GEMM both combines; the baseline agrees with the reference."""
    problem = P.moe_gemm("bf16", 11, (64, 40), 8, 2, act=bool(act))
    spec = MG.launch_spec(CPU, persistent=False)
    template = get("moe_gemm")
    default = template.default_config(problem, spec)
    packed = template.default_config(problem, spec, schedule="packed")
    configs = [default, packed, {**packed, "block_m": 32, "block_n": 16, "block_k": 32, "group_m": 4},
               dict(schedule="per_slot", slot_block_n=16, slot_block_k=64, slot_warps=4)]
    if not act:
        configs.append({**configs[2], "combine": "reduce" if packed["combine"] == "atomic" else "atomic"})
    inputs = template.make_inputs(problem, CPU, seed=2)
    for config in configs:
        assert template.reject_reason(config, problem, spec) is None, config
        res = check(template, problem, config, inputs=inputs)
        assert res, f"{config}: {res.reason}"
    args = {k: v for k, v in inputs.items() if k != "out"}
    _check(template.baseline(**args), template.reference(**args), torch.bfloat16)
    slack = template.propagated_error(0.016, **args)    # gate_up's SiLU-mul carries its factors' error
    assert (slack.shape == inputs["out"].shape and bool((slack > 0).any())) if act else slack is None


def test_plan_problems_get_valid_defaults_and_constraints_say_why():
    h200 = SPECS["h200"] if "h200" in SPECS else next(iter(SPECS.values()))
    for m in (1, 16, 256, 4096, 16384):      # Qwen3-30B-A3B: hidden 2048, expert intermediate 768, 128 x top-8
        for problem in (P.moe_gemm("bf16", m, (2 * 768, 2048), 128, 8, act=True),
                        P.moe_gemm("bf16", m, (2048, 768), 128, 8, act=False)):
            config = MG.default_config(problem, h200)
            assert MG.TEMPLATE.reject_reason(config, problem, h200) is None, (problem, config)
    down = P.moe_gemm("bf16", 16, (2048, 768), 4, 8, act=False)
    assert "topk=8 must be in [1, experts=4]" in MG.TEMPLATE.reject_reason(MG.default_config(down, h200), down, h200)
    gate_up = P.moe_gemm("bf16", 16, (2 * 768, 2048), 128, 8, act=True)
    big = {**MG.default_config(gate_up, h200), "block_m": 128, "block_n": 256, "block_k": 256, "num_stages": 5}
    assert MG.TEMPLATE.reject_reason(big, gate_up, h200).startswith("shared memory:")


def _bad_calls():
    dt = torch.float32
    x, h, w, ids, weights = _inputs(4, 8, 2, 32, 16, dt)
    packed = moe_pack.reference(ids, 8, 16)
    other = moe_pack.reference(ids % 4, 4, 16)      # packed for 4 experts, not 8
    config32 = {**MG.default_config(P.moe_gemm("fp32", 4, (32, 16), 8, 2, act=True),
                                    MG.launch_spec(CPU, persistent=False), schedule="packed"), "block_m": 32}
    g = dict(top_k=2, gather=True)
    return [
        (lambda: MG.moe_gemm(x, w[0], packed, **g), "moe_gemm: w must be a 3-D [experts, n, k] tensor, got (32, 16)"),
        (lambda: MG.moe_gemm(x, w, packed, top_k=0, gather=True), "moe_gemm: top_k must be an int in [1, experts=8], got 0"),
        (lambda: MG.moe_gemm(x, w, packed, **g, activation="gelu"), "activation must be one of [None, 'silu_mul'], got 'gelu'"),
        (lambda: MG.moe_gemm(x, w, packed, **g, activation="silu_mul", combine=True), "with activation='silu_mul' use combine=False"),
        (lambda: MG.moe_gemm(h[:7], w, packed, top_k=2, gather=False), "without gather x holds T * top_k rows, got 7"),
        (lambda: MG.moe_gemm(x, w[:, :31], packed, **g, activation="silu_mul"), "n=31 is odd"),
        (lambda: MG.moe_gemm(x, w.half(), packed, **g), "moe_gemm: w has dtype torch.float16, expected torch.float32"),
        (lambda: MG.moe_gemm(x[:, :8], w, packed, **g), "moe_gemm: x has shape (4, 8), expected (4, 16)"),
        (lambda: MG.moe_gemm(h, w, packed, top_k=2, gather=False, routed_weights=weights[:3], combine=True),
         "moe_gemm: routed_weights has shape (3, 2), expected (4, 2)"),
        (lambda: MG.moe_gemm(x, w, ids.tolist(), **g), "moe_gemm: packed must be a moe_pack.Packed"),
        (lambda: MG.moe_gemm(x, w, ids[:3], **g), "per_slot reads the router's topk_ids: an integer [4, 2] tensor"),
        (lambda: MG.moe_gemm(x, w, ids, **g, activation="silu_mul", config=config32),
         "config schedule='packed' but given topk_ids (packed takes a moe_pack.Packed, per_slot the topk_ids)"),
        (lambda: MG.moe_gemm(x, w, other, **g), "packed has 80 slots, 5 blocks and 1 counts; 4 tokens x top_k 2 over 8 experts in blocks of 16 pack into 128"),
        (lambda: MG.moe_gemm(x, w, packed, **g, activation="silu_mul", config=config32),
         "config block_m=32 but the pack's block_m=16 (pack with the config's block_m)"),
        (lambda: MG.moe_gemm(x, w, packed, **g, out=torch.empty(8, 16)), "moe_gemm: out has shape (8, 16), expected (8, 32)"),
    ]


@pytest.mark.parametrize("index", range(15))
def test_bad_inputs_are_one_line_each(index):
    call, message = _bad_calls()[index]
    with pytest.raises(InputError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_config_outside_the_space_is_rejected_in_one_line():
    x, _, w, ids, _ = _inputs(4, 8, 2, 32, 16, torch.float32)
    packed = moe_pack.reference(ids, 8, 16)
    with pytest.raises(ConfigRejected, match=r"block_n=24 is not one of") as e:
        MG.moe_gemm(x, w, packed, top_k=2, gather=True, config=dict(schedule="packed", block_m=16, block_n=24,
                                                                     block_k=16, group_m=1, num_warps=4, num_stages=2))
    assert "\n" not in str(e.value)


# --- GPU: Qwen3-30B-A3B shapes (128 experts, top-8, hidden 2048, expert intermediate 768) -----------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 32, 256, 4096])
@pytest.mark.parametrize("act", [1, 0])
def test_gpu_qwen3_30b_a3b_shapes(device, m, act):
    problem = P.moe_gemm("bf16", m, (2 * 768, 2048) if act else (2048, 768), 128, 8, act=bool(act))
    spec = MG.launch_spec(device, persistent=False)
    config = MG.default_config(problem, spec, schedule="packed")
    configs = [{**config, **extra} for extra in ([{}] if act else [{"combine": "atomic"}, {"combine": "reduce"}])]
    configs += [{**c, "tma": True} for c in configs]        # the weight's tiles through TMA (k = 768 / 2048)
    if m <= MG.PER_SLOT_MAX_M:
        configs.append(MG.default_config(problem, spec, schedule="per_slot"))
    for config in configs:
        res = check(MG.TEMPLATE, problem, config, device=device)
        assert res, f"{config}: {res.reason}"


def test_the_packed_kernel_compiles_for_sm90_with_pointer_and_tma_weights():
    """Qwen3-30B-A3B's prefill gate_up tile (128 x 128 x 64, SiLU-mul) with w through pointers and through a
    TMA descriptor of [128, 64] blocks (the interpreter never runs the TMA path: no GPU, no descriptor)."""
    from conftest import compile_for_sm90
    consts = dict(TOP_K=8, GATHER=True, SILU_MUL=True, WEIGHTED=False, ATOMIC=False, BLOCK_M=128, BLOCK_N=128,
                  BLOCK_K=64, GROUP_M=8, EVEN_K=True, UPCAST=False, INPUT_PRECISION="tf32", PDL=True)
    types = dict(x="*bf16", w="*bf16", y="*bf16", sorted_ids="*i32", block_expert="*i32", padded_count="*i32",
                 routed_weights="*bf16")
    for tma in (False, True):
        compile_for_sm90("tuneforge.kernels.moe_gemm", [("_moe_gemm_kernel", dict(consts, W_TMA=tma))],
                         {**types, "w": "tensordesc<bf16[128,64]>"} if tma else types)


def test_tma_weights_are_refused_where_the_device_has_none():
    x, h, w, ids, weights = _inputs(4, 8, 2, 32, 16, torch.float32)
    packed = moe_pack.reference(ids, 8, 16)
    problem = P.moe_gemm("fp32", 4, (32, 16), 8, 2, act=False)
    config = {**MG.default_config(problem, MG.launch_spec(CPU, persistent=False), schedule="packed"), "tma": True}
    assert MG.TEMPLATE.reject_reason(config, problem, MG.launch_spec(CPU)) == "tma: interpreter has no TMA"
    with pytest.raises(ConfigRejected, match="tma: interpreter has no TMA"):
        MG.moe_gemm(h, w, packed, top_k=2, gather=False, config=config)
