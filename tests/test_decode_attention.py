"""Decode attention (flash-decoding, splits combined by a second kernel) against the fp64 reference,
outputs NaN-poisoned: configs sampled from the space, ragged lengths (1, not multiples of the split chunk
or the tile), GQA ratios 1/4/8, the combine over a split count that is not a power of 2 with empty splits
among them, a cache view shorter than the tuned context; both kernels compile for sm_90."""
import dataclasses
import random

import pytest
import torch

from tuneforge.dsl import Problem, check, get
from tuneforge.dsl.space import Space
from tuneforge.dsl.devices import SPECS
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.kernels import decode_attention as DA
from tuneforge.kernels import gemm as G

from conftest import compile_for_sm90

CPU = torch.device("cpu")
TEMPLATE = get("decode_attention")


def _configs(problem: Problem, count: int, seed: int) -> list[dict]:
    """The default and ``count`` configs the constraints accept, always one with splits."""
    spec = G.launch_spec(CPU)
    valid = [c for c in TEMPLATE.space(problem).enumerate() if TEMPLATE.reject_reason(c, problem, spec) is None]
    rng = random.Random(seed)
    picked = [TEMPLATE.default_config(problem, spec)] + rng.sample(valid, count - 1)
    picked.append(rng.choice([c for c in valid if c["splits"] > 1]))
    return picked


def _config(splits, block_n=16, tma=False):
    return dict(splits=splits, block_n=block_n, num_warps=4, num_stages=1, tma=tma)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dims", [
    dict(m=3, heads=8, kv_heads=2, head_dim=32, ctx=150),    # GQA groups of 4 (padded to 16 rows), odd ctx
    dict(m=2, heads=6, kv_heads=6, head_dim=24, ctx=70),     # no grouping, head_dim not a power of 2
    dict(m=1, heads=16, kv_heads=1, head_dim=64, ctx=200),   # one KV head shared by 16 query heads
])
def test_configs_match_reference(dtype, dims):
    problem = Problem.make("decode_attention", dtype, **dims)
    for i, config in enumerate(_configs(problem, 2, seed=len(dtype))):
        result = check(TEMPLATE, problem, config, seed=i)
        assert result, f"{config}: {result.reason}"


@pytest.mark.parametrize("group", [1, 8])
def test_ragged_lengths_and_the_split_combine(group):
    """Lengths 1, 37, 130 and 319 in a 320-slot cache (none a multiple of the 16-key tile): 20 splits
    (the combine's block of 32 partly masked), the short sequences' splits without keys among them
    (max -inf, weight 0)."""
    problem = Problem.make("decode_attention", "fp32", m=4, heads=group, kv_heads=1, head_dim=64, ctx=320)
    inputs = TEMPLATE.make_inputs(problem, CPU, seed=group)
    inputs["positions"] = torch.tensor([0, 36, 129, 318])
    config = _config(20)
    assert DA.split_count(320, config) == 20
    result = check(TEMPLATE, problem, config, inputs=inputs)
    assert result, f"{config}: {result.reason}"


def test_a_shorter_cache_view_keeps_the_split_count():
    """The engine's view may be shorter than the tuned context (kv_len 8192 at the 16384 bucket): the
    programs stay; only a view with fewer 16-key blocks than splits gets fewer."""
    config = _config(32, 64)
    assert DA.split_count(16384, config) == DA.split_count(8192, config) == DA.split_count(512, config) == 32
    assert DA.split_count(500, config) == 32 and DA.split_count(200, config) == 13
    assert DA.split_count(1, config) == 1


def test_a_sequence_shorter_than_its_view_spreads_over_every_split():
    """Chunks are cut from each sequence's own length on the device: 1000 keys in a 4096-slot view
    over 8 splits are 8 chunks of 128 keys (the last 104), not 2 of 512 and 6 empty; lengths that are
    no multiple of the 16-key block, of the splits or of the tile; a sequence of one key."""
    problem = Problem.make("decode_attention", "fp32", m=3, heads=4, kv_heads=2, head_dim=32, ctx=4096)
    inputs = TEMPLATE.make_inputs(problem, CPU, seed=5)
    inputs["positions"] = torch.tensor([999, 0, 70])
    for config in (_config(8, 64), _config(3, 32)):
        result = check(TEMPLATE, problem, config, inputs=inputs)
        assert result, f"{config}: {result.reason}"


def test_short_sequences_leave_splits_empty_and_launches_share_the_workspace():
    """Sequences of 1 and 5 keys in a 256-slot cache: most splits see no key; back-to-back launches
    share the workspace, so each must combine only its own partials."""
    problem = Problem.make("decode_attention", "fp32", m=3, heads=4, kv_heads=2, head_dim=16, ctx=256)
    inputs = TEMPLATE.make_inputs(problem, CPU, seed=2)
    inputs["positions"] = torch.tensor([0, 4, 255])
    config = _config(4)
    for _ in range(2):
        result = check(TEMPLATE, problem, config, inputs=dict(inputs))
        assert result, result.reason
        inputs["q"] = inputs["q"].flip(0)


def test_baseline_is_the_engine_sdpa_and_matches_the_reference():
    problem = Problem.make("decode_attention", "fp32", m=2, heads=8, kv_heads=2, head_dim=16, ctx=40)
    inputs = TEMPLATE.make_inputs(problem, CPU, seed=3)
    inputs.pop("out")
    torch.testing.assert_close(TEMPLATE.baseline(**inputs).double(), TEMPLATE.reference(**inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(q=a["q"][0]), "q must be a 3-D tensor"),
    (lambda a: a.update(q=a["q"][:, :3]), "not a multiple of kv_heads"),
    (lambda a: a.update(v=a["v"].double()), "dtype"),
    (lambda a: a.update(positions=a["positions"].float()), "positions must be an integer tensor"),
    (lambda a: a.update(positions=a["positions"][:1]), "positions must be an integer tensor"),
    (lambda a: a.update(k=a["k"].repeat_interleave(2, -1)[..., ::2]), "k must be contiguous in its last dimension"),
    (lambda a: a.update(k=a["k"][:, :, :, :8], v=a["v"][:, :, :, :8]), r"k has shape \(2, 2, 32, 8\), expected"),
])
def test_bad_inputs_give_one_line_errors(change, message):
    problem = Problem.make("decode_attention", "fp32", m=2, heads=4, kv_heads=2, head_dim=16, ctx=32)
    args = TEMPLATE.make_inputs(problem, CPU, seed=0)
    args.pop("out")
    change(args)
    with pytest.raises(InputError, match=message) as e:
        DA.decode_attention(**args)
    assert "\n" not in str(e.value)


def test_space_and_constraints():
    problem = Problem.make("decode_attention", "bf16", m=1, heads=64, kv_heads=8, head_dim=128, ctx=256)
    assert isinstance(TEMPLATE.space(problem), Space)
    spec = G.launch_spec(CPU)
    short = problem.with_dims(ctx=40)
    assert "block_n=128 exceeds ctx=40" in TEMPLATE.reject_reason(dict(_config(1, 128), num_stages=2), short, spec)
    assert "shared memory" in TEMPLATE.reject_reason(dict(_config(2, 128), num_stages=4), problem, spec)
    assert TEMPLATE.reject_reason(dict(_config(4, 64), num_stages=3), problem, spec) is None
    assert TEMPLATE.reject_reason(_config(4, 64, tma=True), problem, spec) == "tma: interpreter has no TMA"
    odd = problem.with_dims(head_dim=96)
    h200 = SPECS["H200"]
    assert TEMPLATE.reject_reason(_config(4, 64, tma=True), odd, h200) == "tma: head_dim=96 is not a power of 2 of 16-byte rows"
    assert TEMPLATE.reject_reason(_config(4, 64, tma=True), problem, h200) is None
    inputs = TEMPLATE.make_inputs(problem.with_dims(ctx=64), CPU)      # the launcher refuses it in one line too
    with pytest.raises(ConfigRejected, match="tma: interpreter has no TMA"):
        DA.decode_attention(inputs["q"], inputs["k"], inputs["v"], inputs["positions"], config=_config(4, 64, tma=True))


def test_default_config_gives_a_short_batch_programs_for_every_sm():
    """Qwen3-32B's 8 KV heads on 132 SMs: batch 1 gets 64 splits (512 programs, 2 stages), batch 8 four
    (3 stages), batch 32 and more none; a short cache never gets more splits than 64-key tiles."""
    spec = dataclasses.replace(G.launch_spec(CPU), sms=132)
    configs = {(m, ctx): TEMPLATE.default_config(Problem.make("decode_attention", "bf16", m=m, heads=64, kv_heads=8,
                                                              head_dim=128, ctx=ctx), spec)
               for m in (1, 8, 32, 128) for ctx in (256, 8192)}
    assert {key: c["splits"] for key, c in configs.items()} == {
        (1, 256): 4, (1, 8192): 64, (8, 256): 4, (8, 8192): 4, (32, 256): 1, (32, 8192): 1, (128, 256): 1, (128, 8192): 1}
    assert {key: c["num_stages"] for key, c in configs.items() if key[1] == 8192} == {
        (1, 8192): 2, (8, 8192): 3, (32, 8192): 3, (128, 8192): 3}


@pytest.mark.gpu
@pytest.mark.parametrize("m,ctx", [(1, 256), (1, 4096), (1, 32768), (32, 256), (32, 4096)])
def test_gpu_qwen3_32b_shapes(device, m, ctx):
    problem = Problem.make("decode_attention", "bf16", m=m, heads=64, kv_heads=8, head_dim=128, ctx=ctx)
    spec = G.launch_spec(device)
    for config in (TEMPLATE.default_config(problem, spec), dict(_config(16, 32), num_stages=2),
                   dict(TEMPLATE.default_config(problem, spec), tma=True), dict(_config(16, 32, tma=True), num_stages=2)):
        result = check(TEMPLATE, problem, config, device=device)
        assert result, f"{config}: {result.reason}"


@pytest.mark.gpu
def test_gpu_tma_loads_refuse_a_cache_whose_heads_are_not_whole_rows(device):
    """[batch, length, kv_heads, d] transposed: a head's keys are not consecutive rows of one layout."""
    q = torch.randn(1, 8, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 64, 2, 128, device=device, dtype=torch.bfloat16).transpose(1, 2)
    positions = torch.tensor([63], device=device)
    with pytest.raises(ConfigRejected, match="tma needs k and v of one layout whose heads and sequences are whole rows"):
        DA.decode_attention(q, k, k, positions, config=_config(4, 16, tma=True))


def test_the_kernels_compile_for_sm90():
    """Qwen3-32B's group of 8 query heads per KV head in bf16 (pointer and TMA loads), and the combine of 64
    splits, with the programmatic-dependent-launch instructions the GPU path uses (the interpreter runs
    without them)."""
    types = dict(q="*bf16", k="*bf16", v="*bf16", pos="*i64", out="*bf16", part="*fp32", scale_log2="fp32")
    compile_for_sm90("tuneforge.kernels.decode_attention", [
        ("_decode_attention_kernel", dict(GROUP=8, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, UPCAST=False,
                                          INPUT_PRECISION="tf32", USE_TMA=False, PDL=True)),
        ("_combine_kernel", dict(GROUP=8, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_S=64, PDL=True))], types)
    # the TMA loads: k and v as descriptors of [64 keys, 128] blocks
    compile_for_sm90("tuneforge.kernels.decode_attention", [
        ("_decode_attention_kernel", dict(GROUP=8, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, UPCAST=False,
                                          INPUT_PRECISION="tf32", USE_TMA=True, PDL=True))],
        {**types, "k": "tensordesc<bf16[64,128]>", "v": "tensordesc<bf16[64,128]>"})


def test_tma_descriptors_need_aligned_rows_refused_in_one_line():
    """What a TMA descriptor asserts (a 16-byte base and row stride; an i32 row count) is a one-line
    ConfigRejected before any descriptor is built (the engine's fallback catches that, not an assert)."""
    from tuneforge.kernels._common import tma_rows_fit
    rows = torch.zeros(65, 128, dtype=torch.bfloat16)
    tma_rows_fit("op", (rows,), 128, 65)                       # aligned: nothing to say
    with pytest.raises(ConfigRejected, match="op: tma needs a 16-byte aligned base and row stride and < 2"):
        tma_rows_fit("op", (rows[1:, 1:],), 128, 64)           # a base 258 bytes in
    with pytest.raises(ConfigRejected, match="a row stride of 198 bytes"):
        tma_rows_fit("op", (rows,), 99, 65)
    with pytest.raises(ConfigRejected, match=f"{2 ** 31} rows"):
        tma_rows_fit("op", (rows,), 128, 2 ** 31)
