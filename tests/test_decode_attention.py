"""Decode attention (flash-decoding with in-launch split combine) against the fp64 reference."""
import random

import pytest
import torch

from tuneforge.dsl import Problem, check, get
from tuneforge.dsl.space import Space
from tuneforge.errors import InputError
from tuneforge.kernels import decode_attention as DA
from tuneforge.kernels import gemm as G

CPU = torch.device("cpu")
TEMPLATE = get("decode_attention")


def _configs(problem: Problem, count: int, seed: int) -> list[dict]:
    """The default and ``count`` configs the constraints accept, always one with splits."""
    spec = G.launch_spec(CPU)
    valid = [c for c in TEMPLATE.space(problem).enumerate() if TEMPLATE.reject_reason(c, problem, spec) is None]
    rng = random.Random(seed)
    picked = [TEMPLATE.default_config(problem, spec)] + rng.sample(valid, count - 1)
    picked.append(rng.choice([c for c in valid if c["chunk"] < problem["ctx"]]))
    return picked


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dims", [
    dict(m=3, heads=8, kv_heads=2, head_dim=32, ctx=150),    # GQA groups of 4 (padded to 16 rows), odd ctx
    dict(m=2, heads=6, kv_heads=6, head_dim=24, ctx=70),     # no grouping, head_dim not a power of 2
    dict(m=1, heads=16, kv_heads=1, head_dim=64, ctx=200),   # one KV head shared by 16 query heads
])
def test_configs_match_reference(dtype, dims):
    problem = Problem.make("decode_attention", dtype, **dims)
    for i, config in enumerate(_configs(problem, 3, seed=len(dtype))):
        result = check(TEMPLATE, problem, config, seed=i)
        assert result, f"{config}: {result.reason}"


def test_short_sequences_leave_splits_empty_and_counters_rearmed():
    """Sequences of 1 and 5 keys in a 256-slot cache: most splits see no key; back-to-back launches
    share the workspace, so every counter must be re-armed."""
    problem = Problem.make("decode_attention", "fp32", m=3, heads=4, kv_heads=2, head_dim=16, ctx=256)
    inputs = TEMPLATE.make_inputs(problem, CPU, seed=2)
    inputs["positions"] = torch.tensor([0, 4, 255])
    config = dict(chunk=64, block_n=16, num_warps=4, num_stages=1)
    for _ in range(2):
        result = check(TEMPLATE, problem, config, inputs=dict(inputs))
        assert result, result.reason
    _, counts = G.workspace(CPU, 0, 0)
    assert int(counts.abs().sum()) == 0


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
    assert "block_n" in TEMPLATE.reject_reason(dict(chunk=64, block_n=128, num_warps=4, num_stages=2), problem, spec)
    assert "exceeds ctx" in TEMPLATE.reject_reason(dict(chunk=1024, block_n=64, num_warps=4, num_stages=2), problem, spec)


@pytest.mark.gpu
@pytest.mark.parametrize("m,ctx", [(1, 256), (1, 4096), (32, 256), (32, 4096)])
def test_gpu_qwen3_32b_shapes(device, m, ctx):
    problem = Problem.make("decode_attention", "bf16", m=m, heads=64, kv_heads=8, head_dim=128, ctx=ctx)
    spec = G.launch_spec(device)
    for config in (TEMPLATE.default_config(problem, spec), dict(chunk=64, block_n=32, num_warps=4, num_stages=2)):
        result = check(TEMPLATE, problem, config, device=device)
        assert result, f"{config}: {result.reason}"
