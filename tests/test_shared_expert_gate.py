"""The shared-expert combine ``out = final + sigmoid(gate_logits) * shared_out`` against its fp32 reference.

CPU: the real kernel under Triton's interpreter: in-place / explicit strided out / strided inputs /
1-D gate / zero-token modes and the input errors (the sweep over dtypes and configs of the space,
shared by every elementwise op, is in test_elementwise.py). GPU (``-m gpu``): Qwen3-Next hidden sizes,
configs sampled from the space, in place on strided views (default configs at Qwen3 shapes: test_elementwise.py).
"""
import pytest
import torch

from test_elementwise import valid_configs
from tuneforge.dsl import Problem, check, compare, get, poison
from tuneforge.errors import InputError
from tuneforge.kernels.shared_expert_gate import reference, shared_expert_gate

TEMPLATE = get("shared_expert_gate")


def _inputs(m, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) for s in ((m, n), (m, 1), (m, n))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_on_final(dtype):
    final, gate, shared = _inputs(3, 129, dtype)
    expected = reference(final, gate, shared)
    out = shared_expert_gate(final, gate, shared, out=final, config={"block_n": 128, "rows": 2, "num_warps": 1})
    assert out.data_ptr() == final.data_ptr()
    result = compare(final, expected)
    assert result, result.reason


def test_strided_inputs_1d_gate_and_explicit_strided_out():
    m, n = 4, 200
    wide_final, wide_shared = torch.randn(m, n + 56), torch.randn(m, 2 * n)
    final, shared = wide_final[:, 3:3 + n], wide_shared[:, n:]            # row strides 256 and 400
    router = torch.randn(m, 5)
    gate = router[:, 2]                                                   # 1-D, token stride 5
    out_buf = poison(torch.empty(m, n + 8))
    out = out_buf[:, 8:]
    shared_expert_gate(final, gate, shared, out=out, config={"block_n": 128, "rows": 4, "num_warps": 2})
    result = compare(out, reference(final, gate, shared))
    assert result, result.reason
    assert torch.isnan(out_buf[:, :8]).all()                              # nothing written outside out


def test_allocating_call_uses_the_default_config_and_mixed_gate_dtype():
    final, _, shared = _inputs(2, 33, torch.bfloat16)
    gate = torch.randn(2, 1)                                              # fp32 logits with bf16 activations
    out = shared_expert_gate(final, gate, shared)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 33)
    result = compare(out, reference(final, gate, shared))
    assert result, result.reason


def test_zero_tokens_and_zero_hidden_are_no_ops():
    for m, n in ((0, 64), (3, 0)):
        final, gate, shared = _inputs(m, n, torch.float16)
        assert shared_expert_gate(final, gate, shared).shape == (m, n)


@pytest.mark.parametrize("call, message", [
    (lambda f, g, s: shared_expert_gate(f[0], g, s), r"final must be a 2-D \[tokens, hidden\] tensor, got \(6,\)"),
    (lambda f, g, s: shared_expert_gate(f, g, s[:, :5]), r"shared_out has shape \(4, 5\), expected \(4, 6\)"),
    (lambda f, g, s: shared_expert_gate(f, g[:3], s), r"gate_logits must be \[4, 1\] or \[4\].*got \(3, 1\)"),
    (lambda f, g, s: shared_expert_gate(f, g.expand(4, 2), s), r"gate_logits must be \[4, 1\] or \[4\]"),
    (lambda f, g, s: shared_expert_gate(f, g, s.half()), r"shared_out has dtype torch.float16, expected torch.float32"),
    (lambda f, g, s: shared_expert_gate(f.double(), g, s.double()), r"final has dtype torch.float64; supported"),
    (lambda f, g, s: shared_expert_gate(f, g, s, out=torch.empty(4, 6, dtype=torch.bfloat16)),
     r"out has dtype torch.bfloat16, expected torch.float32"),
    (lambda f, g, s: shared_expert_gate(f, g, s, out=torch.empty(4, 6, device="meta")),
     r"out is on meta but this call runs on cpu"),
    (lambda f, g, s: shared_expert_gate(f, g.to("meta"), s), r"gate_logits is on meta"),
    (lambda f, g, s: shared_expert_gate(f, g, torch.randn(6, 4).t()), r"shared_out must be contiguous in its last"),
    (lambda f, g, s: shared_expert_gate(f, g.int(), s), r"gate_logits has dtype torch.int32"),
])
def test_input_errors_are_one_line_and_name_the_problem(call, message):
    final, gate, shared = _inputs(4, 6, torch.float32)
    with pytest.raises(InputError, match=message) as info:
        call(final, gate, shared)
    assert "\n" not in str(info.value)


# --- GPU: real shapes -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_sampled_configs_and_modes():
    from tuneforge.dsl.devices import local_device
    problem = Problem.make("shared_expert_gate", "bf16", m=1000, n=5120)
    for config in valid_configs(TEMPLATE, problem, local_device(), 12, seed=1):
        result = check(TEMPLATE, problem, config, device="cuda")
        assert result, f"{config}: {result.reason}"
    # in place, strided, 1-D gate on the GPU
    final = torch.randn(1000, 6000, device="cuda", dtype=torch.bfloat16)[:, 100:5220]
    shared = torch.randn(1000, 5200, device="cuda", dtype=torch.bfloat16)[:, 80:]
    gate = torch.randn(1000, 3, device="cuda", dtype=torch.bfloat16)[:, 1]
    expected = reference(final, gate, shared)
    shared_expert_gate(final, gate, shared, out=final)
    result = compare(final, expected)
    assert result, result.reason
