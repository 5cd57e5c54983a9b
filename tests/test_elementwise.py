"""The elementwise/row ops (rmsnorm, silu_mul, rope_qk_norm, shared_expert_gate) against their fp32 references.

CPU: the real kernels under Triton's interpreter on tiny odd shapes, every dtype, the default config plus
the narrowest (multi-block / looping) config and configs sampled from the space, outputs NaN-poisoned;
the templates' constraints and cost models; each op's own modes (fused residual in place or to another
buffer, strided views, in-place rope on the qkv buffer, zero tokens) and input errors; rope and rmsnorm
references against transformers' Qwen3 modules. GPU (``-m gpu``): Qwen3 shapes (hidden 4096/5120,
64 heads, 8 kv heads, head_dim 128).
"""
import dataclasses
import random
import re

import pytest
import torch

import tuneforge
from tuneforge.dsl import Problem, check, compare, get, poison
from tuneforge.errors import InputError
from tuneforge.kernels import rmsnorm as rms
from tuneforge.kernels import rope
from tuneforge.kernels import silu_mul as sm
from tuneforge.kernels._common import launch_spec
from tuneforge.dsl.devices import spec

DTYPES = ("fp32", "fp16", "bf16")
H100 = spec("H100")

# op -> (a tiny problem with odd sizes, a real Qwen3 problem, the parameter whose smallest value makes
# a program cover the least of a row: several column blocks / loop iterations / head groups)
CASES = {
    "shared_expert_gate": (dict(m=5, n=300), dict(m=4096, n=5120), "block_n"),
    "rmsnorm": (dict(m=5, n=300), dict(m=4096, n=5120), "block_n"),
    "silu_mul": (dict(m=3, n=200), dict(m=4096, n=3200), "block_n"),
    "rope_qk_norm": (dict(m=3, heads=5, kv_heads=2, head_dim=12), dict(m=4096, heads=64, kv_heads=8, head_dim=128),
                     "heads"),
}


def valid_configs(template, problem, device_spec, count, seed=0, narrow_key="block_n"):
    """The default config, the config covering least of a row (most ROWS), and ``count`` random valid ones."""
    valid = [c for c in template.space(problem).enumerate() if template.reject_reason(c, problem, device_spec) is None]
    narrow = min(valid, key=lambda c: (c[narrow_key], -c["rows"]))
    return [template.default_config(problem, device_spec), narrow] + random.Random(seed).sample(valid, min(count, len(valid)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(CASES))
def test_default_and_sampled_configs_match_reference(op, dtype):
    dims, _, narrow_key = CASES[op]
    template, problem = get(op), Problem.make(op, dtype, **dims)
    configs = valid_configs(template, problem, H100, 3, seed=len(op) + len(dtype), narrow_key=narrow_key)
    for config in configs:
        result = check(template, problem, config)
        assert result, f"{op} {dtype} {config}: {result.reason}"


@pytest.mark.parametrize("op", sorted(CASES))
def test_space_constraints_and_default_configs(op):
    template = get(op)
    _, real, _ = CASES[op]
    problem = Problem.make(op, "bf16", **real)
    reasons = [template.reject_reason(c, problem, H100) for c in template.space(problem).enumerate()]
    assert any(r is None for r in reasons), "nothing in the space is valid"
    assert any(r for r in reasons), "the constraints reject nothing"
    for m in (1, 3, 64, 4096, 65536):
        for scale in (1, 2):
            dims = {k: (v * scale if k in ("n", "heads", "head_dim") else v) for k, v in real.items()}
            p = problem.with_dims(**{**dims, "m": m})
            for device in (H100, spec("MI300X")):
                config = template.default_config(p, device)
                assert template.reject_reason(config, p, device) is None, (p.key, config)


@pytest.mark.parametrize("op", sorted(CASES))
def test_cost_model_prefers_the_fused_kernel_and_respects_the_bandwidth_floor(op):
    template = get(op)
    _, real, _ = CASES[op]
    large, small = Problem.make(op, "bf16", **real), Problem.make(op, "bf16", **{**real, "m": 1})
    fused = template.cost(large, template.default_config(large, H100), H100)
    assert template.cost(large, None, H100) > fused                # torch moves >= 5/4 of the bytes
    assert fused >= template.work(large)[1] / H100.hbm_bytes_per_s
    assert template.cost(small, template.default_config(small, H100), H100) < fused
    per_token = template.work(small.with_dims(m=2))[1] - template.work(small)[1]    # linear in tokens
    assert per_token > 0 and template.work(large)[1] - template.work(small)[1] == pytest.approx(4095 * per_token)


# --- rmsnorm ----------------------------------------------------------------------------------------

def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bf16_truncated(t):
    """fp32 -> bf16 by truncation: what Triton's interpreter does for every bf16 cast (the GPU rounds to nearest)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


LOOPING = {"block_n": 128, "rows": 2, "num_warps": 1}      # 300 columns: three passes per loop


@pytest.mark.parametrize("config", [None, LOOPING], ids=["one-pass", "looping"])
def test_rmsnorm_fused_residual_in_place(config):
    x, residual, weight = _rand(3, 300, dtype=torch.bfloat16), _rand(3, 300, dtype=torch.bfloat16, seed=1), _rand(300)
    h = x.float() + residual.float()
    expected = rms.reference(x, weight, 1e-6, residual=residual.clone())
    y = rms.rmsnorm(x, weight, 1e-6, residual=residual, config=config)
    assert torch.equal(residual, bf16_truncated(h) if tuneforge.INTERPRETED else h.to(torch.bfloat16))
    result = compare(y, expected)
    assert result, result.reason


def test_rmsnorm_residual_to_another_buffer_and_strided_rows():
    m, n = 4, 300
    x = _rand(m, n + 20, dtype=torch.float16)[:, 20:]
    residual = _rand(m, n, dtype=torch.float16, seed=1)
    before = residual.clone()
    residual_out, y = poison(torch.empty(m, n, dtype=torch.float16)), poison(torch.empty(m, 2 * n, dtype=torch.float16))
    rms.rmsnorm(x, _rand(n), 1e-5, residual=residual, residual_out=residual_out, out=y[:, :n], config=LOOPING)
    assert torch.equal(residual, before)
    assert torch.equal(residual_out, (x.float() + residual.float()).half())
    result = compare(y[:, :n], rms.reference(x, _rand(n), 1e-5, residual=residual))
    assert result, result.reason
    assert torch.isnan(y[:, n:]).all()


@pytest.mark.parametrize("config", [None, LOOPING], ids=["one-pass", "looping"])
def test_rmsnorm_plain_matches_transformers_qwen3_rmsnorm(config):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    norm = Qwen3RMSNorm(300, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(_rand(300, seed=2))
        x = _rand(5, 300) * 3
        result = compare(rms.rmsnorm(x, norm.weight.detach(), 1e-6, config=config), norm(x))
    assert result, result.reason


def test_rmsnorm_zero_tokens_and_errors():
    weight = torch.ones(8)
    assert rms.rmsnorm(torch.empty(0, 8), weight, residual=torch.empty(0, 8)).shape == (0, 8)
    x = torch.randn(2, 8)
    cases = [
        (lambda: rms.rmsnorm(x, torch.ones(7)), r"weight has shape \(7,\), expected \(8,\)"),
        (lambda: rms.rmsnorm(x, weight, residual=torch.randn(2, 8).half()), r"residual has dtype torch.float16"),
        (lambda: rms.rmsnorm(x, weight, residual_out=torch.randn(2, 8)), r"residual_out given without residual"),
        (lambda: rms.rmsnorm(x, weight, residual=torch.randn(2, 8), residual_out=torch.randn(3, 8)),
         r"residual_out has shape \(3, 8\)"),
        (lambda: rms.rmsnorm(x, weight, 0.0), r"eps must be > 0"),
        (lambda: rms.rmsnorm(x[None], weight), r"x must be a 2-D"),
        (lambda: rms.rmsnorm(x, weight.to("meta")), r"weight is on meta"),
        (lambda: rms.rmsnorm(torch.randn(8, 2).t(), weight), r"x must be contiguous in its last dimension"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


# --- silu_mul ---------------------------------------------------------------------------------------

def test_silu_mul_strided_rows_and_out():
    m, n = 3, 150
    x = _rand(m, 2 * n + 10, dtype=torch.bfloat16)[:, 10:]
    out = poison(torch.empty(m, n + 4, dtype=torch.bfloat16))
    sm.silu_mul(x, out=out[:, 4:], config={"block_n": 128, "rows": 4, "num_warps": 2})
    result = compare(out[:, 4:], sm.reference(x))
    assert result, result.reason
    assert torch.isnan(out[:, :4]).all()
    assert compare(sm.silu_mul(x), sm.reference(x))        # allocating call, default config


def test_silu_mul_zero_tokens_and_errors():
    assert sm.silu_mul(torch.empty(0, 10)).shape == (0, 5)
    cases = [
        (lambda: sm.silu_mul(torch.randn(2, 7)), r"last dimension must be even \(gate \| up halves\), got 7"),
        (lambda: sm.silu_mul(torch.randn(2, 8), out=torch.empty(2, 8)), r"out has shape \(2, 8\), expected \(2, 4\)"),
        (lambda: sm.silu_mul(torch.randn(8)), r"x must be a 2-D"),
        (lambda: sm.silu_mul(torch.randn(2, 8, dtype=torch.float64)), r"x has dtype torch.float64; supported"),
        (lambda: sm.silu_mul(torch.randn(2, 8), out=torch.empty(2, 4).half()), r"out has dtype torch.float16"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()


# --- rope_qk_norm -----------------------------------------------------------------------------------

def _rope_inputs(m=3, heads=5, kv_heads=2, head_dim=12, dtype=torch.float32, positions=(0, 7, 40000)):
    qkv = _rand(m, (heads + 2 * kv_heads) * head_dim, dtype=dtype) * 2
    return dict(qkv=qkv, positions=torch.tensor(positions[:m]), q_weight=1 + 0.2 * _rand(head_dim, seed=1),
                k_weight=1 + 0.2 * _rand(head_dim, seed=2), heads=heads, kv_heads=kv_heads)


def _transformers_qwen3(qkv, positions, q_weight, k_weight, heads, kv_heads, theta=1e6, eps=1e-6):
    """transformers' Qwen3 attention prologue: q_norm/k_norm per head, then apply_rotary_pos_emb."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb
    head_dim, m = q_weight.shape[0], qkv.shape[0]
    config = Qwen3Config(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": theta})
    q_norm, k_norm = Qwen3RMSNorm(head_dim, eps), Qwen3RMSNorm(head_dim, eps)
    with torch.no_grad():
        q_norm.weight.copy_(q_weight)
        k_norm.weight.copy_(k_weight)
        q = q_norm(qkv[:, :heads * head_dim].reshape(1, m, heads, head_dim)).transpose(1, 2)
        k = k_norm(qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(1, m, kv_heads, head_dim)).transpose(1, 2)
        cos, sin = Qwen3RotaryEmbedding(config)(qkv, positions[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return torch.cat((q.transpose(1, 2), k.transpose(1, 2)), dim=2).reshape(m, -1)


def test_rope_reference_matches_transformers_qwen3():
    inputs = _rope_inputs(m=3, heads=4, kv_heads=2, head_dim=16)
    result = compare(rope.reference(**inputs), _transformers_qwen3(**inputs))
    assert result, result.reason


def test_rope_kernel_matches_transformers_in_bf16_and_fp32():
    for dtype in (torch.float32, torch.bfloat16):
        inputs = _rope_inputs(dtype=dtype)
        hf = _transformers_qwen3(**{**inputs, "q_weight": inputs["q_weight"].to(dtype),
                                    "k_weight": inputs["k_weight"].to(dtype)})
        # transformers rounds to bf16 after the norm, of cos/sin and of each product: twice the tolerance
        result = compare(rope.rope_qk_norm(**inputs), hf, scale=1.0 if dtype == torch.float32 else 2.0)
        assert result, f"{dtype}: {result.reason}"


def test_rope_in_place_on_qkv_leaves_v_and_takes_int32_positions():
    inputs = _rope_inputs(dtype=torch.float16)
    qkv, heads, kv_heads, head_dim = inputs["qkv"], 5, 2, 12
    expected, v = rope.reference(**inputs), qkv[:, (heads + kv_heads) * head_dim:].clone()
    qk = qkv[:, :(heads + kv_heads) * head_dim]
    out = rope.rope_qk_norm(**{**inputs, "positions": inputs["positions"].int()}, out=qk,
                            config={"heads": 2, "rows": 2, "num_warps": 1})
    assert out.data_ptr() == qkv.data_ptr()
    result = compare(qk, expected)
    assert result, result.reason
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v)


def test_rope_decode_batch_with_mixed_positions_rotates_each_token_by_its_own():
    inputs = _rope_inputs(m=2, positions=(3, 3))
    inputs["qkv"][1] = inputs["qkv"][0]
    same = rope.rope_qk_norm(**inputs)
    assert torch.equal(same[0], same[1])
    moved = rope.rope_qk_norm(**{**inputs, "positions": torch.tensor([3, 4])})
    assert torch.equal(moved[0], same[0]) and not torch.allclose(moved[1], same[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_stores_k_and_v_in_the_kv_cache_in_the_same_launch(dtype):
    """With kv_cache: each token's rotated k and its v land at (cache row, position), the rest of the
    NaN-poisoned cache stays as it was, and q | k in qkv are as without the cache."""
    heads, kv_heads, head_dim, slots = 5, 2, 12, 50
    inputs = _rope_inputs(m=4, dtype=dtype, positions=(0, 7, 49, 7))
    rows = torch.tensor([1, 0, 2, 2])          # rows 0 and 2 both at position 7: different places
    def plain_at(positions):
        plain = inputs["qkv"].clone()
        rope.rope_qk_norm(**{**inputs, "qkv": plain, "positions": positions}, out=plain[:, :(heads + kv_heads) * head_dim])
        return plain
    plain = plain_at(inputs["positions"])
    cache = torch.full((2, 3, kv_heads, slots, head_dim), float("nan"), dtype=dtype)
    expected = cache.clone()
    rope.cache_reference(expected, rows, inputs["positions"], plain[:, heads * head_dim:])
    qkv = inputs["qkv"]
    rope.rope_qk_norm(**inputs, out=qkv[:, :(heads + kv_heads) * head_dim], kv_cache=cache, cache_rows=rows,
                      config={"heads": 2, "rows": 2, "num_warps": 1})
    assert torch.equal(qkv, plain)
    assert torch.equal(cache.isnan(), expected.isnan()) and torch.equal(cache.nan_to_num(), expected.nan_to_num())
    # index tensors of stride 0 (a prefill's rows, one row expanded over its tokens) read as broadcast
    one_row, positions = torch.tensor([1]).expand(4), torch.tensor([3, 4, 5, 6])
    rope.cache_reference(expected, one_row, positions, plain_at(positions)[:, heads * head_dim:])
    qkv = inputs["qkv"].clone()
    rope.rope_qk_norm(**{**inputs, "qkv": qkv, "positions": positions}, out=qkv[:, :(heads + kv_heads) * head_dim],
                      kv_cache=cache, cache_rows=one_row)
    assert torch.equal(cache.isnan(), expected.isnan()) and torch.equal(cache.nan_to_num(), expected.nan_to_num())
    with pytest.raises(InputError, match="kv_cache and cache_rows go together"):
        rope.rope_qk_norm(**inputs, kv_cache=cache)
    with pytest.raises(InputError, match=r"kv_cache must be \[2, batch, kv_heads=2, slots, head_dim=12\]"):
        rope.rope_qk_norm(**inputs, kv_cache=cache[:, :, :1], cache_rows=rows)
    with pytest.raises(InputError, match=r"cache_rows must be an integer \[4\] tensor"):
        rope.rope_qk_norm(**inputs, kv_cache=cache, cache_rows=rows[:3])


@pytest.mark.parametrize("m", [5, 37])
def test_the_tuned_cache_problem_times_what_the_engine_runs(m):
    """The plan's rope_qk_norm with ``cache=1`` (the engine's layers with the cache split by heads):
    its inputs carry a NaN-poisoned cache the tokens fill slot by slot from a random slot per row (37
    tokens: 32 rows, a second slot for 5 of them), at positions that are those slots (past 0: rotated);
    sampled configs pass the template check (q | k and the cache) and store every token's k and v as
    ``cache_reference`` does; the baseline stores them too (it is timed against the fused launch)."""
    problem = Problem.make("rope_qk_norm", "fp32", m=m, heads=5, kv_heads=2, head_dim=12, cache=1)
    template = get("rope_qk_norm")
    spec = launch_spec(torch.device("cpu"), persistent=False)
    configs = [c for c in template.space(problem).enumerate() if template.reject_reason(c, problem, spec) is None]
    for config in [template.default_config(problem, spec)] + random.Random(m).sample(configs, 2):
        inputs = template.make_inputs(problem, torch.device("cpu"), seed=m)
        cache, rows, positions = inputs["kv_cache"], inputs["cache_rows"], inputs["positions"]
        assert cache.shape[:3] == (2, min(m, 32), 2) and cache.shape[4] == 12 and cache.isnan().all()
        assert int(positions.max()) < cache.shape[3] <= rope.CACHE_BASE + -(-m // 32)
        assert len({(int(r), int(p)) for r, p in zip(rows, positions)}) == m        # every written slot distinct
        assert (positions > 0).all() and len(set(positions.tolist())) > m // 2       # RoPE rotates, at many angles
        again = template.make_inputs(problem, torch.device("cpu"), seed=m)
        assert torch.equal(again["positions"], positions) and again["kv_cache"].shape == cache.shape
        expected = inputs["kv_cache"].clone()
        result = check(template, problem, config, inputs=inputs)
        assert result, f"{config}: {result.reason}"
        kv = inputs["out"][:, 5 * 12:].clone()
        rope.cache_reference(expected, inputs["cache_rows"], inputs["positions"],
                             torch.cat((kv, inputs["qkv"][:, 7 * 12:]), 1))
        assert torch.equal(inputs["kv_cache"].isnan(), expected.isnan()), config
        torch.testing.assert_close(inputs["kv_cache"].nan_to_num(), expected.nan_to_num())
    written = template.make_inputs(problem, torch.device("cpu"), seed=m)
    template.baseline(**{k: v for k, v in written.items() if k != "out"})
    assert torch.equal(written["kv_cache"].isnan(), expected.isnan())
    torch.testing.assert_close(written["kv_cache"].nan_to_num(), expected.nan_to_num(), atol=1e-5, rtol=1e-5)
    assert template.cost(problem, None, spec) > template.cost(Problem.make("rope_qk_norm", "fp32", m=m, heads=5,
                                                                           kv_heads=2, head_dim=12), None, spec)


def _cache_corrupted(template, spoil):
    """``template`` whose launch runs the real kernel and then ``spoil(kv_cache, inputs)`` (config-independent)."""
    def launch(**inputs):
        out = rope.rope_qk_norm(**inputs)
        spoil(inputs["kv_cache"], inputs)
        return out
    return dataclasses.replace(template, launch=launch)


def _first_token(inputs):
    """(cache row, slot) of the token whose slot is lowest (the one above it is unwritten)."""
    t = int(inputs["positions"].argmin())
    return int(inputs["cache_rows"][t]), int(inputs["positions"][t])


def test_the_template_check_catches_a_wrong_kv_cache_store():
    """The tuner's check compares the cache=1 problem's KV cache with ``cache_expected``, not only q | k:
    a wrong k or v value, a store to the wrong slot, a stray store and a missing store fail it, with
    ``out`` right; the cache is re-poisoned by every check, so a config that stores nothing fails on
    inputs an earlier config filled (the bench checks every config on one input set)."""
    problem = Problem.make("rope_qk_norm", "fp32", m=5, heads=5, kv_heads=2, head_dim=12, cache=1)
    template = get("rope_qk_norm")
    config = {"heads": 2, "rows": 1, "num_warps": 1}
    assert check(template, problem, config, seed=3)

    def k_off(cache, inputs):
        row, slot = _first_token(inputs)
        cache[0, row, 1, slot, 3] += 0.01

    def v_off(cache, inputs):
        row, slot = _first_token(inputs)
        cache[1, row, 0, slot, 0] += 0.01

    def wrong_slot(cache, inputs):
        row, slot = _first_token(inputs)
        cache[:, row, :, slot + 1] = cache[:, row, :, slot]
        cache[:, row, :, slot] = float("nan")

    def stray(cache, inputs):
        row, slot = _first_token(inputs)
        cache[:, row, :, slot + 1] = 0.0

    cases = {k_off: "kv_cache: 1/", v_off: "kv_cache: 1/", wrong_slot: "kv_cache: .* NaN",
             stray: "kv_cache: .* written where nothing should be"}
    for spoil, reason in cases.items():
        result = check(_cache_corrupted(template, spoil), problem, config, seed=3)
        assert not result and re.match(reason, result.reason), (spoil.__name__, result.reason)
    inputs = template.make_inputs(problem, torch.device("cpu"), seed=3)
    assert check(template, problem, config, inputs=inputs)
    uncached = dataclasses.replace(template, launch=lambda kv_cache, cache_rows, **rest: rope.rope_qk_norm(**rest))
    result = check(uncached, problem, config, inputs=inputs)
    assert not result and result.reason.startswith("kv_cache: ") and "NaN" in result.reason, result.reason
    # without the cache dim there is nothing beside out to check
    plain = Problem.make("rope_qk_norm", "fp32", m=5, heads=5, kv_heads=2, head_dim=12)
    assert "kv_cache" not in template.make_inputs(plain, torch.device("cpu")) and check(template, plain, config)


def test_rope_cache_inputs_at_zero_tokens():
    made = rope.cache_inputs(0, 2, 12, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert made["kv_cache"].shape[:3] == (2, 1, 2) and made["positions"].shape == made["cache_rows"].shape == (0,)
    problem = Problem.make("rope_qk_norm", "fp32", m=0, heads=5, kv_heads=2, head_dim=12, cache=1)
    assert check(get("rope_qk_norm"), problem, {"heads": 2, "rows": 1, "num_warps": 1})


def test_rope_zero_tokens_and_errors():
    inputs = _rope_inputs(m=2)
    assert rope.rope_qk_norm(**{**inputs, "qkv": inputs["qkv"][:0], "positions": inputs["positions"][:0]}).shape == (0, 84)
    cases = [
        (dict(heads=4), r"qkv has 108 columns, expected \(heads 4 \+ 2 \* kv_heads 2\) \* head_dim 12 = 96"),
        (dict(q_weight=torch.ones(11), k_weight=torch.ones(11)), r"head_dim .* must be even"),
        (dict(k_weight=torch.ones(10)), r"k_weight has shape \(10,\), expected \(12,\)"),
        (dict(positions=torch.tensor([0.0, 1.0])), r"positions has dtype torch.float32, expected torch.int32"),
        (dict(positions=torch.tensor([0, 1, 2])), r"positions must be a \[2\] int tensor"),
        (dict(kv_heads=0, heads=9), r"heads and kv_heads must be >= 1"),
        (dict(out=torch.empty(2, 108)), r"out has shape \(2, 108\), expected \(2, 84\)"),
        (dict(positions=torch.tensor([0, 1], device="meta")), r"positions is on meta"),
        (dict(eps=-1.0), r"eps and theta must be > 0"),
    ]
    for change, message in cases:
        with pytest.raises(InputError, match=message):
            rope.rope_qk_norm(**{**inputs, **change})


# --- GPU: real shapes -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 37])
def test_gpu_rope_kv_cache(device, m):
    """Qwen3-32B's heads (64 q, 8 kv, 128), bf16: the fused cache store equals the kernel without it plus
    the indexed copy, at tokens spread over rows and positions of a NaN-poisoned cache."""
    heads, kv_heads, d, dtype = 64, 8, 128, torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(m, (heads + 2 * kv_heads) * d, generator=g, device=device).to(dtype)
    positions = torch.randperm(300, generator=g, device=device)[:m]        # distinct places: no write order to agree on
    rows = torch.arange(m, device=device) % 3
    weights = dict(q_weight=torch.ones(d, device=device, dtype=dtype), k_weight=torch.ones(d, device=device, dtype=dtype))
    plain = qkv.clone()
    rope.rope_qk_norm(plain, positions, **weights, heads=heads, kv_heads=kv_heads, out=plain[:, :(heads + kv_heads) * d])
    cache = torch.full((2, 3, kv_heads, 300, d), float("nan"), device=device, dtype=dtype)
    expected = cache.clone()
    rope.cache_reference(expected, rows, positions, plain[:, heads * d:])
    rope.rope_qk_norm(qkv, positions, **weights, heads=heads, kv_heads=kv_heads, out=qkv[:, :(heads + kv_heads) * d],
                      kv_cache=cache, cache_rows=rows)
    assert torch.equal(qkv, plain)
    assert torch.equal(cache.isnan(), expected.isnan()) and torch.equal(cache.nan_to_num(), expected.nan_to_num())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7, 256, 4096])
@pytest.mark.parametrize("op", sorted(CASES))
def test_gpu_default_config_real_shapes(op, m, dtype):
    _, real, _ = CASES[op]
    template = get(op)
    for dims in (real, {**real, "n": 4096} if "n" in real else {**real, "heads": 8, "kv_heads": 1}):
        problem = Problem.make(op, dtype, **{**dims, "m": m})
        result = check(template, problem, template.default_config(problem, H100), device="cuda")
        assert result, f"{problem.key}: {result.reason}"


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(CASES))
def test_gpu_sampled_configs(op):
    from tuneforge.dsl.devices import local_device
    _, real, narrow_key = CASES[op]
    template, problem = get(op), Problem.make(op, "bf16", **{**real, "m": 1000})
    for config in valid_configs(template, problem, local_device(), 12, seed=3, narrow_key=narrow_key):
        result = check(template, problem, config, device="cuda")
        assert result, f"{problem.key} {config}: {result.reason}"


@pytest.mark.gpu
def test_gpu_rmsnorm_residual_in_place_looping_and_rope_in_place():
    x = torch.randn(300, 5120, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(300, 5120, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(5120, device="cuda", dtype=torch.bfloat16)
    h = (x.float() + residual.float()).to(torch.bfloat16)
    expected = rms.reference(x, weight, residual=residual.clone())
    y = rms.rmsnorm(x, weight, residual=residual, config={"block_n": 1024, "rows": 2, "num_warps": 4})
    assert torch.equal(residual, h)
    result = compare(y, expected)
    assert result, result.reason

    heads, kv_heads, head_dim = 64, 8, 128
    qkv = torch.randn(33, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 40960, (33,), device="cuda", dtype=torch.int32)
    qw, kw = torch.randn(head_dim, device="cuda"), torch.randn(head_dim, device="cuda")
    args = dict(positions=positions, q_weight=qw, k_weight=kw, heads=heads, kv_heads=kv_heads)
    expected, v = rope.reference(qkv, **args), qkv[:, (heads + kv_heads) * head_dim:].clone()
    rope.rope_qk_norm(qkv, **args, out=qkv[:, :(heads + kv_heads) * head_dim])
    result = compare(qkv[:, :(heads + kv_heads) * head_dim], expected)
    assert result, result.reason
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v)


def test_source_hash_covers_the_shared_row_tiling():
    """The row tiles live in kernels/_common.py: changing them must make silu_mul's stored winners
    stale, so its template hash covers that helper's source as well as its own."""
    import hashlib
    import inspect

    from tuneforge.kernels import _common
    src = inspect.getsource(_common) + inspect.getsource(sm)
    assert get("silu_mul").source_hash == hashlib.sha256(src.encode()).hexdigest()[:16]


def test_source_hash_covers_the_op_files_whose_kernels_an_op_runs():
    """decode_attention_sp runs decode_attention's split kernels and the heap all-gather, the fused TP
    blocks run gemm's tile loop: a change in any of those files makes their stored winners stale."""
    from tuneforge.dsl.template import get as template
    for op, drawn_on in [("decode_attention_sp", ("decode_attention", "allgather", "_common")),
                         ("tp_mlp", ("gemm", "allgather_gemm", "gemm_reducescatter", "_fused")),
                         ("moe_gemm", ("moe_pack", "_common"))]:
        covered = template(op).source_modules
        assert {f"tuneforge.kernels.{m}" for m in drawn_on} <= set(covered), (op, covered)
